//! Running an HTTP/2 connection's streams inside the connection's own task.
//!
//! hyper hands every HTTP/2 stream (the service call and the response body) to an executor. With Tokio's, each
//! stream is a task of its own, and the connection task writes whatever responses are ready whenever it runs.
//! Tokio runs a task woken by the running task next (its LIFO slot): the first stream to answer wakes the
//! connection task, which then writes that one response before the other streams have run. Under `h2load -m16`
//! that was one `writev` (and one TLS record) per 2.5 responses, and a task per request.
//!
//! [`StreamExecutor`] instead collects the streams hyper starts while [`LocalStreams`] polls the connection, and
//! [`LocalStreams`] polls them itself, then the connection again: the responses of every stream that could
//! answer go out in one write. A connection's streams then share its task, as they share its socket (nginx and
//! HAProxy serve a connection's streams on one thread too); a stream waiting on an upstream costs nothing
//! while it waits.
//!
//! Outside [`LocalStreams`] (never, in sealgate) the executor falls back to spawning on Tokio.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::stream::{FuturesUnordered, StreamExt};

/// A stream's future, as hyper hands it over.
type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

thread_local! {
    /// The streams started during the current [`LocalStreams`] poll of the connection, on this thread; `None`
    /// outside one.
    static STARTED: RefCell<Option<Vec<StreamFuture>>> = const { RefCell::new(None) };
}

/// hyper's executor for HTTP/2 streams: see the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamExecutor;

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        let future: StreamFuture = Box::pin(future);
        let unclaimed = STARTED.with(|started| match started.borrow_mut().as_mut() {
            Some(started) => {
                started.push(future);
                None
            }
            None => Some(future),
        });
        if let Some(future) = unclaimed {
            tokio::spawn(future);
        }
    }
}

/// Most rounds (connection, then streams) in one poll before yielding to other tasks.
const MAX_ROUNDS: usize = 4;

/// An HTTP/2 connection (any future that starts streams through [`StreamExecutor`] when polled) with its streams.
/// Resolves with the connection; streams still running then are dropped (the connection is gone).
#[derive(Debug)]
pub struct LocalStreams<C> {
    connection: C,
    streams: FuturesUnordered<StreamFuture>,
}

impl<C> LocalStreams<C> {
    /// `connection`, with no stream yet.
    pub fn new(connection: C) -> Self {
        Self { connection, streams: FuturesUnordered::new() }
    }

    /// The connection.
    pub fn connection(self: Pin<&mut Self>) -> Pin<&mut C>
    where
        C: Unpin,
    {
        Pin::new(&mut self.get_mut().connection)
    }
}

impl<C: Future + Unpin> Future for LocalStreams<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.get_mut();
        for _ in 0..MAX_ROUNDS {
            let (polled, started) = collect_started(|| Pin::new(&mut this.connection).poll(cx));
            if let Poll::Ready(output) = polled {
                return Poll::Ready(output);
            }
            let started_any = !started.is_empty();
            this.streams.extend(started);
            // Run every stream that can run; each answer is queued in the connection's send buffer.
            let mut finished_any = false;
            while let Poll::Ready(Some(())) = this.streams.poll_next_unpin(cx) {
                finished_any = true;
            }
            // Streams that started or finished have queued frames: poll the connection again to write them in
            // this round's write. Otherwise everything waits on I/O, and has registered for it.
            if !started_any && !finished_any {
                break;
            }
        }
        Poll::Pending
    }
}

/// Runs `poll` with stream collection on for this thread, and returns what it returned with the streams it
/// started.
fn collect_started<T>(poll: impl FnOnce() -> T) -> (T, Vec<StreamFuture>) {
    /// Puts back the collection that was on before (`None`, unless a `LocalStreams` is polled from within
    /// another's connection poll, which hyper does not do), however `poll` ends: a panic in it, which Tokio
    /// catches with the thread still running, must not leave collection on for whatever runs next here.
    struct Restore(Option<Vec<StreamFuture>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let outer = self.0.take();
            STARTED.with(|started| *started.borrow_mut() = outer);
        }
    }
    let _restore = Restore(STARTED.with(|started| started.borrow_mut().replace(Vec::new())));
    let output = poll();
    let started = STARTED.with(|started| started.borrow_mut().take()).unwrap_or_default();
    (output, started)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A "connection" that starts `n` streams on its first poll and finishes when they all have run.
    struct Starter {
        n: usize,
        ran: Arc<AtomicUsize>,
        started: bool,
    }

    impl Future for Starter {
        type Output = usize;
        fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<usize> {
            if !self.started {
                self.started = true;
                for _ in 0..self.n {
                    let ran = Arc::clone(&self.ran);
                    StreamExecutor.execute(async move {
                        ran.fetch_add(1, Ordering::SeqCst);
                    });
                }
            }
            match self.ran.load(Ordering::SeqCst) {
                ran if ran == self.n => Poll::Ready(ran),
                _ => Poll::Pending,
            }
        }
    }

    #[tokio::test]
    async fn streams_run_in_the_connection_poll_that_started_them() {
        let ran = Arc::new(AtomicUsize::new(0));
        let mut local = LocalStreams::new(Starter { n: 16, ran: Arc::clone(&ran), started: false });
        // One poll: the connection starts the streams, they run, the connection sees them done.
        let polled = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut local).poll(cx))).await;
        assert_eq!(polled, Poll::Ready(16));
    }

    #[tokio::test]
    async fn a_connection_poll_that_panics_leaves_collection_off() {
        let panicked = std::panic::catch_unwind(|| collect_started(|| panic!("a connection poll panics")));
        assert!(panicked.is_err());
        assert!(STARTED.with(|started| started.borrow().is_none()));
    }

    #[tokio::test]
    async fn outside_a_connection_poll_streams_are_spawned() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        StreamExecutor.execute(async move {
            let _ = tx.send(());
        });
        assert!(rx.await.is_ok());
    }
}
