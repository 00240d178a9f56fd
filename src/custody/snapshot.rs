//! One consistent read of a custody export, with the holder's five checks (FORMAT.md, "What a holder must
//! check") applied to every association.
//!
//! A [`Snapshot`] says, for every association, either "served" with the verified certificate and its key,
//! "unchanged" (served by the generation the caller already holds, see [`ExportReader`]), or "refused" with the
//! check that failed. Deciding what a refusal means for an association that is already being served (keep the
//! last good state, or end service because the grant is gone) is the keyring's job.
//!
//! [`read_export`] reads an export once, from scratch. [`ExportReader`] reads it again and again, caching files
//! and skipping the verification of associations whose inputs did not change.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::sign::SigningKey;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use super::format::FormatError;
use crate::names;
use crate::secret::SecretBytes;

mod associations;
mod cache;
mod certificate;
mod checks;
mod grants;
mod inputs;
mod parallel;
mod reader;
#[cfg(test)]
mod reader_tests;
#[cfg(test)]
mod tests;

pub use reader::{ExportReader, ReadStats};

/// The whole export could not be read; nothing in it can be judged.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// `associations.toml` exists but cannot be read, or the `grants/` directory exists but cannot be listed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// `associations.toml` does not parse.
    #[error("{path}: {source}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The rule it breaks.
        source: FormatError,
    },
}

/// Result alias of this module.
pub type Result<T, E = ExportError> = std::result::Result<T, E>;

/// One read of an export.
#[derive(Debug)]
pub struct Snapshot {
    /// The export directory that was read.
    pub export: PathBuf,
    /// The instant against which lapses were judged.
    pub read_at: OffsetDateTime,
    /// Every grant file present in `grants/`, by grant id, whatever its grantee.
    pub grants: BTreeMap<String, GrantStatus>,
    /// One outcome per `[[association]]` entry, in file order; in a partial snapshot, one per entry that may
    /// have changed.
    pub associations: Vec<AssociationOutcome>,
    /// Whether this covers the whole export or only what may have changed since the previous read.
    pub scope: Scope,
}

/// How much of the export a [`Snapshot`] covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Scope {
    /// Every association entry and every grant file: what the snapshot does not list is not in the export.
    #[default]
    Complete,
    /// Only the association entries and grant files that may have changed since the previous read by the same
    /// [`ExportReader`], which the caller applied: whatever this snapshot does not list is as that read left
    /// it, except the grants of `gone_grants`, whose files are gone, and the associations of `removed`, which
    /// `associations.toml` no longer has. See [`ExportReader::read_changes`].
    Partial {
        /// Grant files the previous read found that are gone.
        gone_grants: Vec<String>,
        /// Certificate ids of the associations the previous read found that are gone.
        removed: Vec<String>,
    },
}

/// What a grant file says, as far as this holder is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantStatus {
    /// Active, not lapsed. `not_after` is when it will lapse, if ever.
    Active {
        /// The grantee named in the file.
        grantee: String,
        /// When the grant lapses, if it does.
        not_after: Option<OffsetDateTime>,
    },
    /// `state = "retired"`.
    Retired,
    /// `not_after` has passed.
    Lapsed,
    /// The file exists but does not parse (perhaps half-written): its state is unknown, retry.
    Unreadable(String),
}

/// The outcome for one association.
#[derive(Debug)]
pub struct AssociationOutcome {
    /// The association's certificate id, as written.
    pub certificate_id: String,
    /// The association's grant id, as written.
    pub grant_id: String,
    /// The names the association is for, as far as they were known when the outcome was decided: the served
    /// names; else the entry's `server_names` (normalised); else the leaf's DNS names once its file was read;
    /// else empty. For reports only: a refused association serves no name.
    pub server_names: Vec<String>,
    /// The leaf certificate's `not_after`, once its file was read. For reports only.
    pub certificate_not_after: Option<OffsetDateTime>,
    /// SHA-256 over everything checks 2 to 5 depend on: the holder, the association entry, and the bytes of the
    /// grant file, the certificate and the sealed key (each as far as it could be read). Two reads with the same
    /// inputs reach the same verdict in checks 2 to 5; see [`ExportReader::read`].
    pub inputs: [u8; 32],
    /// Served with this certificate, unchanged, or refused.
    pub result: Verdict,
}

