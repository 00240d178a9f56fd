//! TLS termination with real clients: SNI selection, refusals with an alert, protocol versions, ALPN.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls::{AlertDescription, ProtocolVersion};
use time::OffsetDateTime;

fn alert_of(error: &std::io::Error) -> Option<AlertDescription> {
    match error.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(alert) => Some(*alert),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_chooses_between_two_certificates_and_a_wildcard() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    f.serve("c-b", &["b.example.test"]);
    f.serve("c-wild", &["*.example.test"]);
    let server = f.start(HELLO).await;
    for (sni, id) in [
        ("a.example.test", "c-a"),
        ("b.example.test", "c-b"),
        ("other.example.test", "c-wild"),
        ("A.Example.Test", "c-a"),
    ] {
        let tls = connect(server.tls_addrs[0], sni, f.client(&[])).await.unwrap();
        assert_eq!(peer_leaf(&tls), f.leaf(id), "SNI {sni} must get {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_beats_wildcard_then_newest_validity_then_smaller_id() {
    let f = Fixture::new();
    let now = OffsetDateTime::now_utc();
    let issue = |id: &str, name: &str, days_ago: i64| {
        let mut request = sealgate::custody::writer::IssueRequest::new([name]);
        request.certificate_id = Some(id.to_owned());
        request.not_before = Some(now - time::Duration::days(days_ago));
        f.custody.issue(&request).unwrap();
        f.associate(id);
    };
    issue("c-exact-old", "www.example.test", 30);
    issue("c-wild-new", "*.example.test", 1);
    issue("c-old", "api.example.test", 30);
    issue("c-new", "api.example.test", 2);
    issue("c-z", "tie.example.test", 5);
    issue("c-y", "tie.example.test", 5);
    let server = f.start(HELLO).await;
    for (sni, id) in [("www.example.test", "c-exact-old"), ("api.example.test", "c-new"), ("tie.example.test", "c-y")] {
        let tls = connect(server.tls_addrs[0], sni, f.client(&[])).await.unwrap();
        assert_eq!(peer_leaf(&tls), f.leaf(id), "SNI {sni} must get {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_or_missing_sni_gets_a_handshake_alert() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    let server = f.start(HELLO).await;

    let error = connect(server.tls_addrs[0], "unknown.example.test", f.client(&[])).await.unwrap_err();
    assert!(alert_of(&error).is_some(), "expected an alert, got {error}");

    let mut no_sni = (*f.client(&[])).clone();
    no_sni.enable_sni = false;
    let error = connect(server.tls_addrs[0], "a.example.test", Arc::new(no_sni)).await.unwrap_err();
    assert!(alert_of(&error).is_some(), "expected an alert, got {error}");

    // The refusals are counted (the server counts a refusal once it has sent the alert: the client may see the
    // alert first).
    let counted = "sealgate_tls_handshake_failures_total{reason=\"UnknownName\"} 2";
    let both = wait_until(Duration::from_secs(5), || server.metrics.encode().contains(counted)).await;
    assert!(both, "{}", server.metrics.encode());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_default_certificate_answers_clients_without_sni() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    f.serve("c-b", &["b.example.test"]);
    let config = f.config(HELLO).replace("[admin]", "[tls]\ndefault_certificate = \"c-b\"\n\n[admin]");
    let server = start_server(f.dir.path(), &config).await;
    let mut no_sni = (*f.client(&[])).clone();
    no_sni.enable_sni = false;
    let tls = connect(server.tls_addrs[0], "b.example.test", Arc::new(no_sni)).await.unwrap();
    assert_eq!(peer_leaf(&tls), f.leaf("c-b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_3_preferred_and_1_2_accepted_unless_the_minimum_is_1_3() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    let server = f.start(HELLO).await;
    let tls = connect(server.tls_addrs[0], "a.example.test", f.client(&[])).await.unwrap();
    assert_eq!(tls.get_ref().1.protocol_version(), Some(ProtocolVersion::TLSv1_3));

    let tls12_only = tls12_client(&f);
    let tls = connect(server.tls_addrs[0], "a.example.test", Arc::clone(&tls12_only)).await.unwrap();
    assert_eq!(tls.get_ref().1.protocol_version(), Some(ProtocolVersion::TLSv1_2));
    server.shutdown(std::time::Duration::from_secs(1)).await;

    let config = f.config(HELLO).replace("[admin]", "[tls]\nmin_version = \"1.3\"\n\n[admin]");
    let server = start_server(f.dir.path(), &config).await;
    assert!(connect(server.tls_addrs[0], "a.example.test", tls12_only).await.is_err());
}

fn tls12_client(f: &Fixture) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(f.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_chooses_the_http_version() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    let server = f.start(HELLO).await;
    let addr = server.tls_addrs[0];

    let tls = connect(addr, "a.example.test", f.client(&[b"h2", b"http/1.1"])).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut h2 = http2(tls).await;
    let response = h2.send_request(get_h2("a.example.test", "/")).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(text(response).await, (http::StatusCode::OK, "hello\n".to_owned()));

    let tls = connect(addr, "a.example.test", f.client(&[b"http/1.1"])).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut h1 = http1(tls).await;
    let response = h1.send_request(get("a.example.test", "/")).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_11);
    assert_eq!(text(response).await.0, http::StatusCode::OK);

    // No ALPN at all: HTTP/1.1, never a sniffed HTTP/2 preface.
    let tls = connect(addr, "a.example.test", f.client(&[])).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    let mut h1 = http1(tls).await;
    let response = h1.send_request(get("a.example.test", "/")).await.unwrap();
    assert_eq!(text(response).await.0, http::StatusCode::OK);
}

/// HTTP/2 only by ALPN `h2`, never by sniffing: the HTTP/2 connection preface (and a client's first SETTINGS) sent
/// over a connection that negotiated `http/1.1`, or nothing, is an HTTP/1.1 request that does not parse (400, or
/// a close), never an HTTP/2 connection. Over `h2`, the same bytes get the server's SETTINGS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_preface_is_http2_only_after_alpn_h2() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    let server = f.start(HELLO).await;
    let mut preface = h2raw::PREFACE.to_vec();
    preface.extend(h2raw::frame(h2raw::SETTINGS, 0, 0, &[]));
    let is_settings = |bytes: &[u8]| bytes.len() >= 9 && bytes[3] == h2raw::SETTINGS && bytes[5..9] == [0; 4];

    let http1: &[&[u8]] = &[b"http/1.1"];
    for alpn in [http1, &[]] {
        let mut tls = connect(server.tls_addrs[0], "a.example.test", f.client(alpn)).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), alpn.first().map(|p| &p[..]));
        let alpn = alpn.first().map(|p| String::from_utf8_lossy(p));
        let reply = raw::exchange(&mut tls, &preface, Duration::from_secs(5)).await;
        assert!(!is_settings(&reply.bytes), "ALPN {alpn:?}: answered as HTTP/2: {:?}", reply.bytes);
        assert!(
            reply.status() == Some(400) || (reply.bytes.is_empty() && reply.closed),
            "ALPN {alpn:?}: expected an HTTP/1.1 400 or a close, got {:?} (closed: {})",
            String::from_utf8_lossy(&reply.bytes),
            reply.closed
        );
    }

    let tls = connect(server.tls_addrs[0], "a.example.test", f.client(&[b"h2"])).await.unwrap();
    let first = h2raw::H2::start(tls).await.next(Duration::from_secs(5)).await;
    assert!(matches!(first, Some(h2raw::Event::Settings { ack: false, .. })), "ALPN h2: {first:?}");
}

/// The demo export, as shipped: a rustls client trusting `certs-example/ca.pem` gets the `localhost`
/// certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_export_serves_localhost_to_a_client_trusting_the_example_ca() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let config = config_text(&root.join("certs-example/export"), "sealgate-demo", HELLO);
    let server = start_server(dir.path(), &config).await;
    let ca = std::fs::read(root.join("certs-example/ca.pem")).unwrap();
    let tls = connect(server.tls_addrs[0], "localhost", client_config(&ca, &[b"h2"])).await.unwrap();
    let mut h2 = http2(tls).await;
    let (status, body) = text(h2.send_request(get_h2("localhost", "/")).await.unwrap()).await;
    assert_eq!((status, body.as_str()), (http::StatusCode::OK, "hello\n"));
}
