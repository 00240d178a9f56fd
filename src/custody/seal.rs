//! AES-256-GCM-SIV (RFC 8452) sealing and opening of the custody format's two secrets: the data key, wrapped
//! under a grant key, and the private key, sealed under the data key.
//!
//! Plaintexts are only ever decrypted in place inside wiped buffers ([`SecretKey32`], [`SecretBytes`]); the
//! cipher objects wipe their key schedules on drop (the `aes` crate's `zeroize` feature, enabled in
//! `Cargo.toml`).

use aes_gcm_siv::aead::AeadInOut;
use aes_gcm_siv::{Aes256GcmSiv, KeyInit, Nonce};

use super::format::{NONCE_LEN, SEALED_KEY_FORMAT, TAG_LEN, WRAPPED_DATA_KEY_LEN};
use crate::secret::{SecretBytes, SecretKey32, KEY_LEN};

/// Associated-data tag of a wrapped data key.
pub const DATA_KEY_CONTEXT: &str = "custody-data-key/v1";

/// Why a seal could not be opened. Deliberately uninformative: AES-GCM-SIV does not say which input was wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The tag does not verify: wrong key, wrong associated data, or altered ciphertext.
    #[error("the tag does not verify (wrong key, wrong associated data or altered ciphertext)")]
    TagMismatch,
    /// The input is shorter or longer than the format allows.
    #[error("the sealed value has the wrong length")]
    Length,
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed")]
    Random,
}

/// Associated data of a wrapped data key: `custody-data-key/v1\n<grant_id>\n<certificate_id>\n<key_id>`, where
/// `key_id` is the grant's.
pub fn data_key_aad(grant_id: &str, certificate_id: &str, grant_key_id: &str) -> Vec<u8> {
    [DATA_KEY_CONTEXT, grant_id, certificate_id, grant_key_id].join("\n").into_bytes()
}

/// Associated data of a sealed private key: `custody-sealed-key/v1\n<certificate_id>\n<key_id>`.
pub fn sealed_key_aad(certificate_id: &str, key_id: &str) -> Vec<u8> {
    [SEALED_KEY_FORMAT, certificate_id, key_id].join("\n").into_bytes()
}

fn cipher(key: &SecretKey32) -> Aes256GcmSiv {
    // The key has exactly the cipher's key length by construction.
    Aes256GcmSiv::new(key.expose().into())
}

/// Opens a `wrapped_data_key` (nonce || ciphertext || tag) with the grant key.
pub fn unwrap_data_key(
    grant_key: &SecretKey32,
    wrapped: &[u8; WRAPPED_DATA_KEY_LEN],
    aad: &[u8],
) -> Result<SecretKey32, SealError> {
    let (nonce, sealed) = wrapped.split_at(NONCE_LEN);
    let mut buffer = SecretBytes::with_capacity(sealed.len());
    buffer.buffer_mut().extend_from_slice(sealed);
    open_in_place(grant_key, nonce, aad, &mut buffer)?;
    SecretKey32::from_slice(buffer.expose()).ok_or(SealError::Length)
}

/// Opens a sealed private key (ciphertext || tag) with the data key, returning the PKCS#8 DER in a wiped buffer.
pub fn open_private_key(
    data_key: &SecretKey32,
    nonce: &[u8; NONCE_LEN],
    ciphertext: &[u8],
    aad: &[u8],
) -> Result<SecretBytes, SealError> {
    let mut buffer = SecretBytes::with_capacity(ciphertext.len());
    buffer.buffer_mut().extend_from_slice(ciphertext);
    open_in_place(data_key, nonce, aad, &mut buffer)?;
    Ok(buffer)
}

fn open_in_place(key: &SecretKey32, nonce: &[u8], aad: &[u8], buffer: &mut SecretBytes) -> Result<(), SealError> {
    if nonce.len() != NONCE_LEN || buffer.len() < TAG_LEN {
        return Err(SealError::Length);
    }
    let nonce = Nonce::try_from(nonce).map_err(|_| SealError::Length)?;
    // Decrypts in place and truncates the tag: the buffer never grows, so no unwiped copy is left behind.
    cipher(key).decrypt_in_place(&nonce, aad, buffer.buffer_mut()).map_err(|_| SealError::TagMismatch)
}

