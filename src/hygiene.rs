//! Process hygiene for a process that holds private keys: keys must not reach a core dump, another user's
//! debugger, or swap; and nobody but their owner may change the files sealgate trusts.
//!
//! - core dumps off (`RLIMIT_CORE` 0) and the process not dumpable (`PR_SET_DUMPABLE` 0, which also closes
//!   `/proc/PID/mem` and ptrace to other processes of the same user);
//! - all memory locked (`mlockall`) where permitted: with `CAP_IPC_LOCK` or an unlimited `RLIMIT_MEMLOCK`. Under a
//!   smaller limit, locking future allocations would make them fail once the process outgrows the limit, so
//!   sealgate warns instead (systemd: `LimitMEMLOCK=infinity`). Every mapped page is made resident, not only the
//!   touched ones (`MCL_ONFAULT`): that would save about a quarter of an idle connection's memory, but costs about
//!   a sixth of proxied requests/s, since memory the allocator gives back and takes again then faults page by
//!   page (measured in `bench/README.md`);
//! - nobody else may change what sealgate trusts: a world-writable configuration file, export directory, export
//!   file or certificate directory, or CA or CRL file is refused.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustix::mm::{mlockall, MlockAllFlags};
use rustix::process::{getrlimit, set_dumpable_behavior, setrlimit, DumpableBehavior, Resource, Rlimit};

use crate::config::ProcessConfig;

/// A file or directory anyone may write to.
#[derive(Debug, thiserror::Error)]
#[error("{}: refusing a world-writable {what} (mode {mode:o}); run `chmod o-w` on it", path.display())]
pub struct WorldWritable {
    /// The offending path.
    pub path: PathBuf,
    /// What it is: "configuration file", "export directory", ...
    pub what: &'static str,
    /// Its permission bits.
    pub mode: u32,
}

/// Refuses `path` if it is world-writable, unless it sits on a read-only mount (Kubernetes mounts Secret and
/// ConfigMap volumes read-only with a mode-1777 root: nobody can write there). A missing path is not an error here
/// (the caller reports it).
pub fn refuse_world_writable(path: &Path, what: &'static str) -> Result<(), WorldWritable> {
    let Ok(metadata) = std::fs::metadata(path) else { return Ok(()) };
    let mode = metadata.permissions().mode();
    if mode & 0o002 == 0 || on_read_only_mount(path) {
        return Ok(());
    }
    Err(WorldWritable { path: path.to_owned(), what, mode: mode & 0o7777 })
}

/// Reads a file sealgate trusts (a CA or CRL file), refusing it, as an I/O error, when anyone may write to it.
pub fn read_trusted_file(path: &Path, what: &'static str) -> std::io::Result<Vec<u8>> {
    refuse_world_writable(path, what)
        .map_err(|insecure| std::io::Error::new(std::io::ErrorKind::PermissionDenied, insecure))?;
    std::fs::read(path)
}

fn on_read_only_mount(path: &Path) -> bool {
    rustix::fs::statvfs(path).is_ok_and(|fs| fs.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
}

/// Refuses an export whose directory, `grants/` or `certificates/` anyone may write to: anyone could then plant
/// or remove grants and certificates.
pub fn refuse_world_writable_export(export: &Path) -> Result<(), WorldWritable> {
    refuse_world_writable(export, "export directory")?;
    refuse_world_writable(&export.join("grants"), "export grants directory")?;
    refuse_world_writable(&export.join("certificates"), "export certificates directory")
}

/// What [`harden`] managed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hardened {
    /// Core dumps are off.
    pub no_core_dumps: bool,
    /// The process is not dumpable.
    pub not_dumpable: bool,
    /// All memory is locked.
    pub memory_locked: bool,
}

/// Applies `[process]`: no core dumps, not dumpable, locked memory. Failures are logged, never fatal: a process
/// that cannot lock memory should still serve (and say so).
pub fn harden(config: &ProcessConfig) -> Hardened {
    let no_core_dumps = if config.core_dumps {
        false
    } else {
        match setrlimit(Resource::Core, Rlimit { current: Some(0), maximum: Some(0) }) {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(%error, "cannot turn core dumps off");
                false
            }
        }
    };
    let not_dumpable = if config.dumpable {
        tracing::warn!(
            "[process] dumpable = true: the process memory (and its keys) can be read by same-user processes"
        );
        false
    } else {
        match set_dumpable_behavior(DumpableBehavior::NotDumpable) {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(%error, "cannot make the process non-dumpable");
                false
            }
        }
    };
    let memory_locked = config.lock_memory && lock_memory();
    Hardened { no_core_dumps, not_dumpable, memory_locked }
}

fn lock_memory() -> bool {
    let memlock = getrlimit(Resource::Memlock);
    let capable = rustix::thread::capabilities(None)
        .map(|caps| caps.effective.contains(rustix::thread::CapabilitySet::IPC_LOCK))
        .unwrap_or(false);
    if !capable && memlock.current.is_some() {
        tracing::warn!(
            limit = ?memlock.current,
            "cannot lock memory: RLIMIT_MEMLOCK is limited and CAP_IPC_LOCK is missing, so keys could reach swap \
             (systemd: LimitMEMLOCK=infinity, or AmbientCapabilities=CAP_IPC_LOCK)"
        );
        return false;
    }
    match mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE) {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(%error, "cannot lock memory; keys could reach swap");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn world_writable_paths_are_refused_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("proxy.toml");
        std::fs::write(&file, "").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(refuse_world_writable(&file, "configuration file").is_ok());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        let error = refuse_world_writable(&file, "configuration file").unwrap_err().to_string();
        assert!(error.contains("proxy.toml") && error.contains("world-writable") && error.contains("666"), "{error}");

        let export = dir.path().join("export");
        std::fs::create_dir_all(export.join("grants")).unwrap();
        assert!(refuse_world_writable_export(&export).is_ok());
        std::fs::set_permissions(export.join("grants"), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(refuse_world_writable_export(&export).unwrap_err().to_string().contains("grants"));
        assert!(refuse_world_writable(&dir.path().join("missing"), "x").is_ok());
    }
}
