//! `certificates/<certificate_id>/`: the chain and the sealed key, parsed but not judged.
//!
//! Both files are public (the key is sealed), so what is parsed out of them is cached across reads. A file that
//! is missing or does not parse refuses its association under [`Check::Files`]; checks 2 to 5 then work on what
//! is extracted here.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use super::cache::{self, sha256};
use super::{reason, Check, Refusal};
use crate::custody::format::{layout, FormatError, SealedKey};

/// Why a certificate directory's file does not parse. Messages name the file and the rule; certificate files
/// are public, but PEM and DER are still never quoted (a misplaced private key block must not reach a log).
#[derive(Debug, thiserror::Error)]
pub(super) enum FileError {
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

/// What the checks need of the leaf certificate, copied out of its X.509 parse.
pub(super) struct Leaf {
    /// DNS subjectAltNames, normalised, repeats dropped.
    pub(super) dns_names: Vec<String>,
    pub(super) not_before: OffsetDateTime,
    pub(super) not_after: OffsetDateTime,
    /// The SubjectPublicKeyInfo, DER with its outer SEQUENCE, as rustls renders a signing key's public key.
    pub(super) spki: Vec<u8>,
    /// The public key's algorithm: which kind of private key to expect.
    pub(super) key_algorithm: KeyAlgorithm,
    pub(super) sha256: [u8; 32],
}

/// A leaf's public key algorithm, as far as choosing a private key parser goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyAlgorithm {
    Rsa,
    Ecdsa,
    Ed25519,
    Other,
}

/// A parsed `certificate.pem`.
pub(super) struct Chain {
    /// Leaf first, then intermediates, all X.509.
    pub(super) chain: Vec<CertificateDer<'static>>,
    pub(super) leaf: Leaf,
}

/// A cached `certificate.pem`: its chain, or why it is unusable (the message of a [`FileError`]).
pub(super) type ParsedChain = Result<Chain, String>;
/// A cached `private-key.sealed`: the sealed key, or why it is unusable (the message of a [`FileError`]).
pub(super) type ParsedSealedKey = Result<SealedKey, String>;

/// The paths of one certificate directory.
pub(super) struct CertificatePaths {
    pub(super) certificate: PathBuf,
    pub(super) sealed_key: PathBuf,
}

impl CertificatePaths {
    /// `certificates_dir/<certificate_id>/`'s two files. `certificate_id` must be a valid id.
    pub(super) fn new(certificates_dir: &Path, certificate_id: &str) -> Self {
        Self {
            certificate: file_path(certificates_dir, certificate_id, layout::CERTIFICATE_PEM),
            sealed_key: file_path(certificates_dir, certificate_id, layout::SEALED_KEY),
        }
    }
}

/// `dir/<id>/<name>`, in one allocation: every read builds two of these per association.
fn file_path(dir: &Path, id: &str, name: &str) -> PathBuf {
    let mut path = PathBuf::with_capacity(dir.as_os_str().len() + id.len() + name.len() + 2);
    path.push(dir);
    path.push(id);
    path.push(name);
    path
}

/// One certificate directory, parsed: what checks 2 to 5 work on.
pub(super) struct CertificateFiles<'a> {
    pub(super) certificate_path: &'a Path,
    pub(super) sealed_key_path: &'a Path,
    /// Leaf first, then intermediates, all X.509.
    pub(super) chain: &'a [CertificateDer<'static>],
    pub(super) leaf: &'a Leaf,
    pub(super) sealed_key: &'a SealedKey,
}

/// What one read found at a certificate directory's path.
pub(super) enum Found<'a, T> {
    /// The cached parse: the file's content, or why it does not parse.
    Cached(&'a Result<T, String>),
    /// The I/O error that kept the file from being read (`NotFound` for a missing file or a dangling link).
    Unreadable(&'a io::Error),
    /// The path was not refreshed in this read; cannot happen for an entry whose files were asked for.
    NotRead,
}

impl<'a> CertificateFiles<'a> {
    /// Puts together what was found at `paths`, refusing under [`Check::Files`] when either file is missing,
    /// unreadable or does not parse (the certificate first).
    pub(super) fn new(
        paths: &'a CertificatePaths,
        chain: Found<'a, Chain>,
        sealed_key: Found<'a, SealedKey>,
    ) -> Result<Self, Refusal> {
        let chain = usable(&paths.certificate, chain)
            .map_err(|detail| Refusal::new(Check::Files, reason::CERTIFICATE_FILE, detail))?;
        let sealed_key = usable(&paths.sealed_key, sealed_key)
            .map_err(|detail| Refusal::new(Check::Files, reason::SEALED_KEY_FILE, detail))?;
        Ok(Self {
            certificate_path: &paths.certificate,
            sealed_key_path: &paths.sealed_key,
            chain: &chain.chain,
            leaf: &chain.leaf,
            sealed_key,
        })
    }
}

/// The parsed file, or why it is unusable.
fn usable<'a, T>(path: &Path, found: Found<'a, T>) -> Result<&'a T, String> {
    match found {
        Found::Cached(Ok(parsed)) => Ok(parsed),
        Found::Cached(Err(message)) => Err(message.clone()),
        Found::Unreadable(error) if cache::is_missing(error) => Err(format!("{}: no such file", path.display())),
        Found::Unreadable(error) => Err(format!("{}: {error}", path.display())),
        Found::NotRead => Err(format!("{}: was not read", path.display())),
    }
}

/// Parses `certificate.pem`: every `CERTIFICATE` block, each an X.509 certificate, the first being the leaf.
pub(super) fn parse_chain(path: &Path, pem: &[u8]) -> ParsedChain {
    read_chain(path, pem).map(|(chain, leaf)| Chain { chain, leaf }).map_err(|e| e.to_string())
}

/// Parses `private-key.sealed`, which must name its own directory.
pub(super) fn parse_sealed_key(path: &Path, bytes: &[u8]) -> ParsedSealedKey {
    let certificate_id = path.parent().and_then(Path::file_name).and_then(OsStr::to_str).unwrap_or_default();
    SealedKey::parse(bytes, certificate_id)
        .map_err(|source| FileError::SealedKey { path: path.to_owned(), source }.to_string())
}

fn read_chain(path: &Path, pem: &[u8]) -> Result<(Vec<CertificateDer<'static>>, Leaf), FileError> {
    let chain = CertificateDer::pem_slice_iter(pem)
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

fn key_algorithm(certificate: &X509Certificate<'_>) -> KeyAlgorithm {
    use x509_parser::oid_registry::{OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519};
    let oid = &certificate.public_key().algorithm.algorithm;
    if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        KeyAlgorithm::Ecdsa
    } else if *oid == OID_PKCS1_RSAENCRYPTION {
        KeyAlgorithm::Rsa
    } else if *oid == OID_SIG_ED25519 {
        KeyAlgorithm::Ed25519
    } else {
        KeyAlgorithm::Other
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
        key_algorithm: key_algorithm(&certificate),
        sha256: sha256(der),
    })
}
