//! The HTTP side: what happens to a request once a TLS connection carries it.
//!
//! - [`limits`]: request limits and framing checks, before anything else;
//! - [`routes`]: which route answers a host and path;
//! - [`forward`]: forwarding to upstreams (headers, pool, 502/504);
//! - [`respond`]: answers sealgate writes itself.
//!
//! Before routing, every request's `Host` (HTTP/1.1) or `:authority` (HTTP/2) must be a name the connection's
//! certificate is served for *and* that is still served: a client that reuses a connection for another name
//! (HTTP/2 connection coalescing, or a forged `Host`) gets 421 and retries on a connection of its own.

pub mod forward;
pub mod limits;
pub mod respond;
pub mod routes;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::config::Config;
use crate::keyring::CertificateIdentity;
use crate::metrics::Metrics;
use crate::names;
use crate::tls::CertificateStore;
use forward::{ClientSide, UpstreamClient};
use limits::{LimitError, Limits};
use routes::{Action, RouteTable};

pub use limits::RequestBody;

/// The body of every response sealgate sends: an upstream's, streamed, or one of its own.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// What the proxy knows of the connection a request came on.
#[derive(Debug)]
pub struct ConnectionInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// The SNI the client sent, if any.
    pub sni: Option<String>,
    /// The certificate generation the connection was made with.
    pub certificate: Arc<CertificateIdentity>,
}

/// Routes and forwards requests.
#[derive(Debug)]
pub struct Proxy {
    routes: RouteTable,
    client: UpstreamClient,
    certificates: Arc<CertificateStore>,
    metrics: Arc<Metrics>,
    limits: Limits,
}

impl Proxy {
    /// A proxy for `config`'s routes. `certificates` tells which names are still served.
    pub fn new(config: &Config, certificates: Arc<CertificateStore>, metrics: Arc<Metrics>) -> Self {
        Self {
            routes: RouteTable::new(&config.routes, config.proxy.response_timeout),
            client: UpstreamClient::new(&config.proxy),
            certificates,
            metrics,
            limits: Limits::new(&config.limits, &config.timeouts),
        }
    }

    /// Answers one request.
    pub async fn handle(&self, request: Request<Incoming>, connection: &ConnectionInfo) -> Response<ProxyBody> {
        let response = self.answer(request, connection).await;
        self.metrics.request_answered(response.status());
        response
    }

    async fn answer(&self, request: Request<Incoming>, connection: &ConnectionInfo) -> Response<ProxyBody> {
        let version = request.version();
        let request = match self.limits.admit(request) {
            Ok(request) => request,
            Err(error) => return self.refuse(&error, version, connection),
        };
        let Some(authority) = request_authority(&request).map(str::to_owned) else {
            return respond::error(StatusCode::BAD_REQUEST);
        };
        let Some(host) = names::host_of_authority(&authority) else {
            return respond::error(StatusCode::BAD_REQUEST);
        };
        if !self.is_served_on(&host, connection) {
            tracing::debug!(
                host = %host,
                certificate = %connection.certificate.certificate_id,
                "421: host not served by this connection's certificate"
            );
            return respond::error(StatusCode::MISDIRECTED_REQUEST);
        }
        let Some(route) = self.routes.find(&host, request.uri().path()) else {
            return respond::error(StatusCode::NOT_FOUND);
        };
        match &route.action {
            Action::Respond(response) => respond::fixed(response),
            Action::Upstream(upstreams) => {
                let upstream = upstreams.pick();
                let client = ClientSide { peer: connection.peer, authority: &authority };
                match self.client.forward(request, upstream, client, route.response_timeout).await {
                    Ok(response) => response.map(Either::Left),
                    Err(error) => match LimitError::find_in(&error) {
                        // The client's body was refused on its way upstream: the client's fault, not the upstream's.
                        Some(limit) => self.refuse(limit, version, connection),
                        None => {
                            tracing::warn!(route = route.index, %error, "upstream request failed");
                            respond::error(error.status())
                        }
                    },
                }
            }
        }
    }

    /// Answers a request refused by a limit or a framing check. An HTTP/1 connection is closed after the answer:
    /// the rest of the request (a body not read, or framed in a way sealgate does not trust) must not be read as
    /// the next request, nor drained at the client's pace. (HTTP/2 streams end on their own.)
    fn refuse(&self, error: &LimitError, version: Version, connection: &ConnectionInfo) -> Response<ProxyBody> {
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

/// The request's authority: the URI's (HTTP/2 `:authority`, or an absolute-form HTTP/1.1 target, which
/// overrides `Host` per RFC 9112 section 3.2.2), else the `Host` header.
fn request_authority<B>(request: &Request<B>) -> Option<&str> {
    match request.uri().authority() {
        Some(authority) => Some(authority.as_str()),
        None => request.headers().get(header::HOST)?.to_str().ok(),
    }
}
