//! A server TLS stream over rustls' unbuffered API, with its buffers owned here and released while the client is
//! quiet.
//!
//! tokio-rustls drives rustls' buffered `ServerConnection`, which keeps a 4 KiB receive buffer for the life of
//! the connection, idle or not: two fifths of what an idle TLS connection cost sealgate (see `bench/README.md`).
//! Here the bytes received and not yet processed, the bytes decrypted and not yet read and the bytes encrypted
//! and not yet sent live in buffers of the stream, each released whenever it is empty and the stream waits for
//! its client: an idle connection holds none. Writes encrypt straight into the send buffer, with no record queue
//! in between.
//!
//! The handshake starts as tokio-rustls' `LazyConfigAcceptor` does: [`accept`] reads the ClientHello (through
//! rustls' [`Acceptor`], keeping the bytes) so that the caller can choose the `ServerConfig` by what the client
//! asks for, then [`StartHandshake::into_stream`] replays those bytes into an [`UnbufferedServerConnection`] made
//! with that config and completes the handshake.
//!
//! Reads, writes and close behave as tokio-rustls' do: a TCP close without a TLS `close_notify` reads as an
//! [`io::ErrorKind::UnexpectedEof`] error, a `close_notify` as the end of the stream; errors of the TLS protocol
//! are [`io::ErrorKind::InvalidData`] errors carrying the [`rustls::Error`], after the alert rustls chose has been
//! sent if the socket takes it.

use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use rustls::server::{Accepted, Acceptor, ClientHello, ServerConfig, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::head_lines::{HeadLines, HeadScan};

/// Room asked of the receive buffer before each read of the socket: one whole TLS record (a header, 2^14 bytes
/// and the most a cipher may add), so that a large upload takes one read per record.
const READ_SIZE: usize = 5 + (1 << 14) + 256;

/// A read is made into the buffer's free room as it is when that room is at least this.
const MIN_READ_ROOM: usize = 1024;

/// Plaintext encrypted by one write at most: bounds the send buffer.
const MAX_WRITE: usize = 64 * 1024;

/// Encrypted bytes waiting for the socket beyond which a write first waits for them to be sent.
const SEND_HIGH_WATER: usize = 64 * 1024;

/// Slices smaller than this are gathered into one record by a vectored write (a response head and a small body
/// make one record, not two).
const GATHER_BELOW: usize = 4096;

/// The most one record adds to its plaintext, counted generously: header, content type, explicit nonce, tag.
const RECORD_OVERHEAD: usize = 64;

/// Reads a ClientHello from `tcp`. A malformed one is answered with the alert rustls chooses, then refused.
pub async fn accept(tcp: TcpStream) -> io::Result<StartHandshake> {
    let mut acceptor = Acceptor::default();
    let mut received = Vec::new();
    let mut fed = 0;
    loop {
        if received.capacity() - received.len() < MIN_READ_ROOM {
            received.reserve(READ_SIZE);
        }
        tcp.readable().await?;
        match tcp.try_read_buf(&mut received) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof")),
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        }
        loop {
            let taken = acceptor.read_tls(&mut &received[fed..])?;
            fed += taken;
            match acceptor.accept() {
                Ok(Some(accepted)) => return Ok(StartHandshake { tcp, received, accepted }),
                Ok(None) if fed == received.len() => break,
                // rustls took nothing and waits for nothing: it never does, but a loop must not depend on it.
                Ok(None) if taken == 0 => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "ClientHello not accepted"));
                }
                Ok(None) => {}
                Err((error, mut alert)) => {
                    let mut bytes = Vec::new();
                    if alert.write_all(&mut bytes).is_ok() {
                        let mut tcp = tcp;
                        let _ = tcp.write_all(&bytes).await;
                    }
                    return Err(io::Error::new(io::ErrorKind::InvalidData, error));
                }
            }
        }
    }
}

/// A connection whose ClientHello has been read, waiting for the caller to choose its `ServerConfig`.
pub struct StartHandshake {
    tcp: TcpStream,
    /// Everything read from the socket so far, replayed into the connection.
    received: Vec<u8>,
    accepted: Accepted,
}

