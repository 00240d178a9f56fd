//! `grants/`: the grant files, their statuses, check 1, and the grant key when a data key must be unwrapped.
//!
//! The cache keeps what a grant file says *except* its key: [`GrantFacts`] are the non-secret fields, beside the
//! file's SHA-256. Check 1 and the statuses are judged from them on every read. The grant key is read only when
//! an association's data key must be unwrapped, from the file itself, and only if the file still has the bytes
//! the facts were taken from; it is wiped as soon as that one association has been verified.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::cache::{self, Environment, FileCache, RefreshCounts, Suspects};
use super::{reason, Check, ExportError, GrantStatus, Refusal};
use crate::custody::format::{is_valid_id, layout, Grant, GrantState, DECRYPT_OPERATION};
use crate::secret::{SecretBytes, SecretKey32};

/// The non-secret fields of a parsed grant file: everything check 1 and the statuses need, and no key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct GrantFacts {
    pub(super) grant_id: String,
    pub(super) key_id: String,
    pub(super) grantee: String,
    pub(super) operations: Vec<String>,
    pub(super) state: GrantState,
    /// Whether the file carries a `grant_key` (the key itself is not kept).
    pub(super) has_grant_key: bool,
    pub(super) not_after: Option<OffsetDateTime>,
}

impl GrantFacts {
    /// Keeps the non-secret fields of `grant`; its key is dropped, and wiped, here.
    fn from_grant(grant: Grant) -> Self {
        Self {
            has_grant_key: grant.grant_key.is_some(),
            grant_id: grant.grant_id,
            key_id: grant.key_id,
            grantee: grant.grantee,
            operations: grant.operations,
            state: grant.state,
            not_after: grant.not_after,
        }
    }
}

/// A cached grant file: its facts, or why it does not parse (the path and the rule, never its contents).
type ParsedGrant = Result<GrantFacts, String>;

/// The grant files of an export, cached across reads.
#[derive(Default)]
pub(super) struct GrantFiles {
    cache: FileCache<ParsedGrant>,
}

/// The grant files one read listed: by id, the path, and the I/O error when the file could not be read.
pub(super) struct Listing {
    dir: PathBuf,
    ids: foldhash::HashMap<String, PathBuf>,
    unreadable: HashMap<String, String>,
}

impl Listing {
    /// Records what refreshing the grant file `id` at `path` found: listed (and unreadable, with the error),
    /// or not listed when it is missing.
    fn note(&mut self, id: String, path: PathBuf, problem: Option<&std::io::Error>) {
        match problem {
            Some(error) if cache::is_missing(error) => {
                self.unreadable.remove(&id);
                self.ids.remove(&id);
            }
            Some(error) => {
                self.unreadable.insert(id.clone(), format!("{}: {error}", path.display()));
                self.ids.insert(id, path);
            }
            None => {
                self.unreadable.remove(&id);
                self.ids.insert(id, path);
            }
        }
    }

    /// The ids of the listed files that could not be read: they have no cache entry, and are examined on every
    /// read.
    pub(super) fn unreadable_ids(&self) -> impl Iterator<Item = &str> {
        self.unreadable.keys().map(String::as_str)
    }
}

impl GrantFiles {
    /// Lists `dir` and refreshes every `<grant_id>.toml` in it, following symbolic links.
    ///
    /// Names beginning with `.` (Kubernetes' `..data` and its timestamped directories), names without the
    /// `.toml` extension, and stems that are not valid ids are not grant files and are skipped. A missing `dir`
    /// holds no grants. A directory that exists but cannot be listed fails the whole read: judging without it
    /// would take every grant for gone and end all service over what may be a passing error. A file that
    /// vanished between listing and reading (or is a dangling link) is a grant that is gone. The directory is
    /// always listed; of the files already cached, only `suspects` are stat'ed.
    pub(super) fn refresh(
        &mut self,
        dir: &Path,
        environment: &Environment,
        suspects: Suspects<'_>,
    ) -> Result<(Listing, RefreshCounts), ExportError> {
        let ids = list(dir)?;
        let paths: Vec<PathBuf> = ids.iter().map(|(_, path)| path.clone()).collect();
        let (problems, counts) = self.cache.refresh(&paths, environment, suspects, parse);
        let mut listing = Listing {
            dir: dir.to_owned(),
            ids: foldhash::HashMap::with_capacity_and_hasher(ids.len(), Default::default()),
            unreadable: HashMap::new(),
        };
        for (id, path) in ids {
            let problem = problems.get(&path);
            listing.note(id, path, problem);
        }
        Ok((listing, counts))
    }

