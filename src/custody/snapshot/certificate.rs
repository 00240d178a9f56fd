//! `certificates/<certificate_id>/`: the chain and the sealed key, read and parsed but not judged.
//!
//! A file that is missing or does not parse refuses its association under [`Check::Files`]; checks 2 to 5 then
//! work on what is extracted here.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use aws_lc_rs::digest::{digest, SHA256};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use super::{reason, Check, Refusal};
use crate::custody::format::{layout, FormatError, SealedKey};

/// Why a certificate directory's file is unusable. Messages name the file and the rule; certificate files are
/// public, but PEM and DER are still never quoted (a misplaced private key block must not reach a log).
#[derive(Debug, thiserror::Error)]
pub(super) enum FileError {
    /// The file does not exist (or is a dangling link).
    #[error("{}: no such file", path.display())]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// The file exists but cannot be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// `certificate.pem` has no `CERTIFICATE` block.
    #[error("{}: holds no CERTIFICATE block", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// `certificate.pem` is not well-formed PEM.
    #[error("{}: is not well-formed PEM ({problem})", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong, in fixed words.
        problem: &'static str,
    },
    /// A `CERTIFICATE` block is not an X.509 certificate, or its subjectAltName does not parse.
    #[error("{}: certificate {index} of the chain {problem}", path.display())]
    NotX509 {
        /// The file.
        path: PathBuf,
        /// 1-based position in the chain (1 is the leaf).
        index: usize,
        /// What is wrong.
        problem: String,
    },
    /// `private-key.sealed` does not parse.
    #[error("{}: {source}", path.display())]
    SealedKey {
        /// The file.
        path: PathBuf,
        /// The rule it breaks.
        source: FormatError,
    },
}

/// What the checks need of the leaf certificate, copied out of the parse so that the chain can be moved.
pub(super) struct Leaf {
    /// DNS subjectAltNames, normalised, repeats dropped.
    pub(super) dns_names: Vec<String>,
    pub(super) not_before: OffsetDateTime,
    pub(super) not_after: OffsetDateTime,
    /// The SubjectPublicKeyInfo, DER with its outer SEQUENCE, as rustls renders a signing key's public key.
    pub(super) spki: Vec<u8>,
    pub(super) sha256: [u8; 32],
}

/// One certificate directory, read and parsed.
pub(super) struct CertificateFiles {
    pub(super) certificate_path: PathBuf,
    pub(super) sealed_key_path: PathBuf,
    /// Leaf first, then intermediates, all X.509.
    pub(super) chain: Vec<CertificateDer<'static>>,
    pub(super) leaf: Leaf,
    pub(super) sealed_key: SealedKey,
}

impl CertificateFiles {
    /// Reads `certificates_dir/<certificate_id>/`. `certificate_id` must be a valid id.
    pub(super) fn read(certificates_dir: &Path, certificate_id: &str) -> Result<Self, Refusal> {
        let dir = certificates_dir.join(certificate_id);
        let certificate_path = dir.join(layout::CERTIFICATE_PEM);
        let sealed_key_path = dir.join(layout::SEALED_KEY);
        let (chain, leaf) = read_chain(&certificate_path)
            .map_err(|e| Refusal::new(Check::Files, reason::CERTIFICATE_FILE, e.to_string()))?;
        let sealed_key = read_sealed_key(&sealed_key_path, certificate_id)
            .map_err(|e| Refusal::new(Check::Files, reason::SEALED_KEY_FILE, e.to_string()))?;
        Ok(Self { certificate_path, sealed_key_path, chain, leaf, sealed_key })
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, FileError> {
    std::fs::read(path).map_err(|source| match source.kind() {
        ErrorKind::NotFound => FileError::Missing { path: path.to_owned() },
        _ => FileError::Io { path: path.to_owned(), source },
    })
}

/// Reads `certificate.pem`: every `CERTIFICATE` block, each an X.509 certificate, the first being the leaf.
fn read_chain(path: &Path) -> Result<(Vec<CertificateDer<'static>>, Leaf), FileError> {
    let pem = read_file(path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| FileError::Pem { path: path.to_owned(), problem: pem_problem(&e) })?;
    let not_x509 = |index, problem| FileError::NotX509 { path: path.to_owned(), index, problem };
    let mut certificates = chain.iter().enumerate();
    let Some((_, leaf)) = certificates.next() else {
        return Err(FileError::NoCertificate { path: path.to_owned() });
    };
    let leaf = leaf_facts(leaf).map_err(|problem| not_x509(1, problem))?;
    for (index, intermediate) in certificates {
        parse_x509(intermediate).map_err(|problem| not_x509(index + 1, problem))?;
    }
    Ok((chain, leaf))
}

/// A PEM error in fixed words: the library's own messages quote the offending line.
fn pem_problem(error: &pem::Error) -> &'static str {
    match error {
        pem::Error::MissingSectionEnd { .. } => "a block has no END line",
        pem::Error::IllegalSectionStart { .. } => "a BEGIN line is malformed",
        pem::Error::Base64Decode(_) => "a block is not valid base64",
        pem::Error::SectionTooLarge => "a block is too large",
        _ => "unreadable PEM",
    }
}

/// Parses one DER certificate, refusing trailing bytes.
fn parse_x509(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    match X509Certificate::from_der(der) {
        Ok((rest, _)) if !rest.is_empty() => Err("has bytes after the certificate".to_owned()),
        Ok((_, certificate)) => Ok(certificate),
        Err(e) => Err(format!("is not an X.509 certificate ({e})")),
    }
}

/// Extracts what the checks need of the leaf.
fn leaf_facts(der: &CertificateDer<'_>) -> Result<Leaf, String> {
    let certificate = parse_x509(der)?;
    let san = certificate
        .subject_alternative_name()
        .map_err(|e| format!("has a malformed or repeated subjectAltName extension ({e})"))?;
    let dns_names: Vec<&str> = san
        .iter()
        .flat_map(|ext| &ext.value.general_names)
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(*dns),
            _ => None,
        })
        .collect();
    let validity = certificate.validity();
    Ok(Leaf {
        dns_names: super::normalized_names(&dns_names),
        not_before: validity.not_before.to_datetime(),
        not_after: validity.not_after.to_datetime(),
        spki: certificate.public_key().raw.to_vec(),
        sha256: sha256(der),
    })
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    // A SHA-256 digest is 32 bytes: the zip copies all of it.
    for (o, b) in out.iter_mut().zip(digest(&SHA256, bytes).as_ref()) {
        *o = *b;
    }
    out
}

/// Reads `private-key.sealed`, which must name its own directory.
fn read_sealed_key(path: &Path, certificate_id: &str) -> Result<SealedKey, FileError> {
    let bytes = read_file(path)?;
    SealedKey::parse(&bytes, certificate_id).map_err(|source| FileError::SealedKey { path: path.to_owned(), source })
}
