//! What users of nginx, HAProxy and Envoy take for granted at the edge: plain HTTP redirected to https, HSTS,
//! and an access log line per request.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::Full;

async fn plain_get(
    addr: std::net::SocketAddr,
    host: Option<&str>,
    path: &str,
) -> http::Response<hyper::body::Incoming> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let mut request = http::Request::builder().uri(path);
    if let Some(host) = host {
        request = request.header("host", host);
    }
    sender.send_request(request.body(Full::new(Bytes::new())).unwrap()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_redirected_to_https_with_308() {
    let f = Fixture::new();
    f.serve("c-a", &["app.example.test"]);
    let log_path = f.dir.path().join("access.log");
    let redirects = format!(
        "[[redirect]]\nbind = \"127.0.0.1:0\"\n\n[[redirect]]\nbind = \"127.0.0.1:0\"\nhttps_port = 8443\n\n\
         [access_log]\npath = {:?}\n\n[admin]",
        log_path.display().to_string()
    );
    let server = start_server(f.dir.path(), &f.config(HELLO).replace("[admin]", &redirects)).await;
    let (standard, custom) = (server.redirect_addrs[0], server.redirect_addrs[1]);

    let response = plain_get(standard, Some("App.Example.Test:80"), "/a/b?q=1").await;
    assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(response.headers()["location"], "https://app.example.test/a/b?q=1");
    let response = plain_get(custom, Some("app.example.test"), "/").await;
    assert_eq!(response.headers()["location"], "https://app.example.test:8443/");
    assert_eq!(plain_get(standard, None, "/").await.status(), StatusCode::BAD_REQUEST);
    assert_eq!(plain_get(standard, Some("bad host!"), "/").await.status(), StatusCode::BAD_REQUEST);

    // Each got its access-log line, as requests over TLS do.
    let lines = || std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(wait_until(Duration::from_secs(5), || lines().lines().count() == 4).await, "{}", lines());
    let text = lines();
    let first = text.lines().next().unwrap();
    assert!(first.contains("\"GET /a/b HTTP/1.1\" 308 ") && first.contains("tls=-"), "{first}");
    assert!(!first.contains("q=1"), "no query string: {first}");
    assert_eq!(text.lines().filter(|l| l.contains(" 400 ")).count(), 2, "{text}");
}

/// Whether the server closes `tcp` within `wait` (EOF or a reset).
async fn closed_within(tcp: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(wait, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_connections_count_under_max_connections_and_must_send_a_head_in_header_read() {
    let f = Fixture::new();
    f.serve("c-a", &["app.example.test"]);
    let extra = "[[redirect]]\nbind = \"127.0.0.1:0\"\n\n[limits]\nmax_connections = 2\n\n\
                 [timeouts]\nheader_read = \"400ms\"\n\n[admin]";
    let server = start_server(f.dir.path(), &f.config(HELLO).replace("[admin]", extra)).await;
    let redirect = server.redirect_addrs[0];
    let tls = server.tls_addrs[0];

    // Two plain connections that send nothing take both places: HTTPS is refused meanwhile.
    let mut first = tokio::net::TcpStream::connect(redirect).await.unwrap();
    let mut second = tokio::net::TcpStream::connect(redirect).await.unwrap();
    let admin = server.admin_addr.unwrap();
    let refused = "sealgate_connections_refused_total{reason=\"MaxConnections\"}";
    let mut third = tokio::net::TcpStream::connect(redirect).await.unwrap();
    assert!(closed_within(&mut third, Duration::from_secs(5)).await, "a third plain connection is refused");
    assert!(connect(tls, "app.example.test", f.client(&[])).await.is_err(), "the places are taken");
    assert!(common::raw::metric(admin, refused).await >= 2.0);

    // Silent connections are closed at `timeouts.header_read`, which frees their places.
    let start = std::time::Instant::now();
    assert!(closed_within(&mut first, Duration::from_secs(5)).await, "a silent plain connection stays open");
    assert!(closed_within(&mut second, Duration::from_secs(5)).await);
    assert!(start.elapsed() >= Duration::from_millis(300), "closed after {:?}", start.elapsed());
    let client = f.client(&[]);
    assert!(
        eventually(Duration::from_secs(5), || {
            let client = client.clone();
            async move { connect(tls, "app.example.test", client).await.is_ok() }
        })
        .await,
        "HTTPS is served again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsts_and_configured_headers_are_sent_on_every_response() {
    let f = Fixture::new();
    f.serve("c-a", &["app.example.test"]);
    let hsts = "[hsts]\nmax_age = \"365days\"\ninclude_subdomains = true\n\n\
                [response_headers]\nX-Content-Type-Options = \"nosniff\"\nX-Frame-Options = \"DENY\"\n\n[admin]";
    let routes = "[[route]]\npath = \"/ok\"\nrespond = { status = 200 }\n";
    let server = start_server(f.dir.path(), &f.config(routes).replace("[admin]", hsts)).await;
    let tls = connect(server.tls_addrs[0], "app.example.test", f.client(&[b"h2"])).await.unwrap();
    let mut h2 = http2(tls).await;
    for (host, path, status) in [
        ("app.example.test", "/ok", StatusCode::OK),
        ("app.example.test", "/missing", StatusCode::NOT_FOUND),
        ("other.example.test", "/ok", StatusCode::MISDIRECTED_REQUEST),
    ] {
        let response = h2.send_request(get_h2(host, path)).await.unwrap();
        assert_eq!(response.status(), status);
        assert_eq!(response.headers()["strict-transport-security"], "max-age=31536000; includeSubDomains");
        assert_eq!(response.headers()["x-content-type-options"], "nosniff");
        assert_eq!(response.headers()["x-frame-options"], "DENY");
    }

    let plain = Fixture::new();
    plain.serve("c-a", &["app.example.test"]);
    let server = plain.start(HELLO).await;
    let tls = connect(server.tls_addrs[0], "app.example.test", plain.client(&[])).await.unwrap();
    let response = http1(tls).await.send_request(get("app.example.test", "/")).await.unwrap();
    assert!(!response.headers().contains_key("strict-transport-security"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_one_line_per_request_and_no_secret() {
    for format in ["text", "json"] {
        let f = Fixture::new();
        f.serve("c-a", &["app.example.test"]);
        let upstream = Upstream::start().await;
        let log_path = f.dir.path().join("access.log");
        let section =
            format!("[access_log]\npath = {:?}\nformat = \"{format}\"\n\n[admin]", log_path.display().to_string());
        let routes = format!("[[route]]\npath = \"/api\"\nupstream = \"{}\"\n{HELLO}", upstream.url());
        let server = start_server(f.dir.path(), &f.config(&routes).replace("[admin]", &section)).await;
        let addr = server.tls_addrs[0];

        let tls = connect(addr, "app.example.test", f.client(&[b"http/1.1"])).await.unwrap();
        let mut h1 = http1(tls).await;
        let mut request = get("app.example.test", "/api/items?token=s3cr3t-query");
        request.headers_mut().insert("authorization", "Bearer s3cr3t-header".parse().unwrap());
        let (status, body) = text(h1.send_request(request).await.unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        let tls = connect(addr, "app.example.test", f.client(&[b"h2"])).await.unwrap();
        let (status, _) = text(http2(tls).await.send_request(get_h2("app.example.test", "/")).await.unwrap()).await;
        assert_eq!(status, StatusCode::OK);

        // A request hyper refuses before it becomes one (obs-fold: 400, closed) gets its line too.
        let mut tls = connect(addr, "app.example.test", f.client(&[b"http/1.1"])).await.unwrap();
        let folded = b"GET /folded HTTP/1.1\r\nHost: app.example.test\r\nX-A: 1\r\n 2\r\n\r\n";
        let reply = common::raw::exchange(&mut tls, folded, Duration::from_secs(5)).await;
        assert_eq!(reply.status(), Some(400), "{reply:?}");

        let lines = || std::fs::read_to_string(&log_path).unwrap_or_default();
        assert!(wait_until(Duration::from_secs(5), || lines().lines().count() == 3).await, "{format}: {}", lines());
        let refused = lines().lines().nth(2).unwrap().to_owned();
        assert!(refused.contains("\"- - HTTP/1.1\" 400 ") || refused.contains("\"status\":400"), "{format}: {refused}");
        assert!(refused.contains("127.0.0.1:") && refused.contains("TLSv1_3"), "{format}: {refused}");
        let text = lines();
        assert!(!text.contains("s3cr3t"), "{format}: no query string, no header value: {text}");
        let (first, second) = (text.lines().next().unwrap(), text.lines().nth(1).unwrap());
        for needed in [
            "127.0.0.1:",
            "app.example.test",
            "GET",
            "/api/items",
            "200",
            &upstream.addr.to_string(),
            "TLSv1_3",
            "TLS13_",
        ] {
            assert!(first.contains(needed), "{format}: {needed} missing from {first}");
        }
        assert!(first.contains(&body.len().to_string()), "{format}: bytes sent: {first}");
        assert!(
            second.contains("HTTP/2.0") && second.contains(" 200 ") || second.contains("\"status\":200"),
            "{second}"
        );
        if format == "json" {
            let value: serde_json::Value = serde_json::from_str(first).unwrap();
            assert_eq!(value["path"], "/api/items");
            assert_eq!(value["bytes"], body.len());
            assert_eq!(value["sni"], "app.example.test");
        }
    }
}

/// Sends `request` once the connection is ready; returns the response's status and its `retry-after` and
/// `connection` headers (`-` when absent), having read its body.
async fn exchange(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    request: http::Request<Full<Bytes>>,
) -> http::Response<()> {
    sender.ready().await.unwrap();
    let response = sender.send_request(request).await.unwrap();
    let header = |name: &str| response.headers().get(name).cloned().unwrap_or(http::HeaderValue::from_static("-"));
    let head = http::Response::builder()
        .status(response.status())
        .header("retry-after", header("retry-after"))
        .header("connection", header("connection"))
        .body(())
        .unwrap();
    text(response).await;
    head
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_rate_limit_answers_429_to_a_client_over_it_before_the_upstream_sees_the_request() {
    let f = Fixture::new();
    f.serve("c-a", &["app.example.test"]);
    let upstream = Upstream::start().await;
    let routes = format!(
        "[[route]]\npath = \"/limited\"\nupstream = \"{}\"\nrate_limit = {{ rate = \"1/m\", burst = 3 }}\n{HELLO}",
        upstream.url()
    );
    let server = f.start(&routes).await;
    let tls = connect(server.tls_addrs[0], "app.example.test", f.client(&[b"http/1.1"])).await.unwrap();
    let mut sender = http1(tls).await;
    // The burst: three at once; the fourth is refused with the wait until the next one is allowed.
    for i in 0..3 {
        assert_eq!(
            exchange(&mut sender, get("app.example.test", &format!("/limited/{i}"))).await.status(),
            StatusCode::OK
        );
    }
    let refused = exchange(&mut sender, get("app.example.test", "/limited/3")).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((55..=60).contains(&wait), "one request a minute: {wait} s to wait");
    assert_eq!(refused.headers()["connection"], "-", "a bodiless request keeps its connection");
    // Other routes are not limited, on the same connection.
    assert_eq!(exchange(&mut sender, get("app.example.test", "/")).await.status(), StatusCode::OK);
    // A refused request with a body closes the HTTP/1 connection: its body is not read as a request.
    let post = http::Request::post("/limited/post")
        .header("host", "app.example.test")
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap();
    let refused = exchange(&mut sender, post).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers()["connection"], "close");

    // The limit is the client's, whatever the connection or protocol.
    let tls = connect(server.tls_addrs[0], "app.example.test", f.client(&[b"h2"])).await.unwrap();
    let response = http2(tls).await.send_request(get_h2("app.example.test", "/limited/h2")).await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);

    assert_eq!(upstream.count(), 3, "refused requests never reach the upstream");
    let admin = server.admin_addr.unwrap();
    let (_, metrics) = admin_get(admin, "/metrics").await;
    assert!(metrics.contains("sealgate_requests_refused_total{reason=\"RateLimited\"} 3"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_follow_a_request_upstream_back_to_the_client_and_into_the_access_log() {
    let f = Fixture::new();
    f.serve("c-a", &["app.example.test"]);
    let upstream = Upstream::start().await;
    let log_path = f.dir.path().join("access.log");
    let section = format!("[proxy]\nrequest_id = true\n\n[access_log]\npath = {log_path:?}\n\n[admin]");
    let routes = format!("[[route]]\nupstream = \"{}\"\n", upstream.url());
    let server = start_server(f.dir.path(), &f.config(&routes).replace("[admin]", &section)).await;
    let tls = connect(server.tls_addrs[0], "app.example.test", f.client(&[b"h2"])).await.unwrap();
    let mut h2 = http2(tls).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let mut request = get_h2("app.example.test", "/traced");
        request.headers_mut().insert("x-request-id", "chosen-by-the-client".parse().unwrap());
        let response = h2.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert_eq!(upstream.last().headers["x-request-id"], id.as_str(), "the upstream saw the id the client got");
        assert_eq!(upstream.last().headers.get_all("x-request-id").iter().count(), 1);
        assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);
    let logged = || std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(wait_until(Duration::from_secs(5), || logged().lines().count() == 2).await, "{}", logged());
    for (line, id) in logged().lines().zip(&ids) {
        assert!(line.ends_with(&format!(" id={id}")), "{line}");
    }
}