    /// Refreshes only the grant files of `ids` (valid ids), whatever their stamps, and brings `listing` in line
    /// with what they are now: for a read of the changes events named, where a file that appeared or vanished
    /// was named too. Returns the ids that were listed and are gone.
    pub(super) fn refresh_some(
        &mut self,
        listing: &mut Listing,
        ids: &[String],
        environment: &Environment,
    ) -> (Vec<String>, RefreshCounts) {
        let paths: Vec<PathBuf> = ids.iter().map(|id| path_of(&listing.dir, id)).collect();
        let (problems, counts) = self.cache.refresh_some(&paths, environment, parse);
        let mut gone = Vec::new();
        for (id, path) in ids.iter().zip(paths) {
            let problem = problems.get(&path);
            if problem.is_some_and(cache::is_missing) && listing.ids.contains_key(id) {
                gone.push(id.clone());
            }
            listing.note(id.clone(), path, problem);
        }
        (gone, counts)
    }

    /// The ids of grant files whose cache entries are racy: a read examines them whatever it is told.
    pub(super) fn racy_ids(&self) -> impl Iterator<Item = &str> {
        self.cache.racy_paths().filter_map(|path| path.file_name().and_then(grant_id_of))
    }

    /// What `listing` found, for judging one read.
    pub(super) fn view<'a>(&'a self, listing: &'a Listing) -> Grants<'a> {
        let by_id = listing.ids.iter().filter_map(|(id, path)| self.file(listing, id, path)).collect();
        Grants { dir: &listing.dir, by_id }
    }

    /// What `listing` found for the grants `ids` alone (others read as absent), for judging some associations.
    pub(super) fn view_some<'a>(&'a self, listing: &'a Listing, ids: &[&'a str]) -> Grants<'a> {
        let by_id = ids
            .iter()
            .filter_map(|id| {
                let (id, path) = listing.ids.get_key_value(*id)?;
                self.file(listing, id, path)
            })
            .collect();
        Grants { dir: &listing.dir, by_id }
    }

    fn file<'a>(&'a self, listing: &'a Listing, id: &'a str, path: &Path) -> Option<(&'a str, GrantFile<'a>)> {
        let file = match (listing.unreadable.get(id), self.cache.get(path)) {
            (Some(message), _) => GrantFile::Unreadable { message: message.clone(), sha256: None },
            (None, Some(cached)) => match &cached.value {
                Ok(facts) => GrantFile::Parsed { facts, sha256: cached.sha256 },
                Err(message) => GrantFile::Unreadable { message: message.clone(), sha256: Some(cached.sha256) },
            },
            // Every listed path is either unreadable or cached after a refresh.
            (None, None) => return None,
        };
        Some((id, file))
    }

    /// Forgets a grant file, so that the next read reads it whatever its stamp.
    pub(super) fn forget(&mut self, path: &Path) {
        self.cache.forget(path);
    }

    /// Number of cached grant files.
    pub(super) fn len(&self) -> usize {
        self.cache.len()
    }
}

/// The grant files of one read, by grant id.
pub(super) struct Grants<'a> {
    dir: &'a Path,
    by_id: foldhash::HashMap<&'a str, GrantFile<'a>>,
}

