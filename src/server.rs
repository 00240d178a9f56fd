//! Listeners and connections: accept, handshake, serve HTTP, close.
//!
//! Each connection is one task. The handshake reads the ClientHello first, selects the certificate generation by
//! SNI from the [`CertificateStore`], and completes with that generation's configuration; the HTTP protocol is
//! chosen by ALPN (`h2` or HTTP/1.1), never by sniffing. From then on the connection knows which certificate
//! and grant it was made with, and watches that grant: when the grant ends, the connection is dropped at once,
//! whatever it is doing (idle, mid-body, streams open, mid-handshake).
//!
//! Connection-level limits live here: at most `limits.max_connections` connections (more are accepted and closed
//! at once), the handshake deadline, hyper's HTTP/1 header-read deadline and HTTP/2 keep-alive pings, header
//! size and HTTP/2 stream bounds, and the idle timer (a connection with no request in flight for
//! `timeouts.idle` is closed). Request-level limits are in [`crate::proxy::limits`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::h2streams::{LocalStreams, StreamExecutor};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLog;
use crate::admin;
use crate::audit::{Audit, AuditEvent};
use crate::config::{Config, LimitsConfig, ListenerConfig, TimeoutsConfig, DEFAULT_MAX_HEADER_COUNT};
use crate::connection_limit::{ConnectionLimit, ConnectionPermit};
use crate::custody::snapshot::ExportError;
use crate::head_lines::HeadLines;
use crate::holder::Holder;
use crate::keyring::CertificateIdentity;
use crate::metrics::{ConnectionRefusal, ConnectionTimeout, HandshakeFailure, Metrics, RequestRefusal};
use crate::parking::{IoState, Tracked};
use crate::proxy::forward::ForwardingCache;
use crate::proxy::ProxyBody;
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
    shared: Arc<Shared>,
    current: tokio::sync::Mutex<Current>,
}

/// The configuration in force and the TLS listeners it opened.
struct Current {
    config: Config,
    listeners: Vec<OpenListener>,
}

/// A TLS listener: the address it was configured with, the address it got, the signal that closes it, and
/// whether its connections start with a PROXY protocol header (which a reload may change).
struct OpenListener {
    configured: SocketAddr,
    addr: SocketAddr,
    stop: CancellationToken,
    proxy_protocol: Arc<AtomicBool>,
}

/// What a reload did.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// TLS listeners opened (bound addresses).
    pub opened: Vec<SocketAddr>,
    /// TLS listeners closed (their connections go on).
    pub closed: Vec<SocketAddr>,
    /// Sections that changed but only take effect at the next start.
    pub need_restart: Vec<&'static str>,
    /// `[tls.client_auth]` (the section or its files) changed, and every certificate's TLS configuration was
    /// made again with it.
    pub client_auth_renewed: bool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Current {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Current").field("listeners", &self.listeners.len()).finish_non_exhaustive()
    }
}

impl RunningServer {
    /// The TLS listeners open now (a reload may have changed them).
    pub async fn listeners(&self) -> Vec<SocketAddr> {
        self.current.lock().await.listeners.iter().map(|l| l.addr).collect()
    }

    /// Applies a new configuration without dropping a connection: routes, upstreams, limits, timeouts, HSTS and
    /// the access log (reopened, which also serves log rotation) take effect at once; TLS listeners are opened and
    /// closed as the configuration says, unchanged ones untouched. Sections that cannot change while running
    /// (custody, TLS policy, admin, audit, process, runtime, log, redirects) are reported in
    /// [`Reloaded::need_restart`]. On any error nothing changes.
    pub async fn reload(&self, config: Config) -> Result<Reloaded> {
        // One reload at a time: building a proxy creates its upstreams' metric series, and the series the running
        // configuration does not name are removed after each attempt, which must not race another reload.
        let mut current = self.current.lock().await;
        let result = self.apply(&mut current, config).await;
        // Applied, the series of removed upstreams and routes go; refused, so do those a partly built proxy created.
        self.shared.metrics.retain_upstreams(|route, upstream| current.config.names_upstream(route, upstream));
        self.shared.metrics.retain_routes(|route, host, path| {
            current.config.routes.get(route).is_some_and(|r| r.host.as_deref() == host && r.path == path)
        });
        result
    }

    /// [`RunningServer::reload`]'s work, with the reload lock held.
    async fn apply(&self, current: &mut Current, config: Config) -> Result<Reloaded> {
        let access_log = config.access_log.as_ref().map(AccessLog::open).transpose()?;
        let proxy = Proxy::new(&config, Arc::clone(&self.shared.store), Arc::clone(&self.shared.metrics), access_log)?;
        // Client certificate trust is read again at every reload (SIGHUP is how a renewed CRL is taken in); the
        // rest of the TLS policy stays as it started.
        let client_auth = self.shared.store.policy().with_client_auth(config.tls.client_auth.as_ref())?;
        let mut reloaded =
            Reloaded { need_restart: restart_only_changes(&current.config, &config), ..Default::default() };

        // Open the new listeners first: if one cannot be bound, close those just opened and change nothing.
        let mut opened = Vec::new();
        for listener in &config.listeners {
            if let Some(open) = current.listeners.iter().find(|l| l.configured == listener.bind) {
                // Connections accepted from now on: those already open have read their header, or not.
                open.proxy_protocol.store(listener.proxy_protocol, Ordering::Relaxed);
                continue;
            }
            match open_listener(listener, &self.shared, &self.holder, &self.tracker).await {
                Ok(open) => opened.push(open),
                Err(error) => {
                    opened.iter().for_each(|l: &OpenListener| l.stop.cancel());
                    return Err(error);
                }
            }
        }
        let (kept, closed): (Vec<_>, Vec<_>) = std::mem::take(&mut current.listeners)
            .into_iter()
            .partition(|l| config.listeners.iter().any(|c| c.bind == l.configured));
        for listener in &closed {
            tracing::info!(addr = %listener.addr, "listener removed from the configuration: closed");
            listener.stop.cancel();
        }
        reloaded.opened = opened.iter().map(|l| l.addr).collect();
        reloaded.closed = closed.iter().map(|l| l.addr).collect();
        current.listeners = kept.into_iter().chain(opened).collect();

        let settings = Settings::new(&config, proxy, &self.shared.metrics);
        // Connections above a lowered limit finish normally; their places are taken back as they close.
        self.shared.connections.resize(self.shared.settings.load().max_connections, settings.max_connections);
        self.shared.settings.store(Arc::new(settings));
        if let Some(policy) = client_auth {
            self.put_trust_in_force(policy, "the configuration was reloaded").await;
            reloaded.client_auth_renewed = true;
        }
        current.config = config;
        if !reloaded.need_restart.is_empty() {
            tracing::warn!(sections = ?reloaded.need_restart, "these changes take effect at the next start");
        }
        tracing::info!(opened = ?reloaded.opened, closed = ?reloaded.closed, "configuration reloaded");
        Ok(reloaded)
    }

