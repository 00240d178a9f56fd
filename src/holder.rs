//! The holder: reads the custody export, applies it to the keyring and publishes the certificate table, for as
//! long as the process runs.
//!
//! This is the one path from the export to the handshake: export -> [`ExportReader`] -> [`Keyring`] ->
//! [`CertificateStore`]. Each read is applied as a whole and the table swapped in one step. The reader is told
//! what the keyring serves, so that associations whose files did not change are neither read nor verified
//! again: a rescan of an unchanged export costs a `stat` per file. [`Holder::follow`]
//! re-reads on every file event (coalesced over a few milliseconds), retries soon after a read that met a
//! half-written file, rescans periodically as a backstop, and ends each grant at its `not_after` by timer, with no
//! file event at all. Every outcome is logged here, naming the certificate, the grant and the check, and never a
//! byte of key material.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::audit::{Audit, AuditEvent, PublicKeyFingerprint};
use crate::custody::changes::Changes;
use crate::custody::snapshot::{Check, ExportError, ExportReader, GrantStatus, Refusal};
use crate::custody::watch::ExportWatcher;
use crate::keyring::{ApplyReport, EndedGrant, Keyring, LoadedCertificate};
use crate::metrics::Metrics;
use crate::registry::ConnectionRegistry;
use crate::retirement_latency;
use crate::tls::CertificateStore;

/// After the first event of a burst, wait this long for the burst to go quiet before reading.
const QUIET: Duration = Duration::from_millis(5);
/// Never wait longer than this after the first event of a burst: changes apply within a bounded time however
/// busy the writer is.
const MAX_COALESCE: Duration = Duration::from_millis(20);
/// First delay before re-reading after a read that met a half-written or unreadable file.
const FIRST_RETRY: Duration = Duration::from_millis(25);

/// Reads the export and keeps the certificate table in step with it.
#[derive(Debug)]
pub struct Holder {
    export: PathBuf,
    grantee: String,
    /// Held from a read until it is applied, so that reads are serialised and each one is told what the
    /// previous one left served. Taken before `keyring`, never while holding it.
    reader: Mutex<ExportReader>,
    /// Held briefly (an apply, a lapse, a question): the lapse timer never waits for a read.
    keyring: Mutex<Keyring>,
    store: Arc<CertificateStore>,
    metrics: Arc<Metrics>,
    registry: Arc<ConnectionRegistry>,
    serving: watch::Sender<bool>,
    /// The refusal last logged for each certificate, so that a refusal that persists across reads is logged (and
    /// audited) once, not on every read. Also what the refusal metrics count.
    reported: Mutex<HashMap<String, Reported>>,
    /// Grants of ours already recorded as seen in the audit log.
    seen_grants: Mutex<std::collections::HashSet<String>>,
    audit: Audit,
}

impl Holder {
    /// A holder of `grantee`'s associations in `export`, publishing into `store`.
    pub fn new(
        export: PathBuf,
        grantee: String,
        store: Arc<CertificateStore>,
        metrics: Arc<Metrics>,
        registry: Arc<ConnectionRegistry>,
        audit: Audit,
    ) -> Self {
        let (serving, _) = watch::channel(false);
        Self {
            reader: Mutex::new(ExportReader::new(export.clone(), grantee.clone())),
            keyring: Mutex::new(Keyring::new(grantee.as_str())),
            export,
            grantee,
            store,
            metrics,
            registry,
            serving,
            reported: Mutex::new(HashMap::new()),
            seen_grants: Mutex::new(std::collections::HashSet::new()),
            audit,
        }
    }

    /// Whether at least one certificate is served, now and as it changes: listeners accept only while it is.
    pub fn serving(&self) -> watch::Receiver<bool> {
        self.serving.subscribe()
    }

    /// Reads the export now and applies it. On an unreadable export, nothing changes and the error is returned.
    pub fn reload(&self) -> Result<ApplyReport, ExportError> {
        self.reload_after(None, &Changes::everything(&self.export))
    }

