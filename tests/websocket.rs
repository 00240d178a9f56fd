//! WebSocket through sealgate with a real WebSocket client and server (tungstenite): tunnelled over HTTP/1.1
//! (upgrade) and HTTP/2 (extended CONNECT, RFC 8441) only once the upstream switched; h2c and CONNECT refused;
//! tunnels closed when their certificate's grant ends.
#![allow(clippy::result_large_err)] // tungstenite's handshake callback returns its own (large) error type.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A WebSocket echo server (tungstenite does the HTTP handshake itself) that records the upgrade requests.
async fn echo_upstream() -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<http::HeaderMap>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = std::sync::Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let log = std::sync::Arc::clone(&log);
            tokio::spawn(async move {
                let callback = |request: &tokio_tungstenite::tungstenite::handshake::server::Request, response| {
                    log.lock().unwrap().push(request.headers().clone());
                    Ok(response)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else { return };
                while let Some(Ok(message)) = ws.next().await {
                    if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

async fn echo_once<S>(ws: &mut WebSocketStream<S>, text: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::text(text)).await.unwrap();
    loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Text(reply) => return reply.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_http1_is_tunnelled_and_closed_with_its_grant() {
    let f = Fixture::new();
    f.serve("c-ws", &["ws.example.test"]);
    let (upstream, seen) = echo_upstream().await;
    let server = f.start(&format!("[[route]]\nupstream = \"http://{upstream}\"\n")).await;
    let tls = connect(server.tls_addrs[0], "ws.example.test", f.client(&[b"http/1.1"])).await.unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async("wss://ws.example.test/chat", tls).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(echo_once(&mut ws, "hello").await, "hello");
    assert_eq!(echo_once(&mut ws, "again").await, "again");
    let headers = seen.lock().unwrap()[0].clone();
    assert_eq!(headers["upgrade"].to_str().unwrap().to_ascii_lowercase(), "websocket");
    assert_eq!(headers["x-forwarded-proto"], "https");

    // The tunnel lives as long as its certificate's grant.
    f.custody.retire_grant(&f.grant_of("c-ws")).unwrap();
    let closed = tokio::time::timeout(APPLY_DEADLINE, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the tunnel is closed when the grant ends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_http2_extended_connect_is_tunnelled() {
    let f = Fixture::new();
    f.serve("c-ws", &["ws.example.test"]);
    let (upstream, seen) = echo_upstream().await;
    let server = f.start(&format!("[[route]]\nupstream = \"http://{upstream}\"\n")).await;
    let tls = connect(server.tls_addrs[0], "ws.example.test", f.client(&[b"h2"])).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let mut request = http::Request::builder()
        .method("CONNECT")
        .uri("https://ws.example.test/chat")
        .version(http::Version::HTTP_2)
        .header("sec-websocket-version", "13")
        .body(Empty::<Bytes>::new())
        .unwrap();
    request.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
    h2.ready().await.unwrap();
    let response = h2.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "RFC 8441: 200 once the upstream switched");
    let stream = hyper::upgrade::on(response).await.unwrap();
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(stream), Role::Client, None).await;
    assert_eq!(echo_once(&mut ws, "over h2").await, "over h2");
    let headers = seen.lock().unwrap()[0].clone();
    assert!(headers.contains_key("sec-websocket-key"), "sealgate asked the HTTP/1.1 upstream for the upgrade");

    // Other streams of the connection go on meanwhile.
    let response = h2
        .send_request(
            http::Request::builder()
                .method("GET")
                .uri("https://ws.example.test/")
                .version(http::Version::HTTP_2)
                .body(Empty::new())
                .unwrap(),
        )
        .await;
    assert!(response.is_ok());
}

/// Raw HTTP/1.1 over TLS: sends `head`, returns the status line.
async fn raw_status(f: &Fixture, addr: std::net::SocketAddr, head: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = connect(addr, "ws.example.test", f.client(&[b"http/1.1"])).await.unwrap();
    tls.write_all(head.as_bytes()).await.unwrap();
    let mut buffer = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buffer)).await.unwrap().unwrap();
    String::from_utf8_lossy(&buffer[..n]).lines().next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrades_and_connect_are_refused_and_a_wrong_switch_is_a_bad_gateway() {
    let f = Fixture::new();
    f.serve("c-ws", &["ws.example.test"]);
    let plain = Upstream::start().await;
    // An upstream that "switches" to another protocol than asked.
    let liar = Upstream::start_with(|_| {
        http::Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "h2c")
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap()
    })
    .await;
    let routes = format!(
        "[[route]]\nupstream = \"{}\"\n[[route]]\npath = \"/liar\"\nupstream = \"{}\"\n",
        plain.url(),
        liar.url()
    );
    let server = f.start(&routes).await;
    let addr = server.tls_addrs[0];
    let h2c = "GET / HTTP/1.1\r\nHost: ws.example.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n";
    assert!(raw_status(&f, addr, h2c).await.contains("400"));
    let connect_request = "CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n";
    let status = raw_status(&f, addr, connect_request).await;
    assert!(status.contains("405") || status.contains("400"), "{status}");
    assert!(plain.recorded.lock().unwrap().is_empty(), "nothing reached the upstream");

    // A plain upstream that ignores the upgrade answers normally (no switch).
    let ws_head = "GET / HTTP/1.1\r\nHost: ws.example.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    assert!(raw_status(&f, addr, ws_head).await.contains("200"));
    // An upstream that switches to something else: 502.
    let liar_head = ws_head.replace("GET / ", "GET /liar ");
    assert!(raw_status(&f, addr, &liar_head).await.contains("502"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_that_carries_nothing_for_tunnel_idle_is_closed_and_a_busy_one_is_not() {
    let f = Fixture::new();
    f.serve("c-ws", &["ws.example.test"]);
    let (upstream, _) = echo_upstream().await;
    let idle = Duration::from_millis(600);
    let server = f
        .start(&format!(
            "[timeouts]\ntunnel_idle = \"{}ms\"\n[[route]]\nupstream = \"http://{upstream}\"\n",
            idle.as_millis()
        ))
        .await;
    let open = |f: &Fixture| {
        let client = f.client(&[b"http/1.1"]);
        let addr = server.tls_addrs[0];
        async move {
            let tls = connect(addr, "ws.example.test", client).await.unwrap();
            tokio_tungstenite::client_async("wss://ws.example.test/chat", tls).await.unwrap().0
        }
    };

    // Busy: a message every third of the idle time, for twice the idle time, keeps the tunnel open.
    let mut busy = open(&f).await;
    let start = tokio::time::Instant::now();
    while start.elapsed() < idle * 2 {
        assert_eq!(echo_once(&mut busy, "tick").await, "tick", "a busy tunnel stays open");
        tokio::time::sleep(idle / 3).await;
    }

    // Quiet: closed once nothing has moved for `tunnel_idle`, and not before.
    let mut quiet = open(&f).await;
    assert_eq!(echo_once(&mut quiet, "once").await, "once");
    let start = tokio::time::Instant::now();
    let closed = tokio::time::timeout(APPLY_DEADLINE, async {
        loop {
            match quiet.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a quiet tunnel is closed");
    assert!(start.elapsed() >= idle * 3 / 4, "closed after {:?}, before tunnel_idle", start.elapsed());
}
