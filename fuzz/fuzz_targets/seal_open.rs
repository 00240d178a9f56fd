//! The openers (`unwrap_data_key`, `open_private_key`) with arbitrary keys, nonces, ciphertexts and associated
//! data, of any length: they return `Ok` or `Err`, never panic. Lengths that the types cannot express reach them
//! the way the reader builds them (`SecretKey32::from_slice`, `try_into`, `AssociationEntry::wrapped_data_key`),
//! which must refuse them. A seal made here must open, and a changed one must not.
//!
//! The input is length-prefixed fields, so that real files make seeds (`fuzz/seed-corpora`): a field cut short
//! by the end of the input is simply shorter.
//!
//! | field | length prefix |
//! |---|---|
//! | grant key | 1 byte |
//! | wrapped data key (nonce, ciphertext, tag) | 1 byte |
//! | associated data of the wrapped data key | 2 bytes, big-endian |
//! | data key | 1 byte |
//! | nonce of the sealed private key | 1 byte |
//! | sealed private key (ciphertext, tag) | 2 bytes |
//! | associated data of the sealed private key | 2 bytes |
//! | bit to flip | (2 bytes, big-endian) |
//! | plaintext to seal | the rest |

#![no_main]

use libfuzzer_sys::fuzz_target;
use sealgate::custody::format::{encode_base64, AssociationEntry, NONCE_LEN, TAG_LEN, WRAPPED_DATA_KEY_LEN};
use sealgate::custody::seal::{open_private_key, seal, unwrap_data_key, SealError};
use sealgate::secret::{SecretKey32, KEY_LEN};

/// Reads the fields of the input in order.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (taken, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        taken
    }

    fn short(&mut self) -> &'a [u8] {
        let n = self.take(1).first().copied().unwrap_or(0);
        self.take(usize::from(n))
    }

    fn u16(&mut self) -> u16 {
        match self.take(2) {
            [high, low] => u16::from_be_bytes([*high, *low]),
            [high] => u16::from(*high),
            _ => 0,
        }
    }

    fn long(&mut self) -> &'a [u8] {
        let n = self.u16();
        self.take(usize::from(n))
    }
}

/// `bytes` cut or zero-padded to `N`.
fn fit<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = bytes.len().min(N);
    out[..n].copy_from_slice(&bytes[..n]);
    out
}

/// A key from any bytes: only exactly 32 of them make one; others are fitted to 32 so the openers still run.
fn key(bytes: &[u8]) -> SecretKey32 {
    let key = SecretKey32::from_slice(bytes);
    assert_eq!(key.is_some(), bytes.len() == KEY_LEN);
    key.unwrap_or_else(|| SecretKey32::from_array(&mut fit::<KEY_LEN>(bytes)))
}

/// Opens a sealed private key and checks the outcome against the input's length.
fn open(key: &SecretKey32, nonce: &[u8; NONCE_LEN], ciphertext: &[u8], aad: &[u8]) {
    match open_private_key(key, nonce, ciphertext, aad) {
        Ok(plaintext) => assert_eq!(plaintext.len() + TAG_LEN, ciphertext.len()),
        Err(SealError::Length) => assert!(ciphertext.len() < TAG_LEN),
        Err(e) => assert_eq!(e, SealError::TagMismatch),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut fields = Fields(data);
    let grant_key = key(fields.short());
    let wrapped = fields.short();
    let data_key_aad = fields.long();
    let data_key = key(fields.short());
    let nonce = fields.short();
    let ciphertext = fields.long();
    let sealed_key_aad = fields.long();
    let flip = fields.u16();
    let plaintext = fields.0;

    // A wrapped data key of any length, as the reader gets it: base64 in associations.toml.
    let entry = AssociationEntry {
        certificate_id: "c-1".to_owned(),
        grant_id: "g-1".to_owned(),
        server_names: None,
        wrapped_data_key: encode_base64(wrapped),
    };
    let mut unwrapped = None;
    match entry.wrapped_data_key() {
        Ok(decoded) => {
            assert_eq!(wrapped.len(), WRAPPED_DATA_KEY_LEN);
            match unwrap_data_key(&grant_key, &decoded, data_key_aad) {
                Ok(key) => unwrapped = Some(key),
                Err(e) => assert_eq!(e, SealError::TagMismatch),
            }
        }
        Err(e) => {
            assert_ne!(wrapped.len(), WRAPPED_DATA_KEY_LEN);
            assert!(!e.to_string().is_empty());
            let _ = unwrap_data_key(&grant_key, &fit::<WRAPPED_DATA_KEY_LEN>(wrapped), data_key_aad);
        }
    }

    // A sealed private key of any length: shorter than a tag is a length error, never a panic.
    let exact_nonce: Result<[u8; NONCE_LEN], _> = nonce.try_into();
    assert_eq!(exact_nonce.is_ok(), nonce.len() == NONCE_LEN);
    let nonce = exact_nonce.unwrap_or_else(|_| fit::<NONCE_LEN>(nonce));
    open(&data_key, &nonce, ciphertext, sealed_key_aad);
    if let Some(unwrapped) = &unwrapped {
        open(unwrapped, &nonce, ciphertext, sealed_key_aad);
    }

    // Round trips: what is sealed opens, under the same key, nonce and associated data only.
    let sealed = seal(&data_key, &nonce, plaintext, sealed_key_aad);
    assert_eq!(sealed.len(), plaintext.len() + TAG_LEN);
    let opened = open_private_key(&data_key, &nonce, &sealed, sealed_key_aad).expect("a fresh seal opens");
    assert_eq!(opened.expose(), plaintext);
    let mut altered = sealed;
    let bit = usize::from(flip) % (altered.len() * 8);
    altered[bit / 8] ^= 1 << (bit % 8);
    assert_eq!(open_private_key(&data_key, &nonce, &altered, sealed_key_aad).unwrap_err(), SealError::TagMismatch);

    let mut wrapped = [0u8; WRAPPED_DATA_KEY_LEN];
    wrapped[..NONCE_LEN].copy_from_slice(&nonce);
    wrapped[NONCE_LEN..].copy_from_slice(&seal(&grant_key, &nonce, data_key.expose(), data_key_aad));
    let again = unwrap_data_key(&grant_key, &wrapped, data_key_aad).expect("a fresh wrap unwraps");
    assert_eq!(again.expose(), data_key.expose());
    wrapped[NONCE_LEN + bit % (KEY_LEN + TAG_LEN)] ^= 1;
    assert_eq!(unwrap_data_key(&grant_key, &wrapped, data_key_aad).unwrap_err(), SealError::TagMismatch);
});
