//! Private keys: generation, import (PEM in PKCS#8, SEC1 or PKCS#1, normalised to PKCS#8 as FORMAT.md requires)
//! and the check that a key belongs to a certificate.
//!
//! Key pairs are generated and parsed with aws-lc-rs, whose PKCS#8 documents are wiped on drop and whose key
//! objects are cleansed when freed. rcgen only ever sees public keys (see [`PublicKey`]) and the CA's signer
//! (see [`EcdsaSigner`]): its own `KeyPair` keeps a copy of the private key in a plain `Vec` that is never wiped.

use std::fmt;
use std::str::FromStr;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize};
use aws_lc_rs::signature::{
    EcdsaKeyPair, EcdsaSigningAlgorithm, Ed25519KeyPair, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING,
    ECDSA_P384_SHA384_ASN1_SIGNING, ECDSA_P521_SHA512_ASN1_SIGNING,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};

use super::error::{CustodyError, Result};
use super::pem;
use crate::secret::SecretBytes;

/// The key pairs `issue` and `renew` can generate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyType {
    /// ECDSA on NIST P-256 with SHA-256: small, fast, universally supported.
    #[default]
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
    /// ECDSA on NIST P-384 with SHA-384.
    #[serde(rename = "ecdsa-p384")]
    EcdsaP384,
    /// RSA with a 2048-bit modulus (PKCS#1 v1.5 / PSS signatures).
    #[serde(rename = "rsa-2048")]
    Rsa2048,
    /// Ed25519.
    #[serde(rename = "ed25519")]
    Ed25519,
}

impl KeyType {
    /// Every key type, in the order of the command line's help.
    pub const ALL: [Self; 4] = [Self::EcdsaP256, Self::EcdsaP384, Self::Rsa2048, Self::Ed25519];

    /// The name used on the command line and in the state: `ecdsa-p256`, `ecdsa-p384`, `rsa-2048`, `ed25519`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EcdsaP256 => "ecdsa-p256",
            Self::EcdsaP384 => "ecdsa-p384",
            Self::Rsa2048 => "rsa-2048",
            Self::Ed25519 => "ed25519",
        }
    }

    fn signature_algorithm(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            Self::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            Self::Rsa2048 => &rcgen::PKCS_RSA_SHA256,
            Self::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        Self::ALL.into_iter().find(|k| k.as_str().eq_ignore_ascii_case(text)).ok_or_else(|| {
            let names: Vec<_> = Self::ALL.iter().map(|k| k.as_str()).collect();
            format!("unknown key type {text:?}; use one of {}", names.join(", "))
        })
    }
}

/// A public key as rcgen needs it to write a certificate's SubjectPublicKeyInfo.
pub(super) struct PublicKey {
    /// The raw public key: an uncompressed EC point, a PKCS#1 `RSAPublicKey`, or 32 Ed25519 bytes.
    raw: Vec<u8>,
    algorithm: &'static rcgen::SignatureAlgorithm,
}

impl rcgen::PublicKeyData for PublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.algorithm
    }
}

/// A freshly generated key pair: its PKCS#8 DER (wiped on drop) and its public key.
pub(super) struct GeneratedKey {
    pub pkcs8: SecretBytes,
    pub public_key: PublicKey,
}

/// Generates a key pair of type `key_type`.
pub(super) fn generate(key_type: KeyType) -> Result<GeneratedKey> {
    let failed = |_| CustodyError::KeyGeneration(key_type);
    let (pkcs8, raw) = match key_type {
        KeyType::EcdsaP256 | KeyType::EcdsaP384 => {
            let alg = ecdsa_algorithm(key_type);
            let pair = EcdsaKeyPair::generate(alg).map_err(failed)?;
            (secret_copy(pair.to_pkcs8v1().map_err(failed)?.as_ref()), pair.public_key().as_ref().to_vec())
        }
        KeyType::Rsa2048 => {
            let pair = RsaKeyPair::generate(KeySize::Rsa2048).map_err(failed)?;
            let der = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der<'static>>::as_der(&pair).map_err(failed)?;
            (secret_copy(der.as_ref()), pair.public_key().as_ref().to_vec())
        }
        KeyType::Ed25519 => {
            let pair = Ed25519KeyPair::generate().map_err(failed)?;
            (secret_copy(pair.to_pkcs8v1().map_err(failed)?.as_ref()), pair.public_key().as_ref().to_vec())
        }
    };
    Ok(GeneratedKey { pkcs8, public_key: PublicKey { raw, algorithm: key_type.signature_algorithm() } })
}

fn ecdsa_algorithm(key_type: KeyType) -> &'static EcdsaSigningAlgorithm {
    match key_type {
        KeyType::EcdsaP384 => &ECDSA_P384_SHA384_ASN1_SIGNING,
        _ => &ECDSA_P256_SHA256_ASN1_SIGNING,
    }
}

