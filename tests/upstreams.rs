//! Several upstreams per route, through the real server with real upstreams: least-requests balancing, passive
//! ejection and readmission, active health checks (and their lifetime), retries (and when there are none), and
//! HTTPS upstreams verified against the route's CA.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use sealgate::server::RunningServer;

const HOST: &str = "app.example.test";
/// Deadline for anything the tests wait for; generous for a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(10);

fn fixture() -> Fixture {
    let f = Fixture::new();
    f.serve("c-app", &[HOST]);
    f
}

/// A `[[route]]` for `path` to `upstreams`, with `extra` keys.
fn route(path: &str, upstreams: &[String], extra: &str) -> String {
    let list = upstreams.iter().map(|u| format!("{u:?}")).collect::<Vec<_>>().join(", ");
    format!("[[route]]\npath = {path:?}\nupstream = [{list}]\n{extra}\n")
}

/// An HTTP/1.1 connection to the server.
async fn connection(f: &Fixture, server: &RunningServer) -> SendRequest<Full<Bytes>> {
    http1(connect(server.tls_addrs[0], HOST, f.client(&[b"http/1.1"])).await.unwrap()).await
}

/// Sends `method path` with `body`; panics if no answer comes within [`DEADLINE`].
async fn send(sender: &mut SendRequest<Full<Bytes>>, method: &str, path: &str, body: &str) -> (StatusCode, String) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", HOST)
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let exchange = async {
        sender.ready().await.unwrap();
        text(sender.send_request(request).await.unwrap()).await
    };
    tokio::time::timeout(DEADLINE, exchange).await.unwrap_or_else(|_| panic!("no answer to {method} {path}"))
}

/// A loopback port with nothing listening (connections are refused).
fn closed_port() -> String {
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    format!("http://{addr}")
}

