//! HTTP/2 frames written by hand, so that tests can send what real clients refuse to (malformed headers,
//! floods) and see exactly what the server answers with.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

/// The client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types.
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;

/// Flags.
pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// SETTINGS identifiers.
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// Error codes.
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One frame.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK integer with an `n`-bit prefix, first byte ORed with `flags`.
fn integer(value: usize, n: u32, flags: u8, out: &mut Vec<u8>) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// A header block of literal fields without indexing and without Huffman coding: bytes exactly as given.
pub fn block(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        integer(name.len(), 7, 0, &mut out);
        out.extend_from_slice(name);
        integer(value.len(), 7, 0, &mut out);
        out.extend_from_slice(value);
    }
    out
}

/// The pseudo-header fields of a request for `authority` and `path`, then `extra`.
pub fn request_block(method: &str, authority: &str, path: &str, extra: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut fields: Vec<(&[u8], &[u8])> = vec![
        (b":method", method.as_bytes()),
        (b":scheme", b"https"),
        (b":authority", authority.as_bytes()),
        (b":path", path.as_bytes()),
    ];
    fields.extend_from_slice(extra);
    block(&fields)
}

/// What the server sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// SETTINGS (acknowledged automatically) and its (identifier, value) pairs; an ACK has none.
    Settings { ack: bool, values: Vec<(u16, u32)> },
    /// Response HEADERS and the `:status` found in them.
    Headers { stream: u32, status: Option<u16>, end_stream: bool },
    /// DATA.
    Data { stream: u32, len: usize, end_stream: bool },
    /// RST_STREAM.
    Reset { stream: u32, code: u32 },
    /// GOAWAY.
    GoAway { last_stream: u32, code: u32 },
    /// PING (not acknowledged unless [`H2::answer_pings`] is set).
    Ping { ack: bool },
    /// Any other frame type.
    Other(u8),
    /// The connection closed.
    Closed,
}

/// A raw HTTP/2 client connection over TLS (ALPN `h2`).
pub struct H2 {
    tls: TlsStream<TcpStream>,
    buf: Vec<u8>,
    /// Whether PINGs are acknowledged (a live client) or ignored (a dead one).
    pub answer_pings: bool,
}

impl H2 {
    /// Sends the preface and an empty SETTINGS frame.
    pub async fn start(mut tls: TlsStream<TcpStream>) -> Self {
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        tls.write_all(&hello).await.unwrap();
        Self { tls, buf: Vec::new(), answer_pings: true }
    }

    /// Waits until the server's SETTINGS has been received (and acknowledged) and ours acknowledged, so that
    /// the server's limits are in force; returns the server's settings.
    pub async fn settled(&mut self, wait: Duration) -> Vec<(u16, u32)> {
        let (mut theirs, mut acked) = (None, false);
        self.until(wait, |event| {
            match event {
                Event::Settings { ack: true, .. } => acked = true,
                Event::Settings { ack: false, values } => theirs = Some(values.clone()),
                _ => {}
            }
            acked && theirs.is_some()
        })
        .await
        .expect("no SETTINGS exchange");
        theirs.unwrap_or_default()
    }

    /// Writes raw bytes; false when the server has closed.
    pub async fn send(&mut self, bytes: &[u8]) -> bool {
        self.tls.write_all(bytes).await.is_ok() && self.tls.flush().await.is_ok()
    }