    /// Reads the running configuration's client certificate trust files again (`[tls.client_auth]`'s CA and
    /// CRLs, which the daemon watches) and, when their contents changed, puts the new trust in force as a reload
    /// would. Whether it changed; an unusable file is an error and the trust in force stays.
    pub async fn reload_client_trust(&self) -> Result<bool> {
        let current = self.current.lock().await;
        let Some(policy) = self.shared.store.policy().with_client_auth(current.config.tls.client_auth.as_ref())? else {
            return Ok(false);
        };
        self.put_trust_in_force(policy, "its files changed").await;
        Ok(true)
    }

    /// Puts a policy with new client certificate trust in force, then closes the connections it refuses (on a
    /// blocking thread: a signature check each), counted and logged.
    async fn put_trust_in_force(&self, policy: TlsPolicy, why: &str) {
        self.shared.store.replace_policy(policy);
        let store = Arc::clone(&self.shared.store);
        let closed = match tokio::task::spawn_blocking(move || store.revalidate_clients()).await {
            Ok(closed) => closed,
            Err(error) => {
                tracing::error!(%error, "revalidating the client certificates of open connections did not finish");
                0
            }
        };
        self.shared.metrics.client_trust_closed(closed);
        tracing::info!(
            why,
            closed_connections = closed,
            "client certificate trust renewed: new handshakes verify against it, no earlier session resumes, \
             and the connections it refuses are closed"
        );
    }

    /// The files the running configuration's client certificate trust is read from (`[tls.client_auth]`'s CA
    /// and CRLs): none without client authentication.
    pub async fn client_trust_files(&self) -> Vec<std::path::PathBuf> {
        let current = self.current.lock().await;
        current
            .config
            .tls
            .client_auth
            .iter()
            .flat_map(|c| std::iter::once(c.ca.clone()).chain(c.crl.iter().cloned()))
            .collect()
    }

    /// Reopens the logs at their paths, for log rotation: the running configuration's access log, and the audit
    /// log (see [`crate::audit::AuditLog::reopen`]). SIGHUP's part in log rotation, done whether or not the
    /// configuration then reloads.
    pub async fn reopen_logs(&self) {
        if let Some(access_log) = self.shared.settings.load().proxy.access_log() {
            access_log.reopen();
        }
        let audit = self.holder.audit().clone();
        // Creating the file and making the record durable block on the disk.
        if let Err(error) = tokio::task::spawn_blocking(move || audit.reopen()).await {
            tracing::error!(%error, "audit log reopen did not finish");
        }
    }

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
    metrics: Arc<Metrics>,
    /// What a configuration reload changes, swapped as a whole.
    settings: ArcSwap<Settings>,
    /// One permit per open client connection, across all listeners.
    connections: Arc<ConnectionLimit>,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
}

/// The reloadable part of the configuration. A connection takes the settings current when it is accepted for its
/// connection-level behaviour (timeouts, HTTP settings); every request takes the current proxy, so that a reload
/// changes routes and upstreams for connections already open too.
struct Settings {
    proxy: Arc<Proxy>,
    handshake_timeout: Duration,
    idle_timeout: Duration,
    /// `timeouts.send`, set on each connection's TLS stream.
    send_timeout: Duration,
    /// `timeouts.header_read`, enforced by [`drive`] and, on a parked connection, [`wait_parked`].
    header_read_timeout: Duration,
    http1: http1::Builder,
    http2: http2::Builder<StreamExecutor>,
    max_connections: usize,
}

impl Settings {
    fn new(config: &Config, proxy: Proxy, metrics: &Arc<Metrics>) -> Self {
        Self {
            proxy: Arc::new(proxy),
            handshake_timeout: config.tls.handshake_timeout,
            idle_timeout: config.timeouts.idle,
            send_timeout: config.timeouts.send,
            header_read_timeout: config.timeouts.header_read,
            http1: http1_builder(&config.limits),
            http2: http2_builder(&config.limits, &config.timeouts, metrics),
            max_connections: config.limits.max_connections,
        }
    }
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
    // The export is watched from `Holder::follow`, after this first read: see there.
    holder.reload()?;
    if !holder.is_serving() {
        tracing::warn!(export = %config.custody.export.display(), "no association can be served yet; not accepting connections");
    }

    let access_log = config.access_log.as_ref().map(AccessLog::open).transpose()?;
    let shutdown = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    let proxy = Proxy::new(&config, Arc::clone(&store), Arc::clone(&metrics), access_log)?;
    let shared = Arc::new(Shared {
        registry,
        store: Arc::clone(&store),
        metrics: Arc::clone(&metrics),
        settings: ArcSwap::from_pointee(Settings::new(&config, proxy, &metrics)),
        connections: ConnectionLimit::new(config.limits.max_connections),
        shutdown: shutdown.clone(),
        hard_stop: hard_stop.clone(),
    });

