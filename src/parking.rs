//! Idle HTTP/1 connections parked outside hyper, so that they hold no HTTP buffers while they wait.
//!
//! hyper keeps an HTTP/1 connection's read buffer (8 KiB once it has read) and its write buffer (8 KiB from the
//! start) for as long as the connection lives, idle or not: half of what an idle TLS connection cost sealgate.
//! Load tests and browsers keep thousands of connections open and idle. So a connection that has been idle a
//! little while is taken apart ([`hyper::server::conn::http1::Connection::into_parts`]), keeping only the TLS
//! stream and any bytes hyper had read ahead, and served by a new hyper connection once the client sends again.
//!
//! That is only sound at a message boundary, with nothing hyper still has to write. [`Tracked`] lets the
//! connection's driver see both from outside: hyper's last read found nothing to read, and everything it wrote
//! was flushed. The driver adds what only it knows: no request in flight, and no request body hyper may still be
//! reading (see `server::drive`).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper::rt::{Read, ReadBufCursor, Write};

/// What the driver can see of hyper's use of a [`Tracked`] stream. Relaxed atomics: written and read by the one
/// task that owns the connection.
#[derive(Debug, Default)]
pub struct IoState {
    /// hyper's last read of the stream found nothing to read (and had no read-ahead bytes left to take).
    read_pending: AtomicBool,
    /// hyper wrote since its last completed flush.
    unflushed: AtomicBool,
}

impl IoState {
    /// Whether hyper is waiting for the client with nothing left to write: the stream may be taken from it.
    pub fn is_waiting_for_client(&self) -> bool {
        self.read_pending.load(Ordering::Relaxed) && !self.unflushed.load(Ordering::Relaxed)
    }
}

/// A stream handed to hyper: it first yields the bytes a previous hyper connection had read ahead, and records
/// in an [`IoState`] whether hyper is waiting to read and whether it has flushed what it wrote.
#[derive(Debug)]
pub struct Tracked<I> {
    inner: I,
    read_ahead: Bytes,
    state: Arc<IoState>,
}

impl<I> Tracked<I> {
    /// `inner`, with `read_ahead` to be read first.
    pub fn new(inner: I, read_ahead: Bytes, state: Arc<IoState>) -> Self {
        state.read_pending.store(false, Ordering::Relaxed);
        Self { inner, read_ahead, state }
    }

    /// The stream itself.
    pub fn get_ref(&self) -> &I {
        &self.inner
    }

    /// Takes the stream back from a hyper connection taken apart, with the bytes it had read ahead and not
    /// used, to be read first (before any this stream still had).
    pub fn reuse(self, hyper_read_ahead: Bytes) -> Self {
        let read_ahead = match (hyper_read_ahead.is_empty(), self.read_ahead.is_empty()) {
            (true, _) => self.read_ahead,
            (false, true) => hyper_read_ahead,
            (false, false) => [hyper_read_ahead, self.read_ahead].concat().into(),
        };
        Self::new(self.inner, read_ahead, self.state)
    }

    /// Whether bytes are waiting to be read before the stream's own.
    pub fn has_read_ahead(&self) -> bool {
        !self.read_ahead.is_empty()
    }
}

impl<I: Read + Unpin> Read for Tracked<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, mut buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.read_ahead.is_empty() {
            let n = this.read_ahead.len().min(buf.remaining());
            buf.put_slice(&this.read_ahead[..n]);
            this.read_ahead.advance(n);
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.state.read_pending.store(polled.is_pending(), Ordering::Relaxed);
        polled
    }
}

impl<I: Write + Unpin> Write for Tracked<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.state.unflushed.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.state.unflushed.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        if matches!(polled, Poll::Ready(Ok(()))) {
            this.state.unflushed.store(false, Ordering::Relaxed);
        }
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn read_ahead_bytes_come_first_and_the_state_follows_reads_and_flushes() {
        let (client, server) = tokio::io::duplex(64);
        let state = Arc::new(IoState::default());
        let mut stream = TokioIo::new(Tracked::new(TokioIo::new(server), Bytes::from_static(b"ab"), state.clone()));
        let mut client = client;
        client.write_all(b"cd").await.unwrap();
        let mut got = [0u8; 4];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"abcd");
        assert!(!state.is_waiting_for_client());

        // Nothing more to read: hyper would now be waiting for the client.
        let mut byte = [0u8; 1];
        let waited = tokio::time::timeout(std::time::Duration::from_millis(20), stream.read(&mut byte)).await;
        assert!(waited.is_err());
        assert!(state.is_waiting_for_client());

        // Written but not flushed: not yet.
        stream.write_all(b"response").await.unwrap();
        assert!(!state.is_waiting_for_client());
        stream.flush().await.unwrap();
        assert!(state.is_waiting_for_client());
        let mut echoed = [0u8; 8];
        client.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"response");
    }
}
