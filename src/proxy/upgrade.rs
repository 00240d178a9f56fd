//! Protocol upgrades: WebSocket is tunnelled, everything else that would turn a request into a raw byte stream is
//! refused.
//!
//! - **WebSocket over HTTP/1.1** (`Connection: upgrade`, `Upgrade: websocket`): the request goes upstream with its
//!   upgrade headers; only when the upstream answers `101` with the same `Upgrade` does sealgate answer `101` and
//!   tunnel bytes both ways. Any other answer is passed on as an ordinary response; a `101` for another protocol
//!   is a `502`.
//! - **WebSocket over HTTP/2** (extended CONNECT, RFC 8441, `:protocol = websocket`): upstreams speak HTTP/1.1,
//!   so sealgate asks them for an HTTP/1.1 WebSocket upgrade (with a `Sec-WebSocket-Key` of its own, whose
//!   `Sec-WebSocket-Accept` it checks) and answers the stream `200` once the upstream switched.
//! - **Refused**: `h2c` and every other upgrade token (400), `CONNECT` (405): sealgate is a reverse proxy, not a
//!   tunnel to arbitrary places.
//!
//! A tunnel lives as long as its connection may: it ends when either side closes, when it has carried nothing
//! either way for `timeouts.tunnel_idle`, when the certificate's grant ends, or at the server's hard stop.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The GUID of RFC 6455 section 1.3, appended to a key to compute `Sec-WebSocket-Accept`.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// What a request asks for.
#[derive(Debug)]
pub enum Kind {
    /// An ordinary request.
    Plain,
    /// An HTTP/1.1 WebSocket upgrade, with the `Upgrade` value as sent.
    WebSocket(HeaderValue),
    /// An HTTP/2 extended CONNECT for WebSocket (RFC 8441).
    WebSocketOverH2,
    /// Refused with this status.
    Refused(StatusCode),
}

/// Request extension: the upstream request must carry these upgrade headers (they are hop-by-hop, so the usual
/// rewrite removes them).
#[derive(Debug, Clone)]
pub struct UpgradeHeaders {
    /// `Upgrade`.
    pub upgrade: HeaderValue,
    /// `Sec-WebSocket-Key` sealgate chose, when it speaks HTTP/1.1 upstream for an HTTP/2 client.
    pub key: Option<HeaderValue>,
}

/// Classifies a request.
pub fn classify<B>(request: &Request<B>) -> Kind {
    if request.method() == Method::CONNECT {
        return match request.extensions().get::<hyper::ext::Protocol>() {
            Some(protocol) if protocol.as_str().eq_ignore_ascii_case("websocket") => Kind::WebSocketOverH2,
            _ => Kind::Refused(StatusCode::METHOD_NOT_ALLOWED),
        };
    }
    let Some(upgrade) = request.headers().get(header::UPGRADE) else { return Kind::Plain };
    let asks_upgrade = request
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    if !asks_upgrade || request.version() != Version::HTTP_11 {
        // An `Upgrade` header that is not an upgrade request is a hop-by-hop header like any other: dropped.
        return Kind::Plain;
    }
    let websocket = upgrade.to_str().is_ok_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
    if websocket && request.method() == Method::GET {
        Kind::WebSocket(upgrade.clone())
    } else {
        Kind::Refused(StatusCode::BAD_REQUEST)
    }
}

/// Prepares the upstream request of an HTTP/2 WebSocket: an HTTP/1.1 `GET` with upgrade headers and a fresh
/// `Sec-WebSocket-Key`. Returns the key, to check the upstream's `Sec-WebSocket-Accept` against.
pub fn h2_to_h1<B>(request: &mut Request<B>) -> Option<HeaderValue> {
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).ok()?;
    let key = HeaderValue::from_str(&BASE64.encode(nonce)).ok()?;
    *request.method_mut() = Method::GET;
    request
        .extensions_mut()
        .insert(UpgradeHeaders { upgrade: HeaderValue::from_static("websocket"), key: Some(key.clone()) });
    Some(key)
}

/// Puts back the upgrade headers that the rewrite of a request removed, as an [`UpgradeHeaders`] extension asks.
pub fn restore_request_headers(extensions: &http::Extensions, headers: &mut HeaderMap) {
    if let Some(upgrade) = extensions.get::<UpgradeHeaders>() {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade.upgrade.clone());
        if let Some(key) = &upgrade.key {
            headers.insert(header::SEC_WEBSOCKET_KEY, key.clone());
            headers.entry(header::SEC_WEBSOCKET_VERSION).or_insert(HeaderValue::from_static("13"));
        }
    }
}