/// Copies secret bytes into a wiped buffer of exactly their size. The source (an aws-lc-rs document) wipes
/// itself when dropped.
fn secret_copy(bytes: &[u8]) -> SecretBytes {
    let mut secret = SecretBytes::with_capacity(bytes.len());
    secret.buffer_mut().extend_from_slice(bytes);
    secret
}

/// A private key read from PEM, as PKCS#8 DER.
pub(super) struct ImportedKey {
    /// PKCS#8 DER, wiped on drop.
    pub pkcs8: SecretBytes,
    /// What kind of key it is, e.g. `ecdsa-p256` or `rsa-3072`.
    pub description: String,
}

/// Reads the one private key of a PEM file: `PRIVATE KEY` (PKCS#8), `EC PRIVATE KEY` (SEC1) or
/// `RSA PRIVATE KEY` (PKCS#1); the latter two are converted to PKCS#8. Other blocks (certificates,
/// `EC PARAMETERS`) are ignored and never decoded.
pub(super) fn read_private_key_pem(pem_bytes: &[u8]) -> Result<ImportedKey> {
    let text = std::str::from_utf8(pem_bytes).map_err(|_| private_key_error("the file is not PEM text"))?;
    let blocks = pem::blocks(text).map_err(CustodyError::PrivateKey)?;
    let mut keys = blocks.iter().filter(|b| b.label.ends_with("PRIVATE KEY"));
    let block = keys.next().ok_or_else(|| private_key_error("the file holds no PRIVATE KEY block"))?;
    if keys.next().is_some() {
        return Err(private_key_error("the file holds more than one private key"));
    }
    if block.label == "ENCRYPTED PRIVATE KEY" || block.has_headers {
        return Err(private_key_error(
            "the key is encrypted; decrypt it first (e.g. `openssl pkey -in key.pem -out plain.pem`)",
        ));
    }
    let der = block.decode_secret().map_err(CustodyError::PrivateKey)?;
    match block.label {
        "PRIVATE KEY" => pkcs8_key(der),
        "EC PRIVATE KEY" => sec1_key(&der),
        "RSA PRIVATE KEY" => pkcs1_key(&der),
        other => Err(private_key_error(format!("unsupported PEM block {other:?}"))),
    }
}

fn private_key_error(reason: impl Into<String>) -> CustodyError {
    CustodyError::PrivateKey(reason.into())
}

fn pkcs8_key(der: SecretBytes) -> Result<ImportedKey> {
    let description = describe_pkcs8(der.expose())
        .ok_or_else(|| private_key_error("the PKCS#8 key is not an ECDSA (P-256, P-384, P-521), RSA or Ed25519 key"))?;
    Ok(ImportedKey { pkcs8: der, description })
}

fn sec1_key(der: &SecretBytes) -> Result<ImportedKey> {
    for (alg, description) in [
        (&ECDSA_P256_SHA256_ASN1_SIGNING, "ecdsa-p256"),
        (&ECDSA_P384_SHA384_ASN1_SIGNING, "ecdsa-p384"),
        (&ECDSA_P521_SHA512_ASN1_SIGNING, "ecdsa-p521"),
    ] {
        if let Ok(pair) = EcdsaKeyPair::from_private_key_der(alg, der.expose()) {
            let pkcs8 = pair.to_pkcs8v1().map_err(|_| private_key_error("cannot convert the EC key to PKCS#8"))?;
            return Ok(ImportedKey { pkcs8: secret_copy(pkcs8.as_ref()), description: description.to_owned() });
        }
    }
    Err(private_key_error("the EC PRIVATE KEY is not a P-256, P-384 or P-521 key"))
}

fn pkcs1_key(der: &SecretBytes) -> Result<ImportedKey> {
    let pair =
        RsaKeyPair::from_der(der.expose()).map_err(|_| private_key_error("the RSA PRIVATE KEY does not parse"))?;
    let pkcs8 = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der<'static>>::as_der(&pair)
        .map_err(|_| private_key_error("cannot convert the RSA key to PKCS#8"))?;
    Ok(ImportedKey {
        pkcs8: secret_copy(pkcs8.as_ref()),
        description: format!("rsa-{}", pair.public_modulus_len() * 8),
    })
}

/// Names the kind of a PKCS#8 key, or `None` when rustls could not sign with it.
fn describe_pkcs8(der: &[u8]) -> Option<String> {
    for (alg, description) in [
        (&ECDSA_P256_SHA256_ASN1_SIGNING, "ecdsa-p256"),
        (&ECDSA_P384_SHA384_ASN1_SIGNING, "ecdsa-p384"),
        (&ECDSA_P521_SHA512_ASN1_SIGNING, "ecdsa-p521"),
    ] {
        if EcdsaKeyPair::from_pkcs8(alg, der).is_ok() {
            return Some(description.to_owned());
        }
    }
    if let Ok(pair) = RsaKeyPair::from_pkcs8(der) {
        return Some(format!("rsa-{}", pair.public_modulus_len() * 8));
    }
    Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).ok().map(|_| "ed25519".to_owned())
}