impl StartHandshake {
    /// The client's hello: server name, ALPN protocols, cipher suites.
    pub fn client_hello(&self) -> ClientHello<'_> {
        self.accepted.client_hello()
    }

    /// Completes the handshake with `config`.
    pub async fn into_stream(self, config: Arc<ServerConfig>) -> io::Result<TlsStream> {
        let Self { tcp, received, accepted } = self;
        drop(accepted);
        let conn = UnbufferedServerConnection::new(config).map_err(invalid_data)?;
        let mut stream = TlsStream {
            tcp,
            conn,
            incoming: received,
            plaintext: Vec::new(),
            plaintext_read: 0,
            outgoing: Vec::new(),
            outgoing_sent: 0,
            outgoing_end: 0,
            staging: Vec::new(),
            tcp_eof: false,
            peer_closed: false,
            close_sent: false,
            failed: None,
            send_timeout: None,
            send_stalled: None,
            head_scan: None,
        };
        poll_fn(|cx| stream.poll_handshake(cx)).await?;
        Ok(stream)
    }
}

/// A server TLS stream whose handshake is complete.
pub struct TlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Bytes received and not yet processed: at most a part of one record between calls.
    incoming: Vec<u8>,
    /// Bytes decrypted and not yet read, from `plaintext_read` on.
    plaintext: Vec<u8>,
    plaintext_read: usize,
    /// Encrypted bytes, `outgoing_sent..outgoing_end` not yet sent; the whole vector is initialised, so that
    /// rustls can encrypt into it.
    outgoing: Vec<u8>,
    outgoing_sent: usize,
    outgoing_end: usize,
    /// Small slices of a vectored write, gathered to be encrypted as one record.
    staging: Vec<u8>,
    /// The socket has been read to its end.
    tcp_eof: bool,
    /// The client sent its `close_notify`: nothing more is to be read.
    peer_closed: bool,
    /// Ours has been encrypted: nothing more is to be written.
    close_sent: bool,
    /// The TLS error that ended the connection: every later call fails with it.
    failed: Option<rustls::Error>,
    /// How long the socket may take nothing of what is to be sent (`None`: for ever).
    send_timeout: Option<Duration>,
    /// Runs from the first write the socket refused until one it takes.
    send_stalled: Option<Pin<Box<Sleep>>>,
    /// HTTP/1: the request heads read are looked at for bare LF line endings (see [`crate::head_lines`]).
    /// Boxed: an idle HTTP/2 connection carries only the pointer.
    head_scan: Option<Box<HeadScan>>,
}

/// The error of a write the client took nothing of for the stream's send timeout (an
/// [`io::ErrorKind::TimedOut`] error carries it).
#[derive(Debug)]
pub struct SendTimedOut(Duration);

impl std::fmt::Display for SendTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the client took nothing sent to it for {:?}", self.0)
    }
}

impl std::error::Error for SendTimedOut {}

/// The state of the stream, never its contents or keys.
impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("tcp", &self.tcp)
            .field("version", &self.conn.protocol_version())
            .field("received", &self.incoming.len())
            .field("unread", &(self.plaintext.len() - self.plaintext_read))
            .field("unsent", &(self.outgoing_end - self.outgoing_sent))
            .field("peer_closed", &self.peer_closed)
            .field("close_sent", &self.close_sent)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for StartHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartHandshake")
            .field("tcp", &self.tcp)
            .field("received", &self.received.len())
            .finish_non_exhaustive()
    }
}

/// What rustls is to do with application data in [`TlsStream::process`].
enum AppData<'a> {
    Nothing,
    Write(&'a [u8]),
    CloseNotify,
}

/// Where [`TlsStream::process`] stopped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// rustls needs more bytes from the client (the handshake is not done).
    NeedsInput,
    /// Application data may be written; this many bytes of it were encrypted.
    Writable(usize),
    /// Both sides have sent their `close_notify`.
    Closed,
}

impl TlsStream {
    /// The TLS session: version, cipher suite, ALPN protocol, server name.
    pub fn session(&self) -> &UnbufferedServerConnection {
        &self.conn
    }

