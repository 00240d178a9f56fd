//! The access log: one line per request, as text or JSON.
//!
//! A line is written when the response body has been sent (or the client went away), so that it carries the
//! bytes sent and the whole duration. Lines go through a bounded channel to a writer thread: request handling
//! never waits for the disk, and if the disk cannot keep up, lines are dropped and counted rather than slowing
//! traffic. Nothing secret is logged: no query string (it often carries tokens), no header values, no key
//! material.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::histogram::Histogram;
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::client_auth::ClientIdentity;

/// Lines waiting for the writer thread before new ones are dropped.
const QUEUE: usize = 16 * 1024;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// `time client "METHOD path VERSION" status bytes duration key=value...`
    Text,
    /// One JSON object per line.
    Json,
}

/// `[access_log]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogConfig {
    /// A file (appended to, created 0640), or `-` for standard output.
    pub path: PathBuf,
    /// Output format.
    pub format: AccessLogFormat,
}

/// One finished request.
#[derive(Debug, Clone)]
pub struct AccessRecord {
    /// When the request arrived (wall clock).
    pub time: SystemTime,
    /// The client's address.
    pub client: SocketAddr,
    /// The SNI of the connection.
    pub sni: Option<Arc<str>>,
    /// The request's host (from `Host` or `:authority`), or empty if it had none.
    pub host: String,
    /// The method.
    pub method: http::Method,
    /// The path, without the query string.
    pub path: String,
    /// HTTP version of the request.
    pub version: http::Version,
    /// The response status.
    pub status: u16,
    /// Response body bytes sent.
    pub bytes: u64,
    /// From the request's arrival to the end of the response body.
    pub duration: Duration,
    /// The upstream that answered, if any.
    pub upstream: Option<String>,
    /// TLS version of the connection.
    pub tls_version: &'static str,
    /// TLS cipher suite of the connection.
    pub cipher: &'static str,
    /// The request's id (`[proxy] request_id`), if given one.
    pub request_id: Option<http::HeaderValue>,
    /// The verified client certificate of the connection (`[tls.client_auth]`), if any.
    pub client_certificate: Option<Arc<ClientIdentity>>,
}

impl AccessRecord {
    /// The record as one text line (without the newline).
    pub fn to_text(&self) -> String {
        let mut line = String::with_capacity(192);
        let _ = write!(
            line,
            "{} {} \"{} {} {:?}\" {} {} {:.3}s sni={} host={} upstream={} tls={} cipher={}",
            rfc3339(self.time),
            self.client,
            self.method,
            Sanitized(&self.path),
            self.version,
            self.status,
            self.bytes,
            self.duration.as_secs_f64(),
            Sanitized(self.sni.as_deref().unwrap_or("-")),
            Sanitized(if self.host.is_empty() { "-" } else { &self.host }),
            Sanitized(self.upstream.as_deref().unwrap_or("-")),
            self.tls_version,
            self.cipher,
        );
        // Only with `[proxy] request_id`: the line is otherwise as it always was.
        if let Some(id) = self.request_id() {
            let _ = write!(line, " id={id}");
        }
        // Only for connections made with a client certificate, likewise.
        if let Some(certificate) = &self.client_certificate {
            let _ = write!(line, " client_cert={}", Sanitized(&certificate.subject));
        }
        line
    }

    /// The record as one JSON object (without the newline).
    pub fn to_json(&self) -> String {
        let mut json = serde_json::json!({
            "time": rfc3339(self.time),
            "client": self.client.to_string(),
            "sni": self.sni.as_deref(),
            "host": self.host,
            "method": self.method.as_str(),
            "path": self.path,
            "version": format!("{:?}", self.version),
            "status": self.status,
            "bytes": self.bytes,
            "duration_ms": self.duration.as_secs_f64() * 1000.0,
            "upstream": self.upstream,
            "tls_version": self.tls_version,
            "cipher": self.cipher,
        });
        if let (Some(id), Some(object)) = (self.request_id(), json.as_object_mut()) {
            object.insert("request_id".to_owned(), id.into());
        }
        if let (Some(certificate), Some(object)) = (&self.client_certificate, json.as_object_mut()) {
            object.insert("client_cert_subject".to_owned(), certificate.subject.as_str().into());
            object.insert("client_cert_hash".to_owned(), certificate.hash.as_str().into());
        }
        json.to_string()
    }

    /// The request id as text (sealgate makes them of hexadecimal digits only).
    fn request_id(&self) -> Option<&str> {
        self.request_id.as_ref().and_then(|id| id.to_str().ok())
    }
}

/// Writes a client-supplied string with spaces, quotes, backslashes and control characters escaped, so that a
/// request cannot forge log lines or fields.
struct Sanitized<'a>(&'a str);

