//! Prometheus metrics, served by the admin endpoint at `/metrics`.
//!
//! One [`Metrics`] per server, shared by reference; every update is a relaxed atomic operation, so recording on
//! the handshake and request paths costs next to nothing.

use std::fmt;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Why a TLS handshake failed.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum HandshakeFailure {
    /// No certificate for the SNI (or no SNI and no default certificate).
    UnknownName,
    /// The handshake did not finish in time.
    Timeout,
    /// The certificate's grant ended during the handshake.
    Retired,
    /// A TLS protocol error (bad ClientHello, no common version or cipher suite, client alert, ...).
    Protocol,
    /// The connection closed or failed before the handshake finished.
    Io,
    /// A listener with `proxy_protocol` got no valid PROXY protocol header.
    ProxyHeader,
    /// `[tls.client_auth]`: the client sent no certificate where one is required, or one that failed
    /// verification (unknown issuer, expired, revoked, wrong usage).
    ClientCertificate,
}

/// Why a connection was refused as soon as it was accepted.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ConnectionRefusal {
    /// `limits.max_connections` connections were already open.
    MaxConnections,
}

/// Which deadline closed a connection after its handshake.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ConnectionTimeout {
    /// HTTP/1: a request head did not arrive in `timeouts.header_read` (also the keep-alive pause).
    HeaderRead,
    /// No request in flight for `timeouts.idle`.
    Idle,
    /// HTTP/2: a keep-alive PING was not acknowledged in `timeouts.h2_keep_alive_timeout`.
    KeepAlive,
    /// The client took nothing sent to it for `timeouts.send`.
    Send,
}

/// Why a request was refused by a limit or a framing check (the answers sealgate gives itself, beyond those
/// hyper gives before a request reaches it).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum RequestRefusal {
    /// 414: the request target is longer than `limits.max_uri_bytes`.
    UriTooLong,
    /// 431: more header fields than `limits.max_header_count`.
    TooManyHeaders,
    /// 413: the body is larger than `limits.max_body_bytes` (declared or streamed).
    BodyTooLarge,
    /// 408: the body did not arrive within `timeouts.request`.
    Timeout,
    /// 400: ambiguous message framing (`Transfer-Encoding`, `Content-Length`, look-alike header names).
    Framing,
    /// 400: the client's body was malformed or cut short.
    BadBody,
    /// HTTP/1, 431 (or 414) from hyper's parser: a head over `limits.max_header_bytes` or the field count.
    HeadTooLarge,
    /// HTTP/1, 400 from hyper's parser: a head that is not HTTP/1 (bad syntax, invalid framing headers, an
    /// HTTP/2 preface on an HTTP/1 connection).
    Malformed,
    /// 429: the client went over its route's `rate_limit`.
    RateLimited,
    /// 403: the client's address is not among those its route answers (`allow`, `deny`).
    Forbidden,
    /// 403: the route requires a client certificate (`require_client_certificate`) and the connection has none.
    ClientCertificate,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: ConnectionRefusal,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TimeoutLabels {
    timeout: ConnectionTimeout,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestRefusalLabels {
    reason: RequestRefusal,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodingLabels {
    coding: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    reason: HandshakeFailure,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    check: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertificateLabels {
    certificate_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// Labels of an upstream: the route's index in the file and the upstream's URL. Both come from the
/// configuration, so the number of series is bounded by it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    route: usize,
    upstream: String,
}

/// A route, by its index in the file and what it matches (`host` is `*` for any host): readable on a dashboard,
/// and bounded by the configuration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: usize,
    host: String,
    path: String,
}

/// Upper bounds of the request duration buckets, in seconds: from a cached answer to a slow report.
const REQUEST_DURATION_BUCKETS: [f64; 15] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

fn request_duration_histogram() -> Histogram {
    Histogram::new(REQUEST_DURATION_BUCKETS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamResultLabels {
    route: usize,
    upstream: String,
    result: &'static str,
}

/// How one attempt to an upstream ended: the `result` label (`ok`, `error`, `timeout`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum UpstreamResult {
    /// Response headers arrived (whatever the status).
    Ok,
    /// The connection failed: refused, reset, closed before the response, TLS refused.
    Error,
    /// Connecting or the response headers took too long.
    Timeout,
}

impl UpstreamResult {
    const ALL: [Self; 3] = [Self::Ok, Self::Error, Self::Timeout];

    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error => "error",
            Self::Timeout => "timeout",
        }
    }
}

/// One upstream's metrics, resolved once when the proxy is built so that recording on the request path is an
/// atomic increment (no label hashing, no allocation).
#[derive(Clone, Debug)]
pub struct UpstreamMetrics {
    results: [Counter; 3],
    healthy: Gauge,
}

impl UpstreamMetrics {
    /// An attempt ended with `result`.
    pub fn attempt(&self, result: UpstreamResult) {
        self.results[result as usize].inc();
    }

    /// Whether the upstream currently receives traffic (passes its health checks and is not ejected).
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.set(i64::from(healthy));
    }
}

