//! Listeners behind a layer-4 load balancer: the PROXY protocol header (versions 1 and 2) ahead of the TLS
//! handshake gives the client's address to the forwarding headers; a connection without one is closed.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::raw;
use common::*;
use http::StatusCode;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const HOST: &str = "app.example.test";
const DEADLINE: Duration = Duration::from_secs(10);

/// A proxy.toml whose listener (and a redirect listener) expect the PROXY protocol, forwarding to `upstream`.
fn config(f: &Fixture, upstream: &Upstream, proxy_protocol: bool) -> String {
    f.config(&format!("[[route]]\nupstream = \"{}\"\n", upstream.url())).replacen(
        "bind = \"127.0.0.1:0\"\n",
        &format!(
            "bind = \"127.0.0.1:0\"\nproxy_protocol = {proxy_protocol}\n\n[[redirect]]\nbind = \"127.0.0.1:0\"\n\
             proxy_protocol = {proxy_protocol}\n"
        ),
        1,
    )
}

/// A certificate for [`HOST`], a recording upstream, and a server whose listeners expect the PROXY protocol.
async fn start() -> (Fixture, Upstream, sealgate::server::RunningServer) {
    let f = Fixture::new();
    f.serve("c-app", &[HOST]);
    let upstream = Upstream::start().await;
    let server = start_server(f.dir.path(), &config(&f, &upstream, true)).await;
    (f, upstream, server)
}

/// A version 2 PROXY header for a TCP connection from `client` to `server`.
fn v2_header(client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    use ppp::v2::{Builder, Command, Protocol, Version};
    Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (client, server)).build().unwrap()
}

/// Connects, writes `header` in `pieces` writes (each flushed on its own), then makes the TLS handshake.
async fn connect_after(
    addr: SocketAddr,
    header: &[u8],
    pieces: usize,
    f: &Fixture,
    alpn: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut tcp = TcpStream::connect(addr).await?;
    for piece in header.chunks(header.len().div_ceil(pieces.max(1)).max(1)) {
        tcp.write_all(piece).await?;
        tcp.flush().await?;
        // Lets the server see the pieces apart (a read between them), without depending on it.
        tokio::task::yield_now().await;
    }
    let name = ServerName::try_from(HOST.to_owned()).unwrap();
    TlsConnector::from(f.client(&[alpn])).connect(name, tcp).await
}