/// Seals `plaintext` under `key` with `nonce`, returning ciphertext || tag.
pub fn seal(key: &SecretKey32, nonce: &[u8; NONCE_LEN], plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    // Room for the tag up front: encryption in place must not reallocate a buffer that briefly holds plaintext.
    let mut buffer = SecretBytes::with_capacity(plaintext.len() + TAG_LEN);
    buffer.buffer_mut().extend_from_slice(plaintext);
    cipher(key)
        .encrypt_in_place(&Nonce::from(*nonce), aad, buffer.buffer_mut())
        .expect("AES-GCM-SIV accepts plaintexts and associated data far larger than any key");
    buffer.expose().to_vec()
}

/// A fresh random nonce.
pub fn random_nonce() -> Result<[u8; NONCE_LEN], SealError> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|_| SealError::Random)?;
    Ok(nonce)
}

/// Wraps a data key under a grant key with a fresh nonce: nonce || ciphertext || tag.
pub fn wrap_data_key(
    grant_key: &SecretKey32,
    data_key: &SecretKey32,
    aad: &[u8],
) -> Result<[u8; WRAPPED_DATA_KEY_LEN], SealError> {
    let nonce = random_nonce()?;
    let sealed = seal(grant_key, &nonce, data_key.expose(), aad);
    let mut wrapped = [0u8; WRAPPED_DATA_KEY_LEN];
    wrapped[..NONCE_LEN].copy_from_slice(&nonce);
    wrapped[NONCE_LEN..].copy_from_slice(&sealed);
    debug_assert_eq!(sealed.len(), KEY_LEN + TAG_LEN);
    Ok(wrapped)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8452 appendix C.2, first AES-256-GCM-SIV vector: empty plaintext and AAD.
    #[test]
    fn rfc8452_known_answer() {
        let mut key = [0u8; KEY_LEN];
        key[0] = 1;
        let key = SecretKey32::from_slice(&key).unwrap();
        let mut nonce = [0u8; NONCE_LEN];
        nonce[0] = 3;
        let tag = seal(&key, &nonce, b"", b"");
        let expected: [u8; 16] =
            [0x07, 0xf5, 0xf4, 0x16, 0x9b, 0xbf, 0x55, 0xa8, 0x40, 0x0c, 0xd4, 0x7e, 0xa6, 0xfd, 0x40, 0x0f];
        assert_eq!(tag, expected);
        let opened = open_private_key(&key, &nonce, &tag, b"").unwrap();
        assert!(opened.is_empty());
    }

    #[test]
    fn wrap_and_unwrap_round_trip_and_bind_the_aad() {
        let grant_key = SecretKey32::random().unwrap();
        let data_key = SecretKey32::random().unwrap();
        let aad = data_key_aad("g-1", "c-1", "k");
        let wrapped = wrap_data_key(&grant_key, &data_key, &aad).unwrap();
        assert_eq!(unwrap_data_key(&grant_key, &wrapped, &aad).unwrap().expose(), data_key.expose());
        let other_aad = data_key_aad("g-1", "c-2", "k");
        assert_eq!(unwrap_data_key(&grant_key, &wrapped, &other_aad).unwrap_err(), SealError::TagMismatch);
        let mut tampered = wrapped;
        tampered[20] ^= 1;
        assert_eq!(unwrap_data_key(&grant_key, &tampered, &aad).unwrap_err(), SealError::TagMismatch);
    }

    #[test]
    fn short_ciphertexts_are_refused_without_panicking() {
        let key = SecretKey32::random().unwrap();
        assert_eq!(open_private_key(&key, &[0; NONCE_LEN], &[0; 5], b"").unwrap_err(), SealError::Length);
    }

    #[test]
    fn aad_layout() {
        assert_eq!(data_key_aad("g", "c", "k"), b"custody-data-key/v1\ng\nc\nk");
        assert_eq!(sealed_key_aad("c", "k"), b"custody-sealed-key/v1\nc\nk");
    }
}