    /// Sets how long the client may take nothing of what is to be sent before writes fail with
    /// [`SendTimedOut`].
    pub fn set_send_timeout(&mut self, timeout: Duration) {
        self.send_timeout = Some(timeout);
    }

    /// HTTP/1: looks at the request heads read for bare LF line endings, reporting to `lines`.
    pub fn scan_heads(&mut self, lines: Arc<HeadLines>) {
        self.head_scan = Some(Box::new(HeadScan::new(lines)));
    }

    /// The socket, to wait for it to be readable without reading.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Bytes held in the stream's buffers (their capacity), for tests of their release.
    pub fn buffered_capacity(&self) -> usize {
        self.incoming.capacity() + self.plaintext.capacity() + self.outgoing.capacity() + self.staging.capacity()
    }

    /// Runs rustls over the receive buffer (see [`Self::process_input`]), leaving it with what rustls has not
    /// taken: at most part of a record.
    fn process(&mut self, read: Option<&mut ReadBuf<'_>>, send: AppData<'_>) -> Result<Stop, rustls::Error> {
        let mut incoming = std::mem::take(&mut self.incoming);
        let (result, taken) = self.process_input(&mut incoming, read, send);
        incoming.drain(..taken);
        self.incoming = incoming;
        result
    }

    /// Runs rustls over `input`, bytes received: handshake messages are processed; records rustls has to send
    /// are encoded into the send buffer; application data goes into `read` as far as it has room, then into the
    /// plaintext buffer; once application data may be sent, `send` is done. Processing continues until rustls
    /// needs more input or may send application data: what it has not taken of `input` (the count it took is
    /// returned) is at most part of a record, to be given again with the bytes that follow.
    fn process_input(
        &mut self,
        input: &mut [u8],
        mut read: Option<&mut ReadBuf<'_>>,
        send: AppData<'_>,
    ) -> (Result<Stop, rustls::Error>, usize) {
        if let Some(error) = &self.failed {
            return (Err(error.clone()), 0);
        }
        let mut taken = 0;
        let result = self.process_records(input, &mut taken, &mut read, send);
        if let Err(error) = &result {
            self.failed = Some(error.clone());
            self.encode_alerts(&mut input[taken..]);
        }
        (result, taken)
    }

