//! A route's upstreams, used the way nginx, HAProxy and Envoy users expect:
//!
//! - `pool`: the connection pool (HTTP/1.1 to `http` and `https` upstreams, TLS verified against the route's
//!   `ca`);
//! - `balancer`: `round_robin`, `least_requests` or `ip_hash`;
//! - `outlier`: passive ejection after consecutive transport failures (or, when configured, 5xx responses);
//! - `health`: active HTTP health checks, one task per upstream, stopped when the group is dropped;
//! - `retry`: which failed requests are sent again;
//! - `endpoint`: one upstream's state (requests in flight, health verdict, ejection, metrics).
//!
//! **Choosing.** A request goes to an *available* upstream (passing its health checks, not ejected) that it has
//! not been sent to yet. When no upstream is available, sealgate does what nginx does when every server is
//! marked failed, and what Envoy's panic mode does: it balances over all of them anyway. A route never turns
//! into "no upstream" because its upstreams were judged down: judgements lag, and trying costs one connection
//! attempt, where refusing would fail every request until the judgement changes. When every attempt fails the
//! client gets 502 (or 504 when the last attempt ran out of time), as with a single upstream.
//!
//! **Retries** (see `retry`), after a transport failure or an answer whose status the route lists in
//! `retry_statuses`, go to an available upstream not tried yet for the request, else to any upstream
//! not tried yet, else to one already tried; all attempts share the route's timeout as one deadline.

mod balancer;
mod endpoint;
mod health;
mod outlier;
mod pool;
mod retry;

pub use endpoint::ResponseBody;
pub use pool::{PoolError, SendError};

use std::sync::Arc;
use std::time::Duration;

use http::uri::PathAndQuery;
use http::{Request, Response};
use http_body::Body as _;
use http_body_util::{Either, Empty};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::forward::{self, ClientSide, ForwardError};
use crate::config::{HeaderRule, PrefixRewrite, ProxyConfig, UpstreamGroupConfig};
use crate::metrics::{Metrics, UpstreamResult};
use balancer::Balancer;
use endpoint::Endpoint;
use outlier::Clock;
use pool::Pool;
use retry::Tried;

/// Why a route's upstreams could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The route's pool (its TLS trust, above all) could not be built.
    #[error("route[{route}]: {source}")]
    Pool {
        /// The route's index.
        route: usize,
        /// What failed.
        source: PoolError,
    },
    /// The route lists no upstream (the configuration refuses that).
    #[error("route[{route}] has no upstream")]
    NoUpstream {
        /// The route's index.
        route: usize,
    },
    /// Health checks were configured but the proxy was built outside a Tokio runtime, where they cannot run.
    #[error("route[{route}]: health checks need a Tokio runtime")]
    NoRuntime {
        /// The route's index.
        route: usize,
    },
}

/// A route's upstreams: their state, the balancer, the pool and the health checks.
#[derive(Debug)]
pub struct UpstreamGroup {
    endpoints: Box<[Arc<Endpoint>]>,
    balancer: Balancer,
    pool: Pool,
    retries: u32,
    /// Upstream answers retried as a transport failure is (`retry_statuses`).
    retry_statuses: Box<[u16]>,
    preserve_host: bool,
    /// How long a response body may wait on its upstream (`read_timeout`).
    read_timeout: Duration,
    /// The route's `prefix_rewrite`.
    prefix_rewrite: Option<PrefixRewrite>,
    /// The route's `request_headers`.
    request_headers: Box<[HeaderRule]>,
    clock: Clock,
    /// Stops the health checks and readmission timers when the group is dropped.
    _stop: DropGuard,
}

impl UpstreamGroup {
    /// Checks what building route `route`'s upstreams reads from files (the `ca`), without building them: for
    /// `sealgate check`, which must refuse what `run` would.
    pub fn check_files(route: usize, config: &UpstreamGroupConfig, proxy: &ProxyConfig) -> Result<(), UpstreamError> {
        Pool::new(proxy, config.ca.as_deref(), config.protocol)
            .map_err(|source| UpstreamError::Pool { route, source })?;
        Ok(())
    }

    /// The upstreams of route `route`, with health checks started when configured (which needs a Tokio
    /// runtime).
    pub fn new(
        route: usize,
        config: &UpstreamGroupConfig,
        proxy: &ProxyConfig,
        metrics: &Metrics,
    ) -> Result<Self, UpstreamError> {
        if config.upstreams.is_empty() {
            return Err(UpstreamError::NoUpstream { route });
        }
        let pool = Pool::new(proxy, config.ca.as_deref(), config.protocol)
            .map_err(|source| UpstreamError::Pool { route, source })?;
        let clock = Clock::new();
        let stop = CancellationToken::new();
        let endpoints: Box<[Arc<Endpoint>]> = config
            .upstreams
            .iter()
            .map(|url| {
                let metrics = metrics.upstream(route, &url.to_string());
                Arc::new(Endpoint::new(route, url.clone(), config.outlier.clone(), metrics, clock, stop.clone()))
            })
            .collect();
        if let Some(checks) = &config.health_check {
            let runtime = tokio::runtime::Handle::try_current().map_err(|_| UpstreamError::NoRuntime { route })?;
            let checks = Arc::new(checks.clone());
            for endpoint in endpoints.iter() {
                runtime.spawn(health::run(Arc::clone(endpoint), pool.clone(), Arc::clone(&checks), stop.clone()));
            }
        }
        Ok(Self {
            endpoints,
            balancer: Balancer::new(config.balance),
            pool,
            retries: config.retries,
            retry_statuses: config.retry_statuses.clone().into_boxed_slice(),
            preserve_host: proxy.preserve_host,
            read_timeout: config.read_timeout.unwrap_or(proxy.read_timeout),
            prefix_rewrite: config.prefix_rewrite.clone(),
            request_headers: config.request_headers.clone().into_boxed_slice(),
            clock,
            _stop: stop.drop_guard(),
        })
    }