    let tracker = TaskTracker::new();
    tracker.spawn(Arc::clone(&holder).follow(config.custody.rescan_interval, shutdown.clone()));
    let mut listeners = Vec::new();
    for listener in &config.listeners {
        listeners.push(open_listener(listener, &shared, &holder, &tracker).await?);
    }
    let tls_addrs = listeners.iter().map(|l| l.addr).collect();
    let mut redirect_addrs = Vec::new();
    for redirect in &config.redirects {
        let socket = bind(redirect.bind).await?;
        let addr = socket.local_addr().map_err(|source| ServerError::Bind { addr: redirect.bind, source })?;
        tracing::info!(%addr, https_port = redirect.https_port, "redirecting plain HTTP to https");
        redirect_addrs.push(addr);
        let settings = crate::redirect::RedirectListener {
            https_port: redirect.https_port,
            proxy_protocol: redirect.proxy_protocol,
            header_read: config.timeouts.header_read,
            max_header_bytes: config.limits.max_header_bytes,
        };
        let current = Arc::clone(&shared);
        let access_log: crate::redirect::CurrentAccessLog =
            Arc::new(move || current.settings.load().proxy.access_log().cloned());
        tracker.spawn(crate::redirect::serve(
            socket,
            settings,
            Arc::clone(&shared.connections),
            Arc::clone(&metrics),
            access_log,
            shutdown.clone(),
            tracker.clone(),
        ));
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
    Ok(RunningServer {
        tls_addrs,
        redirect_addrs,
        admin_addr,
        holder,
        metrics,
        shutdown,
        hard_stop,
        tracker,
        shared,
        current: tokio::sync::Mutex::new(Current { config, listeners }),
    })
}

/// Binds a TLS listener and starts accepting on it.
async fn open_listener(
    listener: &ListenerConfig,
    shared: &Arc<Shared>,
    holder: &Holder,
    tracker: &TaskTracker,
) -> Result<OpenListener> {
    let configured = listener.bind;
    let socket = bind(configured).await?;
    let addr = socket.local_addr().map_err(|source| ServerError::Bind { addr: configured, source })?;
    // The line ends with the address: scripts and tests read it from there.
    tracing::info!(%addr, "listening for TLS");
    if listener.proxy_protocol {
        tracing::info!(%addr, "connections must start with a PROXY protocol header");
    }
    let stop = shared.shutdown.child_token();
    let proxy_protocol = Arc::new(AtomicBool::new(listener.proxy_protocol));
    let listening = Listening {
        addr,
        socket: Some(socket),
        serving: holder.serving(),
        stop: stop.clone(),
        proxy_protocol: Arc::clone(&proxy_protocol),
    };
    tracker.spawn(accept_loop(listening, Arc::clone(shared), tracker.clone()));
    Ok(OpenListener { configured, addr, stop, proxy_protocol })
}

/// HTTP/2: streams the client reset before sealgate accepted them, beyond which the connection is closed with
/// GOAWAY (the "rapid reset" attack, CVE-2023-44487). h2's own default, set here so that a change of default
/// cannot lift it.
pub const H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;

/// HTTP/2: streams sealgate reset because of the client's protocol errors, beyond which the connection is closed
/// with GOAWAY (RUSTSEC-2024-0003, "MadeYouReset"). hyper's default is 1024; a well-behaved client causes none.
pub const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 64;

/// The HTTP/1 connection settings. `timeouts.header_read` is not hyper's business: [`drive`] enforces it with
/// the connection's idle timer. hyper's own re-armed a timer for every request (a timer-wheel removal and
/// insertion, about 7 % of the instructions of a small keep-alive request), and it takes no timer without one.
fn http1_builder(limits: &LimitsConfig) -> http1::Builder {
    let mut http1 = http1::Builder::new();
    http1.header_read_timeout(None::<Duration>).keep_alive(true).max_header_size(limits.max_header_bytes);
    // Setting `max_headers` moves hyper's header parser from the stack to a per-request heap buffer: only when the
    // limit differs from hyper's own.
    if limits.max_header_count != DEFAULT_MAX_HEADER_COUNT {
        http1.max_headers(limits.max_header_count);
    }
    http1
}

/// The HTTP/2 connection settings. h2 bounds CONTINUATION frames by itself, from the header list size: a header
/// block may span at most max(5, 1.25 * max_header_bytes / 16 KiB) frames before the connection is closed with
/// ENHANCE_YOUR_CALM.
fn http2_builder(
    limits: &LimitsConfig,
    timeouts: &TimeoutsConfig,
    metrics: &Arc<Metrics>,
) -> http2::Builder<StreamExecutor> {
    // Streams run in their connection's task (see `h2streams`), reset when their client gives them no window
    // for `timeouts.send`.
    let metrics = Arc::clone(metrics);
    let on_stall = Arc::new(move || metrics.connection_timed_out(ConnectionTimeout::Send));
    let mut http2 = http2::Builder::new(StreamExecutor::with_stall_timeout(timeouts.send, on_stall));
    http2
        .timer(TokioTimer::new())
        .adaptive_window(true)
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        // Validated to at most 1 MiB.
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESET_STREAMS)
        .keep_alive_interval(timeouts.h2_keep_alive_interval)
        .keep_alive_timeout(timeouts.h2_keep_alive_timeout)
        // RFC 8441 extended CONNECT: WebSocket over HTTP/2 (see `proxy::upgrade`).
        .enable_connect_protocol();
    http2
}

/// Raises this process's soft limit on open files to its hard limit, and returns the new soft limit.
///
/// Every client connection and every upstream connection is a file descriptor; the usual soft limit (1024) would
/// cap a proxy at a few hundred clients, far below `limits.max_connections`. The hard limit is what the
/// administrator allows (systemd's `LimitNOFILE=`, a container's ulimit), so raising the soft limit to it needs
/// no privilege and overrides no policy. Call it once, at start.
pub fn raise_open_files_limit() -> std::io::Result<Option<u64>> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return Ok(limit.current);
    }
    setrlimit(Resource::Nofile, Rlimit { current: limit.maximum, maximum: limit.maximum })?;
    Ok(limit.maximum)
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|source| ServerError::Bind { addr, source })
}

