//! The client side of every measurement: TLS configurations that never resume (or, for the probe, try to),
//! and a minimal HTTP/1.1 exchange over any stream.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use aws_lc_rs::agreement;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, Resumption};
use rustls::crypto::{aws_lc_rs as lc, ActiveKeyExchange, CryptoProvider, SharedSecret, SupportedKxGroup};
use rustls::{ClientConfig, DigitallySignedStruct, NamedGroup, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Accepts any certificate and signature. The load client must cost less than the servers it measures, and
/// verifying an ECDSA signature costs more than making one; `bench/run` checks every server's chain with curl
/// (which does verify) before it measures.
#[derive(Debug)]
struct AcceptAnything(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// X25519 with one key pair for the whole run: the client's share of a handshake without its key generation.
///
/// The server's work per handshake is the same whatever key share the client sends (it generates its own and
/// derives the shared secret), so reusing the client's does not change what is measured; it lowers the load
/// generator's cost, whose one core otherwise capped sealgate's handshake runs (91-97 % busy at 3,600 /s).
#[derive(Debug)]
struct ReusedX25519 {
    private: agreement::PrivateKey,
    public: Vec<u8>,
}

static REUSED_X25519: OnceLock<ReusedX25519> = OnceLock::new();

impl ReusedX25519 {
    fn get() -> &'static Self {
        REUSED_X25519.get_or_init(|| {
            let private = agreement::PrivateKey::generate(&agreement::X25519)
                .expect("aws-lc generates X25519 keys (it only fails without randomness)");
            let public =
                private.compute_public_key().expect("an X25519 private key has a public key").as_ref().to_vec();
            Self { private, public }
        })
    }
}

impl SupportedKxGroup for ReusedX25519 {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, rustls::Error> {
        Ok(Box::new(ReusedShare(Self::get())))
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

#[derive(Debug)]
struct ReusedShare(&'static ReusedX25519);

impl ActiveKeyExchange for ReusedShare {
    fn complete(self: Box<Self>, peer_pub_key: &[u8]) -> Result<SharedSecret, rustls::Error> {
        let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, peer_pub_key);
        agreement::agree(
            &self.0.private,
            peer,
            rustls::Error::from(rustls::PeerMisbehaved::InvalidKeyShare),
            |secret| Ok(SharedSecret::from(secret)),
        )
    }

    fn pub_key(&self) -> &[u8] {
        &self.0.public
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

/// TLS version for a client configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// TLS 1.3 only (every measurement).
    Tls13,
    /// TLS 1.2 only (the resumption probe).
    Tls12,
}

/// X25519 only (TLS 1.3: one client key pair for the run, see [`ReusedX25519`]), one cipher suite (AES-128-GCM),
/// no resumption unless `sessions` is given.
pub fn config(version: Version, alpn: &[&[u8]], sessions: Option<Arc<dyn ClientSessionStore>>) -> Arc<ClientConfig> {
    let mut provider = lc::default_provider();
    // X25519 only. TLS 1.2 (the resumption probe alone) also offers P-256: OpenSSL servers refuse an ECDSA P-256
    // certificate to a TLS 1.2 client that does not list its curve.
    provider.kx_groups = match version {
        Version::Tls13 => vec![ReusedX25519::get() as &'static dyn SupportedKxGroup],
        Version::Tls12 => vec![lc::kx_group::X25519, lc::kx_group::SECP256R1],
    };
    let (versions, suite): (&[&'static rustls::SupportedProtocolVersion], _) = match version {
        Version::Tls13 => (&[&rustls::version::TLS13], lc::cipher_suite::TLS13_AES_128_GCM_SHA256),
        Version::Tls12 => (&[&rustls::version::TLS12], lc::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
    };
    provider.cipher_suites = vec![suite];
    let provider = Arc::new(provider);
    let mut config = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .expect("aws-lc-rs's provider supports TLS 1.2 and 1.3 with the suite and groups chosen above")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything(provider)))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.resumption = match sessions {
        Some(store) => Resumption::store(store),
        None => Resumption::disabled(),
    };
    Arc::new(config)
}

/// A session store that counts the TLS 1.3 tickets and TLS 1.2 sessions the server hands out.
#[derive(Debug)]
pub struct CountingStore {
    inner: ClientSessionMemoryCache,
    /// TLS 1.3 tickets received.
    pub tls13_tickets: AtomicUsize,
    /// TLS 1.2 sessions (id or ticket) received.
    pub tls12_sessions: AtomicUsize,
}

impl Default for CountingStore {
    fn default() -> Self {
        Self {
            inner: ClientSessionMemoryCache::new(64),
            tls13_tickets: AtomicUsize::new(0),
            tls12_sessions: AtomicUsize::new(0),
        }
    }
}

impl ClientSessionStore for CountingStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.inner.set_kx_hint(server_name, group);
    }
    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.inner.kx_hint(server_name)
    }
    fn set_tls12_session(&self, server_name: ServerName<'static>, value: rustls::client::Tls12ClientSessionValue) {
        self.tls12_sessions.fetch_add(1, Ordering::Relaxed);
        self.inner.set_tls12_session(server_name, value);
    }
    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.inner.tls12_session(server_name)
    }
    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.inner.remove_tls12_session(server_name);
    }
    fn insert_tls13_ticket(&self, server_name: ServerName<'static>, value: rustls::client::Tls13ClientSessionValue) {
        self.tls13_tickets.fetch_add(1, Ordering::Relaxed);
        self.inner.insert_tls13_ticket(server_name, value);
    }
    fn take_tls13_ticket(&self, server_name: &ServerName<'static>) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.inner.take_tls13_ticket(server_name)
    }
}

