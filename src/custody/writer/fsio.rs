//! Files written the way FORMAT.md requires: every file is replaced atomically, so that a reader sees either the
//! old or the new contents, never a mix.
//!
//! A write goes to a temporary file in the same directory whose name starts with `.` (readers never read
//! dot-names), is flushed to disk, given its final mode and renamed over the target; the directory is then
//! flushed so that the rename itself survives a crash. A failed write removes its temporary file.

use std::fs::{self, DirBuilder, File, Permissions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::error::{CustodyError, Result};
use crate::secret::SecretBytes;

/// Mode of files that hold secrets, or sealed secrets (the whole state directory, grant files of exports).
pub(crate) const SECRET_FILE_MODE: u32 = 0o600;
/// Mode of files any local reader may need (certificates, sealed keys, `associations.toml`).
pub(crate) const PUBLIC_FILE_MODE: u32 = 0o644;
/// Mode of the state directory and its subdirectories.
pub(crate) const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of the directories created in an export.
pub(crate) const PUBLIC_DIR_MODE: u32 = 0o755;

/// Prefix of temporary files: a dot-name, which readers of an export skip.
const TEMP_PREFIX: &str = ".tmp-";

/// Replaces `path` with `contents` atomically, with permission bits `mode`.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    publish(vec![stage(path, contents, mode)?])
}

/// A file written and flushed under a temporary name beside its destination, not yet renamed into place.
/// Dropped unpublished, its temporary file is removed.
pub(crate) struct Staged {
    temp: tempfile::NamedTempFile,
    path: PathBuf,
}

/// Writes `contents` with permission bits `mode` to a temporary file beside `path`, flushed, for [`publish`].
pub(crate) fn stage(path: &Path, contents: &[u8], mode: u32) -> Result<Staged> {
    let dir = parent_of(path);
    let mut temp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(dir)
        .map_err(|e| CustodyError::io(dir, "create a temporary file in", e))?;
    // Set the mode on the open file rather than at creation, so that the umask cannot narrow or widen it.
    temp.as_file()
        .set_permissions(Permissions::from_mode(mode))
        .map_err(|e| CustodyError::io(temp.path(), "set the permissions of", e))?;
    temp.write_all(contents).map_err(|e| CustodyError::io(temp.path(), "write", e))?;
    temp.as_file().sync_all().map_err(|e| CustodyError::io(temp.path(), "flush", e))?;
    Ok(Staged { temp, path: path.to_owned() })
}

/// Renames staged files into place, in order and back to back, then flushes their directories. Each file is
/// replaced atomically; together they change within microseconds of each other however long writing them
/// took, so that a holder reading meanwhile rarely sees some changed and others not (FORMAT.md asks it to ride
/// that out, but each such read costs it a retry).
pub(crate) fn publish(staged: Vec<Staged>) -> Result<()> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for Staged { temp, path } in staged {
        temp.persist(&path).map_err(|e| CustodyError::io(&path, "rename a temporary file onto", e.error))?;
        let dir = parent_of(&path);
        if !dirs.iter().any(|d| d == dir) {
            dirs.push(dir.to_owned());
        }
    }
    dirs.iter().try_for_each(|dir| sync_dir(dir))
}

/// Flushes a directory, making the renames and removals in it durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| CustodyError::io(dir, "flush the directory", e))
}

/// The directory a file lives in (`.` for a bare file name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// Creates `path` and its missing parents with permission bits `mode` (narrowed by the umask).
pub(crate) fn create_dir_all(path: &Path, mode: u32) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|e| CustodyError::io(path, "create the directory", e))
}

/// Reads a whole file; `None` when it does not exist.
pub(crate) fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CustodyError::io(path, "read", e)),
    }
}

/// Reads a whole file that must exist.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| CustodyError::io(path, "read", e))
}

/// Reads a file that holds a secret into a wiped buffer sized up front, so that reading never reallocates (a
/// reallocation would leave an unwiped copy behind).
pub(crate) fn read_secret_file(path: &Path) -> Result<SecretBytes> {
    let mut file = File::open(path).map_err(|e| CustodyError::io(path, "open", e))?;
    let len = file.metadata().map_err(|e| CustodyError::io(path, "read the metadata of", e))?.len();
    let len = usize::try_from(len).map_err(|_| CustodyError::state(path, "the file is too large"))?;
    // One spare byte, so that the read that finds the end of the file has room and needs no growth.
    let mut buffer = SecretBytes::with_capacity(len + 1);
    file.read_to_end(buffer.buffer_mut()).map_err(|e| CustodyError::io(path, "read", e))?;
    Ok(buffer)
}

/// Removes a file; a file that is already gone is fine.
pub(crate) fn remove_file_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CustodyError::io(path, "remove", e)),
    }
}

/// Removes an empty directory; a directory that is already gone is fine.
pub(crate) fn remove_dir_if_exists(path: &Path) -> Result<()> {
    match fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CustodyError::io(path, "remove the directory", e)),
    }
}

/// The stems of the `*.toml` files of `dir`, sorted, skipping dot-names; empty when `dir` does not exist.
pub(crate) fn toml_stems(dir: &Path) -> Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(CustodyError::io(dir, "list", e)),
    };
    let mut stems = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| CustodyError::io(dir, "list", e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stem) = name.strip_suffix(".toml").filter(|s| !s.is_empty() && !name.starts_with('.')) {
            stems.push(stem.to_owned());
        }
    }
    stems.sort();
    Ok(stems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_set_the_mode_and_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        write_atomic(&path, b"one", SECRET_FILE_MODE).unwrap();
        write_atomic(&path, b"two", PUBLIC_FILE_MODE).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, PUBLIC_FILE_MODE);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["file"]);
    }

    #[test]
    fn a_failed_write_removes_its_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // Renaming a file onto a non-empty directory fails after the temporary file was written.
        let target = dir.path().join("occupied");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("x"), b"x").unwrap();
        let err = write_atomic(&target, b"data", PUBLIC_FILE_MODE).unwrap_err();
        assert!(err.to_string().contains("occupied"), "{err}");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["occupied"]);
    }

    #[test]
    fn toml_stems_skip_dot_names_and_other_files() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.toml", "a.toml", ".tmp-x.toml", "c.txt", ".toml"] {
            fs::write(dir.path().join(name), b"").unwrap();
        }
        assert_eq!(toml_stems(dir.path()).unwrap(), ["a", "b"]);
        assert!(toml_stems(&dir.path().join("missing")).unwrap().is_empty());
    }
}
