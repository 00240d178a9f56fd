//! Buffers for secret bytes: grant keys, data keys and decrypted private keys.
//!
//! Every secret sealgate handles lives in one of these types. They wipe their memory when dropped and never
//! reveal their contents through `Debug` or `Display`, so a secret cannot reach a log line or an error message
//! by accident. Their contents are only reachable through [`SecretBytes::expose`] and [`SecretKey32::expose`],
//! which makes every use greppable.

use std::fmt;

use zeroize::{Zeroize, Zeroizing};

/// Length in bytes of the AES-256 keys used by the custody format (grant keys and data keys).
pub const KEY_LEN: usize = 32;

/// A 256-bit symmetric key, wiped on drop.
///
/// The bytes live on the heap and never move: a key held by value on the stack would leave a copy behind in every
/// frame it is moved out of, which no destructor wipes.
#[derive(Clone)]
pub struct SecretKey32(Box<Zeroizing<[u8; KEY_LEN]>>);

impl SecretKey32 {
    /// A zeroed key on the heap, to be filled in place.
    fn zeroed() -> Self {
        Self(Box::new(Zeroizing::new([0u8; KEY_LEN])))
    }

    /// Takes ownership of `bytes`; the caller's copy is wiped.
    pub fn from_array(bytes: &mut [u8; KEY_LEN]) -> Self {
        let mut key = Self::zeroed();
        key.0.copy_from_slice(bytes);
        bytes.zeroize();
        key
    }

    /// Copies a key out of `bytes`, which must be exactly [`KEY_LEN`] bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != KEY_LEN {
            return None;
        }
        let mut key = Self::zeroed();
        key.0.copy_from_slice(bytes);
        Some(key)
    }

    /// A fresh random key from the operating system's CSPRNG.
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut key = Self::zeroed();
        getrandom::fill(&mut key.0[..])?;
        Ok(key)
    }

    /// The key's bytes. Callers must not copy them into memory that is not wiped.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for SecretKey32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey32(<redacted>)")
    }
}

/// A variable-length secret (a decrypted PKCS#8 private key), wiped on drop.
#[derive(Clone, Default)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Wraps `bytes`. The vector must not have been reallocated on its way here, or a copy is already loose.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// An empty buffer with room for `capacity` bytes, so that filling it never reallocates (a reallocation
    /// would leave an unwiped copy behind).
    pub fn with_capacity(capacity: usize) -> Self {
        Self(Zeroizing::new(Vec::with_capacity(capacity)))
    }

    /// The secret's bytes. Callers must not copy them into memory that is not wiped.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The underlying buffer, for in-place decryption.
    pub fn buffer_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }

    /// Number of bytes held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.0.len())
    }
}

/// Overwrites the stack below the caller's frame with zeros.
///
/// Ciphers and key parsers keep key bytes and key schedules in stack frames (and move them between frames) that no
/// destructor wipes. Calling this on a thread right after such work, from a shallow frame, overwrites the frames
/// those calls used. `zeroize` writes with volatile stores, so the compiler cannot drop the writes.
#[inline(never)]
pub fn scrub_stack() {
    let mut area = [0u8; SCRUB_BYTES];
    area.zeroize();
    std::hint::black_box(&area);
}

/// How much stack [`scrub_stack`] overwrites: more than the deepest crypto call chain uses (AES-GCM-SIV and aws-lc
/// key parsing use a few KiB).
const SCRUB_BYTES: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_bytes() {
        let key = SecretKey32::from_slice(&[0xAB; KEY_LEN]).unwrap();
        let text = format!("{key:?}");
        assert!(!text.to_lowercase().contains("ab"), "{text}");
        let bytes = SecretBytes::new(vec![0xCD; 7]);
        let text = format!("{bytes:?}");
        assert!(!text.to_lowercase().contains("cd") && text.contains("7 bytes"), "{text}");
    }

    #[test]
    fn from_array_wipes_the_source() {
        let mut raw = [7u8; KEY_LEN];
        let key = SecretKey32::from_array(&mut raw);
        assert_eq!(raw, [0u8; KEY_LEN]);
        assert_eq!(key.expose(), &[7u8; KEY_LEN]);
    }

    #[test]
    fn from_slice_checks_the_length() {
        assert!(SecretKey32::from_slice(&[1; 31]).is_none());
        assert!(SecretKey32::from_slice(&[1; 33]).is_none());
    }
}
