//! Passive ejection (outlier detection): an upstream that fails `consecutive_failures` requests in a row, or
//! (when configured) answers `consecutive_5xx` of them in a row with a server error, is taken out of the
//! balancing for a while, without any probe of our own.
//!
//! The model is Envoy's `consecutive_gateway_failure` and `consecutive_5xx` with nginx's
//! `max_fails`/`fail_timeout` readmission:
//!
//! - A *failure* is a failure of the upstream's transport: refused or timed-out connections, TLS refused,
//!   resets and connections closed before the response headers, and response headers that do not arrive in
//!   time. A response is a *success* for that count, whatever its status: a 5xx comes from an upstream that is
//!   up and answering.
//! - A *server error* is a response with a 5xx status. It counts towards `consecutive_5xx`, which is off (0) by
//!   default: whether an application's 5xx means "take this instance out" is the operator's call (an
//!   application failing everywhere would otherwise be ejected everywhere, see [`super::balancer`] for what
//!   happens then). A transport failure counts towards it too, as Envoy counts it; a response below 500
//!   resets both counts.
//! - The n-th ejection in a row lasts `n × base_ejection_time`, capped at `max_ejection_time`. Ejections are
//!   "in a row" while the upstream is ejected again within `max_ejection_time` of its last readmission; after
//!   a longer good spell the next ejection starts from `base_ejection_time` again.
//! - When an ejection ends the upstream is readmitted on probation (as nginx does): its first failure (or, with
//!   `consecutive_5xx`, server error) ejects it again at once, its first success clears the probation. A dead
//!   upstream thus costs one failed attempt per ejection, not `consecutive_failures` of them.
//! - Outcomes reported while the upstream is ejected (requests that started before, or traffic sent to it
//!   because every upstream is out) are not counted: they would only extend an ejection that is already
//!   running.
//!
//! State is a handful of atomics updated with relaxed ordering: under concurrency a count may be off by one
//! request, which no threshold of this kind is precise to anyway, and the request path never takes a lock.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::OutlierConfig;

/// Milliseconds on a monotonic clock that starts when the proxy is built, so that instants fit an atomic.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    /// A clock whose zero is now.
    pub fn new() -> Self {
        Self { epoch: Instant::now() }
    }

    /// Milliseconds since the epoch, at least 1 (0 means "never" in the state below).
    pub fn now(&self) -> u64 {
        self.at(Instant::now())
    }

    /// `instant` in milliseconds since the epoch, at least 1.
    pub fn at(&self, instant: Instant) -> u64 {
        u64::try_from(instant.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX).max(1)
    }

    /// The instant `millis` after the epoch (or as far as the platform's instants reach).
    pub fn instant(&self, millis: u64) -> Instant {
        later(self.epoch, Duration::from_millis(millis))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// What a reported outcome did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing changed in whether the upstream is used.
    Unchanged,
    /// The upstream is now ejected until this time (clock milliseconds).
    Ejected {
        /// End of the ejection, in [`Clock`] milliseconds.
        until: u64,
        /// Its length.
        duration: Duration,
    },
}

/// One upstream's outlier state.
#[derive(Debug)]
pub struct Outlier {
    policy: OutlierConfig,
    /// Transport failures in a row; set to `consecutive_failures - 1` at an ejection, which is the probation.
    consecutive: AtomicU32,
    /// Server errors (and transport failures) in a row; set to `consecutive_5xx - 1` at an ejection.
    consecutive_5xx: AtomicU32,
    /// End of the current or last ejection, clock milliseconds; 0 = never ejected.
    ejected_until: AtomicU64,
    /// Ejections in a row: the multiplier of `base_ejection_time`.
    ejections: AtomicU32,
}

impl Outlier {
    /// A fresh state (not ejected) under `policy`.
    pub fn new(policy: OutlierConfig) -> Self {
        Self {
            policy,
            consecutive: AtomicU32::new(0),
            consecutive_5xx: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
        }
    }

