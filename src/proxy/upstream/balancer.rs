//! Which upstream of a route gets a request.
//!
//! - `round_robin`: each eligible upstream in turn. The turn is taken over the upstreams eligible *now*, so an
//!   ejected upstream's share is spread over all the others rather than falling on its neighbour in the list.
//! - `least_requests`: the eligible upstream with the fewest requests in flight (sent and not yet answered in
//!   full); ties go round robin, by starting the scan at a rotating position. This is an exact scan of a few
//!   atomics, not power-of-two-choices: a route has a handful of upstreams, where a scan is as cheap as drawing
//!   two random numbers and always finds the least loaded one; and the counts are this process's own, exact and
//!   current, so the herding that P2C protects against (many balancers acting on stale load reports) does not
//!   arise.
//!
//! - `ip_hash`: the same client to the same upstream (nginx's `ip_hash`, HAProxy's `balance source`), for
//!   applications that keep a session in the instance that began it. Rendezvous hashing: each eligible upstream
//!   scores `hash(client, upstream)` and the highest wins, so when an upstream leaves (ejected, unhealthy,
//!   already tried by this request) only its own clients move, each to its next-highest score, and they come
//!   back when it returns. The client is its address (IPv6 by its /64, as for rate limits).
//!
//! Eligibility is the caller's: [`super::UpstreamGroup`] asks first for an available upstream not tried yet for
//! this request, and widens the set when there is none (see there). The balancer never allocates and never
//! locks.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::Balance;

/// A route's balancing policy and its rotating position.
#[derive(Debug)]
pub struct Balancer {
    policy: Balance,
    next: AtomicUsize,
}

impl Balancer {
    /// A balancer with `policy`, starting at the first upstream.
    pub fn new(policy: Balance) -> Self {
        Self { policy, next: AtomicUsize::new(0) }
    }

    /// Picks one of `0..n` for which `eligible` holds, or `None` when none does. `load` is an upstream's number
    /// of requests in flight (used by `least_requests` only); `client` the client's key (`ip_hash` only).
    pub fn pick(
        &self,
        n: usize,
        eligible: impl Fn(usize) -> bool,
        load: impl Fn(usize) -> usize,
        client: u64,
    ) -> Option<usize> {
        if n == 0 {
            return None;
        }
        if self.policy == Balance::IpHash {
            return (0..n).filter(|&i| eligible(i)).max_by_key(|&i| score(client, i));
        }
        let ticket = self.next.fetch_add(1, Ordering::Relaxed);
        match self.policy {
            Balance::RoundRobin => {
                let count = (0..n).filter(|&i| eligible(i)).count();
                if count == 0 {
                    return None;
                }
                (0..n).filter(|&i| eligible(i)).nth(ticket % count)
            }
            Balance::LeastRequests => {
                let start = ticket % n;
                let mut best: Option<(usize, usize)> = None;
                for i in (start..n).chain(0..start) {
                    if !eligible(i) {
                        continue;
                    }
                    let load = load(i);
                    if best.is_none_or(|(_, least)| load < least) {
                        best = Some((i, load));
                    }
                }
                best.map(|(i, _)| i)
            }
            Balance::IpHash => None,
        }
    }
}

/// Upstream `index`'s rendezvous score for `client`: SplitMix64's finaliser over both, so that neighbouring
/// addresses and indices give unrelated scores.
fn score(client: u64, index: usize) -> u64 {
    let mut z = client ^ (index as u64).wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_cycles_over_the_eligible_upstreams() {
        let b = Balancer::new(Balance::RoundRobin);
        let picks: Vec<_> = (0..6).map(|_| b.pick(3, |_| true, |_| 0, 0).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        // Upstream 1 out: 0 and 2 share evenly.
        let picks: Vec<_> = (0..4).map(|_| b.pick(3, |i| i != 1, |_| 0, 0).unwrap()).collect();
        let zeros = picks.iter().filter(|&&i| i == 0).count();
        assert_eq!((zeros, picks.len() - zeros), (2, 2), "{picks:?}");
        assert_eq!(b.pick(3, |_| false, |_| 0, 0), None);
        assert_eq!(b.pick(0, |_| true, |_| 0, 0), None);
    }

    #[test]
    fn ip_hash_keeps_a_client_on_its_upstream_and_moves_only_the_clients_of_one_that_leaves() {
        let b = Balancer::new(Balance::IpHash);
        let pick = |client: u64, out: Option<usize>| b.pick(4, |i| Some(i) != out, |_| 0, client).unwrap();
        let before: Vec<usize> = (0..4000u64).map(|c| pick(c, None)).collect();
        for (client, &upstream) in before.iter().enumerate().take(100) {
            assert_eq!(pick(client as u64, None), upstream, "the same client, the same upstream");
        }
        let mut shares = [0usize; 4];
        before.iter().for_each(|&u| shares[u] += 1);
        assert!(shares.iter().all(|&s| (800..1200).contains(&s)), "spread over all four: {shares:?}");
        // Upstream 2 leaves: its clients spread over the others; nobody else moves.
        for (client, &upstream) in before.iter().enumerate() {
            let now = pick(client as u64, Some(2));
            if upstream == 2 {
                assert_ne!(now, 2);
            } else {
                assert_eq!(now, upstream, "client {client} moved though its upstream stayed");
            }
        }
        assert_eq!(b.pick(4, |_| false, |_| 0, 7), None);
    }

    #[test]
    fn least_requests_takes_the_least_loaded_and_rotates_ties() {
        let b = Balancer::new(Balance::LeastRequests);
        let loads = [3, 0, 5];
        for _ in 0..5 {
            assert_eq!(b.pick(3, |_| true, |i| loads[i], 0), Some(1));
        }
        assert_eq!(b.pick(3, |i| i != 1, |i| loads[i], 0), Some(0), "the least loaded of the eligible ones");
        let picks: Vec<_> = (0..4).map(|_| b.pick(2, |_| true, |_| 7, 0).unwrap()).collect();
        assert!(picks.contains(&0) && picks.contains(&1), "ties rotate: {picks:?}");
        assert_eq!(b.pick(3, |_| false, |i| loads[i], 0), None);
    }
}