    /// Forwards `request` to one of the upstreams, retrying as `retry` allows, and waits until `timeout` (for
    /// all attempts together) for the response headers. The response body is streamed; it names the upstream
    /// that answered ([`ResponseBody::upstream`]).
    pub async fn forward(
        &self,
        request: Request<crate::proxy::limits::RequestBody>,
        client: ClientSide<'_>,
        timeout: Duration,
    ) -> Result<Response<ResponseBody>, ForwardError> {
        let deadline = outlier::later(Instant::now(), timeout);
        let (mut parts, body) = request.into_parts();
        // `TE: trailers` (the only `TE` HTTP/2 allows; gRPC servers require it) goes on to an HTTP/2 upstream;
        // to an HTTP/1.1 one, `TE` is hop-by-hop and goes nowhere.
        let trailers = self.pool.speaks_http2() && forward::accepts_trailers(&parts.headers);
        forward::rewrite_head(&mut parts, client, self.preserve_host)?;
        if trailers {
            parts.headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        }
        for rule in self.request_headers.iter() {
            rule.apply(&mut parts.headers);
        }
        let mut path = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        if let Some(rewrite) = &self.prefix_rewrite {
            path = forward::rewrite_prefix(&path, rewrite)?;
        }
        let bodiless = body.is_end_stream();
        let max_attempts = if bodiless && retry::is_idempotent(&parts.method) { 1 + self.retries as usize } else { 1 };
        // A bodiless request is sent with an empty body, so that it can be sent again; a body is streamed once.
        let mut body = (!bodiless).then_some(body);
        let mut headers = parts.headers;
        let mut tried = Tried::default();
        let client_key = crate::proxy::client_key(client.peer.ip());
        loop {
            let (index, endpoint) = self.pick(&tried, client_key);
            tried.push(index);
            let last = tried.len() >= max_attempts;
            // Keep the headers for another attempt only while one may follow: a request that cannot be retried
            // costs no copy.
            let attempt_headers = if last { std::mem::take(&mut headers) } else { headers.clone() };
            let attempt_body = match body.take() {
                Some(body) => Either::Left(body),
                None => Either::Right(Empty::new()),
            };
            let host = (!self.preserve_host).then(|| endpoint.host.clone());
            let request =
                forward::upstream_request(parts.method.clone(), path.clone(), attempt_headers, host, attempt_body)?;

            let in_flight = endpoint.start();
            let error = match tokio::time::timeout_at(deadline, self.pool.send(&endpoint.connections, request)).await {
                Ok(Ok(response)) => {
                    let status = response.status();
                    endpoint.answered(status);
                    if !last && self.retry_statuses.contains(&status.as_u16()) && Instant::now() < deadline {
                        // Its body is not read: an HTTP/1.1 connection is closed rather than given back, an HTTP/2
                        // stream reset.
                        drop((response, in_flight));
                        tracing::debug!(
                            route = endpoint.route(),
                            upstream = %endpoint.name,
                            %status,
                            attempt = tried.len(),
                            "retrying on another upstream after its answer"
                        );
                        continue;
                    }
                    let (mut head, body) = response.into_parts();
                    // A switch of protocols keeps its `Upgrade` for the proxy to check (see `proxy::upgrade`), which
                    // then removes the hop-by-hop headers itself.
                    if head.status != http::StatusCode::SWITCHING_PROTOCOLS {
                        forward::remove_hop_by_hop(&mut head.headers);
                    }
                    return Ok(Response::from_parts(head, ResponseBody::new(body, in_flight, self.read_timeout)));
                }
                Err(_) => {
                    // The route's deadline: no time is left for another attempt.
                    endpoint.failed(UpstreamResult::Timeout);
                    return Err(ForwardError::Timeout { upstream: endpoint.name.to_string(), timeout });
                }
                Ok(Err(SendError::ConnectTimeout(connect_timeout))) => {
                    endpoint.failed(UpstreamResult::Timeout);
                    ForwardError::Timeout { upstream: endpoint.name.to_string(), timeout: connect_timeout }
                }
                Ok(Err(source)) => {
                    endpoint.failed(UpstreamResult::Error);
                    ForwardError::Unreachable { upstream: endpoint.name.to_string(), source }
                }
            };
            drop(in_flight);
            if last || Instant::now() >= deadline {
                return Err(error);
            }
            tracing::debug!(route = endpoint.route(), %error, attempt = tried.len(), "retrying on another upstream");
        }
    }

    /// The upstream for the next attempt for `client` (its key, for `ip_hash`): an available one not tried yet;
    /// else, in turn, any one not tried yet, an available one, any one (see the module documentation).
    fn pick(&self, tried: &Tried, client: u64) -> (usize, &Arc<Endpoint>) {
        let now = self.clock.now();
        let n = self.endpoints.len();
        let available = |i: usize| self.endpoints.get(i).is_some_and(|e| e.is_available(now));
        let load = |i: usize| self.endpoints.get(i).map_or(usize::MAX, |e| e.in_flight());
        let index = self
            .balancer
            .pick(n, |i| available(i) && !tried.contains(i), load, client)
            .or_else(|| self.balancer.pick(n, |i| !tried.contains(i), load, client))
            .or_else(|| self.balancer.pick(n, available, load, client))
            .unwrap_or(0);
        match self.endpoints.get(index) {
            Some(endpoint) => (index, endpoint),
            // The balancer only returns indices below `n`, and `endpoints` is never empty (checked in `new`), so
            // index 0 exists: this arm is never taken and cannot panic.
            None => (0, &self.endpoints[0]),
        }
    }
}