impl std::fmt::Display for Sanitized<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in self.0.chars() {
            match c {
                ' ' | '"' | '\\' => write!(f, "\\x{:02x}", c as u32)?,
                c if c.is_control() => write!(f, "\\x{:02x}", c as u32)?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

fn rfc3339(time: SystemTime) -> String {
    OffsetDateTime::from(time).format(&Rfc3339).unwrap_or_else(|_| "-".to_owned())
}

/// Why the access log could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the access log {}: {source}", path.display())]
pub struct AccessLogError {
    /// The file.
    pub path: PathBuf,
    /// What the operating system said.
    pub source: std::io::Error,
}

/// The access log: a queue to a writer thread.
#[derive(Debug)]
pub struct AccessLog {
    queue: SyncSender<String>,
    format: AccessLogFormat,
    dropped: AtomicU64,
    /// Set to have the writer open the path again (log rotation); the writer clears it.
    reopen: Arc<AtomicBool>,
}

impl AccessLog {
    /// Opens the log and starts its writer thread.
    pub fn open(config: &AccessLogConfig) -> Result<Arc<Self>, AccessLogError> {
        let output = open_output(&config.path)?;
        let (queue, lines) = std::sync::mpsc::sync_channel(QUEUE);
        let reopen = Arc::new(AtomicBool::new(false));
        let writer = Writer { path: config.path.clone(), reopen: Arc::clone(&reopen) };
        std::thread::Builder::new()
            .name("sealgate-access-log".to_owned())
            .spawn(move || writer.run(lines, output))
            .map_err(|source| AccessLogError { path: config.path.clone(), source })?;
        Ok(Arc::new(Self { queue, format: config.format, dropped: AtomicU64::new(0), reopen }))
    }

    /// Has the writer open the path again, for log rotation: lines already queued go to the file they were
    /// queued for or the new one, none is lost. Done within the writer's flush period (100 ms); a path that
    /// cannot be opened is logged and the writer goes on with the file it had.
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }

    /// Queues one record; drops it (and counts it) if the writer is behind.
    pub fn log(&self, record: &AccessRecord) {
        let line = match self.format {
            AccessLogFormat::Text => record.to_text(),
            AccessLogFormat::Json => record.to_json(),
        };
        match self.queue.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Lines dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Where lines go: a file opened to append (created 0640), or standard output for `-`.
fn open_output(path: &Path) -> Result<Output, AccessLogError> {
    let output: Box<dyn std::io::Write + Send> = if path == Path::new("-") {
        Box::new(std::io::stdout())
    } else {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)
            .map_err(|source| AccessLogError { path: path.to_owned(), source })?;
        Box::new(file)
    };
    Ok(std::io::BufWriter::with_capacity(64 * 1024, output))
}

type Output = std::io::BufWriter<Box<dyn std::io::Write + Send>>;

/// The writer thread's own state.
struct Writer {
    path: PathBuf,
    reopen: Arc<AtomicBool>,
}

impl Writer {
    /// Writes lines as they come, flushes when the queue runs dry (or every 100 ms under constant load), opens
    /// the path again when asked, exits when the log is dropped.
    fn run(self, lines: Receiver<String>, mut out: Output) {
        let mut last_flush = Instant::now();
        loop {
            let received = lines.recv_timeout(Duration::from_millis(100));
            // Before the line is written: a line received after the request to reopen goes to the new file.
            if self.reopen.swap(false, Ordering::Relaxed) {
                let _ = out.flush();
                match open_output(&self.path) {
                    Ok(reopened) => out = reopened,
                    Err(error) => tracing::error!(%error, "access log not reopened; lines go on to the file it had"),
                }
            }
            let disconnected = matches!(received, Err(RecvTimeoutError::Disconnected));
            write_received(received, &mut out, &mut last_flush);
            if disconnected {
                return;
            }
        }
    }
}

/// Writes one received line, or flushes when the queue ran dry or closed.
fn write_received(received: Result<String, RecvTimeoutError>, out: &mut Output, last_flush: &mut Instant) {
    match received {
        Ok(line) => {
            let _ = out.write_all(line.as_bytes());
            let _ = out.write_all(b"\n");
            if last_flush.elapsed() >= Duration::from_millis(100) {
                let _ = out.flush();
                *last_flush = Instant::now();
            }
        }
        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
            let _ = out.flush();
            *last_flush = Instant::now();
        }
    }
}

/// A response body that, when it ends (or is dropped, when the client goes away first), logs the request with
/// the bytes sent and observes the request's duration in its route's histogram.
#[derive(Debug)]
pub struct LoggedBody<B> {
    inner: B,
    /// When the request arrived.
    started: Instant,
    /// Boxed: the record is a few hundred bytes, and hyper moves the body several times per response; without
    /// an access log this is a null pointer.
    pending: Option<Box<(Arc<AccessLog>, AccessRecord)>>,
    /// `sealgate_route_request_duration_seconds` of the request's route.
    duration: Option<Histogram>,
}

impl<B> LoggedBody<B> {
    /// Wraps `inner` for a request that arrived at `started`; `log`'s record is completed with the bytes and
    /// duration when the body ends, and the duration is observed in `duration`.
    pub fn new(
        inner: B,
        started: Instant,
        log: Option<Box<(Arc<AccessLog>, AccessRecord)>>,
        duration: Option<Histogram>,
    ) -> Self {
        Self { inner, started, pending: log, duration }
    }