/// The value of the sample `name{labels}` on the admin endpoint.
async fn metric(admin: SocketAddr, name: &str, labels: &str) -> Option<f64> {
    let (_, text) = admin_get(admin, "/metrics").await;
    let prefix = format!("{name}{{{labels}}} ");
    text.lines().find_map(|line| line.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

async fn healthy(admin: SocketAddr, route: usize, upstream: &str) -> Option<f64> {
    metric(admin, "sealgate_upstream_healthy", &format!("route=\"{route}\",upstream=\"{upstream}\"")).await
}

async fn attempts(admin: SocketAddr, route: usize, upstream: &str, result: &str) -> Option<f64> {
    let labels = format!("route=\"{route}\",upstream=\"{upstream}\",result=\"{result}\"");
    metric(admin, "sealgate_upstream_requests_total", &labels).await
}

/// An upstream that answers every request `503 Service Unavailable`: up, but failing.
async fn answering_503() -> Upstream {
    Upstream::start_with(|_| {
        let mut response = Response::new(Full::new(Bytes::from_static(b"unavailable")));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        response
    })
    .await
}

fn ok() -> Reply {
    Some(Response::new(Full::new(Bytes::new())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_requests_sends_to_the_idle_upstream_while_the_other_is_busy() {
    let f = fixture();
    let (release, released) = tokio::sync::watch::channel(false);
    let slow = Upstream::start_async(move |_| {
        let mut released = released.clone();
        async move {
            let _ = released.wait_for(|r| *r).await;
            ok()
        }
    })
    .await;
    let fast = Upstream::start().await;
    let routes = route("/", &[slow.url(), fast.url()], "balance = \"least_requests\"\nretries = 0");
    let server = f.start(&routes).await;

    // The first request goes to the first upstream (all idle: the turn starts there) and stays in flight.
    let mut held = connection(&f, &server).await;
    let held = tokio::spawn(async move { send(&mut held, "GET", "/held", "").await });
    assert!(wait_until(DEADLINE, || slow.count() == 1).await, "the first request reaches the slow upstream");

    // Round robin would send every other request to the busy upstream, where it would hang.
    let mut c = connection(&f, &server).await;
    for i in 0..10 {
        assert_eq!(send(&mut c, "GET", &format!("/r{i}"), "").await.0, StatusCode::OK);
    }
    assert_eq!((slow.count(), fast.count()), (1, 10));

    release.send(true).unwrap();
    assert_eq!(held.await.unwrap(), (StatusCode::OK, "upstream: /held".to_owned()));
    // Idle again: ties take turns, so both get traffic.
    for i in 0..4 {
        assert_eq!(send(&mut c, "GET", &format!("/s{i}"), "").await.0, StatusCode::OK);
    }
    assert!(slow.count() >= 2 && fast.count() >= 11, "{} {}", slow.count(), fast.count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_is_retried_elsewhere_after_a_connect_failure_and_the_dead_upstream_is_ejected() {
    let f = fixture();
    let dead = closed_port();
    let good = Upstream::start().await;
    // Retries are on by default (1).
    let extra = "outlier = { consecutive_failures = 1, base_ejection_time = \"1m\" }";
    let server = f.start(&route("/", &[dead.clone(), good.url()], extra)).await;
    let admin = server.admin_addr.unwrap();

    let mut c = connection(&f, &server).await;
    for i in 0..10 {
        let (status, body) = send(&mut c, "GET", &format!("/r{i}"), "").await;
        assert_eq!((status, body), (StatusCode::OK, format!("upstream: /r{i}")), "no client sees the dead upstream");
    }
    assert_eq!(good.count(), 10);
    // One attempt reached the dead upstream (the first, retried), then it was ejected.
    assert_eq!(attempts(admin, 0, &dead, "error").await, Some(1.0));
    assert_eq!(attempts(admin, 0, &good.url(), "ok").await, Some(10.0));
    assert_eq!(healthy(admin, 0, &dead).await, Some(0.0));
    assert_eq!(healthy(admin, 0, &good.url()).await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_upstream_is_ejected_and_readmitted_when_its_ejection_ends() {
    let f = fixture();
    // Reads each request, then closes the connection without an answer, until `up`.
    let up = Arc::new(AtomicBool::new(false));
    let flaky = {
        let up = Arc::clone(&up);
        Upstream::start_async(move |_| {
            let up = up.load(Ordering::SeqCst);
            async move { up.then(ok).flatten() }
        })
        .await
    };
    let good = Upstream::start().await;
    let extra = "retries = 0\noutlier = { consecutive_failures = 1, base_ejection_time = \"1500ms\" }";
    let server = f.start(&route("/", &[flaky.url(), good.url()], extra)).await;
    let admin = server.admin_addr.unwrap();

    // Without retries the first request, which the flaky upstream drops, fails; none after it does.
    let mut c = connection(&f, &server).await;
    assert_eq!(send(&mut c, "GET", "/first", "").await.0, StatusCode::BAD_GATEWAY);
    assert_eq!(flaky.count(), 1);
    assert_eq!(healthy(admin, 0, &flaky.url()).await, Some(0.0));
    for i in 0..6 {
        assert_eq!(send(&mut c, "GET", &format!("/r{i}"), "").await.0, StatusCode::OK);
    }
    assert_eq!((flaky.count(), good.count()), (1, 6), "ejected: no traffic");

    // It recovers; when the ejection ends it gets traffic again.
    up.store(true, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while flaky.count() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the upstream is readmitted");
        assert_eq!(send(&mut c, "GET", "/again", "").await.0, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(healthy(admin, 0, &flaky.url()).await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_eject_an_upstream_only_where_consecutive_5xx_is_set() {
    let f = fixture();
    let failing = answering_503().await;
    let good = Upstream::start().await;
    let upstreams = [failing.url(), good.url()];
    let routes = format!(
        "{}{}",
        route("/strict", &upstreams, "outlier = { consecutive_5xx = 2, base_ejection_time = \"1m\" }"),
        route("/", &upstreams, "")
    );
    let server = f.start(&routes).await;
    let admin = server.admin_addr.unwrap();
    let mut c = connection(&f, &server).await;

    // By default a 5xx is an answer: passed to the client, never an ejection (round robin keeps alternating).
    let mut statuses = Vec::new();
    for i in 0..6 {
        statuses.push(send(&mut c, "GET", &format!("/r{i}"), "").await.0.as_u16());
    }
    assert_eq!(statuses.iter().filter(|&&s| s == 503).count(), 3, "{statuses:?}");
    assert_eq!(healthy(admin, 1, &failing.url()).await, Some(1.0));

    // With `consecutive_5xx = 2`, the second 503 in a row from the upstream ejects it: then every request
    // goes to the other one.
    let before = failing.count();
    let mut failed = 0;
    for i in 0..8 {
        if send(&mut c, "GET", &format!("/strict/{i}"), "").await.0 == StatusCode::SERVICE_UNAVAILABLE {
            failed += 1;
        }
    }
    assert_eq!((failed, failing.count() - before), (2, 2), "two 503s, then none");
    assert_eq!(healthy(admin, 0, &failing.url()).await, Some(0.0));
    assert_eq!(healthy(admin, 0, &good.url()).await, Some(1.0));
    assert_eq!(healthy(admin, 1, &failing.url()).await, Some(1.0), "the other route judges on its own");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_sends_a_client_to_one_upstream_and_elsewhere_only_while_that_one_is_down() {
    let f = fixture();
    let mut ups = Vec::new();
    let mut upstreams = Vec::new();
    for _ in 0..3 {
        // Answers while its flag is up; otherwise reads the request and closes the connection.
        let up = Arc::new(AtomicBool::new(true));
        let flag = Arc::clone(&up);
        upstreams.push(
            Upstream::start_async(move |_| {
                let up = flag.load(Ordering::SeqCst);
                async move { up.then(ok).flatten() }
            })
            .await,
        );
        ups.push(up);
    }
    let urls: Vec<String> = upstreams.iter().map(Upstream::url).collect();
    let extra = "balance = \"ip_hash\"\noutlier = { consecutive_failures = 1, base_ejection_time = \"1500ms\" }";
    let server = f.start(&route("/", &urls, extra)).await;
    let counts = || upstreams.iter().map(Upstream::count).collect::<Vec<usize>>();
    let request = |i: usize| {
        let (f, server) = (&f, &server);
        async move {
            // A new connection each time: the client is its address, not its connection.
            let mut c = connection(f, server).await;
            send(&mut c, "GET", &format!("/r{i}"), "").await.0
        }
    };
    for i in 0..6 {
        assert_eq!(request(i).await, StatusCode::OK);
    }
    let first = counts();
    let home = first.iter().position(|&c| c == 6).unwrap_or_else(|| panic!("all six to one upstream: {first:?}"));

    // Its upstream goes down: the failed attempt is retried on one other upstream, where the client then stays.
    ups[home].store(false, Ordering::SeqCst);
    for i in 0..6 {
        assert_eq!(request(i).await, StatusCode::OK);
    }
    let during = counts();
    assert_eq!(during[home], 7, "one attempt failed there, then it was ejected: {during:?}");
    let away: Vec<usize> = (0..3).filter(|&u| u != home && during[u] > 0).collect();
    assert_eq!(away.len(), 1, "one other upstream took the client: {during:?}");
    assert_eq!(during[away[0]], 6);

    // Back up, and readmitted when its ejection ends: the client returns to it.
    ups[home].store(true, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while upstreams[home].count() <= 7 {
        assert!(tokio::time::Instant::now() < deadline, "the client went back to its upstream");
        assert_eq!(request(0).await, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = counts();
    for i in 0..3 {
        assert_eq!(request(i).await, StatusCode::OK);
    }
    assert_eq!(counts()[home], before[home] + 3, "and stays there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_statuses_are_retried_on_another_upstream_for_idempotent_bodiless_requests_only() {
    let f = fixture();
    let unavailable = answering_503().await;
    let good = Upstream::start().await;
    let no_ejection = "retries = 1\nretry_statuses = [502, 503]\noutlier = { consecutive_failures = 0 }";
    let server = f.start(&route("/", &[unavailable.url(), good.url()], no_ejection)).await;
    let mut c = connection(&f, &server).await;

    // GETs that round robin sends to the upstream answering 503 are retried on the other: every one succeeds.
    for i in 0..4 {
        assert_eq!(send(&mut c, "GET", &format!("/g{i}"), "").await, (StatusCode::OK, format!("upstream: /g{i}")));
    }
    assert_eq!(good.count(), 4);
    assert!(unavailable.count() >= 2, "round robin tried it first for some: {}", unavailable.count());
    // A POST, or a request with a body, is not sent twice: a 503 it gets is the client's answer.
    let before = unavailable.count() + good.count();
    let mut statuses = Vec::new();
    for i in 0..4 {
        statuses.push(send(&mut c, "POST", &format!("/p{i}"), "data").await.0.as_u16());
    }
    assert!(statuses.contains(&503) && statuses.contains(&200), "{statuses:?}");
    assert_eq!(unavailable.count() + good.count(), before + 4, "each POST was sent once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_take_an_unhealthy_upstream_out_and_bring_it_back() {
    let f = fixture();
    let passing = Arc::new(AtomicBool::new(true));
    let flipping = {
        let passing = Arc::clone(&passing);
        Upstream::start_async(move |r| {
            let status = if r.uri.path() != "/healthz" || passing.load(Ordering::SeqCst) { 200 } else { 503 };
            async move { Some(Response::builder().status(status).body(Full::new(Bytes::new())).unwrap()) }
        })
        .await
    };
    let steady = Upstream::start().await;
    let extra = "retries = 0\nhealth_check = { path = \"/healthz\", interval = \"50ms\", timeout = \"1s\", \
                 healthy_threshold = 2, unhealthy_threshold = 2 }";
    let server = f.start(&route("/", &[flipping.url(), steady.url()], extra)).await;
    let admin = server.admin_addr.unwrap();
    assert!(wait_until(DEADLINE, || flipping.count_of("GET", "/healthz") >= 1).await, "checks run");
    assert!(wait_until(DEADLINE, || steady.count_of("GET", "/healthz") >= 1).await, "checks run");
    let mut c = connection(&f, &server).await;

    passing.store(false, Ordering::SeqCst);
    assert!(eventually(DEADLINE, || async { healthy(admin, 0, &flipping.url()).await == Some(0.0) }).await);
    for i in 0..6 {
        assert_eq!(send(&mut c, "GET", &format!("/app/{i}"), "").await.0, StatusCode::OK);
    }
    assert_eq!(flipping.count_of("GET", "/app"), 0, "an unhealthy upstream gets no traffic");
    assert_eq!(steady.count_of("GET", "/app"), 6);

    passing.store(true, Ordering::SeqCst);
    assert!(eventually(DEADLINE, || async { healthy(admin, 0, &flipping.url()).await == Some(1.0) }).await);
    for i in 0..4 {
        assert_eq!(send(&mut c, "GET", &format!("/app/again{i}"), "").await.0, StatusCode::OK);
    }
    assert!(flipping.count_of("GET", "/app") >= 1, "healthy again: traffic again");
    let check = flipping.recorded.lock().unwrap().iter().find(|r| r.uri.path() == "/healthz").cloned().unwrap();
    assert_eq!(check.headers["host"], flipping.addr.to_string(), "checks name the upstream itself");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_stop_when_the_proxy_is_dropped() {
    let f = fixture();
    let upstream = Upstream::start().await;
    let text = f.config(&route("/", &[upstream.url()], "health_check = { path = \"/healthz\", interval = \"20ms\" }"));
    let config = sealgate::config::Config::parse(&text, &f.dir.path().join("proxy.toml")).unwrap();
    let policy = sealgate::tls::TlsPolicy::new(&config.tls).unwrap();
    let store = Arc::new(sealgate::tls::CertificateStore::new(policy));
    let metrics = Arc::new(sealgate::metrics::Metrics::new());
    let proxy = sealgate::proxy::Proxy::new(&config, store, metrics, None).unwrap();
    assert!(wait_until(DEADLINE, || upstream.count() >= 3).await, "building the proxy starts the checks");

    drop(proxy);
    // A check already sent may still land; after it, none.
    let settled = upstream.count() + 1;
    assert!(!wait_until(Duration::from_millis(500), || upstream.count() > settled).await, "checks stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_bodiless_idempotent_requests_are_retried_and_a_body_reaches_one_upstream_once() {
    let f = fixture();
    // Reads each request in full, then closes the connection without an answer.
    let dropper = Upstream::start_async(|_| async { None }).await;
    let good = Upstream::start().await;
    let refused = closed_port();
    let no_ejection = "retries = 1\noutlier = { consecutive_failures = 0 }";
    let routes = format!(
        "{}{}",
        route("/drop", &[dropper.url(), good.url()], no_ejection),
        route("/refused", &[refused, good.url()], no_ejection)
    );
    let server = f.start(&routes).await;
    let mut c = connection(&f, &server).await;

    // A GET is retried even after the first upstream read it: it has no body and is idempotent.
    for i in 0..4 {
        assert_eq!(send(&mut c, "GET", &format!("/drop/{i}"), "").await.0, StatusCode::OK);
    }
    assert!(dropper.count_of("GET", "/drop") >= 1, "some GETs went to the dropping upstream first");
    assert_eq!(good.count_of("GET", "/drop"), 4, "and every one of them was answered by the other");

    // A request with a body, or a POST, reaches at most one upstream, once: never retried, even when the
    // connection was refused and nothing was sent.
    for (method, path, body) in [
        ("POST", "/drop", "payload"),
        ("PUT", "/drop", "payload"),
        ("POST", "/refused", "payload"),
        ("PUT", "/refused", "payload"),
        ("POST", "/refused", ""),
    ] {
        let mut failed = 0;
        for _ in 0..4 {
            let received = || dropper.count_of(method, path) + good.count_of(method, path);
            let (before, good_before) = (received(), good.count_of(method, path));
            let (status, _) = send(&mut c, method, path, body).await;
            match status {
                StatusCode::OK => assert_eq!(good.count_of(method, path), good_before + 1),
                StatusCode::BAD_GATEWAY => {
                    failed += 1;
                    assert_eq!(good.count_of(method, path), good_before, "{method} {path} {body:?} was retried");
                }
                other => panic!("{method} {path}: {other}"),
            }
            let expected = if path == "/drop" { 1 } else { usize::from(status == StatusCode::OK) };
            assert_eq!(received(), before + expected, "{method} {path} {body:?}: sent once at most");
        }
        assert!(failed >= 1, "{method} {path} {body:?}: some went to the failing upstream");
    }
    let bodies: Vec<u64> =
        dropper.recorded.lock().unwrap().iter().filter(|r| r.method != "GET").map(|r| r.body_len).collect();
    assert!(bodies.iter().all(|&len| len == 7), "the dropping upstream read whole bodies: {bodies:?}");
}

/// A CA and a certificate for `name` signed by it: (CA PEM, server config).
fn tls_upstream_identity(name: &str) -> (String, Arc<rustls::ServerConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![name.to_owned()]).unwrap().signed_by(&leaf_key, &issuer).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
    (ca_cert.pem(), Arc::new(config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_are_verified_against_the_route_ca_with_the_upstream_host_as_sni() {
    let f = fixture();
    let (ca, tls) = tls_upstream_identity("localhost");
    let (other_ca, _) = tls_upstream_identity("localhost");
    std::fs::write(f.dir.path().join("upstream-ca.pem"), ca).unwrap();
    std::fs::write(f.dir.path().join("other-ca.pem"), other_ca).unwrap();
    let upstream = Upstream::start_tls(tls, |_| async { ok() }).await;
    let url = format!("https://localhost:{}", upstream.addr.port());
    let routes = format!(
        "{}{}",
        route("/good", std::slice::from_ref(&url), "ca = \"upstream-ca.pem\""),
        route("/bad", std::slice::from_ref(&url), "ca = \"other-ca.pem\"\nretries = 0")
    );
    let server = f.start(&routes).await;
    let admin = server.admin_addr.unwrap();
    let mut c = connection(&f, &server).await;

    assert_eq!(send(&mut c, "GET", "/good/x", "").await, (StatusCode::OK, "upstream: /good/x".to_owned()));
    let seen = upstream.last();
    assert_eq!(seen.sni.as_deref(), Some("localhost"), "SNI is the upstream's host");
    assert_eq!(seen.headers["host"], HOST, "Host is still the client's");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(send(&mut c, "POST", "/good/y", "payload").await.0, StatusCode::OK);
    assert_eq!(upstream.last().body_len, 7);

    // A certificate the route's CA did not sign: 502, and nothing reaches the upstream.
    let (status, body) = send(&mut c, "GET", "/bad", "").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(upstream.count(), 2);
    assert_eq!(attempts(admin, 1, &url, "error").await, Some(1.0));
}

/// An https upstream that accepts the TCP connection but never answers the TLS handshake: `connect_timeout`
/// bounds the TCP connection and the handshake together, so the client gets 504 after it, not after the far
/// longer `response_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_tls_handshake_counts_against_connect_timeout() {
    let f = fixture();
    let (ca, _) = tls_upstream_identity("localhost");
    std::fs::write(f.dir.path().join("upstream-ca.pem"), ca).unwrap();
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://localhost:{}", silent.local_addr().unwrap().port());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            held.push(tcp);
        }
    });
    let proxy = "[proxy]\nconnect_timeout = \"300ms\"\nresponse_timeout = \"30s\"\n\n";
    let routes = format!("{proxy}{}", route("/", std::slice::from_ref(&url), "ca = \"upstream-ca.pem\"\nretries = 0"));
    let server = f.start(&routes).await;
    let mut c = connection(&f, &server).await;
    let started = std::time::Instant::now();
    let (status, body) = send(&mut c, "GET", "/x", "").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(started.elapsed() < Duration::from_secs(5), "answered after {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_upstream_ca_stops_the_server_from_starting() {
    let f = fixture();
    let text = f.config("[[route]]\nupstream = \"https://localhost:1\"\nca = \"missing-ca.pem\"\n");
    let path = f.dir.path().join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    let config = sealgate::config::Config::load(&path).unwrap();
    let error = sealgate::server::start(config).await.unwrap_err().to_string();
    assert!(error.contains("route[0]") && error.contains("missing-ca.pem"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_removes_the_series_of_the_upstreams_it_removes() {
    let f = fixture();
    let (kept, removed) = (Upstream::start().await, Upstream::start().await);
    let path = f.dir.path().join("proxy.toml");
    let server = start_server(f.dir.path(), &f.config(&route("/", &[kept.url(), removed.url()], ""))).await;
    let admin = server.admin_addr.unwrap();
    let mut sender = connection(&f, &server).await;
    for _ in 0..2 {
        assert_eq!(send(&mut sender, "GET", "/", "").await.0, StatusCode::OK);
    }
    for url in [kept.url(), removed.url()] {
        assert_eq!(healthy(admin, 0, &url).await, Some(1.0), "{url}");
        assert_eq!(attempts(admin, 0, &url, "ok").await, Some(1.0), "{url}");
    }

    // The same upstreams again: nothing removed, counts kept.
    let same = f.config(&route("/", &[kept.url(), removed.url()], ""));
    server.reload(sealgate::config::Config::parse(&same, &path).unwrap()).await.unwrap();
    assert_eq!(attempts(admin, 0, &removed.url(), "ok").await, Some(1.0));

    // A configuration refused (its second route's CA cannot be read) leaves no series for the upstream its first
    // route would have added.
    let newcomer = Upstream::start().await;
    let refused = f.config(&format!(
        "{}{}",
        route("/", &[kept.url(), removed.url(), newcomer.url()], ""),
        route("/tls", &["https://127.0.0.1:9".to_owned()], "ca = \"/nonexistent/ca.pem\"")
    ));
    assert!(server.reload(sealgate::config::Config::parse(&refused, &path).unwrap()).await.is_err());
    assert_eq!(healthy(admin, 0, &newcomer.url()).await, None);
    assert_eq!(healthy(admin, 0, &removed.url()).await, Some(1.0), "the running configuration's series stay");

    let fewer = f.config(&route("/", &[kept.url()], ""));
    server.reload(sealgate::config::Config::parse(&fewer, &path).unwrap()).await.unwrap();
    assert_eq!(healthy(admin, 0, &removed.url()).await, None, "no gauge claims the removed upstream is healthy");
    assert_eq!(attempts(admin, 0, &removed.url(), "ok").await, None);
    assert_eq!(healthy(admin, 0, &kept.url()).await, Some(1.0));
    assert_eq!(attempts(admin, 0, &kept.url(), "ok").await, Some(1.0));
    sender.ready().await.unwrap();
    assert_eq!(send(&mut sender, "GET", "/", "").await.0, StatusCode::OK);
    assert_eq!(attempts(admin, 0, &kept.url(), "ok").await, Some(2.0), "the kept upstream's series still counts");
}
