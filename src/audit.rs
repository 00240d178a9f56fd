//! The audit log: an append-only, hash-chained record of what sealgate did with keys.
//!
//! Security teams must be able to show, after the fact, which keys sealgate held, when it dropped them and why.
//! The ordinary log is not that record: it is filtered, rotated and rewritten by whatever collects it. The audit
//! log is a file of its own, written only by sealgate, one JSON object per line (UTF-8, `\n`-terminated):
//!
//! ```text
//! {"seq":0,"time":"2026-05-01T09:00:00.000000Z","event":"started",...,"prev":"0000…0000"}
//! {"seq":1,"time":"2026-05-01T09:00:00.012345Z","event":"grant_seen",...,"prev":"<SHA-256 of line 1>"}
//! ```
//!
//! Every record carries, in this order, `seq` (0, 1, 2, … within the file), `time` (RFC 3339, UTC, microseconds),
//! `event` (a snake_case name, see [`AuditEvent`]), the event's own fields, and `prev`: the lowercase hex SHA-256
//! of the previous line's exact bytes without its `\n` (64 zeros for the first record). Editing, deleting,
//! inserting or reordering any line therefore breaks the chain at the next line at the latest, and [`verify`]
//! names that line.
//!
//! What a bare hash chain **cannot** show: that lines were cut off the end of the file (what remains is still a
//! valid chain), or that the whole tail, from some record on, was rewritten by someone who recomputed every hash
//! after it. The last record in particular is protected by nothing but the record after it. Shipping the log
//! off-host as it is written, or anchoring it now and then (recording the last record's seq and hash, from
//! [`head`] or `sealgate audit head`, somewhere the host cannot rewrite), closes that: [`verify_anchored`] and
//! `sealgate audit verify --anchor SEQ:HASH` check that the anchored record is still there, unchanged.
//!
//! Records are custody events (a grant seen or retired, a key loaded or wiped, a certificate swapped), never
//! per-request events, so each one is written with a single `write_all` on an `O_APPEND` file and made durable
//! with `sync_data` before [`AuditLog::record`] returns: durability wins over speed here. That also means that
//! `record` blocks on the disk; call it where blocking file I/O is already acceptable (the holder's reloads are).
//!
//! No event can carry key material: every field is an id, a name, a number, a time, a label, or the SHA-256 of
//! a *public* key ([`PublicKeyFingerprint`], whose only constructors hash a SubjectPublicKeyInfo). No field is a
//! byte buffer.
//!
//! Callers that must not fail because of the audit log hold an [`Audit`] handle: it is a no-op when no
//! `[audit]` is configured, and it reports a failed write through `tracing::error!` instead of returning it.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{FileExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rustls::sign::SigningKey;
use rustls_pki_types::SubjectPublicKeyInfoDer;
use serde::{Serialize, Serializer};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use crate::config::{sha256, AuditConfig};
use crate::custody::snapshot::{Check, Refusal};
use crate::keyring::{CertificateIdentity, EndedGrant, GrantEnd};

mod cli;
#[cfg(test)]
mod tests;
mod verify;

pub use cli::{head_command, verify_command};
pub use verify::{head, verify, verify_anchored, verify_files, Anchor, LineProblem, VerifyReport};

/// `prev` of the first record of a file: 64 zeros.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The longest line sealgate writes or accepts, without its `\n`. Generous (a grant that ends with thousands of
/// certificates makes one long `grant_retired` line) but bounded, so that no file can make a reader allocate
/// without limit.
pub const MAX_LINE_BYTES: usize = 16 << 20;

/// Mode of a newly created log: only sealgate's user reads or writes it.
const CREATE_MODE: u32 = 0o600;

