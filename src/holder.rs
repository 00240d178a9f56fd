//! The holder: reads the custody export, applies it to the keyring and publishes the certificate table.
//!
//! This is the one path from the export to the handshake: export -> [`snapshot`] -> [`Keyring`] ->
//! [`CertificateStore`]. Each read is applied as a whole and the table swapped in one step. Every outcome is
//! logged here, naming the certificate, the grant and the check, and never a byte of key material.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use time::OffsetDateTime;

use crate::custody::snapshot::{self, Check, ExportError};
use crate::keyring::{ApplyReport, Keyring};
use crate::metrics::Metrics;
use crate::tls::CertificateStore;

/// Reads the export and keeps the certificate table in step with it.
#[derive(Debug)]
pub struct Holder {
    export: PathBuf,
    grantee: String,
    keyring: Mutex<Keyring>,
    store: Arc<CertificateStore>,
    metrics: Arc<Metrics>,
}

impl Holder {
    /// A holder of `grantee`'s associations in `export`, publishing into `store`.
    pub fn new(export: PathBuf, grantee: String, store: Arc<CertificateStore>, metrics: Arc<Metrics>) -> Self {
        Self { export, grantee, keyring: Mutex::new(Keyring::new()), store, metrics }
    }

    /// Reads the export now and applies it. On an unreadable export, nothing changes and the error is returned.
    pub fn reload(&self) -> Result<ApplyReport, ExportError> {
        let now = OffsetDateTime::now_utc();
        let snapshot = match snapshot::read_export(&self.export, &self.grantee, now) {
            Ok(snapshot) => snapshot,
            Err(error) => {
                self.metrics.reload(false);
                tracing::error!(%error, "cannot read the custody export; keeping the current certificates");
                return Err(error);
            }
        };
        let mut keyring = self.keyring();
        let report = keyring.apply(snapshot);
        if report.changed() {
            self.store.publish(&keyring);
        }
        self.metrics.reload(true);
        self.publish_metrics(&keyring, &report, now);
        drop(keyring);
        log_report(&report);
        Ok(report)
    }

    /// Whether at least one certificate is served.
    pub fn is_serving(&self) -> bool {
        !self.keyring().is_empty()
    }

    fn keyring(&self) -> MutexGuard<'_, Keyring> {
        // A panic while holding the lock cannot leave the keyring half-updated in a way that matters more than
        // stopping service would, so a poisoned lock is used as is.
        self.keyring.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish_metrics(&self, keyring: &Keyring, report: &ApplyReport, now: OffsetDateTime) {
        let mut refused: Vec<(&'static str, i64)> = Vec::new();
        for (_, _, refusal) in &report.refused {
            let label = check_label(refusal.check);
            match refused.iter_mut().find(|(l, _)| *l == label) {
                Some((_, n)) => *n += 1,
                None => refused.push((label, 1)),
            }
        }
        let served = keyring.served().map(|c| (c.certificate_id.as_str(), (c.not_after - now).as_seconds_f64()));
        self.metrics.custody_state(
            served,
            &refused,
            i64::try_from(keyring.grants_held()).unwrap_or(i64::MAX),
            i64::try_from(keyring.grants_retired()).unwrap_or(i64::MAX),
        );
    }
}

fn check_label(check: Check) -> &'static str {
    match check {
        Check::Files => "files",
        Check::Grant => "1",
        Check::KeyId => "2",
        Check::Seal => "3",
        Check::KeyMatch => "4",
        Check::ServerNames => "5",
    }
}

fn log_report(report: &ApplyReport) {
    for certificate in &report.loaded {
        tracing::info!(
            certificate = %certificate.certificate_id,
            grant = %certificate.grant_id,
            generation = certificate.generation,
            names = ?certificate.server_names,
            not_after = %certificate.not_after,
            "serving certificate"
        );
    }
    for certificate in &report.replaced {
        tracing::info!(
            certificate = %certificate.certificate_id,
            generation = certificate.generation,
            "certificate generation no longer served"
        );
    }
    for ended in &report.ended {
        tracing::warn!(
            grant = %ended.grant_id,
            reason = %ended.reason,
            certificates = ?ended.certificates.iter().map(|c| c.certificate_id.as_str()).collect::<Vec<_>>(),
            "grant ended: keys dropped, handshakes refused, connections closed"
        );
    }
    for (certificate, refusal) in &report.kept {
        tracing::warn!(
            certificate = %certificate.certificate_id,
            grant = %certificate.grant_id,
            check = refusal.check.label(),
            refusal = %refusal,
            "new state of the association refused; serving the last good one"
        );
    }
    for (certificate, grant, refusal) in &report.refused {
        tracing::warn!(certificate = %certificate, grant = %grant, check = refusal.check.label(), refusal = %refusal, "association refused");
    }
}
