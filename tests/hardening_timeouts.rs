//! Deadlines on clients: the TLS handshake, HTTP/1 request heads (slowloris), idle connections, whole requests
//! (slow bodies) and HTTP/2 keep-alive pings. Timeouts are configured short (300 ms); every test waits on a
//! condition with a generous deadline and checks that the close came no earlier than configured.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::h2raw::{self, Event, H2};
use common::raw::{self, RawUpstream};
use common::*;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

const HOST: &str = "app.example.test";
/// The configured timeout of every test here.
const SHORT: Duration = Duration::from_millis(300);
/// No close may come earlier than this (timer granularity).
const NOT_BEFORE: Duration = Duration::from_millis(250);
/// Generous, for a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(5);

fn assert_closed_in_time(took: Option<Duration>, what: &str) {
    let took = took.unwrap_or_else(|| panic!("{what}: not closed within {DEADLINE:?}"));
    assert!(took >= NOT_BEFORE, "{what}: closed after {took:?}, before the configured {SHORT:?}");
}

async fn server_with(f: &Fixture, routes: &str, extra: &str) -> sealgate::server::RunningServer {
    f.serve("c-app", &[HOST]);
    f.start(&format!("{routes}\n{extra}\n")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_the_tls_handshake_is_closed_at_the_deadline() {
    let f = Fixture::new();
    let server = server_with(&f, HELLO, "[tls]\nhandshake_timeout = \"300ms\"").await;
    let addr = server.tls_addrs[0];
    let silent = async {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        raw::tcp_closed_within(&mut tcp, DEADLINE).await
    };
    // A handshake record announcing a 512-byte ClientHello, of which only the first bytes come.
    let half_hello = async {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0x5a]).await.unwrap();
        raw::tcp_closed_within(&mut tcp, DEADLINE).await
    };
    let (silent, half_hello) = tokio::join!(silent, half_hello);
    assert_closed_in_time(silent, "a client that sends nothing");
    assert_closed_in_time(half_hello, "a client that sends half a ClientHello");
    let admin = server.admin_addr.unwrap();
    // Counted as the server drops the connection: the client may see the close first.
    let series = "sealgate_tls_handshake_failures_total{reason=\"Timeout\"}";
    assert!(eventually(DEADLINE, || async { raw::metric(admin, series).await == 2.0 }).await);
    // A real client is unaffected.
    let mut tls = tls_to(&f, &server, HOST, b"http/1.1").await;
    let reply = raw::exchange(&mut tls, format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes(), DEADLINE).await;
    assert_eq!(reply.status(), Some(200));
}

/// Writes `head` and then one more header byte every 50 ms (a slowloris), until the server closes; returns
/// how long after `head` the close came.
async fn trickle(tls: tokio_rustls::client::TlsStream<TcpStream>, head: &[u8]) -> Option<Duration> {
    let (mut reader, mut writer) = tokio::io::split(tls);
    writer.write_all(head).await.unwrap();
    let start = Instant::now();
    let drip = tokio::spawn(async move {
        while start.elapsed() < DEADLINE {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if writer.write_all(b"a").await.is_err() || writer.flush().await.is_err() {
                return;
            }
        }
    });
    let mut buf = [0u8; 1024];
    let closed = loop {
        match tokio::time::timeout_at(start + DEADLINE, reader.read(&mut buf)).await {
            Err(_) => break None,
            Ok(Ok(0)) | Ok(Err(_)) => break Some(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    };
    drip.abort();
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_heads_trickled_byte_by_byte_are_cut_at_header_read_on_every_request() {
    let f = Fixture::new();
    // A long idle timer, so that only the header-read deadline can close these connections.
    let server = server_with(&f, HELLO, "[timeouts]\nheader_read = \"300ms\"\nidle = \"60s\"").await;
    let slow_head = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: ");

    // The first request of a connection.
    let tls = tls_to(&f, &server, HOST, b"http/1.1").await;
    assert_closed_in_time(trickle(tls, slow_head.as_bytes()).await, "a slowloris first request");

    // A keep-alive request: hyper restarts the deadline for every head.
    let mut tls = tls_to(&f, &server, HOST, b"http/1.1").await;
    tls.write_all(format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes()).await.unwrap();
    assert_eq!(raw::read_response(&mut tls, DEADLINE).await.status(), Some(200));
    assert_closed_in_time(trickle(tls, slow_head.as_bytes()).await, "a slowloris keep-alive request");

    // The same deadline bounds the keep-alive pause between two requests.
    let mut tls = tls_to(&f, &server, HOST, b"http/1.1").await;
    tls.write_all(format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes()).await.unwrap();
    assert_eq!(raw::read_response(&mut tls, DEADLINE).await.status(), Some(200));
    assert_closed_in_time(raw::closed_within(&mut tls, DEADLINE).await, "an idle keep-alive connection");

    let admin = server.admin_addr.unwrap();
    let timeouts = raw::metric(admin, "sealgate_connection_timeouts_total{timeout=\"HeaderRead\"}").await;
    assert_eq!(timeouts, 3.0);
}

/// An upstream that reads each request's head, then hands the connection to `answer`.
async fn upstream_answering<F, Fut>(answer: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Copy + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while raw::find(&head, b"\r\n\r\n").is_none() {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                answer(tcp).await;
            });
        }
    });
    addr
}