/// An audit log error. Every one names the file.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The operating system refused an operation on the file.
    #[error("{}: cannot {action}: {source}", path.display())]
    Io {
        /// The log file.
        path: PathBuf,
        /// What was being done, e.g. "open" or "write a record".
        action: &'static str,
        /// What the operating system said.
        source: io::Error,
    },
    /// The path exists but is not a regular file.
    #[error("{}: is not a regular file", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// An existing log is world-writable: anyone on the host could have rewritten it, so sealgate will not
    /// vouch for what it appends to it.
    #[error(
        "{}: is world-writable (mode {mode:04o}), so anyone on this host could rewrite it; \
         remove the write bit for others (chmod o-w) and check the log with `sealgate audit verify`",
        path.display()
    )]
    WorldWritable {
        /// The log file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A line of the log is not a valid link of the chain.
    #[error("{}:{line}: {}{problem}", path.display(), seq.map(|s| format!("seq {s}: ")).unwrap_or_default())]
    Broken {
        /// The log file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// The line's `seq`, when it could be read.
        seq: Option<u64>,
        /// What is wrong.
        problem: LineProblem,
    },
    /// An anchor names a record past the end of the log: records were cut off its end.
    #[error(
        "{}: an anchor names seq {anchored} but the log ends {}: records were removed from its end",
        path.display(),
        last_seq.map(|s| format!("at seq {s}")).unwrap_or_else(|| "before its first record".to_owned())
    )]
    Truncated {
        /// The log file.
        path: PathBuf,
        /// The anchored seq.
        anchored: u64,
        /// The last seq in the file.
        last_seq: Option<u64>,
    },
    /// The log has no record (`head` has nothing to anchor).
    #[error("{}: the log is empty", path.display())]
    Empty {
        /// The log file.
        path: PathBuf,
    },
    /// A record could not be written; the log is unchanged.
    #[error("{}: cannot write a {event} record: {reason}", path.display())]
    Unwritable {
        /// The log file.
        path: PathBuf,
        /// The event's name.
        event: &'static str,
        /// Why.
        reason: String,
    },
    /// An anchor names a record before the first of the files given (which continue an older file).
    #[error(
        "{}: an anchor names seq {anchored} but the files given begin at seq {first_seq}: give the older files \
         that hold it too, oldest first",
        path.display()
    )]
    AnchorBeforeStart {
        /// The first file given.
        path: PathBuf,
        /// The anchored seq.
        anchored: u64,
        /// The first seq in the files given.
        first_seq: u64,
    },
    /// At a reopen, the log's path holds a file with content sealgate did not write: records keep going to the
    /// file sealgate has open.
    #[error(
        "{}: not reopened: the path holds another file of {len} bytes (a rotation leaves it absent or empty); \
         records still go to the file sealgate had open",
        path.display()
    )]
    ReopenOccupied {
        /// The log's path.
        path: PathBuf,
        /// The size of the file found there.
        len: u64,
    },
    /// An earlier write failed and its partial line could not be removed; nothing more is appended until the
    /// operator has looked at the file (`sealgate audit verify` names the line) and sealgate is restarted.
    #[error(
        "{}: an earlier write failed and could not be undone; no record is written until the log is checked \
         with `sealgate audit verify` and sealgate restarted",
        path.display()
    )]
    Stuck {
        /// The log file.
        path: PathBuf,
    },
}

/// Result alias of this module.
pub type Result<T, E = AuditError> = std::result::Result<T, E>;

