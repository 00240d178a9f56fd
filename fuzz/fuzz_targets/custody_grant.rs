//! `Grant::parse` on arbitrary bytes: never panics, never quotes the file in an error, and whatever it accepts
//! renders back into a file it accepts again with the same meaning.

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use sealgate::custody::format::{is_valid_id, Grant};

fuzz_target!(|data: &[u8]| {
    let file_id = common::declared_id(data, "grant_id", "g-1");
    match Grant::parse(data, &file_id) {
        Err(error) => {
            let message = error.to_string();
            assert!(!message.is_empty());
            common::assert_no_echo(data, &message);
        }
        Ok(grant) => {
            assert_eq!(grant.grant_id, file_id);
            assert!(is_valid_id(&grant.grant_id));
            assert!(!grant.key_id.is_empty());
            let rendered = grant.render();
            let again = match Grant::parse(rendered.as_bytes(), &file_id) {
                Ok(again) => again,
                Err(e) => panic!("a rendered grant does not parse: {e}"),
            };
            assert_eq!(again.key_id, grant.key_id);
            assert_eq!(again.key_alias, grant.key_alias);
            assert_eq!(again.grantee, grant.grantee);
            assert_eq!(again.operations, grant.operations);
            assert_eq!(again.state, grant.state);
            assert_eq!(again.grant_key.as_ref().map(|k| *k.expose()), grant.grant_key.as_ref().map(|k| *k.expose()));
            // Instants are rendered in UTC, clamped to the years RFC 3339 can spell; an instant given with an
            // offset near year 0 or 9999 may move. Everything else round-trips exactly.
            for (before, after) in [(grant.not_after, again.not_after), (grant.created, again.created)] {
                assert_eq!(before.is_some(), after.is_some());
                if let (Some(before), Some(after)) = (before, after) {
                    let utc_year = before.to_offset(time::UtcOffset::UTC).year();
                    if (0..=9999).contains(&utc_year) {
                        assert_eq!(before, after);
                    }
                }
            }
        }
    }
});
