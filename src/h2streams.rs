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
//!
//! The executor also watches each stream for a client that withholds its flow-control window: such a stream's
//! response cannot progress, but the connection stays busy (and its upstream request open) for as long as the
//! client answers PINGs. The service marks each request's [`StreamProgress`] ([`progress_of_next_stream`]) and
//! the executor resets a stream whose response has waited on the client, with no poll of its body, for the
//! executor's stall timeout (nginx applies its `send_timeout` to HTTP/2 flow control the same way). A stream
//! waiting on its upstream is not stalled.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::time::{Instant, Sleep};

/// A stream's future, as hyper hands it over.
type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

thread_local! {
    /// The streams started during the current [`LocalStreams`] poll of the connection, on this thread; `None`
    /// outside one.
    static STARTED: RefCell<Option<Vec<StreamFuture>>> = const { RefCell::new(None) };
    /// The progress of the request the service was last called for, to be watched with the stream hyper
    /// starts for it next (hyper calls the service, then starts the stream, in one connection poll).
    static NEXT_PROGRESS: RefCell<Option<Arc<StreamProgress>>> = const { RefCell::new(None) };
}

/// How a stream's response is doing: recorded by its body, watched by the executor.
#[derive(Debug, Default)]
pub struct StreamProgress {
    /// The response exists: hyper sends its head and pipes its body.
    begun: AtomicBool,
    /// The body's last poll gave a frame (or it has not been polled yet): what the response waits for is the
    /// client's flow-control window, not the body.
    awaiting_client: AtomicBool,
    /// Polls of the body so far.
    polls: AtomicU32,
}

impl StreamProgress {
    /// The response has been produced and handed to hyper.
    pub fn begin(&self) {
        self.awaiting_client.store(true, Ordering::Relaxed);
        self.begun.store(true, Ordering::Relaxed);
    }

    /// The body was polled; `gave_frame`: it had one (rather than waiting for its source).
    pub fn polled(&self, gave_frame: bool) {
        self.polls.fetch_add(1, Ordering::Relaxed);
        self.awaiting_client.store(gave_frame, Ordering::Relaxed);
    }

    fn waits_on_client(&self) -> bool {
        self.begun.load(Ordering::Relaxed) && self.awaiting_client.load(Ordering::Relaxed)
    }
}

/// For the service, called for a request: the progress to record for its response, when the request is an
/// HTTP/2 stream run by a [`LocalStreams`] (on this thread, in its connection's poll); `None` otherwise.
pub fn progress_of_next_stream() -> Option<Arc<StreamProgress>> {
    if STARTED.with(|started| started.borrow().is_none()) {
        return None;
    }
    let progress = Arc::new(StreamProgress::default());
    NEXT_PROGRESS.with(|next| *next.borrow_mut() = Some(Arc::clone(&progress)));
    Some(progress)
}

/// hyper's executor for HTTP/2 streams: see the module documentation.
#[derive(Clone, Default)]
pub struct StreamExecutor {
    /// How long a stream's response may wait on the client's flow-control window with no progress.
    stall_timeout: Option<Duration>,
    /// Called for each stream reset for that.
    on_stall: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for StreamExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamExecutor").field("stall_timeout", &self.stall_timeout).finish_non_exhaustive()
    }
}