    fn finish(&mut self) {
        let elapsed = self.started.elapsed();
        if let Some(histogram) = self.duration.take() {
            histogram.observe(elapsed.as_secs_f64());
        }
        if let Some(mut pending) = self.pending.take() {
            let (log, record) = &mut *pending;
            record.duration = elapsed;
            log.log(record);
        }
    }
}

impl<B> Drop for LoggedBody<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B: Body + Unpin> Body for LoggedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(pending)) = (frame.data_ref(), self.pending.as_mut()) {
                    pending.1.bytes += data.remaining() as u64;
                }
            }
            Poll::Ready(None | Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AccessRecord {
        AccessRecord {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            client: "203.0.113.7:50123".parse().unwrap(),
            sni: Some(Arc::from("app.example.test")),
            host: "app.example.test".to_owned(),
            method: http::Method::GET,
            path: "/a path\"with\nnasties".to_owned(),
            version: http::Version::HTTP_2,
            status: 200,
            bytes: 1234,
            duration: Duration::from_millis(12),
            upstream: Some("127.0.0.1:8080".to_owned()),
            tls_version: "TLSv1_3",
            cipher: "TLS13_AES_128_GCM_SHA256",
            request_id: None,
            client_certificate: None,
        }
    }

    #[test]
    fn text_lines_escape_what_the_client_controls() {
        let line = record().to_text();
        assert_eq!(
            line,
            "2027-01-15T08:00:00Z 203.0.113.7:50123 \"GET /a\\x20path\\x22with\\x0anasties HTTP/2.0\" 200 1234 0.012s \
             sni=app.example.test host=app.example.test upstream=127.0.0.1:8080 tls=TLSv1_3 \
             cipher=TLS13_AES_128_GCM_SHA256"
        );
        assert!(!line.contains('\n'));
    }

    #[test]
    fn json_lines_carry_every_field() {
        let value: serde_json::Value = serde_json::from_str(&record().to_json()).unwrap();
        for key in ["time", "client", "sni", "host", "method", "path", "status", "bytes", "duration_ms", "upstream"] {
            assert!(value.get(key).is_some(), "{key}");
        }
        assert_eq!(value["tls_version"], "TLSv1_3");
        assert_eq!(value["status"], 200);
        assert!(value.get("request_id").is_none(), "only with request ids");
        assert!(value.get("client_cert_subject").is_none(), "only with client certificates");
    }

    #[test]
    fn a_client_certificate_ends_the_line_when_there_is_one() {
        let identity = ClientIdentity {
            hash: "ab".repeat(32),
            subject: "CN=Ann Lee,O=Example\\, Inc.".to_owned(),
            forwarded: None,
        };
        let with_certificate = AccessRecord {
            request_id: Some(http::HeaderValue::from_static("00ff")),
            client_certificate: Some(Arc::new(identity)),
            ..record()
        };
        let line = with_certificate.to_text();
        assert!(line.ends_with(r" id=00ff client_cert=CN=Ann\x20Lee,O=Example\x5c,\x20Inc."), "{line}");
        let value: serde_json::Value = serde_json::from_str(&with_certificate.to_json()).unwrap();
        assert_eq!(value["client_cert_subject"], "CN=Ann Lee,O=Example\\, Inc.");
        assert_eq!(value["client_cert_hash"], "ab".repeat(32));
    }

    #[test]
    fn a_request_id_ends_the_line_when_there_is_one() {
        let with_id = AccessRecord { request_id: Some(http::HeaderValue::from_static("00ff")), ..record() };
        assert!(with_id.to_text().ends_with(" cipher=TLS13_AES_128_GCM_SHA256 id=00ff"), "{}", with_id.to_text());
        let value: serde_json::Value = serde_json::from_str(&with_id.to_json()).unwrap();
        assert_eq!(value["request_id"], "00ff");
    }

    #[tokio::test]
    async fn a_body_is_logged_once_when_it_ends_with_its_byte_count() {
        use http_body_util::BodyExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::open(&AccessLogConfig { path: path.clone(), format: AccessLogFormat::Json }).unwrap();
        let body = http_body_util::Full::new(bytes::Bytes::from_static(b"hello world"));
        let fresh = AccessRecord { bytes: 0, ..record() };
        let logged = LoggedBody::new(body, Instant::now(), Some(Box::new((Arc::clone(&log), fresh))), None);
        let collected = logged.collect().await.unwrap().to_bytes();
        assert_eq!(&collected[..], b"hello world");
        drop(log);
        let deadline = Instant::now() + Duration::from_secs(5);
        let text = loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if !text.is_empty() || Instant::now() > deadline {
                break text;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(text.lines().count(), 1, "{text}");
        let value: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(value["bytes"], 11);
    }
}
