//! `proxy.toml` -> a validated [`Config`].
//!
//! Parsing happens in two layers: serde structs that mirror the file (unknown keys refused, values kept with
//! their byte spans), then validation into the types the rest of sealgate uses. Every error names the file, the
//! line and column, and the key; none quotes a secret (an upstream URL's credentials are never echoed).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::custody::format::line_and_column;
use crate::names;

/// A configuration error, with the place it was found.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", path.display(), position.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
pub struct ConfigError {
    /// The configuration file.
    pub path: PathBuf,
    /// 1-based line and column, when known.
    pub position: Option<(usize, usize)>,
    /// What is wrong, naming the key.
    pub message: String,
}

/// Result alias of this module.
pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// SHA-256 of the text it was parsed from: what a watcher of the file compares the file with, to tell
    /// whether the contents on disk are still the ones running.
    pub source_sha256: [u8; 32],
    /// Where the custody export is and who we are to it.
    pub custody: CustodyConfig,
    /// TLS policy.
    pub tls: TlsConfig,
    /// TLS listeners.
    pub listeners: Vec<ListenerConfig>,
    /// The plain-HTTP admin endpoint, if any.
    pub admin: Option<AdminConfig>,
    /// Proxying defaults.
    pub proxy: ProxyConfig,
    /// Routes, in file order.
    pub routes: Vec<RouteConfig>,
    /// Tokio runtime settings.
    pub runtime: RuntimeConfig,
    /// Logging.
    pub log: LogConfig,
    /// The audit log, if any.
    pub audit: Option<AuditConfig>,
    /// Process hygiene.
    pub process: ProcessConfig,
    /// Plain-HTTP listeners that redirect to HTTPS.
    pub redirects: Vec<RedirectConfig>,
    /// `Strict-Transport-Security` on every response, if configured.
    pub hsts: Option<HstsConfig>,
    /// Headers set on (or removed from) every response, replacing an upstream's of the same name: security
    /// headers, above all. A route's own `response_headers` take precedence.
    pub response_headers: Vec<HeaderRule>,
    /// The access log, if any.
    pub access_log: Option<crate::access_log::AccessLogConfig>,
    /// Response compression, if configured.
    pub compression: Option<CompressionConfig>,
    /// How long clients may take.
    pub timeouts: TimeoutsConfig,
    /// How much clients may ask for.
    pub limits: LimitsConfig,
}

/// `[custody]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustodyConfig {
    /// The export directory, resolved against the config file's directory.
    pub export: PathBuf,
    /// Our principal: grants issued to anyone else are refused.
    pub grantee: String,
    /// Period of the full rescan that backs up file events.
    pub rescan_interval: Duration,
}

/// Lowest TLS version accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

impl fmt::Display for TlsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tls12 => "1.2",
            Self::Tls13 => "1.3",
        })
    }
}

/// Key exchange groups that can be pinned (for benchmarks, or to turn post-quantum key exchange off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyExchange {
    /// X25519MLKEM768 (hybrid post-quantum).
    X25519MlKem768,
    /// X25519.
    X25519,
    /// NIST P-256.
    Secp256r1,
    /// NIST P-384.
    Secp384r1,
}

/// `[compression]`: responses compressed for clients that accept it (see [`crate::proxy::compress`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressionConfig {
    /// The codings offered, in preference order (never empty).
    pub codings: Vec<Coding>,
    /// Media types compressed: `type/subtype`, or `type/*`.
    pub types: Vec<String>,
    /// Responses declared shorter than this are sent as they are.
    pub min_bytes: u64,
}

/// A content coding sealgate can compress with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    /// `gzip`.
    Gzip = 0,
    /// `br` (Brotli).
    Brotli = 1,
}

impl Coding {
    /// Every coding, by its index.
    pub const ALL: [Coding; 2] = [Coding::Gzip, Coding::Brotli];

    /// Its `Accept-Encoding` / `Content-Encoding` token.
    pub fn token(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Brotli => "br",
        }
    }
}

/// The media types `[compression]` compresses when it names none: text, and the structured formats that are
/// text (JSON, JavaScript, XML, SVG), plus WebAssembly; never images, audio, video or archives, which are
/// compressed already.
pub const DEFAULT_COMPRESSED_TYPES: &[&str] = &[
    "text/*",
    "application/json",
    "application/javascript",
    "application/xml",
    "application/rss+xml",
    "application/atom+xml",
    "application/manifest+json",
    "application/ld+json",
    "application/problem+json",
    "application/wasm",
    "image/svg+xml",
];

/// `[compression] min_bytes` when not set: below about a kilobyte compression saves less than it costs.
pub const DEFAULT_COMPRESSION_MIN_BYTES: u64 = 1024;

/// `[tls]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// Lowest version; custody policy forbids anything below 1.2.
    pub min_version: TlsVersion,
    /// Whether sessions may be resumed (TLS 1.3 tickets, TLS 1.2 session ids). Sessions are always scoped to one
    /// certificate generation.
    pub session_resumption: bool,
    /// Sessions remembered per certificate generation.
    pub session_cache_size: usize,
    /// Certificate to present when the client sends no SNI or an unknown name. Absent: refuse the handshake.
    pub default_certificate: Option<String>,
    /// Key exchange groups in preference order; empty means the provider's defaults.
    pub key_exchange: Vec<KeyExchange>,
    /// Time allowed for the whole TLS handshake.
    pub handshake_timeout: Duration,
    /// Client certificates asked for (mutual TLS), if any.
    pub client_auth: Option<ClientAuthConfig>,
}

/// `[tls.client_auth]`: mutual TLS, client certificates verified against the operator's CAs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuthConfig {
    /// PEM file of the CAs a client certificate must chain to.
    pub ca: PathBuf,
    /// Whether a client may connect without a certificate.
    pub mode: ClientAuthMode,
    /// PEM files of certificate revocation lists, checked for the whole chain.
    pub crl: Vec<PathBuf>,
    /// Whether upstreams are told who the client is (`X-Forwarded-Client-Cert`).
    pub forward: bool,
}

/// Whether a client certificate is required.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuthMode {
    /// A client without a valid certificate is refused in the handshake.
    Required,
    /// A client may send no certificate; one it sends must be valid.
    Optional,
}

/// One `[[listener]]`.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Address to bind.
    pub bind: SocketAddr,
    /// Every connection starts with a PROXY protocol header (version 1 or 2) from a load balancer, which gives
    /// the client's address; connections without one are closed.
    pub proxy_protocol: bool,
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Address to bind (plain HTTP).
    pub bind: SocketAddr,
}

/// `[proxy]`: defaults for every upstream route.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Time allowed to connect to an upstream.
    pub connect_timeout: Duration,
    /// Time allowed for an upstream to answer with response headers.
    pub response_timeout: Duration,
    /// Time an upstream may send nothing of a response body it has begun (nginx's `proxy_read_timeout`).
    pub read_timeout: Duration,
    /// Idle upstream connections are closed after this long.
    pub pool_idle_timeout: Duration,
    /// Idle upstream connections kept per upstream.
    pub pool_max_idle_per_host: usize,
    /// Send the client's `Host` upstream (true) or the upstream's own authority (false).
    pub preserve_host: bool,
    /// Give every request an `X-Request-Id` (upstream, response and access log).
    pub request_id: bool,
}

/// One `[[route]]`.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Exact host or `*.example.com`, normalised; `None` matches any host.
    pub host: Option<String>,
    /// Path prefix (plain string prefix, as nginx, HAProxy and Envoy do); `/` when absent.
    pub path: String,
    /// What the route does.
    pub action: RouteAction,
    /// Overrides `[proxy] response_timeout` for this route.
    pub response_timeout: Option<Duration>,
    /// Headers set on or removed from this route's responses, over the top-level `[response_headers]`.
    pub response_headers: Vec<HeaderRule>,
    /// The per-client request rate limit, if any.
    pub rate_limit: Option<RateLimitConfig>,
    /// Which clients the route answers (403 for the others).
    pub clients: ClientFilter,
    /// Overrides `[limits] max_body_bytes` for this route's requests.
    pub max_body_bytes: Option<u64>,
    /// Only connections made with a verified client certificate are answered (403 for the others).
    pub require_client_certificate: bool,
    /// Whether the route's responses may be compressed (`[compression]`); true unless turned off.
    pub compress: bool,
}

/// A header a configuration sets or removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderRule {
    /// The header.
    pub name: http::HeaderName,
    /// Its value; `None` (written `""`, as nginx's `proxy_set_header` does) removes it.
    pub value: Option<http::HeaderValue>,
}

impl HeaderRule {
    /// Applies the rule to `headers`: replaces every value of the name, or removes them.
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        match &self.value {
            Some(value) => {
                headers.insert(self.name.clone(), value.clone());
            }
            None => {
                headers.remove(&self.name);
            }
        }
    }
}

/// `rate_limit = { rate = "10/s", burst = 20 }`: how many requests one client may send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Requests allowed per `per` at the steady rate.
    pub requests: u32,
    /// The period of `requests`: a second or a minute.
    pub per: Duration,
    /// Requests a client may send at once (at least 1).
    pub burst: u32,
}

/// `allow` and `deny`: which client addresses a route answers. A client in `deny` is refused; otherwise, when
/// `allow` is set, a client in none of its blocks is refused.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientFilter {
    /// Blocks a client must be in, when not empty.
    pub allow: Vec<ipnet::IpNet>,
    /// Blocks refused.
    pub deny: Vec<ipnet::IpNet>,
}

impl ClientFilter {
    /// Whether the route answers `client` (an IPv4-mapped IPv6 address is its IPv4 address, as a dual-stack
    /// listener reports IPv4 clients).
    pub fn admits(&self, client: std::net::IpAddr) -> bool {
        let client = client.to_canonical();
        let within = |blocks: &[ipnet::IpNet]| blocks.iter().any(|block| block.contains(&client));
        !within(&self.deny) && (self.allow.is_empty() || within(&self.allow))
    }

    /// Whether the filter lets every client through.
    pub fn is_open(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }
}

/// `prefix_rewrite`: the part of the request path that the route's `path` matched is replaced before the
/// request goes upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixRewrite {
    /// The route's `path`: the prefix every request of the route begins with.
    pub prefix: String,
    /// What replaces it; begins with `/`.
    pub replacement: String,
}

/// What a route does with a request.
#[derive(Debug, Clone)]
pub enum RouteAction {
    /// Forward to one of a group of upstreams (boxed: a group's settings are several times a fixed answer's).
    Upstream(Box<UpstreamGroupConfig>),
    /// Answer directly.
    Respond(DirectResponse),
    /// Answer with a redirect.
    Redirect(RedirectRoute),
}

/// `redirect = { to = "https://www.example.com$request_uri", status = 301 }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectRoute {
    /// The `Location`, with its variables.
    pub to: crate::proxy::location::LocationTemplate,
    /// 301, 302, 303, 307 or 308 (the default: the method and body are kept, and the move is permanent).
    pub status: http::StatusCode,
}

/// An upstream route's upstreams and how they are used: balancing, passive ejection, active health checks,
/// retries and the CA that verifies `https` upstreams.
#[derive(Debug, Clone)]
pub struct UpstreamGroupConfig {
    /// The upstreams, in file order (never empty).
    pub upstreams: Vec<UpstreamUrl>,
    /// How an upstream is chosen for a request.
    pub balance: Balance,
    /// How many times a failed request may be sent again, to another upstream when there is one.
    pub retries: u32,
    /// 5xx statuses whose answers are retried as transport failures are (none by default).
    pub retry_statuses: Vec<u16>,
    /// PEM file of the CAs trusted for `https` upstreams (required when there is one), resolved against the
    /// config file's directory.
    pub ca: Option<PathBuf>,
    /// Passive ejection after consecutive failures.
    pub outlier: OutlierConfig,
    /// Active HTTP health checks, if configured.
    pub health_check: Option<HealthCheckConfig>,
    /// The path prefix rewrite, if configured.
    pub prefix_rewrite: Option<PrefixRewrite>,
    /// Headers set on or removed from the requests sent upstream, after sealgate's own rewriting.
    pub request_headers: Vec<HeaderRule>,
    /// The HTTP version the upstreams speak.
    pub protocol: UpstreamProtocol,
    /// Overrides `[proxy] read_timeout` for this route.
    pub read_timeout: Option<Duration>,
}

