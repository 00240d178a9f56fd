//! Raw bytes both ways: a TLS client that writes requests by hand, and an upstream that records every byte it
//! receives, parses requests strictly and answers each with a fixed 200.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

/// What a raw client got back.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    /// Every byte received.
    pub bytes: Vec<u8>,
    /// Whether the server closed the connection (EOF or an error) before the wait ended.
    pub closed: bool,
}

impl Reply {
    /// The status code of every response in the reply, in order (each framed by its `content-length`).
    pub fn statuses(&self) -> Vec<u16> {
        let mut statuses = Vec::new();
        let mut rest = &self.bytes[..];
        while let Some(status) = rest.get(9..12).and_then(|s| std::str::from_utf8(s).ok()?.parse().ok()) {
            if !rest.starts_with(b"HTTP/1.1 ") {
                break;
            }
            statuses.push(status);
            let Some(end) = find(rest, b"\r\n\r\n") else { break };
            let len = content_length(&rest[..end]);
            rest = &rest[(end + 4 + len).min(rest.len())..];
        }
        statuses
    }

    /// The status of the first response, if any.
    pub fn status(&self) -> Option<u16> {
        self.statuses().first().copied()
    }
}

/// Writes `bytes` and reads until the server closes or `wait` passes. A complete response (head and a body of
/// its `content-length`) followed by `linger` without more data also ends the wait: the server keeps the
/// connection open.
pub async fn exchange(stream: &mut TlsStream<TcpStream>, bytes: &[u8], wait: Duration) -> Reply {
    if stream.write_all(bytes).await.is_err() || stream.flush().await.is_err() {
        return Reply { bytes: Vec::new(), closed: true };
    }
    read_reply(stream, wait).await
}

/// Reads until the server closes, or a complete response is followed by 300 ms of silence, or `wait` passes.
pub async fn read_reply(stream: &mut TlsStream<TcpStream>, wait: Duration) -> Reply {
    read_until(stream, wait, Duration::from_millis(300)).await
}

/// Reads until one response is complete (or the server closes, or `wait` passes), and no further.
pub async fn read_response(stream: &mut TlsStream<TcpStream>, wait: Duration) -> Reply {
    read_until(stream, wait, Duration::ZERO).await
}

async fn read_until(stream: &mut TlsStream<TcpStream>, wait: Duration, linger: Duration) -> Reply {
    let deadline = Instant::now() + wait;
    let mut reply = Reply::default();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if linger.is_zero() && response_complete(&reply.bytes) {
            return reply;
        }
        let until = if response_complete(&reply.bytes) { (Instant::now() + linger).min(deadline) } else { deadline };
        match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
            Err(_) => return reply,
            Ok(Ok(0)) | Ok(Err(_)) => {
                reply.closed = true;
                return reply;
            }
            Ok(Ok(n)) => reply.bytes.extend_from_slice(&buf[..n]),
        }
    }
}

/// Whether `bytes` hold at least one whole response with a `content-length`.
fn response_complete(bytes: &[u8]) -> bool {
    let Some(end) = find(bytes, b"\r\n\r\n") else { return false };
    bytes.len() >= end + 4 + content_length(&bytes[..end])
}

