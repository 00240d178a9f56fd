//! What a grant's end does, effect by effect, with real clients: handshakes refused (resumption included),
//! every connection made with the grant's certificates closed (idle, mid-body, HTTP/2 streams open, handshake in
//! flight), its names answered 421 over other connections, nothing servable -> listeners closed and not ready, and
//! no way back for the grant. Renewals, too, end resumption of earlier sessions.

mod common;

use std::io::Read;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::BodyExt;
use rustls::HandshakeKind;
use sealgate::custody::writer::{export_paths, AssociateRequest, RenewRequest};

/// Opens a TLS connection, sends one HTTP/1.1 request (so that TLS 1.3 tickets are received) and returns how the
/// handshake went and which certificate was served.
async fn visit(
    addr: std::net::SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<(HandshakeKind, rustls::pki_types::CertificateDer<'static>)> {
    let tls = connect(addr, sni, config).await?;
    let kind = tls.get_ref().1.handshake_kind().unwrap();
    let leaf = peer_leaf(&tls);
    let mut sender = http1(tls).await;
    let response = sender.send_request(get(sni, "/")).await.map_err(std::io::Error::other)?;
    let _ = text(response).await;
    Ok((kind, leaf))
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

/// rustls clients that keep their sessions (TLS 1.3 tickets, TLS 1.2 session ids) resume within a generation,
/// never across a renewal, and not at all after the grant's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_do_not_survive_a_renewal_or_a_retirement() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    f.serve("c-other", &["other.example.test"]);
    let server = f.start(HELLO).await;
    let addr = server.tls_addrs[0];
    let tls13 = f.client(&[]);
    let tls12 = tls12_client(&f);

    for (version, client) in [("TLS 1.3", &tls13), ("TLS 1.2", &tls12)] {
        visit(addr, "a.example.test", Arc::clone(client)).await.unwrap();
        let (kind, _) = visit(addr, "a.example.test", Arc::clone(client)).await.unwrap();
        assert_eq!(kind, HandshakeKind::Resumed, "{version}: resumption works within a generation");
    }

    f.custody.renew("c-a", &RenewRequest::reissue()).unwrap();
    let new = f.leaf("c-a");
    assert!(
        eventually(APPLY_DEADLINE, || async {
            leaf_for(addr, "a.example.test", f.client(&[])).await == Some(new.clone())
        })
        .await
    );
    for (version, client) in [("TLS 1.3", &tls13), ("TLS 1.2", &tls12)] {
        let (kind, leaf) = visit(addr, "a.example.test", Arc::clone(client)).await.unwrap();
        assert_eq!(kind, HandshakeKind::Full, "{version}: a session from before the renewal must not resume");
        assert_eq!(leaf, new);
        let (kind, _) = visit(addr, "a.example.test", Arc::clone(client)).await.unwrap();
        assert_eq!(kind, HandshakeKind::Resumed, "{version}: the new generation resumes its own sessions");
    }

    f.custody.retire_grant(&f.grant_of("c-a")).unwrap();
    assert!(eventually(APPLY_DEADLINE, || refused_with_alert(addr, "a.example.test", f.client(&[]))).await);
    for (version, client) in [("TLS 1.3", &tls13), ("TLS 1.2", &tls12)] {
        assert!(
            refused_with_alert(addr, "a.example.test", Arc::clone(client)).await,
            "{version}: a client offering a session for the retired name gets an alert"
        );
    }
    assert!(visit(addr, "other.example.test", tls13).await.is_ok(), "other grants go on");
}

/// The same with OpenSSL's client, which saves and offers sessions the way browsers do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_sessions_do_not_survive_a_renewal_or_a_retirement() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    f.serve("c-other", &["other.example.test"]);
    let server = f.start(HELLO).await;
    let port = server.tls_addrs[0].port();
    let dir = f.dir.path().to_owned();
    std::fs::write(dir.join("ca.pem"), &f.ca_pem).unwrap();
    std::fs::write(dir.join("request"), "GET / HTTP/1.1\r\nHost: a.example.test\r\nConnection: close\r\n\r\n").unwrap();
    let s_client = |version: &'static str, session: &'static str, save: bool| {
        let dir = dir.clone();
        async move {
            let mut command = Command::new("openssl");
            command
                .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-servername", "a.example.test"])
                .args([version, "-ign_eof", "-CAfile"])
                .arg(dir.join("ca.pem"))
                .arg(if save { "-sess_out" } else { "-sess_in" })
                .arg(dir.join(session))
                .stdin(std::fs::File::open(dir.join("request")).unwrap());
            let out = tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
        }
    };
    for (version, session) in [("-tls1_3", "s13"), ("-tls1_2", "s12")] {
        s_client(version, session, true).await;
        let out = s_client(version, session, false).await;
        assert!(out.contains("Reused,"), "{version}: resumes within a generation: {out}");
        s_client(version, session, true).await;
    }
    f.custody.renew("c-a", &RenewRequest::reissue()).unwrap();
    let new = f.leaf("c-a");
    let addr = server.tls_addrs[0];
    assert!(
        eventually(APPLY_DEADLINE, || async {
            leaf_for(addr, "a.example.test", f.client(&[])).await == Some(new.clone())
        })
        .await
    );
    for (version, session) in [("-tls1_3", "s13"), ("-tls1_2", "s12")] {
        let out = s_client(version, session, false).await;
        assert!(out.contains("New,") && !out.contains("Reused,"), "{version}: no resumption across a renewal: {out}");
        s_client(version, session, true).await;
    }
    f.custody.retire_grant(&f.grant_of("c-a")).unwrap();
    assert!(eventually(APPLY_DEADLINE, || refused_with_alert(addr, "a.example.test", f.client(&[]))).await);
    for (version, session) in [("-tls1_3", "s13"), ("-tls1_2", "s12")] {
        let out = s_client(version, session, false).await;
        assert!(out.contains("alert") && !out.contains("Reused,"), "{version}: refused after retirement: {out}");
    }
}