impl AuditError {
    fn io<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> Self + 'a {
        move |source| Self::Io { path: path.to_owned(), action, source }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Events.

/// Something sealgate did with a certificate, a key or a grant. Serialised as `"event": "<snake_case name>"`
/// followed by the fields in declaration order. Optional fields are written as `null` when unknown, so that
/// every record of one event has the same keys.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditEvent<'a> {
    /// sealgate started holding keys for `grantee` from `export`.
    Started {
        /// sealgate's version.
        version: &'a str,
        /// The export directory.
        #[serde(serialize_with = "path_lossy")]
        export: &'a Path,
        /// The principal sealgate holds grants as.
        grantee: &'a str,
    },
    /// A grant naming this holder was seen for the first time.
    GrantSeen {
        /// The grant.
        grant_id: &'a str,
        /// Its grantee.
        grantee: &'a str,
        /// When it lapses, if it does.
        #[serde(serialize_with = "option_rfc3339")]
        not_after: Option<OffsetDateTime>,
    },
    /// A generation of an association is served.
    AssociationServed {
        /// The certificate.
        certificate_id: &'a str,
        /// The grant its key was decrypted under.
        grant_id: &'a str,
        /// The generation, unique for the life of the process.
        generation: u64,
        /// The names it is served for.
        server_names: &'a [String],
        /// The certificate's `not_after`.
        #[serde(serialize_with = "rfc3339")]
        not_after: OffsetDateTime,
    },
    /// An association is not served.
    AssociationRefused {
        /// The certificate.
        certificate_id: &'a str,
        /// Its grant.
        grant_id: &'a str,
        /// The check that refused it: "files", "check 1" … "check 5".
        #[serde(serialize_with = "check_label")]
        check: Check,
        /// The fixed phrase of the refusal.
        reason: &'a str,
        /// The file or name at fault and the rule it breaks (never key material).
        detail: &'a str,
    },
    /// A new state of a served association was refused; the last good generation stays served.
    AssociationKept {
        /// The certificate.
        certificate_id: &'a str,
        /// Its grant.
        grant_id: &'a str,
        /// The generation still served.
        generation: u64,
        /// The check that refused the new state.
        #[serde(serialize_with = "check_label")]
        check: Check,
        /// The fixed phrase of the refusal.
        reason: &'a str,
        /// The file or name at fault and the rule it breaks.
        detail: &'a str,
    },
    /// A private key was decrypted and loaded for signing.
    KeyLoaded {
        /// The certificate.
        certificate_id: &'a str,
        /// The grant it was decrypted under.
        grant_id: &'a str,
        /// The generation it belongs to.
        generation: u64,
        /// SHA-256 of the key's public half (SubjectPublicKeyInfo DER).
        public_key_sha256: PublicKeyFingerprint,
    },
    /// sealgate dropped a private key: the memory is wiped when the last user of it (an in-flight handshake at
    /// most) lets go.
    KeyZeroized {
        /// The certificate.
        certificate_id: &'a str,
        /// The grant it was decrypted under.
        grant_id: &'a str,
        /// The generation it belonged to.
        generation: u64,
    },
    /// A newer generation of a certificate replaced an older one (a renewal, or changed server names).
    CertificateSwapped {
        /// The certificate.
        certificate_id: &'a str,
        /// The generation no longer served.
        from_generation: u64,
        /// The generation served now.
        to_generation: u64,
    },
    /// A certificate is no longer served because its association was removed (its grant still holds).
    CertificateRemoved {
        /// The certificate.
        certificate_id: &'a str,
        /// The generation that was served.
        generation: u64,
    },
    /// A held grant ended: its keys were dropped and its certificates are no longer served.
    GrantRetired {
        /// The grant.
        grant_id: &'a str,
        /// "gone", "retired", "lapsed" or "revoked".
        #[serde(serialize_with = "grant_end_label")]
        reason: GrantEnd,
        /// The certificates that stopped with it.
        certificates: Vec<&'a str>,
        /// Microseconds from the change of the file to the keys being dropped, when measured.
        latency_us: Option<u64>,
    },
    /// Connections made with a retired grant's certificates were closed.
    ConnectionsClosed {
        /// The grant.
        grant_id: &'a str,
        /// How many.
        count: u64,
    },
    /// sealgate stopped; it holds no key any more.
    Stopped,
    /// The first record of a log file that continues the chain of another: the log was reopened (after a
    /// rotation) and this file takes the chain up where the previous one ended, its `seq` and `prev` following
    /// that file's last record.
    LogContinued {
        /// `reopened`: the path held a new file (the old one was moved aside); `truncated`: the file had been
        /// cut (rotated by copying and truncating), so its earlier records are wherever the copy went.
        reason: &'static str,
    },
}

impl<'a> AuditEvent<'a> {
    /// `started`, with this build's version.
    pub fn started(export: &'a Path, grantee: &'a str) -> Self {
        Self::Started { version: env!("CARGO_PKG_VERSION"), export, grantee }
    }

