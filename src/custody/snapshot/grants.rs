//! `grants/`: every grant file read and parsed once per snapshot, their statuses, and check 1.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{reason, Check, ExportError, GrantStatus, Refusal};
use crate::custody::format::{is_valid_id, layout, Grant, GrantState, DECRYPT_OPERATION};
use crate::secret::{SecretBytes, SecretKey32};

/// The grant files of one read, by grant id.
pub(super) struct Grants {
    dir: PathBuf,
    by_id: HashMap<String, GrantFile>,
}

/// One grant file as read: parsed (holding its grant key, wiped on drop), or not parseable.
enum GrantFile {
    Parsed(Grant),
    /// The file's path and the parse or read error; never the file's contents.
    Unreadable(String),
}

/// A grant that passed check 1, with the key that unwraps the data keys sealed for it.
pub(super) struct Authorized<'a> {
    pub(super) grant: &'a Grant,
    pub(super) grant_key: &'a SecretKey32,
}

impl Grants {
    /// Lists `dir` and reads every `<grant_id>.toml` in it, following symbolic links.
    ///
    /// Names beginning with `.` (Kubernetes' `..data` and its timestamped directories), names without the
    /// `.toml` extension, and stems that are not valid ids are not grant files and are skipped. A missing `dir`
    /// holds no grants. A directory that exists but cannot be listed fails the whole read: judging without it
    /// would take every grant for gone and end all service over what may be a passing error.
    pub(super) fn read(dir: &Path) -> Result<Self, ExportError> {
        let mut grants = Self { dir: dir.to_owned(), by_id: HashMap::new() };
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(grants),
            Err(source) => return Err(ExportError::Io { path: dir.to_owned(), source }),
        };
        for entry in entries {
            let entry = entry.map_err(|source| ExportError::Io { path: dir.to_owned(), source })?;
            let file_name = entry.file_name();
            let Some(id) = grant_id_of(&file_name) else { continue };
            if let Some(file) = read_grant(&grants.path_of(id), id) {
                grants.by_id.insert(id.to_owned(), file);
            }
        }
        Ok(grants)
    }

    /// `grants/<grant_id>.toml`. `grant_id` must be a valid id.
    fn path_of(&self, grant_id: &str) -> PathBuf {
        self.dir.join(format!("{grant_id}.{}", layout::GRANT_EXTENSION))
    }

    /// Every grant file's status at `now`, for [`super::Snapshot::grants`].
    pub(super) fn statuses(&self, now: OffsetDateTime) -> BTreeMap<String, GrantStatus> {
        self.by_id.iter().map(|(id, file)| (id.clone(), status(file, now))).collect()
    }

    /// Check 1, in FORMAT.md's order: the grant exists (and parses), is not retired, has not lapsed at `now`,
    /// names `grantee`, allows `Decrypt`, and carries its grant key. `grant_id` must be a valid id.
    pub(super) fn authorize(
        &self,
        grant_id: &str,
        grantee: &str,
        now: OffsetDateTime,
    ) -> Result<Authorized<'_>, Refusal> {
        let path = self.path_of(grant_id);
        let refuse = |reason, detail: String| Refusal::new(Check::Grant, reason, detail);
        let grant = match self.by_id.get(grant_id) {
            None => return Err(refuse(reason::GRANT_MISSING, format!("{} does not exist", path.display()))),
            Some(GrantFile::Unreadable(message)) => return Err(refuse(reason::GRANT_UNREADABLE, message.clone())),
            Some(GrantFile::Parsed(grant)) => grant,
        };
        if grant.state == GrantState::Retired {
            return Err(refuse(reason::GRANT_RETIRED, format!("{}: `state` is \"retired\"", path.display())));
        }
        if let Some(not_after) = grant.not_after.filter(|t| *t <= now) {
            let detail = format!("{}: `not_after` {} has passed", path.display(), rfc3339(not_after));
            return Err(refuse(reason::GRANT_LAPSED, detail));
        }
        if grant.grantee != grantee {
            let detail = format!("{}: `grantee` is {:?}, this holder is {grantee:?}", path.display(), grant.grantee);
            return Err(refuse(reason::OTHER_GRANTEE, detail));
        }
        if !grant.operations.iter().any(|op| op == DECRYPT_OPERATION) {
            let detail = format!("{}: `operations` does not include \"{DECRYPT_OPERATION}\"", path.display());
            return Err(refuse(reason::NO_DECRYPT, detail));
        }
        let Some(grant_key) = &grant.grant_key else {
            let detail = format!("{}: an active grant must carry `grant_key`", path.display());
            return Err(refuse(reason::NO_GRANT_KEY, detail));
        };
        Ok(Authorized { grant, grant_key })
    }
}

/// The grant id a directory entry stands for, or `None` when the entry is not a grant file.
fn grant_id_of(file_name: &OsStr) -> Option<&str> {
    let name = file_name.to_str()?;
    if name.starts_with('.') {
        return None;
    }
    let id = name.strip_suffix(layout::GRANT_EXTENSION)?.strip_suffix('.')?;
    is_valid_id(id).then_some(id)
}

/// Reads and parses one grant file. `None` when it vanished between listing and reading (or is a dangling link):
/// a grant whose file is gone is retired, which absence from the table says.
fn read_grant(path: &Path, grant_id: &str) -> Option<GrantFile> {
    // The file holds the grant key in base64: keep its bytes in a buffer that is wiped on drop.
    let bytes = match std::fs::read(path) {
        Ok(bytes) => SecretBytes::new(bytes),
        Err(e) if e.kind() == ErrorKind::NotFound => return None,
        Err(e) => return Some(GrantFile::Unreadable(format!("{}: {e}", path.display()))),
    };
    Some(match Grant::parse(bytes.expose(), grant_id) {
        Ok(grant) => GrantFile::Parsed(grant),
        Err(e) => GrantFile::Unreadable(format!("{}: {e}", path.display())),
    })
}

/// What a grant file says at `now`.
fn status(file: &GrantFile, now: OffsetDateTime) -> GrantStatus {
    match file {
        GrantFile::Unreadable(message) => GrantStatus::Unreadable(message.clone()),
        GrantFile::Parsed(grant) if grant.state == GrantState::Retired => GrantStatus::Retired,
        GrantFile::Parsed(grant) if grant.not_after.is_some_and(|t| t <= now) => GrantStatus::Lapsed,
        GrantFile::Parsed(grant) => GrantStatus::Active { grantee: grant.grantee.clone(), not_after: grant.not_after },
    }
}

/// An instant as RFC 3339 in UTC, for messages.
fn rfc3339(instant: OffsetDateTime) -> String {
    instant.to_offset(time::UtcOffset::UTC).format(&Rfc3339).unwrap_or_else(|_| instant.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_visible_toml_files_with_valid_stems_are_grants() {
        assert_eq!(grant_id_of(OsStr::new("g-1.toml")), Some("g-1"));
        assert_eq!(grant_id_of(OsStr::new("..data")), None);
        assert_eq!(grant_id_of(OsStr::new(".g-1.toml")), None);
        assert_eq!(grant_id_of(OsStr::new("g-1.toml.tmp")), None);
        assert_eq!(grant_id_of(OsStr::new("g-1toml")), None);
        assert_eq!(grant_id_of(OsStr::new(".toml")), None);
        assert_eq!(grant_id_of(OsStr::new("g 1.toml")), None);
    }
}
