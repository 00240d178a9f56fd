//! Listeners and connections: accept, handshake, serve HTTP, close.
//!
//! Each connection is one task. The handshake reads the ClientHello first, selects the certificate generation by
//! SNI from the [`CertificateStore`], and completes with that generation's configuration; the HTTP protocol is
//! chosen by ALPN (`h2` or HTTP/1.1), never by sniffing. From then on the connection knows which certificate
//! and grant it was made with, and watches that grant: when the grant ends, the connection is dropped at once,
//! whatever it is doing (idle, mid-body, streams open, mid-handshake).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLog;
use crate::admin;
use crate::audit::{Audit, AuditEvent};
use crate::config::Config;
use crate::custody::snapshot::ExportError;
use crate::custody::watch::ExportWatcher;
use crate::holder::Holder;
use crate::metrics::{HandshakeFailure, Metrics};
use crate::proxy::{ConnectionInfo, Proxy};
use crate::registry::ConnectionRegistry;
use crate::tls::{CertificateStore, TlsError, TlsPolicy, ALPN_H2};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The TLS configuration is invalid.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The export cannot be read at all.
    #[error("cannot read the custody export: {0}")]
    Export(#[from] ExportError),
    /// The access log is configured but cannot be opened.
    #[error(transparent)]
    AccessLog(#[from] crate::access_log::AccessLogError),
    /// The audit log is configured but cannot be written.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    /// A route's upstreams cannot be set up (an unreadable `ca` file, above all).
    #[error(transparent)]
    Upstream(#[from] crate::proxy::upstream::UpstreamError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the operating system said.
        source: std::io::Error,
    },
}

/// Result alias of this module.
pub type Result<T, E = ServerError> = std::result::Result<T, E>;

/// A started server.
#[derive(Debug)]
pub struct RunningServer {
    /// The TLS listeners' bound addresses, in configuration order.
    pub tls_addrs: Vec<SocketAddr>,
    /// The plain-HTTP redirect listeners' bound addresses, in configuration order.
    pub redirect_addrs: Vec<SocketAddr>,
    /// The admin endpoint's bound address.
    pub admin_addr: Option<SocketAddr>,
    /// The holder of the custody export.
    pub holder: Arc<Holder>,
    /// The server's metrics.
    pub metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
    tracker: TaskTracker,
}

impl RunningServer {
    /// Stops accepting, lets in-flight requests finish for up to `grace`, then closes every connection.
    pub async fn shutdown(self, grace: Duration) {
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_err() {
            tracing::warn!(?grace, "connections still open after the grace period; closing them");
            self.hard_stop.cancel();
            self.tracker.wait().await;
        }
        self.holder.audit().record(AuditEvent::Stopped);
    }
}

/// Everything a connection task needs.
struct Shared {
    store: Arc<CertificateStore>,
    registry: Arc<ConnectionRegistry>,
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    handshake_timeout: Duration,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
}

/// Reads the export, binds every listener and starts serving.
pub async fn start(config: Config) -> Result<RunningServer> {
    let metrics = Arc::new(Metrics::new());
    let store = Arc::new(CertificateStore::new(TlsPolicy::new(&config.tls)?));
    let registry = Arc::new(ConnectionRegistry::default());
    let audit = Audit::open(config.audit.as_ref())?;
    audit.record(AuditEvent::started(&config.custody.export, &config.custody.grantee));
    let holder = Arc::new(Holder::new(
        config.custody.export.clone(),
        config.custody.grantee.clone(),
        Arc::clone(&store),
        Arc::clone(&metrics),
        Arc::clone(&registry),
        audit,
    ));
    // Watch before the first read, so that no change between the two goes unseen.
    let watcher = match ExportWatcher::new(&config.custody.export) {
        Ok(watcher) => Some(watcher),
        Err(error) => {
            tracing::error!(%error, rescan = ?config.custody.rescan_interval, "no file events; following the export by rescans only");
            None
        }
    };
    holder.reload()?;
    if !holder.is_serving() {
        tracing::warn!(export = %config.custody.export.display(), "no association can be served yet; not accepting connections");
    }

    let mut http1 = http1::Builder::new();
    http1.timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(30)).keep_alive(true);
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2.timer(TokioTimer::new()).adaptive_window(true).max_concurrent_streams(100);

    let access_log = config.access_log.as_ref().map(AccessLog::open).transpose()?;
    let shutdown = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    let shared = Arc::new(Shared {
        registry,
        proxy: Arc::new(Proxy::new(&config, Arc::clone(&store), Arc::clone(&metrics), access_log)?),
        store: Arc::clone(&store),
        metrics: Arc::clone(&metrics),
        handshake_timeout: config.tls.handshake_timeout,
        http1,
        http2,
        shutdown: shutdown.clone(),
        hard_stop: hard_stop.clone(),
    });

    let tracker = TaskTracker::new();
    tracker.spawn(Arc::clone(&holder).follow(watcher, config.custody.rescan_interval, shutdown.clone()));
    let mut tls_addrs = Vec::new();
    for listener in &config.listeners {
        let socket = bind(listener.bind).await?;
        let addr = socket.local_addr().map_err(|source| ServerError::Bind { addr: listener.bind, source })?;
        tracing::info!(%addr, "listening for TLS");
        tls_addrs.push(addr);
        let listening = Listening { addr, socket: Some(socket), serving: holder.serving() };
        tracker.spawn(accept_loop(listening, Arc::clone(&shared), tracker.clone()));
    }
    let mut redirect_addrs = Vec::new();
    for redirect in &config.redirects {
        let socket = bind(redirect.bind).await?;
        let addr = socket.local_addr().map_err(|source| ServerError::Bind { addr: redirect.bind, source })?;
        tracing::info!(%addr, https_port = redirect.https_port, "redirecting plain HTTP to https");
        redirect_addrs.push(addr);
        tracker.spawn(crate::redirect::serve(socket, redirect.https_port, shutdown.clone(), tracker.clone()));
    }
    let admin_addr = match &config.admin {
        None => None,
        Some(admin) => {
            let socket = bind(admin.bind).await?;
            let addr = socket.local_addr().map_err(|source| ServerError::Bind { addr: admin.bind, source })?;
            tracing::info!(%addr, "admin endpoint listening");
            let state = admin::AdminState { store: Arc::clone(&store), metrics: Arc::clone(&metrics) };
            tracker.spawn(admin::serve(socket, Arc::new(state), shutdown.clone()));
            Some(addr)
        }
    };
    Ok(RunningServer { tls_addrs, redirect_addrs, admin_addr, holder, metrics, shutdown, hard_stop, tracker })
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|source| ServerError::Bind { addr, source })
}

