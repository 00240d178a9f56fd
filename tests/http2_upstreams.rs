//! `upstream_protocol = "http2"`: requests go to the upstream over HTTP/2 (prior knowledge over `http`, ALPN
//! `h2` over `https`), all on one shared connection, with `TE: trailers` and trailers both ways, as gRPC needs;
//! a connection the upstream closed is replaced without failing a request.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One request as the HTTP/2 upstream saw it.
#[derive(Debug, Clone)]
struct Seen {
    version: Version,
    uri: http::Uri,
    headers: HeaderMap,
    body: Bytes,
    /// The request's trailers, if it had any.
    trailers: Option<HeaderMap>,
}

/// An HTTP/2 upstream that answers `echo: <body>` with a `grpc-status: 0` trailer, counting its connections.
struct H2Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
    /// Connections open now.
    open: Arc<AtomicUsize>,
    /// Cancelling closes every connection open so far, with GOAWAY (the upstream stays listening).
    drop_connections: Arc<Mutex<CancellationToken>>,
}

impl H2Upstream {
    async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        Self::serve(TcpListener::bind("127.0.0.1:0").await.unwrap(), tls, None)
    }

    /// Serves on `listener`, with TLS when `tls`, allowing `max_streams` concurrent streams per connection
    /// (hyper's default, 200, when `None`).
    fn serve(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>, max_streams: Option<u32>) -> Self {
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let drop_connections = Arc::new(Mutex::new(CancellationToken::new()));
        let upstream = Self {
            addr,
            seen: Arc::clone(&seen),
            connections: Arc::clone(&connections),
            open: Arc::clone(&open),
            drop_connections: Arc::clone(&drop_connections),
        };
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                connections.fetch_add(1, Ordering::SeqCst);
                open.fetch_add(1, Ordering::SeqCst);
                let open = Arc::clone(&open);
                let seen = Arc::clone(&seen);
                let cancel = drop_connections.lock().unwrap().clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _open = OpenGuard(open);
                    let service = hyper::service::service_fn(move |request| answer(Arc::clone(&seen), request));
                    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    builder.max_concurrent_streams(max_streams);
                    // Told to close, a connection says GOAWAY and ends once its streams are done, as a server
                    // restarting or limiting its connections' age does.
                    macro_rules! serve {
                        ($io:expr) => {{
                            let connection = builder.serve_connection(TokioIo::new($io), service);
                            tokio::pin!(connection);
                            tokio::select! {
                                _ = connection.as_mut() => return,
                                _ = cancel.cancelled() => connection.as_mut().graceful_shutdown(),
                            }
                            let _ = connection.await;
                        }};
                    }
                    match tls {
                        None => serve!(tcp),
                        Some(tls) => {
                            let Ok(stream) = tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await else { return };
                            assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN h2");
                            serve!(stream)
                        }
                    }
                });
            }
        });
        upstream
    }

    fn url(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}", self.addr.port())
    }

    fn last(&self) -> Seen {
        self.seen.lock().unwrap().last().cloned().expect("the upstream received no request")
    }

    fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Closes every connection the upstream has open, with GOAWAY.
    fn close_connections(&self) {
        let mut token = self.drop_connections.lock().unwrap();
        token.cancel();
        *token = CancellationToken::new();
    }
}

/// Counts a connection open until its task ends.
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

type EchoBody = StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, hyper::Error>>>>;

async fn answer(seen: Arc<Mutex<Vec<Seen>>>, request: Request<Incoming>) -> Result<Response<EchoBody>, hyper::Error> {
    let (head, body) = request.into_parts();
    let collected = body.collect().await?;
    let trailers = collected.trailers().cloned();
    let body = collected.to_bytes();
    seen.lock().unwrap().push(Seen {
        version: head.version,
        uri: head.uri.clone(),
        headers: head.headers.clone(),
        body: body.clone(),
        trailers,
    });
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let echo = [&b"echo: "[..], &body].concat();
    let frames = vec![Ok(Frame::data(Bytes::from(echo))), Ok(Frame::trailers(trailers))];
    Ok(Response::new(StreamBody::new(futures_util::stream::iter(frames))))
}

fn route(upstream: &str, extra: &str) -> String {
    format!("[[route]]\nupstream = \"{upstream}\"\nupstream_protocol = \"http2\"\n{extra}\n")
}

