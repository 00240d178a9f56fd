//! Writing into an export directory (FORMAT.md, "Layout"), and the paths tests need to reach its files.
//!
//! Files that others read are replaced atomically one at a time, in an order that never lets a holder see an
//! association before the files it names: certificate and sealed key, then the grant, then `associations.toml`.
//! Grant files hold a grant key and are written 0600; the rest is 0644.

use std::path::{Path, PathBuf};

use super::error::{CustodyError, Result};
use super::fsio::{self, PUBLIC_DIR_MODE, PUBLIC_FILE_MODE, SECRET_FILE_MODE};
use crate::custody::format::{self, layout, Associations};

/// The paths of an export's files. Pure path arithmetic: nothing is read or checked, so tests can use it to
/// corrupt, replace or remove any file of an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportLayout {
    root: PathBuf,
}

impl ExportLayout {
    /// The layout of the export at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The export directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `associations.toml`.
    pub fn associations(&self) -> PathBuf {
        self.root.join(layout::ASSOCIATIONS)
    }

    /// `grants/`.
    pub fn grants_dir(&self) -> PathBuf {
        self.root.join(layout::GRANTS_DIR)
    }

    /// `grants/<grant_id>.toml`.
    pub fn grant(&self, grant_id: &str) -> PathBuf {
        self.grants_dir().join(format!("{grant_id}.{}", layout::GRANT_EXTENSION))
    }

    /// `certificates/`.
    pub fn certificates_dir(&self) -> PathBuf {
        self.root.join(layout::CERTIFICATES_DIR)
    }

    /// `certificates/<certificate_id>/`.
    pub fn certificate_dir(&self, certificate_id: &str) -> PathBuf {
        self.certificates_dir().join(certificate_id)
    }

    /// `certificates/<certificate_id>/certificate.pem`.
    pub fn certificate_pem(&self, certificate_id: &str) -> PathBuf {
        self.certificate_dir(certificate_id).join(layout::CERTIFICATE_PEM)
    }

    /// `certificates/<certificate_id>/private-key.sealed`.
    pub fn sealed_key(&self, certificate_id: &str) -> PathBuf {
        self.certificate_dir(certificate_id).join(layout::SEALED_KEY)
    }

    /// The files of one association, given its certificate (the grant's id is in `associations.toml`: see
    /// [`grant_id_of`]).
    pub fn certificate_paths(&self, certificate_id: &str) -> CertificatePaths {
        CertificatePaths {
            associations: self.associations(),
            certificate_dir: self.certificate_dir(certificate_id),
            certificate_pem: self.certificate_pem(certificate_id),
            sealed_key: self.sealed_key(certificate_id),
        }
    }
}

/// The files an association of one certificate involves, besides its grant file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificatePaths {
    /// `associations.toml`, which holds the association entry and its wrapped data key.
    pub associations: PathBuf,
    /// `certificates/<certificate_id>/`.
    pub certificate_dir: PathBuf,
    /// `certificates/<certificate_id>/certificate.pem`.
    pub certificate_pem: PathBuf,
    /// `certificates/<certificate_id>/private-key.sealed`.
    pub sealed_key: PathBuf,
}

/// The paths of the files of certificate `certificate_id` in the export at `export`.
pub fn export_paths(export: &Path, certificate_id: &str) -> CertificatePaths {
    ExportLayout::new(export).certificate_paths(certificate_id)
}

/// The grant id of the association of `certificate_id` in the export at `export`, read from its
/// `associations.toml`; `None` when there is no such association (or no `associations.toml`).
pub fn grant_id_of(certificate_id: &str, export: &Path) -> Result<Option<String>> {
    let associations = read_associations(&ExportLayout::new(export))?;
    Ok(associations.entries.into_iter().find(|e| e.certificate_id == certificate_id).map(|e| e.grant_id))
}

/// Reads `associations.toml`; an export without one has no associations. A file that does not parse is an
/// error: it is never overwritten, since its associations would be lost.
pub(super) fn read_associations(export: &ExportLayout) -> Result<Associations> {
    let path = export.associations();
    match fsio::read_optional(&path)? {
        None => Ok(Associations::default()),
        Some(bytes) => Associations::parse(&bytes).map_err(|source| CustodyError::Export { path, source }),
    }
}

pub(super) fn write_associations(export: &ExportLayout, associations: &Associations) -> Result<()> {
    fsio::publish(vec![stage_associations(export, associations)?])
}

/// `associations.toml`, staged for [`fsio::publish`].
pub(super) fn stage_associations(export: &ExportLayout, associations: &Associations) -> Result<fsio::Staged> {
    fsio::stage(&export.associations(), associations.render().as_bytes(), PUBLIC_FILE_MODE)
}

/// Creates the export's directories (and the export itself) as needed.
pub(super) fn create_dirs(export: &ExportLayout) -> Result<()> {
    fsio::create_dir_all(&export.grants_dir(), PUBLIC_DIR_MODE)?;
    fsio::create_dir_all(&export.certificates_dir(), PUBLIC_DIR_MODE)
}

/// Writes a certificate's chain, then its sealed key.
pub(super) fn write_certificate(export: &ExportLayout, chain_pem: &str, sealed: &format::SealedKey) -> Result<()> {
    fsio::publish(stage_certificate(export, chain_pem, sealed)?)
}

/// A certificate's chain and its sealed key, in that order, staged for [`fsio::publish`] (its directory is
/// created now).
pub(super) fn stage_certificate(
    export: &ExportLayout,
    chain_pem: &str,
    sealed: &format::SealedKey,
) -> Result<Vec<fsio::Staged>> {
    let certificate_id = &sealed.certificate_id;
    fsio::create_dir_all(&export.certificate_dir(certificate_id), PUBLIC_DIR_MODE)?;
    Ok(vec![
        fsio::stage(&export.certificate_pem(certificate_id), chain_pem.as_bytes(), PUBLIC_FILE_MODE)?,
        fsio::stage(&export.sealed_key(certificate_id), sealed.render().as_bytes(), PUBLIC_FILE_MODE)?,
    ])
}

/// Writes a grant file (0600: while active, it holds the grant key).
pub(super) fn write_grant(export: &ExportLayout, grant: &format::Grant) -> Result<()> {
    fsio::create_dir_all(&export.grants_dir(), PUBLIC_DIR_MODE)?;
    fsio::write_atomic(&export.grant(&grant.grant_id), grant.render().as_bytes(), SECRET_FILE_MODE)
}

/// Removes a certificate's files and its directory. Anything else a user put in that directory is left, and
/// the directory with it.
pub(super) fn remove_certificate(export: &ExportLayout, certificate_id: &str) -> Result<()> {
    fsio::remove_file_if_exists(&export.sealed_key(certificate_id))?;
    fsio::remove_file_if_exists(&export.certificate_pem(certificate_id))?;
    let dir = export.certificate_dir(certificate_id);
    match fsio::remove_dir_if_exists(&dir) {
        Err(CustodyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::DirectoryNotEmpty => Ok(()),
        other => other,
    }?;
    let parent = export.certificates_dir();
    if parent.is_dir() {
        fsio::sync_dir(&parent)?;
    }
    Ok(())
}