    /// `association_served` for a generation just loaded.
    pub fn served(certificate: &'a CertificateIdentity) -> Self {
        Self::AssociationServed {
            certificate_id: &certificate.certificate_id,
            grant_id: &certificate.grant_id,
            generation: certificate.generation,
            server_names: &certificate.server_names,
            not_after: certificate.not_after,
        }
    }

    /// `association_refused`.
    pub fn refused(certificate_id: &'a str, grant_id: &'a str, refusal: &'a Refusal) -> Self {
        Self::AssociationRefused {
            certificate_id,
            grant_id,
            check: refusal.check,
            reason: refusal.reason,
            detail: &refusal.detail,
        }
    }

    /// `association_kept`: `refusal` refused the new state, `certificate` stays served.
    pub fn kept(certificate: &'a CertificateIdentity, refusal: &'a Refusal) -> Self {
        Self::AssociationKept {
            certificate_id: &certificate.certificate_id,
            grant_id: &certificate.grant_id,
            generation: certificate.generation,
            check: refusal.check,
            reason: refusal.reason,
            detail: &refusal.detail,
        }
    }

    /// `key_loaded`.
    pub fn key_loaded(certificate: &'a CertificateIdentity, public_key_sha256: PublicKeyFingerprint) -> Self {
        Self::KeyLoaded {
            certificate_id: &certificate.certificate_id,
            grant_id: &certificate.grant_id,
            generation: certificate.generation,
            public_key_sha256,
        }
    }

    /// `key_zeroized`.
    pub fn key_zeroized(certificate: &'a CertificateIdentity) -> Self {
        Self::KeyZeroized {
            certificate_id: &certificate.certificate_id,
            grant_id: &certificate.grant_id,
            generation: certificate.generation,
        }
    }

    /// `certificate_swapped` from `old` to `new` (same certificate id).
    pub fn swapped(old: &CertificateIdentity, new: &'a CertificateIdentity) -> Self {
        Self::CertificateSwapped {
            certificate_id: &new.certificate_id,
            from_generation: old.generation,
            to_generation: new.generation,
        }
    }

    /// `certificate_removed`.
    pub fn removed(certificate: &'a CertificateIdentity) -> Self {
        Self::CertificateRemoved { certificate_id: &certificate.certificate_id, generation: certificate.generation }
    }

    /// `grant_retired` for a grant the keyring ended; `latency` from the file's change to the keys being dropped.
    pub fn grant_retired(ended: &'a EndedGrant, latency: Option<Duration>) -> Self {
        Self::GrantRetired {
            grant_id: &ended.grant_id,
            reason: ended.reason,
            certificates: ended.certificates.iter().map(|c| c.certificate_id.as_str()).collect(),
            latency_us: latency.map(|l| u64::try_from(l.as_micros()).unwrap_or(u64::MAX)),
        }
    }

    /// The event's name as written in `"event"`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Started { .. } => "started",
            Self::GrantSeen { .. } => "grant_seen",
            Self::AssociationServed { .. } => "association_served",
            Self::AssociationRefused { .. } => "association_refused",
            Self::AssociationKept { .. } => "association_kept",
            Self::KeyLoaded { .. } => "key_loaded",
            Self::KeyZeroized { .. } => "key_zeroized",
            Self::CertificateSwapped { .. } => "certificate_swapped",
            Self::CertificateRemoved { .. } => "certificate_removed",
            Self::GrantRetired { .. } => "grant_retired",
            Self::ConnectionsClosed { .. } => "connections_closed",
            Self::Stopped => "stopped",
            Self::LogContinued { .. } => verify::CONTINUED_EVENT,
        }
    }
}

/// SHA-256 of a public key's SubjectPublicKeyInfo (DER), written as lowercase hex. It identifies a key pair
/// without revealing anything secret, and matches `openssl x509 -pubkey -noout | openssl pkey -pubin -outform
/// der | sha256sum`. It can only be made from a public key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKeyFingerprint([u8; 32]);