/// Whether the upstream switched to the protocol asked for: `101` with the same `Upgrade` token and, when
/// sealgate chose the key, the matching `Sec-WebSocket-Accept`.
pub fn upstream_switched<B>(response: &Response<B>, upgrade: &HeaderValue, key: Option<&HeaderValue>) -> bool {
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return false;
    }
    let same = response
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .zip(upgrade.to_str().ok())
        .is_some_and(|(got, asked)| got.trim().eq_ignore_ascii_case(asked.trim()));
    let accepted = match key {
        None => true,
        Some(key) => response.headers().get(header::SEC_WEBSOCKET_ACCEPT).is_some_and(|a| *a == accept_for(key)),
    };
    same && accepted
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455 section 4.2.2).
fn accept_for(key: &HeaderValue) -> HeaderValue {
    let mut input = key.as_bytes().to_vec();
    input.extend_from_slice(WEBSOCKET_GUID.as_bytes());
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
    // Base64 is always a valid header value.
    HeaderValue::from_str(&BASE64.encode(digest.as_ref())).unwrap_or(HeaderValue::from_static(""))
}

/// The client's response head for a switched upstream: HTTP/1.1 `101` with the upgrade headers (removed as
/// hop-by-hop on the way) put back and the upstream's `Sec-WebSocket-Accept` (computed from the client's own key);
/// HTTP/2 `200` without any of them (RFC 8441 section 5: the accept answered sealgate's key, not the client's).
pub fn client_head(headers: &mut HeaderMap, status: &mut StatusCode, upgrade: Option<&HeaderValue>) {
    match upgrade {
        Some(upgrade) => {
            *status = StatusCode::SWITCHING_PROTOCOLS;
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, upgrade.clone());
        }
        None => {
            *status = StatusCode::OK;
            headers.remove(header::SEC_WEBSOCKET_ACCEPT);
        }
    }
}

/// Copies bytes both ways between the client and the upstream once both have switched, until either closes,
/// nothing has moved for `idle`, the grant ends or the server stops.
pub async fn tunnel(client: OnUpgrade, upstream: OnUpgrade, closing: [CancellationToken; 2], idle: Duration) {
    let [grant_ended, hard_stop] = closing;
    let activity = Activity::new();
    let copy = async {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(both) => both,
            Err(error) => {
                tracing::debug!(%error, "upgrade did not complete");
                return;
            }
        };
        // Every byte the tunnel moves passes through the client's side, read or written: watching one side sees
        // all of its traffic.
        let mut client = Tracked { io: TokioIo::new(client), activity: &activity };
        let mut upstream = TokioIo::new(upstream);
        if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            tracing::debug!(%error, "tunnel ended with an error");
        }
    };
    tokio::select! {
        _ = copy => {}
        _ = activity.idle_for(idle) => tracing::debug!(?idle, "tunnel closed: nothing moved either way"),
        _ = grant_ended.cancelled() => tracing::debug!("tunnel closed: its certificate's grant ended"),
        _ = hard_stop.cancelled() => {}
    }
}

/// When a tunnel last moved a byte, for its idle timer.
struct Activity {
    start: Instant,
    /// Milliseconds from `start` to the last read or write that moved bytes.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self { start: Instant::now(), last: AtomicU64::new(0) }
    }

    fn touch(&self) {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(elapsed, Ordering::Relaxed);
    }

    /// Returns once nothing has moved for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let due = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed)) + limit;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

/// An I/O object that records in an [`Activity`] every read and write that moves bytes.
struct Tracked<'a, T> {
    io: T,
    activity: &'a Activity,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<'_, T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<'_, T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().method(method).uri("/chat").version(Version::HTTP_11);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn websocket_is_tunnelled_h2c_and_connect_are_refused() {
        let ws = request(Method::GET, &[("connection", "keep-alive, Upgrade"), ("upgrade", "WebSocket")]);
        assert!(matches!(classify(&ws), Kind::WebSocket(_)));
        let h2c = request(Method::GET, &[("connection", "upgrade, http2-settings"), ("upgrade", "h2c")]);
        assert!(matches!(classify(&h2c), Kind::Refused(StatusCode::BAD_REQUEST)));
        let connect = request(Method::CONNECT, &[]);
        assert!(matches!(classify(&connect), Kind::Refused(StatusCode::METHOD_NOT_ALLOWED)));
        let post = request(Method::POST, &[("connection", "upgrade"), ("upgrade", "websocket")]);
        assert!(matches!(classify(&post), Kind::Refused(StatusCode::BAD_REQUEST)));
        let stray = request(Method::GET, &[("upgrade", "websocket")]);
        assert!(matches!(classify(&stray), Kind::Plain), "Upgrade without Connection: upgrade is not an upgrade");
    }

    #[test]
    fn the_accept_value_follows_rfc6455() {
        // RFC 6455 section 1.3's example.
        let accept = accept_for(&HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="));
        assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn only_the_protocol_asked_for_counts_as_switched() {
        let ws = HeaderValue::from_static("websocket");
        let response = |status: u16, upgrade: &str| {
            Response::builder().status(status).header("upgrade", upgrade).body(()).unwrap()
        };
        assert!(upstream_switched(&response(101, "WebSocket"), &ws, None));
        assert!(!upstream_switched(&response(101, "h2c"), &ws, None));
        assert!(!upstream_switched(&response(200, "websocket"), &ws, None));
        let key = HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ==");
        assert!(!upstream_switched(&response(101, "websocket"), &ws, Some(&key)), "the accept value is checked");
    }
}