/// What the upstream saw as the client of one request sent after `header`.
async fn forwarded_for(
    server_addr: SocketAddr,
    header: &[u8],
    pieces: usize,
    f: &Fixture,
    upstream: &Upstream,
) -> (String, String) {
    let tls = connect_after(server_addr, header, pieces, f, b"http/1.1").await.unwrap();
    let mut sender = http1(tls).await;
    let (status, _) = text(sender.send_request(get(HOST, "/who")).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let seen = upstream.last();
    (
        seen.headers["x-forwarded-for"].to_str().unwrap().to_owned(),
        seen.headers["forwarded"].to_str().unwrap().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_gives_the_client_address_to_the_forwarding_headers() {
    let (f, upstream, server) = start().await;
    let addr = server.tls_addrs[0];

    let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n";
    let (xff, forwarded) = forwarded_for(addr, v1, 1, &f, &upstream).await;
    assert_eq!(xff, "203.0.113.7");
    assert!(forwarded.starts_with("for=203.0.113.7;"), "{forwarded}");

    // Version 2, an IPv6 client, the header arriving in three pieces.
    let v2 = v2_header("[2001:db8::7]:40000".parse().unwrap(), "[2001:db8::1]:443".parse().unwrap());
    let (xff, forwarded) = forwarded_for(addr, &v2, 3, &f, &upstream).await;
    assert_eq!(xff, "2001:db8::7");
    assert!(forwarded.starts_with("for=\"[2001:db8::7]\";"), "{forwarded}");

    // HTTP/2 on a connection opened the same way.
    let v2 = v2_header("198.51.100.9:40001".parse().unwrap(), "10.0.0.1:443".parse().unwrap());
    let tls = connect_after(addr, &v2, 1, &f, b"h2").await.unwrap();
    let mut sender = http2(tls).await;
    let (status, _) = text(sender.send_request(get_h2(HOST, "/h2")).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(upstream.last().headers["x-forwarded-for"], "198.51.100.9");

    // LOCAL (the load balancer's own health check) and UNKNOWN name no client: the peer is the client.
    let local = ppp::v2::Builder::new(
        ppp::v2::Version::Two | ppp::v2::Command::Local,
        ppp::v2::AddressFamily::Unspecified | ppp::v2::Protocol::Unspecified,
    )
    .build()
    .unwrap();
    assert_eq!(forwarded_for(addr, &local, 1, &f, &upstream).await.0, "127.0.0.1");
    assert_eq!(forwarded_for(addr, b"PROXY UNKNOWN\r\n", 1, &f, &upstream).await.0, "127.0.0.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_valid_header_are_closed_and_counted() {
    let (f, upstream, server) = start().await;
    let addr = server.tls_addrs[0];

    // A client that goes straight to TLS, as one that reached the listener around the load balancer would.
    let name = ServerName::try_from(HOST.to_owned()).unwrap();
    let direct = TlsConnector::from(f.client(&[b"http/1.1"])).connect(name, TcpStream::connect(addr).await.unwrap());
    assert!(tokio::time::timeout(DEADLINE, direct).await.unwrap().is_err(), "a handshake without a header fails");
    // A header that is not one.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PROXY TCP4 not-an-address 10.0.0.1 1 443\r\n").await.unwrap();
    assert!(raw::tcp_closed_within(&mut tcp, DEADLINE).await.is_some(), "an invalid header is closed");
    let series = "sealgate_tls_handshake_failures_total{reason=\"ProxyHeader\"}";
    let admin = server.admin_addr.unwrap();
    assert!(eventually(DEADLINE, || async { raw::metric(admin, series).await == 2.0 }).await);
    assert_eq!(upstream.recorded.lock().unwrap().len(), 0, "nothing reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redirect_listener_reads_the_header_too() {
    let (_export, _upstream, server) = start().await;

    let mut tcp = TcpStream::connect(server.redirect_addrs[0]).await.unwrap();
    let mut request = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 80\r\n".to_vec();
    request.extend_from_slice(format!("GET /x HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").as_bytes());
    tcp.write_all(&request).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(DEADLINE, tcp.read_to_string(&mut response)).await.unwrap().unwrap();
    assert!(response.starts_with("HTTP/1.1 308"), "{response}");
    assert!(response.contains(&format!("location: https://{HOST}/x")), "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_turns_the_header_off_for_new_connections_on_the_same_socket() {
    let (f, upstream, server) = start().await;
    let addr = server.tls_addrs[0];
    // A connection made under the old setting, still open across the reload.
    let before = connect_after(addr, b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n", 1, &f, b"http/1.1").await;
    let mut before = http1(before.unwrap()).await;

    // The same listener (a listener is its configured address), now without the header: the load balancer
    // was removed.
    let path = f.dir.path().join("proxy.toml");
    std::fs::write(&path, config(&f, &upstream, false)).unwrap();
    let reloaded = server.reload(sealgate::config::Config::load(&path).unwrap()).await.unwrap();
    assert!(reloaded.opened.is_empty() && reloaded.closed.is_empty(), "{reloaded:?}");

    let tls = connect(addr, HOST, f.client(&[b"http/1.1"])).await.expect("a plain TLS client is served now");
    let (status, _) = text(http1(tls).await.send_request(get(HOST, "/after")).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(upstream.last().headers["x-forwarded-for"], "127.0.0.1");
    let (status, _) = text(before.send_request(get(HOST, "/before")).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(upstream.last().headers["x-forwarded-for"], "203.0.113.7", "the open connection keeps its client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_allow_list_judges_the_client_the_header_names() {
    let f = Fixture::new();
    f.serve("c-app", &[HOST]);
    let routes =
        "[[route]]\npath = \"/office\"\nallow = [\"203.0.113.0/24\"]\ndeny = [\"203.0.113.66\", \"127.0.0.1\"]\n\
                  respond = { status = 200, body = \"office\" }\n";
    let text_config =
        f.config(routes).replacen("bind = \"127.0.0.1:0\"\n", "bind = \"127.0.0.1:0\"\nproxy_protocol = true\n", 1);
    let server = start_server(f.dir.path(), &text_config).await;
    let listener = server.tls_addrs[0];
    let status = |client: &'static str| {
        let f = &f;
        async move {
            let header = v2_header(client.parse().unwrap(), listener);
            let tls = connect_after(listener, &header, 1, f, b"http/1.1").await.unwrap();
            text(http1(tls).await.send_request(get(HOST, "/office")).await.unwrap()).await
        }
    };
    // The TCP peer (the load balancer, 127.0.0.1, denied here) is not the client: the header's address is.
    assert_eq!(status("203.0.113.7:40000").await, (StatusCode::OK, "office".to_owned()));
    assert_eq!(status("203.0.113.66:40000").await.0, StatusCode::FORBIDDEN, "denied within the allowed block");
    assert_eq!(status("198.51.100.9:40000").await.0, StatusCode::FORBIDDEN, "outside the allowed block");
    let admin = server.admin_addr.unwrap();
    let (_, metrics) = admin_get(admin, "/metrics").await;
    assert!(metrics.contains("sealgate_requests_refused_total{reason=\"Forbidden\"} 2"), "{metrics}");
}
