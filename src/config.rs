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
    /// The access log, if any.
    pub access_log: Option<crate::access_log::AccessLogConfig>,
}

/// `[custody]`.
#[derive(Debug, Clone)]
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

/// `[tls]`.
#[derive(Debug, Clone)]
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
}

/// One `[[listener]]`.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Address to bind.
    pub bind: SocketAddr,
}

/// `[admin]`.
#[derive(Debug, Clone)]
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
    /// Idle upstream connections are closed after this long.
    pub pool_idle_timeout: Duration,
    /// Idle upstream connections kept per upstream.
    pub pool_max_idle_per_host: usize,
    /// Send the client's `Host` upstream (true) or the upstream's own authority (false).
    pub preserve_host: bool,
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
}

/// What a route does with a request.
#[derive(Debug, Clone)]
pub enum RouteAction {
    /// Forward to these upstreams, round robin.
    Upstream(Vec<UpstreamUrl>),
    /// Answer directly.
    Respond(DirectResponse),
}

/// A validated upstream: `http://host:port`, no credentials, no path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// `host:port` (port defaulted to 80).
    pub authority: http::uri::Authority,
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}", self.authority)
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
#[derive(Debug, Clone, Default)]
pub struct RuntimeConfig {
    /// Tokio worker threads; `None` = one per core.
    pub worker_threads: Option<usize>,
}

/// One `[[redirect]]`: a plain-HTTP listener answering every request with `308` to the same URL over https.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectConfig {
    /// Address to bind.
    pub bind: SocketAddr,
    /// Port of the https URL (omitted when 443, the default).
    pub https_port: u16,
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
#[derive(Debug, Clone)]
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
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A `tracing` filter, e.g. `info` or `sealgate=debug`; `RUST_LOG` overrides it.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

/// `[audit]`: the append-only, hash-chained record of custody events (see [`crate::audit`]).
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// The log file, resolved against the config file's directory.
    pub path: PathBuf,
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
    access_log: Option<RawAccessLog>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedirect {
    bind: Spanned<String>,
    https_port: Option<u16>,
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    bind: Spanned<String>,
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
    pool_idle_timeout: Option<Duration>,
    pool_max_idle_per_host: Option<usize>,
    preserve_host: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    host: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    upstream: Option<Spanned<OneOrMany>>,
    respond: Option<Spanned<RawRespond>>,
    #[serde(default, with = "humantime_serde::option")]
    timeout: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
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

// ---------------------------------------------------------------------------------------------------------------

/// Default period of the backstop rescan of the export.
pub const DEFAULT_RESCAN_INTERVAL: Duration = Duration::from_secs(2);

impl Config {
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
        let tls = cx.tls(raw.tls)?;
        let listeners = raw
            .listener
            .iter()
            .enumerate()
            .map(|(i, l)| Ok(ListenerConfig { bind: cx.socket_addr(&format!("listener[{i}].bind"), &l.bind)? }))
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
            pool_idle_timeout: raw.proxy.pool_idle_timeout.unwrap_or(Duration::from_secs(90)),
            pool_max_idle_per_host: raw.proxy.pool_max_idle_per_host.unwrap_or(64),
            preserve_host: raw.proxy.preserve_host.unwrap_or(true),
        };
        let routes = raw.route.into_iter().enumerate().map(|(i, r)| cx.route(i, r)).collect::<Result<Vec<_>>>()?;
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
                Ok(RedirectConfig { bind, https_port: r.https_port.unwrap_or(443) })
            })
            .collect::<Result<Vec<_>>>()?;
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
        Ok(Self {
            path: path.to_owned(),
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
            access_log,
        })
    }
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

    fn tls(&self, raw: RawTls) -> Result<TlsConfig> {
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
        let handshake_timeout = raw.handshake_timeout.unwrap_or(Duration::from_secs(10));
        if handshake_timeout.is_zero() {
            return Err(self.error(None, "tls.handshake_timeout must be greater than zero"));
        }
        Ok(TlsConfig {
            min_version,
            session_resumption: raw.session_resumption.unwrap_or(true),
            session_cache_size: raw.session_cache_size.unwrap_or(256),
            default_certificate: raw.default_certificate.map(Spanned::into_inner),
            key_exchange,
            handshake_timeout,
        })
    }

    fn socket_addr(&self, key: &str, value: &Spanned<String>) -> Result<SocketAddr> {
        value.get_ref().parse().map_err(|_| {
            self.at(value, key, format!("{:?} is not an IP address and port, e.g. 127.0.0.1:8443", value.get_ref()))
        })
    }

    fn route(&self, index: usize, raw: RawRoute) -> Result<RouteConfig> {
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
        let action = match (raw.upstream, raw.respond) {
            (Some(_), Some(r)) => {
                return Err(self.at(&r, &key("respond"), "a route has either `upstream` or `respond`, not both"))
            }
            (None, None) => {
                return Err(self.error(None, format!("route[{index}] needs `upstream` or `respond`")));
            }
            (Some(upstream), None) => {
                let span = upstream.span();
                let urls = match upstream.into_inner() {
                    OneOrMany::One(url) => vec![url],
                    OneOrMany::Many(urls) => urls,
                };
                if urls.is_empty() {
                    return Err(self.error(Some(span), format!("{}: lists no URL", key("upstream"))));
                }
                let urls = urls
                    .iter()
                    .map(|url| {
                        parse_upstream(url)
                            .map_err(|why| self.error(Some(span.clone()), format!("{}: {why}", key("upstream"))))
                    })
                    .collect::<Result<Vec<_>>>()?;
                RouteAction::Upstream(urls)
            }
            (None, Some(respond)) => {
                let span = respond.span();
                let r = respond.into_inner();
                let status = http::StatusCode::from_u16(r.status)
                    .ok()
                    .filter(|s| s.as_u16() >= 200)
                    .ok_or_else(|| self.error(Some(span), format!("{}: status must be 200 to 999", key("respond"))))?;
                let content_type = r.content_type.unwrap_or_else(|| "text/plain; charset=utf-8".to_owned());
                if http::HeaderValue::from_str(&content_type).is_err() {
                    return Err(self.error(None, format!("{}: content_type is not a valid header", key("respond"))));
                }
                RouteAction::Respond(DirectResponse { status, body: r.body, content_type })
            }
        };
        Ok(RouteConfig { host, path, action, response_timeout: raw.timeout })
    }
}

