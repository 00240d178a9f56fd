//! Following the export on disk: file events that say "re-read now".
//!
//! No single inotify watch can be trusted. Files are replaced by rename (inotify follows inodes, so the old
//! watch dies with the old inode); Kubernetes Secret and ConfigMap volumes re-point a `..data` symlink while the
//! visible names never change; the export directory itself can be deleted and recreated (a watch on it is not
//! carried over); the kernel queue can overflow. So this module never interprets events: any event, any watcher
//! error and any rescan flag only mean "something may have changed", and the caller re-reads the whole export.
//! The directory is watched recursively, and its parent too, so that a deleted and recreated export is noticed
//! and watched again. A periodic full rescan, driven by the caller, backs all of this up.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio::time::Instant;

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
#[derive(Debug, Default)]
struct Pending {
    /// Wakes the follower.
    wake: Notify,
    /// When the first event not yet taken arrived: the start of a change's latency.
    first_event: Mutex<Option<Instant>>,
}

impl Pending {
    fn record(&self) {
        let mut first = self.first_event.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert_with(Instant::now);
        drop(first);
        self.wake.notify_one();
    }

    fn take(&self) -> Option<Instant> {
        self.first_event.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
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
        let pending = Arc::new(Pending::default());
        let callback = {
            let pending = Arc::clone(&pending);
            move |event: notify::Result<notify::Event>| {
                if let Err(error) = &event {
                    tracing::debug!(%error, "file watcher error; re-reading the export");
                }
                pending.record();
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
            // Whatever happened while nothing watched is only seen by reading again.
            self.pending.record();
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
}
