//! The PROXY protocol header parser (`proxy_header::parse`) on any bytes: a verdict, never a panic, and the
//! verdicts the streaming read relies on. The read peeks at what has arrived and asks again as more comes, so:
//!
//! - a whole header is never longer than the bytes given, and bytes after it do not change the verdict (the
//!   ClientHello behind it must not make it another header, or none);
//! - every prefix of a whole header is `Incomplete` (a header that arrives in pieces is not refused, and is
//!   not taken as a shorter one);
//! - a prefix of an `Invalid` input is never a whole header (refusing cannot come after accepting).

#![no_main]

use libfuzzer_sys::fuzz_target;
use sealgate::proxy_header::{parse, Parsed};

fuzz_target!(|data: &[u8]| {
    let verdict = parse(data);
    match &verdict {
        Parsed::Complete { len, client } => {
            assert!(*len > 0 && *len <= data.len(), "{len} of {}", data.len());
            for end in 1..*len {
                assert_eq!(parse(&data[..end]), Parsed::Incomplete, "prefix of {end} bytes");
            }
            let mut longer = data[..*len].to_vec();
            longer.extend_from_slice(b"\x16\x03\x01\x02\x00");
            assert_eq!(parse(&longer), Parsed::Complete { len: *len, client: *client });
        }
        Parsed::Incomplete => {}
        Parsed::Invalid(why) => {
            assert!(!why.is_empty());
            // A header that could be whole is within the first bytes (a version 2 header's length is in its
            // first 16); looking further only costs time.
            for end in 1..data.len().min(1024) {
                assert!(!matches!(parse(&data[..end]), Parsed::Complete { .. }), "prefix of {end} bytes");
            }
        }
    }
});