/// A TLS listener that exists only while something is served.
struct Listening {
    addr: SocketAddr,
    socket: Option<TcpListener>,
    serving: watch::Receiver<bool>,
    /// Closes this listener: at shutdown, or when a reload removes it.
    stop: CancellationToken,
    /// Connections start with a PROXY protocol header.
    proxy_protocol: Arc<AtomicBool>,
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
    let stop = listening.stop.clone();
    loop {
        if !listening.ready(&stop).await {
            return;
        }
        let Listening { socket: Some(socket), serving, .. } = &mut listening else { continue };
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            _ = serving.changed() => continue,
            accepted = socket.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                backoff = Duration::from_millis(5);
                let Some(permit) = shared.connections.try_acquire() else {
                    // Closing at once (rather than leaving it in the kernel's backlog) tells the client, or its load
                    // balancer, to go elsewhere now.
                    shared.metrics.connection_refused(ConnectionRefusal::MaxConnections);
                    tracing::debug!(%peer, "connection refused: limits.max_connections reached");
                    drop(tcp);
                    continue;
                };
                // Latency matters more than packet count for TLS records and HTTP responses.
                let _ = tcp.set_nodelay(true);
                let proxy_protocol = listening.proxy_protocol.load(Ordering::Relaxed);
                tracker.spawn(serve_connection(Arc::clone(&shared), tcp, peer, proxy_protocol, permit));
            }
            Err(error) => {
                shared.metrics.accept_failed();
                tracing::warn!(%error, ?backoff, "accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// One client connection, from the first byte (the PROXY protocol header first, when `proxy_protocol`) to the
/// close. It holds `_permit` (its place under `limits.max_connections`) until then.
async fn serve_connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    proxy_protocol: bool,
    _permit: ConnectionPermit,
) {
    let settings = shared.settings.load_full();
    let _count = shared.metrics.connection_opened();
    // The phases of a connection are boxed, each allocated only while it runs, and each builds what it needs
    // within its own future: the task itself then holds only what an idle connection needs (1.3 KiB; it was
    // 10 KiB, most of it the handshake's and hyper's state, kept for the life of an idle connection). What is
    // moved into a phase is built in a statement of its own, or in the phase: a value moved from a local
    // declared across an await keeps its room in the task.
    let Some(established) = Box::pin(handshake(&shared, tcp, peer, proxy_protocol, settings.handshake_timeout)).await
    else {
        return;
    };
    let Established { mut tls, peer, sni, certificate, grant_ended, trust_generation } = established;
    tls.set_send_timeout(settings.send_timeout);
    shared.metrics.handshake_ok();
    let _registration = shared.registry.register(&certificate);
    let session = tls.session();
    let h2 = session.alpn_protocol() == Some(ALPN_H2);
    let tls_version = session.protocol_version().and_then(|v| v.as_str()).unwrap_or("-");
    let cipher = session.negotiated_cipher_suite().and_then(|s| s.suite().as_str()).unwrap_or("-");
    let client_certificate = shared.store.client_identity(session.peer_certificates());
    // A connection made while client certificates are asked for also closes when a reload's new trust refuses
    // it (its certificate, or its having none): its end signal is then its own, ended with its grant's or by the
    // store (see `ClientConnections`).
    let (grant_ended, _client_watch) = match shared.store.asks_client_certificates() {
        true => {
            let chain = session.peer_certificates().unwrap_or_default();
            let ended = grant_ended.child_token();
            let watch = shared.store.watch_client(chain, ended.clone());
            // A new trust put in force during the handshake may have revalidated the open connections before
            // this one was watched: then it checks itself against the trust in force.
            if shared.store.trust_generation() != trust_generation && !shared.store.admits_client(chain) {
                ended.cancel();
            }
            (ended, Some(watch))
        }
        false => (grant_ended, None),
    };
    // HTTP/1: heads with bare LF line endings are refused (see `head_lines`).
    let head_lines = (!h2).then(HeadLines::new);
    if let Some(lines) = &head_lines {
        tls.scan_heads(Arc::clone(lines));
    }
    let info = Arc::new(ConnectionInfo {
        peer,
        sni,
        certificate,
        tls_version,
        cipher,
        grant_ended: grant_ended.clone(),
        hard_stop: shared.hard_stop.clone(),
        tunnel: std::sync::Mutex::new(None),
        forwarding: ForwardingCache::default(),
        client_certificate,
        head_lines: head_lines.clone(),
    });
    let activity = Arc::new(Activity::new(head_lines));
    let service = Service { shared: Arc::clone(&shared), info: Arc::clone(&info), activity: Arc::clone(&activity) };
    let io = TokioIo::new(tls);
    let watch = Watch {
        shared: &shared,
        grant_ended: &grant_ended,
        activity: &activity,
        idle: settings.idle_timeout,
        info: &info,
    };
    if h2 {
        Box::pin(serve_http2(&settings, io, service, watch)).await;
        return;
    }
    let state = Arc::new(IoState::default());
    let mut io = Tracked::new(io, Bytes::new(), Arc::clone(&state));
    let mut service = service;
    // Parking waits for a request to complete after each unparking: see `drive`.
    let mut park_after_request = None;
    loop {
        let parking =
            Parking { state: &state, after_request: park_after_request, header_read: settings.header_read_timeout };
        let driven = Box::pin(serve_http1(&settings, io, service, watch, parking)).await;
        // Handed back still running, between messages: the parts of a connection taken apart.
        let Some(parts) = driven else {
            break;
        };
        io = parts.io.reuse(parts.read_buf);
        service = parts.service;
        park_after_request = Some(activity.completed());
        if !io.has_read_ahead() && !wait_parked(&mut io, watch, settings.header_read_timeout).await {
            return;
        }
    }
    // An upgraded connection lives on as its tunnel, which closes itself when the grant ends or at the hard
    // stop; the connection stays counted (and registered) until then.
    if let Some(tunnel) = info.take_tunnel() {
        let _ = tunnel.await;
    }
}

/// A connection whose TLS handshake is done.
struct Established {
    /// Boxed for the task's size: the stream is moved from variable to variable, and each may take its 1.2 KiB
    /// in the task.
    tls: Box<TlsStream>,
    /// The client: the connection's peer, or the address its PROXY protocol header gave.
    peer: SocketAddr,
    sni: Option<Arc<str>>,
    /// The certificate generation the handshake was made with.
    certificate: Arc<CertificateIdentity>,
    /// Fires when that certificate's grant ends.
    grant_ended: CancellationToken,
    /// The store's client trust generation when the certificate (and its configuration) was selected.
    trust_generation: u64,
}

/// The TLS handshake, preceded by the PROXY protocol header when `proxy_protocol`, within `timeout`: `None`
/// (counted and logged) when either fails, times out, names no served certificate or the certificate's grant
/// ends meanwhile.
async fn handshake(
    shared: &Shared,
    mut tcp: TcpStream,
    peer: SocketAddr,
    proxy_protocol: bool,
    timeout: Duration,
) -> Option<Established> {
    let deadline = Instant::now() + timeout;
    let peer = if proxy_protocol {
        match tokio::time::timeout_at(deadline, crate::proxy_header::read(&mut tcp)).await {
            // No address in the header: the load balancer speaks for itself (its health checks).
            Ok(Ok(client)) => client.unwrap_or(peer),
            Ok(Err(error)) => {
                handshake_failed(shared, peer, HandshakeFailure::ProxyHeader, &error);
                return None;
            }
            Err(_) => {
                handshake_failed(shared, peer, HandshakeFailure::Timeout, &"no PROXY protocol header in time");
                return None;
            }
        }
    } else {
        peer
    };
    let start = match tokio::time::timeout_at(deadline, crate::tls_stream::accept(tcp)).await {
        Ok(Ok(start)) => start,
        Ok(Err(error)) => {
            handshake_failed(shared, peer, HandshakeFailure::Protocol, &error);
            return None;
        }
        Err(_) => {
            handshake_failed(shared, peer, HandshakeFailure::Timeout, &"no ClientHello in time");
            return None;
        }
    };
    let sni = start.client_hello().server_name().map(str::to_owned);
    // Read before the selection: see `CertificateStore::trust_generation`.
    let trust_generation = shared.store.trust_generation();
    let Some(serving) = shared.store.select(sni.as_deref()) else {
        // No certificate for this name: complete the handshake with a config that resolves nothing, so the
        // client receives an alert rather than a bare close.
        let _ = tokio::time::timeout_at(deadline, start.into_stream(shared.store.refusing_config())).await;
        handshake_failed(shared, peer, HandshakeFailure::UnknownName, &format_args!("SNI {sni:?}"));
        return None;
    };
    let grant_ended = serving.certificate.grant_ended().clone();
    let certificate = Arc::clone(&serving.certificate.identity);
    let handshake = start.into_stream(Arc::clone(&serving.config));
    // The connection keeps only the identity and the grant's signal, never the key.
    drop(serving);
    let failure = tokio::select! {
        result = tokio::time::timeout_at(deadline, handshake) => match result {
            Ok(Ok(tls)) => {
                let sni = sni.map(Arc::<str>::from);
                return Some(Established {
                    tls: Box::new(tls),
                    peer,
                    sni,
                    certificate,
                    grant_ended,
                    trust_generation,
                });
            }
            Ok(Err(error)) => {
                let reason = if grant_ended.is_cancelled() { HandshakeFailure::Retired } else { classify(&error) };
                (reason, error.to_string())
            }
            Err(_) => (HandshakeFailure::Timeout, "handshake not done in time".to_owned()),
        },
        _ = grant_ended.cancelled() => (HandshakeFailure::Retired, "grant ended during the handshake".to_owned()),
    };
    handshake_failed(shared, peer, failure.0, &failure.1);
    None
}

/// hyper's service for one connection: each request goes to the proxy current when it arrives (a reload applies
/// to connections already open), counted in the connection's activity.
#[derive(Clone)]
struct Service {
    shared: Arc<Shared>,
    info: Arc<ConnectionInfo>,
    activity: Arc<Activity>,
}

impl hyper::service::Service<hyper::Request<hyper::body::Incoming>> for Service {
    type Response = hyper::Response<InFlightBody<ProxyBody>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        let proxy = self.shared.settings.load_full().proxy.clone();
        let info = Arc::clone(&self.info);
        if !request.body().is_end_stream() {
            self.activity.saw_request_body();
        }
        let in_flight = self.activity.request_started();
        // HTTP/2: the executor watches the stream for a client that gives it no window (see `h2streams`).
        let progress = crate::h2streams::progress_of_next_stream();
        // Boxed: the handling future is about 3 KiB (its forwarding upstream, another 3 KiB, is boxed within),
        // and hyper moves the service future several times per request (into its HTTP/2 stream, into the
        // stream's box). One allocation instead of those copies: memmove was 14% of an HTTP/2 run's CPU.
        Box::pin(async move {
            let response = proxy.handle(request, &info).await;
            if let Some(progress) = &progress {
                progress.begin();
            }
            Ok(response.map(|body| InFlightBody { inner: body, _in_flight: in_flight, progress }))
        })
    }
}

/// An HTTP/2 connection, driven until it ends.
async fn serve_http2(settings: &Settings, io: TokioIo<Box<TlsStream>>, service: Service, watch: Watch<'_>) {
    let connection = LocalStreams::new(settings.http2.serve_connection(io, service));
    drive(connection, watch, Some(ConnectionTimeout::KeepAlive), None).await;
}

/// An HTTP/1 connection, driven until it ends (`None`) or is handed back for parking (its parts).
async fn serve_http1(
    settings: &Settings,
    io: Http1Stream,
    service: Service,
    watch: Watch<'_>,
    parking: Parking<'_>,
) -> Option<hyper::server::conn::http1::Parts<Http1Stream, Service>> {
    let connection = settings.http1.serve_connection(io, service).with_upgrades();
    drive(connection, watch, None, Some(parking)).await?.into_parts()
}

/// How long an HTTP/1 connection is idle before it is parked (see [`crate::parking`]): long enough that a client
/// sending its next request as soon as it has a response (a keep-alive load loop) never parks, short enough that
/// idle connections soon hold no HTTP buffers.
const PARK_AFTER: Duration = Duration::from_millis(50);

/// A connection's TLS stream.
type TlsStream = crate::tls_stream::TlsStream;

/// The TLS stream of an HTTP/1 connection, as handed to hyper.
type Http1Stream = Tracked<TokioIo<Box<TlsStream>>>;

/// Waits for a parked connection's client to send again, with no hyper connection. Returns `false` when the
/// connection is to close instead: its grant ended, the server is shutting down (the connection is idle: it
/// closes at once, as hyper closes idle connections when drained), or it stayed idle past `timeouts.idle` or,
/// as hyper would have enforced, past `timeouts.header_read` since its last request.
async fn wait_parked(io: &mut Http1Stream, watch: Watch<'_>, header_read: Duration) -> bool {
    let Watch { shared, grant_ended, activity, idle, info } = watch;
    let peer = info.peer;
    let _parked = shared.metrics.connection_parked();
    // No request runs while parked, so both deadlines stay where the last request left them: one timer, for the
    // earlier (this wait is what an idle connection's task holds, and each timer takes its room in it).
    let since = activity.idle_since();
    let (deadline, kind) = match idle <= header_read {
        true => (since + idle, ConnectionTimeout::Idle),
        false => (since + header_read, ConnectionTimeout::HeaderRead),
    };
    let tcp = io.get_ref().inner().tcp();
    let timed_out = tokio::select! {
        readable = tcp.readable() => return readable.is_ok(),
        _ = grant_ended.cancelled() => {
            tracing::debug!(%peer, "closing parked connection: its certificate's grant ended (or its client certificate is no longer trusted)");
            return false;
        }
        _ = shared.shutdown.cancelled() => false,
        _ = tokio::time::sleep_until(deadline) => true,
    };
    if timed_out {
        tracing::debug!(%peer, timeout = ?kind, "closing parked connection: idle");
        shared.metrics.connection_timed_out(kind);
    }
    Box::pin(close_parked(io)).await;
    false
}

/// Sends a close_notify and a FIN, as hyper would, if the client takes them promptly.
async fn close_parked(io: &mut Http1Stream) {
    let shutdown = std::future::poll_fn(|cx| hyper::rt::Write::poll_shutdown(Pin::new(&mut *io), cx));
    let _ = tokio::time::timeout(PARK_AFTER, shutdown).await;
}

/// What a connection watches besides its own I/O.
#[derive(Clone, Copy)]
struct Watch<'a> {
    shared: &'a Shared,
    grant_ended: &'a CancellationToken,
    activity: &'a Activity,
    /// `timeouts.idle` as it was when the connection was accepted.
    idle: Duration,
    /// The connection: its peer for the logs, and for the access log of requests hyper refuses itself.
    info: &'a ConnectionInfo,
}