    /// The next frame from the server, or `None` when `wait` passes first.
    pub async fn next(&mut self, wait: Duration) -> Option<Event> {
        let deadline = Instant::now() + wait;
        loop {
            if self.buf.len() >= 9 {
                let len = (usize::from(self.buf[0]) << 16) | (usize::from(self.buf[1]) << 8) | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let head: Vec<u8> = self.buf.drain(..9).collect();
                    let payload: Vec<u8> = self.buf.drain(..len).collect();
                    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                    return Some(self.event(head[3], head[4], stream, &payload).await);
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.tls.read(&mut chunk)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => return Some(Event::Closed),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    async fn event(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Event {
        match kind {
            SETTINGS => {
                let ack = flags & ACK != 0;
                if !ack {
                    let _ = self.send(&frame(SETTINGS, ACK, 0, &[])).await;
                }
                let values =
                    payload.chunks_exact(6).map(|s| (u16::from_be_bytes([s[0], s[1]]), be32(&s[2..6]))).collect();
                Event::Settings { ack, values }
            }
            HEADERS => {
                Event::Headers { stream, status: status_of(payload, flags), end_stream: flags & END_STREAM != 0 }
            }
            DATA => Event::Data { stream, len: payload.len(), end_stream: flags & END_STREAM != 0 },
            RST_STREAM => Event::Reset { stream, code: be32(&payload[..4]) },
            GOAWAY => Event::GoAway { last_stream: be32(&payload[..4]) & 0x7fff_ffff, code: be32(&payload[4..8]) },
            PING => {
                let ack = flags & ACK != 0;
                if !ack && self.answer_pings {
                    let _ = self.send(&frame(PING, ACK, 0, payload)).await;
                }
                Event::Ping { ack }
            }
            other => Event::Other(other),
        }
    }

    /// Frames until one matches `want`, the connection closes, or `wait` passes; returns the match.
    pub async fn until<F: FnMut(&Event) -> bool>(&mut self, wait: Duration, mut want: F) -> Option<Event> {
        let deadline = Instant::now() + wait;
        loop {
            let event = self.next(deadline.saturating_duration_since(Instant::now())).await?;
            if want(&event) {
                return Some(event);
            }
            if event == Event::Closed {
                return None;
            }
        }
    }

    /// How the server ended `stream`: its response status, a stream reset, or a GOAWAY, whichever comes first.
    pub async fn outcome(&mut self, stream: u32, wait: Duration) -> Option<Event> {
        self.until(wait, |event| match event {
            Event::Headers { stream: s, .. } | Event::Reset { stream: s, .. } => *s == stream,
            Event::GoAway { .. } => true,
            _ => false,
        })
        .await
    }
}

fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// The `:status` of a response header block: h2 sends it first, either as a static-table index or as a literal
/// with the `:status` name index and a (Huffman-coded) value. Only the first response on a connection is
/// decodable this way (later ones may refer to the dynamic table).
fn status_of(payload: &[u8], flags: u8) -> Option<u16> {
    let mut at = 0;
    if flags & 0x8 != 0 {
        at += 1 + usize::from(payload[0]); // padding length
    }
    if flags & 0x20 != 0 {
        at += 5; // priority
    }
    // Skip dynamic table size updates.
    while payload.get(at)? & 0xe0 == 0x20 {
        at += 1;
    }
    let first = *payload.get(at)?;
    let (index, prefix) = if first & 0x80 != 0 {
        let index = usize::from(first & 0x7f);
        return [(8, 200), (9, 204), (10, 206), (11, 304), (12, 400), (13, 404), (14, 500)]
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, s)| *s);
    } else if first & 0xc0 == 0x40 {
        (usize::from(first & 0x3f), 1)
    } else {
        (usize::from(first & 0x0f), 1)
    };
    if !(8..=14).contains(&index) {
        return None;
    }
    at += prefix;
    let head = *payload.get(at)?;
    let len = usize::from(head & 0x7f);
    let value = payload.get(at + 1..at + 1 + len)?;
    let text = if head & 0x80 != 0 { huffman_digits(value)? } else { String::from_utf8(value.to_vec()).ok()? };
    text.parse().ok()
}

/// Decodes a Huffman-coded string of ASCII digits (RFC 7541 appendix B: `0`-`2` are 5-bit codes 0-2, `3`-`9`
/// 6-bit codes 0x19-0x1f; padding is all ones).
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let bits: Vec<u8> = bytes.iter().flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1)).collect();
    let value = |from: usize, n: usize| bits[from..from + n].iter().fold(0u8, |v, b| (v << 1) | b);
    let mut out = String::new();
    let mut at = 0;
    while at < bits.len() {
        let rest = bits.len() - at;
        if rest < 8 && bits[at..].iter().all(|&b| b == 1) {
            break;
        }
        if rest >= 5 && value(at, 5) <= 2 {
            out.push(char::from(b'0' + value(at, 5)));
            at += 5;
        } else if rest >= 6 && (0x19..=0x1f).contains(&value(at, 6)) {
            out.push(char::from(b'3' + value(at, 6) - 0x19));
            at += 6;
        } else {
            return None;
        }
    }
    Some(out)
}