/// `upstream_protocol`: the HTTP version an upstream route's upstreams speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    /// HTTP/1.1, on a pool of kept-alive connections.
    #[default]
    Http11,
    /// HTTP/2 (prior knowledge over `http`, ALPN `h2` over `https`), all requests on one connection per
    /// upstream: gRPC, and trailers both ways.
    Http2,
}

/// Load balancing policy of an upstream route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// Each upstream in turn.
    #[default]
    RoundRobin,
    /// The upstream with the fewest requests in flight; ties in turn.
    LeastRequests,
    /// The same client (address) to the same upstream while it is available.
    IpHash,
}

/// `outlier = { ... }`: passive ejection of an upstream after consecutive failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Failures in a row (connection errors, timeouts) that eject an upstream; 0 turns this ejection off.
    pub consecutive_failures: u32,
    /// 5xx responses (or failures) in a row that eject an upstream; 0 (the default) turns this ejection off.
    pub consecutive_5xx: u32,
    /// The first ejection's length; the n-th ejection in a row lasts n times this.
    pub base_ejection_time: Duration,
    /// The longest ejection.
    pub max_ejection_time: Duration,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            consecutive_5xx: 0,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(300),
        }
    }
}

/// `health_check = { ... }`: an active HTTP check of every upstream of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    /// Path (and query) requested with `GET`.
    pub path: http::uri::PathAndQuery,
    /// Time between the start of two checks.
    pub interval: Duration,
    /// Time allowed for one check's response headers.
    pub timeout: Duration,
    /// Passing checks in a row that make an unhealthy upstream healthy.
    pub healthy_threshold: u32,
    /// Failing checks in a row that make a healthy upstream unhealthy.
    pub unhealthy_threshold: u32,
    /// Statuses that pass, inclusive.
    pub expect_status: std::ops::RangeInclusive<u16>,
}

/// Scheme of an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamScheme {
    /// Plain HTTP/1.1.
    Http,
    /// HTTP/1.1 over TLS, verified against the route's `ca`.
    Https,
}

/// A validated upstream: `http://host:port` or `https://host:port`, no credentials, no path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// `http` or `https`.
    pub scheme: UpstreamScheme,
    /// `host:port` (port defaulted to 80 or 443).
    pub authority: http::uri::Authority,
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            UpstreamScheme::Http => "http",
            UpstreamScheme::Https => "https",
        };
        write!(f, "{scheme}://{}", self.authority)
    }
}

/// A fixed answer.
#[derive(Debug, Clone)]
pub struct DirectResponse {
    /// Status code.
    pub status: http::StatusCode,
    /// Body.
    pub body: String,
    /// `Content-Type`.
    pub content_type: String,
}

/// `[runtime]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RuntimeConfig {
    /// Tokio worker threads; `None` = one per core. One runs the connections, listeners and signal handling on
    /// the main thread (Tokio's current-thread runtime; custody reads still run on its blocking pool): with a
    /// single worker, the multi-threaded scheduler only adds cost.
    pub worker_threads: Option<usize>,
}

/// One `[[redirect]]`: a plain-HTTP listener answering every request with `308` to the same URL over https.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectConfig {
    /// Address to bind.
    pub bind: SocketAddr,
    /// Port of the https URL (omitted when 443, the default).
    pub https_port: u16,
    /// Every connection starts with a PROXY protocol header, as on a TLS listener.
    pub proxy_protocol: bool,
}

/// `[hsts]`: the `Strict-Transport-Security` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HstsConfig {
    /// `max-age`.
    pub max_age: Duration,
    /// `includeSubDomains`.
    pub include_subdomains: bool,
    /// `preload` (only meaningful with a max-age of at least a year and includeSubDomains).
    pub preload: bool,
}

impl HstsConfig {
    /// The header's value.
    pub fn header_value(&self) -> http::HeaderValue {
        let mut value = format!("max-age={}", self.max_age.as_secs());
        if self.include_subdomains {
            value.push_str("; includeSubDomains");
        }
        if self.preload {
            value.push_str("; preload");
        }
        // Digits, letters, '=', ';' and spaces only.
        http::HeaderValue::from_str(&value).unwrap_or(http::HeaderValue::from_static("max-age=0"))
    }
}

/// `[process]`: how the process protects the keys it holds (see [`crate::hygiene`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessConfig {
    /// Allow core dumps (default false: `RLIMIT_CORE` 0).
    pub core_dumps: bool,
    /// Leave the process dumpable (default false: `PR_SET_DUMPABLE` 0, which also closes `/proc/PID/mem` and
    /// ptrace to other processes of the same user).
    pub dumpable: bool,
    /// Lock all memory so that keys never reach swap, where permitted (default true; warns when not permitted).
    pub lock_memory: bool,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self { core_dumps: false, dumpable: false, lock_memory: true }
    }
}

/// Output format of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A `tracing` filter, e.g. `info` or `sealgate=debug`; `RUST_LOG` overrides it.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

/// `[audit]`: the append-only, hash-chained record of custody events (see [`crate::audit`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// The log file, resolved against the config file's directory.
    pub path: PathBuf,
}

/// `[timeouts]`: how long a client may take. The TLS handshake's deadline is `tls.handshake_timeout`; the
/// upstream side's are in `[proxy]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeoutsConfig {
    /// HTTP/1: time to receive a request's head (request line and headers). hyper starts this timer whenever the
    /// connection waits for a head, so it also bounds the keep-alive pause between two requests.
    pub header_read: Duration,
    /// A connection with no request in flight (HTTP/1 between requests, HTTP/2 with no open stream) is closed
    /// after this long.
    pub idle: Duration,
    /// Time from a request's head to the last byte of its body (Envoy's `request_timeout`): a body that is still
    /// arriving then is cut off, and the client gets 408 unless the response has begun. The response is not
    /// covered (downloads and event streams may run long; the upstream's first byte is `proxy.response_timeout`).
    pub request: Duration,
    /// A client that takes none of what sealgate has to send it (a response, a tunnel's bytes) for this long is
    /// disconnected (nginx's `send_timeout`): a stalled reader would otherwise hold its connection and
    /// its request open for ever, since a request in flight keeps `idle` from firing. Measured between two
    /// writes the socket takes, not over a whole response. On HTTP/2, a stream whose response waits this long
    /// on the client's flow-control window with no progress is reset.
    pub send: Duration,
    /// HTTP/2: a PING is sent after this long without a frame from the client.
    pub h2_keep_alive_interval: Duration,
    /// HTTP/2: the connection is closed when a PING is not acknowledged within this.
    pub h2_keep_alive_timeout: Duration,
    /// On SIGTERM or SIGINT: time for in-flight requests to finish once sealgate stops accepting; connections
    /// still open then are closed.
    pub drain: Duration,
    /// A WebSocket tunnel that carries no byte either way for this long is closed (HAProxy's `timeout tunnel`):
    /// a tunnel is a request in flight for its whole life, so `idle` never closes it.
    pub tunnel_idle: Duration,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            request: Duration::from_secs(60),
            send: Duration::from_secs(60),
            h2_keep_alive_interval: Duration::from_secs(30),
            h2_keep_alive_timeout: Duration::from_secs(10),
            drain: Duration::from_secs(10),
            tunnel_idle: Duration::from_secs(3600),
        }
    }
}

/// `[limits]`: how much a client may ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Open client connections per process (all listeners together); connections beyond it are accepted and
    /// closed at once.
    pub max_connections: usize,
    /// Header fields per request (431 beyond).
    pub max_header_count: usize,
    /// Bytes of a request's head: HTTP/1 request line and headers; HTTP/2 header list as HPACK counts it (each
    /// field's name and value plus 32). 431 beyond.
    pub max_header_bytes: usize,
    /// Bytes of the request target (scheme, authority, path and query); 414 beyond.
    pub max_uri_bytes: usize,
    /// Bytes of a request body; 413 beyond, whether the body declares its length or not.
    pub max_body_bytes: u64,
    /// HTTP/2 streams a client may have open at once on one connection.
    pub h2_max_concurrent_streams: u32,
}

