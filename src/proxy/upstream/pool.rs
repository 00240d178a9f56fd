//! The connection pool of a route: kept-alive HTTP/1.1 connections to `http` and `https` upstreams, made with
//! hyper's connection API (`hyper::client::conn::http1`); or, with `upstream_protocol = "http2"`, one shared
//! HTTP/2 connection per upstream (`hyper::client::conn::http2`).
//!
//! **Why not hyper-util's pooled client.** Its pool is one map keyed by scheme and authority behind a mutex,
//! hashed with SipHash byte by byte on every checkout and return; every request races a checkout against a lazy
//! connect, and every response spawns a task that waits for the connection to be ready again before putting it
//! back. Under `wrk` through the proxy that was about a third of sealgate's user time per proxied request.
//! Here each upstream ([`Upstream`], held by the route's endpoint) has its own short list of idle connections;
//! a connection goes back to it when its response body has been delivered (see [`PooledBody`]), with no task and
//! no map.
//!
//! **Reuse.** Idle connections are taken most recently used first (their buffers are warm, and the oldest ones
//! age out). A connection the upstream closed meanwhile is skipped; one that closed as the request was handed to
//! it gives the request back unsent, which then goes to the next idle connection or a new one: the race with an
//! upstream's keep-alive timeout never fails a request. At most `pool_max_idle_per_host` connections stay idle
//! per upstream, each for at most `pool_idle_timeout` (a reaper task per upstream, started with its first
//! connection, stopped with the route).
//!
//! **TLS** to upstreams is rustls with the aws-lc-rs provider (as on the client side), through tokio-rustls.
//! Certificates are verified against the route's `ca` file only: no system roots are loaded behind the user's
//! back, and verification cannot be turned off. The server name (SNI, and the name the certificate must carry)
//! is the upstream URL's host; an IP address is checked against the certificate's IP addresses and sent
//! without SNI, as RFC 6066 requires (rustls does both for a `ServerName::IpAddress`). ALPN offers `http/1.1`
//! only, or `h2` only for an HTTP/2 route. The connect timeout covers the TCP connection and the TLS handshake.
//!
//! **HTTP/2.** Requests multiplex on one connection per upstream, made by the first request that needs it
//! (others wait for it under the upstream's lock rather than each opening one) and replaced once closed. A
//! request is given back unsent by a connection that closed (or went away) before taking it, and is then sent
//! on a new connection, once. There is no idle list: the connection stays open, PINGed, until no request has
//! taken it for `pool_idle_timeout` (its own reaper task then lets it go: it closes once its streams have
//! ended), or the route or the upstream closes it.
//!
//! Each route has its own pool, since each route has its own trust: two routes to the same upstream do not
//! share connections.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{header, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::config::{ProxyConfig, UpstreamProtocol};
use crate::proxy::limits::RequestBody as ClientBody;

/// The body of a request sent upstream: the client's, streamed, or none (a bodiless request, which can be sent
/// again on a retry).
pub type UpstreamBody = Either<ClientBody, Empty<Bytes>>;

/// Why a route's pool could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The CA file cannot be read.
    #[error("cannot read the upstream CA file {}: {source}", path.display())]
    ReadCa {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The CA file holds no usable certificate.
    #[error("the upstream CA file {} holds no PEM certificate", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A certificate of the CA file is not a usable trust anchor.
    #[error("the upstream CA file {} holds an invalid certificate: {reason}", path.display())]
    InvalidCertificate {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the client configuration.
    #[error("cannot build the upstream TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Why a request could not be exchanged with an upstream.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The TCP connection failed (refused, unreachable, the name does not resolve).
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    /// The TCP connection and TLS handshake did not complete within the connect timeout.
    #[error("no connection within {0:?}")]
    ConnectTimeout(Duration),
    /// The TLS handshake failed (the certificate not trusted, not for this name, no common protocol).
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] std::io::Error),
    /// An `https` upstream on a route without a `ca` (the configuration refuses that).
    #[error("no CA to verify an https upstream with")]
    NoTrust,
    /// An `https` upstream whose host is no TLS server name (the configuration refuses that too): it is never
    /// spoken to in plain text instead.
    #[error("the upstream's host is not a name or address TLS can verify")]
    NoServerName,
    /// The exchange failed: the connection closed or reset before a complete response head, or the response
    /// is not valid HTTP.
    #[error("{0}")]
    Exchange(#[source] hyper::Error),
    /// The request could not be put in the form the upstream's protocol needs.
    #[error("cannot make the upstream request: {0}")]
    Request(#[source] http::Error),
}

/// A route's pool: how to make connections. The idle connections themselves are each [`Upstream`]'s.
#[derive(Debug, Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// For `https` upstreams; `None` without a `ca`.
    tls: Option<Arc<ClientConfig>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    /// Whether the route's upstreams speak HTTP/2 (`upstream_protocol = "http2"`).
    http2: bool,
}

