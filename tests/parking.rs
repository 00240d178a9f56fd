//! Idle HTTP/1 connections are parked outside hyper (no HTTP buffers held) and served again when the client
//! sends: see `sealgate::parking`. Each test waits for the parked-connections gauge, then checks that the
//! connection behaves as one that was never parked.

mod common;

use std::time::Duration;

use common::raw;
use common::*;
use tokio::io::AsyncWriteExt;

const HOST: &str = "app.example.test";
/// Generous, for a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(5);

async fn parked(admin: std::net::SocketAddr) -> f64 {
    raw::metric(admin, "sealgate_connections_parked").await
}

async fn wait_parked(admin: std::net::SocketAddr, count: f64) {
    assert!(eventually(DEADLINE, || async move { parked(admin).await == count }).await, "never {count} parked");
}

fn get() -> Vec<u8> {
    format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n").into_bytes()
}

/// A connection to `host` that makes one request, is parked (the only parked connection) and then closed by
/// the server: how long after its answer it was closed. Panics if it is not closed within [`DEADLINE`].
async fn parked_until_closed(f: &Fixture, server: &sealgate::server::RunningServer, host: &str) -> Duration {
    let mut idle = tls_to(f, server, host, b"http/1.1").await;
    idle.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).await.unwrap();
    assert_eq!(raw::read_response(&mut idle, DEADLINE).await.status(), Some(200));
    let answered = tokio::time::Instant::now();
    wait_parked(server.admin_addr.unwrap(), 1.0).await;
    assert!(raw::closed_within(&mut idle, DEADLINE).await.is_some(), "a parked connection was not closed");
    answered.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_serves_its_next_requests_including_a_head_sent_in_pieces() {
    let f = Fixture::new();
    f.serve("c-app", &[HOST]);
    let server = f.start(&format!("{HELLO}\n[timeouts]\nheader_read = \"60s\"\nidle = \"60s\"\n")).await;
    let admin = server.admin_addr.unwrap();
    let mut tls = tls_to(&f, &server, HOST, b"http/1.1").await;

    // Parked before its first request, and after each one.
    wait_parked(admin, 1.0).await;
    for _ in 0..3 {
        let reply = raw::exchange(&mut tls, &get(), DEADLINE).await;
        assert_eq!(reply.status(), Some(200), "{reply:?}");
        wait_parked(admin, 1.0).await;
    }

    // A head split across a pause longer than the parking delay: the first piece unparks the connection, which
    // then waits for the rest under hyper, without parking again mid-head.
    let request = get();
    tls.write_all(&request[..10]).await.unwrap();
    tls.flush().await.unwrap();
    wait_parked(admin, 0.0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(parked(admin).await, 0.0, "parked in the middle of a request head");
    let reply = raw::exchange(&mut tls, &request[10..], DEADLINE).await;
    assert_eq!(reply.status(), Some(200), "{reply:?}");

    // Two requests in one write (pipelined) after parking: both answered.
    wait_parked(admin, 1.0).await;
    let reply = raw::exchange(&mut tls, &[get(), get()].concat(), DEADLINE).await;
    assert_eq!(reply.statuses(), [200, 200], "{reply:?}");
    wait_parked(admin, 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_is_closed_by_its_grant_retirement_and_by_the_header_read_deadline() {
    let f = Fixture::new();
    f.serve("c-app", &[HOST]);
    f.serve("c-other", &["other.example.test"]);
    let server = f.start(&format!("{HELLO}\n[timeouts]\nheader_read = \"1s\"\nidle = \"60s\"\n")).await;
    let admin = server.admin_addr.unwrap();

    // Retirement: the parked connection made with the retired grant's certificate closes.
    let mut retired = tls_to(&f, &server, HOST, b"http/1.1").await;
    assert_eq!(raw::exchange(&mut retired, &get(), DEADLINE).await.status(), Some(200));
    wait_parked(admin, 1.0).await;
    f.custody.retire_grant(&f.grant_of("c-app")).unwrap();
    assert!(raw::closed_within(&mut retired, DEADLINE).await.is_some(), "a parked connection outlived its grant");
    wait_parked(admin, 0.0).await;

    // The header-read deadline, which hyper enforces between requests, holds for a parked connection too.
    let closed_after = parked_until_closed(&f, &server, "other.example.test").await;
    assert!(closed_after >= Duration::from_millis(900), "closed {closed_after:?} after its request");
    assert_eq!(raw::metric(admin, "sealgate_connection_timeouts_total{timeout=\"HeaderRead\"}").await, 1.0);
}

/// The idle deadline, when it is the earlier of the two, closes a parked connection and is counted as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_is_closed_by_the_idle_deadline() {
    let f = Fixture::new();
    f.serve("c-app", &[HOST]);
    let server = f.start(&format!("{HELLO}\n[timeouts]\nheader_read = \"60s\"\nidle = \"1s\"\n")).await;
    let admin = server.admin_addr.unwrap();
    let closed_after = parked_until_closed(&f, &server, HOST).await;
    assert!(closed_after >= Duration::from_millis(900), "closed {closed_after:?} after its request");
    assert_eq!(raw::metric(admin, "sealgate_connection_timeouts_total{timeout=\"Idle\"}").await, 1.0);
    assert_eq!(raw::metric(admin, "sealgate_connection_timeouts_total{timeout=\"HeaderRead\"}").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_requests_have_bodies_is_not_parked() {
    let f = Fixture::new();
    f.serve("c-app", &[HOST]);
    let server = f.start(&format!("{HELLO}\n[timeouts]\nheader_read = \"60s\"\nidle = \"60s\"\n")).await;
    let admin = server.admin_addr.unwrap();
    let mut tls = tls_to(&f, &server, HOST, b"http/1.1").await;
    let post = format!("POST / HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\n\r\nhello");
    assert_eq!(raw::exchange(&mut tls, post.as_bytes(), DEADLINE).await.status(), Some(200));
    // Another connection parks meanwhile: the timer runs, and this one stays with hyper.
    let mut other = tls_to(&f, &server, HOST, b"http/1.1").await;
    assert_eq!(raw::exchange(&mut other, &get(), DEADLINE).await.status(), Some(200));
    wait_parked(admin, 1.0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(parked(admin).await, 1.0);
    assert_eq!(raw::exchange(&mut tls, &get(), DEADLINE).await.status(), Some(200));
}