    fn process_records(
        &mut self,
        input: &mut [u8],
        taken: &mut usize,
        read: &mut Option<&mut ReadBuf<'_>>,
        send: AppData<'_>,
    ) -> Result<Stop, rustls::Error> {
        loop {
            let Self { conn, plaintext, outgoing, outgoing_end, close_sent, peer_closed, .. } = self;
            let UnbufferedStatus { mut discard, state } = conn.process_tls_records(&mut input[*taken..]);
            let stop = match state {
                Err(error) => {
                    *taken += discard;
                    return Err(error);
                }
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record?;
                        discard += record.discard;
                        let mut payload = record.payload;
                        if let Some(read) = read.as_deref_mut() {
                            let now = payload.len().min(read.remaining());
                            read.put_slice(&payload[..now]);
                            payload = &payload[now..];
                        }
                        plaintext.extend_from_slice(payload);
                    }
                    None
                }
                Ok(ConnectionState::ReadEarlyData(_)) => {
                    // Every config sealgate makes refuses 0-RTT; a connection that has some is not one of ours.
                    return Err(rustls::Error::General("early data, which was not offered".into()));
                }
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    encode_record(&mut encode, outgoing, outgoing_end);
                    None
                }
                // The records are in the send buffer, which is flushed before any wait for the client.
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    None
                }
                Ok(ConnectionState::BlockedHandshake) => Some(Stop::NeedsInput),
                Ok(ConnectionState::PeerClosed) => {
                    *peer_closed = true;
                    None
                }
                Ok(ConnectionState::Closed) => {
                    *peer_closed = true;
                    Some(Stop::Closed)
                }
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    let written = match send {
                        AppData::Nothing => 0,
                        AppData::Write(data) => {
                            let room = data.len() + data.len().div_ceil(1 << 14) * RECORD_OVERHEAD;
                            encrypt_into(outgoing, outgoing_end, room, |out| traffic.encrypt(data, out))?;
                            data.len()
                        }
                        AppData::CloseNotify => {
                            encrypt_into(outgoing, outgoing_end, RECORD_OVERHEAD, |out| {
                                traffic.queue_close_notify(out)
                            })?;
                            *close_sent = true;
                            0
                        }
                    };
                    Some(Stop::Writable(written))
                }
                Ok(_) => return Err(rustls::Error::General("unexpected state of the TLS connection".into())),
            };
            *taken += discard;
            if let Some(stop) = stop {
                return Ok(stop);
            }
        }
    }

    /// After an error, encodes the alerts rustls queued for the client into the send buffer.
    fn encode_alerts(&mut self, input: &mut [u8]) {
        let mut taken = 0;
        // Each round encodes one queued record or ends; a connection queues one alert, perhaps two.
        for _ in 0..8 {
            let Self { conn, outgoing, outgoing_end, .. } = self;
            let UnbufferedStatus { discard, state } = conn.process_tls_records(&mut input[taken..]);
            let more = match state {
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    encode_record(&mut encode, outgoing, outgoing_end);
                    true
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    true
                }
                _ => false,
            };
            taken += discard;
            if !more {
                return;
            }
        }
    }

    /// Sends the send buffer; fails once the socket has taken none of it for the send timeout.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.outgoing_sent < self.outgoing_end {
            let unsent = &self.outgoing[self.outgoing_sent..self.outgoing_end];
            match Pin::new(&mut self.tcp).poll_write(cx, unsent) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(sent)) => {
                    self.outgoing_sent += sent;
                    self.send_stalled = None;
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return self.poll_send_stall(cx),
            }
        }
        self.outgoing_sent = 0;
        self.outgoing_end = 0;
        Poll::Ready(Ok(()))
    }

    /// The socket takes nothing: pending, unless that has lasted the send timeout.
    fn poll_send_stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(timeout) = self.send_timeout else {
            return Poll::Pending;
        };
        let stall = self.send_stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        ready!(stall.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, SendTimedOut(timeout))))
    }

    /// Reads what the socket has and runs rustls over it, application data going into `read` first.
    fn poll_receive(&mut self, cx: &mut Context<'_>, read: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let result = if self.incoming.is_empty() {
            // The common case (a request, the next records of a body): read onto the stack and process the
            // records there, so that the stream holds a receive buffer only for a record split across reads.
            let mut storage = [MaybeUninit::<u8>::uninit(); READ_SIZE];
            let mut received = ReadBuf::uninit(&mut storage);
            ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut received))?;
            if received.filled().is_empty() {
                self.tcp_eof = true;
                return Poll::Ready(Ok(()));
            }
            let input = received.filled_mut();
            let (result, taken) = self.process_input(input, Some(read), AppData::Nothing);
            self.incoming.extend_from_slice(&input[taken..]);
            result
        } else {
            ready!(self.poll_fill_incoming(cx))?;
            self.process(Some(read), AppData::Nothing)
        };
        if let Err(error) = result {
            let _ = self.poll_send(cx);
            return Poll::Ready(Err(invalid_data(error)));
        }
        Poll::Ready(Ok(()))
    }

    /// Reads what the socket has into the receive buffer.
    fn poll_fill_incoming(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.incoming.capacity() - self.incoming.len() < MIN_READ_ROOM {
            self.incoming.reserve_exact(READ_SIZE);
        }
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            match self.tcp.try_read_buf(&mut self.incoming) {
                Ok(0) => self.tcp_eof = true,
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Poll::Ready(Err(error)),
            }
            return Poll::Ready(Ok(()));
        }
    }

    /// Releases the buffers that hold nothing, as the stream waits for its client.
    fn release_empty_buffers(&mut self) {
        if self.incoming.is_empty() {
            self.incoming = Vec::new();
        }
        if self.outgoing_end == 0 {
            self.outgoing = Vec::new();
        }
        self.staging = Vec::new();
    }

    /// The error every call returns once the connection has failed, after the alert has been sent.
    fn poll_failure(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(error) = self.failed.clone() else {
            return Poll::Ready(Ok(()));
        };
        // The alert is sent if the socket takes it now; the error is what matters to the caller.
        let _ = self.poll_send(cx);
        Poll::Ready(Err(invalid_data(error)))
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let processed = self.process(None, AppData::Nothing);
            ready!(self.poll_send(cx))?;
            if let Err(error) = processed {
                return Poll::Ready(Err(invalid_data(error)));
            }
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            if self.tcp_eof || self.peer_closed {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof")));
            }
            ready!(self.poll_fill_incoming(cx))?;
        }
    }

    /// Copies decrypted bytes not yet read into `buf`; whether there were any.
    fn read_plaintext(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.plaintext_read == self.plaintext.len() {
            return false;
        }
        let now = (self.plaintext.len() - self.plaintext_read).min(buf.remaining());
        buf.put_slice(&self.plaintext[self.plaintext_read..self.plaintext_read + now]);
        self.plaintext_read += now;
        if self.plaintext_read == self.plaintext.len() {
            self.plaintext = Vec::new();
            self.plaintext_read = 0;
        }
        true
    }

    /// Encrypts `data` (as much of it as one write takes), sending what the socket takes now.
    fn poll_write_data(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_failure(cx))?;
        if self.close_sent {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "TLS close_notify already sent")));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.outgoing_end - self.outgoing_sent >= SEND_HIGH_WATER {
            ready!(self.poll_send(cx))?;
        }
        let data = &data[..data.len().min(MAX_WRITE)];
        let written = match self.process(None, AppData::Write(data)) {
            Ok(Stop::Writable(written)) => written,
            Ok(_) => return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "TLS connection closed"))),
            Err(error) => {
                let _ = self.poll_send(cx);
                return Poll::Ready(Err(invalid_data(error)));
            }
        };
        if self.plaintext_read < self.plaintext.len() {
            // Decrypted while encrypting (rustls processes what was received first): the reader, polled by
            // this same task, is to take it.
            cx.waker().wake_by_ref();
        }
        // What the socket does not take now is sent by the next write or flush.
        if let Poll::Ready(Err(error)) = self.poll_send(cx) {
            return Poll::Ready(Err(error));
        }
        Poll::Ready(Ok(written))
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = this.poll_read_plaintext(cx, buf);
        if let Some(scan) = &mut this.head_scan {
            scan.read(&buf.filled()[before..]);
        }
        polled
    }
}