impl Pool {
    /// A pool with the `[proxy]` settings, trusting the CAs in `ca` for `https` upstreams (none without it:
    /// the configuration refuses `https` upstreams without a `ca`).
    pub fn new(config: &ProxyConfig, ca: Option<&Path>, protocol: UpstreamProtocol) -> Result<Self, PoolError> {
        let http2 = protocol == UpstreamProtocol::Http2;
        let tls = match ca {
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                load_roots(path, &mut roots)?;
                let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
                let mut tls = ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                tls.alpn_protocols = vec![if http2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
                Some(Arc::new(tls))
            }
            None => None,
        };
        Ok(Self {
            shared: Arc::new(Shared {
                tls,
                connect_timeout: config.connect_timeout,
                idle_timeout: config.pool_idle_timeout,
                max_idle: config.pool_max_idle_per_host,
                http2,
            }),
        })
    }

    /// Whether the route's upstreams speak HTTP/2.
    pub fn speaks_http2(&self) -> bool {
        self.shared.http2
    }

    /// Sends `request` (origin-form URI, `Host` set) to `upstream` on an idle connection, or a new one when none
    /// is idle. The response's body gives the connection back to `upstream` once delivered. To an HTTP/2
    /// upstream, on its one shared connection (see [`Pool::send_multiplexed`]).
    pub async fn send(
        &self,
        upstream: &Upstream,
        mut request: Request<UpstreamBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        if self.shared.http2 {
            // Boxed: the HTTP/1.1 path, every other route's, should not carry this future's room.
            return Box::pin(self.send_multiplexed(upstream, request)).await;
        }
        while let Some(mut sender) = upstream.idle.checkout() {
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(self.lease(upstream, sender, response)),
                // Closed before the request was written: it comes back unsent, for the next connection.
                Err(mut error) => match error.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(SendError::Exchange(error.into_error())),
                },
            }
        }
        // Boxed: connecting (name resolution, a TLS client connection) is most of this future's size, which every
        // request would otherwise carry and copy, though nearly all of them find an idle connection.
        let mut sender = Box::pin(self.connect(upstream)).await?;
        let response = sender.send_request(request).await.map_err(SendError::Exchange)?;
        Ok(self.lease(upstream, sender, response))
    }

    /// `response`'s connection, to go back to `upstream`'s idle list when its body has been delivered; an
    /// upgraded connection is the tunnel's and never goes back.
    fn lease(
        &self,
        upstream: &Upstream,
        sender: SendRequest<UpstreamBody>,
        response: Response<Incoming>,
    ) -> Response<PooledBody> {
        let lease = (response.status() != StatusCode::SWITCHING_PROTOCOLS).then(|| Lease {
            sender,
            idle: Arc::clone(&upstream.idle),
            max_idle: self.shared.max_idle,
        });
        response.map(|inner| PooledBody { inner, ended: false, lease })
    }

    /// A new connection to `upstream`, its HTTP/1.1 side running in a task of its own.
    async fn connect(&self, upstream: &Upstream) -> Result<SendRequest<UpstreamBody>, SendError> {
        let timeout = self.shared.connect_timeout;
        let connecting = async {
            match self.open(upstream).await? {
                Transport::Plain(tcp) => http1::handshake(TokioIo::new(tcp)).await.map(|(sender, connection)| {
                    spawn_connection(connection);
                    sender
                }),
                Transport::Tls(stream) => http1::handshake(TokioIo::new(stream)).await.map(|(sender, connection)| {
                    spawn_connection(connection);
                    sender
                }),
            }
            .map_err(SendError::Exchange)
        };
        let sender =
            tokio::time::timeout(timeout, connecting).await.map_err(|_| SendError::ConnectTimeout(timeout))??;
        upstream.idle.start_reaper(self.shared.idle_timeout, &upstream.stop);
        Ok(sender)
    }

    /// The TCP connection to `upstream`, with TLS over it for `https`.
    async fn open(&self, upstream: &Upstream) -> Result<Transport, SendError> {
        let tcp = TcpStream::connect((&*upstream.host, upstream.port)).await.map_err(SendError::Connect)?;
        // Requests and responses are written whole; Nagle would only delay the last segment.
        tcp.set_nodelay(true).map_err(SendError::Connect)?;
        match &upstream.security {
            Security::Plain => Ok(Transport::Plain(tcp)),
            Security::NoServerName => Err(SendError::NoServerName),
            Security::Tls(name) => {
                let tls = TlsConnector::from(self.shared.tls.clone().ok_or(SendError::NoTrust)?);
                let stream = tls.connect(name.clone(), tcp).await.map_err(SendError::Tls)?;
                Ok(Transport::Tls(Box::new(stream)))
            }
        }
    }

    /// Sends `request` to an HTTP/2 upstream on the connection all of the route's requests to it share, made
    /// when there is none or the last one closed. A request the connection took no more (it closed, or the
    /// upstream sent GOAWAY, after it was looked up) comes back unsent and goes once more, on a new connection:
    /// as with HTTP/1.1, the race with an upstream closing an idle connection never fails a request.
    async fn send_multiplexed(
        &self,
        upstream: &Upstream,
        request: Request<UpstreamBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        let mut request = upstream.http2_form(request)?;
        let mut resent = false;
        loop {
            let mut sender = self.multiplexed_sender(upstream).await?;
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(response.map(|inner| PooledBody { inner, ended: false, lease: None })),
                Err(mut error) => match error.take_message() {
                    Some(unsent) if !resent => {
                        request = unsent;
                        resent = true;
                    }
                    _ => return Err(SendError::Exchange(error.into_error())),
                },
            }
        }
    }

    /// `upstream`'s shared HTTP/2 connection, made now if it has none open. Requests arriving while it is being
    /// made wait for it rather than each making their own.
    async fn multiplexed_sender(&self, upstream: &Upstream) -> Result<http2::SendRequest<UpstreamBody>, SendError> {
        let mut shared = upstream.multiplexed.lock().await;
        if let Some(multiplexed) = shared.as_mut().filter(|m| !m.sender.is_closed()) {
            multiplexed.last_used = Instant::now();
            return Ok(multiplexed.sender.clone());
        }
        let timeout = self.shared.connect_timeout;
        let connecting = async {
            let mut builder = http2::Builder::new(TokioExecutor::new());
            // PINGs find a connection whose upstream vanished without closing it, idle or not, before a request
            // is sent on it; the window grows with the bandwidth-delay product, as on the client side.
            builder
                .timer(TokioTimer::new())
                .keep_alive_interval(HTTP2_KEEP_ALIVE_INTERVAL)
                .keep_alive_timeout(HTTP2_KEEP_ALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
                .adaptive_window(true)
                // One stream until the upstream's SETTINGS say how many it takes (then as many, or no limit when
                // they name none): assuming 100, as HTTP/2 clients do, an upstream that allows fewer refuses the
                // rest of a first burst with REFUSED_STREAM, and a request whose body went with it cannot be
                // sent again. The first round trip carries one request; the connection is made once.
                .initial_max_send_streams(1);
            let handshake = match self.open(upstream).await? {
                Transport::Plain(tcp) => builder.handshake(TokioIo::new(tcp)).await.map(spawn_http2_connection),
                Transport::Tls(stream) => builder.handshake(TokioIo::new(stream)).await.map(spawn_http2_connection),
            };
            handshake.map_err(SendError::Exchange)
        };
        let sender =
            tokio::time::timeout(timeout, connecting).await.map_err(|_| SendError::ConnectTimeout(timeout))??;
        let generation = shared.as_ref().map_or(0, |old| old.generation.wrapping_add(1));
        *shared = Some(Multiplexed { sender: sender.clone(), last_used: Instant::now(), generation });
        reap_multiplexed(&upstream.multiplexed, generation, self.shared.idle_timeout, &upstream.stop);
        Ok(sender)
    }
}