/// The verdict on one association.
#[derive(Debug)]
pub enum Verdict {
    /// All five checks passed: serve this certificate.
    Served(VerifiedCertificate),
    /// Check 1 passed now, and the inputs are those of the generation the caller already serves: keep serving
    /// it. Checks 2 to 5 were not run again and nothing was decrypted.
    Unchanged,
    /// A check failed.
    Refused(Refusal),
}

impl AssociationOutcome {
    /// Whether the association is to be served: it passed all five checks, or is unchanged.
    pub fn is_served(&self) -> bool {
        matches!(self.result, Verdict::Served(_) | Verdict::Unchanged)
    }

    /// The refusal, when the association was refused.
    pub fn refusal(&self) -> Option<&Refusal> {
        match &self.result {
            Verdict::Refused(refusal) => Some(refusal),
            Verdict::Served(_) | Verdict::Unchanged => None,
        }
    }

    /// `served` (also for an unchanged association), or the refusal's [`Refusal::outcome`]: the wording of
    /// `sealgate check` and `expected.toml`.
    pub fn outcome(&self) -> String {
        match &self.result {
            Verdict::Served(_) | Verdict::Unchanged => "served".to_owned(),
            Verdict::Refused(refusal) => refusal.outcome(),
        }
    }
}

/// A certificate whose association passed all five checks, with its key ready to sign.
pub struct VerifiedCertificate {
    /// The certificate id.
    pub certificate_id: String,
    /// The grant that let us decrypt its key.
    pub grant_id: String,
    /// The grant's instant of lapse, if any.
    pub grant_not_after: Option<OffsetDateTime>,
    /// The names to serve it for (the association's `server_names`, or the leaf's DNS names), normalised.
    pub server_names: Vec<String>,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// SHA-256 of the leaf's DER: tells a renewal from an unchanged certificate.
    pub leaf_sha256: [u8; 32],
    /// The leaf's validity.
    pub not_before: OffsetDateTime,
    /// The leaf's validity.
    pub not_after: OffsetDateTime,
    /// The private key, parsed by aws-lc (whose memory is cleansed when freed). Checked against the leaf.
    pub signing_key: Arc<dyn SigningKey>,
    /// The decrypted PKCS#8 DER, wiped on drop. Kept only until the keyring has taken the certificate.
    pub private_key: SecretBytes,
}

impl fmt::Debug for VerifiedCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedCertificate")
            .field("certificate_id", &self.certificate_id)
            .field("grant_id", &self.grant_id)
            .field("server_names", &self.server_names)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("private_key", &self.private_key)
            .finish_non_exhaustive()
    }
}

/// Which of FORMAT.md's holder checks failed, or `Files` when a certificate's own files are unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Check {
    /// The certificate's files are missing, unreadable or malformed, or the association entry itself is.
    Files,
    /// 1: the grant exists, is active, has not lapsed, names this holder and allows `Decrypt`.
    Grant,
    /// 2: the grant's `key_id` equals the sealed key's.
    KeyId,
    /// 3: both seals open.
    Seal,
    /// 4: the private key matches the leaf certificate.
    KeyMatch,
    /// 5: every server name is covered by the certificate.
    ServerNames,
}

impl Check {
    /// The label used in outcomes: `check 1` to `check 5`, or `files`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Files => "files",
            Self::Grant => "check 1",
            Self::KeyId => "check 2",
            Self::Seal => "check 3",
            Self::KeyMatch => "check 4",
            Self::ServerNames => "check 5",
        }
    }
}

/// Why an association is refused. `reason` is the fixed phrase of the outcome; `detail` adds what a user needs
/// to fix it (a file and the rule it breaks, a name), never key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The check that failed.
    pub check: Check,
    /// Fixed phrase, e.g. "the grant is retired".
    pub reason: &'static str,
    /// Specifics, possibly empty.
    pub detail: String,
}

/// The fixed `reason` phrases of refusals, grouped by check, so that callers and tests match them without
/// retyping them. Four of them are fixed by the shared vectors (`expected.toml`).
pub mod reason {
    /// Files: the entry's `certificate_id` or `grant_id` is not `[A-Za-z0-9_-]{1,128}`.
    pub const INVALID_ID: &str = "the association names an invalid id";
    /// Files: an earlier entry associates the same certificate; only the first is judged.
    pub const DUPLICATE: &str = "the certificate is associated more than once";
    /// Files: `certificate.pem` is missing, unreadable, or not PEM X.509 certificates.
    pub const CERTIFICATE_FILE: &str = "the certificate file is unusable";
    /// Files: `private-key.sealed` is missing, unreadable or malformed.
    pub const SEALED_KEY_FILE: &str = "the sealed key file is unusable";