impl PublicKeyFingerprint {
    /// The fingerprint of a SubjectPublicKeyInfo.
    pub fn of_spki(spki: &SubjectPublicKeyInfoDer<'_>) -> Self {
        Self(sha256(spki.as_ref()))
    }

    /// The fingerprint of a signing key's public half, when the key can tell it (aws-lc-rs keys can).
    pub fn of_signing_key(key: &dyn SigningKey) -> Option<Self> {
        key.public_key().map(|spki| Self::of_spki(&spki))
    }
}

impl fmt::Display for PublicKeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for PublicKeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKeyFingerprint({self})")
    }
}

impl Serialize for PublicKeyFingerprint {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

fn path_lossy<S: Serializer>(path: &&Path, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&path.to_string_lossy())
}

fn rfc3339<S: Serializer>(time: &OffsetDateTime, serializer: S) -> Result<S::Ok, S::Error> {
    let text = time.to_offset(UtcOffset::UTC).format(&Rfc3339).map_err(serde::ser::Error::custom)?;
    serializer.serialize_str(&text)
}

fn option_rfc3339<S: Serializer>(time: &Option<OffsetDateTime>, serializer: S) -> Result<S::Ok, S::Error> {
    match time {
        Some(time) => rfc3339(time, serializer),
        None => serializer.serialize_none(),
    }
}

fn check_label<S: Serializer>(check: &Check, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(check.label())
}

/// Stable labels for a grant's end (the keyring's `Display` is prose for people).
fn grant_end_label<S: Serializer>(reason: &GrantEnd, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(match reason {
        GrantEnd::Gone => "gone",
        GrantEnd::Retired => "retired",
        GrantEnd::Lapsed => "lapsed",
        GrantEnd::Revoked => "revoked",
    })
}

// ---------------------------------------------------------------------------------------------------------------
// Lines and hashes.

/// One record as written: the chain's fields around the event's, in the file's order.
#[derive(Serialize)]
struct Line<'a> {
    seq: u64,
    time: &'a str,
    #[serde(flatten)]
    event: &'a AuditEvent<'a>,
    prev: &'a str,
}

/// Serialises one record, without its `\n`. serde_json escapes every control character, so the line holds no
/// `\n` of its own.
fn encode_line(seq: u64, time: &str, event: &AuditEvent<'_>, prev: &str) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&Line { seq, time, event, prev })
}

