//! Checks 2 to 5 of FORMAT.md, on an association whose grant passed check 1 and whose files were read.
//!
//! Each function does one check and refuses with its fixed [`reason`] phrase; details name the file or name at
//! fault and the rule broken, and never a byte of key material.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::aws_lc_rs::sign::{any_ecdsa_type, any_eddsa_type, any_supported_type, RsaSigningKey};
use rustls::sign::SigningKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::certificate::{CertificateFiles, KeyAlgorithm, Leaf};
use super::grants::{Authorized, GrantFacts};
use super::{reason, Check, Refusal};
use crate::custody::format::{AssociationEntry, FormatError};
use crate::custody::seal::{data_key_aad, open_private_key, sealed_key_aad, unwrap_data_key};
use crate::names;
use crate::secret::{SecretBytes, SecretKey32};

/// Check 2: the data key was generated under the KMS key the grant is on.
pub(super) fn key_ids(grant: &Authorized<'_>, files: &CertificateFiles<'_>) -> Result<(), Refusal> {
    if grant.grant.key_id == files.sealed_key.key_id {
        return Ok(());
    }
    let detail = format!(
        "{}: `key_id` is {:?}, grant {} is on {:?}",
        files.sealed_key_path.display(),
        files.sealed_key.key_id,
        grant.grant.grant_id,
        grant.grant.key_id
    );
    Err(Refusal::new(Check::KeyId, reason::KEY_ID_MISMATCH, detail))
}

/// Check 3: unwraps the data key with the grant key (associated data naming the *grant's* `key_id`), then opens
/// the private key with it. The data key is wiped when this returns; the private key is returned in a wiped
/// buffer.
pub(super) fn open_seals(
    grant: &GrantFacts,
    grant_key: &SecretKey32,
    entry: &AssociationEntry,
    associations_path: &Path,
    files: &CertificateFiles<'_>,
) -> Result<SecretBytes, Refusal> {
    let data_key_refusal = |rule: String| {
        let detail = format!("{}: `wrapped_data_key` of {}: {rule}", associations_path.display(), entry.certificate_id);
        Refusal::new(Check::Seal, reason::DATA_KEY_SEAL, detail)
    };
    // The format error already names the field; keep only its rule.
    let wrapped = entry.wrapped_data_key().map_err(|e| data_key_refusal(field_rule(&e)))?;
    let aad = data_key_aad(&grant.grant_id, &entry.certificate_id, &grant.key_id);
    let data_key = unwrap_data_key(grant_key, &wrapped, &aad).map_err(|e| data_key_refusal(e.to_string()))?;

    let sealed = files.sealed_key;
    let aad = sealed_key_aad(&sealed.certificate_id, &sealed.key_id);
    open_private_key(&data_key, &sealed.nonce, &sealed.ciphertext, &aad).map_err(|e| {
        let detail = format!("{}: `ciphertext`: {e}", files.sealed_key_path.display());
        Refusal::new(Check::Seal, reason::PRIVATE_KEY_SEAL, detail)
    })
}

/// The rule of a field error without its field name, or the whole message for other errors.
fn field_rule(error: &FormatError) -> String {
    match error {
        FormatError::Field { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

/// Check 4: the decrypted PKCS#8 key is one aws-lc can sign with, and its public key is the leaf's.
///
/// The DER is lent to aws-lc, never moved into an owned `PrivateKeyDer` (rustls' owned key types do not wipe
/// themselves on drop). aws-lc cleanses the parsed key's memory when the last `Arc` to it is dropped.
pub(super) fn key_matches(
    private_key: &SecretBytes,
    files: &CertificateFiles<'_>,
) -> Result<Arc<dyn SigningKey>, Refusal> {
    let refuse = |detail: String| Refusal::new(Check::KeyMatch, reason::KEY_MISMATCH, detail);
    // Borrowed views of the decrypted bytes, never owned copies.
    let pkcs8 = || PrivatePkcs8KeyDer::from(private_key.expose());
    let der = || PrivateKeyDer::Pkcs8(pkcs8());
    // The parser for the leaf's key type first: `any_supported_type` tries RSA before ECDSA, and aws-lc parses a
    // whole EC key before the RSA attempt fails (half the cost of loading an ECDSA key). Any other case, a key of
    // the wrong type included, goes through `any_supported_type`, so that its refusal says what is wrong.
    let expected = match files.leaf.key_algorithm {
        KeyAlgorithm::Ecdsa => any_ecdsa_type(&der()).ok(),
        KeyAlgorithm::Rsa => RsaSigningKey::new(&der()).ok().map(|key| Arc::new(key) as Arc<dyn SigningKey>),
        KeyAlgorithm::Ed25519 => any_eddsa_type(&pkcs8()).ok(),
        KeyAlgorithm::Other => None,
    };
    let signing_key = expected.map_or_else(|| any_supported_type(&der()), Ok).map_err(|_| {
        refuse(format!(
            "{}: the sealed key is not a PKCS#8 RSA, ECDSA or Ed25519 key that aws-lc accepts",
            files.sealed_key_path.display()
        ))
    })?;
    let matches = signing_key.public_key().is_some_and(|spki| spki.as_ref() == files.leaf.spki.as_slice());
    if !matches {
        return Err(refuse(format!(
            "{}: the leaf's public key is not the sealed private key's",
            files.certificate_path.display()
        )));
    }
    Ok(signing_key)
}

/// Check 5: the names to serve. Requested names must each be valid and covered by the leaf's DNS names; without
/// a request, the leaf's own valid DNS names are served. Either way, the result is normalised, without repeats,
/// in order, and not empty.
pub(super) fn server_names(requested: Option<&[String]>, leaf: &Leaf) -> Result<Vec<String>, Refusal> {
    let Some(requested) = requested else {
        let names: Vec<String> =
            leaf.dns_names.iter().filter(|n| names::validate_server_name(n).is_ok()).cloned().collect();
        if names.is_empty() {
            let detail = "no `server_names` given, and the leaf certificate has no valid DNS subjectAltName";
            return Err(Refusal::new(Check::ServerNames, reason::NO_NAMES, detail));
        }
        return Ok(names);
    };
    if requested.is_empty() {
        return Err(Refusal::new(Check::ServerNames, reason::NO_NAMES, "`server_names` is empty"));
    }
    for name in requested {
        let normalized = names::normalize(name);
        if let Err(why) = names::validate_server_name(&normalized) {
            return Err(Refusal::new(Check::ServerNames, reason::INVALID_NAME, format!("{name:?}: {why}")));
        }
        if !names::any_covers(&leaf.dns_names, &normalized) {
            let detail = format!("{name:?} is not covered by the leaf's DNS names ({})", leaf.dns_names.join(", "));
            return Err(Refusal::new(Check::ServerNames, reason::NAME_NOT_COVERED, detail));
        }
    }
    Ok(super::normalized_names(requested))
}
