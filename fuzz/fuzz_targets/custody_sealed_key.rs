//! `SealedKey::parse` on arbitrary bytes: never panics, never quotes the file in an error, and whatever it
//! accepts renders back into the same sealed key.

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use sealgate::custody::format::{is_valid_id, SealedKey, TAG_LEN};

fuzz_target!(|data: &[u8]| {
    let directory_id = common::declared_id(data, "certificate_id", "c-1");
    match SealedKey::parse(data, &directory_id) {
        Err(error) => {
            let message = error.to_string();
            assert!(!message.is_empty());
            common::assert_no_echo(data, &message);
        }
        Ok(sealed) => {
            assert_eq!(sealed.certificate_id, directory_id);
            assert!(is_valid_id(&sealed.certificate_id));
            assert!(!sealed.key_id.is_empty());
            assert!(sealed.ciphertext.len() >= TAG_LEN);
            match SealedKey::parse(sealed.render().as_bytes(), &directory_id) {
                Ok(again) => assert_eq!(again, sealed),
                Err(e) => panic!("a rendered sealed key does not parse: {e}"),
            }
        }
    }
});
