//! A cache of parsed export files, validated by their metadata, in the manner of git's index.
//!
//! Each entry holds a file's SHA-256 and what parsing it gave, keyed by the path the reader asked for. A read
//! stats every path (following symbolic links, so that a Kubernetes `..data` swap shows up as new inodes) and
//! reads a file again only when its [`FileStamp`] (device, inode, size, mtime, ctime) differs from the cached
//! one, or when the entry is *racy*.
//!
//! A read may also be told which paths may have changed ([`Suspects`]), from file events: the others' entries
//! are then trusted without a `stat`, unless racy. See [`crate::custody::changes`] for when that is sound.
//!
//! Racy entries: timestamps are coarse (a jiffy, or a whole second on some filesystems), so a file rewritten in
//! place within one tick at the same size keeps its stamp. Like git's "racily clean" index entries, an entry
//! whose mtime or ctime is later than the read's start minus [`RACY_MARGIN`] is not trusted: its content is read
//! and hashed again on every read, until a read that starts more than the margin after both times. A rewrite
//! after that read would have to carry a later timestamp, so from then on the stamp alone is trusted.
//!
//! Files are always read into buffers that are wiped on drop: a grant file holds its grant key. Parsing is the
//! caller's; the cache never sees what a parser extracted beyond the value it returns, and callers must keep
//! secrets out of those values.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io::{self, ErrorKind};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest::{digest, SHA256};

use super::parallel;
use crate::secret::SecretBytes;

/// How recent a timestamp must be for its file's stamp not to be trusted. Two seconds cover filesystems with
/// one-second timestamps and a clock that lags the filesystem's by up to a second.
pub(super) const RACY_MARGIN: Duration = Duration::from_secs(2);

/// A file's metadata, as far as telling a changed file from an unchanged one goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileStamp {
    pub(super) dev: u64,
    pub(super) ino: u64,
    pub(super) size: u64,
    pub(super) mtime: Timestamp,
    pub(super) ctime: Timestamp,
}

/// Seconds and nanoseconds since the Unix epoch; ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Timestamp {
    pub(super) seconds: i64,
    pub(super) nanoseconds: i64,
}

impl FileStamp {
    /// Stats `path`, following symbolic links. A world-writable file fails (as unreadable, never as missing):
    /// anyone could rewrite it, a grant file to retire the grant, `associations.toml` to move names around.
    pub(super) fn of(path: &Path) -> io::Result<Self> {
        let metadata = std::fs::metadata(path)?;
        if metadata.mode() & 0o002 != 0 {
            crate::hygiene::refuse_world_writable(path, "export file")
                .map_err(|insecure| io::Error::new(ErrorKind::PermissionDenied, insecure))?;
        }
        Ok(Self {
            dev: metadata.dev(),
            ino: metadata.ino(),
            size: metadata.size(),
            mtime: Timestamp { seconds: metadata.mtime(), nanoseconds: metadata.mtime_nsec() },
            ctime: Timestamp { seconds: metadata.ctime(), nanoseconds: metadata.ctime_nsec() },
        })
    }

    /// Whether the file may still change without its stamp changing, as seen by a read that took `horizon` as
    /// its start minus [`RACY_MARGIN`].
    fn is_racy(&self, horizon: Timestamp) -> bool {
        self.mtime >= horizon || self.ctime >= horizon
    }
}

/// How the cache stats files and tells the time: the real filesystem and clock, replaced by tests.
#[derive(Debug, Clone, Copy)]
pub(super) struct Environment {
    /// The current time, compared with file timestamps.
    pub(super) now: fn() -> SystemTime,
    /// Stats a path, following symbolic links.
    pub(super) stat: fn(&Path) -> io::Result<FileStamp>,
}

impl Default for Environment {
    fn default() -> Self {
        Self { now: SystemTime::now, stat: FileStamp::of }
    }
}

impl Environment {
    /// The instant from which timestamps are too recent to trust, for a read starting now. A clock before the
    /// epoch (or too far from it) trusts no timestamp at all.
    pub(super) fn racy_horizon(&self) -> Timestamp {
        let start = (self.now)().checked_sub(RACY_MARGIN).and_then(|t| t.duration_since(UNIX_EPOCH).ok());
        match start.and_then(|d| Some((i64::try_from(d.as_secs()).ok()?, i64::from(d.subsec_nanos())))) {
            Some((seconds, nanoseconds)) => Timestamp { seconds, nanoseconds },
            None => Timestamp { seconds: i64::MIN, nanoseconds: 0 },
        }
    }
}