/// An HTTP/2 upstream's shared connection, and when a request last took it.
#[derive(Debug)]
struct Multiplexed {
    sender: http2::SendRequest<UpstreamBody>,
    last_used: Instant,
    /// Tells this connection from the one before it, for its reaper.
    generation: u64,
}

/// Lets the shared HTTP/2 connection `generation` in `slot` go once no request has taken it for `timeout`:
/// hyper closes a connection whose handles are all dropped once its streams have ended. The reaper ends with
/// that connection (closed or replaced) or the route.
fn reap_multiplexed(
    slot: &Arc<tokio::sync::Mutex<Option<Multiplexed>>>,
    generation: u64,
    timeout: Duration,
    stop: &CancellationToken,
) {
    spawn_reaper(slot, timeout, stop, move |slot| async move {
        let mut shared = slot.lock().await;
        match shared.as_ref() {
            Some(multiplexed) if multiplexed.generation != generation || multiplexed.sender.is_closed() => {
                ControlFlow::Break(())
            }
            Some(multiplexed) if multiplexed.last_used.elapsed() >= timeout => {
                tracing::debug!(?timeout, "closing an idle HTTP/2 upstream connection");
                *shared = None;
                ControlFlow::Break(())
            }
            Some(_) => ControlFlow::Continue(()),
            None => ControlFlow::Break(()),
        }
    });
}

