//! The PROXY protocol header (HAProxy's, versions 1 and 2) that a layer-4 load balancer (AWS NLB, HAProxy in
//! `mode tcp`, a Kubernetes service with `externalTrafficPolicy` it cannot keep) sends ahead of the client's
//! bytes, to say whom the connection is from.
//!
//! A listener with `proxy_protocol = true` requires it on every connection (as HAProxy's `accept-proxy` and
//! nginx's `listen … proxy_protocol` do): a connection without one is closed rather than guessed at. The header
//! is trusted as the load balancer's word, so such a listener must be reachable through the load balancer
//! only: anyone else can write one naming any address. The header is read before the TLS handshake and
//! within its deadline; exactly its bytes are consumed, so the ClientHello behind it stays in the socket for the
//! handshake. The parsing is the `ppp` crate's.

use std::io;
use std::net::SocketAddr;

use ppp::{v1, v2, PartialResult};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The longest header accepted: a version 1 header is at most 107 bytes; version 2 allows 64 KiB of TLVs, of
/// which load balancers send a few dozen bytes (HAProxy's own limit is its buffer).
pub const MAX_HEADER_BYTES: usize = 4096;

/// Why a connection's PROXY protocol header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The connection ended before the header did.
    #[error("the connection closed before its PROXY protocol header ended")]
    Closed,
    /// Reading failed.
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] io::Error),
    /// The bytes are not a PROXY protocol header.
    #[error("no valid PROXY protocol header (version 1 or 2): {0}")]
    Invalid(String),
    /// The header is longer than [`MAX_HEADER_BYTES`].
    #[error("PROXY protocol header longer than {MAX_HEADER_BYTES} bytes")]
    TooLong,
}

/// `Result` of this module.
pub type Result<T> = std::result::Result<T, ProxyHeaderError>;

/// Reads the PROXY protocol header at the start of `tcp`, consuming exactly its bytes. Returns the client's
/// address, or `None` when the header names none: a version 2 `LOCAL` header (the load balancer's own health
/// check), `UNKNOWN` (version 1), or an address family other than IPv4 and IPv6. The caller bounds the wait.
pub async fn read(tcp: &mut TcpStream) -> Result<Option<SocketAddr>> {
    // Bytes of the header read so far. Every byte of an incomplete header belongs to the header (version 1 ends
    // at its CRLF, version 2 at the length it gives), so they can be consumed as they come; a complete one is
    // consumed up to its end only.
    let mut header = Vec::new();
    let mut peeked = [0u8; 512];
    loop {
        let n = tcp.peek(&mut peeked).await?;
        if n == 0 {
            return Err(ProxyHeaderError::Closed);
        }
        let consumed = header.len();
        header.extend_from_slice(&peeked[..n]);
        match parse(&header) {
            Parsed::Complete { len, client } => {
                // `len` ends within the bytes just peeked: the header was incomplete without them.
                tcp.read_exact(&mut peeked[..len - consumed]).await?;
                return Ok(client);
            }
            Parsed::Incomplete if header.len() >= MAX_HEADER_BYTES => return Err(ProxyHeaderError::TooLong),
            Parsed::Incomplete => {
                tcp.read_exact(&mut peeked[..n]).await?;
            }
            Parsed::Invalid(why) => return Err(ProxyHeaderError::Invalid(why)),
        }
    }
}

/// What the bytes read so far make.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    /// A whole header of `len` bytes, naming `client`.
    Complete {
        /// The header's length: the bytes after it are the client's.
        len: usize,
        /// The client it names, if any.
        client: Option<SocketAddr>,
    },
    /// The start of a header.
    Incomplete,
    /// Not a header, whatever follows.
    Invalid(String),
}

