//! The HTTP side: what happens to a request once a TLS connection carries it.
//!
//! - [`limits`]: request limits and framing checks, before anything else;
//! - [`routes`]: which route answers a host and path;
//! - [`rate_limit`]: a route's per-client request rate limit (429);
//! - [`request_id`]: `X-Request-Id` for every request, when configured;
//! - [`forward`]: rewriting requests for upstreams (headers, 502/504);
//! - [`upstream`]: a route's upstreams (pool, balancing, ejection, health checks, retries);
//! - [`respond`]: answers sealgate writes itself; [`location`]: a `redirect` route's `Location`;
//! - [`upgrade`]: WebSocket tunnels (HTTP/1.1 upgrade, HTTP/2 extended CONNECT); other upgrades refused.
//!
//! Before routing, every request's `Host` (HTTP/1.1) or `:authority` (HTTP/2) must be a name the connection's
//! certificate is served for *and* that is still served: a client that reuses a connection for another name
//! (HTTP/2 connection coalescing, or a forged `Host`) gets 421 and retries on a connection of its own.

pub mod compress;
pub mod forward;
pub mod limits;
pub mod location;
pub mod rate_limit;
pub mod request_id;
pub mod respond;
pub mod routes;
pub mod upgrade;
pub mod upstream;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::access_log::{AccessLog, AccessRecord, LoggedBody};
use crate::client_auth::ClientIdentity;
use crate::config::{Config, HeaderRule, HstsConfig};
use crate::head_lines::HeadLines;
use crate::keyring::CertificateIdentity;
use crate::metrics::{Metrics, RequestRefusal};
use crate::names;
use crate::tls::CertificateStore;
use compress::{Compressible, Compression};
use forward::{ClientSide, ForwardingCache};
use limits::{LimitError, Limits};
use request_id::{RequestIds, X_REQUEST_ID};
use routes::{Action, Route, RouteTable};
use tokio_util::sync::CancellationToken;
use upgrade::{Kind, UpgradeHeaders};
use upstream::{ResponseBody, UpstreamError};

/// The body of a response before logging: an upstream's, streamed, or one of sealgate's own.
pub type ReplyBody = Either<ResponseBody, Full<Bytes>>;

/// The body of every response sealgate sends (counted for the access log when it is enabled, and timed for its
/// route's duration histogram).
pub type ProxyBody = LoggedBody<Compressible<ReplyBody>>;

pub use limits::RequestBody;

/// What the proxy knows of the connection a request came on.
#[derive(Debug)]
pub struct ConnectionInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// The SNI the client sent, if any.
    pub sni: Option<Arc<str>>,
    /// The certificate generation the connection was made with.
    pub certificate: Arc<CertificateIdentity>,
    /// The negotiated TLS version, e.g. `TLSv1_3`.
    pub tls_version: &'static str,
    /// The negotiated cipher suite, e.g. `TLS13_AES_128_GCM_SHA256`.
    pub cipher: &'static str,
    /// Fires when the certificate's grant ends: tunnels close with the connection.
    pub grant_ended: CancellationToken,
    /// Fires at the server's hard stop.
    pub hard_stop: CancellationToken,
    /// An HTTP/1.1 connection's WebSocket tunnel, once upgraded: the connection task waits for it (so that the
    /// connection is counted, and closed with its grant, for as long as the tunnel lives).
    pub tunnel: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The forwarding header values of the connection's proxied requests, made for the first.
    pub forwarding: ForwardingCache,
    /// The verified client certificate the connection was made with (`[tls.client_auth]`), if any.
    pub client_certificate: Option<Arc<ClientIdentity>>,
    /// HTTP/1: whether the head just read had bare LF line endings (see [`crate::head_lines`]).
    pub head_lines: Option<Arc<HeadLines>>,
}

impl ConnectionInfo {
    /// Takes the tunnel the connection was upgraded to, if any.
    pub fn take_tunnel(&self) -> Option<tokio::task::JoinHandle<()>> {
        self.tunnel.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take()
    }
}

