//! `sealgate run` as a long-lived process: start, then obey signals and the configuration file until told to stop.
//!
//! - SIGTERM or SIGINT: stop accepting, let in-flight requests finish within `timeouts.drain`, close the rest.
//! - SIGHUP, or the configuration file changing on disk: read it again and apply what can change while running
//!   ([`RunningServer::reload`]). A file that does not load is refused with its error and the running
//!   configuration stays. SIGHUP also reopens the logs (log rotation), whether or not the file reloads.
//!
//! The configuration file is watched through its directory (editors and Kubernetes ConfigMap volumes replace
//! files rather than write them), and only a change of its contents triggers a reload.
//!
//! The client certificate trust files (`[tls.client_auth]`'s CA and CRLs) are watched the same way: a renewed
//! CRL written by a cron job or delivered by a Secret volume is taken in without a signal
//! ([`RunningServer::reload_client_trust`]); nothing happens unless their contents changed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;

use crate::config::Config;
use crate::server::{self, RunningServer, ServerError};

/// Quiet time after a change to the configuration's directory before the file is read: editors write in bursts.
const SETTLE: Duration = Duration::from_millis(100);

/// Runs the server until SIGTERM or SIGINT, then drains it.
pub async fn run(path: &Path, config: Config) -> Result<(), ServerError> {
    let mut drain = config.timeouts.drain;
    // Watched before the server starts: a change written as soon as the server says it listens (a deployment
    // tool's next step) is then seen. One written between the load and the watch is seen too: the watch
    // compares the file with the contents `config` was parsed from, not with the file as it finds it.
    let mut file = ConfigFile::new(path, config.source_sha256);
    let server = server::start(config).await?;
    let mut trust = trust_watch(&server).await;
    let (mut term, mut int, mut hup) =
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup())) {
            (Ok(term), Ok(int), Ok(hup)) => (term, int, hup),
            _ => {
                tracing::error!("cannot install signal handlers; stopping");
                server.shutdown(drain).await;
                return Ok(());
            }
        };
    let signal = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => {
                server.reopen_logs().await;
                if let Some(applied) = reload(&server, &mut file, "SIGHUP").await {
                    drain = applied;
                    trust = trust_watch(&server).await;
                }
            }
            _ = file.changed() => {
                if file.contents_changed() {
                    if let Some(applied) = reload(&server, &mut file, "the file changed").await {
                        drain = applied;
                        trust = trust_watch(&server).await;
                    }
                }
            }
            _ = trust.changed() => {
                if let Err(error) = server.reload_client_trust().await {
                    tracing::error!(%error, "client certificate trust files refused; the trust in force stays");
                }
            }
        }
    };
    tracing::info!(signal, ?drain, "shutting down: no new connections; draining in-flight requests");
    server.shutdown(drain).await;
    Ok(())
}

/// A watch on the running configuration's client certificate trust files.
async fn trust_watch(server: &RunningServer) -> DirectoryWatch {
    DirectoryWatch::new(&server.client_trust_files().await, "the client certificate trust files")
}

/// Reloads from the file; returns the new drain deadline when the new configuration was applied.
async fn reload(server: &RunningServer, file: &mut ConfigFile, why: &str) -> Option<Duration> {
    file.remember_contents();
    let config = match Config::load(&file.path) {
        Ok(config) => {
            // What was parsed, which a change after the digest above may have made newer: the next event
            // then compares the file with what runs.
            file.last = Some(config.source_sha256);
            config
        }
        Err(error) => {
            tracing::error!(%error, why, "new configuration refused; the running one stays");
            return None;
        }
    };
    let drain = config.timeouts.drain;
    match server.reload(config).await {
        Ok(_) => Some(drain),
        Err(error) => {
            tracing::error!(%error, why, "new configuration could not be applied; the running one stays");
            None
        }
    }
}

/// The names of `files`, as a directory event names them.
fn names_of(files: &[PathBuf]) -> Vec<std::ffi::OsString> {
    files.iter().filter_map(|file| file.file_name().map(ToOwned::to_owned)).collect()
}

/// Whether a directory event may concern the files named `names`: one that names them, or the `..data` swap
/// of a Kubernetes volume (its atomic writer's names begin with `..`), or one that names nothing or asks for a
/// rescan, or an error (the watch may have missed something). Other files' events (a log written in the same
/// directory) are not: a directory busy with them would otherwise never settle.
fn concerns(event: &notify::Result<notify::Event>, names: &[std::ffi::OsString]) -> bool {
    let Ok(event) = event else { return true };
    if event.kind.is_access() {
        return false;
    }
    event.need_rescan()
        || event.paths.is_empty()
        || event
            .paths
            .iter()
            .filter_map(|path| path.file_name())
            .any(|name| names.iter().any(|watched| watched == name) || name.as_encoded_bytes().starts_with(b".."))
}

/// Files watched through their directories, for any change there (the caller reads the files again and
/// decides); a watch that cannot be made is logged, and SIGHUP remains.
struct DirectoryWatch {
    changed: Arc<Notify>,
    _watcher: Option<RecommendedWatcher>,
}

