//! [`Changes`]: which files of an export may have changed since the last read, as file events tell it.
//!
//! A read that re-examines every file costs one `stat` per file (three per association): 30,000 of them for
//! 10,000 certificates, a few hundred milliseconds on one core. File events name the paths they concern, so
//! after an event a read need only look at those, and at files it cannot trust anyway (new, missing, or with
//! timestamps too recent to trust: see [`super::snapshot`]'s cache). Everything else keeps its cached state.
//!
//! This trusts the events only as far as they are precise. Any event that names no path, names a path outside
//! the export's own layout (`associations.toml`, `grants/`, `certificates/`), or comes with a rescan flag or a
//! watcher error means "anything may have changed", and so does a new watch. Among them: a Kubernetes `..data`
//! symlink swap (the visible names never change; the event names `..data`), a deleted or recreated export, a
//! queue overflow. An event on a directory of the layout (renamed, deleted, recreated) makes every file under it
//! suspect. One exception: a regular file directly in the export whose name starts with a single dot (or which
//! is already gone) is the temporary file of an atomic replacement of `associations.toml` (FORMAT.md's writers
//! and ours write `.tmp-…` and rename it into place): the rename that publishes it names `associations.toml`.
//!
//! Events are not the only line: the periodic full read re-examines every file regardless, so an event that
//! never came costs at most one rescan interval, as it did before. The same bound holds for the one layout
//! these rules cannot see through: a file of the layout that is a symbolic link to a dot-named regular file in
//! the export's top directory, replaced by rename.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use crate::custody::format::layout;

/// What may have changed in one export since the last read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    /// The export the paths are in, as the watcher was given it.
    export: PathBuf,
    /// Anything may have changed: every file is examined.
    everything: bool,
    /// Files named by events, as `export.join(relative path)`. Looked up once per cached file on every read that
    /// uses these changes: foldhash, as the reader's cache.
    files: foldhash::HashSet<OsString>,
    /// Directories of the layout named by events: every file under them is suspect.
    directories: Vec<PathBuf>,
}

impl Changes {
    /// Nothing known to have changed, in `export`.
    pub fn none(export: &Path) -> Self {
        Self {
            export: export.to_owned(),
            everything: false,
            files: foldhash::HashSet::default(),
            directories: Vec::new(),
        }
    }

    /// Anything may have changed, in `export`.
    pub fn everything(export: &Path) -> Self {
        Self { everything: true, ..Self::none(export) }
    }

    /// Whether every file must be examined.
    pub fn is_everything(&self) -> bool {
        self.everything
    }

    /// Marks every file as possibly changed.
    pub fn add_everything(&mut self) {
        self.everything = true;
        self.files.clear();
        self.directories.clear();
    }

    /// Records that an event named `path`.
    pub fn add(&mut self, path: &Path) {
        if self.everything {
            return;
        }
        match classify(&self.export, path) {
            Some(Named::File(relative)) => {
                self.files.insert(self.export.join(relative).into_os_string());
            }
            Some(Named::Directory(relative)) => self.directories.push(self.export.join(relative)),
            None => self.add_everything(),
        }
    }

    /// Whether `path`, a file of `export`, may have changed. Paths of another export may all have changed.
    pub fn may_have_changed(&self, export: &Path, path: &Path) -> bool {
        if self.everything || export != self.export {
            return true;
        }
        self.files.contains(path.as_os_str()) || self.directories.iter().any(|dir| path.starts_with(dir))
    }
}

/// What events named, in the terms of the export's layout: the input of a read that judges only what they
/// concern (see [`crate::custody::snapshot::ExportReader::read_changes`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct InLayout {
    /// `associations.toml` was named.
    pub associations: bool,
    /// File names in `grants/` that were named (grant files or not: the reader tells).
    pub grant_files: Vec<OsString>,
    /// Names in `certificates/` whose directory, or a file in it, was named.
    pub certificate_dirs: Vec<OsString>,
}

