//! `limits.max_connections`: how many client connections may be open at once, on every listener together,
//! resizable by a reload while connections are open.
//!
//! A Tokio semaphore with a permit per connection. Raising the limit adds permits; lowering it takes back the
//! permits that are free, and the rest as the connections holding them close: each of those permits is
//! forgotten instead of returned, until the semaphore is down to the new size. (`Semaphore::forget_permits`
//! alone takes only the free ones, so lowering the limit while it was in use left the old capacity in place
//! for good.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The connection limit, shared by every listener.
#[derive(Debug)]
pub struct ConnectionLimit {
    permits: Arc<Semaphore>,
    /// Permits still to be taken back from connections that close (the limit was lowered while they held them).
    owed: AtomicUsize,
}

impl ConnectionLimit {
    /// A limit of `max` connections (at most [`Semaphore::MAX_PERMITS`]; the configuration enforces it).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { permits: Arc::new(Semaphore::new(max)), owed: AtomicUsize::new(0) })
    }

    /// A place for one more connection, or `None` at the limit.
    pub fn try_acquire(self: &Arc<Self>) -> Option<ConnectionPermit> {
        let permit = Arc::clone(&self.permits).try_acquire_owned().ok()?;
        Some(ConnectionPermit { permit: Some(permit), limit: Arc::clone(self) })
    }

    /// Changes the limit from `old` to `new` (what the previous call, or [`ConnectionLimit::new`], set).
    /// Connections above a lowered limit go on; no new one is let in until enough of them have closed.
    pub fn resize(&self, old: usize, new: usize) {
        if new > old {
            // Cancel what is still owed first: those permits are still held, and will now be returned.
            let mut raise = new - old;
            let owed =
                self.owed.fetch_update(Ordering::AcqRel, Ordering::Acquire, |owed| Some(owed.saturating_sub(raise)));
            // `fetch_update` with a closure that always returns `Some` cannot fail; either arm is the old value.
            let owed = owed.unwrap_or_else(|owed| owed);
            raise -= owed.min(raise);
            self.permits.add_permits(raise);
        } else if new < old {
            let cut = old - new;
            let taken = self.permits.forget_permits(cut);
            self.owed.fetch_add(cut - taken, Ordering::AcqRel);
        }
    }

    /// Permits free now (for tests and metrics).
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// Takes one owed permit off the debt, if any is owed.
    fn take_owed(&self) -> bool {
        self.owed.fetch_update(Ordering::AcqRel, Ordering::Acquire, |owed| owed.checked_sub(1)).is_ok()
    }
}

/// A connection's place under the limit, given back (or, while the limit is being lowered, forgotten) when
/// the connection ends.
#[derive(Debug)]
pub struct ConnectionPermit {
    permit: Option<OwnedSemaphorePermit>,
    limit: Arc<ConnectionLimit>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            if self.limit.take_owed() {
                permit.forget();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowering_the_limit_while_it_is_in_use_takes_the_places_back_as_connections_close() {
        let limit = ConnectionLimit::new(3);
        let held: Vec<_> = (0..3).map(|_| limit.try_acquire().unwrap()).collect();
        assert!(limit.try_acquire().is_none());
        limit.resize(3, 1);
        drop(held);
        assert_eq!(limit.available(), 1, "two of the three places were taken back as they came free");
        let one = limit.try_acquire().unwrap();
        assert!(limit.try_acquire().is_none());
        drop(one);
        assert_eq!(limit.available(), 1);
    }

    #[test]
    fn raising_it_again_first_cancels_what_is_still_owed() {
        let limit = ConnectionLimit::new(4);
        let held: Vec<_> = (0..4).map(|_| limit.try_acquire().unwrap()).collect();
        limit.resize(4, 1); // 3 owed
        limit.resize(1, 3); // 1 owed
        assert_eq!(limit.available(), 0);
        drop(held);
        assert_eq!(limit.available(), 3);
        limit.resize(3, 5);
        assert_eq!(limit.available(), 5);
        limit.resize(5, 2);
        assert_eq!(limit.available(), 2, "free places are taken back at once");
    }
}
