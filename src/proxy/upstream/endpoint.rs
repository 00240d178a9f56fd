//! One upstream of a route and everything the balancer needs to know about it: requests in flight, the
//! active health checks' verdict and the passive ejection state.
//!
//! An upstream is *available* when it passes its health checks (always, without checks) and is not ejected.
//! Its `sealgate_upstream_healthy` gauge follows availability; since an ejection ends by the clock rather than
//! by an event, the end of each ejection is published by a timer ([`Endpoint::failed`] arms it).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::HeaderValue;
use http_body::{Body, Frame, SizeHint};
use tokio_util::sync::CancellationToken;

use super::outlier::{Clock, Outlier, Verdict};
use super::pool::{PooledBody, Upstream};
use crate::config::{OutlierConfig, UpstreamScheme, UpstreamUrl};
use crate::metrics::{UpstreamMetrics, UpstreamResult};

/// One upstream of a route.
#[derive(Debug)]
pub struct Endpoint {
    /// `host:port`.
    pub authority: Authority,
    /// The configured URL, as named in logs and metrics.
    pub name: Arc<str>,
    /// `host:port` as a `Host` header, for `preserve_host = false`.
    pub host: HeaderValue,
    /// Where to connect, and the idle connections to it.
    pub connections: Upstream,
    route: usize,
    in_flight: AtomicUsize,
    /// The active health checks' verdict; `true` without health checks.
    checks_pass: AtomicBool,
    outlier: Outlier,
    /// Availability as last published to the gauge, so that the gauge is written on changes only.
    published: AtomicBool,
    metrics: UpstreamMetrics,
    clock: Clock,
    /// Cancelled when the route's upstream group is dropped: ends the readmission timers.
    stop: CancellationToken,
}

impl Endpoint {
    /// An available upstream with no request in flight.
    pub fn new(
        route: usize,
        url: UpstreamUrl,
        outlier: OutlierConfig,
        metrics: UpstreamMetrics,
        clock: Clock,
        stop: CancellationToken,
    ) -> Self {
        let scheme = match url.scheme {
            UpstreamScheme::Http => Scheme::HTTP,
            UpstreamScheme::Https => Scheme::HTTPS,
        };
        metrics.set_healthy(true);
        // An authority is visible ASCII, always a valid header value: the fallback is never used.
        let host = HeaderValue::from_str(url.authority.as_str()).unwrap_or(HeaderValue::from_static("invalid"));
        Self {
            host,
            connections: Upstream::new(&scheme, &url.authority, stop.clone()),
            authority: url.authority.clone(),
            name: Arc::from(url.to_string()),
            route,
            in_flight: AtomicUsize::new(0),
            checks_pass: AtomicBool::new(true),
            outlier: Outlier::new(outlier),
            published: AtomicBool::new(true),
            metrics,
            clock,
            stop,
        }
    }

    /// Whether the balancer should send it traffic at `now` ([`Clock`] milliseconds).
    pub fn is_available(&self, now: u64) -> bool {
        self.checks_pass.load(Ordering::Relaxed) && !self.outlier.is_ejected(now)
    }

    /// Requests sent to it whose response has not been fully delivered (or dropped) yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request in flight until the returned guard is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    /// An attempt got response headers with `status`.
    pub fn answered(self: &Arc<Self>, status: http::StatusCode) {
        self.metrics.attempt(UpstreamResult::Ok);
        if status.is_server_error() {
            self.judged(self.outlier.server_error(self.clock.now()), "server errors");
        } else {
            self.outlier.success();
        }
    }

    /// An attempt failed with `result` (an error or a timeout).
    pub fn failed(self: &Arc<Self>, result: UpstreamResult) {
        self.metrics.attempt(result);
        self.judged(self.outlier.failure(self.clock.now()), "failures");
    }

    /// Acts on the outlier detection's verdict on the last outcome (`what`: what came in a row).
    fn judged(self: &Arc<Self>, verdict: Verdict, what: &str) {
        let Verdict::Ejected { until, duration } = verdict else { return };
        tracing::warn!(route = self.route, upstream = %self.name, ?duration, "upstream ejected after consecutive {what}");
        self.publish();
        // Publish the readmission when the ejection ends. Failing outside a runtime cannot happen on the request
        // path; if it did, the gauge would only be late until the next change.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let endpoint = Arc::clone(self);
        runtime.spawn(async move {
            tokio::select! {
                _ = endpoint.stop.cancelled() => {}
                _ = tokio::time::sleep_until(endpoint.clock.instant(until)) => {
                    tracing::info!(route = endpoint.route, upstream = %endpoint.name, "ejection over; upstream readmitted on probation");
                    endpoint.publish();
                }
            }
        });
    }

    /// Records the active health checks' verdict.
    pub fn set_checks_pass(&self, pass: bool) {
        if self.checks_pass.swap(pass, Ordering::Relaxed) != pass {
            self.publish();
        }
    }

    /// Writes the current availability to the gauge if it changed.
    fn publish(&self) {
        let available = self.is_available(self.clock.now());
        if self.published.swap(available, Ordering::Relaxed) != available {
            self.metrics.set_healthy(available);
        }
    }

    /// The route's index, for logs.
    pub fn route(&self) -> usize {
        self.route
    }
}

/// A request in flight to an [`Endpoint`]; the count goes down when this is dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An upstream's response body, streamed as it arrives; the request stays in flight (for `least_requests`) until
/// the body has been delivered or dropped, as Envoy counts active requests.
#[derive(Debug)]
pub struct ResponseBody {
    inner: PooledBody,
    in_flight: InFlight,
}

impl ResponseBody {
    /// `inner`, counted in flight until dropped.
    pub fn new(inner: PooledBody, in_flight: InFlight) -> Self {
        Self { inner, in_flight }
    }

    /// The upstream that answered, as named in logs and metrics.
    pub fn upstream(&self) -> &Arc<str> {
        &self.in_flight.0.name
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        // `PooledBody` is `Unpin`, and so is `Self`.
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