/// An upstream that streams a body slowly, forever.
async fn endless_upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|request: http::Request<hyper::body::Incoming>| async move {
                    if request.uri().path() == "/silent" {
                        std::future::pending::<()>().await;
                    }
                    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, std::convert::Infallible>::new(1);
                    tokio::spawn(async move {
                        loop {
                            if tx.send_data(Bytes::from_static(&[b'z'; 1024])).await.is_err() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    });
                    Ok::<_, std::convert::Infallible>(http::Response::new(body))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

/// Every connection made with the retired grant's certificates is closed at once, whatever it is doing;
/// connections made with other grants' certificates go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_made_with_a_retired_grant_are_closed_whatever_they_are_doing() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    f.serve("c-b", &["b.example.test"]);
    let upstream = endless_upstream().await;
    let routes = format!(
        "[[route]]\nupstream = \"http://{upstream}\"\n[[route]]\npath = \"/hello\"\nrespond = {{ status = 200 }}\n"
    );
    // A long handshake timeout: only the grant's end can close the handshake in flight within the test.
    let config = f.config(&routes).replace("[admin]", "[tls]\nhandshake_timeout = \"60s\"\n\n[admin]");
    let server = start_server(f.dir.path(), &config).await;
    let addr = server.tls_addrs[0];

    // Idle keep-alive, after one complete exchange.
    let mut idle = http1(connect(addr, "a.example.test", f.client(&[])).await.unwrap()).await;
    let response = idle.send_request(get("a.example.test", "/hello")).await.unwrap();
    assert_eq!(text(response).await.0, StatusCode::OK);
    // Mid-body download.
    let mut downloading = http1(connect(addr, "a.example.test", f.client(&[])).await.unwrap()).await;
    let mut body = downloading.send_request(get("a.example.test", "/stream")).await.unwrap().into_body();
    body.frame().await.unwrap().unwrap();
    // HTTP/2 with a stream open (the upstream never answers it).
    let mut h2 = http2(connect(addr, "a.example.test", f.client(&[b"h2"])).await.unwrap()).await;
    let open_stream = tokio::spawn(async move { h2.send_request(get_h2("a.example.test", "/silent")).await });
    // A handshake in flight: the ClientHello is answered, the client's Finished never sent.
    let (waiting_tx, waiting_rx) = tokio::sync::oneshot::channel();
    let in_flight = tokio::task::spawn_blocking(move || handshake_in_flight(addr, "a.example.test", waiting_tx));
    waiting_rx.await.expect("the handshake reached the server's Finished");
    // Another grant's connection, also mid-body.
    let mut other = http1(connect(addr, "b.example.test", f.client(&[])).await.unwrap()).await;
    let mut other_body = other.send_request(get("b.example.test", "/stream")).await.unwrap().into_body();
    other_body.frame().await.unwrap().unwrap();

    assert!(wait_until(APPLY_DEADLINE, || server.metrics.connections_open() >= 5).await);

    f.custody.retire_grant(&f.grant_of("c-a")).unwrap();

    assert!(wait_until(APPLY_DEADLINE, || idle.is_closed()).await, "the idle keep-alive connection is closed");
    let cut = tokio::time::timeout(APPLY_DEADLINE, async {
        loop {
            match body.frame().await {
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return,
            }
        }
    })
    .await;
    assert!(cut.is_ok(), "the download is cut mid-body");
    let stream = tokio::time::timeout(APPLY_DEADLINE, open_stream).await.expect("the HTTP/2 stream ends").unwrap();
    assert!(stream.is_err(), "the HTTP/2 stream fails with its connection");
    assert!(in_flight.await.unwrap(), "the handshake in flight is dropped, not completed");

    // The other grant's download goes on.
    for _ in 0..10 {
        other_body.frame().await.unwrap().unwrap();
    }
}

/// Starts a TLS handshake by hand and stops before sending the client's Finished. Returns whether the server then
/// closed the connection (rather than waiting, or completing the handshake). `waiting` fires once the server's
/// flight has been read and the client holds its Finished back.
fn handshake_in_flight(addr: std::net::SocketAddr, sni: &str, waiting: tokio::sync::oneshot::Sender<()>) -> bool {
    let config = {
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnything))
                .with_no_client_auth();
        config.enable_sni = true;
        Arc::new(config)
    };
    let mut conn = rustls::ClientConnection::new(config, sni.to_owned().try_into().unwrap()).unwrap();
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // ClientHello out.
    while conn.wants_write() {
        conn.write_tls(&mut tcp).unwrap();
    }
    // The server's whole flight in, up to its Finished: the client is then ready to send its own Finished.
    while conn.is_handshaking() && !conn.wants_write() {
        if conn.read_tls(&mut tcp).unwrap() == 0 {
            return false;
        }
        conn.process_new_packets().unwrap();
    }
    // Now wait, holding the Finished back: the server must drop the connection when the grant ends.
    let _ = waiting.send(());
    let mut buffer = [0u8; 64];
    match tcp.read(&mut buffer) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[derive(Debug)]