/// Spawns a task that sweeps `target` every quarter of `timeout` (at least every 100 ms), so that what a sweep
/// lets go after `timeout` idle goes between `timeout` and 1.25 × `timeout` after its last use; until a sweep
/// breaks, `target` is dropped, or `stop` (the route) is cancelled.
fn spawn_reaper<T, F, Fut>(target: &Arc<T>, timeout: Duration, stop: &CancellationToken, mut sweep: F)
where
    T: Send + Sync + 'static,
    F: FnMut(Arc<T>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ControlFlow<()>> + Send,
{
    let target = Arc::downgrade(target);
    let stop = stop.clone();
    let tick = (timeout / 4).max(Duration::from_millis(100));
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(tick);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let Some(target) = target.upgrade() else { return };
            if sweep(target).await.is_break() {
                return;
            }
        }
    });
}

/// Interval of the PINGs on an HTTP/2 upstream connection.
const HTTP2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// How long an HTTP/2 upstream may take to answer a PING before its connection is closed.
const HTTP2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A connection to an upstream, before HTTP.
enum Transport {
    Plain(TcpStream),
    /// Boxed: the TLS client connection is several times the size of a TCP stream.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Runs an HTTP/2 connection in a task of its own until it closes: when the upstream closes it, or once its
/// shared sender and every request on it are gone (the route was dropped).
fn spawn_http2_connection<T>(
    (sender, connection): (http2::SendRequest<UpstreamBody>, http2::Connection<T, UpstreamBody, TokioExecutor>),
) -> http2::SendRequest<UpstreamBody>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "upstream HTTP/2 connection closed with an error");
        }
    });
    sender
}

/// Runs a connection's HTTP/1.1 side (with upgrades, for WebSocket tunnels) until it closes.
fn spawn_connection<T>(connection: http1::Connection<T, UpstreamBody>)
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%error, "upstream connection closed with an error");
        }
    });
}

