//! Mutual TLS (`[tls.client_auth]`): client certificates verified against the operator's CA (and CRL), refused
//! in the handshake when missing, foreign, revoked or made for another usage; the verified identity forwarded
//! upstream as `X-Forwarded-Client-Cert`, and a client's own such header never reaching an upstream.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType,
    SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ClientConfig;

/// A client CA: its PEM and the means to sign client certificates and CRLs.
struct ClientCa {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl ClientCa {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let pem = params.self_signed(&key).unwrap().pem();
        Self { pem, issuer: Issuer::new(params, key) }
    }

    /// A client certificate with `serial`, common name `name`, a URI SAN, and the `usage` given.
    fn client(&self, name: &str, serial: u64, usage: ExtendedKeyUsagePurpose) -> Identity {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        // rcgen's default names a common name first; the subject is built here in the order given.
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, "Example");
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names.push(SanType::URI(format!("spiffe://example.test/{name}").try_into().unwrap()));
        params.extended_key_usages = vec![usage];
        params.serial_number = Some(SerialNumber::from(serial));
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        Identity { chain: vec![certificate.der().clone()], key: key.serialize_der() }
    }

    /// A CRL revoking `serials`.
    fn crl(&self, serials: &[u64]) -> String {
        let now = time::OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(1),
            next_update: now + time::Duration::days(1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from(*serial),
                    revocation_time: now - time::Duration::minutes(1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer).unwrap().pem().unwrap()
    }
}

struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
}

impl Identity {
    /// A client config trusting the fixture's CA and presenting this identity.
    fn client(&self, f: &Fixture, alpn: &[&[u8]], tls12: bool) -> Arc<ClientConfig> {
        let key = PrivateKeyDer::Pkcs8(self.key.clone().into());
        let mut config = builder(f, tls12).with_client_auth_cert(self.chain.clone(), key).unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// What sealgate must forward for this identity, given its subject.
    fn forwarded(&self, subject: &str, uri: &str) -> String {
        let hash: String = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &self.chain[0])
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("Hash={hash};Subject=\"{subject}\";URI={uri}")
    }
}

fn builder(f: &Fixture, tls12: bool) -> rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(f.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] =
        if tls12 { &[&rustls::version::TLS12] } else { &[&rustls::version::TLS13] };
    ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
}