/// One cached file.
pub(super) struct Cached<T> {
    stamp: FileStamp,
    racy: bool,
    /// SHA-256 of the file's bytes.
    pub(super) sha256: [u8; 32],
    /// What parsing the bytes gave.
    pub(super) value: T,
}

/// Counts of one refresh, for [`super::ReadStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct RefreshCounts {
    /// Paths stat'ed (the others were trusted: not suspected of a change).
    pub(super) checked: usize,
    /// Files whose content was read.
    pub(super) read: usize,
    /// Of those, files read only because their entry was racy.
    pub(super) racy: usize,
}

impl std::ops::AddAssign for RefreshCounts {
    fn add_assign(&mut self, other: Self) {
        self.checked += other.checked;
        self.read += other.read;
        self.racy += other.racy;
    }
}

/// Which paths a refresh must `stat`: given a path, whether it may have changed since the last refresh. Paths
/// without an entry, and racy entries, are examined whatever this says.
pub(super) type Suspects<'a> = &'a (dyn Fn(&Path) -> bool + Sync);

/// Every path may have changed: a full refresh.
pub(super) const EVERY_PATH: Suspects<'static> = &|_| true;

/// The paths of one refresh that could not be used: missing (`NotFound`, also for a dangling link) or
/// unreadable. They have no cache entry.
pub(super) type Problems = HashMap<PathBuf, io::Error>;

/// Parsed files by path. Keys are the paths' bytes: `Path`'s own hash walks components byte by byte, which costs
/// as much as a `stat` when every read looks up tens of thousands of paths. foldhash rather than SipHash for the
/// same reason: hashing the paths was a tenth of a read of 10,000 certificates (the keys come from the export,
/// whose writer is trusted with far more than hash flooding; foldhash is still seeded per process).
pub(super) struct FileCache<T> {
    entries: foldhash::HashMap<OsString, Cached<T>>,
    /// The keys of the racy entries, so that a read need not walk every entry to find them.
    racy: foldhash::HashSet<OsString>,
}

impl<T> Default for FileCache<T> {
    fn default() -> Self {
        Self { entries: foldhash::HashMap::default(), racy: foldhash::HashSet::default() }
    }
}

/// Whether a refresh drops the entries of paths it was not asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prune {
    /// The paths asked for are all the cache is to hold.
    Others,
    /// The paths asked for are some of those the cache holds.
    Nothing,
}

/// What refreshing one path found.
enum Refreshed<T> {
    /// Not suspected of a change, entry not racy: not even stat'ed.
    Trusted,
    /// Same stamp, entry not racy: nothing read, nothing to change.
    Kept,
    /// Read again (changed stamp or racy entry) with the same bytes: the parse is kept.
    Restamped { stamp: FileStamp, racy: bool, was_racy: bool },
    /// New or different bytes, parsed.
    Read { entry: NewEntry<T>, was_racy: bool },
    /// Missing or unreadable.
    Failed(io::Error),
}

/// A new entry, boxed so that the common results of a refresh (kept, restamped) stay small.
type NewEntry<T> = Box<Cached<T>>;

impl<T: Send + Sync> FileCache<T> {
    /// Brings the cache in line with `paths` as they are now, stat'ing (and reading where needed) on several
    /// threads. Afterwards the cache holds the paths that could be read, and the others are returned as problems.
    /// `parse` gets the path and the bytes. Of the paths with a trusted (not racy) entry, only `suspects` are
    /// stat'ed; the others are kept as they are.
    ///
    /// Entries for paths no longer asked for are dropped, to bound memory: `paths` should be distinct. An entry
    /// that survives anyway is never wrong, since every use of an entry is preceded by a check of its stamp.
    /// Unchanged entries are not touched at all, so that a read with nothing changed costs one `stat` and one
    /// lookup per path.
    pub(super) fn refresh<Q, P>(
        &mut self,
        paths: &[Q],
        environment: &Environment,
        suspects: Suspects<'_>,
        parse: P,
    ) -> (Problems, RefreshCounts)
    where
        Q: AsRef<Path> + Sync,
        P: Fn(&Path, &[u8]) -> T + Sync,
    {
        self.refresh_paths(paths, environment, suspects, |path, bytes, _| parse(path, bytes), Prune::Others)
    }