    /// Check 1: no `grants/<grant_id>.toml`.
    pub const GRANT_MISSING: &str = "the grant does not exist";
    /// Check 1: the grant file exists but does not parse (perhaps half-written): retry.
    pub const GRANT_UNREADABLE: &str = "the grant file does not parse";
    /// Check 1: `state = "retired"`.
    pub const GRANT_RETIRED: &str = "the grant is retired";
    /// Check 1: `not_after` has passed.
    pub const GRANT_LAPSED: &str = "the grant has lapsed";
    /// Check 1: `grantee` is not this holder.
    pub const OTHER_GRANTEE: &str = "the grant names another grantee";
    /// Check 1: `operations` lacks `Decrypt`.
    pub const NO_DECRYPT: &str = "the grant does not allow Decrypt";
    /// Check 1: an active grant without `grant_key`.
    pub const NO_GRANT_KEY: &str = "the grant holds no grant_key";
    /// Check 1: the grant file changed (or vanished) between check 1 and the unwrapping of the data key, within
    /// one read: its state is unknown for this read (the snapshot reports it unreadable), retry.
    pub const GRANT_CHANGED: &str = "the grant file changed during the read";

    /// Check 2.
    pub const KEY_ID_MISMATCH: &str = "the grant's key_id differs from the sealed key's";

    /// Check 3: `wrapped_data_key` is malformed or its tag does not verify under the grant key.
    pub const DATA_KEY_SEAL: &str = "the wrapped data key does not open";
    /// Check 3: the sealed private key's tag does not verify under the data key.
    pub const PRIVATE_KEY_SEAL: &str = "the sealed key does not open";

    /// Check 4: the key is not one aws-lc can sign with, or its public key is not the leaf's.
    pub const KEY_MISMATCH: &str = "the private key does not match the certificate";

    /// Check 5: a requested name is not covered by the leaf's DNS names.
    pub const NAME_NOT_COVERED: &str = "server name not covered by the certificate";
    /// Check 5: a requested name is not a valid DNS name or wildcard.
    pub const INVALID_NAME: &str = "invalid server name";
    /// Check 5: there is no name to serve (an empty `server_names`, or a leaf without valid DNS names).
    pub const NO_NAMES: &str = "no server name to serve";
}

impl Refusal {
    /// A refusal by `check` with one of the [`reason`] phrases.
    pub fn new(check: Check, reason: &'static str, detail: impl Into<String>) -> Self {
        Self { check, reason, detail: detail.into() }
    }

    /// The outcome as `sealgate check` prints it and `expected.toml` states it:
    /// `refused: the grant is retired (check 1)`.
    pub fn outcome(&self) -> String {
        format!("refused: {} ({})", self.reason, self.check.label())
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.reason, self.check.label())?;
        if !self.detail.is_empty() {
            write!(f, ": {}", self.detail)?;
        }
        Ok(())
    }
}

/// Reads the export at `export` as the holder `grantee`, judging lapses at `now`, from scratch: a fresh
/// [`ExportReader`] that knows of no served generation, so that every association is verified in full.
///
/// What is absent is read as empty, as FORMAT.md's "a grant is retired when its file is gone" asks: a missing
/// export directory holds no grants and no associations (every held grant is gone), a missing
/// `associations.toml` associates nothing, a missing `grants/` holds no grants. The custody system writes every
/// file atomically, so absence is a state, never a write in progress.
///
/// Fails only when the export as a whole cannot be judged: `associations.toml` exists but cannot be read or does
/// not parse, or `grants/` exists but cannot be listed (judging then would take every grant for gone). Anything
/// wrong with one association refuses that association alone.
///
/// Grant keys and data keys are dropped (and wiped) as soon as each association has been verified.
/// Associations are judged on up to one thread per core (the calling thread among them): parsing and
/// validating private keys dominates a cold start. This blocks; call it from a blocking context.
pub fn read_export(export: &Path, grantee: &str, now: OffsetDateTime) -> Result<Snapshot> {
    ExportReader::new(export.to_owned(), grantee.to_owned()).read(now, &|_| None)
}

/// Normalises names and drops repeats, keeping the first occurrence's place.
fn normalized_names<S: AsRef<str>>(names: &[S]) -> Vec<String> {
    let mut seen = HashSet::with_capacity(names.len());
    names.iter().map(|name| names::normalize(name.as_ref())).filter(|name| seen.insert(name.clone())).collect()
}