/// The `content-length` of a response head (0 when absent).
fn content_length(head: &[u8]) -> usize {
    String::from_utf8_lossy(head)
        .to_ascii_lowercase()
        .lines()
        .find_map(|line| line.strip_prefix("content-length:").and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// Waits until the server closes `stream` (EOF or error, discarding whatever it sends) or `wait` passes;
/// returns how long it took.
pub async fn closed_within(stream: &mut TlsStream<TcpStream>, wait: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(start + wait, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// Same as [`closed_within`] for a plain TCP stream.
pub async fn tcp_closed_within(stream: &mut TcpStream, wait: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(start + wait, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// The position of `needle` in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One request as the raw upstream parsed it.
#[derive(Debug, Clone)]
pub struct RawRequest {
    /// The request line.
    pub line: String,
    /// Header fields in order, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
    /// Whether the whole message arrived (false: the connection closed mid-body).
    pub complete: bool,
}

impl RawRequest {
    /// Every value of header `name`.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect()
    }
}

/// An upstream that records the raw bytes of every connection and parses them strictly (CRLF only, one framing
/// header, plain decimal lengths, exact chunked syntax), answering each request with `200 ok`. Anything it
/// cannot parse unambiguously is recorded in `violations`.
#[derive(Debug, Clone)]
pub struct RawUpstream {
    /// Its address.
    pub addr: SocketAddr,
    /// The raw bytes received, per connection.
    pub connections: Arc<Mutex<Vec<Vec<u8>>>>,
    /// The requests parsed, in order.
    pub requests: Arc<Mutex<Vec<RawRequest>>>,
    /// What could not be parsed unambiguously.
    pub violations: Arc<Mutex<Vec<String>>>,
}

impl RawUpstream {
    /// Starts one on loopback.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = Self {
            addr: listener.local_addr().unwrap(),
            connections: Arc::default(),
            requests: Arc::default(),
            violations: Arc::default(),
        };
        let recorder = upstream.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(recorder.clone().serve(tcp));
            }
        });
        upstream
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The requests parsed so far.
    pub fn requests(&self) -> Vec<RawRequest> {
        self.requests.lock().unwrap().clone()
    }

    /// Every byte received on every connection.
    pub fn total_bytes(&self) -> usize {
        self.connections.lock().unwrap().iter().map(Vec::len).sum()
    }

    /// Panics if anything reached the upstream that it could not parse unambiguously.
    pub fn assert_unambiguous(&self, case: &str) {
        let violations = self.violations.lock().unwrap();
        assert!(violations.is_empty(), "{case}: the upstream received ambiguous framing: {violations:?}");
    }

    async fn serve(self, mut tcp: TcpStream) {
        let index = {
            let mut connections = self.connections.lock().unwrap();
            connections.push(Vec::new());
            connections.len() - 1
        };
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match parse_request(&buf) {
                Parsed::Complete(request, used) => {
                    self.requests.lock().unwrap().push(request);
                    buf.drain(..used);
                    if tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.is_err() {
                        return;
                    }
                    continue;
                }
                Parsed::Invalid(why) => {
                    self.violations.lock().unwrap().push(why);
                    return;
                }
                Parsed::Partial(_) => {}
            }
            let n = tcp.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                if let Parsed::Partial(Some(request)) = parse_request(&buf) {
                    self.requests.lock().unwrap().push(request);
                }
                return;
            }
            self.connections.lock().unwrap()[index].extend_from_slice(&chunk[..n]);
            buf.extend_from_slice(&chunk[..n]);
        }
    }
}

enum Parsed {
    /// Not all there yet; with what is known of the request when its head is.
    Partial(Option<RawRequest>),
    /// A whole request, and the bytes it used.
    Complete(RawRequest, usize),
    /// Not unambiguous HTTP/1.1.
    Invalid(String),
}