/// A client config without a certificate.
fn anonymous(f: &Fixture, alpn: &[&[u8]], tls12: bool) -> Arc<ClientConfig> {
    let mut config = builder(f, tls12).with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

use rustls::pki_types::pem::PemObject;

const SPOOFED: &str = "Hash=0000;Subject=\"CN=admin\"";

/// One HTTP/1.1 GET of `/` through `config`, with a spoofed `X-Forwarded-Client-Cert`: the status, or the
/// error that stopped it (a refused handshake shows in TLS 1.3 only at the first read, after the client's
/// side of the handshake is done).
async fn get_through(addr: std::net::SocketAddr, config: Arc<ClientConfig>) -> Result<StatusCode, String> {
    let tls = connect(addr, "app.example.test", config).await.map_err(|e| format!("handshake: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|e| format!("http: {e}"))?;
    tokio::spawn(connection);
    let request = Request::builder()
        .uri("/")
        .header("host", "app.example.test")
        .header("x-forwarded-client-cert", SPOOFED)
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(10), sender.send_request(request)).await {
        Ok(Ok(response)) => Ok(response.status()),
        Ok(Err(e)) => Err(format!("request: {e}")),
        Err(_) => Err("no answer in 10 s".to_owned()),
    }
}

struct Setup {
    f: Fixture,
    ca: ClientCa,
    upstream: Upstream,
    server: sealgate::server::RunningServer,
}

/// A server for `app.example.test` proxying to a recording upstream, with `[tls.client_auth]` holding `extra`
/// (the CA file is `client-ca.pem`, a CRL revoking serial 66 is `revoked.pem`) and a JSON access log
/// (`access.log`).
async fn setup(extra: &str) -> Setup {
    setup_with(extra, "").await
}

/// [`setup`] with `routes` ahead of the upstream route.
async fn setup_with(extra: &str, routes: &str) -> Setup {
    let f = Fixture::new();
    f.serve("c-app", &["app.example.test"]);
    let ca = ClientCa::new("Example client CA");
    std::fs::write(f.dir.path().join("client-ca.pem"), &ca.pem).unwrap();
    std::fs::write(f.dir.path().join("revoked.pem"), ca.crl(&[66])).unwrap();
    let upstream = Upstream::start().await;
    let routes = format!(
        "[tls.client_auth]\nca = \"client-ca.pem\"\n{extra}\n\n[access_log]\npath = \"access.log\"\nformat = \"json\"\n\n\
         {routes}\n[[route]]\nupstream = \"{}\"\n",
        upstream.url()
    );
    let server = f.start(&routes).await;
    Setup { f, ca, upstream, server }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_client_certificates_are_verified_and_forwarded_and_a_clients_own_header_never_is() {
    let Setup { f, ca, upstream, server } = setup("mode = \"required\"\ncrl = [\"revoked.pem\"]\nforward = true").await;
    let addr = server.tls_addrs[0];
    let alice = ca.client("alice", 7, ExtendedKeyUsagePurpose::ClientAuth);

    // A verified client: the upstream learns who it is, over HTTP/1.1 and HTTP/2, TLS 1.3 and 1.2, and never
    // sees the header the client sent.
    let expected = alice.forwarded("CN=alice,O=Example", "spiffe://example.test/alice");
    for tls12 in [false, true] {
        assert_eq!(get_through(addr, alice.client(&f, &[], tls12)).await, Ok(StatusCode::OK), "TLS 1.2: {tls12}");
        let seen = upstream.last().headers.get_all("x-forwarded-client-cert").iter().cloned().collect::<Vec<_>>();
        assert_eq!(seen, [expected.as_str()], "TLS 1.2: {tls12}");
    }
    let tls = connect(addr, "app.example.test", alice.client(&f, &[b"h2"], false)).await.unwrap();
    let mut h2 = http2(tls).await;
    let request = Request::builder()
        .uri("https://app.example.test/h2")
        .header("x-forwarded-client-cert", SPOOFED)
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(h2.send_request(request).await.unwrap().status(), StatusCode::OK);
    assert_eq!(upstream.last().uri.path(), "/h2");
    assert_eq!(upstream.last().headers["x-forwarded-client-cert"], expected.as_str());

    // A resumed session keeps its client's identity (and needs no certificate sent again).
    let resuming = alice.client(&f, &[], false);
    let first = connect(addr, "app.example.test", Arc::clone(&resuming)).await.unwrap();
    let mut first = http1(first).await;
    assert_eq!(first.send_request(get("app.example.test", "/first")).await.unwrap().status(), StatusCode::OK);
    let again = connect(addr, "app.example.test", Arc::clone(&resuming)).await.unwrap();
    assert_eq!(again.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
    let mut again = http1(again).await;
    assert_eq!(again.send_request(get("app.example.test", "/again")).await.unwrap().status(), StatusCode::OK);
    assert_eq!(upstream.last().uri.path(), "/again");
    assert_eq!(upstream.last().headers["x-forwarded-client-cert"], expected.as_str());

    // Refused in the handshake: no certificate, one from another CA, a revoked one, one made for servers.
    let before = upstream.recorded.lock().unwrap().len();
    let stranger = ClientCa::new("Another CA").client("mallory", 9, ExtendedKeyUsagePurpose::ClientAuth);
    let revoked = ca.client("revoked", 66, ExtendedKeyUsagePurpose::ClientAuth);
    let server_only = ca.client("server", 8, ExtendedKeyUsagePurpose::ServerAuth);
    let refused = [
        ("no certificate", anonymous(&f, &[], false)),
        ("no certificate, TLS 1.2", anonymous(&f, &[], true)),
        ("another CA", stranger.client(&f, &[], false)),
        ("revoked", revoked.client(&f, &[], false)),
        ("revoked, TLS 1.2", revoked.client(&f, &[], true)),
        ("server usage only", server_only.client(&f, &[], false)),
    ];
    for (what, config) in &refused {
        let outcome = get_through(addr, Arc::clone(config)).await;
        assert!(outcome.is_err(), "{what}: {outcome:?}");
    }
    assert_eq!(upstream.recorded.lock().unwrap().len(), before, "no refused client reached the upstream");
    let counted = format!("sealgate_tls_handshake_failures_total{{reason=\"ClientCertificate\"}} {}", refused.len());
    let all = wait_until(Duration::from_secs(5), || server.metrics.encode().contains(&counted)).await;
    assert!(all, "{}", server.metrics.encode());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_client_certificates_admit_clients_without_one_but_not_with_a_bad_one() {
    let Setup { f, ca, upstream, server } = setup("mode = \"optional\"").await;
    let addr = server.tls_addrs[0];

    // Without a certificate: served, and the client's header is removed, not passed on.
    assert_eq!(get_through(addr, anonymous(&f, &[], false)).await, Ok(StatusCode::OK));
    assert!(!upstream.last().headers.contains_key("x-forwarded-client-cert"));
    // With a valid one: served; without `forward`, the upstream is told nothing.
    let alice = ca.client("alice", 7, ExtendedKeyUsagePurpose::ClientAuth);
    assert_eq!(get_through(addr, alice.client(&f, &[], false)).await, Ok(StatusCode::OK));
    assert!(!upstream.last().headers.contains_key("x-forwarded-client-cert"));
    // A certificate that fails verification is refused, optional or not.
    let stranger = ClientCa::new("Another CA").client("mallory", 9, ExtendedKeyUsagePurpose::ClientAuth);
    let outcome = get_through(addr, stranger.client(&f, &[], false)).await;
    assert!(outcome.is_err(), "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_can_require_a_client_certificate_that_the_listener_only_asks_for() {
    let admin = "[[route]]\npath = \"/admin\"\nrequire_client_certificate = true\nrespond = { status = 200, body = \"admin\\n\" }\n";
    let Setup { f, ca, upstream, server } = setup_with("mode = \"optional\"", admin).await;
    let addr = server.tls_addrs[0];
    let alice = ca.client("alice", 7, ExtendedKeyUsagePurpose::ClientAuth);

    let ask = |config: Arc<ClientConfig>, path: &'static str| async move {
        let mut sender = http1(connect(addr, "app.example.test", config).await.unwrap()).await;
        text(sender.send_request(get("app.example.test", path)).await.unwrap()).await
    };
    // Without a certificate: the public route answers, the one that requires a certificate refuses.
    assert_eq!(ask(anonymous(&f, &[], false), "/").await.0, StatusCode::OK);
    assert_eq!(ask(anonymous(&f, &[], false), "/admin").await, (StatusCode::FORBIDDEN, "forbidden\n".to_owned()));
    // With one: both.
    assert_eq!(ask(alice.client(&f, &[], false), "/admin").await, (StatusCode::OK, "admin\n".to_owned()));
    assert_eq!(ask(alice.client(&f, &[], false), "/").await.0, StatusCode::OK);
    assert_eq!(upstream.recorded.lock().unwrap().len(), 2);
    let refused = "sealgate_requests_refused_total{reason=\"ClientCertificate\"} 1";
    assert!(server.metrics.encode().contains(refused), "{}", server.metrics.encode());

    // The access log names the client certificate of the requests that came with one.
    let log = f.dir.path().join("access.log");
    let logged = wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&log).is_ok_and(|text| text.lines().count() == 4)
    })
    .await;
    assert!(logged, "{:?}", std::fs::read_to_string(&log));
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&log).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    let subjects: Vec<_> = lines.iter().map(|line| line.get("client_cert_subject").cloned()).collect();
    let alice_subject = Some(serde_json::Value::from("CN=alice,O=Example"));
    assert_eq!(subjects, [None, None, alice_subject.clone(), alice_subject]);
    drop(server);
}

#[tokio::test]
async fn an_unusable_client_ca_stops_the_start_naming_the_file() {
    let f = Fixture::new();
    f.serve("c-app", &["app.example.test"]);
    for (content, expected) in [
        (None, "cannot read the client CA file"),
        (Some("not a certificate\n"), "holds no PEM CA"),
        (Some("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), "is invalid"),
    ] {
        let path = f.dir.path().join("client-ca.pem");
        let _ = std::fs::remove_file(&path);
        if let Some(content) = content {
            std::fs::write(&path, content).unwrap();
        }
        let text = f.config(&format!("[tls.client_auth]\nca = \"client-ca.pem\"\n\n{HELLO}"));
        let config_path = f.dir.path().join("proxy.toml");
        std::fs::write(&config_path, text).unwrap();
        let config = sealgate::config::Config::load(&config_path).unwrap();
        let error = sealgate::server::start(config).await.expect_err("the start must fail").to_string();
        assert!(error.contains(expected) && error.contains("client-ca.pem"), "{error}");
    }
    // A CRL file without a CRL, beside a usable CA.
    std::fs::write(f.dir.path().join("client-ca.pem"), ClientCa::new("CA").pem).unwrap();
    std::fs::write(f.dir.path().join("crl.pem"), ClientCa::new("CA").pem).unwrap();
    let text = f.config(&format!("[tls.client_auth]\nca = \"client-ca.pem\"\ncrl = [\"crl.pem\"]\n\n{HELLO}"));
    std::fs::write(f.dir.path().join("proxy.toml"), text).unwrap();
    let config = sealgate::config::Config::load(&f.dir.path().join("proxy.toml")).unwrap();
    let error = sealgate::server::start(config).await.expect_err("the start must fail").to_string();
    assert!(error.contains("holds no PEM CRL") && error.contains("crl.pem"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_takes_in_a_renewed_crl_and_ca_and_no_session_resumes_across_it() {
    let Setup { f, ca, upstream: _upstream, server } = setup("crl = [\"revoked.pem\"]").await;
    let addr = server.tls_addrs[0];
    let config_path = f.dir.path().join("proxy.toml");
    let reload = || async { server.reload(sealgate::config::Config::load(&config_path).unwrap()).await.unwrap() };
    let alice = ca.client("alice", 7, ExtendedKeyUsagePurpose::ClientAuth);
    let resuming = alice.client(&f, &[], false);
    let mut alices = http1(connect(addr, "app.example.test", Arc::clone(&resuming)).await.unwrap()).await;
    assert_eq!(alices.send_request(get("app.example.test", "/")).await.unwrap().status(), StatusCode::OK);
    let dave = ca.client("dave", 10, ExtendedKeyUsagePurpose::ClientAuth);
    let tls = connect(addr, "app.example.test", dave.client(&f, &[b"h2"], false)).await.unwrap();
    let mut daves = http2(tls).await;
    assert_eq!(daves.send_request(get_h2("app.example.test", "/")).await.unwrap().status(), StatusCode::OK);

    // Nothing changed: nothing renewed.
    assert!(!reload().await.client_auth_renewed);

    // The CA revokes alice: after the reload her handshakes fail, a resumption of her session included.
    std::fs::write(f.dir.path().join("revoked.pem"), ca.crl(&[66, 7])).unwrap();
    let reloaded = reload().await;
    assert!(reloaded.client_auth_renewed && reloaded.need_restart.is_empty(), "{reloaded:?}");
    let outcome = get_through(addr, alice.client(&f, &[], false)).await;
    assert!(outcome.is_err(), "a fresh handshake: {outcome:?}");
    let outcome = get_through(addr, Arc::clone(&resuming)).await;
    assert!(outcome.is_err(), "the session made before the reload: {outcome:?}");
    // Her connection made before is closed; another client's goes on.
    // `ready` may answer before the close has reached the client: wait for the client to see it.
    assert!(wait_until(Duration::from_secs(10), || alices.is_closed()).await, "alice's connection was closed");
    assert_eq!(daves.send_request(get_h2("app.example.test", "/")).await.unwrap().status(), StatusCode::OK);

    // Another CA: its clients are admitted, the old CA's are not.
    let other = ClientCa::new("Next client CA");
    std::fs::write(f.dir.path().join("client-ca.pem"), &other.pem).unwrap();
    std::fs::write(f.dir.path().join("revoked.pem"), other.crl(&[])).unwrap();
    assert!(reload().await.client_auth_renewed);
    let bob = other.client("bob", 8, ExtendedKeyUsagePurpose::ClientAuth);
    assert_eq!(get_through(addr, bob.client(&f, &[], false)).await, Ok(StatusCode::OK));
    let carol = ca.client("carol", 9, ExtendedKeyUsagePurpose::ClientAuth);
    assert!(get_through(addr, carol.client(&f, &[], false)).await.is_err());
    // The old CA's clients' connections too: dave's is closed now.
    assert!(wait_until(Duration::from_secs(10), || daves.is_closed()).await, "dave's connection closed with his CA");
    let closed = "sealgate_client_trust_connections_closed_total 2";
    assert!(server.metrics.encode().contains(closed), "{}", server.metrics.encode());

    // An unusable file is refused with the reload, and the trust in force stays.
    std::fs::write(f.dir.path().join("client-ca.pem"), "garbage").unwrap();
    let config = sealgate::config::Config::load(&config_path).unwrap();
    let error = server.reload(config).await.expect_err("an unusable CA file refuses the reload").to_string();
    assert!(error.contains("client-ca.pem"), "{error}");
    assert_eq!(get_through(addr, bob.client(&f, &[], false)).await, Ok(StatusCode::OK));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_takes_in_a_crl_renewed_on_disk_without_a_signal() {
    let f = Fixture::new();
    f.serve("c-app", &["app.example.test"]);
    let ca = ClientCa::new("Example client CA");
    std::fs::write(f.dir.path().join("client-ca.pem"), &ca.pem).unwrap();
    std::fs::write(f.dir.path().join("revoked.pem"), ca.crl(&[66])).unwrap();
    let path = f.dir.path().join("proxy.toml");
    let routes = format!(
        "[tls.client_auth]\nca = \"client-ca.pem\"\ncrl = [\"revoked.pem\"]\n\n[access_log]\npath = \"access.log\"\n\n{HELLO}"
    );
    std::fs::write(&path, f.config(&routes)).unwrap();
    let mut child = spawn_run(&path);
    let lines = stderr_lines(&mut child);
    let listening = loop {
        let line = lines.recv_timeout(Duration::from_secs(20)).expect("the daemon says where it listens");
        if line.contains("listening for TLS") {
            break line;
        }
    };
    let port: u16 = listening.rsplit(':').next().unwrap().trim().parse().unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let alice = ca.client("alice", 7, ExtendedKeyUsagePurpose::ClientAuth);
    assert_eq!(get_through(addr, alice.client(&f, &[], false)).await, Ok(StatusCode::OK));

    // Another client keeps the access log, in the same directory, busy all along.
    let dave = ca.client("dave", 10, ExtendedKeyUsagePurpose::ClientAuth).client(&f, &[], false);
    let busy = tokio::spawn(async move {
        let mut sender = http1(connect(addr, "app.example.test", dave).await.unwrap()).await;
        loop {
            if sender.ready().await.is_err() || sender.send_request(get("app.example.test", "/")).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    // The CRL renewed as a deployment tool does (written aside, renamed into place): no SIGHUP.
    let renewed = f.dir.path().join("revoked.pem.new");
    std::fs::write(&renewed, ca.crl(&[66, 7])).unwrap();
    std::fs::rename(&renewed, f.dir.path().join("revoked.pem")).unwrap();
    let refused = eventually(Duration::from_secs(10), || async {
        get_through(addr, alice.client(&f, &[], false)).await.is_err()
    })
    .await;
    assert!(refused, "alice is refused once the renewed CRL is on disk");
    assert!(!busy.is_finished(), "dave's connection goes on");
    busy.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_makes_certificates_required_closes_the_connections_made_without_one() {
    let Setup { f, ca, upstream: _upstream, server } = setup("mode = \"optional\"").await;
    let addr = server.tls_addrs[0];
    let mut anonymous_connection =
        http1(connect(addr, "app.example.test", anonymous(&f, &[], false)).await.unwrap()).await;
    assert_eq!(anonymous_connection.send_request(get("app.example.test", "/")).await.unwrap().status(), StatusCode::OK);
    let alice = ca.client("alice", 7, ExtendedKeyUsagePurpose::ClientAuth).client(&f, &[], false);
    let mut alices = http1(connect(addr, "app.example.test", alice).await.unwrap()).await;
    assert_eq!(alices.send_request(get("app.example.test", "/")).await.unwrap().status(), StatusCode::OK);

    let path = f.dir.path().join("proxy.toml");
    let required = std::fs::read_to_string(&path).unwrap().replace("mode = \"optional\"", "mode = \"required\"");
    std::fs::write(&path, required).unwrap();
    let reloaded = server.reload(sealgate::config::Config::load(&path).unwrap()).await.unwrap();
    assert!(reloaded.client_auth_renewed);
    // `ready` may answer before the close has reached the client: wait for the client to see it.
    assert!(
        wait_until(Duration::from_secs(10), || anonymous_connection.is_closed()).await,
        "the connection made without a certificate was closed"
    );
    alices.ready().await.unwrap();
    assert_eq!(alices.send_request(get("app.example.test", "/")).await.unwrap().status(), StatusCode::OK);
    assert!(get_through(addr, anonymous(&f, &[], false)).await.is_err(), "and new ones are refused");
}