/// One upstream: where to connect, and its idle connections.
#[derive(Debug)]
pub struct Upstream {
    /// The host to connect to (a name to resolve, or an IP address without brackets).
    host: Box<str>,
    port: u16,
    security: Security,
    idle: Arc<IdleList>,
    /// The one connection of an HTTP/2 upstream, shared by its requests (unused for HTTP/1.1).
    multiplexed: Arc<tokio::sync::Mutex<Option<Multiplexed>>>,
    /// `http` or `https`, and the URL's authority: an HTTP/2 request's `:scheme`, and its `:authority` when
    /// the request has no `Host`.
    scheme: Scheme,
    authority: Authority,
    /// Cancelled when the route is dropped: ends the reaper.
    stop: CancellationToken,
}

impl Upstream {
    /// `scheme://authority` (port included), until `stop` is cancelled.
    pub fn new(scheme: &Scheme, authority: &Authority, stop: CancellationToken) -> Self {
        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
        let https = *scheme == Scheme::HTTPS;
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let security = match https {
            false => Security::Plain,
            true => ServerName::try_from(host.to_owned()).map_or(Security::NoServerName, Security::Tls),
        };
        Self {
            host: host.into(),
            port,
            security,
            idle: Arc::default(),
            multiplexed: Arc::default(),
            scheme: scheme.clone(),
            authority: authority.clone(),
            stop,
        }
    }