fn parse_request(buf: &[u8]) -> Parsed {
    let head_end = find(buf, b"\r\n\r\n");
    let head = &buf[..head_end.unwrap_or(buf.len())];
    if head.iter().enumerate().any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r')) {
        return Parsed::Invalid(format!("bare LF in {:?}", String::from_utf8_lossy(head)));
    }
    let Some(end) = head_end else { return Parsed::Partial(None) };
    let Ok(head) = std::str::from_utf8(&buf[..end]) else { return Parsed::Invalid("non-UTF-8 head".into()) };
    if head.bytes().any(|b| (b < 0x20 && b != b'\r' && b != b'\n' && b != b'\t') || b == 0x7f) {
        return Parsed::Invalid(format!("control character in head {head:?}"));
    }
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default().to_owned();
    let mut headers = Vec::new();
    for field in lines {
        if field.contains('\r') || field.contains('\n') || field.starts_with([' ', '\t']) {
            return Parsed::Invalid(format!("bad field line {field:?}"));
        }
        let Some((name, value)) = field.split_once(':') else { return Parsed::Invalid(format!("no colon: {field:?}")) };
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return Parsed::Invalid(format!("bad field name {name:?}"));
        }
        headers.push((name.to_ascii_lowercase(), value.trim_matches([' ', '\t']).to_owned()));
    }
    let request = RawRequest { line, headers, body: Vec::new(), complete: false };
    let lengths = request.all("content-length");
    let codings = request.all("transfer-encoding");
    if !lengths.is_empty() && !codings.is_empty() {
        return Parsed::Invalid(format!("both Content-Length and Transfer-Encoding: {:?}", request.headers));
    }
    if lengths.len() > 1 || codings.len() > 1 {
        return Parsed::Invalid(format!("repeated framing header: {:?}", request.headers));
    }
    let body = &buf[end + 4..];
    if let Some(len) = lengths.first() {
        if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) || (len.len() > 1 && len.starts_with('0')) {
            return Parsed::Invalid(format!("non-canonical Content-Length {len:?}"));
        }
        let Ok(len) = len.parse::<usize>() else { return Parsed::Invalid(format!("Content-Length {len:?}")) };
        if body.len() < len {
            return Parsed::Partial(Some(RawRequest { body: body.to_vec(), ..request }));
        }
        return Parsed::Complete(RawRequest { body: body[..len].to_vec(), complete: true, ..request }, end + 4 + len);
    }
    if let Some(coding) = codings.first() {
        if *coding != "chunked" {
            return Parsed::Invalid(format!("Transfer-Encoding {coding:?}"));
        }
        return match dechunk(body) {
            Dechunked::Done(data, used) => {
                Parsed::Complete(RawRequest { body: data, complete: true, ..request }, end + 4 + used)
            }
            Dechunked::Partial(data) => Parsed::Partial(Some(RawRequest { body: data, ..request })),
            Dechunked::Invalid(why) => Parsed::Invalid(why),
        };
    }
    Parsed::Complete(RawRequest { complete: true, ..request }, end + 4)
}

enum Dechunked {
    Done(Vec<u8>, usize),
    Partial(Vec<u8>),
    Invalid(String),
}

/// Strict chunked decoding: hex size, optional extensions, CRLF, data, CRLF; a zero chunk, then trailers.
fn dechunk(buf: &[u8]) -> Dechunked {
    let mut data = Vec::new();
    let mut at = 0;
    loop {
        let Some(line_end) = find(&buf[at..], b"\r\n") else { return Dechunked::Partial(data) };
        let line = &buf[at..at + line_end];
        let size_text = line.split(|&b| b == b';').next().unwrap_or_default();
        let Some(size) = std::str::from_utf8(size_text).ok().and_then(|s| usize::from_str_radix(s, 16).ok()) else {
            return Dechunked::Invalid(format!("chunk size line {:?}", String::from_utf8_lossy(line)));
        };
        at += line_end + 2;
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(line_end) = find(&buf[at..], b"\r\n") else { return Dechunked::Partial(data) };
                at += line_end + 2;
                if line_end == 0 {
                    return Dechunked::Done(data, at);
                }
            }
        }
        if buf.len() < at + size + 2 {
            data.extend_from_slice(&buf[at..buf.len().min(at + size)]);
            return Dechunked::Partial(data);
        }
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Dechunked::Invalid("chunk data not followed by CRLF".into());
        }
        data.extend_from_slice(&buf[at..at + size]);
        at += size + 2;
    }
}

/// Reads the admin endpoint's `/metrics` and returns the value of the sample `series` (name and labels exactly
/// as printed), or 0 when it is absent.
pub async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let mut tcp = TcpStream::connect(admin).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.unwrap();
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}