/// The start of every version 1 header.
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest version 1 header, its CRLF included (the specification's bound).
const V1_MAX_BYTES: usize = 107;

/// What the first bytes of a connection make: a whole header (and its length), the start of one, or not a
/// header whatever follows. Every prefix of a valid header is `Incomplete`, so the header can be read as it
/// comes; bytes after a whole header do not change the verdict.
pub fn parse(bytes: &[u8]) -> Parsed {
    let starts = |prefix: &[u8]| bytes.starts_with(prefix) || prefix.starts_with(bytes);
    if starts(v2::PROTOCOL_PREFIX) {
        return match v2::Header::try_from(bytes) {
            Err(error) if error.is_incomplete() => Parsed::Incomplete,
            Err(error) => Parsed::Invalid(error.to_string()),
            Ok(header) => {
                let client = match (header.command, header.addresses) {
                    (v2::Command::Local, _) => None,
                    (_, v2::Addresses::IPv4(a)) => Some(SocketAddr::from((a.source_address, a.source_port))),
                    (_, v2::Addresses::IPv6(a)) => Some(SocketAddr::from((a.source_address, a.source_port))),
                    (_, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => None,
                };
                Parsed::Complete { len: header.len(), client }
            }
        };
    }
    if !starts(V1_PREFIX) {
        return Parsed::Invalid("the connection starts with neither a version 1 nor a version 2 header".to_owned());
    }
    // A version 1 header is a line: whole once its CRLF has come, and then valid or not. (`ppp` also calls some
    // invalid lines incomplete, and some prefixes of valid ones invalid: it is given whole lines only.)
    let Some(end) = bytes.windows(2).position(|w| w == b"\r\n").map(|i| i + 2) else {
        return if bytes.len() >= V1_MAX_BYTES {
            Parsed::Invalid(format!("no CRLF within the {V1_MAX_BYTES} bytes of a version 1 header"))
        } else {
            Parsed::Incomplete
        };
    };
    match v1::Header::try_from(&bytes[..end]) {
        Ok(header) => {
            let client = match header.addresses {
                v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Unknown => None,
            };
            Parsed::Complete { len: end, client }
        }
        Err(error) => Parsed::Invalid(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 2 PROXY header for a TCP connection from `client` to `server` (same family).
    pub(crate) fn v2_header(client: SocketAddr, server: SocketAddr) -> Vec<u8> {
        v2::Builder::with_addresses(v2::Version::Two | v2::Command::Proxy, v2::Protocol::Stream, (client, server))
            .build()
            .unwrap()
    }

    #[test]
    fn version_1_headers_give_the_client_and_their_length() {
        let header = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n";
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(b"\x16\x03\x01 the ClientHello");
        let client = Some("203.0.113.7:51234".parse().unwrap());
        assert_eq!(parse(&bytes), Parsed::Complete { len: header.len(), client });
        let six = b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 443\r\n";
        assert_eq!(
            parse(six),
            Parsed::Complete { len: six.len(), client: Some("[2001:db8::7]:51234".parse().unwrap()) }
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Parsed::Complete { len: 15, client: None });
    }

    #[test]
    fn version_2_headers_give_the_client_unless_local() {
        let (client, server) = ("198.51.100.9:40000".parse().unwrap(), "10.0.0.1:443".parse().unwrap());
        let header = v2_header(client, server);
        let mut bytes = header.clone();
        bytes.extend_from_slice(b"\x16\x03\x01");
        assert_eq!(parse(&bytes), Parsed::Complete { len: header.len(), client: Some(client) });
        let local = v2::Builder::new(
            v2::Version::Two | v2::Command::Local,
            v2::AddressFamily::Unspecified | v2::Protocol::Unspecified,
        )
        .build()
        .unwrap();
        assert_eq!(parse(&local), Parsed::Complete { len: local.len(), client: None });
    }

    #[test]
    fn every_prefix_of_a_header_is_incomplete() {
        let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n".to_vec();
        let v2 = v2_header("198.51.100.9:40000".parse().unwrap(), "10.0.0.1:443".parse().unwrap());
        for header in [v1, v2] {
            for end in 1..header.len() {
                assert_eq!(parse(&header[..end]), Parsed::Incomplete, "{:?}", &header[..end]);
            }
        }
    }

    proptest::proptest! {
        /// Any bytes, and any header with bytes changed: a verdict, never a panic, and a complete header never
        /// longer than what was read.
        #[test]
        fn any_input_gets_a_verdict(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            edits in proptest::collection::vec((0usize..64, proptest::prelude::any::<u8>()), 0..4),
        ) {
            let v2 = v2_header("198.51.100.9:40000".parse().unwrap(), "10.0.0.1:443".parse().unwrap());
            let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n".to_vec();
            for mut input in [bytes, v1, v2] {
                for (at, byte) in &edits {
                    let at = at % input.len().max(1);
                    if let Some(b) = input.get_mut(at) {
                        *b = *byte;
                    }
                }
                if let Parsed::Complete { len, .. } = parse(&input) {
                    proptest::prop_assert!(len <= input.len());
                }
            }
        }
    }

    #[test]
    fn other_bytes_are_refused() {
        for bytes in
            [&b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..], b"GET / HTTP/1.1\r\n", b"PROXY TCP4 nonsense\r\n"]
        {
            assert!(matches!(parse(bytes), Parsed::Invalid(_)), "{bytes:?}");
        }
    }
}