    /// `request` as an HTTP/2 client sends it: an absolute URI, whose scheme and authority become `:scheme` and
    /// `:authority` (the authority from `Host`, which HTTP/2 replaces, or the upstream's), and no `Host`.
    fn http2_form(&self, request: Request<UpstreamBody>) -> Result<Request<UpstreamBody>, SendError> {
        let (mut head, body) = request.into_parts();
        let authority = head
            .headers
            .remove(header::HOST)
            .and_then(|host| Authority::try_from(host.as_bytes()).ok())
            .unwrap_or_else(|| self.authority.clone());
        let mut uri = std::mem::take(&mut head.uri).into_parts();
        uri.scheme = Some(self.scheme.clone());
        uri.authority = Some(authority);
        if uri.path_and_query.is_none() {
            uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        head.uri = Uri::from_parts(uri).map_err(|error| SendError::Request(http::Error::from(error)))?;
        head.version = Version::HTTP_2;
        Ok(Request::from_parts(head, body))
    }
}

/// What an upstream's connections speak over TCP.
#[derive(Debug)]
enum Security {
    /// `http`.
    Plain,
    /// `https`, verifying (and sending as SNI, unless it is an address) this name.
    Tls(ServerName<'static>),
    /// `https` with a host that makes no server name: connections fail.
    NoServerName,
}

/// An upstream's idle connections, most recently used last.
#[derive(Debug, Default)]
struct IdleList {
    connections: Mutex<Vec<Idle>>,
    reaping: AtomicBool,
}

#[derive(Debug)]
struct Idle {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

impl IdleList {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // The list is valid after any panic of a holder (pushes and pops only): poisoning is ignored.
        self.connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The most recently used connection ready for a request. Closed ones are dropped; ones not ready yet (still
    /// finishing the previous exchange) stay for later.
    fn checkout(&self) -> Option<SendRequest<UpstreamBody>> {
        let mut connections = self.lock();
        let mut index = connections.len();
        while index > 0 {
            index -= 1;
            let Some(idle) = connections.get(index) else { break };
            if idle.sender.is_closed() {
                connections.remove(index);
            } else if idle.sender.is_ready() {
                return Some(connections.remove(index).sender);
            }
        }
        None
    }

    /// Puts a connection back, unless `max_idle` are idle already (then it is dropped, which closes it).
    fn put_back(&self, sender: SendRequest<UpstreamBody>, max_idle: usize) {
        if sender.is_closed() {
            return;
        }
        let mut connections = self.lock();
        if connections.len() < max_idle {
            connections.push(Idle { sender, since: Instant::now() });
        }
    }

    /// Starts the task that closes connections idle for `timeout`, once per upstream.
    fn start_reaper(self: &Arc<Self>, timeout: Duration, stop: &CancellationToken) {
        if self.reaping.swap(true, Ordering::Relaxed) {
            return;
        }
        spawn_reaper(self, timeout, stop, move |list| {
            let now = Instant::now();
            list.lock().retain(|idle| !idle.sender.is_closed() && now.duration_since(idle.since) < timeout);
            std::future::ready(ControlFlow::Continue(()))
        });
    }
}

/// A response's connection, given back to its upstream's idle list when the response body has been delivered.
#[derive(Debug)]
struct Lease {
    sender: SendRequest<UpstreamBody>,
    idle: Arc<IdleList>,
    max_idle: usize,
}

/// An upstream's response body, streamed as it arrives. When it has been read to its end (or it was empty) and
/// is dropped, its connection goes back to the pool; dropped before its end, the connection closes with it
/// (hyper cannot reuse a connection with a response half read).
#[derive(Debug)]
pub struct PooledBody {
    inner: Incoming,
    ended: bool,
    lease: Option<Lease>,
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            if self.ended || self.inner.is_end_stream() {
                lease.idle.put_back(lease.sender, lease.max_idle);
            }
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        // `Incoming` is `Unpin`, and so is `Self`.
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            this.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn load_roots(path: &Path, roots: &mut rustls::RootCertStore) -> Result<(), PoolError> {
    let pem = crate::hygiene::read_trusted_file(path, "upstream CA file")
        .map_err(|source| PoolError::ReadCa { path: path.to_owned(), source })?;
    let mut found = false;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| PoolError::InvalidCertificate { path: path.to_owned(), reason: e.to_string() })?;
        roots.add(cert).map_err(|e| PoolError::InvalidCertificate { path: path.to_owned(), reason: e.to_string() })?;
        found = true;
    }
    if found {
        Ok(())
    } else {
        Err(PoolError::NoCertificate { path: path.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy_config() -> ProxyConfig {
        ProxyConfig {
            connect_timeout: std::time::Duration::from_secs(1),
            response_timeout: std::time::Duration::from_secs(1),
            read_timeout: std::time::Duration::from_secs(1),
            pool_idle_timeout: std::time::Duration::from_secs(1),
            pool_max_idle_per_host: 1,
            preserve_host: true,
            request_id: false,
        }
    }

    #[test]
    fn ca_files_that_trust_nothing_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        assert!(matches!(
            Pool::new(&proxy_config(), Some(&missing), UpstreamProtocol::Http11),
            Err(PoolError::ReadCa { .. })
        ));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        assert!(matches!(
            Pool::new(&proxy_config(), Some(&empty), UpstreamProtocol::Http11),
            Err(PoolError::NoCertificate { .. })
        ));
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        assert!(matches!(
            Pool::new(&proxy_config(), Some(&garbage), UpstreamProtocol::Http11),
            Err(PoolError::InvalidCertificate { .. })
        ));
    }

    #[test]
    fn a_ca_file_with_certificates_builds() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca.self_signed(&key).unwrap().pem()).unwrap();
        assert!(Pool::new(&proxy_config(), Some(&path), UpstreamProtocol::Http11).is_ok());
        assert!(Pool::new(&proxy_config(), None, UpstreamProtocol::Http11).is_ok());
    }

    #[test]
    fn upstreams_connect_to_their_host_without_brackets() {
        let stop = CancellationToken::new();
        let v6 = Upstream::new(&Scheme::HTTPS, &"[::1]:8443".parse().unwrap(), stop.clone());
        assert_eq!((&*v6.host, v6.port), ("::1", 8443));
        assert!(matches!(v6.security, Security::Tls(ServerName::IpAddress(_))));
        let named = Upstream::new(&Scheme::HTTP, &"app.internal:8080".parse().unwrap(), stop);
        assert_eq!((&*named.host, named.port), ("app.internal", 8080));
        assert!(matches!(named.security, Security::Plain));
        // A host TLS cannot verify is never spoken to in plain text instead.
        let invalid = Upstream::new(&Scheme::HTTPS, &"a..b:443".parse().unwrap(), CancellationToken::new());
        assert!(matches!(invalid.security, Security::NoServerName));
    }
}