    /// As [`Holder::reload`], for a change first seen at `changed_at` (retirements report their latency from it;
    /// without it, from the export's files: see [`retirement_latency`]), examining on disk only the files
    /// `changes` suspects.
    fn reload_after(&self, changed_at: Option<Instant>, changes: &Changes) -> Result<ApplyReport, ExportError> {
        if let Err(insecure) = crate::hygiene::refuse_world_writable_export(&self.export) {
            self.metrics.reload(false);
            tracing::error!(error = %insecure, "refusing to read the custody export; keeping the current certificates");
            let path = insecure.path.clone();
            return Err(ExportError::Io { path, source: std::io::Error::other(insecure) });
        }
        let started = std::time::Instant::now();
        let mut reader = self.reader();
        // Taken once the lock is ours: lapses are judged at the instant the read starts, not before a wait.
        let now = OffsetDateTime::now_utc();
        // The digest of each served generation, asked once per association whose grant passes check 1. A lapse
        // timer firing in between only ends grants, which the apply below then refuses as retired.
        let known = |certificate_id: &str| self.keyring().inputs_of(certificate_id);
        let snapshot = reader.read_changes(now, &known, changes);
        // Reading decrypted keys on this thread: wipe what the ciphers and parsers left in its stack.
        crate::secret::scrub_stack();
        let snapshot = match snapshot {
            Ok(snapshot) => snapshot,
            Err(error) => {
                self.metrics.reload(false);
                tracing::error!(%error, "cannot read the custody export; keeping the current certificates");
                return Err(error);
            }
        };
        let read = started.elapsed();
        self.audit_grants_seen(&snapshot.grants);
        let open = self.registry.counts();
        let mut keyring = self.keyring();
        let report = keyring.apply(snapshot);
        if report.changed() {
            match report.partial {
                // The changes alone: with 10,000 certificates, rebuilding the table is most of a renewal's cost.
                Some(_) => {
                    let ended = report.ended.iter().flat_map(|grant| &grant.certificates);
                    self.store.publish_changes(report.replaced.iter().chain(ended), &report.loaded);
                    self.publish_serving(&keyring);
                }
                None => self.publish(&keyring),
            }
        }
        self.metrics.reload(true);
        drop(keyring);
        reader.drop_superseded();
        let stats = reader.last_read();
        drop(reader);
        tracing::debug!(
            full = changes.is_everything(),
            read_us = read.as_micros(),
            total_us = started.elapsed().as_micros(),
            files_checked = stats.files_checked,
            files_read = stats.files_read,
            verified = stats.verified,
            unchanged = stats.unchanged,
            "read the custody export"
        );
        if !report.ended.is_empty() {
            // The keys are dropped: a retirement's latency ends here. Timed from the first file event when one
            // prompted the read; else (a rescan, a retry) estimated from the export's files.
            let done = OffsetDateTime::now_utc();
            for ended in &report.ended {
                let latency = match changed_at {
                    Some(first_event) => Some(first_event.elapsed()),
                    None => retirement_latency::estimate(&self.export, ended, done),
                };
                self.grant_ended(ended, latency, &open);
            }
        }
        self.log_report(&report);
        self.publish_metrics(&report, now);
        self.audit_changes(&report);
        Ok(report)
    }

    /// Ends every held grant whose `not_after` has passed. Returns the grants ended.
    pub fn expire(&self) -> Vec<EndedGrant> {
        let now = OffsetDateTime::now_utc();
        let open = self.registry.counts();
        let mut keyring = self.keyring();
        let ended = keyring.end_lapsed(now);
        if ended.is_empty() {
            return ended;
        }
        self.store.publish_changes(ended.iter().flat_map(|grant| &grant.certificates), &[]);
        self.publish_serving(&keyring);
        drop(keyring);
        for grant in &ended {
            // Measured from the instant the grant lapsed.
            let late = grant.not_after.and_then(|t| Duration::try_from(OffsetDateTime::now_utc() - t).ok());
            self.grant_ended(grant, late, &open);
        }
        ended
    }