/// Runs an HTTP connection until it ends, its grant ends (dropped at once), the server shuts down (drained
/// gracefully, then dropped at the hard stop), or it has no request in flight for `timeouts.idle` (drained, then
/// dropped if it stays idle for another such period), or, HTTP/1, no request head arrives in
/// `timeouts.header_read` (closed). `hyper_timeout` names the deadline hyper enforces itself, if any (HTTP/2:
/// keep-alive ping), for the metrics.
///
/// With `parking` (HTTP/1), the connection is also handed back, still running, to be taken apart (see
/// [`crate::parking`]) once it has been idle for [`PARK_AFTER`], hyper waits for the client with nothing left to
/// write, and no request of the connection has had a body (hyper could still be reading one, and taking the
/// connection apart then would take the rest for a new request). After an unparking (`after_request`: the
/// number of requests completed then), it is only handed back once a request has completed since: the client
/// may have sent part of a request head.
async fn drive<C>(
    mut connection: C,
    watch: Watch<'_>,
    hyper_timeout: Option<ConnectionTimeout>,
    parking: Option<Parking<'_>>,
) -> Option<C>
where
    C: Drain + Unpin,
{
    let Watch { shared, grant_ended, activity, idle, info } = watch;
    let peer = info.peer;
    let mut after_request = parking.and_then(|p| p.after_request);
    let result = loop {
        // HTTP/1: a request head is due `timeouts.header_read` after the connection became idle (its start, or
        // its last response), as hyper counts it: the first head, every keep-alive one, and the pause before it.
        let deadlines =
            IdleDeadlines { idle, header_read: parking.map(|p| p.header_read), park: parking.map(|_| after_request) };
        // Biased: the connection first, as it is what wakes the task nearly every time (the random start costs
        // a draw per wake); the others still get their turn whenever it waits, which hyper does at least every
        // few messages.
        tokio::select! {
            biased;
            result = &mut connection => break result,
            _ = grant_ended.cancelled() => {
                tracing::debug!(%peer, "closing connection: its certificate's grant ended (or its client certificate is no longer trusted)");
                return None;
            }
            _ = shared.shutdown.cancelled() => break drained(Pin::new(&mut connection), watch, false).await?,
            due = activity.first_due(deadlines) => match due {
                Due::Idle => {
                    tracing::debug!(%peer, "closing connection: idle");
                    shared.metrics.connection_timed_out(ConnectionTimeout::Idle);
                    break drained(Pin::new(&mut connection), watch, true).await?;
                }
                Due::HeaderRead => {
                    tracing::debug!(%peer, "closing connection: no request head within timeouts.header_read");
                    shared.metrics.connection_timed_out(ConnectionTimeout::HeaderRead);
                    return None;
                }
                Due::Park => {
                    if parking.is_some_and(|p| p.state.is_waiting_for_client()) {
                        return Some(connection);
                    }
                    // hyper is within a message (a head arriving slowly, say): after the next request, perhaps.
                    after_request = Some(activity.completed());
                }
            },
        }
    };
    report_end(shared, info, result, hyper_timeout);
    None
}