    /// Whether the upstream is ejected at `now`.
    pub fn is_ejected(&self, now: u64) -> bool {
        now < self.ejected_until.load(Ordering::Relaxed)
    }

    /// A request to the upstream got a response below 500.
    pub fn success(&self) {
        reset(&self.consecutive);
        reset(&self.consecutive_5xx);
    }

    /// A request to the upstream got a 5xx response at `now`.
    pub fn server_error(&self, now: u64) -> Verdict {
        reset(&self.consecutive);
        if self.policy.consecutive_5xx == 0 || self.is_ejected(now) {
            return Verdict::Unchanged;
        }
        match count(&self.consecutive_5xx) >= self.policy.consecutive_5xx {
            true => self.eject(now),
            false => Verdict::Unchanged,
        }
    }

    /// A request to the upstream failed at `now`.
    pub fn failure(&self, now: u64) -> Verdict {
        if self.is_ejected(now) {
            return Verdict::Unchanged;
        }
        let (threshold, threshold_5xx) = (self.policy.consecutive_failures, self.policy.consecutive_5xx);
        let failures = if threshold > 0 { count(&self.consecutive) } else { 0 };
        let errors = if threshold_5xx > 0 { count(&self.consecutive_5xx) } else { 0 };
        match (threshold > 0 && failures >= threshold) || (threshold_5xx > 0 && errors >= threshold_5xx) {
            true => self.eject(now),
            false => Verdict::Unchanged,
        }
    }

    /// Ejects the upstream from `now` (unless a concurrent report just did) and puts both counts on probation.
    fn eject(&self, now: u64) -> Verdict {
        let until = self.ejected_until.load(Ordering::Relaxed);
        if now < until {
            return Verdict::Unchanged;
        }
        let max_ms = millis(self.policy.max_ejection_time);
        // A long good spell since the last readmission: start over from the base ejection time.
        let in_a_row = until != 0 && now.saturating_sub(until) <= max_ms;
        let n = if in_a_row { self.ejections.load(Ordering::Relaxed).saturating_add(1) } else { 1 };
        let duration = self.policy.base_ejection_time.saturating_mul(n).min(self.policy.max_ejection_time);
        let new_until = now.saturating_add(millis(duration));
        // Only one of several concurrent reports ejects (and counts the ejection).
        if self.ejected_until.compare_exchange(until, new_until, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            return Verdict::Unchanged;
        }
        self.ejections.store(n, Ordering::Relaxed);
        self.consecutive.store(self.policy.consecutive_failures.saturating_sub(1), Ordering::Relaxed);
        self.consecutive_5xx.store(self.policy.consecutive_5xx.saturating_sub(1), Ordering::Relaxed);
        Verdict::Ejected { until: new_until, duration }
    }
}

/// Sets a count to 0. Read first: on the hot path the count is almost always 0 already, and a load does not take
/// the cache line away from the other cores.
fn reset(count: &AtomicU32) {
    if count.load(Ordering::Relaxed) != 0 {
        count.store(0, Ordering::Relaxed);
    }
}

/// Adds one to a count; returns the new value.
fn count(count: &AtomicU32) -> u32 {
    count.fetch_add(1, Ordering::Relaxed).saturating_add(1)
}