/// One grant file as read: parsed (its facts), or not parseable.
enum GrantFile<'a> {
    Parsed {
        facts: &'a GrantFacts,
        sha256: [u8; 32],
    },
    /// The file's path and the parse or read error; never the file's contents. The hash of its bytes when they
    /// could be read.
    Unreadable {
        message: String,
        sha256: Option<[u8; 32]>,
    },
}

/// A grant that passed check 1 at this read's instant.
#[derive(Clone, Copy)]
pub(super) struct Authorized<'a> {
    pub(super) grant: &'a GrantFacts,
    /// SHA-256 of the file the facts come from: the grant key is only taken from a file with these bytes.
    pub(super) sha256: [u8; 32],
}

/// The grant file no longer has the bytes check 1 was judged on: it changed, vanished or became unreadable
/// after it was read earlier in this read.
#[derive(Debug, thiserror::Error)]
#[error("{}: changed while the export was being read; retry", path.display())]
pub(super) struct GrantChanged {
    /// The grant file.
    pub(super) path: PathBuf,
}

impl Grants<'_> {
    /// `grants/<grant_id>.toml`. `grant_id` must be a valid id.
    pub(super) fn path_of(&self, grant_id: &str) -> PathBuf {
        path_of(self.dir, grant_id)
    }

    /// SHA-256 of the grant file's bytes, when it exists and could be read.
    pub(super) fn sha256(&self, grant_id: &str) -> Option<[u8; 32]> {
        match self.by_id.get(grant_id)? {
            GrantFile::Parsed { sha256, .. } => Some(*sha256),
            GrantFile::Unreadable { sha256, .. } => *sha256,
        }
    }

    /// The earliest `not_after` later than `now` among these grant files that are not retired: the first
    /// instant at which check 1 on one of them may judge otherwise with no file changing.
    pub(super) fn next_lapse(&self, now: OffsetDateTime) -> Option<OffsetDateTime> {
        self.by_id
            .values()
            .filter_map(|file| match file {
                GrantFile::Parsed { facts, .. } if facts.state != GrantState::Retired => facts.not_after,
                _ => None,
            })
            .filter(|not_after| *not_after > now)
            .min()
    }

    /// Every grant file's status at `now`, for [`super::Snapshot::grants`].
    pub(super) fn statuses(&self, now: OffsetDateTime) -> BTreeMap<String, GrantStatus> {
        self.by_id.iter().map(|(id, file)| ((*id).to_owned(), status(file, now))).collect()
    }

    /// Check 1, in FORMAT.md's order: the grant exists (and parses), is not retired, has not lapsed at `now`,
    /// names `grantee`, allows `Decrypt`, and carries its grant key. `grant_id` must be a valid id.
    pub(super) fn authorize(
        &self,
        grant_id: &str,
        grantee: &str,
        now: OffsetDateTime,
    ) -> Result<Authorized<'_>, Refusal> {
        // The path only goes into refusals: built on every read for every association, it would cost.
        let path = || self.path_of(grant_id);
        let refuse = |reason, detail: String| Refusal::new(Check::Grant, reason, detail);
        let (grant, sha256) = match self.by_id.get(grant_id) {
            None => return Err(refuse(reason::GRANT_MISSING, format!("{} does not exist", path().display()))),
            Some(GrantFile::Unreadable { message, .. }) => {
                return Err(refuse(reason::GRANT_UNREADABLE, message.clone()))
            }
            Some(GrantFile::Parsed { facts, sha256 }) => (*facts, *sha256),
        };
        if grant.state == GrantState::Retired {
            return Err(refuse(reason::GRANT_RETIRED, format!("{}: `state` is \"retired\"", path().display())));
        }
        if let Some(not_after) = grant.not_after.filter(|t| *t <= now) {
            let detail = format!("{}: `not_after` {} has passed", path().display(), rfc3339(not_after));
            return Err(refuse(reason::GRANT_LAPSED, detail));
        }
        if grant.grantee != grantee {
            let detail = format!("{}: `grantee` is {:?}, this holder is {grantee:?}", path().display(), grant.grantee);
            return Err(refuse(reason::OTHER_GRANTEE, detail));
        }
        if !grant.operations.iter().any(|op| op == DECRYPT_OPERATION) {
            let detail = format!("{}: `operations` does not include \"{DECRYPT_OPERATION}\"", path().display());
            return Err(refuse(reason::NO_DECRYPT, detail));
        }
        if !grant.has_grant_key {
            let detail = format!("{}: an active grant must carry `grant_key`", path().display());
            return Err(refuse(reason::NO_GRANT_KEY, detail));
        }
        Ok(Authorized { grant, sha256 })
    }

    /// Reads the authorized grant's key from its file and lends it to `use_key`. The file must still have the
    /// bytes that passed check 1; the key is wiped when `use_key` returns.
    pub(super) fn with_grant_key<R>(
        &self,
        authorized: &Authorized<'_>,
        use_key: impl FnOnce(&SecretKey32) -> R,
    ) -> Result<R, GrantChanged> {
        let path = self.path_of(&authorized.grant.grant_id);
        let changed = || GrantChanged { path: path.clone() };
        // The file holds the grant key in base64: its bytes stay in a buffer that is wiped on drop.
        let bytes = std::fs::read(&path).map(SecretBytes::new).map_err(|_| changed())?;
        if cache::sha256(bytes.expose()) != authorized.sha256 {
            return Err(changed());
        }
        // The same bytes parsed before, with a key: a failure here would take a hash collision.
        let grant = Grant::parse(bytes.expose(), &authorized.grant.grant_id).map_err(|_| changed())?;
        let key = grant.grant_key.as_ref().ok_or_else(changed)?;
        Ok(use_key(key))
    }
}