    /// As [`FileCache::refresh`], giving `parse` the value parsed from the file's previous bytes, if any, so
    /// that it can reuse what did not change.
    pub(super) fn refresh_from_previous<Q, P>(
        &mut self,
        paths: &[Q],
        environment: &Environment,
        suspects: Suspects<'_>,
        parse: P,
    ) -> (Problems, RefreshCounts)
    where
        Q: AsRef<Path> + Sync,
        P: Fn(&Path, &[u8], Option<&T>) -> T + Sync,
    {
        self.refresh_paths(paths, environment, suspects, parse, Prune::Others)
    }

    /// As [`FileCache::refresh`] for some of the paths: entries of paths not asked for are kept as they are.
    pub(super) fn refresh_some<Q, P>(
        &mut self,
        paths: &[Q],
        environment: &Environment,
        parse: P,
    ) -> (Problems, RefreshCounts)
    where
        Q: AsRef<Path> + Sync,
        P: Fn(&Path, &[u8]) -> T + Sync,
    {
        self.refresh_paths(paths, environment, EVERY_PATH, |path, bytes, _| parse(path, bytes), Prune::Nothing)
    }

    /// The paths whose entries are racy: a refresh examines them whatever it is told.
    pub(super) fn racy_paths(&self) -> impl Iterator<Item = &Path> {
        self.racy.iter().map(Path::new)
    }

    fn refresh_paths<Q, P>(
        &mut self,
        paths: &[Q],
        environment: &Environment,
        suspects: Suspects<'_>,
        parse: P,
        prune: Prune,
    ) -> (Problems, RefreshCounts)
    where
        Q: AsRef<Path> + Sync,
        P: Fn(&Path, &[u8], Option<&T>) -> T + Sync,
    {
        let horizon = environment.racy_horizon();
        let entries = &self.entries;
        let found = parallel::map(paths, |path| {
            let path = path.as_ref();
            let cached = entries.get(path.as_os_str());
            if cached.is_some_and(|c| !c.racy) && !suspects(path) {
                return Refreshed::Trusted;
            }
            refresh_one(cached, path, environment, horizon, &parse)
        });
        let mut problems = Problems::new();
        let mut counts = RefreshCounts::default();
        let mut live = 0;
        for (path, found) in paths.iter().map(AsRef::as_ref).zip(found) {
            counts.checked += usize::from(!matches!(found, Refreshed::Trusted));
            match found {
                Refreshed::Kept | Refreshed::Trusted => live += 1,
                Refreshed::Restamped { stamp, racy, was_racy } => {
                    counts.read += 1;
                    counts.racy += usize::from(was_racy);
                    live += 1;
                    if let Some(entry) = self.entries.get_mut(path.as_os_str()) {
                        entry.stamp = stamp;
                        entry.racy = racy;
                        self.note_racy(path, racy);
                    }
                }
                Refreshed::Read { entry, was_racy } => {
                    counts.read += 1;
                    counts.racy += usize::from(was_racy);
                    live += 1;
                    self.note_racy(path, entry.racy);
                    self.entries.insert(path.as_os_str().to_owned(), *entry);
                }
                Refreshed::Failed(error) => {
                    self.forget(path);
                    problems.insert(path.to_owned(), error);
                }
            }
        }
        if prune == Prune::Others && self.entries.len() != live {
            let wanted: foldhash::HashSet<&OsStr> = paths.iter().map(|path| path.as_ref().as_os_str()).collect();
            self.entries.retain(|path, _| wanted.contains(path.as_os_str()));
            self.racy.retain(|path| wanted.contains(path.as_os_str()));
        }
        (problems, counts)
    }

    /// The entry for `path`, as of the last refresh.
    pub(super) fn get(&self, path: &Path) -> Option<&Cached<T>> {
        self.entries.get(path.as_os_str())
    }

    /// Forgets `path`, so that the next refresh reads it whatever its stamp.
    pub(super) fn forget(&mut self, path: &Path) {
        self.entries.remove(path.as_os_str());
        self.racy.remove(path.as_os_str());
    }

    fn note_racy(&mut self, path: &Path, racy: bool) {
        if racy {
            self.racy.insert(path.as_os_str().to_owned());
        } else {
            self.racy.remove(path.as_os_str());
        }
    }