/// Default of `limits.max_header_count`: hyper's own HTTP/1 default, which keeps its header parser on the stack.
pub const DEFAULT_MAX_HEADER_COUNT: usize = 100;

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_header_count: DEFAULT_MAX_HEADER_COUNT,
            max_header_bytes: 32 * 1024,
            max_uri_bytes: 8 * 1024,
            max_body_bytes: 100 * 1024 * 1024,
            h2_max_concurrent_streams: 100,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The file's shape.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    custody: RawCustody,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    listener: Vec<RawListener>,
    admin: Option<RawAdmin>,
    #[serde(default)]
    proxy: RawProxy,
    #[serde(default)]
    route: Vec<RawRoute>,
    #[serde(default)]
    runtime: RawRuntime,
    #[serde(default)]
    log: RawLog,
    audit: Option<RawAudit>,
    #[serde(default)]
    process: RawProcess,
    #[serde(default)]
    redirect: Vec<RawRedirect>,
    hsts: Option<RawHsts>,
    #[serde(default)]
    response_headers: HeaderTable,
    access_log: Option<RawAccessLog>,
    compression: Option<RawCompression>,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    limits: RawLimits,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedirect {
    bind: Spanned<String>,
    https_port: Option<u16>,
    proxy_protocol: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHsts {
    #[serde(with = "humantime_serde")]
    max_age: Duration,
    #[serde(default)]
    include_subdomains: bool,
    #[serde(default)]
    preload: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCompression {
    codings: Option<Spanned<Vec<String>>>,
    types: Option<Spanned<Vec<String>>>,
    min_bytes: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccessLog {
    path: Spanned<String>,
    format: Option<crate::access_log::AccessLogFormat>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCustody {
    export: Spanned<String>,
    grantee: Spanned<String>,
    #[serde(default, with = "humantime_serde::option")]
    rescan_interval: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTls {
    min_version: Option<Spanned<String>>,
    session_resumption: Option<bool>,
    session_cache_size: Option<usize>,
    default_certificate: Option<Spanned<String>>,
    key_exchange: Option<Vec<Spanned<String>>>,
    #[serde(default, with = "humantime_serde::option")]
    handshake_timeout: Option<Duration>,
    client_auth: Option<RawClientAuth>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClientAuth {
    ca: Spanned<String>,
    mode: Option<Spanned<String>>,
    #[serde(default)]
    crl: Vec<Spanned<String>>,
    forward: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    bind: Spanned<String>,
    proxy_protocol: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    bind: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    #[serde(default, with = "humantime_serde::option")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    response_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    read_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pool_idle_timeout: Option<Duration>,
    pool_max_idle_per_host: Option<usize>,
    preserve_host: Option<bool>,
    request_id: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    host: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    upstream: Option<Spanned<OneOrMany>>,
    respond: Option<Spanned<RawRespond>>,
    redirect: Option<Spanned<RawRedirectRoute>>,
    #[serde(default, with = "humantime_serde::option")]
    timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    read_timeout: Option<Duration>,
    balance: Option<Spanned<String>>,
    retries: Option<Spanned<u32>>,
    retry_statuses: Option<Spanned<Vec<u16>>>,
    ca: Option<Spanned<String>>,
    outlier: Option<Spanned<RawOutlier>>,
    health_check: Option<Spanned<RawHealthCheck>>,
    prefix_rewrite: Option<Spanned<String>>,
    request_headers: Option<Spanned<HeaderTable>>,
    #[serde(default)]
    response_headers: HeaderTable,
    rate_limit: Option<Spanned<RawRateLimit>>,
    allow: Option<Spanned<Vec<String>>>,
    deny: Option<Spanned<Vec<String>>>,
    max_body_bytes: Option<Spanned<u64>>,
    require_client_certificate: Option<Spanned<bool>>,
    upstream_protocol: Option<Spanned<String>>,
    compress: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    rate: String,
    burst: Option<u32>,
}

/// A table of header names and values, as written (`""` removes the header).
type HeaderTable = std::collections::BTreeMap<String, Spanned<String>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutlier {
    consecutive_failures: Option<u32>,
    consecutive_5xx: Option<u32>,
    #[serde(default, with = "humantime_serde::option")]
    base_ejection_time: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    max_ejection_time: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    path: String,
    #[serde(default, with = "humantime_serde::option")]
    interval: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    timeout: Option<Duration>,
    healthy_threshold: Option<u32>,
    unhealthy_threshold: Option<u32>,
    expect_status: Option<StatusRange>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StatusRange {
    One(u16),
    Range(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedirectRoute {
    to: String,
    status: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRespond {
    status: u16,
    #[serde(default)]
    body: String,
    content_type: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProcess {
    core_dumps: Option<bool>,
    dumpable: Option<bool>,
    lock_memory: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    worker_threads: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<LogFormat>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    path: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    #[serde(default, with = "humantime_serde::option")]
    header_read: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    idle: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    request: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    send: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    h2_keep_alive_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    h2_keep_alive_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    drain: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    tunnel_idle: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<Spanned<u64>>,
    max_header_count: Option<Spanned<u64>>,
    max_header_bytes: Option<Spanned<u64>>,
    max_uri_bytes: Option<Spanned<u64>>,
    max_body_bytes: Option<Spanned<u64>>,
    h2_max_concurrent_streams: Option<Spanned<u64>>,
}

// ---------------------------------------------------------------------------------------------------------------

/// Headers a configuration may not set on requests or responses: hyper and sealgate own the framing and the
/// connection.
const HOP_BY_HOP_OR_FRAMING: [&str; 8] =
    ["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "content-length"];

/// Headers a configuration may not set on responses either: `[hsts]` owns `Strict-Transport-Security`.
const RESPONSE_HEADERS_MANAGED: &[&str] = &["strict-transport-security"];

/// Headers a configuration may not set on upstream requests either: `Host` (see `[proxy] preserve_host`), and the
/// forwarding headers and `X-Request-Id` (see `[proxy] request_id`), which sealgate sets from what it saw itself
/// so that upstreams can trust them.
const REQUEST_HEADERS_MANAGED: &[&str] = &[
    "host",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-client-cert",
    "x-request-id",
];

/// Default period of the backstop rescan of the export.
pub const DEFAULT_RESCAN_INTERVAL: Duration = Duration::from_secs(2);

/// The longest health check interval: longer ones check nothing useful (and cannot be scheduled forever).
pub const MAX_HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(3600);

/// Default `retries` of an upstream route.
pub const DEFAULT_RETRIES: u32 = 1;

/// The most `retries` a route may set: each attempt is another upstream's chance, and more than a handful only
/// multiplies load on upstreams that are already failing.
pub const MAX_RETRIES: u32 = 5;

impl Config {
    /// Whether route `route` forwards to `upstream` (an upstream URL as it displays, the name metrics and logs
    /// give it).
    pub fn names_upstream(&self, route: usize, upstream: &str) -> bool {
        self.routes.get(route).is_some_and(|r| match &r.action {
            RouteAction::Upstream(group) => group.upstreams.iter().any(|url| url.to_string() == upstream),
            RouteAction::Respond(_) | RouteAction::Redirect(_) => false,
        })
    }

    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self> {
        crate::hygiene::refuse_world_writable(path, "configuration file").map_err(|e| ConfigError {
            path: path.to_owned(),
            position: None,
            message: e.to_string(),
        })?;
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_owned(),
            position: None,
            message: format!("cannot read the configuration: {e}"),
        })?;
        Self::parse(&text, path)
    }

    /// Validates `text` as if read from `path` (relative paths in it resolve against `path`'s directory).
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let cx = Context { path, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let position = e.span().map(|s| line_and_column(text, s.start));
            ConfigError { path: path.to_owned(), position, message: e.message().trim_end().to_owned() }
        })?;
        let base = path.parent().map(Path::to_owned).unwrap_or_default();

        let custody = cx.custody(raw.custody, &base)?;
        let tls = cx.tls(raw.tls, &base)?;
        let listeners = raw
            .listener
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let bind = cx.socket_addr(&format!("listener[{i}].bind"), &l.bind)?;
                Ok(ListenerConfig { bind, proxy_protocol: l.proxy_protocol.unwrap_or(false) })
            })
            .collect::<Result<Vec<_>>>()?;
        if listeners.is_empty() {
            return Err(cx.error(None, "at least one [[listener]] with a `bind` address is required"));
        }
        let admin = raw
            .admin
            .map(|a| Ok::<_, ConfigError>(AdminConfig { bind: cx.socket_addr("admin.bind", &a.bind)? }))
            .transpose()?;
        let mut binds: Vec<(SocketAddr, &str)> = listeners.iter().map(|l| (l.bind, "listener")).collect();
        binds.extend(admin.iter().map(|a| (a.bind, "admin")));
        for (i, (addr, what)) in binds.iter().enumerate() {
            if addr.port() != 0 && binds[..i].iter().any(|(other, _)| other == addr) {
                return Err(cx.error(None, format!("{what} bind address {addr} is used twice")));
            }
        }
        let proxy = ProxyConfig {
            connect_timeout: raw.proxy.connect_timeout.unwrap_or(Duration::from_secs(5)),
            response_timeout: raw.proxy.response_timeout.unwrap_or(Duration::from_secs(60)),
            read_timeout: timeout_in_range(raw.proxy.read_timeout.unwrap_or(Duration::from_secs(60)))
                .map_err(|why| cx.error(None, format!("proxy.read_timeout {why}")))?,
            pool_idle_timeout: raw.proxy.pool_idle_timeout.unwrap_or(Duration::from_secs(90)),
            pool_max_idle_per_host: raw.proxy.pool_max_idle_per_host.unwrap_or(64),
            preserve_host: raw.proxy.preserve_host.unwrap_or(true),
            request_id: raw.proxy.request_id.unwrap_or(false),
        };
        let routes =
            raw.route.into_iter().enumerate().map(|(i, r)| cx.route(i, r, &base, &tls)).collect::<Result<Vec<_>>>()?;
        let runtime = RuntimeConfig { worker_threads: raw.runtime.worker_threads };
        if runtime.worker_threads == Some(0) {
            return Err(cx.error(None, "runtime.worker_threads must be at least 1"));
        }
        let log = LogConfig {
            level: raw.log.level.unwrap_or_else(|| "info".to_owned()),
            format: raw.log.format.unwrap_or(LogFormat::Text),
        };
        let audit = raw.audit.map(|a| cx.audit(a, &base)).transpose()?;
        let defaults = ProcessConfig::default();
        let process = ProcessConfig {
            core_dumps: raw.process.core_dumps.unwrap_or(defaults.core_dumps),
            dumpable: raw.process.dumpable.unwrap_or(defaults.dumpable),
            lock_memory: raw.process.lock_memory.unwrap_or(defaults.lock_memory),
        };
        let redirects = raw
            .redirect
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let bind = cx.socket_addr(&format!("redirect[{i}].bind"), &r.bind)?;
                if listeners.iter().any(|l| l.bind == bind && bind.port() != 0) {
                    return Err(cx.at(&r.bind, &format!("redirect[{i}].bind"), "is also a TLS listener"));
                }
                let proxy_protocol = r.proxy_protocol.unwrap_or(false);
                Ok(RedirectConfig { bind, https_port: r.https_port.unwrap_or(443), proxy_protocol })
            })
            .collect::<Result<Vec<_>>>()?;
        let response_headers = cx.header_rules(&raw.response_headers, "response_headers", RESPONSE_HEADERS_MANAGED)?;
        let hsts = raw.hsts.map(|h| HstsConfig {
            max_age: h.max_age,
            include_subdomains: h.include_subdomains,
            preload: h.preload,
        });
        let access_log = raw
            .access_log
            .map(|a| {
                if a.path.get_ref().is_empty() {
                    return Err(cx.at(&a.path, "access_log.path", "must name a file, or \"-\" for standard output"));
                }
                let path = if a.path.get_ref() == "-" { PathBuf::from("-") } else { base.join(a.path.get_ref()) };
                Ok(crate::access_log::AccessLogConfig {
                    path,
                    format: a.format.unwrap_or(crate::access_log::AccessLogFormat::Text),
                })
            })
            .transpose()?;
        let compression = raw.compression.map(|c| cx.compression(c)).transpose()?;
        let timeouts = cx.timeouts(raw.timeouts)?;
        let limits = cx.limits(raw.limits)?;
        Ok(Self {
            path: path.to_owned(),
            source_sha256: sha256(text.as_bytes()),
            custody,
            tls,
            listeners,
            admin,
            proxy,
            routes,
            runtime,
            log,
            audit,
            process,
            redirects,
            hsts,
            response_headers,
            access_log,
            compression,
            timeouts,
            limits,
        })
    }
}

/// SHA-256 of `bytes`.
pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    // A SHA-256 digest is 32 bytes: the zip copies all of it.
    for (o, b) in out.iter_mut().zip(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref()) {
        *o = *b;
    }
    out
}

struct Context<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Context<'_> {
    fn error(&self, span: Option<std::ops::Range<usize>>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            path: self.path.to_owned(),
            position: span.map(|s| line_and_column(self.text, s.start)),
            message: message.into(),
        }
    }

    fn at<T>(&self, value: &Spanned<T>, key: &str, message: impl fmt::Display) -> ConfigError {
        self.error(Some(value.span()), format!("{key}: {message}"))
    }

    /// The rules of a header table at `key`; hop-by-hop and framing names, and those in `managed`, are refused.
    fn header_rules(&self, table: &HeaderTable, key: &str, managed: &[&str]) -> Result<Vec<HeaderRule>> {
        table
            .iter()
            .map(|(name, value)| {
                let key = format!("{key}.{name}");
                let name = http::HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| self.at(value, &key, "is not a valid header name"))?;
                if HOP_BY_HOP_OR_FRAMING.contains(&name.as_str()) || managed.contains(&name.as_str()) {
                    return Err(self.at(value, &key, "is a header sealgate manages itself; it cannot be configured"));
                }
                let value = match value.get_ref().as_str() {
                    "" => None,
                    text => Some(
                        http::HeaderValue::from_str(text)
                            .map_err(|_| self.at(value, &key, "is not a valid header value"))?,
                    ),
                };
                Ok(HeaderRule { name, value })
            })
            .collect()
    }

    fn custody(&self, raw: RawCustody, base: &Path) -> Result<CustodyConfig> {
        if raw.export.get_ref().trim().is_empty() {
            return Err(self.at(&raw.export, "custody.export", "must name the export directory"));
        }
        if raw.grantee.get_ref().trim().is_empty() {
            return Err(self.at(&raw.grantee, "custody.grantee", "must name this service's principal"));
        }
        let rescan_interval = raw.rescan_interval.unwrap_or(DEFAULT_RESCAN_INTERVAL);
        if rescan_interval.is_zero() {
            return Err(self.error(None, "custody.rescan_interval must be greater than zero"));
        }
        Ok(CustodyConfig {
            export: base.join(raw.export.get_ref()),
            grantee: raw.grantee.into_inner(),
            rescan_interval,
        })
    }

    fn audit(&self, raw: RawAudit, base: &Path) -> Result<AuditConfig> {
        let path = raw.path.get_ref();
        if path.trim().is_empty() {
            return Err(self.at(&raw.path, "audit.path", "must name the audit log file"));
        }
        if path.ends_with('/') {
            return Err(self.at(&raw.path, "audit.path", "must name a file, not a directory"));
        }
        Ok(AuditConfig { path: base.join(path) })
    }

    fn tls(&self, raw: RawTls, base: &Path) -> Result<TlsConfig> {
        let min_version = match &raw.min_version {
            None => TlsVersion::Tls12,
            Some(v) => match v.get_ref().as_str() {
                "1.2" => TlsVersion::Tls12,
                "1.3" => TlsVersion::Tls13,
                "1.0" | "1.1" | "1" => {
                    return Err(self.at(v, "tls.min_version", "custody policy requires TLS 1.2 or later"))
                }
                _ => return Err(self.at(v, "tls.min_version", "must be \"1.2\" or \"1.3\"")),
            },
        };
        let mut key_exchange = Vec::new();
        for group in raw.key_exchange.iter().flatten() {
            let parsed = match group.get_ref().to_ascii_lowercase().as_str() {
                "x25519mlkem768" => KeyExchange::X25519MlKem768,
                "x25519" => KeyExchange::X25519,
                "secp256r1" | "p-256" | "p256" => KeyExchange::Secp256r1,
                "secp384r1" | "p-384" | "p384" => KeyExchange::Secp384r1,
                _ => {
                    return Err(self.at(
                        group,
                        "tls.key_exchange",
                        "unknown group; use X25519MLKEM768, X25519, secp256r1 or secp384r1",
                    ))
                }
            };
            if !key_exchange.contains(&parsed) {
                key_exchange.push(parsed);
            }
        }
        if let Some(id) = &raw.default_certificate {
            if !crate::custody::format::is_valid_id(id.get_ref()) {
                return Err(self.at(id, "tls.default_certificate", "is not a certificate id"));
            }
        }
        let handshake_timeout = timeout_in_range(raw.handshake_timeout.unwrap_or(Duration::from_secs(10)))
            .map_err(|why| self.error(None, format!("tls.handshake_timeout {why}")))?;
        Ok(TlsConfig {
            min_version,
            session_resumption: raw.session_resumption.unwrap_or(true),
            session_cache_size: raw.session_cache_size.unwrap_or(256),
            default_certificate: raw.default_certificate.map(Spanned::into_inner),
            key_exchange,
            handshake_timeout,
            client_auth: raw.client_auth.map(|raw| self.client_auth(raw, base)).transpose()?,
        })
    }

    fn compression(&self, raw: RawCompression) -> Result<CompressionConfig> {
        let codings = match &raw.codings {
            None => vec![Coding::Brotli, Coding::Gzip],
            Some(list) => {
                let mut codings = Vec::new();
                for name in list.get_ref() {
                    let coding = match name.as_str() {
                        "gzip" => Coding::Gzip,
                        "br" => Coding::Brotli,
                        _ => {
                            return Err(self.at(
                                list,
                                "compression.codings",
                                format_args!("{name:?} is not a coding sealgate compresses with: use \"br\", \"gzip\""),
                            ))
                        }
                    };
                    if codings.contains(&coding) {
                        return Err(self.at(list, "compression.codings", format_args!("{name:?} is listed twice")));
                    }
                    codings.push(coding);
                }
                if codings.is_empty() {
                    return Err(self.at(list, "compression.codings", "lists no coding (remove [compression] instead)"));
                }
                codings
            }
        };
        let types = match &raw.types {
            None => DEFAULT_COMPRESSED_TYPES.iter().map(|t| (*t).to_owned()).collect(),
            Some(list) => {
                for media_type in list.get_ref() {
                    let valid = media_type.split_once('/').is_some_and(|(top, sub)| {
                        let token = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic() && b != b'/');
                        token(top) && top != "*" && (sub == "*" || token(sub))
                    });
                    if !valid {
                        return Err(self.at(
                            list,
                            "compression.types",
                            format_args!("{media_type:?} is not a media type (`type/subtype`, or `type/*`)"),
                        ));
                    }
                }
                list.get_ref().clone()
            }
        };
        Ok(CompressionConfig { codings, types, min_bytes: raw.min_bytes.unwrap_or(DEFAULT_COMPRESSION_MIN_BYTES) })
    }

    fn client_auth(&self, raw: RawClientAuth, base: &Path) -> Result<ClientAuthConfig> {
        let file = |value: &Spanned<String>, key: &str| {
            if value.get_ref().trim().is_empty() {
                return Err(self.at(value, key, "must name a PEM file"));
            }
            Ok(base.join(value.get_ref()))
        };
        let mode = match &raw.mode {
            None => ClientAuthMode::Required,
            Some(mode) => match mode.get_ref().as_str() {
                "required" => ClientAuthMode::Required,
                "optional" => ClientAuthMode::Optional,
                _ => return Err(self.at(mode, "tls.client_auth.mode", "must be \"required\" or \"optional\"")),
            },
        };
        Ok(ClientAuthConfig {
            ca: file(&raw.ca, "tls.client_auth.ca")?,
            mode,
            crl: raw.crl.iter().map(|crl| file(crl, "tls.client_auth.crl")).collect::<Result<_>>()?,
            forward: raw.forward.unwrap_or(false),
        })
    }

    fn timeouts(&self, raw: RawTimeouts) -> Result<TimeoutsConfig> {
        let defaults = TimeoutsConfig::default();
        let positive = |key: &str, value: Option<Duration>, default: Duration| {
            timeout_in_range(value.unwrap_or(default)).map_err(|why| self.error(None, format!("timeouts.{key} {why}")))
        };
        Ok(TimeoutsConfig {
            header_read: positive("header_read", raw.header_read, defaults.header_read)?,
            idle: positive("idle", raw.idle, defaults.idle)?,
            request: positive("request", raw.request, defaults.request)?,
            send: positive("send", raw.send, defaults.send)?,
            h2_keep_alive_interval: positive(
                "h2_keep_alive_interval",
                raw.h2_keep_alive_interval,
                defaults.h2_keep_alive_interval,
            )?,
            h2_keep_alive_timeout: positive(
                "h2_keep_alive_timeout",
                raw.h2_keep_alive_timeout,
                defaults.h2_keep_alive_timeout,
            )?,
            drain: positive("drain", raw.drain, defaults.drain)?,
            tunnel_idle: positive("tunnel_idle", raw.tunnel_idle, defaults.tunnel_idle)?,
        })
    }

    fn limits(&self, raw: RawLimits) -> Result<LimitsConfig> {
        let defaults = LimitsConfig::default();
        // Upper bounds keep every value within what hyper, h2 and tokio accept without panicking (a tokio
        // semaphore holds at most `usize::MAX >> 3` permits, h2 settings are u32).
        let within = |key: &str, value: &Option<Spanned<u64>>, default: u64, max: u64| match value {
            None => Ok(default),
            Some(v) if (1..=max).contains(v.get_ref()) => Ok(*v.get_ref()),
            Some(v) => Err(self.at(v, &format!("limits.{key}"), format!("must be between 1 and {max}"))),
        };
        let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        Ok(LimitsConfig {
            max_connections: size(within(
                "max_connections",
                &raw.max_connections,
                defaults.max_connections as u64,
                10_000_000,
            )?),
            max_header_count: size(within(
                "max_header_count",
                &raw.max_header_count,
                defaults.max_header_count as u64,
                10_000,
            )?),
            max_header_bytes: size(within(
                "max_header_bytes",
                &raw.max_header_bytes,
                defaults.max_header_bytes as u64,
                1024 * 1024,
            )?),
            max_uri_bytes: size(within("max_uri_bytes", &raw.max_uri_bytes, defaults.max_uri_bytes as u64, 65_534)?),
            max_body_bytes: within("max_body_bytes", &raw.max_body_bytes, defaults.max_body_bytes, u64::MAX)?,
            h2_max_concurrent_streams: u32::try_from(within(
                "h2_max_concurrent_streams",
                &raw.h2_max_concurrent_streams,
                u64::from(defaults.h2_max_concurrent_streams),
                10_000,
            )?)
            .unwrap_or(u32::MAX),
        })
    }

    fn socket_addr(&self, key: &str, value: &Spanned<String>) -> Result<SocketAddr> {
        value.get_ref().parse().map_err(|_| {
            self.at(value, key, format!("{:?} is not an IP address and port, e.g. 127.0.0.1:8443", value.get_ref()))
        })
    }

    fn route(&self, index: usize, mut raw: RawRoute, base: &Path, tls: &TlsConfig) -> Result<RouteConfig> {
        let key = |field: &str| format!("route[{index}].{field}");
        let host = match &raw.host {
            None => None,
            Some(h) => {
                let host = names::normalize(h.get_ref());
                names::validate_server_name(&host).map_err(|why| self.at(h, &key("host"), why))?;
                Some(host)
            }
        };
        let path = match &raw.path {
            None => "/".to_owned(),
            Some(p) if p.get_ref().starts_with('/') => p.get_ref().clone(),
            Some(p) => return Err(self.at(p, &key("path"), "must begin with '/'")),
        };
        let (upstream, respond, redirect) = (raw.upstream.take(), raw.respond.take(), raw.redirect.take());
        let spans = [
            upstream.as_ref().map(Spanned::span),
            respond.as_ref().map(Spanned::span),
            redirect.as_ref().map(Spanned::span),
        ];
        match spans.iter().flatten().nth(1) {
            Some(second) => {
                return Err(self.error(
                    Some(second.clone()),
                    format!("route[{index}] has more than one of `upstream`, `respond` and `redirect`"),
                ))
            }
            None if spans.iter().all(Option::is_none) => {
                return Err(self.error(None, format!("route[{index}] needs `upstream`, `respond` or `redirect`")));
            }
            None => {}
        }
        let action = match (upstream, respond, redirect) {
            (Some(upstream), _, _) => {
                RouteAction::Upstream(Box::new(self.upstream_group(index, upstream, &raw, &path, base)?))
            }
            (None, respond, redirect) => {
                let upstream_only = [
                    ("balance", raw.balance.as_ref().map(Spanned::span)),
                    ("retries", raw.retries.as_ref().map(Spanned::span)),
                    ("retry_statuses", raw.retry_statuses.as_ref().map(Spanned::span)),
                    ("ca", raw.ca.as_ref().map(Spanned::span)),
                    ("outlier", raw.outlier.as_ref().map(Spanned::span)),
                    ("health_check", raw.health_check.as_ref().map(Spanned::span)),
                    ("prefix_rewrite", raw.prefix_rewrite.as_ref().map(Spanned::span)),
                    ("request_headers", raw.request_headers.as_ref().map(Spanned::span)),
                    ("upstream_protocol", raw.upstream_protocol.as_ref().map(Spanned::span)),
                ];
                if let Some((name, span)) = upstream_only.into_iter().find_map(|(n, s)| s.map(|s| (n, s))) {
                    return Err(self.error(Some(span), format!("{}: only an `upstream` route has it", key(name))));
                }
                if raw.read_timeout.is_some() {
                    return Err(self.error(None, format!("{}: only an `upstream` route has it", key("read_timeout"))));
                }
                match (respond, redirect) {
                    (Some(respond), _) => RouteAction::Respond(self.respond(respond, &key("respond"))?),
                    (None, Some(redirect)) => RouteAction::Redirect(self.redirect_route(&redirect, &key("redirect"))?),
                    // One of the three is present (checked above) and it is not `upstream`.
                    (None, None) => {
                        return Err(self.error(None, format!("route[{index}] needs `respond` or `redirect`")))
                    }
                }
            }
        };
        let response_headers =
            self.header_rules(&raw.response_headers, &key("response_headers"), RESPONSE_HEADERS_MANAGED)?;
        let rate_limit = raw.rate_limit.as_ref().map(|r| self.rate_limit(r, &key("rate_limit"))).transpose()?;
        let clients = ClientFilter {
            allow: self.ip_blocks(raw.allow.as_ref(), &key("allow"))?,
            deny: self.ip_blocks(raw.deny.as_ref(), &key("deny"))?,
        };
        let max_body_bytes = match &raw.max_body_bytes {
            Some(max) if *max.get_ref() == 0 => return Err(self.at(max, &key("max_body_bytes"), "must be at least 1")),
            max => max.as_ref().map(|max| *max.get_ref()),
        };
        Ok(RouteConfig {
            host,
            path,
            action,
            response_timeout: raw.timeout,
            response_headers,
            rate_limit,
            clients,
            max_body_bytes,
            require_client_certificate: match &raw.require_client_certificate {
                Some(required) if *required.get_ref() && tls.client_auth.is_none() => {
                    return Err(self.at(
                        required,
                        &key("require_client_certificate"),
                        "needs [tls.client_auth] (with mode = \"optional\", other routes serve clients without one)",
                    ))
                }
                required => required.as_ref().is_some_and(|r| *r.get_ref()),
            },
            compress: raw.compress.unwrap_or(true),
        })
    }

    fn respond(&self, respond: Spanned<RawRespond>, key: &str) -> Result<DirectResponse> {
        let span = respond.span();
        let r = respond.into_inner();
        let status = http::StatusCode::from_u16(r.status)
            .ok()
            .filter(|s| s.as_u16() >= 200)
            .ok_or_else(|| self.error(Some(span), format!("{key}: status must be 200 to 999")))?;
        let content_type = r.content_type.unwrap_or_else(|| "text/plain; charset=utf-8".to_owned());
        if http::HeaderValue::from_str(&content_type).is_err() {
            return Err(self.error(None, format!("{key}: content_type is not a valid header")));
        }
        Ok(DirectResponse { status, body: r.body, content_type })
    }

    fn redirect_route(&self, raw: &Spanned<RawRedirectRoute>, key: &str) -> Result<RedirectRoute> {
        let r = raw.get_ref();
        let to = crate::proxy::location::LocationTemplate::parse(&r.to)
            .map_err(|why| self.at(raw, key, format_args!("to: {why}")))?;
        let status = match r.status.unwrap_or(308) {
            code @ (301 | 302 | 303 | 307 | 308) => http::StatusCode::from_u16(code).ok(),
            _ => None,
        }
        .ok_or_else(|| self.at(raw, key, "status must be 301, 302, 303, 307 or 308"))?;
        Ok(RedirectRoute { to, status })
    }

    /// CIDR blocks (`10.0.0.0/8`, `2001:db8::/32`) or single addresses.
    fn ip_blocks(&self, raw: Option<&Spanned<Vec<String>>>, key: &str) -> Result<Vec<ipnet::IpNet>> {
        let Some(raw) = raw else { return Ok(Vec::new()) };
        if raw.get_ref().is_empty() {
            return Err(self.at(raw, key, "lists no address: leave it out instead"));
        }
        raw.get_ref()
            .iter()
            .map(|text| {
                let text = text.trim();
                text.parse::<ipnet::IpNet>()
                    .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map(|block| block.trunc())
                    .map_err(|_| {
                        self.at(
                            raw,
                            key,
                            format_args!("{text:?} is not an IP address or CIDR block, e.g. \"10.0.0.0/8\""),
                        )
                    })
            })
            .collect()
    }

    fn rate_limit(&self, raw: &Spanned<RawRateLimit>, key: &str) -> Result<RateLimitConfig> {
        let r = raw.get_ref();
        let parsed = r.rate.split_once('/').and_then(|(n, unit)| {
            let per = match unit.trim() {
                "s" => Duration::from_secs(1),
                "m" => Duration::from_secs(60),
                _ => return None,
            };
            n.trim().parse::<u32>().ok().filter(|&n| n >= 1).map(|n| (n, per))
        });
        let Some((requests, per)) = parsed else {
            return Err(self.at(raw, key, "rate must be requests per second or minute, e.g. \"10/s\" or \"300/m\""));
        };
        let burst = r.burst.unwrap_or(requests);
        if !(1..=1_000_000).contains(&burst) {
            return Err(self.at(raw, key, "burst must be between 1 and 1000000"));
        }
        Ok(RateLimitConfig { requests, per, burst })
    }

    fn upstream_group(
        &self,
        index: usize,
        upstream: Spanned<OneOrMany>,
        raw: &RawRoute,
        path: &str,
        base: &Path,
    ) -> Result<UpstreamGroupConfig> {
        let key = |field: &str| format!("route[{index}].{field}");
        let span = upstream.span();
        let urls = match upstream.into_inner() {
            OneOrMany::One(url) => vec![url],
            OneOrMany::Many(urls) => urls,
        };
        if urls.is_empty() {
            return Err(self.error(Some(span), format!("{}: lists no URL", key("upstream"))));
        }
        let mut upstreams = Vec::with_capacity(urls.len());
        for url in &urls {
            let url = parse_upstream(url)
                .map_err(|why| self.error(Some(span.clone()), format!("{}: {why}", key("upstream"))))?;
            if upstreams.contains(&url) {
                // Listed twice, it would share one name in logs and metrics but not its state.
                return Err(self.error(Some(span), format!("{}: {url} is listed twice", key("upstream"))));
            }
            upstreams.push(url);
        }
        let balance = match &raw.balance {
            None => Balance::default(),
            Some(b) => match b.get_ref().as_str() {
                "round_robin" => Balance::RoundRobin,
                "least_requests" => Balance::LeastRequests,
                "ip_hash" => Balance::IpHash,
                _ => {
                    return Err(self.at(
                        b,
                        &key("balance"),
                        "must be \"round_robin\", \"least_requests\" or \"ip_hash\"",
                    ))
                }
            },
        };
        let retries = match &raw.retries {
            None => DEFAULT_RETRIES,
            Some(r) if *r.get_ref() > MAX_RETRIES => {
                return Err(self.at(r, &key("retries"), format_args!("must be at most {MAX_RETRIES}")))
            }
            Some(r) => *r.get_ref(),
        };
        let retry_statuses = match &raw.retry_statuses {
            None => Vec::new(),
            Some(list) => {
                if let Some(bad) = list.get_ref().iter().find(|s| !(500..=599).contains(*s)) {
                    return Err(self.at(
                        list,
                        &key("retry_statuses"),
                        format_args!("{bad} is not a 5xx status: only server errors are retried"),
                    ));
                }
                list.get_ref().clone()
            }
        };
        let ca = match &raw.ca {
            None => None,
            Some(ca) if ca.get_ref().trim().is_empty() => {
                return Err(self.at(ca, &key("ca"), "must name a PEM file of CA certificates"))
            }
            Some(ca) => Some(base.join(ca.get_ref())),
        };
        if ca.is_none() && upstreams.iter().any(|u| u.scheme == UpstreamScheme::Https) {
            return Err(self.error(
                Some(span),
                format!(
                    "{}: an https upstream needs `ca`, a PEM file of the CAs that sign its certificate \
                     (the system's are usually in /etc/ssl/certs/ca-certificates.crt)",
                    key("upstream")
                ),
            ));
        }
        let outlier = match &raw.outlier {
            None => OutlierConfig::default(),
            Some(o) => self.outlier(o, &key("outlier"))?,
        };
        let health_check = raw.health_check.as_ref().map(|h| self.health_check(h, &key("health_check"))).transpose()?;
        let prefix_rewrite = match &raw.prefix_rewrite {
            None => None,
            Some(r) => {
                let replacement = r.get_ref();
                let is_path = replacement.starts_with('/')
                    && !replacement.contains(['?', '#'])
                    && replacement.parse::<http::uri::PathAndQuery>().is_ok();
                if !is_path {
                    return Err(self.at(r, &key("prefix_rewrite"), "must be a path beginning with '/', e.g. \"/\""));
                }
                Some(PrefixRewrite { prefix: path.to_owned(), replacement: replacement.clone() })
            }
        };
        let request_headers = match &raw.request_headers {
            None => Vec::new(),
            Some(table) => self.header_rules(table.get_ref(), &key("request_headers"), REQUEST_HEADERS_MANAGED)?,
        };
        let protocol = match &raw.upstream_protocol {
            None => UpstreamProtocol::default(),
            Some(protocol) => match protocol.get_ref().as_str() {
                "http1.1" => UpstreamProtocol::Http11,
                "http2" => UpstreamProtocol::Http2,
                _ => return Err(self.at(protocol, &key("upstream_protocol"), "must be \"http1.1\" or \"http2\"")),
            },
        };
        Ok(UpstreamGroupConfig {
            protocol,
            upstreams,
            balance,
            retries,
            retry_statuses,
            ca,
            outlier,
            health_check,
            prefix_rewrite,
            request_headers,
            read_timeout: raw
                .read_timeout
                .map(timeout_in_range)
                .transpose()
                .map_err(|why| self.error(None, format!("{} {why}", key("read_timeout"))))?,
        })
    }

    fn outlier(&self, raw: &Spanned<RawOutlier>, key: &str) -> Result<OutlierConfig> {
        let defaults = OutlierConfig::default();
        let o = raw.get_ref();
        let config = OutlierConfig {
            consecutive_failures: o.consecutive_failures.unwrap_or(defaults.consecutive_failures),
            consecutive_5xx: o.consecutive_5xx.unwrap_or(defaults.consecutive_5xx),
            base_ejection_time: o.base_ejection_time.unwrap_or(defaults.base_ejection_time),
            max_ejection_time: o.max_ejection_time.unwrap_or(defaults.max_ejection_time),
        };
        if config.base_ejection_time.is_zero() {
            return Err(self.at(raw, key, "base_ejection_time must be greater than zero"));
        }
        if config.max_ejection_time < config.base_ejection_time {
            return Err(self.at(raw, key, "max_ejection_time must be at least base_ejection_time"));
        }
        Ok(config)
    }

    fn health_check(&self, raw: &Spanned<RawHealthCheck>, key: &str) -> Result<HealthCheckConfig> {
        let h = raw.get_ref();
        let path = match h.path.parse::<http::uri::PathAndQuery>() {
            Ok(path) if h.path.starts_with('/') => path,
            _ => return Err(self.at(raw, key, "path must be a path beginning with '/', e.g. \"/healthz\"")),
        };
        let interval = h.interval.unwrap_or(Duration::from_secs(5));
        let timeout = h.timeout.unwrap_or(Duration::from_secs(1));
        if interval.is_zero() || timeout.is_zero() {
            return Err(self.at(raw, key, "interval and timeout must be greater than zero"));
        }
        if interval > MAX_HEALTH_CHECK_INTERVAL {
            return Err(self.at(raw, key, "interval must be at most 1h"));
        }
        let healthy_threshold = h.healthy_threshold.unwrap_or(2);
        let unhealthy_threshold = h.unhealthy_threshold.unwrap_or(3);
        if healthy_threshold == 0 || unhealthy_threshold == 0 {
            return Err(self.at(raw, key, "healthy_threshold and unhealthy_threshold must be at least 1"));
        }
        let expect_status = match &h.expect_status {
            None => 200..=399,
            Some(range) => parse_status_range(range).ok_or_else(|| {
                self.at(
                    raw,
                    key,
                    "expect_status must be a status (200) or an inclusive range (\"200-399\") within 100-599",
                )
            })?,
        };
        Ok(HealthCheckConfig { path, interval, timeout, healthy_threshold, unhealthy_threshold, expect_status })
    }
}