/// `dir/<grant_id>.toml`.
fn path_of(dir: &Path, grant_id: &str) -> PathBuf {
    dir.join(format!("{grant_id}.{}", layout::GRANT_EXTENSION))
}

/// The grant files in `dir`, by id, in no particular order. A missing `dir` holds none.
fn list(dir: &Path) -> Result<Vec<(String, PathBuf)>, ExportError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if cache::is_missing(&e) => return Ok(Vec::new()),
        Err(source) => return Err(ExportError::Io { path: dir.to_owned(), source }),
    };
    let mut ids = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ExportError::Io { path: dir.to_owned(), source })?;
        let file_name = entry.file_name();
        if let Some(id) = grant_id_of(&file_name) {
            ids.push((id.to_owned(), path_of(dir, id)));
        }
    }
    Ok(ids)
}

/// The grant id a directory entry stands for, or `None` when the entry is not a grant file.
pub(super) fn grant_id_of(file_name: &OsStr) -> Option<&str> {
    let name = file_name.to_str()?;
    if name.starts_with('.') {
        return None;
    }
    let id = name.strip_suffix(layout::GRANT_EXTENSION)?.strip_suffix('.')?;
    is_valid_id(id).then_some(id)
}

/// Parses a grant file at `path` (whose stem is its id) and keeps its facts; the parsed key is wiped here.
fn parse(path: &Path, bytes: &[u8]) -> ParsedGrant {
    let grant_id = path.file_stem().and_then(OsStr::to_str).unwrap_or_default();
    Grant::parse(bytes, grant_id).map(GrantFacts::from_grant).map_err(|e| format!("{}: {e}", path.display()))
}

/// What a grant file says at `now`.
fn status(file: &GrantFile<'_>, now: OffsetDateTime) -> GrantStatus {
    match file {
        GrantFile::Unreadable { message, .. } => GrantStatus::Unreadable(message.clone()),
        GrantFile::Parsed { facts, .. } if facts.state == GrantState::Retired => GrantStatus::Retired,
        GrantFile::Parsed { facts, .. } if facts.not_after.is_some_and(|t| t <= now) => GrantStatus::Lapsed,
        GrantFile::Parsed { facts, .. } => {
            GrantStatus::Active { grantee: facts.grantee.clone(), not_after: facts.not_after }
        }
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