/// A sealgate serving `app.example.test` whose one route goes to `upstream` over HTTP/2 (with `extra` route
/// keys), and an HTTP/2 client connection to it.
async fn proxy_to(
    upstream: &str,
    extra: &str,
) -> (Fixture, sealgate::server::RunningServer, hyper::client::conn::http2::SendRequest<Full<Bytes>>) {
    let f = Fixture::new();
    f.serve("c-app", &["app.example.test"]);
    let server = f.start(&route(upstream, extra)).await;
    let tls = connect(server.tls_addrs[0], "app.example.test", f.client(&[b"h2"])).await.unwrap();
    let client = http2(tls).await;
    (f, server, client)
}

/// A gRPC-like call over HTTP/2: POST with `TE: trailers`; the response's status, body and trailers.
async fn call(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    path: &str,
    body: &'static str,
) -> (StatusCode, Bytes, Option<HeaderMap>) {
    let request = Request::builder()
        .method("POST")
        .uri(format!("https://app.example.test{path}"))
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (status, collected.to_bytes(), trailers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_upstream_over_one_http2_connection_with_trailers_both_ways() {
    let upstream = H2Upstream::start(None).await;
    let (f, server, mut client) = proxy_to(&upstream.url("http"), "").await;

    let (status, body, trailers) = call(&mut client, "/pkg.Echo/Say?x=1", "ping").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"echo: ping"[..]));
    assert_eq!(trailers.as_ref().and_then(|t| t.get("grpc-status")), Some(&HeaderValue::from_static("0")));
    let seen = upstream.last();
    assert_eq!(seen.version, Version::HTTP_2);
    assert_eq!(seen.uri.to_string(), "http://app.example.test/pkg.Echo/Say?x=1", ":scheme, :authority, :path");
    assert!(!seen.headers.contains_key("host"), "HTTP/2 carries the authority as :authority");
    assert_eq!(seen.headers["te"], "trailers");
    assert_eq!(seen.headers["content-type"], "application/grpc");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(&seen.body[..], b"ping");

    // Many requests at once, from HTTP/2 and HTTP/1.1 clients: one upstream connection carries them all.
    let mut calls = Vec::new();
    for i in 0..24 {
        let mut client = client.clone();
        calls.push(tokio::spawn(async move { call(&mut client, &format!("/many/{i}"), "x").await.0 }));
    }
    let h1 = connect(server.tls_addrs[0], "app.example.test", f.client(&[])).await.unwrap();
    let mut h1 = http1(h1).await;
    let response = h1.send_request(get("app.example.test", "/from-http1")).await.unwrap();
    assert_eq!(text(response).await, (StatusCode::OK, "echo: ".to_owned()));
    let h1_seen = upstream.seen.lock().unwrap().iter().find(|seen| seen.uri.path() == "/from-http1").cloned();
    let h1_seen = h1_seen.expect("the HTTP/1.1 client's request went upstream");
    assert!(!h1_seen.headers.contains_key("te"), "no TE: the client accepts no trailers");
    for call in calls {
        assert_eq!(call.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(upstream.seen.lock().unwrap().len(), 26);
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1, "one shared connection");

    // The upstream closes its connection (GOAWAY): the next request goes on a new one, and does not fail.
    upstream.close_connections();
    assert!(wait_until(Duration::from_secs(5), || upstream.open_connections() == 0).await);
    let (status, body, _) = call(&mut client, "/after-close", "again").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"echo: again"[..]));
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upstream_connection_no_request_takes_for_pool_idle_timeout_is_closed_and_made_again() {
    let upstream = H2Upstream::start(None).await;
    let f = Fixture::new();
    f.serve("c-app", &["app.example.test"]);
    let config = f
        .config(&route(&upstream.url("http"), ""))
        .replace("[admin]", "[proxy]\npool_idle_timeout = \"1s\"\n\n[admin]");
    let server = start_server(f.dir.path(), &config).await;
    let tls = connect(server.tls_addrs[0], "app.example.test", f.client(&[b"h2"])).await.unwrap();
    let mut client = http2(tls).await;

    // Taken every 100 ms for a second and a half: kept (a slow machine has 900 ms to spare between two).
    for i in 0..15 {
        assert_eq!(call(&mut client, &format!("/busy/{i}"), "x").await.0, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!((upstream.connections.load(Ordering::SeqCst), upstream.open_connections()), (1, 1));

    // Then left alone: closed (from 1 s on), and made again for the next request.
    assert!(
        wait_until(Duration::from_secs(5), || upstream.open_connections() == 0).await,
        "the idle connection is closed"
    );
    let (status, body, _) = call(&mut client, "/again", "y").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"echo: y"[..]));
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_http2_upstreams_are_verified_and_negotiate_h2() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&leaf_key, &issuer).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let upstream = H2Upstream::start(Some(Arc::new(tls))).await;

    let f = Fixture::new();
    f.serve("c-app", &["app.example.test"]);
    std::fs::write(f.dir.path().join("upstream-ca.pem"), ca_pem).unwrap();
    let url = format!("https://localhost:{}", upstream.addr.port());
    let server = f.start(&route(&url, "ca = \"upstream-ca.pem\"")).await;
    let tls = connect(server.tls_addrs[0], "app.example.test", f.client(&[b"h2"])).await.unwrap();
    let mut client = http2(tls).await;
    let (status, body, trailers) = call(&mut client, "/secure", "over tls").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"echo: over tls"[..]));
    assert!(trailers.is_some_and(|t| t.contains_key("grpc-status")));
    assert_eq!(upstream.last().uri.to_string(), "https://app.example.test/secure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_http2_upstream_gets_502_and_one_that_comes_back_is_used() {
    // A port nothing listens on (bound, then released).
    let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let (_f, _server, mut client) = proxy_to(&format!("http://127.0.0.1:{port}"), "retries = 0").await;
    let response = client.send_request(get_h2("app.example.test", "/")).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);

    // The same port, now listening: the failed connection is not kept.
    let upstream = H2Upstream::serve(TcpListener::bind(("127.0.0.1", port)).await.unwrap(), None, None);
    let (status, body, _) = call(&mut client, "/back", "hello").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"echo: hello"[..]));
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_request_trailers_reach_an_http2_upstream() {
    let f = Fixture::new();
    f.serve("c-app", &["app.example.test"]);
    let upstream = H2Upstream::start(None).await;
    let server = f.start(&route(&upstream.url("http"), "")).await;
    let tls = connect(server.tls_addrs[0], "app.example.test", f.client(&[b"h2"])).await.unwrap();
    let (mut client, connection) =
        hyper::client::conn::http2::handshake::<_, _, EchoBody>(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
    tokio::spawn(connection);
    let mut trailers = HeaderMap::new();
    trailers.insert("checksum", HeaderValue::from_static("abc"));
    let frames = vec![Ok(Frame::data(Bytes::from_static(b"streamed"))), Ok(Frame::trailers(trailers))];
    let request = Request::builder()
        .method("POST")
        .uri("https://app.example.test/upload")
        .header("te", "trailers")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let _ = response.into_body().collect().await.unwrap();
    let seen = upstream.last();
    assert_eq!(&seen.body[..], b"streamed");
    assert_eq!(seen.trailers.and_then(|t| t.get("checksum").cloned()), Some(HeaderValue::from_static("abc")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_speak_http2_to_an_http2_upstream() {
    let f = Fixture::new();
    f.serve("c-app", &["app.example.test"]);
    let upstream = H2Upstream::start(None).await;
    let checks = "health_check = { path = \"/healthz\", interval = \"100ms\", timeout = \"1s\" }";
    let _server = f.start(&route(&upstream.url("http"), checks)).await;
    let checked = wait_until(Duration::from_secs(10), || {
        upstream.seen.lock().unwrap().iter().filter(|seen| seen.uri.path() == "/healthz").count() >= 2
    })
    .await;
    assert!(checked, "the checks reached the upstream");
    let seen = upstream.seen.lock().unwrap().iter().find(|seen| seen.uri.path() == "/healthz").cloned().unwrap();
    assert_eq!(seen.version, Version::HTTP_2);
    assert_eq!(seen.uri.to_string(), format!("http://127.0.0.1:{}/healthz", upstream.addr.port()));
    assert_eq!(seen.headers["user-agent"], "sealgate-health-check");
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1, "checks share the route's connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_allows_few_streams_queues_requests_rather_than_failing_them() {
    let upstream = H2Upstream::serve(TcpListener::bind("127.0.0.1:0").await.unwrap(), None, Some(2));
    let (_f, _server, client) = proxy_to(&upstream.url("http"), "").await;
    let calls: Vec<_> = (0..30)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move { call(&mut client, &format!("/few/{i}"), "x").await.0 })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1, "queued on the one connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_through_an_http2_upstream() {
    let upstream = H2Upstream::start(None).await;
    let (_f, _server, mut client) = proxy_to(&upstream.url("http"), "").await;
    // 16 MiB up, echoed down: far past every flow-control window on both connections.
    let body = Bytes::from(vec![b'z'; 16 << 20]);
    let request =
        Request::builder().method("POST").uri("https://app.example.test/large").body(Full::new(body.clone())).unwrap();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let echoed = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(echoed.len(), 6 + body.len());
    assert_eq!(upstream.last().body.len(), body.len());
}
