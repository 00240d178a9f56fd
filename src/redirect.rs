//! The plain-HTTP listener that sends every request to HTTPS with a `308 Permanent Redirect` (which, unlike 301,
//! keeps the method and body). It serves nothing else and never proxies.
//!
//! Its connections count under `limits.max_connections` with the TLS listeners' (a flood of plain connections
//! must not use up the descriptors HTTPS needs), a request head (and the pause before it) must arrive within
//! `timeouts.header_read`, and each request gets its access-log line (TLS version and cipher `-`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::{AccessLog, AccessRecord};
use crate::connection_limit::ConnectionLimit;
use crate::metrics::{ConnectionRefusal, Metrics};
use crate::names;

/// A redirect listener's settings.
#[derive(Debug, Clone)]
pub struct RedirectListener {
    /// The port clients are sent to (omitted from the URL when it is 443).
    pub https_port: u16,
    /// Each connection starts with a PROXY protocol header, which is consumed (connections without a valid one
    /// are closed).
    pub proxy_protocol: bool,
    /// How long a connection may take to send a request head (and before the first, its PROXY protocol header),
    /// also the keep-alive pause between two (`timeouts.header_read`).
    pub header_read: Duration,
    /// `limits.max_header_bytes`.
    pub max_header_bytes: usize,
}

/// The access log in force (a reload replaces it), if any.
pub type CurrentAccessLog = Arc<dyn Fn() -> Option<Arc<AccessLog>> + Send + Sync>;

/// Serves redirects on `listener` until `shutdown`, each connection holding a place under `connections`.
pub async fn serve(
    listener: TcpListener,
    settings: RedirectListener,
    connections: Arc<ConnectionLimit>,
    metrics: Arc<Metrics>,
    access_log: CurrentAccessLog,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let RedirectListener { https_port, proxy_protocol, header_read, max_header_bytes } = settings;
    let mut builder = http1::Builder::new();
    // hyper refuses a read buffer below 8 KiB.
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read)
        .keep_alive(true)
        .max_buf_size(max_header_bytes.max(8192));
    let builder = Arc::new(builder);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (mut tcp, permit, peer) = match accepted {
            Ok((tcp, peer)) => {
                let Some(permit) = connections.try_acquire() else {
                    metrics.connection_refused(ConnectionRefusal::MaxConnections);
                    tracing::debug!(%peer, "redirect listener: connection refused: limits.max_connections reached");
                    continue;
                };
                (tcp, permit, peer)
            }
            Err(error) => {
                tracing::warn!(%error, "redirect listener: accept failed; backing off");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let builder = Arc::clone(&builder);
        let shutdown = shutdown.clone();
        let access_log = Arc::clone(&access_log);
        tracker.spawn(async move {
            let _permit = permit;
            let mut client = peer;
            if proxy_protocol {
                let header = tokio::time::timeout(header_read, crate::proxy_header::read(&mut tcp));
                tokio::select! {
                    read = header => match read {
                        Ok(Ok(source)) => client = source.unwrap_or(peer),
                        Ok(Err(error)) => return tracing::debug!(%error, "redirect listener: connection closed"),
                        Err(_) => return tracing::debug!("redirect listener: no PROXY protocol header in time"),
                    },
                    _ = shutdown.cancelled() => return,
                }
            }
            let service = service_fn(move |request: Request<Incoming>| {
                let response = redirect(&request, https_port);
                if let Some(log) = access_log() {
                    log.log(&record(&request, &response, client));
                }
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = builder.serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                _ = connection => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

/// The redirect for one request: same host and path (and query), scheme https, port `https_port`.
fn redirect(request: &Request<Incoming>, https_port: u16) -> Response<Full<Bytes>> {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(names::host_of_authority)
        .filter(|h| names::validate_server_name(h).is_ok());
    let Some(host) = host else {
        return plain(StatusCode::BAD_REQUEST, "a valid Host header is required\n");
    };
    let path = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let port = if https_port == 443 { String::new() } else { format!(":{https_port}") };
    let Ok(location) = HeaderValue::from_str(&format!("https://{host}{port}{path}")) else {
        return plain(StatusCode::BAD_REQUEST, "bad request\n");
    };
    let mut response = plain(StatusCode::PERMANENT_REDIRECT, "moved to https\n");
    response.headers_mut().insert(header::LOCATION, location);
    response
}

/// The access-log line of a redirect.
fn record(request: &Request<Incoming>, response: &Response<Full<Bytes>>, client: SocketAddr) -> AccessRecord {
    AccessRecord {
        time: SystemTime::now(),
        client,
        sni: None,
        host: request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default().to_owned(),
        method: request.method().clone(),
        path: request.uri().path().to_owned(),
        version: request.version(),
        status: response.status().as_u16(),
        bytes: response.body().size_hint().exact().unwrap_or(0),
        duration: Duration::ZERO,
        upstream: None,
        tls_version: "-",
        cipher: "-",
        request_id: None,
        client_certificate: None,
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}
