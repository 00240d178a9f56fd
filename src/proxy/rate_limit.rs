//! Per-client request rate limits (`rate_limit` on a route): nginx's `limit_req … burst=N nodelay`, keyed by
//! the client's address.
//!
//! Each client may send `burst` requests at once, then one every `interval` (`1 / rate`); a request over the
//! limit is answered `429 Too Many Requests` with `Retry-After`, and never reaches the upstream. The algorithm
//! is GCRA (the generic cell rate algorithm): one number per client, its *theoretical arrival time* (TAT), the
//! time at which its allowance would be whole again. A request at `now` is allowed when
//! `TAT - now <= (burst - 1) × interval`, and moves the TAT on by one `interval`. It is a token bucket of
//! `burst` tokens refilled at `rate`, exact at any rate, without a refill timer.
//!
//! The key is the client's address as sealgate sees it (the PROXY protocol's, behind a load balancer): an IPv4
//! address, or an IPv6 address's /64 prefix, since one host commonly holds a whole /64 and could otherwise
//! take a fresh limit for every request. Memory is bounded: at most `MAX_CLIENTS` clients are tracked per
//! route. A client whose TAT has passed is as good as unknown, so when a shard of the table is full its expired
//! clients are dropped, at most once a second (a sweep scans the shard; a flood of new addresses must not buy
//! one per request). When none has expired (more active clients than the bound, a flood from many addresses
//! that a per-client limit could not stop anyway), a new client is let through untracked rather than refused.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::client_key;
use crate::config::RateLimitConfig;

/// The most clients tracked per route.
pub const MAX_CLIENTS: usize = 100_000;

/// Shards of the client table: requests from different clients rarely wait for each other's lock.
const SHARDS: usize = 16;

/// One route's limiter.
#[derive(Debug)]
pub struct RateLimiter {
    /// Nanoseconds between requests at the steady rate.
    interval: u64,
    /// Nanoseconds a client's TAT may run ahead of now: `(burst - 1) × interval`.
    tolerance: u64,
    /// When nanosecond 0 of the TATs was.
    epoch: Instant,
    shards: Box<[Mutex<Shard>]>,
}

/// Part of the client table.
#[derive(Debug, Default)]
struct Shard {
    /// Client key to TAT (nanoseconds since the epoch).
    clients: HashMap<u64, u64>,
    /// When a full shard may be swept again.
    next_sweep: u64,
}

/// The least time between two sweeps of a full shard.
const SWEEP_PERIOD: u64 = 1_000_000_000;

/// A request refused by the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// How long until the client may send a request again.
    pub retry_after: Duration,
}

impl RateLimiter {
    /// A limiter for `config`.
    pub fn new(config: &RateLimitConfig) -> Self {
        let interval = u64::try_from(config.per.as_nanos() / u128::from(config.requests.max(1))).unwrap_or(u64::MAX);
        let interval = interval.max(1);
        Self {
            interval,
            tolerance: interval.saturating_mul(u64::from(config.burst.saturating_sub(1))),
            epoch: Instant::now(),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }

    /// Counts a request from `client` now: `Ok` when it is within the limit.
    pub fn check(&self, client: IpAddr) -> Result<(), Limited> {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.check_at(client_key(client), now)
    }

    fn check_at(&self, key: u64, now: u64) -> Result<(), Limited> {
        let shard = &self.shards[shard_of(key)];
        // Nothing below panics while the lock is held, so a poisoned lock still guards a consistent table.
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        let tat = match shard.clients.get(&key) {
            Some(&tat) => tat.max(now),
            None => {
                if shard.clients.len() >= MAX_CLIENTS / SHARDS {
                    if now < shard.next_sweep {
                        return Ok(());
                    }
                    shard.clients.retain(|_, tat| *tat > now);
                    shard.next_sweep = now.saturating_add(SWEEP_PERIOD);
                    if shard.clients.len() >= MAX_CLIENTS / SHARDS {
                        return Ok(());
                    }
                }
                now
            }
        };
        if tat - now > self.tolerance {
            let wait = tat - now - self.tolerance;
            return Err(Limited { retry_after: Duration::from_nanos(wait) });
        }
        shard.clients.insert(key, tat.saturating_add(self.interval));
        Ok(())
    }

    /// Clients tracked now (for tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).clients.len()).sum()
    }
}

