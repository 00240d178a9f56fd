//! Active HTTP health checks: one task per upstream sends `GET <path>` every `interval` and turns the results
//! into the upstream's verdict, with hysteresis: `unhealthy_threshold` failures in a row make a healthy
//! upstream unhealthy, `healthy_threshold` passes in a row make it healthy again.
//!
//! - A check passes when response headers with a status in `expect_status` arrive within `timeout`. The body
//!   is read and discarded (up to [`MAX_BODY`], within the same timeout), so that the connection can be reused.
//! - Upstreams start healthy and are checked at once: a proxy built again for a configuration reload keeps
//!   sending traffic while the first checks run, and a dead upstream is known within `unhealthy_threshold`
//!   intervals (meanwhile passive ejection and retries cover it).
//! - The request goes through the route's own pool, so `https` upstreams are checked over TLS verified against
//!   the route's `ca`, and `Host` is the upstream's `host:port`.
//! - The tasks live as long as the route's upstream group: they stop when its token is cancelled, which the
//!   group does when dropped (a reload that replaces the proxy stops the old checks).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Either, Empty};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::endpoint::Endpoint;
use super::pool::Pool;
use crate::config::HealthCheckConfig;

/// Most bytes of a check's response body read before the connection is given up instead.
pub const MAX_BODY: usize = 64 * 1024;

/// Why one check failed, for the log.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The check's URI cannot be built (cannot happen for a validated configuration).
    #[error("cannot build the check request: {0}")]
    Request(#[from] http::Error),
    /// The request failed in the transport.
    #[error("request failed: {0}")]
    Transport(#[from] super::pool::SendError),
    /// No response headers (and body) within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The status is not one the check expects.
    #[error("status {0}")]
    Status(http::StatusCode),
}

/// Checks `endpoint` every `config.interval` until `stop` is cancelled.
pub async fn run(endpoint: Arc<Endpoint>, pool: Pool, config: Arc<HealthCheckConfig>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(config.interval);
    // A check slower than the interval delays the next one rather than firing a burst after it.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut verdict = Verdict::new(&config);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            result = check(&endpoint, &pool, &config) => result,
        };
        if let Some(healthy) = verdict.record(result.is_ok()) {
            endpoint.set_checks_pass(healthy);
            match &result {
                Ok(()) => {
                    tracing::info!(route = endpoint.route(), upstream = %endpoint.name, "upstream healthy: health checks pass")
                }
                Err(error) => {
                    tracing::warn!(route = endpoint.route(), upstream = %endpoint.name, %error, "upstream unhealthy: health checks fail")
                }
            }
        } else if let Err(error) = &result {
            tracing::debug!(route = endpoint.route(), upstream = %endpoint.name, %error, "health check failed");
        }
    }
}

/// One check.
async fn check(endpoint: &Endpoint, pool: &Pool, config: &HealthCheckConfig) -> Result<(), CheckError> {
    let uri = Uri::builder().path_and_query(config.path.clone()).build()?;
    let mut request = Request::new(Either::Right(Empty::<Bytes>::new()));
    *request.method_mut() = Method::GET;
    *request.uri_mut() = uri;
    let host = HeaderValue::from_str(endpoint.authority.as_str()).map_err(http::Error::from)?;
    request.headers_mut().insert(header::HOST, host);
    request.headers_mut().insert(header::USER_AGENT, HeaderValue::from_static("sealgate-health-check"));
    let exchange = async {
        let response = pool.send(&endpoint.connections, request).await?;
        let status = response.status();
        // Drain a small body so that the connection goes back to the pool; a large one is dropped with it.
        let _ = http_body_util::Limited::new(response.into_body(), MAX_BODY).collect().await;
        if config.expect_status.contains(&status.as_u16()) {
            Ok(())
        } else {
            Err(CheckError::Status(status))
        }
    };
    tokio::time::timeout(config.timeout, exchange).await.unwrap_or(Err(CheckError::Timeout(config.timeout)))
}

/// The thresholds' state: consecutive passes or failures, and the current verdict.
#[derive(Debug)]
struct Verdict {
    healthy: bool,
    streak: u32,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

impl Verdict {
    fn new(config: &HealthCheckConfig) -> Self {
        Self {
            healthy: true,
            streak: 0,
            healthy_threshold: config.healthy_threshold,
            unhealthy_threshold: config.unhealthy_threshold,
        }
    }

    /// Records one check; returns the new verdict when it changed.
    fn record(&mut self, passed: bool) -> Option<bool> {
        if passed == self.healthy {
            // A result that agrees with the verdict ends any streak against it.
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let threshold = if passed { self.healthy_threshold } else { self.unhealthy_threshold };
        if self.streak < threshold {
            return None;
        }
        self.healthy = passed;
        self.streak = 0;
        Some(passed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(healthy_threshold: u32, unhealthy_threshold: u32) -> Verdict {
        Verdict { healthy: true, streak: 0, healthy_threshold, unhealthy_threshold }
    }

    #[test]
    fn thresholds_need_results_in_a_row() {
        let mut v = verdict(2, 3);
        assert_eq!(v.record(false), None);
        assert_eq!(v.record(false), None);
        assert_eq!(v.record(true), None, "a pass breaks the failure streak");
        assert_eq!(v.record(false), None);
        assert_eq!(v.record(false), None);
        assert_eq!(v.record(false), Some(false));
        assert_eq!(v.record(false), None, "already unhealthy");
        assert_eq!(v.record(true), None);
        assert_eq!(v.record(false), None, "a failure breaks the pass streak");
        assert_eq!(v.record(true), None);
        assert_eq!(v.record(true), Some(true));
    }

    #[test]
    fn thresholds_of_one_flip_at_once() {
        let mut v = verdict(1, 1);
        assert_eq!(v.record(false), Some(false));
        assert_eq!(v.record(true), Some(true));
    }
}