/// Validates an upstream URL. The error never repeats the URL, which may carry a secret.
fn parse_upstream(url: &str) -> std::result::Result<UpstreamUrl, String> {
    let rest = if let Some(rest) = url.strip_prefix("http://") {
        rest
    } else if url.starts_with("https://") {
        return Err("https upstreams are not supported yet; use http://host:port".to_owned());
    } else {
        return Err("must be an http:// URL, e.g. http://127.0.0.1:8080".to_owned());
    };
    let (authority, path) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    if authority.contains('@') {
        return Err("the URL carries credentials (user:password@...); sealgate refuses them in proxy.toml".to_owned());
    }
    if !(path.is_empty() || path == "/") {
        return Err("must be http://host:port with no path, query or fragment".to_owned());
    }
    let authority: http::uri::Authority = authority.parse().map_err(|_| "has an invalid host or port".to_owned())?;
    if authority.host().is_empty() {
        return Err("has no host".to_owned());
    }
    let authority = match authority.port_u16() {
        Some(_) => authority,
        None => format!("{}:80", authority.host()).parse().map_err(|_| "has an invalid host".to_owned())?,
    };
    Ok(UpstreamUrl { authority })
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
            RouteAction::Upstream(urls) => {
                assert_eq!(urls[0].to_string(), "http://127.0.0.1:8080");
                assert_eq!(urls[1].to_string(), "http://localhost:80");
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
            ("path = \"/\"", "needs `upstream` or `respond`"),
        ] {
            let err = parse(&format!("{MINIMAL}\n[[route]]\n{route}\n")).unwrap_err().to_string();
            assert!(err.contains(needle), "{route}: {err}");
        }
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
        assert_eq!(config.tls.key_exchange.len(), 3);
        assert!(config.admin.is_some());
        assert_eq!(config.audit.map(|a| a.path), Some(PathBuf::from("/srv/audit.jsonl")));
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