/// Routes and forwards requests.
///
/// A proxy owns its routes' upstream state and background tasks (health checks): building one starts them,
/// dropping it stops them, so a proxy can be replaced by a new one for a configuration reload.
#[derive(Debug)]
pub struct Proxy {
    routes: RouteTable,
    certificates: Arc<CertificateStore>,
    metrics: Arc<Metrics>,
    hsts: Option<HeaderValue>,
    /// The top-level `[response_headers]`, for answers no route gave (routes carry them merged with their own).
    response_headers: Box<[HeaderRule]>,
    access_log: Option<Arc<AccessLog>>,
    limits: Limits,
    /// `[proxy] request_id`: the ids given to requests.
    request_ids: Option<RequestIds>,
    /// `[compression]`, if configured.
    compression: Option<Compression>,
    /// `timeouts.tunnel_idle`.
    tunnel_idle: Duration,
}

impl Proxy {
    /// A proxy for `config`'s routes. `certificates` tells which names are still served; `access_log` receives
    /// one line per request. Health checks start here, so a configuration with health checks needs a Tokio
    /// runtime; a CA file that cannot be read fails.
    pub fn new(
        config: &Config,
        certificates: Arc<CertificateStore>,
        metrics: Arc<Metrics>,
        access_log: Option<Arc<AccessLog>>,
    ) -> Result<Self, UpstreamError> {
        Ok(Self {
            routes: RouteTable::new(&config.routes, &config.proxy, &config.response_headers, &metrics)?,
            certificates,
            metrics,
            hsts: config.hsts.as_ref().map(HstsConfig::header_value),
            response_headers: config.response_headers.clone().into_boxed_slice(),
            access_log,
            limits: Limits::new(&config.limits, &config.timeouts),
            request_ids: config.proxy.request_id.then(RequestIds::new),
            compression: config.compression.as_ref().map(Compression::new),
            tunnel_idle: config.timeouts.tunnel_idle,
        })
    }

    /// The access log requests are written to, if any.
    pub fn access_log(&self) -> Option<&Arc<AccessLog>> {
        self.access_log.as_ref()
    }

    /// Answers one request.
    pub async fn handle(&self, mut request: Request<Incoming>, connection: &ConnectionInfo) -> Response<ProxyBody> {
        let started = (Instant::now(), SystemTime::now());
        let request_id = self.request_ids.as_ref().map(RequestIds::next);
        if let Some(id) = &request_id {
            // Replaces whatever id the client sent (see `request_id`).
            request.headers_mut().insert(X_REQUEST_ID, id.clone());
        }
        // Boxed at once: the record is held across the answer's await, in this future, and then by the body.
        let pending = self.access_log.as_ref().map(|log| {
            let mut record = record_of(&request, connection, started.1);
            record.request_id = request_id.clone();
            Box::new((Arc::clone(log), record))
        });
        // Read before the request moves on; applied to the answer below.
        let compression = self.compression.as_ref().map(|c| (c, c.choose(request.method(), request.headers())));
        let Answer { mut response, upstream, route } = self.answer(request, connection).await;
        self.metrics.request_answered(response.status());
        if let Some(id) = request_id {
            response.headers_mut().insert(X_REQUEST_ID, id);
        }
        if let Some(hsts) = &self.hsts {
            response.headers_mut().insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
        }
        for rule in route.map_or(&self.response_headers, |route| &route.response_headers).iter() {
            rule.apply(response.headers_mut());
        }
        let pending = pending.map(|mut pending| {
            pending.1.status = response.status().as_u16();
            pending.1.upstream = upstream.as_deref().map(str::to_owned);
            pending
        });
        let duration = route.map(|route| route.duration.clone());
        let response = match (compression, route) {
            (Some((compression, choice)), Some(route)) if route.compress => {
                let response = compression.apply(choice, response);
                if let Some(coding) = response.body().coding() {
                    self.metrics.response_compressed(coding.token());
                }
                response
            }
            _ => response.map(Compressible::plain),
        };
        response.map(|body| LoggedBody::new(body, started.0, pending, duration))
    }