/// The idleness deadlines [`drive`] watches, with one timer ([`Activity::first_due`]).
#[derive(Clone, Copy)]
struct IdleDeadlines {
    /// `timeouts.idle`.
    idle: Duration,
    /// HTTP/1: `timeouts.header_read`.
    header_read: Option<Duration>,
    /// HTTP/1: parking, after [`PARK_AFTER`] and, if a count is given, once more requests than that have completed.
    park: Option<Option<u64>>,
}

/// What [`Activity::first_due`] found due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    Idle,
    HeaderRead,
    Park,
}

/// What [`drive`] needs for an HTTP/1 connection: to hand it back for parking, and its header-read deadline.
#[derive(Clone, Copy)]
struct Parking<'a> {
    state: &'a IoState,
    /// Requests completed when the connection was last unparked, if it was.
    after_request: Option<u64>,
    /// `timeouts.header_read`.
    header_read: Duration,
}

/// Asks a connection to finish its requests and close, and runs it until it has: its result, or `None` when it
/// was dropped first (its grant ended, the hard stop, or, when `idle_bound`, another `timeouts.idle` idle).
async fn drained<C: Drain>(mut connection: Pin<&mut C>, watch: Watch<'_>, idle_bound: bool) -> Option<C::Output> {
    let Watch { shared, grant_ended, activity, idle, .. } = watch;
    connection.as_mut().drain();
    let idle_again = async {
        match idle_bound {
            // Another period from now: the idle deadline alone counts from the idleness that started the drain.
            true => {
                tokio::time::sleep(idle).await;
                activity.first_due(IdleDeadlines { idle, header_read: None, park: None }).await;
            }
            false => std::future::pending().await,
        }
    };
    tokio::select! {
        result = connection => Some(result),
        _ = grant_ended.cancelled() => None,
        _ = shared.hard_stop.cancelled() => None,
        _ = idle_again => None,
    }
}

