//! `Associations::parse` and `AssociationEntry::wrapped_data_key` on arbitrary bytes: never panic, never quote
//! the file in an error, and what parses renders back into the same entries.

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use sealgate::custody::format::{decode_base64, Associations, WRAPPED_DATA_KEY_LEN};

fuzz_target!(|data: &[u8]| {
    match Associations::parse(data) {
        Err(error) => {
            let message = error.to_string();
            assert!(!message.is_empty());
            common::assert_no_echo(data, &message);
        }
        Ok(associations) => {
            for entry in &associations.entries {
                let _ = entry.ids_are_valid();
                match entry.wrapped_data_key() {
                    Ok(wrapped) => assert_eq!(wrapped.len(), WRAPPED_DATA_KEY_LEN),
                    Err(error) => {
                        let message = error.to_string();
                        common::assert_no_echo(data, &message);
                        // Refused for its length only when it is base64 at all.
                        if let Ok(bytes) = decode_base64("wrapped_data_key", &entry.wrapped_data_key) {
                            assert_ne!(bytes.len(), WRAPPED_DATA_KEY_LEN);
                        }
                    }
                }
            }
            match Associations::parse(associations.render().as_bytes()) {
                Ok(again) => assert_eq!(again, associations),
                Err(e) => panic!("rendered associations do not parse: {e}"),
            }
        }
    }
});