    /// Answers one request; also says which route, and which upstream, if any, answered or failed.
    async fn answer(&self, request: Request<Incoming>, connection: &ConnectionInfo) -> Answer<'_> {
        let version = request.version();
        // A route's own body limit applies from the start: the declared length is checked against it. Only when
        // some route has one is the route looked up here too (it is found again below, with the host checked
        // against the connection's certificate; the limits come first, so that ambiguous framing is refused
        // before anything else).
        let body_limit = match self.routes.has_body_limits() {
            true => self.route_for(&request).and_then(|route| route.max_body_bytes),
            false => None,
        };
        let bodiless = http_body::Body::is_end_stream(request.body());
        if connection.head_lines.as_ref().is_some_and(|lines| lines.head_read(bodiless)) {
            let error = LimitError::Framing("a line of the request head ends in a bare LF, not CRLF");
            return Answer::of(self.refuse(&error, version, connection));
        }
        let head_lines = connection.head_lines.as_ref().filter(|_| !bodiless);
        let mut request = match self.limits.admit(request, body_limit, head_lines) {
            Ok(request) => request,
            Err(error) => return Answer::of(self.refuse(&error, version, connection)),
        };
        let switch = match upgrade::classify(&request) {
            Kind::Plain => None,
            Kind::Refused(status) => {
                tracing::debug!(peer = %connection.peer, method = %request.method(), "upgrade or CONNECT refused");
                return Answer::of(self.close_after(respond::error(status), version));
            }
            Kind::WebSocket(upgrade) => {
                request.extensions_mut().insert(UpgradeHeaders { upgrade: upgrade.clone(), key: None });
                Some(Switch { upgrade, key: None, client: hyper::upgrade::on(&mut request), http1: true })
            }
            Kind::WebSocketOverH2 => match upgrade::h2_to_h1(&mut request) {
                Some(key) => Some(Switch {
                    upgrade: HeaderValue::from_static("websocket"),
                    key: Some(key),
                    client: hyper::upgrade::on(&mut request),
                    http1: false,
                }),
                None => return Answer::of(respond::error(StatusCode::INTERNAL_SERVER_ERROR)),
            },
        };
        let (route, authority) = match self.route_of(&request, connection) {
            Ok(found) => found,
            Err(status) => return Answer::of(respond::error(status)),
        };
        let client = connection.peer.ip();
        let refusal = if route.clients.as_ref().is_some_and(|clients| !clients.admits(client)) {
            tracing::debug!(peer = %connection.peer, route = route.index, "403: the route does not answer this client");
            Some((respond::error(StatusCode::FORBIDDEN), RequestRefusal::Forbidden))
        } else if route.require_client_certificate && connection.client_certificate.is_none() {
            tracing::debug!(peer = %connection.peer, route = route.index, "403: the route requires a client certificate");
            Some((respond::error(StatusCode::FORBIDDEN), RequestRefusal::ClientCertificate))
        } else if let Some(Err(limited)) = route.rate_limit.as_ref().map(|limiter| limiter.check(client)) {
            Some((respond::too_many_requests(limited.retry_after), RequestRefusal::RateLimited))
        } else {
            None
        };
        if let Some((mut response, reason)) = refusal {
            self.metrics.request_refused(reason);
            if !http_body::Body::is_end_stream(request.body()) {
                // A body the client may still be sending must not be read as the next request.
                response = self.close_after(response, version);
            }
            return Answer { response, upstream: None, route: Some(route) };
        }
        let (response, upstream) = match &route.action {
            Action::Respond(response) => (respond::fixed(response), None),
            Action::Redirect(redirect) => {
                let host = names::host_of_authority(authority).unwrap_or_default();
                let request_uri = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
                match redirect.to.render(&host, request_uri) {
                    Some(location) => (respond::redirect(redirect.status, location), None),
                    None => (respond::error(StatusCode::BAD_REQUEST), None),
                }
            }
            Action::Upstream(upstreams) => {
                // Owned only here, where the request moves on.
                let authority = authority.to_owned();
                let client = ClientSide {
                    peer: connection.peer,
                    authority: &authority,
                    cache: &connection.forwarding,
                    client_certificate: connection.client_certificate.as_ref().and_then(|c| c.forwarded.as_ref()),
                };
                // Boxed, in a statement of its own (a temporary would be kept in this future across the await):
                // forwarding is most of this future's size, which every request would otherwise carry, and copy,
                // for the answers that need none.
                let forwarding = Box::pin(upstreams.forward(request, client, route.response_timeout));
                match forwarding.await {
                    Ok(response) => {
                        // Named from the body, which holds the upstream anyway: an extension would cost the
                        // response an allocated map.
                        let upstream = Arc::clone(response.body().upstream());
                        (self.switch_or_pass(response, switch, connection), Some(upstream))
                    }
                    Err(error) => match LimitError::find_in(&error) {
                        // The client's body was refused on its way upstream: the client's fault, not the upstream's.
                        Some(limit) => (self.refuse(limit, version, connection), None),
                        None => {
                            tracing::warn!(route = route.index, %error, "upstream request failed");
                            (respond::error(error.status()), error.upstream().map(Arc::from))
                        }
                    },
                }
            }
        };
        Answer { response, upstream, route: Some(route) }
    }

    /// The route for the request's host and path, once the host is known to be served on this connection, with
    /// the request's authority as sent; or the status that refuses it (400 no or a malformed host, 421 a host this
    /// connection's certificate does not serve, 404 no route).
    fn route_of<'p, 'r, B>(
        &'p self,
        request: &'r Request<B>,
        connection: &ConnectionInfo,
    ) -> Result<(&'p Route, &'r str), StatusCode> {
        let authority = request_authority(request).ok_or(StatusCode::BAD_REQUEST)?;
        let host = names::host_of_authority(authority).ok_or(StatusCode::BAD_REQUEST)?;
        if !self.is_served_on(&host, connection) {
            tracing::debug!(
                host = %host,
                certificate = %connection.certificate.certificate_id,
                "421: host not served by this connection's certificate"
            );
            return Err(StatusCode::MISDIRECTED_REQUEST);
        }
        let route = self.routes.find(&host, request.uri().path()).ok_or(StatusCode::NOT_FOUND)?;
        Ok((route, authority))
    }

    /// The route a request's host and path lead to, whatever the connection it came on.
    fn route_for<B>(&self, request: &Request<B>) -> Option<&Route> {
        let host = names::host_of_authority(request_authority(request)?)?;
        self.routes.find(&host, request.uri().path())
    }

    /// Passes an upstream response on, or, for an upgrade the upstream agreed to, answers the client's switch and
    /// starts the tunnel.
    fn switch_or_pass(
        &self,
        mut response: Response<ResponseBody>,
        switch: Option<Switch>,
        connection: &ConnectionInfo,
    ) -> Response<ReplyBody> {
        let Some(switch) = switch else {
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                tracing::warn!("upstream switched protocols without being asked; refusing its answer");
                return respond::error(StatusCode::BAD_GATEWAY);
            }
            return response.map(Either::Left);
        };
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            // The upstream declined the upgrade: its answer is an ordinary response.
            return response.map(Either::Left);
        }
        if !upgrade::upstream_switched(&response, &switch.upgrade, switch.key.as_ref()) {
            tracing::warn!("upstream switched to another protocol than the one asked for");
            return respond::error(StatusCode::BAD_GATEWAY);
        }
        let upstream = hyper::upgrade::on(&mut response);
        let (mut head, _) = response.into_parts();
        forward::remove_hop_by_hop(&mut head.headers);
        let mut status = head.status;
        upgrade::client_head(&mut head.headers, &mut status, switch.http1.then_some(&switch.upgrade));
        let closing = [connection.grant_ended.clone(), connection.hard_stop.clone()];
        let tunnel = tokio::spawn(upgrade::tunnel(switch.client, upstream, closing, self.tunnel_idle));
        if switch.http1 {
            *connection.tunnel.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(tunnel);
        }
        let mut reply = Response::new(Either::Right(Full::new(Bytes::new())));
        *reply.status_mut() = status;
        *reply.headers_mut() = head.headers;
        reply
    }

    /// HTTP/1: closes the connection after this answer.
    fn close_after(&self, mut response: Response<ReplyBody>, version: Version) -> Response<ReplyBody> {
        if version < Version::HTTP_2 {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    /// Answers a request refused by a limit or a framing check. An HTTP/1 connection is closed after the answer:
    /// the rest of the request (a body not read, or framed in a way sealgate does not trust) must not be read as
    /// the next request, nor drained at the client's pace. (HTTP/2 streams end on their own.)
    fn refuse(&self, error: &LimitError, version: Version, connection: &ConnectionInfo) -> Response<ReplyBody> {
        tracing::debug!(peer = %connection.peer, %error, "request refused");
        self.metrics.request_refused(error.reason());
        let mut response = respond::error(error.status());
        if version < Version::HTTP_2 {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    /// Whether `host` may be answered on a connection made with `connection.certificate`: the certificate is
    /// served for it, and some certificate still serves it (a name whose grant was retired is not served over
    /// any connection).
    fn is_served_on(&self, host: &str, connection: &ConnectionInfo) -> bool {
        names::any_covers(&connection.certificate.server_names, host) && self.certificates.serves(host)
    }
}

/// A request's answer, with what the access log and the response headers need to know of how it was made.
struct Answer<'p> {
    response: Response<ReplyBody>,
    /// The upstream that answered or failed, if one was tried.
    upstream: Option<Arc<str>>,
    /// The route that answered, if the request got as far.
    route: Option<&'p Route>,
}

impl Answer<'_> {
    /// An answer made before any route was chosen.
    fn of(response: Response<ReplyBody>) -> Self {
        Self { response, upstream: None, route: None }
    }
}

/// An upgrade in progress: what was asked upstream and the client's side of the tunnel.
struct Switch {
    upgrade: HeaderValue,
    key: Option<HeaderValue>,
    client: hyper::upgrade::OnUpgrade,
    /// HTTP/1.1 upgrade (`101`) rather than HTTP/2 extended CONNECT (`200`).
    http1: bool,
}

/// The key of a client: its IPv4 address, or its IPv6 address's /64 prefix (an IPv4-mapped IPv6 address is
/// its IPv4 address). The top bit tells the families apart. One host commonly holds a whole IPv6 /64, and
/// could otherwise take a fresh key for every request. Used by rate limits and `ip_hash` balancing.
pub fn client_key(client: IpAddr) -> u64 {
    match client {
        IpAddr::V4(v4) => u64::from(u32::from(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u64::from(u32::from(v4)),
            None => (u128::from(v6) >> 64) as u64 | 1 << 63,
        },
    }
}

/// The access log record of a request, to be completed when its response ends.
fn record_of<B>(request: &Request<B>, connection: &ConnectionInfo, time: SystemTime) -> AccessRecord {
    AccessRecord {
        time,
        client: connection.peer,
        sni: connection.sni.clone(),
        host: request_authority(request).unwrap_or_default().to_owned(),
        method: request.method().clone(),
        path: request.uri().path().to_owned(),
        version: request.version(),
        status: 0,
        bytes: 0,
        duration: Duration::ZERO,
        upstream: None,
        tls_version: connection.tls_version,
        cipher: connection.cipher,
        request_id: None,
        client_certificate: connection.client_certificate.clone(),
    }
}

/// The access-log record of an HTTP/1 request hyper refused before it became one (a head too large or
/// malformed, answered `status` and closed): nothing of it is known but its connection, so method and path are
/// `-`, as nginx logs a request line it could not parse.
pub fn refused_head_record(connection: &ConnectionInfo, status: u16) -> AccessRecord {
    AccessRecord {
        method: http::Method::from_bytes(b"-").unwrap_or_default(),
        path: "-".to_owned(),
        status,
        ..record_of(&Request::new(()), connection, SystemTime::now())
    }
}

/// The request's authority: the URI's (HTTP/2 `:authority`, or an absolute-form HTTP/1.1 target, which
/// overrides `Host` per RFC 9112 section 3.2.2), else the `Host` header.
fn request_authority<B>(request: &Request<B>) -> Option<&str> {
    match request.uri().authority() {
        Some(authority) => Some(authority.as_str()),
        None => request.headers().get(header::HOST)?.to_str().ok(),
    }
}