/// Logs how a connection ended; `hyper_timeout` names the deadline hyper enforces itself, for the metrics.
fn report_end(
    shared: &Shared,
    info: &ConnectionInfo,
    result: Result<(), hyper::Error>,
    hyper_timeout: Option<ConnectionTimeout>,
) {
    let peer = info.peer;
    // hyper answered a head it refused (431 or 414, 400) and closed: the request gets its access-log line too.
    let log_refused = |status: u16| {
        if let Some(log) = shared.settings.load().proxy.access_log() {
            log.log(&crate::proxy::refused_head_record(info, status));
        }
    };
    if let Err(error) = result {
        if is_send_timeout(&error) {
            shared.metrics.connection_timed_out(ConnectionTimeout::Send);
        } else if let Some(timeout) = hyper_timeout.filter(|_| error.is_timeout()) {
            shared.metrics.connection_timed_out(timeout);
        } else if error.is_parse_too_large() {
            // hyper answered (431, 414) and closed: the refusals its parser makes count with sealgate's own.
            shared.metrics.request_refused(RequestRefusal::HeadTooLarge);
            log_refused(431);
        } else if error.is_parse() {
            shared.metrics.request_refused(RequestRefusal::Malformed);
            log_refused(400);
        }
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

/// Whether `error` came from the TLS stream's send timeout.
fn is_send_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(error) = source {
        let io = error.downcast_ref::<std::io::Error>();
        if io.and_then(|io| io.get_ref()).is_some_and(|inner| inner.is::<crate::tls_stream::SendTimedOut>()) {
            return true;
        }
        source = error.source();
    }
    false
}

/// What a connection is doing, for its idle timer: how many requests are in flight, and since when none is.
/// Updated with a few atomic operations per request; the timer wakes at most twice per idle period.
#[derive(Debug)]
struct Activity {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds from `epoch` to the end of the last request (0: the connection has had none).
    idle_since_ms: AtomicU64,
    /// Requests completed.
    completed: AtomicU64,
    /// A request of the connection came with a body.
    saw_request_body: AtomicBool,
    /// HTTP/1: told when a response has been sent, so that the next head is looked at.
    head_lines: Option<Arc<HeadLines>>,
}

impl Activity {
    fn new(head_lines: Option<Arc<HeadLines>>) -> Self {
        Self {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            saw_request_body: AtomicBool::new(false),
            head_lines,
        }
    }

    /// Number of requests completed.
    fn completed(&self) -> u64 {
        self.completed.load(Ordering::Acquire)
    }

    /// A request came with a body.
    fn saw_request_body(&self) {
        self.saw_request_body.store(true, Ordering::Relaxed);
    }

    /// When the connection last became idle: the end of its last request, or its start.
    fn idle_since(&self) -> Instant {
        self.epoch + Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed))
    }

    /// The first of `deadlines` the connection's idleness reaches, with one timer (each wake of the connection's
    /// task polls it: one timer costs a third of three). Parking is due once no request has been in flight for
    /// [`PARK_AFTER`], none has had a body, and, with an `after_request` count, more requests than that have
    /// completed (checked again every [`PARK_AFTER`] until then). Of the closing deadlines passed together, the
    /// earlier wins; closing wins over parking.
    async fn first_due(&self, deadlines: IdleDeadlines) -> Due {
        let shortest = [deadlines.header_read, deadlines.park.map(|_| PARK_AFTER)]
            .into_iter()
            .flatten()
            .fold(deadlines.idle, Duration::min);
        // With a request in flight, `idle_since` is stale and the first wake finds the request and re-arms.
        let mut wake = self.idle_since() + shortest;
        loop {
            tokio::time::sleep_until(wake).await;
            // Acquire pairs with the Release in `InFlight::drop`: a count of 0 comes with its `idle_since_ms`.
            if self.in_flight.load(Ordering::Acquire) > 0 {
                wake = Instant::now() + shortest;
                continue;
            }
            let (now, since) = (Instant::now(), self.idle_since());
            let closing = [(Some(deadlines.idle), Due::Idle), (deadlines.header_read, Due::HeaderRead)];
            let mut passed: Option<(Instant, Due)> = None;
            let mut next = since + deadlines.idle;
            for (expires, due) in closing.into_iter().filter_map(|(limit, due)| Some((since + limit?, due))) {
                if now >= expires {
                    passed = passed.filter(|(first, _)| *first <= expires).or(Some((expires, due)));
                } else {
                    next = next.min(expires);
                }
            }
            if let Some((_, due)) = passed {
                return due;
            }
            if let Some(after_request) = deadlines.park {
                if !self.saw_request_body.load(Ordering::Relaxed) {
                    let parkable = since + PARK_AFTER;
                    if now < parkable {
                        next = next.min(parkable);
                    } else if after_request.is_none_or(|n| self.completed() > n) {
                        return Due::Park;
                    } else {
                        next = next.min(now + PARK_AFTER);
                    }
                }
            }
            wake = next;
        }
    }

    /// A request arrived; it is in flight until the guard is dropped (when its response has been sent).
    fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { activity: Arc::clone(self) }
    }
}