    /// When the next held grant lapses.
    pub fn next_lapse(&self) -> Option<OffsetDateTime> {
        self.keyring().next_lapse()
    }

    /// Whether at least one certificate is served.
    pub fn is_serving(&self) -> bool {
        !self.keyring().is_empty()
    }

    /// Follows the export until `shutdown`: re-reads on file events, after unsettled reads, on every
    /// `rescan_interval`, and ends grants at their `not_after`. Reads run on the blocking pool: they touch files
    /// and decrypt keys.
    ///
    /// The export is watched from here, after the first read rather than before it: watching adds one inotify
    /// watch per directory, a tenth of a cold start with 10,000 certificates on one core, and nothing is lost by
    /// waiting, since a new watch always asks for a full read, which catches up on whatever changed before it.
    pub async fn follow(self: Arc<Self>, rescan_interval: Duration, shutdown: CancellationToken) {
        let export = self.export.clone();
        let watching = tokio::task::spawn_blocking(move || ExportWatcher::new(&export).map_err(|e| e.to_string()));
        let mut watcher = match watching.await.unwrap_or_else(|join| Err(join.to_string())) {
            Ok(watcher) => Some(watcher),
            Err(error) => {
                tracing::error!(%error, rescan = ?rescan_interval, "no file events; following the export by rescans only");
                None
            }
        };
        let mut next_rescan = Instant::now() + rescan_interval;
        let mut retry: Option<(Instant, Duration)> = None;
        loop {
            let lapse = self.next_lapse().map(instant_of);
            let woke = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = changed(watcher.as_ref()) => Wake::Event,
                _ = tokio::time::sleep_until(next_rescan) => Wake::Rescan,
                _ = sleep_until_some(retry.map(|(at, _)| at)) => Wake::Retry,
                _ = sleep_until_some(lapse) => Wake::Lapse,
            };
            if woke == Wake::Lapse {
                let holder = Arc::clone(&self);
                let _ = tokio::task::spawn_blocking(move || holder.expire()).await;
                continue;
            }
            if let (Wake::Event, Some(watcher)) = (woke, &watcher) {
                coalesce(watcher, &shutdown).await;
            }
            let changed_at = watcher.as_ref().and_then(ExportWatcher::take_first_event);
            // A read prompted by events examines what they name, and a retry what the events since say: both
            // also examine every file changed in the last seconds (the cache never trusts those, see
            // `custody::snapshot::cache`), so a retry still sees the rest of a change it caught half-written.
            // The periodic read, and any read without a watcher, examines everything.
            let changes = match (woke, &watcher) {
                (Wake::Event | Wake::Retry, Some(watcher)) => watcher.take_changes(),
                _ => Changes::everything(&self.export),
            };
            let holder = Arc::clone(&self);
            let result = tokio::task::spawn_blocking(move || holder.reload_after(changed_at, &changes)).await;
            if let Some(watcher) = &mut watcher {
                watcher.ensure_watching();
            }
            next_rescan = Instant::now() + rescan_interval;
            let settled = matches!(&result, Ok(Ok(report)) if report.is_settled());
            retry = if settled {
                None
            } else {
                let delay = retry.map_or(FIRST_RETRY, |(_, d)| (d * 2).min(rescan_interval));
                Some((Instant::now() + delay, delay))
            };
        }
    }

    fn publish(&self, keyring: &Keyring) {
        self.store.publish(keyring);
        self.publish_serving(keyring);
    }

    fn publish_serving(&self, keyring: &Keyring) {
        self.serving.send_if_modified(|serving| {
            let now = !keyring.is_empty();
            std::mem::replace(serving, now) != now
        });
    }

    /// Reports a grant's end. `open` counts the connections of each grant from just before it ended.
    fn grant_ended(&self, ended: &EndedGrant, latency: Option<Duration>, open: &HashMap<String, usize>) {
        let connections = open.get(&ended.grant_id).copied().unwrap_or(0);
        if let Some(latency) = latency {
            self.metrics.grant_retired(latency);
        }
        for certificate in &ended.certificates {
            self.audit.record(AuditEvent::key_zeroized(&certificate.identity));
        }
        self.audit.record(AuditEvent::grant_retired(ended, latency));
        self.audit.record(AuditEvent::ConnectionsClosed { grant_id: &ended.grant_id, count: connections as u64 });
        tracing::warn!(
            grant = %ended.grant_id,
            reason = %ended.reason,
            certificates = ?ended.certificates.iter().map(|c| c.certificate_id.as_str()).collect::<Vec<_>>(),
            connections_closed = connections,
            latency_us = latency.map(|l| l.as_micros()),
            "grant ended: keys dropped, handshakes refused, connections closed"
        );
    }

    /// Records each grant naming us the first time it is seen.
    fn audit_grants_seen(&self, grants: &std::collections::BTreeMap<String, GrantStatus>) {
        if !self.audit.is_enabled() {
            return;
        }
        let mut seen = self.seen_grants.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (grant_id, status) in grants {
            if let GrantStatus::Active { grantee, not_after } = status {
                if grantee == &self.grantee && seen.insert(grant_id.clone()) {
                    self.audit.record(AuditEvent::GrantSeen { grant_id, grantee, not_after: *not_after });
                }
            }
        }
    }

    /// Records what a read changed: keys loaded, certificates served, swapped or removed, keys dropped. Refusals are
    /// recorded by [`Holder::log_report`], once per change.
    fn audit_changes(&self, report: &ApplyReport) {
        if !self.audit.is_enabled() {
            return;
        }
        for new in &report.loaded {
            let fingerprint = new.certified_key().and_then(|k| PublicKeyFingerprint::of_signing_key(&*k.key));
            if let Some(fingerprint) = fingerprint {
                self.audit.record(AuditEvent::key_loaded(&new.identity, fingerprint));
            }
            match report.replaced.iter().find(|old| old.certificate_id == new.certificate_id) {
                Some(old) => self.audit.record(AuditEvent::swapped(&old.identity, &new.identity)),
                None => self.audit.record(AuditEvent::served(&new.identity)),
            }
        }
        for old in &report.replaced {
            if !report.loaded.iter().any(|new| new.certificate_id == old.certificate_id) {
                self.audit.record(AuditEvent::removed(&old.identity));
            }
            // The generation's key goes when the last handshake holding it finishes (aws-lc cleanses it then).
            self.audit.record(AuditEvent::key_zeroized(&old.identity));
        }
    }

    fn log_report(&self, report: &ApplyReport) {
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
        let mut reported = self.reported();
        let mut now_refused = HashMap::new();
        let kept = report.kept.iter().map(|(c, r)| (c.certificate_id.as_str(), c.grant_id.as_str(), r, true));
        let refused = report.refused.iter().map(|(c, g, r)| (c.as_str(), g.as_str(), r, false));
        for (certificate, grant, refusal, kept) in kept.chain(refused) {
            let text = refusal.to_string();
            let first_time = reported.get(certificate).is_none_or(|r| r.text != text);
            log_refusal(first_time, certificate, grant, refusal, kept);
            if first_time {
                self.audit_refusal(certificate, grant, refusal, kept, report);
            }
            now_refused.insert(certificate.to_owned(), Reported { text, refused: (!kept).then_some(refusal.check) });
        }
        match &report.partial {
            // The associations a partial read did not judge keep their refusals.
            Some(judged) => {
                for certificate in judged {
                    reported.remove(certificate);
                }
                reported.extend(now_refused);
            }
            None => *reported = now_refused,
        }
    }

    fn reported(&self) -> MutexGuard<'_, HashMap<String, Reported>> {
        // A map of log lines already written: a poisoned one at worst repeats or skips a log line.
        self.reported.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn audit_refusal(&self, certificate: &str, grant: &str, refusal: &Refusal, kept: bool, report: &ApplyReport) {
        let held = report.kept.iter().find(|(c, _)| kept && c.certificate_id == certificate);
        match held {
            Some((held, _)) => self.audit.record(AuditEvent::kept(&held.identity, refusal)),
            None => self.audit.record(AuditEvent::refused(certificate, grant, refusal)),
        }
    }

    /// The audit log.
    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    fn reader(&self) -> MutexGuard<'_, ExportReader> {
        // The reader's caches cannot be left inconsistent by a panic: each entry is one file read whole, checked
        // against the file's stamp before every use, and a read cut short only leaves fewer of them.
        self.reader.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn keyring(&self) -> MutexGuard<'_, Keyring> {
        // A panic while holding the lock cannot leave the keyring half-updated in a way that matters more than
        // stopping service would, so a poisoned lock is used as is.
        self.keyring.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Publishes the served certificates' expiry, the associations refused (not counting those whose last good
    /// state is still served) and the grants.
    fn publish_metrics(&self, report: &ApplyReport, now: OffsetDateTime) {
        let mut refused: Vec<(&'static str, i64)> = Vec::new();
        for check in self.reported().values().filter_map(|r| r.refused) {
            let label = check_label(check);
            match refused.iter_mut().find(|(l, _)| *l == label) {
                Some((_, n)) => *n += 1,
                None => refused.push((label, 1)),
            }
        }
        let keyring = self.keyring();
        let held = i64::try_from(keyring.grants_held()).unwrap_or(i64::MAX);
        let retired = i64::try_from(keyring.grants_retired()).unwrap_or(i64::MAX);
        let expiry = |c: &LoadedCertificate| (c.not_after - now).as_seconds_f64();
        match report.partial {
            // Only what changed: the others' expiry is brought up to date by the next complete read.
            Some(_) => {
                let ended = report.ended.iter().flat_map(|grant| &grant.certificates);
                let loaded = |id: &str| report.loaded.iter().any(|c| c.certificate_id == id);
                let removed = report.replaced.iter().chain(ended).map(|c| c.certificate_id.as_str());
                let updated = report.loaded.iter().map(|c| (c.certificate_id.as_str(), expiry(c)));
                self.metrics.custody_changes(removed.filter(|id| !loaded(id)), updated, &refused, held, retired);
            }
            None => {
                let served = keyring.served().map(|c| (c.certificate_id.as_str(), expiry(c)));
                self.metrics.custody_state(served, &refused, held, retired);
            }
        }
    }
}

