//! One upstream of a route and everything the balancer needs to know about it: requests in flight, the
//! active health checks' verdict and the passive ejection state.
//!
//! An upstream is *available* when it passes its health checks (always, without checks) and is not ejected.
//! Its `sealgate_upstream_healthy` gauge follows availability; since an ejection ends by the clock rather than
//! by an event, the end of each ejection is published by a timer ([`Endpoint::failed`] arms it).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::HeaderValue;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
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
///
/// An upstream that sends nothing of its body for `read_timeout` (nginx's `proxy_read_timeout`, HAProxy's
/// `timeout server`) ends it with [`ResponseBodyError::Stalled`]: the client's request is in flight all that time,
/// so no idle timeout would ever free its connection, or the upstream connection it holds.
#[derive(Debug)]
pub struct ResponseBody {
    inner: PooledBody,
    in_flight: InFlight,
    read_timeout: Duration,
    /// Armed only once the body has had to wait (most small bodies never do), then reset after each wait that
    /// ended with something read.
    stall: Option<Pin<Box<Sleep>>>,
    /// The body is waiting, and `stall` counts from the start of that wait.
    waiting: bool,
}

impl ResponseBody {
    /// `inner`, counted in flight until dropped, ended if the upstream sends nothing for `read_timeout`.
    pub fn new(inner: PooledBody, in_flight: InFlight, read_timeout: Duration) -> Self {
        Self { inner, in_flight, read_timeout, stall: None, waiting: false }
    }

    /// The upstream that answered, as named in logs and metrics.
    pub fn upstream(&self) -> &Arc<str> {
        &self.in_flight.0.name
    }
}

/// Why an upstream's response body ended before its end.
#[derive(Debug, thiserror::Error)]
pub enum ResponseBodyError {
    /// The connection failed or the upstream broke its framing.
    #[error(transparent)]
    Upstream(#[from] hyper::Error),
    /// The upstream sent nothing for this long.
    #[error("the upstream sent nothing of its response body for {0:?}")]
    Stalled(Duration),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        // `PooledBody` is `Unpin`, and so is `Self`.
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.waiting = false;
            return Poll::Ready(frame.map(|frame| frame.map_err(ResponseBodyError::from)));
        }
        let stall = match &mut this.stall {
            Some(stall) => {
                if !this.waiting {
                    stall.as_mut().reset(Instant::now() + this.read_timeout);
                }
                stall
            }
            None => this.stall.insert(Box::pin(tokio::time::sleep(this.read_timeout))),
        };
        this.waiting = true;
        match stall.as_mut().poll(cx) {
            Poll::Ready(()) => {
                tracing::warn!(
                    route = this.in_flight.0.route,
                    upstream = %this.in_flight.0.name,
                    read_timeout = ?this.read_timeout,
                    "upstream response body stalled; response cut off"
                );
                Poll::Ready(Some(Err(ResponseBodyError::Stalled(this.read_timeout))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
