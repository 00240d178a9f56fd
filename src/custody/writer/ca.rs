//! The local certificate authority that signs the certificates `issue` and `renew` create.
//!
//! It is a single self-signed ECDSA P-256 root, "sealgate local custody CA". Its private key is sealed in the
//! state under the master key; its certificate is what clients of a demo or a test trust (`sealgate custody ca`).

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use super::error::{CustodyError, Result};
use super::keys::{EcdsaSigner, PublicKey};
use crate::secret::SecretBytes;

/// The CA's common name.
pub const CA_COMMON_NAME: &str = "sealgate local custody CA";

/// How long the CA is valid: long enough that no certificate it signs outlives it in practice.
const CA_LIFETIME: Duration = Duration::days(100 * 365);

/// The local CA, ready to sign.
pub(super) struct LocalCa {
    /// The CA certificate.
    pub certificate_pem: String,
    issuer: Issuer<'static, EcdsaSigner>,
    /// CRL distribution point written into every certificate issued, if set (`sealgate custody ca --crl-url`).
    pub crl_url: Option<String>,
}

/// The CA certificate's parameters. Also used to rebuild the issuer when the CA is loaded: rcgen takes the
/// issuer's name and key identifier method from these, and they must equal what the certificate says.
fn ca_params(not_before: OffsetDateTime, not_after: OffsetDateTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, CA_COMMON_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = not_before;
    params.not_after = not_after;
    params
}

impl LocalCa {
    /// Creates a new CA; returns it and its private key's PKCS#8 DER, to be sealed into the state.
    pub fn create(now: OffsetDateTime) -> Result<(Self, SecretBytes)> {
        let (signer, pkcs8) = EcdsaSigner::generate()?;
        let mut params = ca_params(now - Duration::hours(1), now + CA_LIFETIME);
        params.serial_number = Some(random_serial()?);
        let certificate = params.self_signed(&signer).map_err(|source| certificate_error("local CA", source))?;
        let ca = Self { certificate_pem: certificate.pem(), issuer: Issuer::new(params, signer), crl_url: None };
        Ok((ca, pkcs8))
    }

    /// Loads the CA from its certificate and its private key.
    pub fn load(certificate_pem: String, pkcs8: &SecretBytes) -> Result<Self> {
        let signer = EcdsaSigner::from_pkcs8(pkcs8)?;
        // The validity of the issuer's parameters is not used when signing other certificates.
        let params = ca_params(OffsetDateTime::UNIX_EPOCH, OffsetDateTime::UNIX_EPOCH);
        Ok(Self { certificate_pem, issuer: Issuer::new(params, signer), crl_url: None })
    }

    /// Signs a TLS server certificate for `names` (already validated) over `public_key`, returning its PEM.
    pub fn issue(
        &self,
        certificate_id: &str,
        names: &[String],
        public_key: &PublicKey,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<String> {
        let what = || format!("certificate {certificate_id}");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, first.as_str());
        }
        params.subject_alt_names = names
            .iter()
            .map(|n| Ok(SanType::DnsName(n.as_str().try_into()?)))
            .collect::<std::result::Result<_, rcgen::Error>>()
            .map_err(|source| certificate_error(&what(), source))?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        params.not_before = not_before;
        params.not_after = not_after;
        if let Some(url) = &self.crl_url {
            params.crl_distribution_points = vec![rcgen::CrlDistributionPoint { uris: vec![url.clone()] }];
        }
        let certificate =
            params.signed_by(public_key, &self.issuer).map_err(|source| certificate_error(&what(), source))?;
        Ok(certificate.pem())
    }
}

fn certificate_error(what: &str, source: rcgen::Error) -> CustodyError {
    CustodyError::Certificate { what: what.to_owned(), source }
}

/// A random positive 128-bit serial number (RFC 5280 allows up to 20 octets; the top bit is cleared so that the
/// DER INTEGER stays positive without padding).
fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}
