//! HTTP through the proxy with real clients and a real upstream: forwarding, headers, routes and every error
//! status.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;

async fn h1_get(
    f: &Fixture,
    addr: std::net::SocketAddr,
    sni: &str,
    request: Request<Full<Bytes>>,
) -> (StatusCode, String) {
    let tls = connect(addr, sni, f.client(&[b"http/1.1"])).await.unwrap();
    let mut sender = http1(tls).await;
    text(sender.send_request(request).await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_requests_reach_the_upstream_with_hop_by_hop_headers_removed_and_forwarding_headers_set() {
    let f = Fixture::new();
    f.serve("c-app", &["app.example.test"]);
    let upstream = Upstream::start().await;
    let server = f.start(&format!("[[route]]\nupstream = \"{}\"\n", upstream.url())).await;

    let request = Request::builder()
        .method("POST")
        .uri("/api/items?q=1")
        .header("host", "app.example.test:8443")
        .header("connection", "keep-alive, x-hop-secret")
        .header("x-hop-secret", "must not pass")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("x-forwarded-for", "203.0.113.66")
        .header("forwarded", "for=203.0.113.66")
        .header("x-end-to-end", "kept")
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap();
    let (status, body) = h1_get(&f, server.tls_addrs[0], "app.example.test", request).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "upstream: /api/items?q=1"));

    let seen = upstream.last();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.uri, "/api/items?q=1");
    assert_eq!(seen.body_len, 7);
    assert_eq!(seen.headers["host"], "app.example.test:8443", "the client's Host is preserved");
    for gone in ["x-hop-secret", "keep-alive", "te", "proxy-authorization", "upgrade", "transfer-encoding"] {
        assert!(!seen.headers.contains_key(gone), "{gone} must not reach the upstream: {:?}", seen.headers);
    }
    assert_ne!(seen.headers.get("connection").map(|v| v.as_bytes()), Some(&b"keep-alive, x-hop-secret"[..]));
    assert_eq!(seen.headers["x-end-to-end"], "kept");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1", "a client's own X-Forwarded-For is not trusted");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["x-forwarded-host"], "app.example.test:8443");
    assert_eq!(seen.headers["forwarded"], "for=127.0.0.1;host=\"app.example.test:8443\";proto=https");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_are_forwarded_as_http1_with_cookies_joined() {
    let f = Fixture::new();
    f.serve("c-app", &["app.example.test"]);
    let upstream = Upstream::start().await;
    let server = f.start(&format!("[[route]]\nupstream = \"{}\"\n", upstream.url())).await;

    let tls = connect(server.tls_addrs[0], "app.example.test", f.client(&[b"h2"])).await.unwrap();
    let mut h2 = http2(tls).await;
    let mut request = get_h2("app.example.test", "/h2?x=y");
    request.headers_mut().append("cookie", "a=1".parse().unwrap());
    request.headers_mut().append("cookie", "b=2".parse().unwrap());
    let (status, body) = text(h2.send_request(request).await.unwrap()).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "upstream: /h2?x=y"));
    let seen = upstream.last();
    assert_eq!(seen.version, http::Version::HTTP_11);
    assert_eq!(seen.headers["host"], "app.example.test");
    assert_eq!(seen.headers.get_all("cookie").iter().collect::<Vec<_>>(), ["a=1; b=2"]);
    assert_eq!(seen.headers["x-forwarded-host"], "app.example.test");

    // Many concurrent streams on one connection.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut h2 = h2.clone();
        tasks.push(tokio::spawn(async move {
            text(h2.send_request(get_h2("app.example.test", &format!("/s{i}"))).await.unwrap()).await
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap(), (StatusCode::OK, format!("upstream: /s{i}")));
    }
}