/// Every metric sealgate exports.
pub struct Metrics {
    registry: Registry,
    handshakes: Counter,
    handshake_failures: Family<FailureLabels, Counter>,
    connections_open: Gauge,
    connections_parked: Gauge,
    requests: Family<StatusLabels, Counter>,
    certificates_served: Gauge,
    certificate_expiry: Family<CertificateLabels, Gauge<f64, AtomicU64>>,
    /// Handles on `certificate_expiry`'s gauges by certificate id, so that a read updates them in place instead of
    /// clearing the family and creating every series again (one label allocation and one locked insert per
    /// certificate, on every read of the export).
    expiry_gauges: std::sync::Mutex<foldhash::HashMap<String, Gauge<f64, AtomicU64>>>,
    reloads: Family<ResultLabels, Counter>,
    refused: Family<CheckLabels, Gauge>,
    grants: Family<StateLabels, Gauge>,
    retirement_latency: Histogram,
    upstream_requests: Family<UpstreamResultLabels, Counter>,
    upstream_healthy: Family<UpstreamLabels, Gauge>,
    /// The upstreams with series, so that those a reload removes can be found ([`Metrics::retain_upstreams`]).
    upstream_series: std::sync::Mutex<foldhash::HashSet<UpstreamLabels>>,
    connections_refused: Family<RefusalLabels, Counter>,
    accept_errors: Counter,
    connection_timeouts: Family<TimeoutLabels, Counter>,
    requests_refused: Family<RequestRefusalLabels, Counter>,
    responses_compressed: Family<CodingLabels, Counter>,
    client_trust_closed: Counter,
    route_durations: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// The routes with series, so that those a reload changes can be found ([`Metrics::retain_routes`]).
    route_series: std::sync::Mutex<foldhash::HashSet<RouteLabels>>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sealgate");
        let metrics = Self {
            handshakes: Counter::default(),
            handshake_failures: Family::default(),
            connections_open: Gauge::default(),
            connections_parked: Gauge::default(),
            requests: Family::default(),
            certificates_served: Gauge::default(),
            certificate_expiry: Family::default(),
            expiry_gauges: std::sync::Mutex::default(),
            reloads: Family::default(),
            refused: Family::default(),
            grants: Family::default(),
            retirement_latency: Histogram::new([
                0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            upstream_requests: Family::default(),
            upstream_healthy: Family::default(),
            upstream_series: std::sync::Mutex::default(),
            connections_refused: Family::default(),
            accept_errors: Counter::default(),
            connection_timeouts: Family::default(),
            requests_refused: Family::default(),
            responses_compressed: Family::default(),
            client_trust_closed: Counter::default(),
            route_durations: Family::new_with_constructor(request_duration_histogram),
            route_series: std::sync::Mutex::default(),
            registry: Registry::default(),
        };
        registry.register("tls_handshakes", "Completed TLS handshakes", metrics.handshakes.clone());
        registry.register(
            "tls_handshake_failures",
            "Failed TLS handshakes, by reason",
            metrics.handshake_failures.clone(),
        );
        registry.register("connections_open", "Open client connections", metrics.connections_open.clone());
        registry.register(
            "connections_parked",
            "Idle HTTP/1 connections parked, holding no HTTP buffers",
            metrics.connections_parked.clone(),
        );
        registry.register("http_requests", "HTTP requests answered, by status code", metrics.requests.clone());
        registry.register("certificates_served", "Certificates being served", metrics.certificates_served.clone());
        registry.register(
            "certificate_expiry_seconds",
            "Seconds until each served certificate's not_after",
            metrics.certificate_expiry.clone(),
        );
        registry.register("custody_reloads", "Reads of the custody export, by result", metrics.reloads.clone());
        registry.register(
            "associations_refused",
            "Associations refused in the latest read, by failed check",
            metrics.refused.clone(),
        );
        registry.register("grants", "Grants held (active) and retired", metrics.grants.clone());
        registry.register(
            "grant_retirement_seconds",
            "Time from a grant's end becoming visible (its file event; without one, its files' change stamps; or its not_after) to its keys dropped and table swapped",
            metrics.retirement_latency.clone(),
        );
        registry.register(
            "route_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by route",
            metrics.route_durations.clone(),
        );
        registry.register(
            "upstream_requests",
            "Attempts sent to each upstream (a retry is another attempt), by how they ended",
            metrics.upstream_requests.clone(),
        );
        registry.register(
            "upstream_healthy",
            "1 while an upstream receives traffic: it passes its health checks and is not ejected",
            metrics.upstream_healthy.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed as soon as accepted, by reason",
            metrics.connections_refused.clone(),
        );
        registry.register(
            "accept_errors",
            "Failed accepts (out of file descriptors, above all); each backs off",
            metrics.accept_errors.clone(),
        );
        registry.register(
            "connection_timeouts",
            "Connections closed by a deadline after their handshake, by deadline",
            metrics.connection_timeouts.clone(),
        );
        registry.register(
            "requests_refused",
            "Requests refused by a limit or a framing check, by reason",
            metrics.requests_refused.clone(),
        );
        registry.register(
            "responses_compressed",
            "Responses compressed ([compression]), by content coding",
            metrics.responses_compressed.clone(),
        );
        registry.register(
            "client_trust_connections_closed",
            "Connections closed because a new client certificate trust refused the certificate they were made with",
            metrics.client_trust_closed.clone(),
        );
        Self { registry, ..metrics }
    }

    /// The metrics of `upstream` in route `route`, created (healthy) if new. A proxy built again for the same
    /// configuration gets the same series.
    pub fn upstream(&self, route: usize, upstream: &str) -> UpstreamMetrics {
        let results = UpstreamResult::ALL.map(|result| {
            let labels = UpstreamResultLabels { route, upstream: upstream.to_owned(), result: result.label() };
            self.upstream_requests.get_or_create(&labels).clone()
        });
        let labels = UpstreamLabels { route, upstream: upstream.to_owned() };
        let healthy = self.upstream_healthy.get_or_create(&labels).clone();
        healthy.set(1);
        self.upstream_series.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(labels);
        UpstreamMetrics { results, healthy }
    }

    /// Removes the series of the upstreams `configured` no longer names (by route index and URL, as given to
    /// [`Metrics::upstream`]): after a reload that removed an upstream, a scrape shows no health gauge or
    /// counters for it, as if it were still there and healthy. A proxy still finishing requests on the old
    /// configuration updates series no longer exported, which is harmless.
    pub fn retain_upstreams(&self, configured: impl Fn(usize, &str) -> bool) {
        // The set is valid after any panic of a holder (inserts and removals only): poisoning is ignored.
        let mut series = self.upstream_series.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        series.retain(|labels| {
            if configured(labels.route, &labels.upstream) {
                return true;
            }
            self.upstream_healthy.remove(labels);
            for result in UpstreamResult::ALL {
                let (route, upstream) = (labels.route, labels.upstream.clone());
                self.upstream_requests.remove(&UpstreamResultLabels { route, upstream, result: result.label() });
            }
            false
        });
    }

    /// The request duration histogram of route `route` (its index, host pattern or `None` for any, and path),
    /// created if new. A proxy built again for the same configuration gets the same series.
    pub fn route_duration(&self, route: usize, host: Option<&str>, path: &str) -> Histogram {
        let labels = RouteLabels { route, host: host.unwrap_or("*").to_owned(), path: path.to_owned() };
        let histogram = self.route_durations.get_or_create(&labels).clone();
        self.route_series.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(labels);
        histogram
    }

    /// Removes the duration series of the routes `configured` no longer has (by index, host and path, as given
    /// to [`Metrics::route_duration`]): after a reload, a route's series is its own, not a former route's at the
    /// same index.
    pub fn retain_routes(&self, configured: impl Fn(usize, Option<&str>, &str) -> bool) {
        // The set is valid after any panic of a holder (inserts and removals only): poisoning is ignored.
        let mut series = self.route_series.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        series.retain(|labels| {
            let host = (labels.host != "*").then_some(labels.host.as_str());
            if configured(labels.route, host, &labels.path) {
                return true;
            }
            self.route_durations.remove(labels);
            false
        });
    }

    /// Renders the Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// A handshake completed.
    pub fn handshake_ok(&self) {
        self.handshakes.inc();
    }

    /// A handshake failed.
    pub fn handshake_failed(&self, reason: HandshakeFailure) {
        self.handshake_failures.get_or_create(&FailureLabels { reason }).inc();
    }

    /// A connection opened; the returned guard closes it in the count when dropped.
    pub fn connection_opened(&self) -> ConnectionCount {
        self.connections_open.inc();
        ConnectionCount(self.connections_open.clone())
    }

    /// An idle HTTP/1 connection was parked; the returned guard counts it out when dropped.
    pub fn connection_parked(&self) -> ConnectionCount {
        self.connections_parked.inc();
        ConnectionCount(self.connections_parked.clone())
    }

    /// Number of open connections.
    pub fn connections_open(&self) -> i64 {
        self.connections_open.get()
    }

    /// A connection was closed as soon as it was accepted.
    pub fn connection_refused(&self, reason: ConnectionRefusal) {
        self.connections_refused.get_or_create(&RefusalLabels { reason }).inc();
    }

    /// An accept failed.
    pub fn accept_failed(&self) {
        self.accept_errors.inc();
    }

    /// A deadline closed a connection.
    pub fn connection_timed_out(&self, timeout: ConnectionTimeout) {
        self.connection_timeouts.get_or_create(&TimeoutLabels { timeout }).inc();
    }

    /// A response was compressed with `coding` (its token: `gzip`, `br`).
    pub fn response_compressed(&self, coding: &'static str) {
        self.responses_compressed.get_or_create(&CodingLabels { coding }).inc();
    }

    /// `closed` connections were closed by a new client certificate trust.
    pub fn client_trust_closed(&self, closed: usize) {
        self.client_trust_closed.inc_by(closed as u64);
    }

    /// A request was refused by a limit or a framing check.
    pub fn request_refused(&self, reason: RequestRefusal) {
        self.requests_refused.get_or_create(&RequestRefusalLabels { reason }).inc();
    }

    /// A response was sent.
    pub fn request_answered(&self, status: http::StatusCode) {
        self.requests.get_or_create(&StatusLabels { code: status.as_u16() }).inc();
    }

    /// A grant was retired this long after its end became visible.
    pub fn grant_retired(&self, latency: std::time::Duration) {
        self.retirement_latency.observe(latency.as_secs_f64());
    }

    /// A read of the export succeeded or failed.
    pub fn reload(&self, ok: bool) {
        self.reloads.get_or_create(&ResultLabels { result: if ok { "ok" } else { "failed" } }).inc();
    }

    /// Publishes the served certificates' expiry and the latest refusals.
    pub fn custody_state<'a>(
        &self,
        served: impl Iterator<Item = (&'a str, f64)>,
        refused_by_check: &[(&'static str, i64)],
        grants_active: i64,
        grants_retired: i64,
    ) {
        let mut gauges = self.expiry_gauges.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut seen = foldhash::HashSet::with_capacity_and_hasher(gauges.len(), Default::default());
        for (id, seconds) in served {
            self.set_expiry(&mut gauges, id, seconds);
            seen.insert(id);
        }
        if seen.len() != gauges.len() {
            gauges.retain(|id, _| {
                let keep = seen.contains(id.as_str());
                if !keep {
                    self.certificate_expiry.remove(&CertificateLabels { certificate_id: id.clone() });
                }
                keep
            });
        }
        self.certificates_served.set(i64::try_from(seen.len()).unwrap_or(i64::MAX));
        drop(gauges);
        self.custody_counts(refused_by_check, grants_active, grants_retired);
    }

    /// As [`Metrics::custody_state`] after a change to a few certificates: the expiry of `updated` is set,
    /// that of `removed` dropped, and the others keep the value the last full update gave them (the holder
    /// makes one on every complete read of the export).
    pub fn custody_changes<'a>(
        &self,
        removed: impl Iterator<Item = &'a str>,
        updated: impl Iterator<Item = (&'a str, f64)>,
        refused_by_check: &[(&'static str, i64)],
        grants_active: i64,
        grants_retired: i64,
    ) {
        let mut gauges = self.expiry_gauges.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for id in removed {
            if gauges.remove(id).is_some() {
                self.certificate_expiry.remove(&CertificateLabels { certificate_id: id.to_owned() });
            }
        }
        for (id, seconds) in updated {
            self.set_expiry(&mut gauges, id, seconds);
        }
        self.certificates_served.set(i64::try_from(gauges.len()).unwrap_or(i64::MAX));
        drop(gauges);
        self.custody_counts(refused_by_check, grants_active, grants_retired);
    }

    /// Sets the expiry gauge of `id`, creating its series the first time (`gauges`: the handles of the series).
    fn set_expiry(&self, gauges: &mut foldhash::HashMap<String, Gauge<f64, AtomicU64>>, id: &str, seconds: f64) {
        match gauges.get(id) {
            Some(gauge) => {
                gauge.set(seconds);
            }
            None => {
                let labels = CertificateLabels { certificate_id: id.to_owned() };
                let gauge = self.certificate_expiry.get_or_create(&labels).clone();
                gauge.set(seconds);
                gauges.insert(labels.certificate_id, gauge);
            }
        }
    }

    fn custody_counts(&self, refused_by_check: &[(&'static str, i64)], grants_active: i64, grants_retired: i64) {
        self.refused.clear();
        for (check, n) in refused_by_check {
            self.refused.get_or_create(&CheckLabels { check }).set(*n);
        }
        self.grants.get_or_create(&StateLabels { state: "active" }).set(grants_active);
        self.grants.get_or_create(&StateLabels { state: "retired" }).set(grants_retired);
    }
}

/// Decrements a connection gauge (open, parked) when dropped.
#[derive(Debug)]
pub struct ConnectionCount(Gauge);

impl Drop for ConnectionCount {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_series_follow_the_served_set_and_are_updated_in_place() {
        let metrics = Metrics::new();
        metrics.custody_state([("c-a", 10.0), ("c-b", 20.0)].into_iter(), &[], 2, 0);
        let text = metrics.encode();
        assert!(text.contains("sealgate_certificate_expiry_seconds{certificate_id=\"c-a\"} 10.0"), "{text}");
        assert!(text.contains("sealgate_certificates_served 2"), "{text}");

        metrics.custody_state([("c-b", 15.0), ("c-c", 30.0)].into_iter(), &[], 2, 1);
        let text = metrics.encode();
        assert!(!text.contains("certificate_id=\"c-a\""), "a certificate no longer served keeps its series: {text}");
        assert!(text.contains("sealgate_certificate_expiry_seconds{certificate_id=\"c-b\"} 15.0"), "{text}");
        assert!(text.contains("sealgate_certificate_expiry_seconds{certificate_id=\"c-c\"} 30.0"), "{text}");
        assert!(text.contains("sealgate_certificates_served 2"), "{text}");

        metrics.custody_changes(["c-b"].into_iter(), [("c-c", 29.0), ("c-d", 40.0)].into_iter(), &[("1", 1)], 2, 1);
        let text = metrics.encode();
        assert!(!text.contains("certificate_id=\"c-b\""), "{text}");
        assert!(text.contains("sealgate_certificate_expiry_seconds{certificate_id=\"c-c\"} 29.0"), "{text}");
        assert!(text.contains("sealgate_certificate_expiry_seconds{certificate_id=\"c-d\"} 40.0"), "{text}");
        assert!(text.contains("sealgate_certificates_served 2"), "{text}");

        metrics.custody_state(std::iter::empty(), &[], 0, 2);
        let text = metrics.encode();
        assert!(!text.contains("certificate_id="), "{text}");
        assert!(text.contains("sealgate_certificates_served 0"), "{text}");
    }
}