/// A refusal as last logged for one certificate.
#[derive(Debug)]
struct Reported {
    /// The refusal, as logged.
    text: String,
    /// The check that refused, when nothing is served for the association (not a kept last good state).
    refused: Option<Check>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    Event,
    Rescan,
    Retry,
    Lapse,
}

/// Waits for a burst of events to go quiet, or [`MAX_COALESCE`] after it began.
async fn coalesce(watcher: &ExportWatcher, shutdown: &CancellationToken) {
    let deadline = Instant::now() + MAX_COALESCE;
    loop {
        let quiet = (Instant::now() + QUIET).min(deadline);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = watcher.changed() => {}
            _ = tokio::time::sleep_until(quiet) => return,
        }
        if Instant::now() >= deadline {
            return;
        }
    }
}

async fn changed(watcher: Option<&ExportWatcher>) {
    match watcher {
        Some(watcher) => watcher.changed().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The monotonic instant of a wall-clock time (now, if it has passed).
fn instant_of(at: OffsetDateTime) -> Instant {
    let ahead = at - OffsetDateTime::now_utc();
    Instant::now() + Duration::try_from(ahead).unwrap_or(Duration::ZERO)
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

/// Logs a refusal at `warn` the first time it is seen, at `debug` while it persists.
fn log_refusal(first_time: bool, certificate: &str, grant: &str, refusal: &Refusal, kept: bool) {
    let message =
        if kept { "new state of the association refused; serving the last good one" } else { "association refused" };
    let check = refusal.check.label();
    if first_time {
        tracing::warn!(certificate, grant, check, refusal = %refusal, "{message}");
    } else {
        tracing::debug!(certificate, grant, check, refusal = %refusal, "{message} (unchanged)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::custody::writer::{AssociateRequest, Custody, IssueRequest, RenewRequest};
    use crate::tls::TlsPolicy;

    const GRANTEE: &str = "sealgate-test";

    /// A custody state, an export with `c-1` and `c-2` associated (one grant each), and a holder of it.
    struct Fixture {
        _dir: tempfile::TempDir,
        custody: Custody,
        export: PathBuf,
        holder: Holder,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::TempDir::new().unwrap();
            let custody = Custody::open(&dir.path().join("state")).unwrap();
            let export = dir.path().join("export");
            for id in ["c-1", "c-2"] {
                let mut request = IssueRequest::new([format!("{id}.example.test")]);
                request.certificate_id = Some(id.to_owned());
                custody.issue(&request).unwrap();
                custody.associate(&AssociateRequest::new(id, &export, GRANTEE)).unwrap();
            }
            let text = "[custody]\nexport = \"e\"\ngrantee = \"g\"\n[[listener]]\nbind = \"127.0.0.1:0\"\n";
            let config = Config::parse(text, std::path::Path::new("proxy.toml")).unwrap();
            let store = Arc::new(CertificateStore::new(TlsPolicy::new(&config.tls).unwrap()));
            let holder = Holder::new(
                export.clone(),
                GRANTEE.to_owned(),
                store,
                Arc::new(Metrics::new()),
                Arc::new(ConnectionRegistry::default()),
                Audit::disabled(),
            );
            Self { _dir: dir, custody, export, holder }
        }

        fn last_read(&self) -> crate::custody::snapshot::ReadStats {
            self.holder.reader().last_read()
        }
    }

    #[test]
    fn a_reload_verifies_only_what_changed_since_the_last_one() {
        let f = Fixture::new();
        let report = f.holder.reload().unwrap();
        assert_eq!(report.loaded.len(), 2);
        assert_eq!((f.last_read().verified, f.last_read().unchanged), (2, 0));

        // Nothing changed: the keyring's digests match, nothing is decrypted, nothing changes.
        let report = f.holder.reload().unwrap();
        assert!(!report.changed() && report.is_settled(), "{report:?}");
        assert_eq!((f.last_read().verified, f.last_read().unchanged), (0, 2));

        // A renewal: that association alone is verified, and its new generation served.
        f.custody.renew("c-1", &RenewRequest::reissue()).unwrap();
        let report = f.holder.reload().unwrap();
        assert_eq!((report.loaded.len(), report.replaced.len()), (1, 1), "{report:?}");
        assert_eq!(report.loaded[0].certificate_id, "c-1");
        assert_eq!((f.last_read().verified, f.last_read().unchanged), (1, 1));
        assert!(f.holder.is_serving());
    }

    #[test]
    fn a_partial_read_keeps_the_refusals_it_did_not_judge() {
        let f = Fixture::new();
        let mut request = IssueRequest::new(["c-3.example.test"]);
        request.certificate_id = Some("c-3".to_owned());
        f.custody.issue(&request).unwrap();
        f.custody.associate(&AssociateRequest::new("c-3", &f.export, GRANTEE)).unwrap();
        let sealed = f.export.join("certificates/c-3/private-key.sealed");
        let tampered = std::fs::read_to_string(&sealed).unwrap().replacen("ciphertext = \"", "ciphertext = \"AAAA", 1);
        std::fs::write(&sealed, tampered).unwrap();
        let refused = |holder: &Holder| {
            let text = holder.metrics.encode();
            text.lines()
                .filter(|l| l.starts_with("sealgate_associations_refused{"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        // Files just written are re-examined on every read until their stamps can be trusted: trust them now.
        f.holder.reader().trust_recent_stamps();
        let report = f.holder.reload().unwrap();
        assert_eq!(report.refused.len(), 1, "{report:?}");
        let before = refused(&f.holder);
        assert_eq!(before.len(), 1, "{before:?}");

        // c-1 renewed, its files named: a partial read judges c-1 alone, and c-3's refusal still counts.
        f.custody.renew("c-1", &RenewRequest::reissue()).unwrap();
        let mut changes = Changes::none(&f.export);
        for name in ["associations.toml", "certificates/c-1/certificate.pem", "certificates/c-1/private-key.sealed"] {
            changes.add(&f.export.join(name));
        }
        let report = f.holder.reload_after(None, &changes).unwrap();
        assert_eq!(report.partial.as_deref(), Some(&["c-1".to_owned()][..]), "{report:?}");
        assert_eq!(refused(&f.holder), before);
    }

    /// The sum and count of the retirement latency histogram.
    fn retirement_latency(holder: &Holder) -> (f64, u64) {
        let text = holder.metrics.encode();
        let value = |name: &str| {
            text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok()).unwrap_or_default()
        };
        (value("sealgate_grant_retirement_seconds_sum "), value("sealgate_grant_retirement_seconds_count ") as u64)
    }

    /// The later of `path`'s modification and status-change times, as the latency estimate reads them.
    fn stamp(path: &std::path::Path) -> std::time::SystemTime {
        use std::os::unix::fs::MetadataExt;
        let metadata = std::fs::metadata(path).unwrap();
        let at = |s: i64, ns: i64| std::time::UNIX_EPOCH + Duration::new(s as u64, ns as u32);
        at(metadata.mtime(), metadata.mtime_nsec()).max(at(metadata.ctime(), metadata.ctime_nsec()))
    }

    /// Waits until `at least` has passed since the instant `since`, by the wall clock file stamps use.
    fn wait_past(since: std::time::SystemTime, at_least: Duration) {
        let deadline = std::time::Instant::now() + at_least + Duration::from_secs(5);
        while since.elapsed().unwrap_or_default() < at_least {
            assert!(std::time::Instant::now() < deadline, "the clock does not advance");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_retirement_no_file_event_timed_is_timed_from_the_export_files() {
        let f = Fixture::new();
        f.holder.reload().unwrap();
        let grant = crate::custody::writer::grant_id_of("c-1", &f.export).unwrap().unwrap();
        f.custody.retire_grant(&grant).unwrap();
        let grant_file = f.export.join("grants").join(format!("{grant}.toml"));
        let changed = stamp(&grant_file);
        wait_past(changed, Duration::from_millis(300));

        // `reload` is what a rescan does: no file event, no instant to time from.
        let report = f.holder.reload().unwrap();
        assert_eq!(report.ended.len(), 1, "{report:?}");
        let (sum, count) = retirement_latency(&f.holder);
        assert_eq!(count, 1, "the retirement is timed");
        let since_change = changed.elapsed().unwrap().as_secs_f64();
        assert!((0.3..=since_change).contains(&sum), "{sum} s, the file changed {since_change} s ago");

        // A grant file deleted: timed from its directory's change.
        let other = crate::custody::writer::grant_id_of("c-2", &f.export).unwrap().unwrap();
        std::fs::remove_file(f.export.join("grants").join(format!("{other}.toml"))).unwrap();
        let unlinked = stamp(&f.export.join("grants"));
        wait_past(unlinked, Duration::from_millis(300));
        let report = f.holder.reload().unwrap();
        assert_eq!(report.ended.len(), 1, "{report:?}");
        let (total, count) = retirement_latency(&f.holder);
        assert_eq!(count, 2);
        let since_unlink = unlinked.elapsed().unwrap().as_secs_f64();
        assert!((0.3..=since_unlink).contains(&(total - sum)), "{} s, unlinked {since_unlink} s ago", total - sum);
    }

    #[test]
    fn a_deleted_export_ends_every_grant_through_the_cached_reader() {
        let f = Fixture::new();
        f.holder.reload().unwrap();
        f.holder.reload().unwrap();
        std::fs::remove_dir_all(&f.export).unwrap();
        let report = f.holder.reload().unwrap();
        assert_eq!(report.ended.len(), 2, "{report:?}");
        assert!(!f.holder.is_serving());
        assert_eq!(f.holder.next_lapse(), None);
    }
}
