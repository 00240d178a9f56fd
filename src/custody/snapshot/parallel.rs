//! An order-preserving parallel map for judging associations.
//!
//! A cold start is dominated by parsing private keys: aws-lc validates every RSA key it loads (`RSA_check_key`,
//! about 0.4 ms for RSA-2048), and the associations are independent of one another once their ids and duplicates
//! have been settled. Work is handed out in small chunks so that a run of RSA keys does not land on one thread.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Items per unit of work: small enough to balance, large enough that the counter is not contended.
const CHUNK: usize = 16;
/// More threads than this buy nothing for a few thousand files and cost memory.
const MAX_THREADS: usize = 8;

/// `items.iter().map(f).collect()`, on up to [`MAX_THREADS`] threads (the caller's among them), in order.
///
/// The calling thread works too, so a thread that cannot be spawned only costs speed. A panic in `f` is
/// propagated to the caller, as the sequential map would.
pub(super) fn map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let chunks: Vec<&[T]> = items.chunks(CHUNK).collect();
    let threads = std::thread::available_parallelism().map_or(1, NonZeroUsize::get).min(MAX_THREADS).min(chunks.len());
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    // Takes chunks until none is left, returning each one's results with its index.
    let work = || {
        let mut done = Vec::new();
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            let Some(chunk) = chunks.get(index) else { return done };
            done.push((index, chunk.iter().map(&f).collect::<Vec<R>>()));
        }
    };
    let mut done = std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..threads)
            .filter_map(|_| std::thread::Builder::new().name("sealgate-verify".into()).spawn_scoped(scope, work).ok())
            .collect();
        let mut done = work();
        for helper in helpers {
            done.extend(helper.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)));
        }
        done
    });
    done.sort_unstable_by_key(|(index, _)| *index);
    let mut results = Vec::with_capacity(items.len());
    for (_, chunk) in done {
        results.extend(chunk);
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_keep_the_order_of_the_items() {
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 1000] {
            let items: Vec<usize> = (0..len).collect();
            // Uneven work, so that threads finish out of order.
            let squares = map(&items, |&i| {
                if i % 7 == 0 {
                    std::thread::sleep(std::time::Duration::from_micros(50));
                }
                i * i
            });
            assert_eq!(squares, items.iter().map(|i| i * i).collect::<Vec<_>>());
        }
    }

    #[test]
    #[should_panic(expected = "item 500")]
    fn a_panic_reaches_the_caller() {
        let items: Vec<usize> = (0..1000).collect();
        map(&items, |&i| assert!(i != 500, "item 500"));
    }
}