/// `200` or `"200-399"`, within 100..=599.
fn parse_status_range(range: &StatusRange) -> Option<std::ops::RangeInclusive<u16>> {
    let (low, high) = match range {
        StatusRange::One(status) => (*status, *status),
        StatusRange::Range(text) => match text.split_once('-') {
            Some((low, high)) => (low.trim().parse().ok()?, high.trim().parse().ok()?),
            None => {
                let status = text.trim().parse().ok()?;
                (status, status)
            }
        },
    };
    (100 <= low && low <= high && high <= 599).then_some(low..=high)
}

/// The longest timeout accepted: deadlines are computed as `now + timeout`, which must not overflow.
const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// A client-side timeout must be positive and at most [`MAX_TIMEOUT`].
fn timeout_in_range(value: Duration) -> std::result::Result<Duration, &'static str> {
    if value.is_zero() {
        Err("must be greater than zero")
    } else if value > MAX_TIMEOUT {
        Err("must be at most 365 days")
    } else {
        Ok(value)
    }
}

/// Validates an upstream URL. The error never repeats the URL, which may carry a secret.
fn parse_upstream(url: &str) -> std::result::Result<UpstreamUrl, String> {
    let (scheme, rest, default_port) = if let Some(rest) = url.strip_prefix("http://") {
        (UpstreamScheme::Http, rest, 80)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (UpstreamScheme::Https, rest, 443)
    } else {
        return Err("must be an http:// or https:// URL, e.g. http://127.0.0.1:8080".to_owned());
    };
    let (authority, path) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    if authority.contains('@') {
        return Err("the URL carries credentials (user:password@...); sealgate refuses them in proxy.toml".to_owned());
    }
    if !(path.is_empty() || path == "/") {
        return Err("must be http(s)://host:port with no path, query or fragment".to_owned());
    }
    let authority: http::uri::Authority = authority.parse().map_err(|_| "has an invalid host or port".to_owned())?;
    if authority.host().is_empty() {
        return Err("has no host".to_owned());
    }
    let authority = match authority.port_u16() {
        Some(_) => authority,
        None => format!("{}:{default_port}", authority.host()).parse().map_err(|_| "has an invalid host".to_owned())?,
    };
    Ok(UpstreamUrl { scheme, authority })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(text, Path::new("/etc/sealgate/proxy.toml"))
    }

    const MINIMAL: &str = r#"