fn shard_of(key: u64) -> usize {
    // Mix the bits: addresses of one network differ in their low bits, /64 prefixes in their middle ones.
    let mixed = key.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (mixed >> 60) as usize % SHARDS
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn limiter(requests: u32, per: Duration, burst: u32) -> RateLimiter {
        RateLimiter::new(&RateLimitConfig { requests, per, burst })
    }

    #[test]
    fn a_burst_then_the_steady_rate() {
        let l = limiter(10, Duration::from_secs(1), 5);
        let key = client_key("192.0.2.1".parse().unwrap());
        let t0 = 5 * SECOND;
        for i in 0..5 {
            assert_eq!(l.check_at(key, t0), Ok(()), "request {i} of the burst");
        }
        let refused = l.check_at(key, t0).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_millis(100), "one interval until the next is allowed");
        // Refusals do not use up the allowance.
        assert!(l.check_at(key, t0 + SECOND / 20).is_err());
        assert_eq!(l.check_at(key, t0 + SECOND / 10), Ok(()));
        assert!(l.check_at(key, t0 + SECOND / 10).is_err());
        // At the steady rate a client is never refused.
        for i in 2..50 {
            assert_eq!(l.check_at(key, t0 + i * SECOND / 10), Ok(()), "at the rate, request {i}");
        }
        // After a quiet second the whole burst is back.
        let later = t0 + 60 * SECOND;
        for _ in 0..5 {
            assert_eq!(l.check_at(key, later), Ok(()));
        }
        assert!(l.check_at(key, later).is_err());
    }

    #[test]
    fn clients_are_limited_separately_and_ipv6_by_its_64_prefix() {
        let l = limiter(1, Duration::from_secs(60), 1);
        let now = SECOND;
        for client in ["192.0.2.1", "192.0.2.2", "2001:db8:0:1::1", "2001:db8:0:2::1"] {
            assert_eq!(l.check(client.parse().unwrap()), Ok(()), "{client}'s first request");
        }
        assert!(l.check("192.0.2.1".parse().unwrap()).is_err());
        assert!(l.check("2001:db8:0:1::ffff".parse().unwrap()).is_err(), "same /64");
        assert!(l.check("::ffff:192.0.2.2".parse().unwrap()).is_err(), "an IPv4-mapped address is the IPv4 client");
        let refused = l.check_at(client_key("192.0.2.1".parse().unwrap()), now).unwrap_err();
        assert!(refused.retry_after > Duration::from_secs(58), "{refused:?}");
    }

    #[test]
    fn the_table_is_bounded_and_expired_clients_make_room() {
        let l = limiter(1, Duration::from_secs(1), 1);
        let clients = (MAX_CLIENTS * 2) as u64;
        for key in 0..clients {
            assert_eq!(l.check_at(key, SECOND), Ok(()));
        }
        assert!(l.tracked() <= MAX_CLIENTS, "{} tracked", l.tracked());
        // Later, the expired clients go and new ones are tracked (and limited) again.
        let later = 10 * SECOND;
        assert_eq!(l.check_at(clients + 1, later), Ok(()));
        assert!(l.check_at(clients + 1, later).is_err(), "tracked once there is room");
    }

    #[test]
    fn rates_per_minute_and_extreme_settings_do_not_overflow() {
        let l = limiter(30, Duration::from_secs(60), 1);
        assert_eq!(l.interval, 2 * SECOND);
        let l = limiter(u32::MAX, Duration::from_secs(1), u32::MAX);
        assert_eq!(l.check_at(1, u64::MAX - 1), Ok(()));
        assert_eq!(l.check_at(1, u64::MAX), Ok(()));
    }
}
