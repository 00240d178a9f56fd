//! Certificate chains: parsed once, checked, and normalised to plain PEM (leaf first) for the exports.

use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;

use super::error::{CustodyError, Result};
use super::pem;
use crate::names;

/// A parsed certificate chain.
#[derive(Debug, Clone)]
pub(super) struct Chain {
    /// Leaf first, then intermediates.
    pub ders: Vec<CertificateDer<'static>>,
    /// The same certificates, re-encoded as PEM (no text around the blocks).
    pub pem: String,
    /// The leaf's DNS subject alternative names, normalised.
    pub dns_names: Vec<String>,
    /// The leaf's validity.
    pub not_before: OffsetDateTime,
    /// The leaf's validity.
    pub not_after: OffsetDateTime,
}

fn chain_error(reason: impl Into<String>) -> CustodyError {
    CustodyError::Chain(reason.into())
}

impl Chain {
    /// Parses the `CERTIFICATE` blocks of a PEM file; other blocks (a private key in the same file, say) are
    /// skipped without being decoded. The leaf must carry at least one DNS name: holders serve by those.
    pub fn from_pem(pem_bytes: &[u8]) -> Result<Self> {
        let text = std::str::from_utf8(pem_bytes).map_err(|_| chain_error("the file is not PEM text"))?;
        let blocks = pem::blocks(text).map_err(chain_error)?;
        let ders = blocks
            .iter()
            .filter(|b| b.label == "CERTIFICATE")
            .map(|b| b.decode().map(CertificateDer::from).map_err(chain_error))
            .collect::<Result<Vec<_>>>()?;
        let leaf = ders.first().ok_or_else(|| chain_error("the file holds no CERTIFICATE block"))?;
        for (index, der) in ders.iter().enumerate().skip(1) {
            parse(der).map_err(|reason| chain_error(format!("certificate {} of the chain: {reason}", index + 1)))?;
        }
        let (dns_names, not_before, not_after) =
            leaf_facts(leaf).map_err(|reason| chain_error(format!("the leaf certificate: {reason}")))?;
        if dns_names.is_empty() {
            return Err(chain_error(
                "the leaf certificate has no DNS subject alternative name; holders serve certificates by those names",
            ));
        }
        let pem = ders.iter().map(|der| pem::encode("CERTIFICATE", der)).collect();
        Ok(Self { ders, pem, dns_names, not_before, not_after })
    }
}

fn parse(der: &[u8]) -> std::result::Result<x509_parser::certificate::X509Certificate<'_>, String> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], certificate)) => Ok(certificate),
        Ok(_) => Err("trailing bytes after the certificate".to_owned()),
        Err(e) => Err(format!("does not parse as X.509: {e}")),
    }
}

/// The leaf's normalised DNS names (duplicates removed, order kept) and validity.
fn leaf_facts(der: &[u8]) -> std::result::Result<(Vec<String>, OffsetDateTime, OffsetDateTime), String> {
    let certificate = parse(der)?;
    let mut dns_names: Vec<String> = Vec::new();
    let san = certificate.subject_alternative_name().map_err(|e| format!("bad subject alternative names: {e}"))?;
    for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
        if let GeneralName::DNSName(name) = name {
            let name = names::normalize(name);
            if !dns_names.contains(&name) {
                dns_names.push(name);
            }
        }
    }
    let validity = certificate.validity();
    Ok((dns_names, validity.not_before.to_datetime(), validity.not_after.to_datetime()))
}