/// A connection's HTTP/2 streams run in the connection's task (`sealgate::h2streams`): a stream waiting on its
/// upstream must not hold up the others. The upstream here answers `/slow` only once `/fast`, sent after it on
/// the same connection, has been answered; a connection that ran its streams one after the other would never
/// answer either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_waiting_on_its_upstream_does_not_hold_up_the_others() {
    let f = Fixture::new();
    f.serve("c-app", &["app.example.test"]);
    let fast_answered = Arc::new(tokio::sync::Notify::new());
    let released = Arc::clone(&fast_answered);
    let upstream = Upstream::start_async(move |recorded| {
        let released = Arc::clone(&released);
        async move {
            if recorded.uri.path() == "/slow" {
                released.notified().await;
            }
            Some(http::Response::new(Full::new(Bytes::new())))
        }
    })
    .await;
    let server = f.start(&format!("[[route]]\nupstream = \"{}\"\n", upstream.url())).await;
    let tls = connect(server.tls_addrs[0], "app.example.test", f.client(&[b"h2"])).await.unwrap();
    let h2 = http2(tls).await;

    let mut slow_sender = h2.clone();
    let slow = tokio::spawn(async move {
        text(slow_sender.send_request(get_h2("app.example.test", "/slow")).await.unwrap()).await
    });
    assert!(wait_until(Duration::from_secs(10), || upstream.count() == 1).await, "/slow reached the upstream");
    let mut fast_sender = h2.clone();
    let fast = tokio::time::timeout(Duration::from_secs(10), async move {
        text(fast_sender.send_request(get_h2("app.example.test", "/fast")).await.unwrap()).await
    })
    .await
    .expect("/fast answered while /slow waits on the same connection");
    assert_eq!(fast, (StatusCode::OK, "upstream: /fast".to_owned()));
    fast_answered.notify_one();
    let slow = tokio::time::timeout(Duration::from_secs(10), slow).await.expect("/slow answered").unwrap();
    assert_eq!(slow, (StatusCode::OK, "upstream: /slow".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_response_hop_by_hop_headers_are_removed() {
    let f = Fixture::new();
    f.serve("c-app", &["app.example.test"]);
    let upstream = Upstream::start_with(|_| {
        http::Response::builder()
            .header("connection", "x-upstream-hop")
            .header("x-upstream-hop", "secret")
            .header("keep-alive", "timeout=1")
            .header("x-upstream-kept", "yes")
            .body(Full::new(Bytes::from_static(b"ok")))
            .unwrap()
    })
    .await;
    let server = f.start(&format!("[[route]]\nupstream = \"{}\"\n", upstream.url())).await;
    for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
        let tls = connect(server.tls_addrs[0], "app.example.test", f.client(&[alpn])).await.unwrap();
        let response = if alpn == b"h2" {
            http2(tls).await.send_request(get_h2("app.example.test", "/")).await.unwrap()
        } else {
            http1(tls).await.send_request(get("app.example.test", "/")).await.unwrap()
        };
        assert_eq!(response.status(), StatusCode::OK);
        assert!(!response.headers().contains_key("x-upstream-hop"), "{:?}", response.headers());
        assert!(!response.headers().contains_key("keep-alive"));
        assert_eq!(response.headers()["x-upstream-kept"], "yes");
    }
}

/// A response's head and its body as text.
async fn text_with_head(response: http::Response<hyper::body::Incoming>) -> (http::Response<()>, String) {
    let (head, body) = response.into_parts();
    let body = http_body_util::BodyExt::collect(body).await.unwrap().to_bytes();
    (http::Response::from_parts(head, ()), String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_rewrite_the_path_prefix_and_set_and_remove_headers_both_ways() {
    let f = Fixture::new();
    f.serve("c-app", &["app.example.test"]);
    let upstream = Upstream::start_with(|_| {
        http::Response::builder()
            .header("x-powered-by", "framework/1.2")
            .header("x-frame-options", "ALLOWALL")
            .header("server", "app/1")
            .header("x-upstream-debug", "trace=1")
            .body(Full::new(Bytes::new()))
            .unwrap()
    })
    .await;
    let routes = format!(
        r#"
[response_headers]
X-Frame-Options = "DENY"
X-Content-Type-Options = "nosniff"
X-Upstream-Debug = ""

[[route]]
path = "/api/"
upstream = "{}"
prefix_rewrite = "/"
request_headers = {{ X-Api-Version = "2", Cookie = "" }}
response_headers = {{ X-Powered-By = "", X-Frame-Options = "SAMEORIGIN" }}

[[route]]
path = "/old"
respond = {{ status = 308 }}
response_headers = {{ Location = "https://app.example.test/new" }}
"#,
        upstream.url()
    );
    let server = f.start(&routes).await;
    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        let tls = connect(server.tls_addrs[0], "app.example.test", f.client(&[alpn])).await.unwrap();
        let request = |path: &str| {
            let mut request =
                if alpn == b"h2" { get_h2("app.example.test", path) } else { get("app.example.test", path) };
            request.headers_mut().insert("cookie", http::HeaderValue::from_static("session=secret"));
            request.headers_mut().insert("x-api-version", http::HeaderValue::from_static("1"));
            request
        };
        // The heads of three answers on one connection (each body read before the next request is sent).
        let mut responses: Vec<http::Response<()>> = Vec::new();
        if alpn == b"h2" {
            let mut sender = http2(tls).await;
            for path in ["/api/users?id=7", "/old", "/elsewhere"] {
                let (head, _) = text_with_head(sender.send_request(request(path)).await.unwrap()).await;
                responses.push(head);
            }
        } else {
            let mut sender = http1(tls).await;
            for path in ["/api/users?id=7", "/old", "/elsewhere"] {
                // The connection may still be finishing the previous exchange.
                sender.ready().await.unwrap();
                let (head, _) = text_with_head(sender.send_request(request(path)).await.unwrap()).await;
                responses.push(head);
            }
        }
        let [proxied, redirect, unrouted] = &responses[..] else { panic!("three responses") };

        let seen = upstream.last();
        assert_eq!(seen.uri, "/users?id=7", "{alpn:?}: the route's prefix is replaced, the query kept");
        assert_eq!(seen.headers["x-api-version"], "2", "{alpn:?}: set, replacing the client's");
        assert!(!seen.headers.contains_key("cookie"), "{alpn:?}: removed: {:?}", seen.headers);
        assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1", "sealgate's own headers are still set");

        assert_eq!(proxied.status(), StatusCode::OK);
        let headers = proxied.headers();
        assert!(!headers.contains_key("x-powered-by"), "{alpn:?}: removed by the route: {headers:?}");
        assert_eq!(headers["x-frame-options"], "SAMEORIGIN", "the route's value beats the top-level one");
        assert_eq!(headers["x-content-type-options"], "nosniff", "the top-level ones still apply");
        assert!(!headers.contains_key("x-upstream-debug"), "{alpn:?}: removed by the top-level rule: {headers:?}");
        assert_eq!(headers["server"], "app/1", "what no rule names passes");

        assert_eq!(redirect.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(redirect.headers()["location"], "https://app.example.test/new");
        assert_eq!(redirect.headers()["x-frame-options"], "DENY");

        assert_eq!(unrouted.status(), StatusCode::NOT_FOUND);
        assert_eq!(unrouted.headers()["x-frame-options"], "DENY", "answers without a route get the top-level ones");
        assert!(!unrouted.headers().contains_key("location"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_routes_answer_with_the_location_their_variables_make() {
    let f = Fixture::new();
    f.serve("c-shop", &["shop.example.test", "old.example.test"]);
    let routes = r#"
[[route]]
host = "old.example.test"
redirect = { to = "https://shop.example.test$request_uri", status = 301 }

[[route]]
path = "/blog/"
redirect = { to = "https://blog.$host/" }
"#;
    let server = f.start(routes).await;
    let cases = [
        ("old.example.test", "/cart?id=7", 301, "https://shop.example.test/cart?id=7"),
        ("Shop.Example.Test:8443", "/blog/post-1", 308, "https://blog.shop.example.test/"),
    ];
    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        for (host, path, status, location) in cases {
            let sni = host.split(':').next().unwrap().to_ascii_lowercase();
            let tls = connect(server.tls_addrs[0], &sni, f.client(&[alpn])).await.unwrap();
            let response = if alpn == b"h2" {
                let request = http::Request::builder()
                    .uri(format!("https://{host}{path}"))
                    .version(http::Version::HTTP_2)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                http2(tls).await.send_request(request).await.unwrap()
            } else {
                http1(tls).await.send_request(get(host, path)).await.unwrap()
            };
            assert_eq!(response.status().as_u16(), status, "{alpn:?} {host}{path}");
            assert_eq!(response.headers()["location"], location, "{alpn:?} {host}{path}");
            let (head, body) = text_with_head(response).await;
            assert_eq!(body, "", "no body echoes the request");
            assert_eq!(head.headers().get("content-length").map(|v| v.as_bytes()), Some(&b"0"[..]));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_choose_by_host_and_longest_prefix_and_round_robin_upstreams() {
    let f = Fixture::new();
    f.serve("c-wild", &["*.example.test"]);
    let api_a = Upstream::start().await;
    let api_b = Upstream::start().await;
    let routes = format!(
        "[[route]]\nrespond = {{ status = 200, body = \"catch-all\" }}\n\
         [[route]]\nhost = \"api.example.test\"\npath = \"/v1\"\nupstream = [\"{}\", \"{}\"]\n\
         [[route]]\nhost = \"www.example.test\"\nrespond = {{ status = 201, body = \"www\" }}\n",
        api_a.url(),
        api_b.url()
    );
    let server = f.start(&routes).await;
    let addr = server.tls_addrs[0];
    assert_eq!(
        h1_get(&f, addr, "www.example.test", get("www.example.test", "/")).await,
        (StatusCode::CREATED, "www".into())
    );
    assert_eq!(h1_get(&f, addr, "api.example.test", get("api.example.test", "/v2")).await.1, "catch-all");
    for _ in 0..4 {
        let (status, _) = h1_get(&f, addr, "api.example.test", get("api.example.test", "/v1/x")).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(api_a.recorded.lock().unwrap().len(), 2, "round robin");
    assert_eq!(api_b.recorded.lock().unwrap().len(), 2, "round robin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_the_certificate_does_not_serve_gets_421() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    f.serve("c-b", &["b.example.test"]);
    let server = f.start(HELLO).await;
    let addr = server.tls_addrs[0];
    // HTTP/1.1: a Host the connection's certificate does not cover.
    let (status, body) = h1_get(&f, addr, "a.example.test", get("b.example.test", "/")).await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
    assert!(body.len() < 200 && body.contains("misdirected"), "{body}");
    // HTTP/2: an :authority the certificate does not cover.
    let tls = connect(addr, "a.example.test", f.client(&[b"h2"])).await.unwrap();
    let mut h2 = http2(tls).await;
    let response = h2.send_request(get_h2("b.example.test", "/")).await.unwrap();
    assert_eq!(response.status(), StatusCode::MISDIRECTED_REQUEST);
    // The connection's own name still works on the same connection.
    let response = h2.send_request(get_h2("a.example.test", "/")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // A name no certificate serves at all.
    let (status, _) = h1_get(&f, addr, "a.example.test", get("nobody.test", "/")).await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_404_an_unreachable_upstream_502_and_a_slow_one_504() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    // A port with nothing listening: bind, learn the port, close.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    // An upstream that accepts but never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            held.push(tcp);
        }
    });
    let routes = format!(
        "[[route]]\npath = \"/down\"\nupstream = \"http://{closed}\"\n\
         [[route]]\npath = \"/slow\"\nupstream = \"http://{silent_addr}\"\ntimeout = \"300ms\"\n"
    );
    let server = f.start(&routes).await;
    let addr = server.tls_addrs[0];
    for (path, expected) in [
        ("/nothing", StatusCode::NOT_FOUND),
        ("/down", StatusCode::BAD_GATEWAY),
        ("/slow", StatusCode::GATEWAY_TIMEOUT),
    ] {
        for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
            let tls = connect(addr, "a.example.test", f.client(&[alpn])).await.unwrap();
            let response = if alpn == b"h2" {
                http2(tls).await.send_request(get_h2("a.example.test", path)).await.unwrap()
            } else {
                http1(tls).await.send_request(get("a.example.test", path)).await.unwrap()
            };
            let (status, body) = text(response).await;
            assert_eq!(status, expected, "{path} over {}", String::from_utf8_lossy(alpn));
            assert!(!body.is_empty() && body.len() < 100, "a short body: {body:?}");
        }
    }
    // The server is still healthy after all of that.
    let (status, _) = h1_get(&f, addr, "a.example.test", get("a.example.test", "/nothing")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoint_reports_health_readiness_and_metrics() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    let server = f.start(HELLO).await;
    let admin = server.admin_addr.unwrap();
    let get_admin = |path: &'static str| async move {
        let tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(conn);
        let request = Request::builder().uri(path).header("host", "admin").body(Full::new(Bytes::new())).unwrap();
        text(sender.send_request(request).await.unwrap()).await
    };
    assert_eq!(get_admin("/healthz").await.0, StatusCode::OK);
    assert_eq!(get_admin("/readyz").await.0, StatusCode::OK);
    let (status, metrics) = get_admin("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(metrics.contains("sealgate_certificates_served 1"), "{metrics}");
    assert!(metrics.contains("sealgate_certificate_expiry_seconds{certificate_id=\"c-a\"}"), "{metrics}");

    // An export with nothing servable: not ready, still healthy.
    let empty = Fixture::new();
    std::fs::write(empty.export.join("associations.toml"), "format = \"custody-associations/v1\"\n").unwrap();
    let server = empty.start(HELLO).await;
    let admin = server.admin_addr.unwrap();
    let tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let readyz = Request::builder().uri("/readyz").header("host", "a").body(Full::new(Bytes::new())).unwrap();
    assert_eq!(text(sender.send_request(readyz).await.unwrap()).await.0, StatusCode::SERVICE_UNAVAILABLE);
    // The connection may still be finishing the previous exchange.
    sender.ready().await.unwrap();
    let healthz = Request::builder().uri("/healthz").header("host", "a").body(Full::new(Bytes::new())).unwrap();
    assert_eq!(sender.send_request(healthz).await.unwrap().status(), StatusCode::OK);
}