impl DirectoryWatch {
    /// Watches `files` (`what` they are, for the warning when they cannot be).
    fn new(files: &[PathBuf], what: &str) -> Self {
        let changed = Arc::new(Notify::new());
        if files.is_empty() {
            return Self { changed, _watcher: None };
        }
        let notify = Arc::clone(&changed);
        let names = names_of(files);
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if concerns(&event, &names) {
                notify.notify_one();
            }
        })
        .and_then(|mut watcher| {
            let mut dirs: Vec<&Path> = files
                .iter()
                .map(|f| f.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))
                .collect();
            dirs.sort();
            dirs.dedup();
            for dir in dirs {
                watcher.watch(dir, RecursiveMode::NonRecursive)?;
            }
            Ok(watcher)
        });
        let watcher = match watcher {
            Ok(watcher) => Some(watcher),
            Err(error) => {
                tracing::warn!(%error, ?files, "cannot watch {what}; SIGHUP still reloads");
                None
            }
        };
        Self { changed, _watcher: watcher }
    }

    /// Waits for a change in a watched directory, then for it to settle (never, when nothing is watched).
    async fn changed(&self) {
        self.changed.notified().await;
        loop {
            tokio::select! {
                _ = self.changed.notified() => continue,
                _ = tokio::time::sleep(SETTLE) => return,
            }
        }
    }
}

/// The configuration file, watched through its directory.
struct ConfigFile {
    path: PathBuf,
    /// SHA-256 of the contents last loaded (or refused), to tell a real change from a touch.
    last: Option<[u8; 32]>,
    watch: DirectoryWatch,
}

impl ConfigFile {
    /// Watches `path`, whose contents `loaded` (their SHA-256) are the ones running. When the file already
    /// differs from them (it changed after it was read), a change is signalled at once.
    fn new(path: &Path, loaded: [u8; 32]) -> Self {
        let watch = DirectoryWatch::new(&[path.to_owned()], "the configuration file");
        let file = Self { path: path.to_owned(), last: Some(loaded), watch };
        // After the watch is made: a change from here on is an event; one before it shows here.
        if file.contents_changed() {
            file.watch.changed.notify_one();
        }
        file
    }

    /// Waits for a change in the file's directory, then for it to settle.
    async fn changed(&self) {
        self.watch.changed().await;
    }

    fn digest(&self) -> Option<[u8; 32]> {
        std::fs::read(&self.path).ok().map(|bytes| crate::config::sha256(&bytes))
    }

    fn contents_changed(&self) -> bool {
        self.digest() != self.last
    }

    fn remember_contents(&mut self) {
        self.last = self.digest();
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt as _;

    use super::*;
    use crate::config::sha256;

    #[tokio::test]
    async fn a_change_between_the_load_and_the_watch_is_signalled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, "# the contents loaded\n").unwrap();
        let loaded = sha256(b"# the contents loaded\n");
        std::fs::write(&path, "# written after the load\n").unwrap();

        let file = ConfigFile::new(&path, loaded);
        assert!(file.contents_changed(), "the file differs from what runs");
        assert!(file.watch.changed.notified().now_or_never().is_some(), "the change is signalled without an event");
    }

    #[tokio::test]
    async fn the_contents_loaded_are_not_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, "# the contents loaded\n").unwrap();

        let file = ConfigFile::new(&path, sha256(b"# the contents loaded\n"));
        assert!(!file.contents_changed());
        assert!(file.watch.changed.notified().now_or_never().is_none(), "nothing to reload");
    }

    #[test]
    fn only_events_that_may_concern_the_watched_files_count() {
        use notify::event::{CreateKind, EventKind, Flag, ModifyKind};
        let names = names_of(&[PathBuf::from("/etc/sealgate/clients.pem"), PathBuf::from("/etc/sealgate/crl.pem")]);
        let event = |kind: EventKind, paths: &[&str]| {
            Ok(notify::Event { kind, paths: paths.iter().map(PathBuf::from).collect(), attrs: Default::default() })
        };
        let modified = EventKind::Modify(ModifyKind::Any);
        assert!(concerns(&event(modified, &["/etc/sealgate/crl.pem"]), &names));
        assert!(concerns(&event(EventKind::Create(CreateKind::File), &["/etc/sealgate/clients.pem"]), &names));
        // A Kubernetes volume's swap of its `..data` link, and events that name nothing.
        assert!(concerns(&event(EventKind::Create(CreateKind::Any), &["/etc/sealgate/..data_tmp"]), &names));
        assert!(concerns(&event(modified, &[]), &names));
        assert!(concerns(&Err(notify::Error::generic("queue overflow")), &names));
        let mut rescan = event(modified, &["/etc/sealgate/access.log"]).unwrap();
        rescan.attrs.set_flag(Flag::Rescan);
        assert!(concerns(&Ok(rescan), &names));
        // Other files of the directory (a log written beside them), and reads, do not.
        assert!(!concerns(&event(modified, &["/etc/sealgate/access.log"]), &names));
        assert!(!concerns(&event(modified, &["/etc/sealgate/crl.pem.bak"]), &names));
        assert!(!concerns(
            &event(EventKind::Access(notify::event::AccessKind::Any), &["/etc/sealgate/crl.pem"]),
            &names
        ));
    }
}