/// `time` of a record: RFC 3339 in UTC with exactly six fractional digits, e.g. `2026-05-01T09:00:00.012345Z`.
fn timestamp(now: OffsetDateTime) -> String {
    let t = now.to_offset(UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// The link to a line: lowercase hex SHA-256 of its bytes without the `\n`.
fn line_hash(line: &[u8]) -> String {
    hex(&sha256(line))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

// ---------------------------------------------------------------------------------------------------------------
// The writer.

/// The audit log, open for appending. Share it as `Arc<AuditLog>` (or through [`Audit`]); [`AuditLog::record`]
/// takes `&self` and serialises writers.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    state: Mutex<Tail>,
}

/// What the next record links to, and the file it goes into.
#[derive(Debug)]
struct Tail {
    file: File,
    /// `seq` of the next record.
    next_seq: u64,
    /// `prev` of the next record.
    prev: String,
    /// Length of the file up to the end of the last whole record: a failed write is cut back to it.
    len: u64,
    /// A failed write left bytes that could not be removed: appending more would bury them.
    stuck: bool,
}

impl AuditLog {
    /// Opens the log at `path`: creates it (mode 0600) when absent, else continues the chain from its last
    /// line. An existing file is refused when it is world-writable, or when its last line is not a complete,
    /// valid record (the error names the line; `sealgate audit verify` tells more): the operator must look
    /// before sealgate appends to it.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let tail = match create(&path) {
            Ok(file) => Tail { file, next_seq: 0, prev: GENESIS_PREV.to_owned(), len: 0, stuck: false },
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue_existing(&path)?,
            Err(e) => return Err(AuditError::io(&path, "create the audit log")(e)),
        };
        Ok(Self { path, state: Mutex::new(tail) })
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `seq` the next record will have.
    pub fn next_seq(&self) -> u64 {
        self.tail().next_seq
    }

    /// Appends one record and makes it durable. On error the record is not in the log (or, for a failed
    /// `sync_data`, may not survive a crash) and the chain is left intact for the next one.
    pub fn record(&self, event: AuditEvent<'_>) -> Result<()> {
        let mut tail = self.tail();
        if tail.stuck {
            return Err(AuditError::Stuck { path: self.path.clone() });
        }
        self.continue_if_truncated(&mut tail)?;
        self.append(&mut tail, event)
    }

    /// When the file was cut short under sealgate (a rotation by `copytruncate`), begins what is left of it
    /// with a `log_continued` record, so that it verifies on its own. Returns whether it was cut.
    fn continue_if_truncated(&self, tail: &mut Tail) -> Result<bool> {
        let len = tail.file.metadata().map_err(AuditError::io(&self.path, "read the metadata of"))?.len();
        if len >= tail.len {
            return Ok(false);
        }
        tail.len = len;
        self.append(tail, AuditEvent::LogContinued { reason: "truncated" })?;
        Ok(true)
    }

    /// Follows a rotation of the log: when the path no longer holds the file sealgate writes (it was moved
    /// aside, and the path is now absent or holds an empty file, as `logrotate`'s `create` leaves it), or when
    /// that file was cut short (`copytruncate`), the chain goes on at the path with a `log_continued` record,
    /// whose `seq` and `prev` follow the last record written. The files, oldest first, are then one chain
    /// (`sealgate audit verify OLD NEW`), and the new one also verifies alone. When the path holds the file
    /// sealgate writes, unchanged, nothing happens. On error nothing changes and records keep going to the
    /// file sealgate has open.
    pub fn reopen(&self) -> Result<Reopened> {
        let mut tail = self.tail();
        let ours = tail.file.metadata().map_err(AuditError::io(&self.path, "read the metadata of"))?;
        let (file, reason) = match std::fs::metadata(&self.path) {
            Ok(found) if (found.dev(), found.ino()) == (ours.dev(), ours.ino()) => {
                let seq = tail.next_seq;
                return match self.continue_if_truncated(&mut tail)? {
                    true => Ok(Reopened::Continued { seq, reason: "truncated" }),
                    false => Ok(Reopened::Unchanged),
                };
            }
            Ok(_) => (open_empty(&self.path)?, "reopened"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match create(&self.path) {
                Ok(file) => (file, "reopened"),
                // Made between the look and the creation: the rotation's own empty file.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => (open_empty(&self.path)?, "reopened"),
                Err(e) => return Err(AuditError::io(&self.path, "create the audit log")(e)),
            },
            Err(e) => return Err(AuditError::io(&self.path, "read the metadata of")(e)),
        };
        let len = file.metadata().map_err(AuditError::io(&self.path, "read the metadata of"))?.len();
        let mut fresh = Tail { file, next_seq: tail.next_seq, prev: tail.prev.clone(), len, stuck: false };
        self.append(&mut fresh, AuditEvent::LogContinued { reason })?;
        let seq = tail.next_seq;
        *tail = fresh;
        Ok(Reopened::Continued { seq, reason })
    }

    /// Writes one record at the end of `tail`'s file and makes it durable.
    fn append(&self, tail: &mut Tail, event: AuditEvent<'_>) -> Result<()> {
        let unwritable =
            |reason: String| AuditError::Unwritable { path: self.path.clone(), event: event.name(), reason };
        let next_seq = tail.next_seq.checked_add(1).ok_or_else(|| unwritable("seq is at its maximum".to_owned()))?;
        let mut line = encode_line(tail.next_seq, &timestamp(OffsetDateTime::now_utc()), &event, &tail.prev)
            .map_err(|e| unwritable(e.to_string()))?;
        if line.len() > MAX_LINE_BYTES {
            return Err(unwritable(format!("the record is longer than {MAX_LINE_BYTES} bytes")));
        }
        let hash = line_hash(&line);
        line.push(b'\n');
        if let Err(e) = tail.file.write_all(&line) {
            // Cut off whatever part of the line reached the file, so that the next record links to a whole line.
            let len = tail.len;
            tail.stuck = tail.file.set_len(len).is_err();
            return Err(AuditError::io(&self.path, "write a record")(e));
        }
        tail.prev = hash;
        tail.next_seq = next_seq;
        tail.len = tail.len.saturating_add(u64::try_from(line.len()).unwrap_or(u64::MAX));
        tail.file.sync_data().map_err(AuditError::io(&self.path, "flush a record to disk"))
    }

    fn tail(&self) -> MutexGuard<'_, Tail> {
        // Nothing in `record` panics between a write and the update of the tail, so a poisoned lock still guards
        // a consistent tail.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What [`AuditLog::reopen`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reopened {
    /// The path holds the file being written, as written: nothing to do.
    Unchanged,
    /// The chain goes on in the file now at the path, from the `log_continued` record with this seq.
    Continued {
        /// The seq of the `log_continued` record.
        seq: u64,
        /// Its reason: `reopened` or `truncated`.
        reason: &'static str,
    },
}

/// Opens the file a rotation left at the log's path to continue the chain in it: it must be an empty regular
/// file that not everyone may write.
fn open_empty(path: &Path) -> Result<File> {
    let (file, metadata) = open_to_append(path)?;
    if metadata.len() != 0 {
        return Err(AuditError::ReopenOccupied { path: path.to_owned(), len: metadata.len() });
    }
    Ok(file)
}

/// Creates a new log, failing with `AlreadyExists` when there is one, and makes its directory entry durable.
fn create(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new().read(true).append(true).create_new(true).mode(CREATE_MODE).open(path)?;
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()?;
    Ok(file)
}

/// Opens an existing file to append records to: it must be a regular file that not everyone may write.
fn open_to_append(path: &Path) -> Result<(File, std::fs::Metadata)> {
    let file = OpenOptions::new().read(true).append(true).open(path).map_err(AuditError::io(path, "open"))?;
    let metadata = file.metadata().map_err(AuditError::io(path, "read the metadata of"))?;
    if !metadata.is_file() {
        return Err(AuditError::NotAFile { path: path.to_owned() });
    }
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o002 != 0 {
        return Err(AuditError::WorldWritable { path: path.to_owned(), mode });
    }
    Ok((file, metadata))
}

/// Opens an existing log and recovers the chain from its last line.
fn continue_existing(path: &Path) -> Result<Tail> {
    let (file, metadata) = open_to_append(path)?;
    let len = metadata.len();
    let Some(start) = last_line_start(&file, len).map_err(AuditError::io(path, "read"))? else {
        return Ok(Tail { file, next_seq: 0, prev: GENESIS_PREV.to_owned(), len: 0, stuck: false });
    };
    let broken = |seq, problem| -> Result<Tail> {
        let line = count_newlines(&file, start).map_err(AuditError::io(path, "read"))? + 1;
        Err(AuditError::Broken { path: path.to_owned(), line, seq, problem })
    };
    let Some(line) = read_last_line(&file, start, len).map_err(AuditError::io(path, "read"))? else {
        return broken(None, LineProblem::TooLong);
    };
    let Some((&b'\n', bytes)) = line.split_last() else {
        return broken(verify::parse_line(&line).ok().map(|h| h.seq), LineProblem::Unterminated);
    };
    let head = match verify::parse_line(bytes) {
        Ok(head) => head,
        Err(problem) => return broken(None, problem),
    };
    let Some(next_seq) = head.seq.checked_add(1) else {
        return broken(Some(head.seq), LineProblem::SeqOverflow);
    };
    Ok(Tail { file, next_seq, prev: line_hash(bytes), len, stuck: false })
}

/// Offset of the first byte of the last line of a file of `len` bytes (the bytes after the last `\n` that is
/// not the file's final byte), or `None` for an empty file. Reads backwards, so reopening a long log is cheap.
fn last_line_start(file: &File, len: u64) -> io::Result<Option<u64>> {
    const CHUNK: u64 = 8 << 10;
    if len == 0 {
        return Ok(None);
    }
    // The file's final byte is the last line's terminator (or, in a torn file, part of it): skip it.
    let mut end = len - 1;
    let mut buf = vec![0; CHUNK as usize];
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let chunk = &mut buf[..usize::try_from(end - start).unwrap_or(0)];
        file.read_exact_at(chunk, start)?;
        if let Some(at) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(Some(start + at as u64 + 1));
        }
        if len - start > MAX_LINE_BYTES as u64 + 1 {
            // No need to look further: the line is too long whatever its start.
            return Ok(Some(start));
        }
        end = start;
    }
    Ok(Some(0))
}

