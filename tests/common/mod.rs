//! Test harness shared by the integration tests: a real sealgate on loopback, real TLS clients (rustls),
//! HTTP/1.1 and HTTP/2 clients (hyper), and a real upstream (a hyper server) that records what it receives.
#![allow(dead_code)]

pub mod h2raw;
pub mod raw;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::ClientConfig;
use sealgate::config::Config;
use sealgate::server::RunningServer;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Logs to the test's captured output once per test binary (`RUST_LOG` to choose the level).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("sealgate=debug"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// Writes `config` as `proxy.toml` in `dir` and starts a server from it.
pub async fn start_server(dir: &Path, config: &str) -> RunningServer {
    init_logging();
    let path = dir.join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    let config = Config::load(&path).unwrap();
    sealgate::server::start(config).await.unwrap()
}

/// A proxy.toml for `export` and `grantee` with one listener on an ephemeral port, an admin endpoint, and
/// `routes` appended verbatim.
pub fn config_text(export: &Path, grantee: &str, routes: &str) -> String {
    format!(
        "[custody]\nexport = {export:?}\ngrantee = {grantee:?}\n\n[[listener]]\nbind = \"127.0.0.1:0\"\n\n\
         [admin]\nbind = \"127.0.0.1:0\"\n\n{routes}\n",
        export = export.display().to_string(),
    )
}

/// A TLS client config trusting `ca_pem`, offering `alpn`.
pub fn client_config(ca_pem: &[u8], alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Opens a TLS connection to `addr` with SNI `sni`.
pub async fn connect(addr: SocketAddr, sni: &str, config: Arc<ClientConfig>) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_owned()).map_err(std::io::Error::other)?;
    TlsConnector::from(config).connect(name, tcp).await
}

/// The leaf certificate the server presented.
pub fn peer_leaf(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
}

/// An HTTP/1.1 client connection over `stream`.
pub async fn http1(stream: TlsStream<TcpStream>) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    sender
}

/// An HTTP/2 client connection over `stream`.
pub async fn http2(stream: TlsStream<TcpStream>) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    sender
}

/// A GET request for `host` and `path` (HTTP/1.1 form: `Host` header, origin-form target).
pub fn get(host: &str, path: &str) -> Request<Full<Bytes>> {
    Request::builder().uri(path).header("host", host).body(Full::new(Bytes::new())).unwrap()
}