impl TlsStream {
    /// Reads application data into `buf`.
    fn poll_read_plaintext(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self;
        loop {
            if this.read_plaintext(buf) {
                return Poll::Ready(Ok(()));
            }
            ready!(this.poll_failure(cx))?;
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if this.tcp_eof {
                let error = io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                );
                return Poll::Ready(Err(error));
            }
            // Records rustls answered with (a key update, say) go out before the wait, or once the socket
            // takes them: a pending send registers this task for the socket's writability too.
            if let Poll::Ready(Err(error)) = this.poll_send(cx) {
                return Poll::Ready(Err(error));
            }
            let filled = buf.filled().len();
            if this.poll_receive(cx, buf)?.is_pending() {
                this.release_empty_buffers();
                return Poll::Pending;
            }
            if buf.filled().len() > filled {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_data(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut slices = bufs.iter().filter(|slice| !slice.is_empty());
        let Some(first) = slices.next() else {
            return Poll::Ready(Ok(0));
        };
        if first.len() >= GATHER_BELOW {
            return this.poll_write_data(cx, first);
        }
        // Small slices are copied into one record; the first large one ends the record. The buffer is sized
        // once for what it gathers (it is freed while the stream waits, so growing it would reallocate).
        let mut gathered = first.len();
        let count = 1 + slices
            .take_while(|slice| {
                let fits = slice.len() < GATHER_BELOW && gathered + slice.len() <= MAX_WRITE;
                gathered += if fits { slice.len() } else { 0 };
                fits
            })
            .count();
        let mut staging = std::mem::take(&mut this.staging);
        staging.clear();
        staging.reserve_exact(gathered);
        for slice in bufs.iter().filter(|slice| !slice.is_empty()).take(count) {
            staging.extend_from_slice(slice);
        }
        let result = this.poll_write_data(cx, &staging);
        this.staging = staging;
        result
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent && this.failed.is_none() {
            // A connection that cannot send its close_notify any more (it failed, or the client closed both
            // ways) just closes the socket.
            let _ = this.process(None, AppData::CloseNotify);
            this.close_sent = true;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

/// Encodes the record rustls has to send at `outgoing[*end..]`, growing the buffer to fit it.
fn encode_record<Data>(encode: &mut EncodeTlsData<'_, Data>, outgoing: &mut Vec<u8>, end: &mut usize) {
    let mut room = 0;
    loop {
        reserve(outgoing, *end, room);
        match encode.encode(&mut outgoing[*end..]) {
            Ok(written) => return *end += written,
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => room = required_size,
            Err(EncodeError::AlreadyEncoded) => return,
        }
    }
}

/// Runs `encrypt` (application data or a close_notify) into `outgoing[*end..]`, with `room` bytes there at
/// first and as many as rustls asks for after.
fn encrypt_into(
    outgoing: &mut Vec<u8>,
    end: &mut usize,
    mut room: usize,
    mut encrypt: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> Result<(), rustls::Error> {
    loop {
        reserve(outgoing, *end, room);
        match encrypt(&mut outgoing[*end..]) {
            Ok(encrypted) => {
                *end += encrypted;
                return Ok(());
            }
            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => room = required_size,
            Err(EncryptError::EncryptExhausted) => return Err(rustls::Error::EncryptError),
        }
    }
}

/// Makes `buffer` (initialised whole) have at least `room` bytes, and some, after `end`.
fn reserve(buffer: &mut Vec<u8>, end: usize, room: usize) {
    let wanted = end + room.max(RECORD_OVERHEAD * 4);
    if buffer.len() < wanted {
        buffer.resize(wanted, 0);
    }
}

fn invalid_data(error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    const DEADLINE: Duration = Duration::from_secs(20);

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    /// A server config for `localhost` and a client config trusting it, limited to `versions`.
    fn configs(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
        let cert = CertificateDer::from(certified.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));
        let server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// A connected pair: the server's stream (handshake done with `server`) and a tokio-rustls client's.
    async fn pair(
        server: Arc<ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> (io::Result<TlsStream>, io::Result<tokio_rustls::client::TlsStream<TcpStream>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let serve = async move {
            let (tcp, _) = listener.accept().await?;
            let start = accept(tcp).await?;
            assert_eq!(start.client_hello().server_name(), Some("localhost"));
            start.into_stream(server).await
        };
        let connect = async move {
            let tcp = TcpStream::connect(address).await?;
            let name = ServerName::try_from("localhost").expect("name");
            tokio_rustls::TlsConnector::from(client).connect(name, tcp).await
        };
        tokio::time::timeout(DEADLINE, async { tokio::join!(serve, connect) }).await.expect("handshake in time")
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn carries_data_both_ways_in_reads_smaller_than_records() {
        for versions in [&[&rustls::version::TLS13][..], &[&rustls::version::TLS12][..]] {
            let (server, client) = configs(versions);
            let (server, client) = pair(server, client).await;
            let (mut server, mut client) = (server.expect("server"), client.expect("client"));
            let sent = data(1 << 20);
            let echo = async move {
                // Small reads: most of each record waits in the stream's plaintext buffer.
                let mut received = Vec::new();
                let mut buf = [0; 700];
                while received.len() < 1 << 20 {
                    let n = server.read(&mut buf).await.expect("server read");
                    assert_ne!(n, 0, "early end");
                    received.extend_from_slice(&buf[..n]);
                }
                server.write_all(&received).await.expect("server write");
                server.flush().await.expect("server flush");
                server
            };
            let talk = async move {
                for chunk in sent.chunks(10_000) {
                    client.write_all(chunk).await.expect("client write");
                }
                client.flush().await.expect("client flush");
                let mut back = vec![0; sent.len()];
                client.read_exact(&mut back).await.expect("client read");
                assert!(back == sent, "the echo differs");
                client
            };
            tokio::time::timeout(DEADLINE, async { tokio::join!(echo, talk) }).await.expect("echo in time");
        }
    }

    #[tokio::test]
    async fn gathers_small_slices_of_a_vectored_write_and_writes_large_ones() {
        let (server, client) = configs(&[&rustls::version::TLS13]);
        let (server, client) = pair(server, client).await;
        let (mut server, mut client) = (server.expect("server"), client.expect("client"));
        let large = data(100_000);
        let slices = [IoSlice::new(b"head "), IoSlice::new(b""), IoSlice::new(b"body"), IoSlice::new(&large)];
        let written = server.write_vectored(&slices).await.expect("vectored write");
        assert_eq!(written, 9, "the small slices, gathered, stop at the large one");
        let written = server.write_vectored(&slices[3..]).await.expect("vectored write");
        assert_eq!(written, MAX_WRITE, "a large slice is written up to the most one write takes");
        server.flush().await.expect("flush");
        let mut back = vec![0; 9 + MAX_WRITE];
        tokio::time::timeout(DEADLINE, client.read_exact(&mut back)).await.expect("in time").expect("read");
        assert_eq!(&back[..9], b"head body");
        assert!(back[9..] == large[..MAX_WRITE]);
    }

    #[tokio::test]
    async fn close_notify_ends_the_stream_and_a_bare_close_is_an_error() {
        let (server, client) = configs(&[&rustls::version::TLS13]);
        let (server, client) = pair(Arc::clone(&server), Arc::clone(&client)).await;
        let (mut server, mut client) = (server.expect("server"), client.expect("client"));
        // The server's close_notify reaches the client as a clean end.
        server.shutdown().await.expect("shutdown");
        let mut buf = [0; 16];
        let n = tokio::time::timeout(DEADLINE, client.read(&mut buf)).await.expect("in time").expect("clean end");
        assert_eq!(n, 0);
        assert!(server.write_all(b"more").await.is_err(), "written after close_notify");
        // The client's close_notify is the end of what the server reads.
        client.shutdown().await.expect("client shutdown");
        let n = tokio::time::timeout(DEADLINE, server.read(&mut buf)).await.expect("in time").expect("clean end");
        assert_eq!(n, 0);

        let (server_config, client_config) = configs(&[&rustls::version::TLS13]);
        let (server, client) = pair(server_config, client_config).await;
        let (mut server, client) = (server.expect("server"), client.expect("client"));
        let (mut tcp, _) = client.into_inner();
        // A FIN, not a drop: the unread session tickets would make the close a reset.
        tcp.shutdown().await.expect("TCP shutdown");
        let read = tokio::time::timeout(DEADLINE, server.read(&mut buf)).await.expect("in time");
        assert_eq!(read.expect_err("a close with no close_notify").kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn buffers_are_released_while_the_client_is_quiet() {
        let (server, client) = configs(&[&rustls::version::TLS13]);
        let (server, client) = pair(server, client).await;
        let (mut server, mut client) = (server.expect("server"), client.expect("client"));
        client.write_all(&data(50_000)).await.expect("client write");
        let mut received = vec![0; 50_000];
        tokio::time::timeout(DEADLINE, server.read_exact(&mut received)).await.expect("in time").expect("read");
        server.write_all(&data(50_000)).await.expect("server write");
        server.flush().await.expect("flush");
        assert!(server.buffered_capacity() > 0, "the buffers were in use");
        // The next read finds nothing: the stream waits, holding no buffer.
        let mut buf = [0; 100];
        let mut read_buf = ReadBuf::new(&mut buf);
        let waited = poll_fn(|cx| Poll::Ready(Pin::new(&mut server).poll_read(cx, &mut read_buf).is_pending())).await;
        assert!(waited);
        assert_eq!(server.buffered_capacity(), 0);
        // And it still works.
        let mut back = vec![0; 50_000];
        tokio::time::timeout(DEADLINE, client.read_exact(&mut back)).await.expect("in time").expect("read");
        client.write_all(b"again").await.expect("client write");
        let mut again = [0; 5];
        tokio::time::timeout(DEADLINE, server.read_exact(&mut again)).await.expect("in time").expect("read");
        assert_eq!(&again, b"again");
    }

    #[tokio::test]
    async fn a_key_update_from_the_client_is_answered_and_data_keeps_flowing() {
        let (server, client) = configs(&[&rustls::version::TLS13]);
        let (server, client) = pair(server, client).await;
        let (mut server, mut client) = (server.expect("server"), client.expect("client"));
        for round in 0..3u8 {
            // The client's KeyUpdate asks for ours: the server has to encode it while reading.
            client.get_mut().1.refresh_traffic_keys().expect("key update");
            client.write_all(&[round; 1000]).await.expect("client write");
            client.flush().await.expect("client flush");
            let mut received = [0; 1000];
            tokio::time::timeout(DEADLINE, server.read_exact(&mut received)).await.expect("in time").expect("read");
            assert_eq!(received, [round; 1000]);
            server.write_all(&[round + 10; 1000]).await.expect("server write");
            server.flush().await.expect("server flush");
            let mut back = [0; 1000];
            tokio::time::timeout(DEADLINE, client.read_exact(&mut back)).await.expect("in time").expect("read");
            assert_eq!(back, [round + 10; 1000]);
        }
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_holds_writes_back_with_a_bounded_buffer() {
        let (server, client) = configs(&[&rustls::version::TLS13]);
        let (server, client) = pair(server, client).await;
        let (mut server, _client) = (server.expect("server"), client.expect("client"));
        let large = vec![7; 64 << 20];
        // Far more than the socket buffers take: the write waits for the client.
        let waited = tokio::time::timeout(Duration::from_millis(500), server.write_all(&large)).await;
        assert!(waited.is_err(), "64 MiB written to a client that reads nothing");
        let held = server.buffered_capacity();
        assert!(held <= 2 * (SEND_HIGH_WATER + MAX_WRITE), "{held} bytes buffered");
    }

    #[tokio::test]
    async fn writes_fail_once_the_client_has_taken_nothing_for_the_send_timeout() {
        let (server, client) = configs(&[&rustls::version::TLS13]);
        let (server, client) = pair(server, client).await;
        let (mut server, _client) = (server.expect("server"), client.expect("client"));
        server.set_send_timeout(Duration::from_millis(300));
        let large = vec![7; 64 << 20];
        let start = tokio::time::Instant::now();
        let written = tokio::time::timeout(DEADLINE, server.write_all(&large)).await.expect("failed in time");
        let error = written.expect_err("64 MiB written to a client that reads nothing");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(error.get_ref().is_some_and(|inner| inner.is::<SendTimedOut>()), "{error:?}");
        assert!(start.elapsed() >= Duration::from_millis(300), "failed after {:?}", start.elapsed());
    }

    #[tokio::test]
    async fn a_handshake_the_config_cannot_complete_is_answered_with_an_alert() {
        let (_, client) = configs(&[&rustls::version::TLS13]);
        // A server config that has no certificate for any name.
        #[derive(Debug)]
        struct Nothing;
        impl rustls::server::ResolvesServerCert for Nothing {
            fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
                None
            }
        }
        let refusing = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Nothing));
        let (server, client) = pair(Arc::new(refusing), client).await;
        assert_eq!(server.expect_err("refused").kind(), io::ErrorKind::InvalidData);
        let error = client.expect_err("refused");
        let alert = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
        assert!(matches!(alert, Some(rustls::Error::AlertReceived(_))), "the client got {error:?}");
    }

    #[tokio::test]
    async fn a_malformed_client_hello_is_answered_with_an_alert() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let serve = async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            accept(tcp).await.expect_err("refused")
        };
        let talk = async move {
            let mut tcp = TcpStream::connect(address).await.expect("connect");
            // A handshake record whose message is not a ClientHello.
            tcp.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 0x02, 0x00, 0x00, 0x01, 0x00]).await.expect("write");
            let mut answer = Vec::new();
            let _ = tcp.read_to_end(&mut answer).await;
            answer
        };
        let (error, answer) =
            tokio::time::timeout(DEADLINE, async { tokio::join!(serve, talk) }).await.expect("in time");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert_eq!(answer.first(), Some(&0x15), "an alert record, got {answer:?}");
    }
}