impl StreamExecutor {
    /// An executor that resets streams stalled by their client for `timeout`, calling `on_stall` for each.
    pub fn with_stall_timeout(timeout: Duration, on_stall: Arc<dyn Fn() + Send + Sync>) -> Self {
        Self { stall_timeout: Some(timeout), on_stall: Some(on_stall) }
    }
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        let progress = NEXT_PROGRESS.with(|next| next.borrow_mut().take());
        let future: StreamFuture = match (progress, self.stall_timeout) {
            (Some(progress), Some(timeout)) => {
                Box::pin(Watched { stream: future, progress, timeout, stall: None, on_stall: self.on_stall.clone() })
            }
            _ => Box::pin(future),
        };
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

pin_project_lite::pin_project! {
    /// A stream, reset (dropped: h2 sends RST_STREAM) once its response has waited on the client with no poll
    /// of its body for `timeout`.
    struct Watched<F> {
        #[pin]
        stream: F,
        progress: Arc<StreamProgress>,
        timeout: Duration,
        // While the response waits on the client: the timer, and the body's poll count when it was set.
        stall: Option<(Pin<Box<Sleep>>, u32)>,
        on_stall: Option<Arc<dyn Fn() + Send + Sync>>,
    }
}

impl<F: Future<Output = ()>> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.stream.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        if !this.progress.waits_on_client() {
            *this.stall = None;
            return Poll::Pending;
        }
        let polls = this.progress.polls.load(Ordering::Relaxed);
        match this.stall {
            Some((sleep, seen)) if *seen == polls => {
                if sleep.as_mut().poll(cx).is_ready() {
                    tracing::debug!(timeout = ?this.timeout, "HTTP/2 stream reset: its client gave it no window");
                    if let Some(on_stall) = this.on_stall {
                        on_stall();
                    }
                    return Poll::Ready(());
                }
            }
            Some((sleep, seen)) => {
                sleep.as_mut().reset(Instant::now() + *this.timeout);
                let _ = sleep.as_mut().poll(cx);
                *seen = polls;
            }
            None => {
                let mut sleep = Box::pin(tokio::time::sleep(*this.timeout));
                let _ = sleep.as_mut().poll(cx);
                *this.stall = Some((sleep, polls));
            }
        }
        Poll::Pending
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
                    StreamExecutor::default().execute(async move {
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

    /// A stream that never ends by itself; `dropped` is set when it is dropped.
    struct Forever(Arc<AtomicUsize>);
    impl Future for Forever {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            Poll::Pending
        }
    }
    impl Drop for Forever {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn watched(progress: &Arc<StreamProgress>, stalls: &Arc<AtomicUsize>) -> (Watched<Forever>, Arc<AtomicUsize>) {
        let dropped = Arc::new(AtomicUsize::new(0));
        let stalls = Arc::clone(stalls);
        let stream = Watched {
            stream: Forever(Arc::clone(&dropped)),
            progress: Arc::clone(progress),
            timeout: std::time::Duration::from_millis(100),
            stall: None,
            on_stall: Some(Arc::new(move || {
                stalls.fetch_add(1, Ordering::SeqCst);
            })),
        };
        (stream, dropped)
    }

    #[tokio::test]
    async fn a_stream_its_client_gives_no_window_is_reset_after_the_timeout() {
        let progress = Arc::new(StreamProgress::default());
        let stalls = Arc::new(AtomicUsize::new(0));
        progress.begin();
        progress.polled(true);
        let (stream, _) = watched(&progress, &stalls);
        let start = tokio::time::Instant::now();
        tokio::time::timeout(std::time::Duration::from_secs(10), stream).await.expect("reset in time");
        assert!(start.elapsed() >= std::time::Duration::from_millis(100));
        assert_eq!(stalls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_stream_waiting_on_its_upstream_or_still_moving_is_not_reset() {
        let stalls = Arc::new(AtomicUsize::new(0));
        // Waiting on the upstream: the body's last poll found nothing.
        let waiting = Arc::new(StreamProgress::default());
        waiting.begin();
        waiting.polled(false);
        let (stream, _) = watched(&waiting, &stalls);
        assert!(tokio::time::timeout(std::time::Duration::from_millis(400), stream).await.is_err());
        // Not begun: the service is still answering (the upstream's first byte has its own timeout).
        let (stream, _) = watched(&Arc::new(StreamProgress::default()), &stalls);
        assert!(tokio::time::timeout(std::time::Duration::from_millis(400), stream).await.is_err());
        // Waiting on the client, but its body polled every 50 ms: the window keeps opening.
        let moving = Arc::new(StreamProgress::default());
        moving.begin();
        let (stream, _) = watched(&moving, &stalls);
        let mut stream = Box::pin(stream);
        for _ in 0..8 {
            moving.polled(true);
            let waited = tokio::time::timeout(std::time::Duration::from_millis(50), stream.as_mut()).await;
            assert!(waited.is_err(), "a stream that kept moving was reset");
        }
        assert_eq!(stalls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn outside_a_connection_poll_streams_are_spawned() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        StreamExecutor::default().execute(async move {
            let _ = tx.send(());
        });
        assert!(rx.await.is_ok());
    }
}