/// A GET request in HTTP/2 form (`:authority` from an absolute URI).
pub fn get_h2(host: &str, path: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(format!("https://{host}{path}"))
        .version(http::Version::HTTP_2)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// Reads a whole response body as text.
pub async fn text(response: Response<Incoming>) -> (StatusCode, String) {
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Method.
    pub method: http::Method,
    /// Request target.
    pub uri: http::Uri,
    /// Version.
    pub version: http::Version,
    /// Headers.
    pub headers: http::HeaderMap,
    /// Number of body bytes.
    pub body_len: u64,
    /// The SNI of the TLS connection it came on (TLS upstreams only).
    pub sni: Option<String>,
}

/// A real upstream: a hyper HTTP/1.1 server on loopback that records every request and answers
/// `200 upstream: <path>`.
#[derive(Debug)]
pub struct Upstream {
    /// Its address.
    pub addr: SocketAddr,
    /// Every request received, in order.
    pub recorded: Arc<Mutex<Vec<Recorded>>>,
}

impl Upstream {
    /// Starts an upstream that answers `200 upstream: <path>` after reading the whole body.
    pub async fn start() -> Self {
        Self::start_with(|_request: &Recorded| Response::new(Full::new(Bytes::new()))).await
    }

    /// Starts an upstream whose response is built by `respond` (the body defaults to `upstream: <path>` when
    /// `respond` leaves it empty).
    pub async fn start_with<F>(respond: F) -> Self
    where
        F: Fn(&Recorded) -> Response<Full<Bytes>> + Send + Sync + 'static,
    {
        Self::start_async(move |record| {
            let response = respond(&record);
            async move { Some(response) }
        })
        .await
    }

    /// The last request received.
    pub fn last(&self) -> Recorded {
        self.recorded.lock().unwrap().last().cloned().expect("the upstream received no request")
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Polls `condition` every few milliseconds until it holds or `timeout` passes.
pub async fn wait_until<F: FnMut() -> bool>(timeout: Duration, mut condition: F) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A custody system in a temp dir writing one export, with helpers to issue and associate certificates.
pub struct Fixture {
    /// Holds the state and export.
    pub dir: tempfile::TempDir,
    /// The custody side.
    pub custody: sealgate::custody::writer::Custody,
    /// The export directory.
    pub export: std::path::PathBuf,
    /// The local CA, PEM.
    pub ca_pem: String,
}

/// The grantee every fixture associates with.
pub const GRANTEE: &str = "sealgate-test";

impl Fixture {
    /// A fresh custody state and an empty export directory.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("sealgate-test-").tempdir().unwrap();
        let custody = sealgate::custody::writer::Custody::open(&dir.path().join("state")).unwrap();
        let export = dir.path().join("export");
        std::fs::create_dir_all(&export).unwrap();
        let ca_pem = custody.ca_certificate_pem().unwrap();
        Self { dir, custody, export, ca_pem }
    }

    /// Issues a certificate `id` for `names` from the local CA (no association).
    pub fn issue(&self, id: &str, names: &[&str]) -> sealgate::custody::writer::CertificateRecord {
        let mut request = sealgate::custody::writer::IssueRequest::new(names.iter().copied());
        request.certificate_id = Some(id.to_owned());
        self.custody.issue(&request).unwrap()
    }

    /// Associates certificate `id` with [`GRANTEE`] in the export; returns the grant id.
    pub fn associate(&self, id: &str) -> String {
        let request = sealgate::custody::writer::AssociateRequest::new(id, &self.export, GRANTEE);
        self.custody.associate(&request).unwrap().grant_id
    }

    /// Issues and associates; returns the grant id.
    pub fn serve(&self, id: &str, names: &[&str]) -> String {
        self.issue(id, names);
        self.associate(id)
    }

    /// A proxy.toml for this export with `routes`.
    pub fn config(&self, routes: &str) -> String {
        config_text(&self.export, GRANTEE, routes)
    }

    /// A TLS client config trusting the local CA, offering `alpn`.
    pub fn client(&self, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        client_config(self.ca_pem.as_bytes(), alpn)
    }

    /// The certificate `id`'s current leaf, DER.
    pub fn leaf(&self, id: &str) -> CertificateDer<'static> {
        let pem = self.custody.certificate(id).unwrap().certificate_pem;
        CertificateDer::pem_slice_iter(pem.as_bytes()).next().unwrap().unwrap().into_owned()
    }

    /// Starts a server on this export with `routes`.
    pub async fn start(&self, routes: &str) -> RunningServer {
        start_server(self.dir.path(), &self.config(routes)).await
    }
}

/// A `respond` route answering 200 `hello` for any host.
pub const HELLO: &str = "[[route]]\nrespond = { status = 200, body = \"hello\\n\" }\n";

/// Polls the async `condition` until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The leaf a fresh handshake for `sni` gets, or `None` when the handshake fails.
pub async fn leaf_for(addr: SocketAddr, sni: &str, config: Arc<ClientConfig>) -> Option<CertificateDer<'static>> {
    connect(addr, sni, config).await.ok().map(|tls| peer_leaf(&tls))
}

/// Whether a handshake for `sni` fails with an alert from the server.
pub async fn refused_with_alert(addr: SocketAddr, sni: &str, config: Arc<ClientConfig>) -> bool {
    match connect(addr, sni, config).await {
        Ok(_) => false,
        Err(error) => matches!(
            error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()),
            Some(rustls::Error::AlertReceived(_))
        ),
    }
}

/// Deadline for a change to the export to show in handshakes: generous for a loaded 2-core CI machine; the
/// latency goal itself (50 ms) is measured by the benchmarks, not here.
pub const APPLY_DEADLINE: Duration = Duration::from_secs(5);

impl Fixture {
    /// A proxy.toml with `custody_extra` appended to `[custody]`.
    pub fn config_with(&self, custody_extra: &str, routes: &str) -> String {
        self.config(routes).replacen("\n\n[[listener]]", &format!("\n{custody_extra}\n\n[[listener]]"), 1)
    }

    /// The grant of certificate `id`'s association.
    pub fn grant_of(&self, id: &str) -> String {
        sealgate::custody::writer::grant_id_of(id, &self.export).unwrap().unwrap()
    }
}

/// Whether a handshake for `sni` fails, whether by an alert or because nothing listens any more.
pub async fn handshake_fails(addr: SocketAddr, sni: &str, config: Arc<ClientConfig>) -> bool {
    connect(addr, sni, config).await.is_err()
}

/// What an asynchronous upstream does with a request: answer it, or close the connection without an answer
/// (`None`).
pub type Reply = Option<Response<Full<Bytes>>>;

impl Upstream {
    /// Starts an upstream that records each request (body read in full) as soon as it arrives, then answers what
    /// the future `respond` returns (an empty body becomes `upstream: <path>`), or closes the connection.
    pub async fn start_async<F, Fut>(respond: F) -> Self
    where
        F: Fn(Recorded) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Reply> + Send + 'static,
    {
        Self::serve(None, respond).await
    }

    /// [`Upstream::start_async`] over TLS with `tls` (its `sni` recorded).
    pub async fn start_tls<F, Fut>(tls: Arc<rustls::ServerConfig>, respond: F) -> Self
    where
        F: Fn(Recorded) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Reply> + Send + 'static,
    {
        Self::serve(Some(tokio_rustls::TlsAcceptor::from(tls)), respond).await
    }

