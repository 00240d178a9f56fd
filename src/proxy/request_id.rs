//! Request ids (`[proxy] request_id`): an `X-Request-Id` of 32 hexadecimal digits for every request, sent
//! upstream, returned to the client and written to the access log, so that one request can be followed from
//! the edge through the application's logs (nginx's `$request_id`, Envoy's `x-request-id`).
//!
//! An id is a random per-process prefix and a per-process sequence number passed through a keyed bijection:
//! unique for the life of the proxy (2^64 requests), different across processes and reloads with
//! overwhelming probability, and not a readable request count. Making one costs an atomic increment and no
//! system call. A client's own `X-Request-Id` is replaced: sealgate is the edge, and an id a client chooses
//! could collide with another request's on purpose.

use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{HeaderName, HeaderValue};

/// `X-Request-Id`.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The ids of one proxy.
#[derive(Debug)]
pub struct RequestIds {
    prefix: u64,
    key: u64,
    /// Odd, so that multiplying by it is a bijection of `u64`.
    multiplier: u64,
    next: AtomicU64,
}

impl RequestIds {
    /// A generator with fresh random keys (from the operating system; if it cannot give any, from the clock
    /// and the process id, which still differ between processes).
    pub fn new() -> Self {
        let mut seed = [0u8; 24];
        if getrandom::fill(&mut seed).is_err() {
            let nanos =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
            seed[..8].copy_from_slice(&nanos.to_le_bytes());
            seed[8..12].copy_from_slice(&std::process::id().to_le_bytes());
        }
        let word = |i: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&seed[i * 8..i * 8 + 8]);
            u64::from_le_bytes(bytes)
        };
        Self { prefix: word(0), key: word(1), multiplier: word(2) | 1, next: AtomicU64::new(0) }
    }

    /// The next id.
    pub fn next(&self) -> HeaderValue {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let scrambled = (n ^ self.key).wrapping_mul(self.multiplier);
        let mut text = [0u8; 32];
        hex(self.prefix, &mut text[..16]);
        hex(scrambled, &mut text[16..]);
        // Hexadecimal digits are always a valid header value.
        HeaderValue::from_bytes(&text).unwrap_or(HeaderValue::from_static("0"))
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

/// `value` as 16 lowercase hexadecimal digits into `out`.
fn hex(value: u64, out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, byte) in out.iter_mut().enumerate().take(16) {
        *byte = DIGITS[((value >> (60 - 4 * i)) & 0xf) as usize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_32_hex_digits_and_unique() {
        let ids = RequestIds::new();
        let seen: HashSet<_> = (0..100_000).map(|_| ids.next()).collect();
        assert_eq!(seen.len(), 100_000);
        for id in seen.iter().take(100) {
            let text = id.to_str().unwrap();
            assert_eq!(text.len(), 32);
            assert!(text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{text}");
        }
        let other = RequestIds::new();
        assert_ne!(other.next().as_bytes()[..16], ids.next().as_bytes()[..16], "another process, another prefix");
    }

    #[test]
    fn hex_digits_are_in_order() {
        let mut out = [0u8; 16];
        hex(0x0123_4567_89ab_cdef, &mut out);
        assert_eq!(&out, b"0123456789abcdef");
    }
}