impl Changes {
    /// What the events named, by place in the layout; `None` when anything may have changed: every file, or
    /// every file under `grants/` or `certificates/` (those directories themselves were named).
    pub fn in_layout(&self) -> Option<InLayout> {
        if self.everything {
            return None;
        }
        let mut named = InLayout::default();
        for directory in &self.directories {
            let relative = directory.strip_prefix(&self.export).ok()?;
            let mut components = relative.components();
            match (components.next(), components.next()) {
                (Some(Component::Normal(top)), Some(Component::Normal(name))) if top == layout::CERTIFICATES_DIR => {
                    named.certificate_dirs.push(name.to_owned());
                }
                _ => return None,
            }
        }
        for file in &self.files {
            let relative = Path::new(file).strip_prefix(&self.export).ok()?;
            let mut components = relative.components();
            let (Some(Component::Normal(top)), second) = (components.next(), components.next()) else {
                return None;
            };
            match second {
                None if top == layout::ASSOCIATIONS => named.associations = true,
                // A temporary file beside `associations.toml`: its rename names `associations.toml`.
                None => {}
                Some(Component::Normal(name)) if top == layout::GRANTS_DIR => named.grant_files.push(name.to_owned()),
                Some(Component::Normal(name)) if top == layout::CERTIFICATES_DIR => {
                    named.certificate_dirs.push(name.to_owned());
                }
                _ => return None,
            }
        }
        Some(named)
    }
}

/// What an event's path is, relative to the export.
#[derive(Debug, PartialEq, Eq)]
enum Named<'a> {
    /// A file of the layout (or anything deeper than the layout's files: never read, harmless).
    File(&'a Path),
    /// A directory of the layout: `grants`, `certificates`, `certificates/<id>`.
    Directory(&'a Path),
}

/// Places `path` in the export's layout; `None` when it is the export itself, outside it, or not part of the
/// layout (`..data` and the like).
fn classify<'a>(export: &Path, path: &'a Path) -> Option<Named<'a>> {
    let relative = path.strip_prefix(export).ok()?;
    let mut components = relative.components();
    let mut depth = 0;
    let first = match components.next()? {
        Component::Normal(first) => first,
        _ => return None,
    };
    for component in components {
        if !matches!(component, Component::Normal(_)) {
            return None;
        }
        depth += 1;
    }
    if depth == 0 && is_temporary_file(first, path) {
        return Some(Named::File(relative));
    }
    let is_directory = if first == layout::ASSOCIATIONS {
        if depth > 0 {
            return None;
        }
        false
    } else if first == layout::GRANTS_DIR {
        depth == 0
    } else if first == layout::CERTIFICATES_DIR {
        depth <= 1
    } else {
        return None;
    };
    Some(if is_directory { Named::Directory(relative) } else { Named::File(relative) })
}

