//! The connection registry: which grant each open connection depends on.
//!
//! A connection registers once its handshake is done and deregisters when it closes (the [`Registration`] guard).
//! Closing is not done through the registry: every connection watches its grant's end signal itself. The registry
//! answers how many connections a grant's end closes, for the audit log, the log and the metrics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::keyring::CertificateIdentity;

/// Open connections counted by grant.
#[derive(Debug, Default)]
pub struct ConnectionRegistry {
    by_grant: Mutex<HashMap<String, usize>>,
}

impl ConnectionRegistry {
    /// Registers a connection made with `certificate`; it stays counted until the guard is dropped.
    pub fn register(self: &Arc<Self>, certificate: &Arc<CertificateIdentity>) -> Registration {
        let mut by_grant = self.lock();
        match by_grant.get_mut(&certificate.grant_id) {
            Some(count) => *count += 1,
            None => {
                by_grant.insert(certificate.grant_id.clone(), 1);
            }
        }
        Registration { registry: Arc::clone(self), certificate: Arc::clone(certificate) }
    }

    /// Number of open connections made with certificates of `grant_id`.
    pub fn open_for(&self, grant_id: &str) -> usize {
        self.lock().get(grant_id).copied().unwrap_or(0)
    }

    /// Open connections of every grant, as of now. Taken before ending grants: their connections start closing the
    /// moment a grant ends.
    pub fn counts(&self) -> HashMap<String, usize> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // Counters stay meaningful even if a holder of the lock panicked.
        self.by_grant.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Keeps a connection counted; dropping it deregisters the connection.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<ConnectionRegistry>,
    certificate: Arc<CertificateIdentity>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut by_grant = self.registry.lock();
        if let Some(count) = by_grant.get_mut(&self.certificate.grant_id) {
            *count -= 1;
            if *count == 0 {
                by_grant.remove(&self.certificate.grant_id);
            }
        }
    }
}
