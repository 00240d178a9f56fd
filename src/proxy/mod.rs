//! The HTTP side: what happens to a request once a TLS connection carries it.
//!
//! - [`routes`]: which route answers a host and path;
//! - [`forward`]: rewriting requests for upstreams (headers, 502/504);
//! - [`upstream`]: a route's upstreams (pool, balancing, ejection, health checks, retries);
//! - [`respond`]: answers sealgate writes itself.
//!
//! Before routing, every request's `Host` (HTTP/1.1) or `:authority` (HTTP/2) must be a name the connection's
//! certificate is served for *and* that is still served: a client that reuses a connection for another name
//! (HTTP/2 connection coalescing, or a forged `Host`) gets 421 and retries on a connection of its own.

pub mod forward;
pub mod respond;
pub mod routes;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::config::Config;
use crate::keyring::CertificateIdentity;
use crate::metrics::Metrics;
use crate::names;
use crate::tls::CertificateStore;
use forward::ClientSide;
use routes::{Action, RouteTable};
use upstream::{ResponseBody, UpstreamError};

/// The body of every response sealgate sends: an upstream's, streamed, or one of its own.
pub type ProxyBody = Either<ResponseBody, Full<Bytes>>;

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
///
/// A proxy owns its routes' upstream state and background tasks (health checks): building one starts them,
/// dropping it stops them, so a proxy can be replaced by a new one for a configuration reload.
#[derive(Debug)]
pub struct Proxy {
    routes: RouteTable,
    certificates: Arc<CertificateStore>,
    metrics: Arc<Metrics>,
}

impl Proxy {
    /// A proxy for `config`'s routes. `certificates` tells which names are still served. Health checks start
    /// here, so a configuration with health checks needs a Tokio runtime; a CA file that cannot be read fails.
    pub fn new(
        config: &Config,
        certificates: Arc<CertificateStore>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, UpstreamError> {
        Ok(Self { routes: RouteTable::new(&config.routes, &config.proxy, &metrics)?, certificates, metrics })
    }

    /// Answers one request.
    pub async fn handle(&self, request: Request<Incoming>, connection: &ConnectionInfo) -> Response<ProxyBody> {
        let response = self.answer(request, connection).await;
        self.metrics.request_answered(response.status());
        response
    }

    async fn answer(&self, request: Request<Incoming>, connection: &ConnectionInfo) -> Response<ProxyBody> {
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
                let client = ClientSide { peer: connection.peer, authority: &authority };
                match upstreams.forward(request, client, route.response_timeout).await {
                    Ok(response) => response.map(Either::Left),
                    Err(error) => {
                        tracing::warn!(route = route.index, %error, "upstream request failed");
                        respond::error(error.status())
                    }
                }
            }
        }
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