/// A server name for SNI, from a name that [`parse_sni`] accepted (`--sni`) or that sgbench made itself
/// (`n<i>.bench.test` and the like).
pub fn server_name(name: &str) -> ServerName<'static> {
    ServerName::try_from(name.to_owned())
        .expect("--sni names are checked by parse_sni when parsed; the names sgbench makes are valid DNS names")
}

/// `--sni`: a valid DNS name or IP address.
pub fn parse_sni(name: &str) -> Result<String, String> {
    ServerName::try_from(name).map(|_| name.to_owned()).map_err(|e| format!("not a DNS name or IP address: {e}"))
}

/// TCP connect (no Nagle), then a TLS handshake.
pub async fn connect(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    sni: ServerName<'static>,
) -> io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    TlsConnector::from(Arc::clone(config)).connect(sni, tcp).await
}

/// `GET path` with `Host: host`, keep-alive or `Connection: close`.
pub fn get_request(path: &str, host: &str, close: bool) -> Vec<u8> {
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sgbench\r\n{connection}\r\n").into_bytes()
}

/// One HTTP/1.1 connection's read buffer.
#[derive(Debug)]
pub struct H1 {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Default for H1 {
    fn default() -> Self {
        Self { buf: vec![0; 64 * 1024], start: 0, end: 0 }
    }
}

impl H1 {
    /// Forgets what was read, for another connection: one buffer serves a loop of connections (zeroing 64 KiB
    /// for each was 4 % of the handshake scenario's client).
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }
}

/// What one response was.
#[derive(Debug, Clone, Copy)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Body bytes.
    pub body: u64,
}

impl H1 {
    async fn fill<S: AsyncRead + Unpin>(&mut self, stream: &mut S) -> io::Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.end == self.buf.len() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "response head too large"));
            }
        }
        let n = stream.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-response"));
        }
        self.end += n;
        Ok(())
    }

    /// Sends `request` and reads one whole response (Content-Length or chunked), discarding the body.
    pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        request: &[u8],
    ) -> io::Result<Response> {
        stream.write_all(request).await?;
        stream.flush().await?;
        self.read_response(stream).await
    }

    /// Reads one whole response, discarding the body.
    pub async fn read_response<S: AsyncRead + Unpin>(&mut self, stream: &mut S) -> io::Result<Response> {
        let head_end = loop {
            if let Some(i) = find(&self.buf[self.start..self.end], b"\r\n\r\n") {
                break self.start + i + 4;
            }
            self.fill(stream).await?;
        };
        let head = std::str::from_utf8(&self.buf[self.start..head_end])
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "response head is not UTF-8"))?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no status line"))?;
        let mut length = None;
        let mut chunked = false;
        for line in head.split("\r\n").skip(1) {
            let Some((name, value)) = line.split_once(':') else { continue };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse::<u64>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
        self.start = head_end;
        let body = if chunked {
            self.read_chunked(stream).await?
        } else {
            let length = length.unwrap_or(0);
            self.skip(stream, length).await?;
            length
        };
        Ok(Response { status, body })
    }

    async fn skip<S: AsyncRead + Unpin>(&mut self, stream: &mut S, mut n: u64) -> io::Result<()> {
        while n > 0 {
            if self.start == self.end {
                self.fill(stream).await?;
            }
            let take = n.min((self.end - self.start) as u64);
            self.start += take as usize;
            n -= take;
        }
        Ok(())
    }

    async fn line<S: AsyncRead + Unpin>(&mut self, stream: &mut S) -> io::Result<String> {
        loop {
            if let Some(i) = find(&self.buf[self.start..self.end], b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[self.start..self.start + i]).into_owned();
                self.start += i + 2;
                return Ok(line);
            }
            self.fill(stream).await?;
        }
    }

    async fn read_chunked<S: AsyncRead + Unpin>(&mut self, stream: &mut S) -> io::Result<u64> {
        let mut total = 0;
        loop {
            let line = self.line(stream).await?;
            let size = u64::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            if size == 0 {
                // Trailers, then the empty line.
                while !self.line(stream).await?.is_empty() {}
                return Ok(total);
            }
            self.skip(stream, size).await?;
            total += size;
            self.line(stream).await?;
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