struct AcceptAnything;

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms.supported_schemes()
    }
}

/// A name whose grant was retired gets 421 over a connection made with another certificate, even one whose
/// certificate (as it was when the connection was made) covers the name; and a name no longer served at all gets
/// 421 over connections still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_name_gets_421_over_other_connections() {
    let f = Fixture::new();
    // c-a serves a.example.test and b.example.test at first; c-b serves b.example.test.
    f.issue("c-a", &["a.example.test", "b.example.test"]);
    let mut request = AssociateRequest::new("c-a", &f.export, GRANTEE);
    request.server_names = Some(vec!["a.example.test".to_owned(), "b.example.test".to_owned()]);
    f.custody.associate(&request).unwrap();
    f.serve("c-b", &["b.example.test"]);
    let server = f.start(HELLO).await;
    let addr = server.tls_addrs[0];

    let mut over_a = http2(connect(addr, "a.example.test", f.client(&[b"h2"])).await.unwrap()).await;
    assert_eq!(
        over_a.send_request(get_h2("b.example.test", "/")).await.unwrap().status(),
        StatusCode::OK,
        "before: b.example.test over a connection made with c-a, which serves it"
    );

    // c-a's association narrowed to a.example.test in place (same grant: its connection stays): b.example.test is
    // still served, by c-b, and over_a's certificate still covers it.
    let associations = f.export.join("associations.toml");
    let text = std::fs::read_to_string(&associations).unwrap();
    let narrowed =
        text.replace("server_names = [\"a.example.test\", \"b.example.test\"]", "server_names = [\"a.example.test\"]");
    assert_ne!(narrowed, text);
    let staged = f.export.join(".associations.tmp");
    std::fs::write(&staged, narrowed).unwrap();
    std::fs::rename(&staged, &associations).unwrap();
    assert!(eventually(APPLY_DEADLINE, || leaf_is(addr, &f, "b.example.test", "c-b")).await);
    assert_eq!(over_a.send_request(get_h2("b.example.test", "/")).await.unwrap().status(), StatusCode::OK);
    let mut over_b = http2(connect(addr, "b.example.test", f.client(&[b"h2"])).await.unwrap()).await;
    assert_eq!(over_b.send_request(get_h2("b.example.test", "/")).await.unwrap().status(), StatusCode::OK);

    // c-b's grant retired: b.example.test is served by nothing, and over_a's request for it gets 421.
    f.custody.retire_grant(&f.grant_of("c-b")).unwrap();
    assert!(eventually(APPLY_DEADLINE, || refused_with_alert(addr, "b.example.test", f.client(&[]))).await);
    let response = over_a.send_request(get_h2("b.example.test", "/")).await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::MISDIRECTED_REQUEST,
        "a retired name over another certificate's connection"
    );
    assert!(over_b.send_request(get_h2("b.example.test", "/")).await.is_err(), "b's own connection is closed");
    assert_eq!(over_a.send_request(get_h2("a.example.test", "/")).await.unwrap().status(), StatusCode::OK);
}

