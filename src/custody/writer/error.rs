//! The one error type of the custody writer.

use std::path::{Path, PathBuf};

use super::KeyType;
use crate::custody::format::FormatError;
use crate::custody::seal::SealError;

/// Why a custody operation failed. Messages name the file, the certificate or grant id and the step that failed;
/// none carries key material (the only inputs that could are decoded into wiped buffers and never formatted).
///
/// `Display` describes this step only; the underlying cause, if any, is the [`std::error::Error::source`]
/// (print the chain to see everything).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CustodyError {
    /// A file or directory could not be read, written, renamed or removed.
    #[error("{}: cannot {action}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done, e.g. "read", "create the directory".
        action: &'static str,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A file of the state directory is malformed (or of another format version).
    #[error("{}: {reason}", path.display())]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file of an export does not follow FORMAT.md, so it is not overwritten.
    #[error("{}: not a valid custody export file", path.display())]
    Export {
        /// The file.
        path: PathBuf,
        /// The rule it breaks.
        #[source]
        source: FormatError,
    },
    /// An id does not match `[A-Za-z0-9_-]{1,128}`.
    #[error("{what} {id:?} is not a valid id (it must match [A-Za-z0-9_-]{{1,128}})")]
    InvalidId {
        /// "certificate id" or "grant id".
        what: &'static str,
        /// The id as given.
        id: String,
    },
    /// A server name is not a valid DNS name or wildcard.
    #[error("server name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// A request is inconsistent (empty name list, validity that ends before it begins, ...).
    #[error("{0}")]
    InvalidRequest(String),
    /// `issue` or `import` was given the id of a certificate the state already holds.
    #[error("certificate {0} already exists in the custody state")]
    CertificateExists(String),
    /// No certificate with this id in the state.
    #[error("no certificate {0} in the custody state")]
    UnknownCertificate(String),
    /// No grant with this id in the state.
    #[error("no grant {0} in the custody state")]
    UnknownGrant(String),
    /// The export already holds an association of this certificate under a grant that is still in force.
    #[error(
        "certificate {certificate_id} is already associated with {} under grant {grant_id}; disassociate it or \
         retire the grant first",
        export.display()
    )]
    AlreadyAssociated {
        /// The certificate.
        certificate_id: String,
        /// The export directory.
        export: PathBuf,
        /// The grant of the existing association.
        grant_id: String,
    },
    /// The export holds no association of this certificate that this state knows of.
    #[error("certificate {certificate_id} is not associated with {}", export.display())]
    NotAssociated {
        /// The certificate.
        certificate_id: String,
        /// The export directory.
        export: PathBuf,
    },
    /// An association's server name is not covered by the certificate's DNS names (holders refuse it: check 5).
    #[error("certificate {certificate_id} does not cover server name {name:?}")]
    NameNotCovered {
        /// The certificate.
        certificate_id: String,
        /// The uncovered name.
        name: String,
    },
    /// An imported certificate chain is unusable.
    #[error("certificate chain: {0}")]
    Chain(String),
    /// An imported private key is unusable (the message never quotes it).
    #[error("private key: {0}")]
    PrivateKey(String),
    /// The private key is not the one of the leaf certificate.
    #[error("the private key does not match the leaf certificate's public key")]
    KeyMismatch,
    /// A secret sealed in the state does not open: the state was altered or its master key replaced.
    #[error("{what}: the sealed secret does not open with this state's master key")]
    Seal {
        /// Which secret, e.g. "data key of certificate c-1".
        what: String,
        /// The opener's verdict.
        #[source]
        source: SealError,
    },
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// A key pair could not be generated.
    #[error("cannot generate a {0} key pair")]
    KeyGeneration(KeyType),
    /// rcgen could not build a certificate.
    #[error("cannot build the {what}")]
    Certificate {
        /// Which certificate, e.g. "certificate c-1".
        what: String,
        /// rcgen's reason.
        #[source]
        source: rcgen::Error,
    },
    /// A renewal was sealed and recorded as the certificate's new generation, but some of the exports it is
    /// associated with could not be rewritten: they still hold the previous generation (which their holders go
    /// on serving). Every other export was rewritten. Fix what failed and renew again.
    #[error(
        "certificate {certificate_id} renewed to generation {generation}, but {} export(s) still hold the previous \
         generation: {}; rewritten: {}",
        failed.len(),
        failed.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
        if rewritten.is_empty() { "none".to_owned() } else { rewritten.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ") }
    )]
    RenewalIncomplete {
        /// The certificate.
        certificate_id: String,
        /// Its new generation.
        generation: u64,
        /// The exports that were rewritten.
        rewritten: Vec<PathBuf>,
        /// The exports that were not, and why.
        failed: Vec<ExportFailure>,
    },
}

/// An export a renewal could not rewrite, and why.
#[derive(Debug)]
pub struct ExportFailure {
    /// The export directory.
    pub export: PathBuf,
    /// What failed there.
    pub error: Box<CustodyError>,
}

impl std::fmt::Display for ExportFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.export.display(), cause_chain(&*self.error))
    }
}

/// `error` and its sources, joined by `: `: the whole story on one line.
pub fn cause_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl CustodyError {
    pub(super) fn io(path: &Path, action: &'static str, source: std::io::Error) -> Self {
        Self::Io { path: path.to_owned(), action, source }
    }

    pub(super) fn state(path: &Path, reason: impl Into<String>) -> Self {
        Self::State { path: path.to_owned(), reason: reason.into() }
    }

    pub(super) fn invalid(reason: impl Into<String>) -> Self {
        Self::InvalidRequest(reason.into())
    }
}

impl From<getrandom::Error> for CustodyError {
    fn from(_: getrandom::Error) -> Self {
        Self::Random
    }
}

/// Result alias of the custody writer.
pub type Result<T, E = CustodyError> = std::result::Result<T, E>;