/// A TLS listener that exists only while something is served.
struct Listening {
    addr: SocketAddr,
    socket: Option<TcpListener>,
    serving: watch::Receiver<bool>,
}

impl Listening {
    /// Closes the socket while nothing is served (clients get "connection refused", and a load balancer's TCP
    /// check sees the instance down), and binds it again, on the same address, as soon as something is. Returns
    /// `false` at shutdown.
    async fn ready(&mut self, shutdown: &CancellationToken) -> bool {
        loop {
            if !*self.serving.borrow_and_update() {
                if self.socket.take().is_some() {
                    tracing::warn!(addr = %self.addr, "nothing to serve: listener closed");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return false,
                    changed = self.serving.changed() => if changed.is_err() { return false },
                }
                continue;
            }
            if self.socket.is_none() {
                match TcpListener::bind(self.addr).await {
                    Ok(socket) => {
                        tracing::info!(addr = %self.addr, "serving again: listener open");
                        self.socket = Some(socket);
                    }
                    Err(error) => {
                        tracing::error!(addr = %self.addr, %error, "cannot listen again; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return false,
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                        continue;
                    }
                }
            }
            return true;
        }
    }
}

/// Accepts connections until shutdown. Accept errors (out of file descriptors, above all) back off instead of
/// spinning; connections already open are unaffected.
async fn accept_loop(mut listening: Listening, shared: Arc<Shared>, tracker: TaskTracker) {
    const MAX_BACKOFF: Duration = Duration::from_secs(1);
    let mut backoff = Duration::from_millis(5);
    loop {
        if !listening.ready(&shared.shutdown).await {
            return;
        }
        let Listening { socket: Some(socket), serving, .. } = &mut listening else { continue };
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = serving.changed() => continue,
            accepted = socket.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                backoff = Duration::from_millis(5);
                // Latency matters more than packet count for TLS records and HTTP responses.
                let _ = tcp.set_nodelay(true);
                tracker.spawn(serve_connection(Arc::clone(&shared), tcp, peer));
            }
            Err(error) => {
                tracing::warn!(%error, ?backoff, "accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// One client connection, from the first byte to the close.
async fn serve_connection(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let deadline = Instant::now() + shared.handshake_timeout;
    let _count = shared.metrics.connection_opened();

    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
    let start = match tokio::time::timeout_at(deadline, acceptor).await {
        Ok(Ok(start)) => start,
        Ok(Err(error)) => return handshake_failed(&shared, peer, HandshakeFailure::Protocol, &error),
        Err(_) => return handshake_failed(&shared, peer, HandshakeFailure::Timeout, &"no ClientHello in time"),
    };
    let sni = start.client_hello().server_name().map(str::to_owned);
    let Some(serving) = shared.store.select(sni.as_deref()) else {
        // No certificate for this name: complete the handshake with a config that resolves nothing, so the
        // client receives an alert rather than a bare close.
        let _ = tokio::time::timeout_at(deadline, start.into_stream(shared.store.refusing_config())).await;
        return handshake_failed(&shared, peer, HandshakeFailure::UnknownName, &format_args!("SNI {sni:?}"));
    };
    let grant_ended = serving.certificate.grant_ended().clone();
    let certificate = Arc::clone(&serving.certificate.identity);
    let handshake = start.into_stream(Arc::clone(&serving.config));
    // The connection keeps only the identity and the grant's signal, never the key.
    drop(serving);

    let tls = tokio::select! {
        result = tokio::time::timeout_at(deadline, handshake) => match result {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                let reason = if grant_ended.is_cancelled() { HandshakeFailure::Retired } else { classify(&error) };
                return handshake_failed(&shared, peer, reason, &error);
            }
            Err(_) => return handshake_failed(&shared, peer, HandshakeFailure::Timeout, &"handshake not done in time"),
        },
        _ = grant_ended.cancelled() => {
            return handshake_failed(&shared, peer, HandshakeFailure::Retired, &"grant ended during the handshake");
        }
    };
    shared.metrics.handshake_ok();
    let _registration = shared.registry.register(&certificate);
    let h2 = tls.get_ref().1.alpn_protocol() == Some(ALPN_H2);
    let session = tls.get_ref().1;
    let tls_version = session.protocol_version().and_then(|v| v.as_str()).unwrap_or("-");
    let cipher = session.negotiated_cipher_suite().and_then(|s| s.suite().as_str()).unwrap_or("-");
    let sni = sni.map(Arc::<str>::from);
    let info = Arc::new(ConnectionInfo { peer, sni, certificate, tls_version, cipher });
    let proxy = Arc::clone(&shared.proxy);
    let service = service_fn(move |request| {
        let proxy = Arc::clone(&proxy);
        let info = Arc::clone(&info);
        async move { Ok::<_, Infallible>(proxy.handle(request, &info).await) }
    });
    let io = TokioIo::new(tls);
    if h2 {
        drive(shared.http2.serve_connection(io, service), &shared, &grant_ended, peer).await;
    } else {
        drive(shared.http1.serve_connection(io, service).with_upgrades(), &shared, &grant_ended, peer).await;
    }
}

/// Runs an HTTP connection until it ends, its grant ends (dropped at once), or the server shuts down (drained
/// gracefully, then dropped at the hard stop).
async fn drive<C>(connection: C, shared: &Shared, grant_ended: &CancellationToken, peer: SocketAddr)
where
    C: Drain,
{
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = grant_ended.cancelled() => {
            tracing::debug!(%peer, "closing connection: its certificate's grant ended");
            return;
        }
        _ = shared.shutdown.cancelled() => {
            connection.as_mut().drain();
            tokio::select! {
                result = connection.as_mut() => result,
                _ = grant_ended.cancelled() => return,
                _ = shared.hard_stop.cancelled() => return,
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

/// An HTTP connection that can be asked to finish its in-flight requests and close.
trait Drain: Future<Output = Result<(), hyper::Error>> {
    fn drain(self: Pin<&mut Self>);
}

impl<I, S, B> Drain for http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn drain(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B> Drain for http2::Connection<I, S, TokioExecutor>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
{
    fn drain(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

fn classify(error: &std::io::Error) -> HandshakeFailure {
    if error.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
        HandshakeFailure::Protocol
    } else {
        HandshakeFailure::Io
    }
}

fn handshake_failed(shared: &Shared, peer: SocketAddr, reason: HandshakeFailure, detail: &dyn std::fmt::Display) {
    shared.metrics.handshake_failed(reason);
    tracing::debug!(%peer, ?reason, %detail, "TLS handshake failed");
}