    async fn serve<F, Fut>(tls: Option<tokio_rustls::TlsAcceptor>, respond: F) -> Self
    where
        F: Fn(Recorded) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Reply> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let respond = Arc::new(respond);
        let log = Arc::clone(&recorded);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (log, respond, tls) = (Arc::clone(&log), Arc::clone(&respond), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        None => serve_recorded(TokioIo::new(tcp), None, log, respond).await,
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(tcp).await else { return };
                            let sni = stream.get_ref().1.server_name().map(str::to_owned);
                            serve_recorded(TokioIo::new(stream), sni, log, respond).await
                        }
                    }
                });
            }
        });
        Self { addr, recorded }
    }

    /// Number of requests received.
    pub fn count(&self) -> usize {
        self.recorded.lock().unwrap().len()
    }

    /// Number of requests received with `method` for a path starting with `prefix`.
    pub fn count_of(&self, method: &str, prefix: &str) -> usize {
        self.recorded.lock().unwrap().iter().filter(|r| r.method == method && r.uri.path().starts_with(prefix)).count()
    }
}

async fn serve_recorded<I, F, Fut>(io: I, sni: Option<String>, log: Arc<Mutex<Vec<Recorded>>>, respond: Arc<F>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    F: Fn(Recorded) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Reply> + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let (log, respond, sni) = (Arc::clone(&log), Arc::clone(&respond), sni.clone());
        async move {
            let (parts, mut body) = request.into_parts();
            let mut body_len = 0u64;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.map_err(std::io::Error::other)?.into_data() {
                    body_len += data.len() as u64;
                }
            }
            let record = Recorded {
                method: parts.method,
                uri: parts.uri,
                version: parts.version,
                headers: parts.headers,
                body_len,
                sni,
            };
            let uri = record.uri.clone();
            log.lock().unwrap().push(record.clone());
            let Some(mut response) = respond(record).await else {
                // An error from the service makes hyper close the connection without writing a response.
                return Err::<Response<Full<Bytes>>, _>(std::io::Error::other("no answer"));
            };
            if response.body().clone().collect().await.unwrap().to_bytes().is_empty() {
                *response.body_mut() = Full::new(Bytes::from(format!("upstream: {uri}")));
            }
            Ok(response)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
}

/// A `GET` of `path` on the admin endpoint at `admin`.
pub async fn admin_get(admin: SocketAddr, path: &str) -> (StatusCode, String) {
    let tcp = TcpStream::connect(admin).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let request = Request::builder().uri(path).header("host", "admin").body(Full::new(Bytes::new())).unwrap();
    text(sender.send_request(request).await.unwrap()).await
}

/// A TLS connection to the server's first listener for `sni`, offering `alpn`, trusting the fixture's CA.
pub async fn tls_to(f: &Fixture, server: &RunningServer, sni: &str, alpn: &[u8]) -> TlsStream<TcpStream> {
    connect(server.tls_addrs[0], sni, f.client(&[alpn])).await.unwrap()
}

/// The lines `child` writes to its (piped) stderr, as they come. stderr is drained for the child's whole life,
/// even once the receiver is dropped: a full pipe would block the child's logging.
pub fn stderr_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// A child process killed and reaped when dropped, however the test ends: a test that fails must not leave a
/// server running, which would also hold the test runner's output pipe open.
pub struct KillOnDrop(pub std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `sealgate run --config CONFIG` as a child process logging at `info` to a piped stderr, killed when dropped.
pub fn spawn_run(config: &Path) -> KillOnDrop {
    KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_sealgate"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// A loopback port outside the kernel's ephemeral range (Linux's default is 32768-60999), free when asked. For
/// tests that check that a listener is closed: a port bound with port 0 comes from that range, and once closed
/// another test's `bind(0)` may be given it, making the closed listener look open (and keeping the server from
/// binding it again). Each call in a process gives another port.
pub fn reserved_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Apart for the test binaries of one `cargo test` run (they run one after the other anyway).
    let base = 20_000 + (std::process::id() % 500) as u16 * 20;
    loop {
        let candidate = base + NEXT.fetch_add(1, Ordering::Relaxed) % 10_000;
        let candidate = if candidate >= 32_000 { candidate - 12_000 } else { candidate };
        if std::net::TcpListener::bind(("127.0.0.1", candidate)).is_ok() {
            return candidate;
        }
    }
}

/// `config` with its (first) listener on `port`.
pub fn with_listener_port(config: &str, port: u16) -> String {
    config.replacen("[[listener]]\nbind = \"127.0.0.1:0\"", &format!("[[listener]]\nbind = \"127.0.0.1:{port}\""), 1)
}