/// `instant + duration`, or a time decades ahead when that is past what an `Instant` can hold (a configured
/// duration of `u64::MAX` seconds must not panic).
pub fn later(instant: Instant, duration: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
    instant.checked_add(duration).or_else(|| instant.checked_add(FAR)).unwrap_or(instant)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(consecutive_failures: u32) -> OutlierConfig {
        OutlierConfig {
            consecutive_failures,
            consecutive_5xx: 0,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(25),
        }
    }

    fn ejected_for(verdict: Verdict) -> Option<u64> {
        match verdict {
            Verdict::Ejected { duration, .. } => Some(duration.as_secs()),
            Verdict::Unchanged => None,
        }
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets_the_count() {
        let o = Outlier::new(policy(3));
        assert_eq!(o.failure(1_000), Verdict::Unchanged);
        assert_eq!(o.failure(1_001), Verdict::Unchanged);
        o.success();
        assert_eq!(o.failure(1_002), Verdict::Unchanged);
        assert_eq!(o.failure(1_003), Verdict::Unchanged);
        assert_eq!(o.failure(1_004), Verdict::Ejected { until: 11_004, duration: Duration::from_secs(10) });
        assert!(o.is_ejected(1_005) && o.is_ejected(11_003));
        assert!(!o.is_ejected(11_004), "readmitted when the ejection ends");
    }

    #[test]
    fn failures_while_ejected_do_not_count_and_probation_re_ejects_at_once_for_longer_up_to_the_cap() {
        let o = Outlier::new(policy(3));
        for t in 0..3 {
            o.failure(1_000 + t);
        }
        for t in 0..10 {
            assert_eq!(o.failure(2_000 + t), Verdict::Unchanged, "already ejected");
        }
        // Readmitted at 11_002; the first failure on probation ejects for 2 × 10 s, then 25 s (the cap).
        assert_eq!(ejected_for(o.failure(11_002)), Some(20));
        assert_eq!(ejected_for(o.failure(31_002)), Some(25));
        assert_eq!(ejected_for(o.failure(56_002)), Some(25));
        // On probation, a success clears it: three failures are needed again.
        o.success();
        assert_eq!(o.failure(81_002), Verdict::Unchanged);
        assert_eq!(o.failure(81_003), Verdict::Unchanged);
        assert_eq!(ejected_for(o.failure(81_004)), Some(25), "still in a row: within max_ejection_time");
    }

    #[test]
    fn a_long_good_spell_starts_ejections_over() {
        let o = Outlier::new(policy(1));
        assert_eq!(ejected_for(o.failure(1_000)), Some(10));
        assert_eq!(ejected_for(o.failure(11_000)), Some(20));
        o.success();
        // Readmitted at 31_000; more than max_ejection_time (25 s) later.
        assert_eq!(ejected_for(o.failure(56_001)), Some(10));
    }

    #[test]
    fn server_errors_eject_only_when_configured() {
        let off = Outlier::new(policy(2));
        for t in 0..10 {
            assert_eq!(off.server_error(1_000 + t), Verdict::Unchanged, "5xx do not count by default");
        }
        let o = Outlier::new(OutlierConfig { consecutive_5xx: 3, ..policy(5) });
        assert_eq!(o.server_error(1_000), Verdict::Unchanged);
        assert_eq!(o.server_error(1_001), Verdict::Unchanged);
        o.success();
        assert_eq!(o.server_error(1_002), Verdict::Unchanged, "a response below 500 reset the count");
        // A transport failure counts as a server error too, and a 5xx resets the transport count.
        assert_eq!(o.failure(1_003), Verdict::Unchanged);
        assert_eq!(ejected_for(o.server_error(1_004)), Some(10));
        assert!(o.is_ejected(1_005));
        assert_eq!(o.server_error(2_000), Verdict::Unchanged, "not counted while ejected");
        // Readmitted at 11_004 on probation: one server error ejects again, for longer.
        assert_eq!(ejected_for(o.server_error(11_004)), Some(20));
    }

    #[test]
    fn zero_consecutive_failures_turns_ejection_off() {
        let o = Outlier::new(policy(0));
        for t in 0..100 {
            assert_eq!(o.failure(t + 1), Verdict::Unchanged);
        }
        assert!(!o.is_ejected(200));
    }

    #[test]
    fn the_clock_never_reads_zero() {
        let clock = Clock::new();
        assert!(clock.now() >= 1);
        assert_eq!(clock.at(clock.instant(0)), 1);
        assert_eq!(clock.at(clock.instant(1_500)), 1_500);
        assert!(clock.instant(u64::MAX) > clock.instant(1_500), "no overflow");
        assert!(later(Instant::now(), Duration::MAX) > Instant::now());
    }
}