/// A retired grant never comes back, even when a file with its id reappears as active (a restored backup).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_grant_restored_from_a_backup_stays_retired() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    f.serve("c-keep", &["keep.example.test"]);
    let server = f.start(HELLO).await;
    let addr = server.tls_addrs[0];
    let grant = f.grant_of("c-a");
    let grant_file = f.export.join("grants").join(format!("{grant}.toml"));
    let backup = std::fs::read(&grant_file).unwrap();

    f.custody.retire_grant(&grant).unwrap();
    assert!(eventually(APPLY_DEADLINE, || refused_with_alert(addr, "a.example.test", f.client(&[]))).await);
    let restored = f.export.join("grants").join(".restore.tmp");
    std::fs::write(&restored, &backup).unwrap();
    std::fs::rename(&restored, &grant_file).unwrap();

    let report = server.holder.reload().unwrap();
    let refusal = report.refused.iter().find(|(c, _, _)| c == "c-a").map(|(_, _, r)| r.to_string()).unwrap();
    assert!(refusal.contains("retired earlier"), "{refusal}");
    assert!(refused_with_alert(addr, "a.example.test", f.client(&[])).await);
    assert!(leaf_for(addr, "keep.example.test", f.client(&[])).await.is_some());
}

/// FORMAT.md retires a grant for its holder as soon as its file is gone, whether or not anything was served under
/// it. Here the association is refused from the start (its certificate is another key's, as while a certificate
/// is rewritten), the grant file is deleted, and then everything is restored in a servable state under the same
/// grant id (a backup): the name is never served. The same certificate under a new grant is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_never_served_is_retired_when_its_file_goes_and_stays_retired_when_restored() {
    let f = Fixture::new();
    f.serve("c-keep", &["keep.example.test"]);
    let grant = f.serve("c-a", &["a.example.test"]);
    let certificate = export_paths(&f.export, "c-a").certificate_pem;
    let good_certificate = std::fs::read(&certificate).unwrap();
    f.issue("c-donor", &["a.example.test"]);
    std::fs::write(&certificate, f.custody.certificate("c-donor").unwrap().certificate_pem).unwrap();
    let grant_file = f.export.join("grants").join(format!("{grant}.toml"));
    let backup = std::fs::read(&grant_file).unwrap();
    // File events only (the rescan a minute away): the deletion is applied by a read of the named changes.
    let server = start_server(f.dir.path(), &f.config_with("rescan_interval = \"60s\"", HELLO)).await;
    let addr = server.tls_addrs[0];
    let refused_at = |check: &str| {
        let series = format!("sealgate_associations_refused{{check=\"{check}\"}} 1");
        server.metrics.encode().lines().any(|line| line == series)
    };
    assert!(refused_at("4"), "{}", server.metrics.encode());
    assert!(leaf_is(addr, &f, "keep.example.test", "c-keep").await);

    std::fs::remove_file(&grant_file).unwrap();
    assert!(wait_until(APPLY_DEADLINE, || refused_at("1") && !refused_at("4")).await, "the deletion is applied");

    // The backup comes back: the grant file as it was (written aside, renamed into place) and the right
    // certificate. Every check but "the grant was retired" passes now.
    std::fs::write(&certificate, &good_certificate).unwrap();
    let restored = f.export.join("grants").join(".restore.tmp");
    std::fs::write(&restored, &backup).unwrap();
    std::fs::rename(&restored, &grant_file).unwrap();
    // Once a certificate associated after the restoration is served, the restoration has been read too.
    f.serve("c-b", &["b.example.test"]);
    assert!(eventually(APPLY_DEADLINE, || leaf_is(addr, &f, "b.example.test", "c-b")).await);
    assert!(refused_with_alert(addr, "a.example.test", f.client(&[])).await, "the restored grant is served");
    let report = server.holder.reload().unwrap();
    let refusal = report.refused.iter().find(|(c, _, _)| c == "c-a").map(|(_, _, r)| r.to_string());
    assert!(refusal.as_deref().is_some_and(|r| r.contains("retired earlier")), "{refusal:?}");
    assert!(refused_with_alert(addr, "a.example.test", f.client(&[])).await);

    // Re-association is a new grant id, and serves.
    f.custody.disassociate("c-a", &f.export).unwrap();
    assert_ne!(f.associate("c-a"), grant);
    assert!(eventually(APPLY_DEADLINE, || leaf_is(addr, &f, "a.example.test", "c-a")).await);
}