/// Keeps a request counted as in flight.
#[derive(Debug)]
struct InFlight {
    activity: Arc<Activity>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.activity;
        let now = u64::try_from(activity.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        activity.idle_since_ms.store(now, Ordering::Relaxed);
        activity.completed.fetch_add(1, Ordering::Release);
        activity.in_flight.fetch_sub(1, Ordering::Release);
        if let Some(lines) = &activity.head_lines {
            lines.answered();
        }
    }
}

/// A response body that keeps its request counted as in flight until hyper has sent it and dropped it.
#[derive(Debug)]
struct InFlightBody<B> {
    inner: B,
    _in_flight: InFlight,
    /// HTTP/2: where the body's polls are recorded for the stream's watcher.
    progress: Option<Arc<crate::h2streams::StreamProgress>>,
}

impl<B: Body + Unpin> Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Some(progress) = &self.progress {
            progress.polled(matches!(polled, Poll::Ready(Some(_))));
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

impl<I, S, B> Drain for LocalStreams<http2::Connection<I, S, StreamExecutor>>
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
        self.connection().graceful_shutdown();
    }
}

fn classify(error: &std::io::Error) -> HandshakeFailure {
    match error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        // A server verifies no certificate but its clients'.
        Some(
            rustls::Error::NoCertificatesPresented
            | rustls::Error::InvalidCertificate(_)
            | rustls::Error::InvalidCertRevocationList(_),
        ) => HandshakeFailure::ClientCertificate,
        Some(_) => HandshakeFailure::Protocol,
        None => HandshakeFailure::Io,
    }
}

fn handshake_failed(shared: &Shared, peer: SocketAddr, reason: HandshakeFailure, detail: &dyn std::fmt::Display) {
    shared.metrics.handshake_failed(reason);
    tracing::debug!(%peer, ?reason, %detail, "TLS handshake failed");
}

/// The sections of `new` that differ from `old` and cannot change while running.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    // The TLS handshake timeout and client certificate trust are reloadable; the rest of the TLS policy stays as
    // it started.
    let tls_policy =
        |c: &Config| crate::config::TlsConfig { handshake_timeout: Duration::ZERO, client_auth: None, ..c.tls.clone() };
    [
        ("custody", old.custody == new.custody),
        ("tls", tls_policy(old) == tls_policy(new)),
        ("admin", old.admin == new.admin),
        ("audit", old.audit == new.audit),
        ("process", old.process == new.process),
        ("runtime", old.runtime == new.runtime),
        ("log", old.log == new.log),
        ("redirect", old.redirects == new.redirects),
    ]
    .into_iter()
    .filter(|(_, same)| !same)
    .map(|(name, _)| name)
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(30);

    fn deadlines(idle: Duration, header_read: Option<Duration>, park: Option<Option<u64>>) -> IdleDeadlines {
        IdleDeadlines { idle, header_read, park }
    }

    /// What `first_due` finds, and how long after the call.
    async fn due(activity: &Activity, deadlines: IdleDeadlines) -> (Due, Duration) {
        let start = Instant::now();
        let due = tokio::time::timeout(LONG, activity.first_due(deadlines)).await.expect("a deadline comes due");
        (due, start.elapsed())
    }

    #[tokio::test]
    async fn the_earlier_closing_deadline_comes_due() {
        let ms = Duration::from_millis;
        let (found, after) = due(&Activity::new(None), deadlines(LONG, Some(ms(100)), None)).await;
        assert_eq!(found, Due::HeaderRead);
        assert!(after >= ms(100) && after < LONG, "{after:?}");
        let (found, after) = due(&Activity::new(None), deadlines(ms(100), Some(LONG), None)).await;
        assert_eq!(found, Due::Idle);
        assert!(after >= ms(100) && after < LONG, "{after:?}");
    }

    #[tokio::test]
    async fn deadlines_count_from_when_the_connection_became_idle() {
        let activity = Activity::new(None);
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Made again by the drive loop, the future keeps the deadline: 200 ms from the start, not from now.
        let (found, after) = due(&activity, deadlines(Duration::from_millis(200), None, None)).await;
        assert_eq!(found, Due::Idle);
        assert!(after < Duration::from_millis(150), "{after:?}");
    }

    #[tokio::test]
    async fn a_request_in_flight_holds_every_deadline_back() {
        let activity = Arc::new(Activity::new(None));
        let request = activity.request_started();
        let short = deadlines(Duration::from_millis(60), Some(Duration::from_millis(60)), Some(None));
        let held = tokio::time::timeout(Duration::from_millis(300), activity.first_due(short)).await;
        assert!(held.is_err(), "nothing is due while a request is in flight: {held:?}");
        drop(request);
        let (found, after) = due(&activity, deadlines(LONG, Some(Duration::from_millis(100)), None)).await;
        assert_eq!(found, Due::HeaderRead);
        // `idle_since` is kept in whole milliseconds.
        assert!(after >= Duration::from_millis(95), "counted from the request's end: {after:?}");
    }

    #[tokio::test]
    async fn parking_comes_before_the_closing_deadlines_unless_a_body_was_seen() {
        let (found, after) = due(&Activity::new(None), deadlines(LONG, Some(LONG), Some(None))).await;
        assert_eq!(found, Due::Park);
        assert!(after >= PARK_AFTER && after < LONG, "{after:?}");
        let activity = Activity::new(None);
        activity.saw_request_body();
        let (found, _) = due(&activity, deadlines(LONG, Some(Duration::from_millis(300)), Some(None))).await;
        assert_eq!(found, Due::HeaderRead, "a connection that had a body is never parked");
    }

    #[tokio::test]
    async fn after_an_unparking_parking_waits_for_a_completed_request() {
        let activity = Arc::new(Activity::new(None));
        let completes = {
            let activity = Arc::clone(&activity);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                drop(activity.request_started());
            })
        };
        let (found, after) = due(&activity, deadlines(LONG, Some(LONG), Some(Some(0)))).await;
        assert_eq!(found, Due::Park);
        let earliest = Duration::from_millis(195) + PARK_AFTER;
        assert!(after >= earliest, "parked only after the request: {after:?}");
        completes.await.expect("the request task");
    }
}