[custody]
export = "export"
grantee = "me"

[[listener]]
bind = "127.0.0.1:8443"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.custody.export, Path::new("/etc/sealgate/export"));
        assert_eq!(config.custody.rescan_interval, DEFAULT_RESCAN_INTERVAL);
        assert_eq!(config.tls.min_version, TlsVersion::Tls12);
        assert!(config.tls.session_resumption);
        assert!(config.admin.is_none());
        assert!(config.routes.is_empty());
    }

    #[test]
    fn unknown_keys_are_refused_with_a_position() {
        let err = parse(&format!("{MINIMAL}\n[tls]\nminimum = \"1.2\"\n")).unwrap_err();
        assert_eq!(err.position.map(|p| p.0), Some(10), "{err}");
        assert!(err.to_string().starts_with("/etc/sealgate/proxy.toml:10:"), "{err}");
        assert!(err.message.contains("minimum"), "{err}");
    }

    #[test]
    fn credentials_in_upstreams_are_refused_without_echo() {
        let text = format!("{MINIMAL}\n[[route]]\nupstream = \"http://admin:hunter2@127.0.0.1:8080\"\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("credentials") && err.contains("route[0].upstream"), "{err}");
        assert!(!err.contains("hunter2") && !err.contains("admin"), "{err}");
        assert!(err.contains(":10:"), "{err}");
    }

    #[test]
    fn client_auth_parses_with_defaults_and_refuses_unknown_modes_and_empty_files() {
        assert!(parse(MINIMAL).unwrap().tls.client_auth.is_none());
        let config = parse(&format!("{MINIMAL}\n[tls.client_auth]\nca = \"clients.pem\"\n")).unwrap();
        let expected = ClientAuthConfig {
            ca: PathBuf::from("/etc/sealgate/clients.pem"),
            mode: ClientAuthMode::Required,
            crl: Vec::new(),
            forward: false,
        };
        assert_eq!(config.tls.client_auth, Some(expected));
        let text = format!(
            "{MINIMAL}\n[tls.client_auth]\nca = \"/srv/ca.pem\"\nmode = \"optional\"\ncrl = [\"a.pem\", \"/b.pem\"]\n\
             forward = true\n"
        );
        let client_auth = parse(&text).unwrap().tls.client_auth.unwrap();
        assert_eq!(client_auth.ca, Path::new("/srv/ca.pem"));
        assert_eq!(client_auth.mode, ClientAuthMode::Optional);
        assert_eq!(client_auth.crl, [PathBuf::from("/etc/sealgate/a.pem"), PathBuf::from("/b.pem")]);
        assert!(client_auth.forward);

        let err = parse(&format!("{MINIMAL}\n[tls.client_auth]\nca = \"c.pem\"\nmode = \"request\"\n")).unwrap_err();
        assert!(err.to_string().contains(":11:") && err.message.contains("tls.client_auth.mode"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[tls.client_auth]\nca = \" \"\n")).unwrap_err();
        assert!(err.message.contains("tls.client_auth.ca") && err.message.contains("PEM file"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[tls.client_auth]\nca = \"c.pem\"\ncrl = [\"\"]\n")).unwrap_err();
        assert!(err.message.contains("tls.client_auth.crl"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[tls.client_auth]\nmode = \"required\"\n")).unwrap_err();
        assert!(err.message.contains("ca"), "{err}");

        let route = "[[route]]\nrequire_client_certificate = true\nrespond = { status = 200, body = \"\" }\n";
        let err = parse(&format!("{MINIMAL}\n{route}")).unwrap_err();
        assert!(err.message.contains("route[0].require_client_certificate: needs [tls.client_auth]"), "{err}");
        let config = parse(&format!("{MINIMAL}\n[tls.client_auth]\nca = \"c.pem\"\n{route}")).unwrap();
        assert!(config.routes[0].require_client_certificate);
    }

    #[test]
    fn compression_parses_with_defaults_and_refuses_what_it_cannot_do() {
        assert!(parse(MINIMAL).unwrap().compression.is_none());
        let config =
            parse(&format!("{MINIMAL}\n[compression]\n[[route]]\ncompress = false\nrespond = {{ status = 200 }}\n"))
                .unwrap();
        let compression = config.compression.unwrap();
        assert_eq!(compression.codings, [Coding::Brotli, Coding::Gzip]);
        assert_eq!(compression.min_bytes, DEFAULT_COMPRESSION_MIN_BYTES);
        assert!(compression.types.iter().any(|t| t == "text/*"));
        assert!(!config.routes[0].compress);
        let text = format!("{MINIMAL}\n[compression]\ncodings = [\"gzip\"]\ntypes = [\"text/html\", \"application/*\"]\nmin_bytes = 0\n");
        let compression = parse(&text).unwrap().compression.unwrap();
        assert_eq!((compression.codings, compression.types.len(), compression.min_bytes), (vec![Coding::Gzip], 2, 0));
        for (body, expected) in [
            ("codings = [\"zstd\"]", "\"zstd\" is not a coding"),
            ("codings = [\"gzip\", \"gzip\"]", "listed twice"),
            ("codings = []", "lists no coding"),
            ("types = [\"html\"]", "\"html\" is not a media type"),
            ("types = [\"*/*\"]", "is not a media type"),
            ("min_bytes = -1", "invalid value"),
        ] {
            let err = parse(&format!("{MINIMAL}\n[compression]\n{body}\n")).unwrap_err();
            assert!(err.to_string().contains(expected), "{body}: {err}");
        }
    }

    #[test]
    fn tls_below_1_2_is_refused() {
        let err = parse(&format!("{MINIMAL}\n[tls]\nmin_version = \"1.1\"\n")).unwrap_err();
        assert!(err.to_string().contains("TLS 1.2"), "{err}");
    }

    #[test]
    fn routes_parse() {
        let text = format!(
            "{MINIMAL}\n[[route]]\nhost = \"*.Example.com\"\npath = \"/api\"\n\
             upstream = [\"http://127.0.0.1:8080\", \"http://localhost\"]\n\
             [[route]]\nrespond = {{ status = 200, body = \"hello\\n\" }}\n"
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.routes[0].host.as_deref(), Some("*.example.com"));
        match &config.routes[0].action {
            RouteAction::Upstream(group) => {
                assert_eq!(group.upstreams[0].to_string(), "http://127.0.0.1:8080");
                assert_eq!(group.upstreams[1].to_string(), "http://localhost:80");
                assert_eq!(group.balance, Balance::RoundRobin);
                assert_eq!(group.retries, DEFAULT_RETRIES);
                assert_eq!(group.outlier, OutlierConfig::default());
                assert!(group.health_check.is_none() && group.ca.is_none());
            }
            other => panic!("{other:?}"),
        }
        match &config.routes[1].action {
            RouteAction::Respond(r) => assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "hello\n")),
            other => panic!("{other:?}"),
        }
        assert_eq!(config.routes[1].path, "/");
    }

    #[test]
    fn route_errors_name_the_route() {
        for (route, needle) in [
            ("path = \"api\"\nrespond = { status = 200 }", "route[0].path"),
            ("upstream = \"ftp://x\"", "route[0].upstream"),
            ("upstream = \"http://x:1/base\"", "no path"),
            ("upstream = []", "lists no URL"),
            ("respond = { status = 99 }", "status"),
            ("host = \"a.*.com\"\nrespond = { status = 200 }", "route[0].host"),
            ("path = \"/\"", "needs `upstream`, `respond` or `redirect`"),
        ] {
            let err = parse(&format!("{MINIMAL}\n[[route]]\n{route}\n")).unwrap_err().to_string();
            assert!(err.contains(needle), "{route}: {err}");
        }
    }

    fn group(route: &str) -> Result<UpstreamGroupConfig> {
        match parse(&format!("{MINIMAL}\n[[route]]\n{route}\n"))?.routes.remove(0).action {
            RouteAction::Upstream(group) => Ok(*group),
            RouteAction::Respond(_) | RouteAction::Redirect(_) => panic!("not an upstream route"),
        }
    }

    #[test]
    fn read_timeouts_default_to_a_minute_and_a_route_may_override_them() {
        let config = parse(&format!("{MINIMAL}\n[[route]]\nupstream = \"http://a\"\n")).unwrap();
        assert_eq!(config.proxy.read_timeout, Duration::from_secs(60));
        assert_eq!(group("upstream = \"http://a\"").unwrap().read_timeout, None);
        let g = group("upstream = \"http://a\"\nread_timeout = \"5m\"").unwrap();
        assert_eq!(g.read_timeout, Some(Duration::from_secs(300)));
        for (text, needle) in [
            (format!("{MINIMAL}\n[proxy]\nread_timeout = \"0s\"\n"), "proxy.read_timeout must be greater than zero"),
            (
                format!("{MINIMAL}\n[[route]]\nupstream = \"http://a\"\nread_timeout = \"0s\"\n"),
                "route[0].read_timeout must be greater than zero",
            ),
            (
                format!("{MINIMAL}\n[[route]]\nrespond = {{ status = 200 }}\nread_timeout = \"1s\"\n"),
                "route[0].read_timeout: only an `upstream` route has it",
            ),
        ] {
            let error = parse(&text).unwrap_err().to_string();
            assert!(error.contains(needle), "{error}");
        }
    }

    #[test]
    fn upstream_protocol_is_http1_1_http2_or_refused() {
        assert_eq!(group("upstream = \"http://a\"").unwrap().protocol, UpstreamProtocol::Http11);
        let g = group("upstream = \"http://a\"\nupstream_protocol = \"http2\"").unwrap();
        assert_eq!(g.protocol, UpstreamProtocol::Http2);
        let err = group("upstream = \"http://a\"\nupstream_protocol = \"h2\"").unwrap_err();
        assert!(err.message.contains("route[0].upstream_protocol: must be \"http1.1\" or \"http2\""), "{err}");
        let text =
            format!("{MINIMAL}\n[[route]]\nrespond = {{ status = 200, body = \"\" }}\nupstream_protocol = \"http2\"\n");
        let err = parse(&text).unwrap_err();
        assert!(err.message.contains("route[0].upstream_protocol: only an `upstream` route has it"), "{err}");
    }

    #[test]
    fn upstream_groups_parse_with_every_key() {
        let g = group(
            r#"upstream = ["https://app.internal", "http://10.0.0.2:8080"]
balance = "least_requests"
retries = 2
ca = "upstream-ca.pem"
outlier = { consecutive_failures = 3, base_ejection_time = "2s", max_ejection_time = "1m" }
health_check = { path = "/healthz?full=1", interval = "2s", timeout = "500ms", healthy_threshold = 1, unhealthy_threshold = 2, expect_status = "200-299" }"#,
        )
        .unwrap();
        assert_eq!(g.upstreams[0].to_string(), "https://app.internal:443");
        assert_eq!(g.upstreams[0].scheme, UpstreamScheme::Https);
        assert_eq!(g.upstreams[1].scheme, UpstreamScheme::Http);
        assert_eq!((g.balance, g.retries), (Balance::LeastRequests, 2));
        assert_eq!(g.ca.as_deref(), Some(Path::new("/etc/sealgate/upstream-ca.pem")));
        assert_eq!(g.outlier.consecutive_failures, 3);
        assert_eq!(g.outlier.base_ejection_time, Duration::from_secs(2));
        assert_eq!(g.outlier.max_ejection_time, Duration::from_secs(60));
        let h = g.health_check.unwrap();
        assert_eq!(h.path, "/healthz?full=1");
        assert_eq!((h.interval, h.timeout), (Duration::from_secs(2), Duration::from_millis(500)));
        assert_eq!((h.healthy_threshold, h.unhealthy_threshold, h.expect_status), (1, 2, 200..=299));

        let h = group("upstream = \"http://a\"\nhealth_check = { path = \"/\", expect_status = 204 }")
            .unwrap()
            .health_check
            .unwrap();
        assert_eq!(
            (h.interval, h.timeout, h.healthy_threshold, h.unhealthy_threshold),
            (Duration::from_secs(5), Duration::from_secs(1), 2, 3)
        );
        assert_eq!(h.expect_status, 204..=204);
    }

    #[test]
    fn upstream_group_errors_name_the_key() {
        for (route, needle) in [
            ("upstream = \"https://a\"", "needs `ca`"),
            ("upstream = [\"http://a:1\", \"http://a:1\"]", "listed twice"),
            ("upstream = \"http://a\"\nbalance = \"random\"", "route[0].balance"),
            ("upstream = \"http://a\"\nretries = 6", "at most 5"),
            ("upstream = \"http://a\"\nretries = -1", "expected u32"),
            ("upstream = \"http://a\"\noutlier = { base_ejection_time = \"0s\" }", "greater than zero"),
            (
                "upstream = \"http://a\"\noutlier = { base_ejection_time = \"1m\", max_ejection_time = \"1s\" }",
                "at least",
            ),
            ("upstream = \"http://a\"\noutlier = { consecutive = 1 }", "consecutive"),
            ("upstream = \"http://a\"\nhealth_check = { interval = \"1s\" }", "path"),
            ("upstream = \"http://a\"\nhealth_check = { path = \"healthz\" }", "route[0].health_check: path"),
            ("upstream = \"http://a\"\nhealth_check = { path = \"/\", timeout = \"0s\" }", "greater than zero"),
            ("upstream = \"http://a\"\nhealth_check = { path = \"/\", interval = \"2h\" }", "at most 1h"),
            ("upstream = \"http://a\"\nhealth_check = { path = \"/\", healthy_threshold = 0 }", "at least 1"),
            ("upstream = \"http://a\"\nhealth_check = { path = \"/\", expect_status = \"399-200\" }", "expect_status"),
            ("upstream = \"http://a\"\nhealth_check = { path = \"/\", expect_status = 42 }", "expect_status"),
            ("respond = { status = 200 }\nretries = 1", "route[0].retries: only an `upstream` route"),
            ("respond = { status = 200 }\nhealth_check = { path = \"/\" }", "route[0].health_check"),
        ] {
            let err = parse(&format!("{MINIMAL}\n[[route]]\n{route}\n")).unwrap_err();
            assert!(err.to_string().contains(needle), "{route}: {err}");
            assert!(err.position.is_some(), "{route}: {err}");
        }
    }

    #[test]
    fn https_upstreams_default_to_port_443_and_keep_refusing_credentials() {
        let g = group("upstream = \"https://10.0.0.1\"\nca = \"ca.pem\"").unwrap();
        assert_eq!(g.upstreams[0].authority, "10.0.0.1:443");
        let err = parse(&format!("{MINIMAL}\n[[route]]\nupstream = \"https://u:hunter2@a\"\nca = \"ca.pem\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("credentials") && !err.contains("hunter2"), "{err}");
    }

    #[test]
    fn listeners_are_required_and_distinct() {
        let no_listener = "[custody]\nexport = \"e\"\ngrantee = \"g\"\n";
        assert!(parse(no_listener).unwrap_err().to_string().contains("listener"));
        let twice = format!("{MINIMAL}\n[admin]\nbind = \"127.0.0.1:8443\"\n");
        assert!(parse(&twice).unwrap_err().to_string().contains("used twice"));
    }

    #[test]
    fn the_audit_log_is_optional_and_resolved_against_the_file() {
        assert!(parse(MINIMAL).unwrap().audit.is_none());
        let config = parse(&format!("{MINIMAL}\n[audit]\npath = \"log/audit.jsonl\"\n")).unwrap();
        assert_eq!(config.audit.unwrap().path, Path::new("/etc/sealgate/log/audit.jsonl"));
        let config = parse(&format!("{MINIMAL}\n[audit]\npath = \"/var/log/sealgate/audit.jsonl\"\n")).unwrap();
        assert_eq!(config.audit.unwrap().path, Path::new("/var/log/sealgate/audit.jsonl"));
    }

    #[test]
    fn audit_errors_have_a_position() {
        for (audit, line, needle) in [
            ("[audit]\npath = \"\"", 10, "audit.path: must name"),
            ("[audit]\npath = \"logs/\"", 10, "not a directory"),
            ("[audit]\npath = \"a\"\nsync = true", 11, "sync"),
            ("[audit]\npath = 3", 10, "string"),
            ("[audit]", 9, "path"),
        ] {
            let err = parse(&format!("{MINIMAL}\n{audit}\n")).unwrap_err();
            assert!(err.message.contains(needle), "{audit}: {err}");
            assert_eq!(err.position.map(|p| p.0), Some(line), "{audit}: {err}");
        }
    }

    #[test]
    fn timeouts_and_limits_have_safe_defaults_and_parse() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.timeouts, TimeoutsConfig::default());
        assert_eq!(config.limits, LimitsConfig::default());
        assert_eq!(config.limits.max_header_count, DEFAULT_MAX_HEADER_COUNT);
        let text = format!(
            "{MINIMAL}\n[timeouts]\nheader_read = \"2s\"\nidle = \"90s\"\nrequest = \"5m\"\nsend = \"20s\"\n\
             h2_keep_alive_interval = \"15s\"\nh2_keep_alive_timeout = \"5s\"\ndrain = \"30s\"\ntunnel_idle = \"2h\"\n\
             [limits]\nmax_connections = 50_000\nmax_header_count = 64\nmax_header_bytes = 16384\n\
             max_uri_bytes = 4096\nmax_body_bytes = 1_048_576\nh2_max_concurrent_streams = 250\n"
        );
        let config = parse(&text).unwrap();
        assert_eq!(
            config.timeouts,
            TimeoutsConfig {
                header_read: Duration::from_secs(2),
                idle: Duration::from_secs(90),
                request: Duration::from_secs(300),
                send: Duration::from_secs(20),
                h2_keep_alive_interval: Duration::from_secs(15),
                h2_keep_alive_timeout: Duration::from_secs(5),
                drain: Duration::from_secs(30),
                tunnel_idle: Duration::from_secs(7200),
            }
        );
        assert_eq!(
            config.limits,
            LimitsConfig {
                max_connections: 50_000,
                max_header_count: 64,
                max_header_bytes: 16384,
                max_uri_bytes: 4096,
                max_body_bytes: 1_048_576,
                h2_max_concurrent_streams: 250,
            }
        );
    }

    #[test]
    fn timeouts_and_limits_out_of_range_are_refused() {
        for (section, needle, line) in [
            ("[timeouts]\nidle = \"0s\"", "timeouts.idle must be greater than zero", None),
            ("[timeouts]\nrequest = \"0ms\"", "timeouts.request", None),
            ("[timeouts]\nheader_read = \"400y\"", "timeouts.header_read must be at most 365 days", None),
            ("[tls]\nhandshake_timeout = \"500000000000y\"", "tls.handshake_timeout must be at most", None),
            ("[timeouts]\nslow = \"1s\"", "slow", Some(10)),
            ("[limits]\nmax_connections = 0", "limits.max_connections: must be between 1 and", Some(10)),
            ("[limits]\nmax_connections = 100000000", "limits.max_connections", Some(10)),
            ("[limits]\nmax_uri_bytes = 70000", "limits.max_uri_bytes: must be between 1 and 65534", Some(10)),
            ("[limits]\nmax_header_bytes = 2000000", "limits.max_header_bytes", Some(10)),
            ("[limits]\nh2_max_concurrent_streams = 0", "limits.h2_max_concurrent_streams", Some(10)),
            ("[limits]\nmax_body_bytes = -1", "expected u64", Some(10)),
        ] {
            let err = parse(&format!("{MINIMAL}\n{section}\n")).unwrap_err();
            assert!(err.message.contains(needle), "{section}: {err}");
            if line.is_some() {
                assert_eq!(err.position.map(|p| p.0), line, "{section}: {err}");
            }
        }
    }

    #[test]
    fn response_headers_are_validated() {
        let ok = parse(&format!("{MINIMAL}\n[response_headers]\nX-Frame-Options = \"DENY\"\nServer = \"\"\n")).unwrap();
        assert_eq!(ok.response_headers[0].name, "server");
        assert_eq!(ok.response_headers[0].value, None, "an empty value removes the header");
        assert_eq!(ok.response_headers[1].name, "x-frame-options");
        assert_eq!(ok.response_headers[1].value, Some(http::HeaderValue::from_static("DENY")));
        let framing = parse(&format!("{MINIMAL}\n[response_headers]\nTransfer-Encoding = \"chunked\"\n"));
        assert!(framing.unwrap_err().to_string().contains("response_headers.Transfer-Encoding"));
        let bad = parse(&format!("{MINIMAL}\n[response_headers]\n\"bad name\" = \"x\"\n"));
        assert!(bad.unwrap_err().to_string().contains("not a valid header name"));
    }

    #[test]
    fn routes_rewrite_prefixes_and_set_headers() {
        let config = parse(&format!(
            "{MINIMAL}\n[[route]]\npath = \"/api/\"\nupstream = \"http://127.0.0.1:8080\"\nprefix_rewrite = \"/\"\n\
             request_headers = {{ X-Api = \"2\", Cookie = \"\" }}\nresponse_headers = {{ X-Powered-By = \"\" }}\n\
             [[route]]\nrespond = {{ status = 308 }}\nresponse_headers = {{ Location = \"https://example.test/\" }}\n"
        ))
        .unwrap();
        let RouteAction::Upstream(group) = &config.routes[0].action else { panic!("an upstream route") };
        assert_eq!(
            group.prefix_rewrite,
            Some(PrefixRewrite { prefix: "/api/".to_owned(), replacement: "/".to_owned() })
        );
        let rules: Vec<_> = group.request_headers.iter().map(|r| (r.name.as_str(), r.value.is_some())).collect();
        assert_eq!(rules, [("cookie", false), ("x-api", true)]);
        assert_eq!(config.routes[0].response_headers[0].name, "x-powered-by");
        assert_eq!(config.routes[1].response_headers[0].name, "location");

        let route = |extra: &str| parse(&format!("{MINIMAL}\n[[route]]\npath = \"/a\"\n{extra}\n")).unwrap_err();
        for (extra, needle, line) in [
            ("upstream = \"http://u:1\"\nprefix_rewrite = \"v2\"", "route[0].prefix_rewrite: must be a path", 12),
            ("upstream = \"http://u:1\"\nprefix_rewrite = \"/a?b\"", "route[0].prefix_rewrite", 12),
            (
                "respond = { status = 200 }\nprefix_rewrite = \"/\"",
                "route[0].prefix_rewrite: only an `upstream` route",
                12,
            ),
            ("respond = { status = 200 }\nrequest_headers = { A = \"1\" }", "route[0].request_headers: only an", 12),
            (
                "upstream = \"http://u:1\"\nrequest_headers = { Host = \"x\" }",
                "route[0].request_headers.Host: is a header sealgate manages",
                12,
            ),
            (
                "upstream = \"http://u:1\"\nrequest_headers = { X-Forwarded-For = \"1.2.3.4\" }",
                "X-Forwarded-For: is a header sealgate manages",
                12,
            ),
            (
                "upstream = \"http://u:1\"\nrequest_headers = { A = \"x\\ny\" }",
                "request_headers.A: is not a valid header value",
                12,
            ),
            (
                "respond = { status = 200 }\nresponse_headers = { Content-Length = \"1\" }",
                "route[0].response_headers.Content-Length",
                12,
            ),
        ] {
            let err = route(extra);
            assert!(err.to_string().contains(needle), "{extra}: {err}");
            assert_eq!(err.position.map(|p| p.0), Some(line), "{extra}: {err}");
        }
    }

    #[test]
    fn rate_limits_parse_per_second_or_minute_with_a_burst() {
        let route =
            |limit: &str| parse(&format!("{MINIMAL}\n[[route]]\nrespond = {{ status = 200 }}\nrate_limit = {limit}\n"));
        let limit = |text: &str| route(text).unwrap().routes[0].rate_limit.clone().unwrap();
        assert_eq!(
            limit("{ rate = \"10/s\" }"),
            RateLimitConfig { requests: 10, per: Duration::from_secs(1), burst: 10 },
            "the burst defaults to the rate's count"
        );
        assert_eq!(
            limit("{ rate = \"300/m\", burst = 5 }"),
            RateLimitConfig { requests: 300, per: Duration::from_secs(60), burst: 5 }
        );
        for (text, needle) in [
            ("{ rate = \"10\" }", "route[0].rate_limit: rate must be requests per second or minute"),
            ("{ rate = \"0/s\" }", "rate must be"),
            ("{ rate = \"10/h\" }", "rate must be"),
            ("{ rate = \"10/s\", burst = 0 }", "burst must be between 1 and 1000000"),
            ("{ rate = \"10/s\", per_ip = true }", "unknown field `per_ip`"),
        ] {
            let err = route(text).unwrap_err();
            assert!(err.to_string().contains(needle), "{text}: {err}");
            assert_eq!(err.position.map(|p| p.0), Some(11), "{text}: {err}");
        }
    }

    #[test]
    fn client_filters_parse_blocks_and_addresses_and_deny_wins() {
        let route = |keys: &str| parse(&format!("{MINIMAL}\n[[route]]\nrespond = {{ status = 200 }}\n{keys}\n"));
        let filter = route("allow = [\"10.0.0.0/8\", \"2001:db8::/32\", \"192.0.2.7\"]\ndeny = [\"10.9.0.0/16\"]")
            .unwrap()
            .routes[0]
            .clients
            .clone();
        let admits = |ip: &str| filter.admits(ip.parse().unwrap());
        assert!(admits("10.1.2.3") && admits("192.0.2.7") && admits("2001:db8::5") && admits("::ffff:10.1.2.3"));
        assert!(!admits("10.9.1.1"), "deny wins over allow");
        assert!(!admits("192.0.2.8") && !admits("2001:db9::1"), "not in the allow list");
        let open = route("").unwrap().routes[0].clients.clone();
        assert!(open.is_open() && open.admits("203.0.113.1".parse().unwrap()));
        let only_deny = route("deny = [\"203.0.113.0/24\"]").unwrap().routes[0].clients.clone();
        assert!(!only_deny.admits("203.0.113.9".parse().unwrap()) && only_deny.admits("198.51.100.1".parse().unwrap()));
        // A block written with host bits is the block it names.
        let trunc = route("allow = [\"10.1.2.3/8\"]").unwrap().routes[0].clients.clone();
        assert_eq!(trunc.allow[0].to_string(), "10.0.0.0/8");
        for (keys, needle) in [
            ("allow = [\"10.0.0.0/33\"]", "route[0].allow: \"10.0.0.0/33\" is not an IP address or CIDR block"),
            ("deny = [\"localhost\"]", "route[0].deny: \"localhost\" is not"),
            ("allow = []", "route[0].allow: lists no address"),
        ] {
            let err = route(keys).unwrap_err();
            assert!(err.to_string().contains(needle), "{keys}: {err}");
        }
    }

    #[test]
    fn redirect_routes_take_a_location_with_variables_and_a_redirect_status() {
        let route = |keys: &str| parse(&format!("{MINIMAL}\n[[route]]\n{keys}\n"));
        let config = route("redirect = { to = \"https://www.example.com$request_uri\" }").unwrap();
        let RouteAction::Redirect(redirect) = &config.routes[0].action else { panic!("a redirect route") };
        assert_eq!(redirect.status, http::StatusCode::PERMANENT_REDIRECT, "308 by default");
        assert_eq!(redirect.to.to_string(), "https://www.example.com$request_uri");
        for (keys, needle) in [
            ("redirect = { to = \"https://x$uri\" }", "route[0].redirect: to: unknown variable at \"$uri\""),
            ("redirect = { to = \"https://x\", status = 200 }", "status must be 301, 302, 303, 307 or 308"),
            ("redirect = { to = \"\" }", "to: must not be empty"),
            (
                "redirect = { to = \"/x\" }\nrespond = { status = 200 }",
                "more than one of `upstream`, `respond` and `redirect`",
            ),
            ("redirect = { to = \"/x\" }\nretries = 2", "route[0].retries: only an `upstream` route has it"),
        ] {
            let err = route(keys).unwrap_err();
            assert!(err.to_string().contains(needle), "{keys}: {err}");
            assert!(err.position.is_some(), "{keys}: {err}");
        }
    }

    #[test]
    fn retry_statuses_are_server_errors_of_upstream_routes() {
        let route = |keys: &str| parse(&format!("{MINIMAL}\n[[route]]\n{keys}\n"));
        let g = group("upstream = \"http://u:1\"\nretry_statuses = [502, 503, 504]").unwrap();
        assert_eq!(g.retry_statuses, [502, 503, 504]);
        assert!(group("upstream = \"http://u:1\"").unwrap().retry_statuses.is_empty());
        let err = route("upstream = \"http://u:1\"\nretry_statuses = [503, 404]").unwrap_err();
        assert!(err.to_string().contains("route[0].retry_statuses: 404 is not a 5xx status"), "{err}");
        let err = route("respond = { status = 200 }\nretry_statuses = [503]").unwrap_err();
        assert!(err.to_string().contains("route[0].retry_statuses: only an `upstream` route has it"), "{err}");
    }

    #[test]
    fn a_route_may_set_its_own_body_limit() {
        let route = |limit: &str| parse(&format!("{MINIMAL}\n[[route]]\nrespond = {{ status = 200 }}\n{limit}\n"));
        assert_eq!(route("max_body_bytes = 1_073_741_824").unwrap().routes[0].max_body_bytes, Some(1 << 30));
        assert_eq!(route("").unwrap().routes[0].max_body_bytes, None);
        let err = route("max_body_bytes = 0").unwrap_err();
        assert!(err.to_string().contains("route[0].max_body_bytes: must be at least 1"), "{err}");
    }

    #[test]
    fn bad_bind_addresses_are_named() {
        let err = parse(&MINIMAL.replace("127.0.0.1:8443", "localhost")).unwrap_err().to_string();
        assert!(err.contains("listener[0].bind"), "{err}");
    }
}