/// The bytes of the last line, from `start` to the end of the file, or `None` when it is longer than any valid
/// record.
fn read_last_line(file: &File, start: u64, len: u64) -> io::Result<Option<Vec<u8>>> {
    let size = len - start;
    if size > MAX_LINE_BYTES as u64 + 1 {
        return Ok(None);
    }
    let mut line = vec![0; usize::try_from(size).unwrap_or(0)];
    file.read_exact_at(&mut line, start)?;
    Ok(Some(line))
}

/// Number of `\n` in the first `end` bytes: the line number of an error, counted only when there is one.
fn count_newlines(file: &File, end: u64) -> io::Result<u64> {
    let mut buf = vec![0; 64 << 10];
    let (mut at, mut count) = (0, 0);
    while at < end {
        let n = file.read_at(&mut buf[..usize::try_from((end - at).min(64 << 10)).unwrap_or(0)], at)?;
        if n == 0 {
            break;
        }
        count += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        at += n as u64;
    }
    Ok(count)
}

// ---------------------------------------------------------------------------------------------------------------
// The handle callers hold.

/// What the holder and the server hold: the audit log when one is configured, nothing otherwise. Cloning is
/// cheap. [`Audit::record`] never fails: a record that cannot be written is reported with `tracing::error!`
/// (the file and the reason, never the event's content), because losing an audit record must not stop sealgate
/// from dropping a key. Callers that must stop when the log fails use [`Audit::log`] and
/// [`AuditLog::record`].
#[derive(Debug, Clone, Default)]
pub struct Audit {
    log: Option<Arc<AuditLog>>,
}

