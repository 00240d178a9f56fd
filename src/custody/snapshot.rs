//! One consistent read of a custody export, with the holder's five checks (FORMAT.md, "What a holder must
//! check") applied to every association.
//!
//! A [`Snapshot`] says, for every association, either "served" with the verified certificate and its key, or
//! "refused" with the check that failed. It has no memory of earlier reads: deciding what a refusal means for an
//! association that is already being served (keep the last good state, or end service because the grant is gone)
//! is the keyring's job.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::sign::SigningKey;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use super::format::FormatError;
use crate::secret::SecretBytes;

/// The whole export could not be read; nothing in it can be judged.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The export directory or `associations.toml` cannot be read.
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
    /// One outcome per `[[association]]` entry, in file order.
    pub associations: Vec<AssociationOutcome>,
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
    /// Served with this certificate, or refused.
    pub result: std::result::Result<VerifiedCertificate, Refusal>,
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

impl Refusal {
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

/// Reads the export at `export` as the holder `grantee`, judging lapses at `now`.
pub fn read_export(export: &Path, grantee: &str, now: OffsetDateTime) -> Result<Snapshot> {
    let _ = (export, grantee, now);
    todo!("implemented in the custody reader change")
}
