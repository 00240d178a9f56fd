//! Real clients other than our own: curl (HTTP/1.1 and HTTP/2) and openssl s_client (versions, SNI), against
//! a running sealgate. `.ci/run` installs both when missing.

mod common;

use std::process::{Command, Output, Stdio};

use common::*;

async fn run(mut command: Command) -> Output {
    tokio::task::spawn_blocking(move || command.stdin(Stdio::null()).output().expect("the tool must be installed"))
        .await
        .unwrap()
}

fn curl(f: &Fixture, port: u16, name: &str, extra: &[&str]) -> Command {
    let ca = f.dir.path().join("ca.pem");
    std::fs::write(&ca, &f.ca_pem).unwrap();
    let mut command = Command::new("curl");
    command
        .args(["--silent", "--show-error", "--max-time", "10", "--cacert"])
        .arg(&ca)
        .args(["--resolve", &format!("{name}:{port}:127.0.0.1")])
        .args(["--write-out", "\n%{http_code} %{http_version}"])
        .args(extra)
        .arg(format!("https://{name}:{port}/"));
    command
}

fn s_client(port: u16, extra: &[&str]) -> Command {
    let mut command = Command::new("openssl");
    command.args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-brief"]).args(extra);
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_http1_and_http2() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    let server = f.start(HELLO).await;
    let port = server.tls_addrs[0].port();

    let out = run(curl(&f, port, "a.example.test", &["--http1.1"])).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n\n200 1.1");

    let out = run(curl(&f, port, "a.example.test", &["--http2"])).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n\n200 2");

    // A name sealgate has no certificate for: the handshake fails.
    let out = run(curl(&f, port, "unknown.example.test", &[])).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(stderr.contains("alert") || stderr.contains("ssl"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_versions_and_sni() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    let server = f.start(HELLO).await;
    let port = server.tls_addrs[0].port();

    for (version, expected) in [("-tls1_3", "TLSv1.3"), ("-tls1_2", "TLSv1.2")] {
        let out = run(s_client(port, &["-servername", "a.example.test", version])).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&format!("Protocol version: {expected}")), "{version}: {stderr}");
    }
    // TLS 1.1 and 1.0 are refused by custody policy: the server answers a willing client's hello with an alert
    // (SECLEVEL=0 lets OpenSSL 3 offer them at all, so the refusal is the server's).
    for version in ["-tls1_1", "-tls1"] {
        let out =
            run(s_client(port, &["-servername", "a.example.test", version, "-cipher", "DEFAULT@SECLEVEL=0"])).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("alert") && !stderr.contains("Protocol version"),
            "{version}: {stderr}"
        );
    }
    // No SNI: an alert, no certificate.
    let out = run(s_client(port, &["-noservername"])).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("alert"), "{stderr}");
}

/// Sessions resume within one certificate generation, and 0-RTT is off: the tickets sealgate issues allow no
/// early data, so a client that has early data to send does not send it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_resumes_but_never_sends_early_data() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    let server = f.start(HELLO).await;
    let port = server.tls_addrs[0].port();
    let dir = f.dir.path();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &f.ca_pem).unwrap();
    let request = dir.join("request.txt");
    std::fs::write(&request, "GET / HTTP/1.1\r\nHost: a.example.test\r\nConnection: close\r\n\r\n").unwrap();
    let early = dir.join("early.txt");
    std::fs::write(&early, "GET / HTTP/1.1\r\nHost: a.example.test\r\n\r\n").unwrap();
    let session = dir.join("session.pem");
    let with_request = |mut command: Command| {
        command.stdin(std::fs::File::open(&request).unwrap());
        command
    };
    let first = s_client(port, &["-servername", "a.example.test", "-CAfile", ca.to_str().unwrap()]);
    let mut first = with_request(first);
    // -ign_eof: keep reading after the request is sent, until the server closes.
    first.arg("-ign_eof").arg("-sess_out").arg(&session);
    let out = tokio::task::spawn_blocking(move || first.output().unwrap()).await.unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello"), "{}", String::from_utf8_lossy(&out.stderr));

    let mut second = with_request(Command::new("openssl"));
    second
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-servername", "a.example.test", "-CAfile"])
        .arg(&ca)
        .arg("-sess_in")
        .arg(&session)
        .arg("-early_data")
        .arg(&early)
        .arg("-ign_eof");
    let out = tokio::task::spawn_blocking(move || second.output().unwrap()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Reused, TLSv1.3"), "the session resumes within its generation: {stdout}");
    assert!(stdout.contains("Max Early Data: 0"), "{stdout}");
    assert!(stdout.contains("Early data was not sent"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_sends_a_proxy_protocol_header_to_a_listener_that_requires_one() {
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    let upstream = Upstream::start().await;
    let config = f.config(&format!("[[route]]\nupstream = \"{}\"\n", upstream.url())).replacen(
        "bind = \"127.0.0.1:0\"\n",
        "bind = \"127.0.0.1:0\"\nproxy_protocol = true\n",
        1,
    );
    let server = start_server(f.dir.path(), &config).await;
    let port = server.tls_addrs[0].port();

    // curl's own version 1 header, naming its side of the connection.
    let out = run(curl(&f, port, "a.example.test", &["--haproxy-protocol", "--http2"])).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("200 2"));
    assert_eq!(upstream.last().headers["x-forwarded-for"], "127.0.0.1");
    // Without it, the listener closes the connection.
    let out = run(curl(&f, port, "a.example.test", &[])).await;
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_a_client_certificate_is_served_and_without_one_is_refused() {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
    let f = Fixture::new();
    f.serve("c-a", &["a.example.test"]);
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    std::fs::write(f.dir.path().join("client-ca.pem"), ca_params.self_signed(&ca_key).unwrap().pem()).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params.signed_by(&client_key, &issuer).unwrap();
    let (cert, key) = (f.dir.path().join("client.pem"), f.dir.path().join("client.key"));
    std::fs::write(&cert, client.pem()).unwrap();
    std::fs::write(&key, client_key.serialize_pem()).unwrap();
    let server = f.start(&format!("[tls.client_auth]\nca = \"client-ca.pem\"\n\n{HELLO}")).await;
    let port = server.tls_addrs[0].port();

    let with_certificate = ["--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()];
    for version in ["--http1.1", "--http2"] {
        let extra: Vec<&str> = with_certificate.iter().copied().chain([version]).collect();
        let out = run(curl(&f, port, "a.example.test", &extra)).await;
        assert!(out.status.success(), "{version}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("hello\n\n200"), "{version}");
    }
    // Without one, over TLS 1.3 and 1.2: refused.
    for extra in [&[][..], &["--tls-max", "1.2"][..]] {
        let out = run(curl(&f, port, "a.example.test", extra)).await;
        assert!(!out.status.success(), "no certificate ({extra:?}): {}", String::from_utf8_lossy(&out.stdout));
    }
}