    /// Number of entries.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Stats `path` and reads it when the cached entry cannot be trusted.
fn refresh_one<T>(
    cached: Option<&Cached<T>>,
    path: &Path,
    environment: &Environment,
    horizon: Timestamp,
    parse: &impl Fn(&Path, &[u8], Option<&T>) -> T,
) -> Refreshed<T> {
    let stamp = match (environment.stat)(path) {
        Ok(stamp) => stamp,
        Err(error) => return Refreshed::Failed(error),
    };
    if cached.is_some_and(|c| c.stamp == stamp && !c.racy) {
        return Refreshed::Kept;
    }
    let was_racy = cached.is_some_and(|c| c.stamp == stamp);
    // Whoever may write to the file's directory may replace the file: checked when the file is about to be
    // taken in (the export's own directory, `grants/` and `certificates/` are checked before every read).
    if let Some(directory) = path.parent() {
        if let Err(insecure) = crate::hygiene::refuse_world_writable(directory, "export directory") {
            return Refreshed::Failed(io::Error::new(ErrorKind::PermissionDenied, insecure));
        }
    }
    let bytes = match read(path) {
        Ok(bytes) => bytes,
        Err(error) => return Refreshed::Failed(error),
    };
    let sha256 = sha256(bytes.expose());
    // The stamp was taken before the bytes were read: a change in between shows up as a new stamp next time,
    // or, within one tick, as a racy entry.
    let racy = stamp.is_racy(horizon);
    match cached {
        Some(c) if c.sha256 == sha256 => Refreshed::Restamped { stamp, racy, was_racy },
        _ => {
            let value = parse(path, bytes.expose(), cached.map(|c| &c.value));
            let entry = Box::new(Cached { stamp, racy, sha256, value });
            Refreshed::Read { entry, was_racy }
        }
    }
}

/// Reads a whole file into a buffer wiped on drop.
fn read(path: &Path) -> io::Result<SecretBytes> {
    // `std::fs::read` sizes its buffer from the file's length, so a file that does not grow while being read
    // is never reallocated (which would leave an unwiped copy behind).
    std::fs::read(path).map(SecretBytes::new)
}

/// SHA-256 of `bytes`.
pub(super) fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    // A SHA-256 digest is 32 bytes: the zip copies all of it.
    for (o, b) in out.iter_mut().zip(digest(&SHA256, bytes).as_ref()) {
        *o = *b;
    }
    out
}

/// Whether an I/O error means the file is not there (or is a dangling link).
pub(super) fn is_missing(error: &io::Error) -> bool {
    error.kind() == ErrorKind::NotFound
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(mtime: i64, ctime: i64) -> FileStamp {
        let at = |seconds| Timestamp { seconds, nanoseconds: 0 };
        FileStamp { dev: 1, ino: 2, size: 3, mtime: at(mtime), ctime: at(ctime) }
    }

    #[test]
    fn recent_mtimes_or_ctimes_are_racy() {
        let horizon = Timestamp { seconds: 100, nanoseconds: 0 };
        assert!(!stamp(99, 99).is_racy(horizon));
        assert!(stamp(100, 99).is_racy(horizon));
        assert!(stamp(99, 100).is_racy(horizon));
        assert!(stamp(101, 101).is_racy(horizon));
    }

    #[test]
    fn a_clock_before_the_epoch_trusts_no_timestamp() {
        let environment = Environment { now: || UNIX_EPOCH, ..Environment::default() };
        assert!(stamp(i64::MIN + 1, i64::MIN + 1).is_racy(environment.racy_horizon()));
        let environment = Environment { now: || UNIX_EPOCH + Duration::from_secs(10), ..Environment::default() };
        assert_eq!(environment.racy_horizon(), Timestamp { seconds: 8, nanoseconds: 0 });
    }

    #[test]
    fn missing_and_unreadable_paths_are_problems_and_leave_the_cache() {
        let dir = tempfile::TempDir::new().unwrap();
        let (file, gone, directory) = (dir.path().join("f"), dir.path().join("gone"), dir.path().join("d"));
        std::fs::write(&file, "x").unwrap();
        std::fs::create_dir(&directory).unwrap();
        let mut cache = FileCache::default();
        let paths = [file.clone(), gone.clone(), directory.clone()];
        let (problems, counts) = cache.refresh(&paths, &Environment::default(), EVERY_PATH, |_, bytes| bytes.len());
        assert_eq!(counts, RefreshCounts { checked: 3, read: 1, racy: 0 });
        assert!(is_missing(&problems[&gone]));
        assert!(!is_missing(&problems[&directory]));
        assert_eq!(cache.get(&file).map(|c| c.value), Some(1));
        assert_eq!(cache.len(), 1);

        // A path no longer asked for is pruned.
        let (problems, _) =
            cache.refresh::<PathBuf, _>(&[], &Environment::default(), EVERY_PATH, |_, bytes| bytes.len());
        assert!(problems.is_empty());
        assert_eq!(cache.len(), 0);
    }
}