/// With nothing left to serve, the listeners stop accepting (connection refused) and /readyz answers 503, while
/// /healthz stays 200; a new association opens them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_servable_closes_the_listeners_until_an_association_appears() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    // Not an ephemeral port: while closed, it must not be given to another test's listener.
    let server = start_server(f.dir.path(), &with_listener_port(&f.config(HELLO), reserved_port())).await;
    let addr = server.tls_addrs[0];
    let admin = server.admin_addr.unwrap();
    assert_eq!(admin_status(admin, "/readyz").await, 200);

    f.custody.disassociate("c-a", &f.export).unwrap();
    let refused = || async { tokio::net::TcpStream::connect(addr).await.is_err() };
    assert!(eventually(APPLY_DEADLINE, refused).await, "connections are refused");
    assert_eq!(admin_status(admin, "/readyz").await, 503);
    assert_eq!(admin_status(admin, "/healthz").await, 200);

    f.serve("c-new", &["a.example.test"]);
    assert!(eventually(APPLY_DEADLINE, || leaf_is(addr, &f, "a.example.test", "c-new")).await, "listening again");
    assert_eq!(admin_status(admin, "/readyz").await, 200);
}

async fn leaf_is(addr: std::net::SocketAddr, f: &Fixture, sni: &str, id: &str) -> bool {
    leaf_for(addr, sni, f.client(&[])).await == Some(f.leaf(id))
}

async fn admin_status(admin: std::net::SocketAddr, path: &str) -> u16 {
    let tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let request = http::Request::builder()
        .uri(path)
        .header("host", "admin")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    sender.send_request(request).await.unwrap().status().as_u16()
}
