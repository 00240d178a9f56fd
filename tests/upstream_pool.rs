//! The upstream connection pool, seen from a raw TCP upstream that counts the connections it accepts and the
//! ones closed: connections are reused, an upstream closing its idle connections costs no request, at most
//! `pool_max_idle_per_host` stay idle, and idle ones close after `pool_idle_timeout`.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use sealgate::server::RunningServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const HOST: &str = "app.example.test";
/// Deadline for anything the tests wait for; generous for a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(10);

/// What the raw upstream does after each response.
#[derive(Clone, Copy)]
enum After {
    /// Keeps the connection for the next request.
    KeepAlive,
    /// Closes the connection a moment after the response, though the response did not say so (as an upstream
    /// whose keep-alive timeout ends does), while the proxy holds it idle.
    Close,
}

/// A raw HTTP/1.1 upstream answering every request `200 ok` after `delay`.
struct RawUpstream {
    url: String,
    accepted: Arc<AtomicUsize>,
    /// Connections that ended: closed by the proxy (EOF) or by the upstream itself.
    ended: Arc<AtomicUsize>,
}

impl RawUpstream {
    async fn start(after: After, delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(AtomicUsize::new(0));
        let (a, e) = (Arc::clone(&accepted), Arc::clone(&ended));
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { return };
                a.fetch_add(1, Ordering::SeqCst);
                let ended = Arc::clone(&e);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        // Requests have no body: a request ends at its blank line.
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => {
                                    ended.fetch_add(1, Ordering::SeqCst);
                                    return;
                                }
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        buf.drain(..end);
                        tokio::time::sleep(delay).await;
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(reply).await.is_err() {
                            ended.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        if let After::Close = after {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            drop(stream);
                            ended.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    }
                });
            }
        });
        Self { url, accepted, ended }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn ended(&self) -> usize {
        self.ended.load(Ordering::SeqCst)
    }
}

fn fixture() -> Fixture {
    let f = Fixture::new();
    f.serve("c-app", &[HOST]);
    f
}

/// The server, with one route to `upstream` and no retries (what is tested is the pool's own handling).
async fn start(f: &Fixture, upstream: &RawUpstream, proxy: &str) -> RunningServer {
    f.start(&format!("[proxy]\n{proxy}\n\n[[route]]\nupstream = {:?}\nretries = 0\n", upstream.url)).await
}

async fn connection(f: &Fixture, server: &RunningServer) -> SendRequest<Full<Bytes>> {
    http1(connect(server.tls_addrs[0], HOST, f.client(&[b"http/1.1"])).await.unwrap()).await
}

/// `n` client connections, each sending one request at the same time as the others.
async fn requests_at_once(f: &Fixture, server: &RunningServer, n: usize) -> Vec<SendRequest<Full<Bytes>>> {
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(connection(f, server).await);
    }
    futures_util::future::join_all(clients.iter_mut().map(get_ok)).await;
    clients
}

async fn get_ok(sender: &mut SendRequest<Full<Bytes>>) {
    let exchange = async {
        sender.ready().await.unwrap();
        text(sender.send_request(get(HOST, "/")).await.unwrap()).await
    };
    let (status, body) = tokio::time::timeout(DEADLINE, exchange).await.expect("an answer in time");
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    let f = fixture();
    let upstream = RawUpstream::start(After::KeepAlive, Duration::ZERO).await;
    let server = start(&f, &upstream, "").await;
    let mut client = connection(&f, &server).await;
    for _ in 0..20 {
        get_ok(&mut client).await;
    }
    assert_eq!(upstream.accepted(), 1, "twenty requests in turn, one upstream connection");

    // Requests at once need connections at once; afterwards they are all reused.
    let mut clients = requests_at_once(&f, &server, 4).await;
    let after_burst = upstream.accepted();
    assert!((1..=5).contains(&after_burst), "{after_burst} upstream connections for at most 5 requests at once");
    for client in &mut clients {
        for _ in 0..5 {
            get_ok(client).await;
        }
    }
    assert_eq!(upstream.accepted(), after_burst, "requests in turn reuse the idle connections");
    assert_eq!(upstream.ended(), 0);
}

#[tokio::test]
async fn an_upstream_closing_its_idle_connections_costs_no_request() {
    let f = fixture();
    let upstream = RawUpstream::start(After::Close, Duration::ZERO).await;
    let server = start(&f, &upstream, "").await;
    let mut client = connection(&f, &server).await;
    for n in 1..=10 {
        get_ok(&mut client).await;
        // The upstream has closed the connection the proxy keeps idle: the next request must not fail on it.
        assert!(wait_until(DEADLINE, || upstream.ended() == n).await);
    }
    assert_eq!(upstream.accepted(), 10);
}

#[tokio::test]
async fn at_most_pool_max_idle_per_host_connections_stay_idle() {
    let f = fixture();
    // Slow answers, so that six requests at once need six connections.
    let upstream = RawUpstream::start(After::KeepAlive, Duration::from_millis(300)).await;
    let server = start(&f, &upstream, "pool_max_idle_per_host = 2").await;
    let mut clients = requests_at_once(&f, &server, 6).await;
    assert_eq!(upstream.accepted(), 6);
    assert!(wait_until(DEADLINE, || upstream.ended() == 4).await, "{} of 6 closed; 4 expected", upstream.ended());
    // The two kept are used again.
    get_ok(&mut clients[0]).await;
    assert_eq!(upstream.accepted(), 6);
}

#[tokio::test]
async fn idle_upstream_connections_close_after_pool_idle_timeout() {
    let f = fixture();
    let upstream = RawUpstream::start(After::KeepAlive, Duration::ZERO).await;
    let server = start(&f, &upstream, "pool_idle_timeout = \"300ms\"").await;
    let mut client = connection(&f, &server).await;
    get_ok(&mut client).await;
    assert!(wait_until(DEADLINE, || upstream.ended() == 1).await, "the idle connection was closed");
    // The next request opens a new one.
    get_ok(&mut client).await;
    assert_eq!(upstream.accepted(), 2);
}