#[cfg(test)]
mod readme {
    use super::*;

    /// The configuration reference in the README is a valid configuration.
    #[test]
    fn the_readme_reference_parses() {
        let readme = include_str!("../README.md");
        let section = readme.split("## Configuration reference").nth(1).expect("the README has a reference");
        let block = section.split("```toml\n").nth(1).and_then(|b| b.split("```").next()).expect("a toml block");
        let config = Config::parse(block, Path::new("/srv/proxy.toml")).unwrap();
        assert_eq!(config.routes.len(), 1);
        let RouteAction::Upstream(group) = &config.routes[0].action else { panic!("an upstream route") };
        assert_eq!(group.upstreams.len(), 2);
        assert_eq!(group.upstreams[1].scheme, UpstreamScheme::Https);
        assert_eq!(group.ca.as_deref(), Some(Path::new("/srv/upstream-ca.pem")));
        assert_eq!((group.balance, group.retries), (Balance::RoundRobin, DEFAULT_RETRIES));
        assert_eq!(group.protocol, UpstreamProtocol::Http11, "the reference shows the default");
        assert_eq!(group.outlier, OutlierConfig::default(), "the reference shows the defaults");
        let checks = group.health_check.as_ref().expect("the reference shows health checks");
        assert_eq!((checks.interval, checks.timeout), (Duration::from_secs(5), Duration::from_secs(1)));
        assert_eq!(checks.expect_status, 200..=399);
        assert_eq!(config.tls.key_exchange.len(), 3);
        let client_auth = config.tls.client_auth.expect("the reference shows client certificates");
        assert_eq!((client_auth.mode, client_auth.forward), (ClientAuthMode::Required, false), "the defaults");
        assert_eq!(client_auth.ca, Path::new("/srv/client-ca.pem"));
        assert!(!config.routes[0].require_client_certificate, "the reference shows the default");
        assert!(config.routes[0].compress, "the reference shows the default");
        let compression = config.compression.as_ref().expect("the reference shows [compression]");
        assert_eq!(
            (compression.codings.as_slice(), compression.min_bytes),
            (&[Coding::Brotli, Coding::Gzip][..], 1024)
        );
        assert!(config.admin.is_some());
        assert_eq!(config.audit.map(|a| a.path), Some(PathBuf::from("/srv/audit.jsonl")));
        // The reference shows the defaults.
        assert_eq!(config.timeouts, TimeoutsConfig::default());
        assert_eq!(config.limits, LimitsConfig::default());
    }
}

#[cfg(test)]
mod contrib {
    use super::*;

    /// The Kubernetes example's proxy.toml is a valid configuration.
    #[test]
    fn the_kubernetes_example_config_parses() {
        let manifest = include_str!("../contrib/kubernetes/sealgate.yaml");
        let block: String = manifest
            .split("proxy.toml: |\n")
            .nth(1)
            .expect("the ConfigMap holds proxy.toml")
            .lines()
            .take_while(|l| l.starts_with("    ") || l.is_empty())
            .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
            .collect();
        let config = Config::parse(&block, Path::new("/etc/sealgate/proxy.toml")).unwrap();
        assert_eq!(config.custody.export, Path::new("/var/run/sealgate/export"));
        assert!(config.admin.is_some());
    }
}