/// An upstream that answers every request slowly: the head after `step`, then half the body, then the rest
/// after another `step`.
async fn slow_upstream(step: Duration) -> SocketAddr {
    upstream_answering(move |mut tcp| async move {
        tokio::time::sleep(step).await;
        let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nsl").await;
        tokio::time::sleep(step).await;
        let _ = tcp.write_all(b"ow").await;
    })
    .await
}

/// An upstream that answers every request with a head promising 10 bytes, sends 4 of them and then nothing, its
/// connection left open.
async fn stalling_upstream() -> SocketAddr {
    upstream_answering(|mut tcp| async move {
        let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf").await;
        // Held open until sealgate closes it.
        let mut buf = [0u8; 512];
        while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await
}

async fn h2_client(
    tls: tokio_rustls::client::TlsStream<TcpStream>,
) -> (hyper::client::conn::http2::SendRequest<Full<Bytes>>, tokio::task::JoinHandle<()>) {
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
    (sender, tokio::spawn(async move { drop(connection.await) }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_busy_ones_are_not() {
    let f = Fixture::new();
    let slow = slow_upstream(Duration::from_millis(800)).await;
    let routes = format!("[[route]]\npath = \"/slow\"\nupstream = \"http://{slow}\"\n{HELLO}");
    // hyper's header-read deadline is long here, so that only the idle timer can close an HTTP/1 connection.
    let server = server_with(&f, &routes, "[timeouts]\nidle = \"300ms\"\nheader_read = \"60s\"").await;

    // HTTP/2: after a request, no stream is open.
    let (mut h2, connection) = h2_client(tls_to(&f, &server, HOST, b"h2").await).await;
    let (status, _) = text(h2.send_request(get_h2(HOST, "/")).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let start = Instant::now();
    assert!(tokio::time::timeout(DEADLINE, connection).await.is_ok(), "an idle HTTP/2 connection stays open");
    assert_closed_in_time(Some(start.elapsed()), "an idle HTTP/2 connection");

    // HTTP/1: after a response, no request is in flight.
    let mut tls = tls_to(&f, &server, HOST, b"http/1.1").await;
    tls.write_all(format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes()).await.unwrap();
    assert_eq!(raw::read_response(&mut tls, DEADLINE).await.status(), Some(200));
    assert_closed_in_time(raw::closed_within(&mut tls, DEADLINE).await, "an idle HTTP/1 connection");

    // A connection that has never sent a request is idle too.
    let mut tls = tls_to(&f, &server, HOST, b"http/1.1").await;
    assert_closed_in_time(raw::closed_within(&mut tls, DEADLINE).await, "a connection that never sends");

    // Busy: waiting 800 ms for the upstream's head, then 800 ms for the rest of its body, with a 300 ms idle
    // timer. Both protocols, both connections stay open throughout: a request is in flight until its response
    // has been sent, not just until its head has.
    let (mut h2, _connection) = h2_client(tls_to(&f, &server, HOST, b"h2").await).await;
    let (status, body) = text(h2.send_request(get_h2(HOST, "/slow")).await.unwrap()).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "slow"));
    let mut tls = tls_to(&f, &server, HOST, b"http/1.1").await;
    let reply =
        raw::exchange(&mut tls, format!("GET /slow HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes(), DEADLINE).await;
    assert_eq!(reply.status(), Some(200), "{reply:?}");
    assert!(reply.bytes.ends_with(b"slow"), "{reply:?}");

    let admin = server.admin_addr.unwrap();
    assert!(raw::metric(admin, "sealgate_connection_timeouts_total{timeout=\"Idle\"}").await >= 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stalls_its_response_body_is_cut_off_at_the_read_timeout() {
    let f = Fixture::new();
    let stalling = stalling_upstream().await;
    // Each step of the slow upstream is 400 ms, above the 300 ms read timeout of the stalling route: its head is
    // `response_timeout`'s to wait for, and its body's gap is within its own route's 600 ms.
    let slow = slow_upstream(Duration::from_millis(400)).await;
    let routes = format!(
        "[[route]]\npath = \"/stall\"\nupstream = \"http://{stalling}\"\n\
         [[route]]\npath = \"/slow\"\nupstream = \"http://{slow}\"\nread_timeout = \"600ms\"\n{HELLO}"
    );
    let server = server_with(&f, &routes, "[proxy]\nread_timeout = \"300ms\"").await;

    // HTTP/1: the head and the first bytes arrive, then the connection is closed (the body is cut short).
    let mut tls = tls_to(&f, &server, HOST, b"http/1.1").await;
    tls.write_all(format!("GET /stall HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes()).await.unwrap();
    let start = Instant::now();
    let reply = raw::read_response(&mut tls, DEADLINE).await;
    assert!(reply.closed, "a stalled body is cut off: {reply:?}");
    assert_closed_in_time(Some(start.elapsed()), "an HTTP/1 response whose upstream stalls");
    assert_eq!(reply.status(), Some(200), "{reply:?}");
    assert!(reply.bytes.ends_with(b"half"), "what arrived is delivered: {reply:?}");

    // HTTP/2: the stream is reset; the connection stays usable.
    let (mut h2, _connection) = h2_client(tls_to(&f, &server, HOST, b"h2").await).await;
    let start = Instant::now();
    let response = h2.send_request(get_h2(HOST, "/stall")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = tokio::time::timeout(DEADLINE, response.into_body().collect()).await.expect("cut off in time");
    assert!(body.is_err(), "a stalled HTTP/2 body ends in a reset, not a complete body");
    assert_closed_in_time(Some(start.elapsed()), "an HTTP/2 response whose upstream stalls");
    let (status, _) = text(h2.send_request(get_h2(HOST, "/")).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "the HTTP/2 connection goes on");

    // A body that keeps arriving, if slowly, within its route's read timeout is delivered whole.
    let (status, body) = text(h2.send_request(get_h2(HOST, "/slow")).await.unwrap()).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "slow"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_that_never_send_a_preface_or_never_finish_a_header_block_are_closed() {
    let f = Fixture::new();
    // hyper's HTTP/1 header-read deadline long: only the idle timer can close these (there is no HTTP/2 one).
    let server = server_with(&f, HELLO, "[timeouts]\nidle = \"300ms\"\nheader_read = \"60s\"").await;

    // ALPN h2, then nothing at all: not even the preface.
    let mut silent = tls_to(&f, &server, HOST, b"h2").await;
    assert_closed_in_time(raw::closed_within(&mut silent, DEADLINE).await, "an HTTP/2 connection with no preface");

    // Half a preface.
    let mut half = tls_to(&f, &server, HOST, b"h2").await;
    half.write_all(&h2raw::PREFACE[..10]).await.unwrap();
    assert_closed_in_time(raw::closed_within(&mut half, DEADLINE).await, "an HTTP/2 connection with half a preface");

    // A request's HEADERS without END_HEADERS, its CONTINUATION never sent: no stream is open yet.
    let mut h2 = H2::start(tls_to(&f, &server, HOST, b"h2").await).await;
    h2.settled(DEADLINE).await;
    let block = h2raw::request_block("GET", HOST, "/", &[]);
    let start = Instant::now();
    assert!(h2.send(&h2raw::frame(h2raw::HEADERS, h2raw::END_STREAM, 1, &block[..block.len() / 2])).await);
    let ended = h2.until(DEADLINE, |e| matches!(e, Event::Closed | Event::GoAway { .. })).await;
    assert!(ended.is_some(), "an unfinished header block keeps the connection open");
    assert_closed_in_time(Some(start.elapsed()), "an HTTP/2 connection with an unfinished header block");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_still_arriving_at_the_request_deadline_gets_408() {
    let f = Fixture::new();
    let stalled = RawUpstream::start().await;
    let trickled = RawUpstream::start().await;
    let over_h2 = RawUpstream::start().await;
    let slow = slow_upstream(Duration::from_millis(400)).await;
    let routes = format!(
        "[[route]]\npath = \"/stalled\"\nupstream = \"{}\"\n[[route]]\npath = \"/trickled\"\nupstream = \"{}\"\n\
         [[route]]\npath = \"/h2\"\nupstream = \"{}\"\n[[route]]\npath = \"/slow\"\nupstream = \"http://{slow}\"\n",
        stalled.url(),
        trickled.url(),
        over_h2.url()
    );
    let server = server_with(&f, &routes, "[timeouts]\nrequest = \"300ms\"").await;

    // A body that stops after 10 of its 100 bytes.
    let mut tls = tls_to(&f, &server, HOST, b"http/1.1").await;
    let start = Instant::now();
    let head = format!("POST /stalled HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 100\r\n\r\n0123456789");
    let reply = raw::exchange(&mut tls, head.as_bytes(), DEADLINE).await;
    assert_eq!(reply.status(), Some(408), "{reply:?}");
    assert!(reply.closed, "the connection is closed after a 408");
    assert_closed_in_time(Some(start.elapsed()), "a stalled body");

    // A body that keeps coming, one byte every 50 ms: the deadline is on the whole request, not between reads.
    let tls = tls_to(&f, &server, HOST, b"http/1.1").await;
    let (mut reader, mut writer) = tokio::io::split(tls);
    let head = format!("POST /trickled HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n");
    writer.write_all(head.as_bytes()).await.unwrap();
    let start = Instant::now();
    let drip = tokio::spawn(async move {
        while writer.write_all(b"1\r\na\r\n").await.is_ok() && start.elapsed() < DEADLINE {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, reader.read_to_end(&mut answer)).await;
    drip.abort();
    assert!(answer.starts_with(b"HTTP/1.1 408 "), "{}", String::from_utf8_lossy(&answer));
    assert_closed_in_time(Some(start.elapsed()), "a trickled body");

    // HTTP/2: DATA stops after 10 of 100 bytes.
    let mut h2 = H2::start(tls_to(&f, &server, HOST, b"h2").await).await;
    let mut frames = h2raw::frame(
        h2raw::HEADERS,
        h2raw::END_HEADERS,
        1,
        &h2raw::request_block("POST", HOST, "/h2", &[(b"content-length", b"100")]),
    );
    frames.extend(h2raw::frame(h2raw::DATA, 0, 1, b"0123456789"));
    let start = Instant::now();
    h2.send(&frames).await;
    let outcome = h2.outcome(1, DEADLINE).await;
    assert!(matches!(outcome, Some(Event::Headers { status: Some(408), .. })), "{outcome:?}");
    assert_closed_in_time(Some(start.elapsed()), "a stalled HTTP/2 body");

    // The upstreams saw the heads and the bytes that came, then an aborted request: never a complete one.
    for upstream in [&stalled, &trickled, &over_h2] {
        assert!(wait_until(DEADLINE, || !upstream.requests().is_empty()).await, "the head was forwarded");
        upstream.assert_unambiguous("a timed-out body");
        assert!(upstream.requests().iter().all(|r| !r.complete && r.body.len() <= 10), "{:?}", upstream.requests());
    }

    // The deadline covers the request, not the response: an upstream taking 800 ms to answer is not cut.
    let mut tls = tls_to(&f, &server, HOST, b"http/1.1").await;
    let reply =
        raw::exchange(&mut tls, format!("GET /slow HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes(), DEADLINE).await;
    assert_eq!(reply.status(), Some(200), "{reply:?}");

    let admin = server.admin_addr.unwrap();
    assert_eq!(raw::metric(admin, "sealgate_requests_refused_total{reason=\"Timeout\"}").await, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_keep_alive_pings_close_a_dead_peer_and_keep_a_live_one() {
    let f = Fixture::new();
    let server = server_with(
        &f,
        HELLO,
        "[timeouts]\nidle = \"60s\"\nh2_keep_alive_interval = \"100ms\"\nh2_keep_alive_timeout = \"200ms\"",
    )
    .await;

    // A peer that never acknowledges a PING.
    let mut dead = H2::start(tls_to(&f, &server, HOST, b"h2").await).await;
    dead.answer_pings = false;
    assert!(dead.until(DEADLINE, |e| *e == Event::Ping { ack: false }).await.is_some(), "no PING was sent");
    let start = Instant::now();
    let end = dead.until(DEADLINE, |e| matches!(e, Event::GoAway { .. })).await;
    // Closed (the `until` returns None on a close) or told to go away; either way, soon.
    assert!(start.elapsed() < DEADLINE, "a dead peer stays connected: {end:?}");

    // A peer that acknowledges them stays, ping after ping.
    let mut live = H2::start(tls_to(&f, &server, HOST, b"h2").await).await;
    let mut pings = 0;
    let third = live
        .until(DEADLINE, |e| {
            pings += usize::from(*e == Event::Ping { ack: false });
            pings == 5 || matches!(e, Event::GoAway { .. })
        })
        .await;
    assert_eq!(third, Some(Event::Ping { ack: false }), "a live peer was closed after {pings} PINGs");

    let admin = server.admin_addr.unwrap();
    assert_eq!(raw::metric(admin, "sealgate_connection_timeouts_total{timeout=\"KeepAlive\"}").await, 1.0);
}

/// A TLS client whose socket takes at most a few KiB before the server has to wait for it (its receive buffer
/// set small, so the kernel does not grow it).
async fn small_window_client(
    f: &Fixture,
    server: &sealgate::server::RunningServer,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let tcp = socket.connect(server.tls_addrs[0]).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(HOST).unwrap();
    tokio_rustls::TlsConnector::from(f.client(&[b"http/1.1"])).connect(name, tcp).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_response_is_disconnected_after_the_send_timeout() {
    let f = Fixture::new();
    const BODY: usize = 16 << 20;
    let body = Bytes::from(vec![b'x'; BODY]);
    let upstream = Upstream::start_with(move |_| hyper::Response::new(Full::new(body.clone()))).await;
    let routes = format!("[[route]]\nupstream = \"{}\"\n", upstream.url());
    // The request deadline and the idle timer cannot close these connections: a request is in flight. The
    // timeout is well above the reader's pauses: on a loaded 2-core runner a 150 ms sleep and the reads around
    // it took more than 300 ms.
    let server = server_with(&f, &routes, "[timeouts]\nsend = \"1s\"\nrequest = \"60s\"").await;
    let admin = server.admin_addr.unwrap();
    let request = format!("GET /big HTTP/1.1\r\nHost: {HOST}\r\n\r\n");

    // A client that reads with pauses shorter than the timeout gets the whole body.
    let mut reader = small_window_client(&f, &server).await;
    reader.write_all(request.as_bytes()).await.unwrap();
    let mut received = 0;
    let mut buf = vec![0; 64 * 1024];
    let start = Instant::now();
    let mut pause_at = 0;
    while received < BODY {
        // A 150 ms pause at each of the first four MiB: each shorter than the timeout (the kernel lets the
        // server write again only once the client has taken a good part of the socket's buffer).
        if received >= pause_at && pause_at < 4 << 20 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            pause_at += 1 << 20;
        }
        match tokio::time::timeout_at(start + 4 * DEADLINE, reader.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => received += n,
            other => panic!("the response ended after {received} bytes: {other:?}"),
        }
    }
    assert_eq!(raw::metric(admin, "sealgate_connection_timeouts_total{timeout=\"Send\"}").await, 0.0);

    // One that stops reading is disconnected.
    let mut stalled = small_window_client(&f, &server).await;
    stalled.write_all(request.as_bytes()).await.unwrap();
    let series = "sealgate_connection_timeouts_total{timeout=\"Send\"}";
    assert!(
        eventually(DEADLINE, || async { raw::metric(admin, series).await == 1.0 }).await,
        "the stalled connection was not timed out"
    );
    assert!(raw::closed_within(&mut stalled, DEADLINE).await.is_some(), "the stalled connection stays open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_its_client_gives_no_window_is_reset_after_the_send_timeout() {
    let f = Fixture::new();
    let slow = slow_upstream(Duration::from_millis(400)).await;
    let upstream = Upstream::start().await;
    let routes = format!(
        "[[route]]\npath = \"/slow\"\nupstream = \"http://{slow}\"\n[[route]]\nupstream = \"{}\"\n",
        upstream.url()
    );
    let server = server_with(&f, &routes, "[timeouts]\nsend = \"300ms\"\nrequest = \"60s\"").await;
    let admin = server.admin_addr.unwrap();
    let series = "sealgate_connection_timeouts_total{timeout=\"Send\"}";

    // A client whose streams start with no window (SETTINGS_INITIAL_WINDOW_SIZE 0) and that never opens one:
    // the response head goes out, its body cannot, and the stream is reset.
    let mut h2 = H2::start(tls_to(&f, &server, HOST, b"h2").await).await;
    assert!(h2.send(&h2raw::frame(h2raw::SETTINGS, 0, 0, &[0, 4, 0, 0, 0, 0])).await);
    h2.settled(DEADLINE).await;
    let request = h2raw::request_block("GET", HOST, "/stalled", &[]);
    let start = Instant::now();
    assert!(h2.send(&h2raw::frame(h2raw::HEADERS, h2raw::END_STREAM | h2raw::END_HEADERS, 1, &request)).await);
    let reset = h2.until(DEADLINE, |event| matches!(event, Event::Reset { stream: 1, .. })).await;
    assert_eq!(reset, Some(Event::Reset { stream: 1, code: h2raw::CANCEL }));
    assert_closed_in_time(Some(start.elapsed()), "a stream with no window");
    assert!(eventually(DEADLINE, || async { raw::metric(admin, series).await == 1.0 }).await);

    // The connection lives on, and a stream waiting on a slow upstream (head and body 400 ms apart each) is
    // not the client's stall: it completes.
    assert!(h2.send(&h2raw::frame(h2raw::SETTINGS, 0, 0, &[0, 4, 0, 1, 0, 0])).await);
    let request = h2raw::request_block("GET", HOST, "/slow", &[]);
    assert!(h2.send(&h2raw::frame(h2raw::HEADERS, h2raw::END_STREAM | h2raw::END_HEADERS, 3, &request)).await);
    let done = h2
        .until(DEADLINE, |event| {
            matches!(event, Event::Data { stream: 3, end_stream: true, .. } | Event::Reset { stream: 3, .. })
        })
        .await;
    assert!(matches!(done, Some(Event::Data { stream: 3, end_stream: true, .. })), "{done:?}");
    assert_eq!(raw::metric(admin, series).await, 1.0);
}