/// Whether `name`, directly in the export at `path`, is an atomic replacement's temporary file: a single-dot name
/// that is a regular file (not a directory or a link something could resolve through) or already gone.
fn is_temporary_file(name: &std::ffi::OsStr, path: &Path) -> bool {
    let bytes = name.as_encoded_bytes();
    if !bytes.starts_with(b".") || bytes.starts_with(b"..") {
        return false;
    }
    match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata.file_type().is_file(),
        Err(error) => error.kind() == std::io::ErrorKind::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_files_and_directories_are_told_apart_and_anything_else_is_everything() {
        let export = Path::new("/srv/export");
        fn file(p: &str) -> Option<Named<'_>> {
            Some(Named::File(Path::new(p)))
        }
        fn dir(p: &str) -> Option<Named<'_>> {
            Some(Named::Directory(Path::new(p)))
        }
        assert_eq!(classify(export, Path::new("/srv/export/associations.toml")), file("associations.toml"));
        assert_eq!(classify(export, Path::new("/srv/export/grants/g-1.toml")), file("grants/g-1.toml"));
        assert_eq!(classify(export, Path::new("/srv/export/grants/.g-1.toml.tmp")), file("grants/.g-1.toml.tmp"));
        assert_eq!(
            classify(export, Path::new("/srv/export/certificates/c-1/key.toml")),
            file("certificates/c-1/key.toml")
        );
        assert_eq!(classify(export, Path::new("/srv/export/grants")), dir("grants"));
        assert_eq!(classify(export, Path::new("/srv/export/certificates")), dir("certificates"));
        assert_eq!(classify(export, Path::new("/srv/export/certificates/c-1")), dir("certificates/c-1"));
        for other in [
            "/srv/export",
            "/srv",
            "/srv/other",
            "/srv/export/..data",
            "/srv/export/..2026_11_28",
            "/srv/export/associations.toml/x",
            "/srv/export/README",
        ] {
            assert_eq!(classify(export, Path::new(other)), None, "{other}");
        }
    }

    #[test]
    fn a_temporary_file_in_the_top_directory_is_harmless_but_a_dot_directory_or_link_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let export = dir.path();
        std::fs::write(export.join(".tmp-abc"), "x").unwrap();
        std::fs::create_dir(export.join(".store")).unwrap();
        std::os::unix::fs::symlink(".store", export.join(".link")).unwrap();
        let named = |name: &str| classify(export, &export.join(name)).map(|_| ());
        assert_eq!(named(".tmp-abc"), Some(()));
        assert_eq!(named(".tmp-gone"), Some(()));
        assert_eq!(named(".store"), None);
        assert_eq!(named(".link"), None);
        assert_eq!(named("..data_tmp"), None);
        assert_eq!(named(".store/associations.toml"), None);
        let mut changes = Changes::none(export);
        changes.add(&export.join(".tmp-abc"));
        assert!(!changes.is_everything());
        assert!(!changes.may_have_changed(export, &export.join("associations.toml")));
    }

    #[test]
    fn named_changes_are_placed_in_the_layout_and_a_named_top_directory_is_everything() {
        let export = Path::new("/srv/export");
        let mut changes = Changes::none(export);
        assert_eq!(changes.in_layout(), Some(InLayout::default()));
        for path in [
            "/srv/export/associations.toml",
            "/srv/export/.tmp-1",
            "/srv/export/grants/g-1.toml",
            "/srv/export/certificates/c-1/certificate.pem",
            "/srv/export/certificates/c-2",
        ] {
            changes.add(Path::new(path));
        }
        let named = changes.in_layout().unwrap();
        assert!(named.associations);
        assert_eq!(named.grant_files, [OsString::from("g-1.toml")]);
        let mut dirs = named.certificate_dirs.clone();
        dirs.sort();
        assert_eq!(dirs, [OsString::from("c-1"), OsString::from("c-2")]);
        for top in ["/srv/export/grants", "/srv/export/certificates"] {
            let mut changes = Changes::none(export);
            changes.add(Path::new(top));
            assert_eq!(changes.in_layout(), None, "{top}");
        }
        assert_eq!(Changes::everything(export).in_layout(), None);
    }

    #[test]
    fn named_files_and_files_under_named_directories_may_have_changed() {
        let export = Path::new("/srv/export");
        let cert = Path::new("/srv/export/certificates/c-1/certificate.pem");
        let other_cert = Path::new("/srv/export/certificates/c-2/certificate.pem");
        let grant = Path::new("/srv/export/grants/g-1.toml");

        let mut changes = Changes::none(export);
        assert!(!changes.may_have_changed(export, cert));
        changes.add(grant);
        assert!(changes.may_have_changed(export, grant));
        assert!(!changes.may_have_changed(export, cert));

        changes.add(Path::new("/srv/export/certificates/c-1"));
        assert!(changes.may_have_changed(export, cert));
        assert!(!changes.may_have_changed(export, other_cert));
        // Another export's files are never trusted.
        assert!(changes.may_have_changed(Path::new("/srv/elsewhere"), other_cert));

        changes.add(Path::new("/srv/export/..data"));
        assert!(changes.is_everything());
        assert!(changes.may_have_changed(export, other_cert));
    }
}