/// Checks that the PKCS#8 key `pkcs8` is the private key of `chain`'s leaf (the holder's check 4), comparing
/// SubjectPublicKeyInfos as rustls does. The DER is borrowed, never handed to a type that does not wipe it.
pub(super) fn check_key_matches(chain: &[CertificateDer<'static>], pkcs8: &SecretBytes) -> Result<()> {
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.expose()));
    let key = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der)
        .map_err(|e| private_key_error(format!("rustls cannot use it: {e}")))?;
    match CertifiedKey::new(chain.to_vec(), key).keys_match() {
        Ok(()) => Ok(()),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => Err(CustodyError::KeyMismatch),
        Err(e) => Err(private_key_error(format!("cannot compare it with the leaf certificate: {e}"))),
    }
}

/// The local CA's ECDSA P-256 key as an rcgen signer. aws-lc-rs holds the key (and cleanses it when freed);
/// rcgen only calls [`rcgen::SigningKey::sign`].
pub(super) struct EcdsaSigner {
    pair: EcdsaKeyPair,
}

impl EcdsaSigner {
    /// Generates a P-256 key; returns the signer and its PKCS#8 DER (to be sealed into the state).
    pub fn generate() -> Result<(Self, SecretBytes)> {
        let key = generate(KeyType::EcdsaP256)?;
        let signer = Self::from_pkcs8(&key.pkcs8)?;
        Ok((signer, key.pkcs8))
    }

    /// Loads the signer from its PKCS#8 DER.
    pub fn from_pkcs8(pkcs8: &SecretBytes) -> Result<Self> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.expose())
            .map_err(|_| private_key_error("the local CA's key is not an ECDSA P-256 PKCS#8 key"))?;
        Ok(Self { pair })
    }
}

impl rcgen::PublicKeyData for EcdsaSigner {
    fn der_bytes(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for EcdsaSigner {
    fn sign(&self, message: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        let signature = self.pair.sign(&SystemRandom::new(), message).map_err(|_| rcgen::Error::RingUnspecified)?;
        Ok(signature.as_ref().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_type_names_round_trip() {
        for key_type in KeyType::ALL {
            assert_eq!(key_type.as_str().parse::<KeyType>().unwrap(), key_type);
        }
        assert_eq!("ECDSA-P256".parse::<KeyType>().unwrap(), KeyType::EcdsaP256);
        assert!("dsa".parse::<KeyType>().unwrap_err().contains("ed25519"));
    }

    #[test]
    fn generated_keys_are_pkcs8_that_rustls_accepts() {
        for key_type in KeyType::ALL {
            let key = generate(key_type).unwrap();
            let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.pkcs8.expose()));
            assert!(rustls::crypto::aws_lc_rs::sign::any_supported_type(&der).is_ok(), "{key_type}");
            assert_eq!(describe_pkcs8(key.pkcs8.expose()).as_deref(), Some(key_type.as_str()));
        }
    }

    #[test]
    fn sec1_keys_become_pkcs8() {
        let pair = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_ASN1_SIGNING).unwrap();
        let sec1 = AsDer::<aws_lc_rs::encoding::EcPrivateKeyRfc5915Der<'static>>::as_der(&pair.private_key()).unwrap();
        let text = format!(
            "-----BEGIN EC PARAMETERS-----\nBgUrgQQAIg==\n-----END EC PARAMETERS-----\n{}",
            pem::encode("EC PRIVATE KEY", sec1.as_ref())
        );
        let key = read_private_key_pem(text.as_bytes()).unwrap();
        assert_eq!(key.description, "ecdsa-p384");
        let again = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, key.pkcs8.expose()).unwrap();
        assert_eq!(again.public_key().as_ref(), pair.public_key().as_ref());
    }

    #[test]
    fn unusable_key_files_are_refused_without_quoting_them() {
        let cases: [(&[u8], &str); 5] = [
            (b"", "no PRIVATE KEY"),
            (b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nc2VjcmV0\n-----END ENCRYPTED PRIVATE KEY-----\n", "encrypted"),
            (b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n", "not an ECDSA"),
            (b"-----BEGIN RSA PRIVATE KEY-----\nc2VjcmV0\n-----END RSA PRIVATE KEY-----\n", "does not parse"),
            (b"\xff\xfe", "not PEM"),
        ];
        for (text, needle) in cases {
            let err = match read_private_key_pem(text) {
                Err(err) => err.to_string(),
                Ok(_) => panic!("accepted {needle}"),
            };
            assert!(err.contains(needle) && !err.contains("c2VjcmV0"), "{err}");
        }
    }
}