impl Audit {
    /// A handle that records nothing.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Opens the configured log, if any.
    pub fn open(config: Option<&AuditConfig>) -> Result<Self> {
        Ok(Self { log: config.map(|c| AuditLog::open(&c.path)).transpose()?.map(Arc::new) })
    }

    /// Whether records go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.log.is_some()
    }

    /// The log, when there is one.
    pub fn log(&self) -> Option<&Arc<AuditLog>> {
        self.log.as_ref()
    }

    /// Follows a rotation of the log (see [`AuditLog::reopen`]), logging what happened. Blocks on the disk.
    pub fn reopen(&self) {
        let Some(log) = &self.log else { return };
        match log.reopen() {
            Ok(Reopened::Unchanged) => {}
            Ok(Reopened::Continued { seq, reason }) => {
                tracing::info!(path = %log.path().display(), seq, reason, "audit log reopened; the chain goes on in it");
            }
            Err(error) => tracing::error!(%error, "audit log not reopened"),
        }
    }

    /// Records `event`, or logs why it could not.
    pub fn record(&self, event: AuditEvent<'_>) {
        if let Some(log) = &self.log {
            let name = event.name();
            if let Err(error) = log.record(event) {
                tracing::error!(%error, event = name, "audit record lost");
            }
        }
    }
}

impl From<Arc<AuditLog>> for Audit {
    fn from(log: Arc<AuditLog>) -> Self {
        Self { log: Some(log) }
    }
}

impl From<Option<Arc<AuditLog>>> for Audit {
    fn from(log: Option<Arc<AuditLog>>) -> Self {
        Self { log }
    }
}

impl From<AuditLog> for Audit {
    fn from(log: AuditLog) -> Self {
        Self { log: Some(Arc::new(log)) }
    }
}
