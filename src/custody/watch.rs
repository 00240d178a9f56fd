//! Following the export on disk: file events that say "re-read now".
//!
//! No single inotify watch can be trusted. Files are replaced by rename (inotify follows inodes, so the old
//! watch dies with the old inode); Kubernetes Secret and ConfigMap volumes re-point a `..data` symlink while the
//! visible names never change; the export directory itself can be deleted and recreated (a watch on it is not
//! carried over); the kernel queue can overflow. So events are only hints: each wakes the caller to re-read, and
//! the paths they name are collected as [`Changes`], which narrow the read only where they are precise (see
//! [`crate::custody::changes`]); any watcher error, rescan flag, new watch or event outside the export's layout
//! means "anything may have changed". The directory is watched recursively, and its parent too, so that a
//! deleted and recreated export is noticed and watched again. A periodic full read, driven by the caller, backs
//! all of this up.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::changes::Changes;

/// Why the watcher could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {path}: {source}")]
pub struct WatchError {
    /// The path that could not be watched.
    pub path: PathBuf,
    /// What notify said.
    pub source: notify::Error,
}

/// Shared between the notify callback (on notify's thread) and the async side.
#[derive(Debug)]
struct Pending {
    /// Wakes the follower.
    wake: Notify,
    /// When the first event not yet taken arrived: the start of a change's latency.
    first_event: Mutex<Option<Instant>>,
    /// What the events not yet taken say may have changed.
    changes: Mutex<Changes>,
}

impl Pending {
    fn new(export: &Path) -> Self {
        // Nothing was read yet: the first read examines everything.
        Self { wake: Notify::new(), first_event: Mutex::new(None), changes: Mutex::new(Changes::everything(export)) }
    }

    /// Records an event naming `paths`; `None` when anything may have changed.
    fn record(&self, paths: Option<&[PathBuf]>) {
        let mut changes = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        match paths {
            Some(paths) if !paths.is_empty() => paths.iter().for_each(|path| changes.add(path)),
            _ => changes.add_everything(),
        }
        drop(changes);
        let mut first = self.first_event.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert_with(Instant::now);
        drop(first);
        self.wake.notify_one();
    }

    fn take(&self) -> Option<Instant> {
        self.first_event.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn take_changes(&self, export: &Path) -> Changes {
        let mut changes = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *changes, Changes::none(export))
    }
}

/// Whether an event only reports a file being opened or read.
fn is_read_only(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    matches!(kind, EventKind::Access(access) if *access != AccessKind::Close(AccessMode::Write))
}

/// Watches an export directory and its parent.
pub struct ExportWatcher {
    export: PathBuf,
    watcher: RecommendedWatcher,
    pending: Arc<Pending>,
    /// Identity (device, inode) of the export directory the recursive watch was added on.
    watched: Option<(u64, u64)>,
}

impl std::fmt::Debug for ExportWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportWatcher").field("export", &self.export).field("watched", &self.watched).finish()
    }
}

impl ExportWatcher {
    /// Starts watching `export` (recursively) and its parent directory. A missing export is not an error: the
    /// parent's watch notices when it appears.
    pub fn new(export: &Path) -> Result<Self, WatchError> {
        let pending = Arc::new(Pending::new(export));
        let callback = {
            let pending = Arc::clone(&pending);
            move |event: notify::Result<notify::Event>| match &event {
                Err(error) => {
                    tracing::debug!(%error, "file watcher error; re-reading the export");
                    pending.record(None);
                }
                // Opens and reads change nothing, and our own reads cause them: counting them would make every
                // read trigger the next. A close after writing does count.
                Ok(event) if is_read_only(&event.kind) && !event.need_rescan() => {}
                Ok(event) if event.need_rescan() => pending.record(None),
                Ok(event) => pending.record(Some(&event.paths)),
            }
        };
        let watcher =
            notify::recommended_watcher(callback).map_err(|source| WatchError { path: export.to_owned(), source })?;
        let mut this = Self { export: export.to_owned(), watcher, pending, watched: None };
        if let Some(parent) = export.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Err(error) = this.watcher.watch(parent, RecursiveMode::NonRecursive) {
                tracing::warn!(parent = %parent.display(), %error, "cannot watch the export's parent directory");
            }
        }
        this.ensure_watching();
        Ok(this)
    }

    /// Adds the recursive watch on the export again if the directory is not the one watched (it was deleted and
    /// recreated, or it did not exist). Cheap: one `stat`. Call after every read.
    pub fn ensure_watching(&mut self) {
        let identity = std::fs::metadata(&self.export).ok().filter(|m| m.is_dir()).map(|m| (m.dev(), m.ino()));
        if identity == self.watched {
            return;
        }
        if self.watched.is_some() {
            // The old directory is gone; its watch went with it, or goes now.
            let _ = self.watcher.unwatch(&self.export);
        }
        self.watched = None;
        if identity.is_some() {
            match self.watcher.watch(&self.export, RecursiveMode::Recursive) {
                Ok(()) => {
                    self.watched = identity;
                    tracing::debug!(export = %self.export.display(), "watching the export");
                }
                Err(error) => tracing::warn!(export = %self.export.display(), %error, "cannot watch the export"),
            }
            // Whatever happened while nothing watched is only seen by reading everything again.
            self.pending.record(None);
        }
    }

    /// Waits for the next event.
    pub async fn changed(&self) {
        self.pending.wake.notified().await;
    }

    /// Takes the arrival time of the first event since the last call, if any arrived.
    pub fn take_first_event(&self) -> Option<Instant> {
        self.pending.take()
    }

    /// Takes what the events since the last call say may have changed.
    pub fn take_changes(&self) -> Changes {
        self.pending.take_changes(&self.export)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind};

    #[test]
    fn opens_and_reads_are_not_changes_but_a_close_after_writing_is() {
        assert!(is_read_only(&EventKind::Access(AccessKind::Open(AccessMode::Any))));
        assert!(is_read_only(&EventKind::Access(AccessKind::Close(AccessMode::Read))));
        assert!(is_read_only(&EventKind::Access(AccessKind::Read)));
        assert!(!is_read_only(&EventKind::Access(AccessKind::Close(AccessMode::Write))));
        assert!(!is_read_only(&EventKind::Create(CreateKind::File)));
        assert!(!is_read_only(&EventKind::Modify(ModifyKind::Any)));
        assert!(!is_read_only(&EventKind::Any));
    }

    #[tokio::test]
    async fn reading_the_export_does_not_wake_the_watcher_but_writing_does() {
        let dir = tempfile::tempdir().unwrap();
        let export = dir.path().join("export");
        std::fs::create_dir(&export).unwrap();
        std::fs::write(export.join("associations.toml"), "x").unwrap();
        let watcher = ExportWatcher::new(&export).unwrap();
        // The initial watch asks for one read.
        tokio::time::timeout(std::time::Duration::from_secs(5), watcher.changed()).await.unwrap();
        watcher.take_first_event();
        std::fs::read(export.join("associations.toml")).unwrap();
        let woke = tokio::time::timeout(std::time::Duration::from_millis(300), watcher.changed()).await;
        assert!(woke.is_err(), "a read woke the watcher");
        std::fs::write(export.join("associations.toml"), "y").unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), watcher.changed()).await.unwrap();
        assert!(watcher.take_first_event().is_some());
    }
}
