//! Forwarding to an upstream: rewriting the request for HTTP/1.1 (hop-by-hop headers, forwarding headers,
//! `Host`), and mapping upstream failures to 502 and 504. Which upstream, and how often, is
//! [`super::upstream`]'s business.
//!
//! Bodies are streamed both ways: the client's body is handed to the upstream request as it arrives and the
//! upstream's body to the client response, so memory stays bounded whatever their size.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, StatusCode, Uri, Version};

use crate::config::PrefixRewrite;

/// Hop-by-hop headers (RFC 9110 section 7.6.1, plus the legacy `Keep-Alive`, `Proxy-Connection` and the proxy
/// authentication pair, which belong to this hop only).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// Envoy's name for the client certificate's identity (see [`crate::client_auth`]).
pub const X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Removes hop-by-hop headers, including every header named in `Connection`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests and responses carry none: one pass over the names costs less than a lookup per name.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// Whether the client's `TE` lists `trailers`.
pub fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|coding| coding.split(';').next().is_some_and(|name| name.trim().eq_ignore_ascii_case("trailers")))
}

/// What the proxy knows of the client side of a request, for the `X-Forwarded-*` and `Forwarded` headers.
#[derive(Debug, Clone, Copy)]
pub struct ClientSide<'a> {
    /// The client's address.
    pub peer: SocketAddr,
    /// The request's `Host` / `:authority`, as the client sent it.
    pub authority: &'a str,
    /// The connection's forwarding header values, made once.
    pub cache: &'a ForwardingCache,
    /// The client certificate's `X-Forwarded-Client-Cert` value, when `[tls.client_auth] forward` is on and
    /// the client sent one.
    pub client_certificate: Option<&'a HeaderValue>,
}

/// The forwarding header values of one client connection, made for its first proxied request and reused by the
/// next ones with the same authority (all of them, nearly always). Made per request they were three allocations
/// and an address formatted every time. Boxed, so that a connection that never goes upstream pays a pointer.
#[derive(Debug, Default)]
pub struct ForwardingCache(OnceLock<Box<ForwardingValues>>);

#[derive(Debug)]
struct ForwardingValues {
    /// The authority the values were made for.
    authority: Box<str>,
    /// `X-Forwarded-For`.
    for_ip: Option<HeaderValue>,
    /// `X-Forwarded-Host`.
    host: Option<HeaderValue>,
    /// `Forwarded`.
    forwarded: Option<HeaderValue>,
}

impl ForwardingValues {
    /// The values for a request from `peer` to `authority`; `host` is `authority` as a header value (`None`: not a
    /// valid one). The values build on an IP address and an authority hyper already accepted as a header or URI,
    /// so they are valid header values; were one not, it is `None` and the client's header is removed.
    fn new(peer: SocketAddr, authority: &str, host: Option<HeaderValue>) -> Self {
        let mut forwarded = String::with_capacity(authority.len() + 64);
        forwarded.push_str("for=");
        // The address goes into `Forwarded` (IPv6 quoted and bracketed) and, the same text, into `X-Forwarded-For`.
        let ip_text = match peer.ip() {
            std::net::IpAddr::V4(ip) => {
                let start = forwarded.len();
                push_ipv4(&mut forwarded, ip);
                start..forwarded.len()
            }
            std::net::IpAddr::V6(ip) => {
                use std::fmt::Write as _;
                forwarded.push_str("\"[");
                let start = forwarded.len();
                let _ = write!(forwarded, "{ip}");
                let end = forwarded.len();
                forwarded.push_str("]\"");
                start..end
            }
        };
        let for_ip = HeaderValue::from_str(&forwarded[ip_text]).ok();
        forwarded.push_str(";host=");
        if authority.bytes().all(is_token_char) {
            forwarded.push_str(authority);
        } else {
            forwarded.push('"');
            forwarded.extend(authority.chars().filter(|c| !matches!(c, '\\' | '"')));
            forwarded.push('"');
        }
        forwarded.push_str(";proto=https");
        let forwarded = HeaderValue::from_maybe_shared(Bytes::from(forwarded)).ok();
        Self { authority: authority.into(), for_ip, host, forwarded }
    }
}

/// Sets `X-Forwarded-For`, `-Proto`, `-Host` and `Forwarded`, replacing whatever the client sent: sealgate is
/// the edge, so nothing a client claims about earlier hops can be trusted. `host` is `client.authority` as a
/// header value (`None`: not a valid one), for `X-Forwarded-Host`.
pub fn set_forwarded(headers: &mut HeaderMap, client: ClientSide<'_>, host: Option<HeaderValue>) {
    let fresh;
    let values = match client.cache.0.get() {
        Some(cached) if *cached.authority == *client.authority => cached,
        Some(_) => {
            fresh = ForwardingValues::new(client.peer, client.authority, host);
            &fresh
        }
        None => client.cache.0.get_or_init(|| {
            // An owned copy: `host` may share the buffer hyper read the request into, which the connection must
            // not keep alive.
            let host = host.and_then(|host| HeaderValue::from_bytes(host.as_bytes()).ok());
            Box::new(ForwardingValues::new(client.peer, client.authority, host))
        }),
    };
    // `insert` replaces every value the client sent.
    set_or_remove(headers, X_FORWARDED_FOR, values.for_ip.clone());
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
    set_or_remove(headers, X_FORWARDED_HOST, values.host.clone());
    set_or_remove(headers, FORWARDED, values.forwarded.clone());
    // Removed even when sealgate does not set it: upstreams that trust it must only ever see sealgate's.
    set_or_remove(headers, X_FORWARDED_CLIENT_CERT, client.client_certificate.cloned());
}

/// Appends `ip` in dotted decimal. This runs for every proxied request: `Display` through the formatting
/// machinery cost several times more.
fn push_ipv4(out: &mut String, ip: std::net::Ipv4Addr) {
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
}

fn set_or_remove(headers: &mut HeaderMap, name: HeaderName, value: Option<HeaderValue>) {
    match value {
        Some(value) => {
            headers.insert(name, value);
        }
        None => {
            headers.remove(name);
        }
    }
}

/// RFC 9110 `tchar`.
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// HTTP/2 may split `Cookie` into several fields; HTTP/1.1 needs one (RFC 9113 section 8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    if headers.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let joined: Vec<u8> =
        headers.get_all(header::COOKIE).iter().map(HeaderValue::as_bytes).collect::<Vec<_>>().join(&b"; "[..]);
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// Why a request could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The upstream could not be reached (connection refused, reset, closed before answering, TLS refused).
    #[error("upstream {upstream} unreachable: {source}")]
    Unreachable {
        /// The upstream.
        upstream: String,
        /// What failed.
        source: super::upstream::SendError,
    },
    /// The upstream did not connect or answer in time.
    #[error("upstream {upstream} did not answer within {timeout:?}")]
    Timeout {
        /// The upstream.
        upstream: String,
        /// The limit.
        timeout: Duration,
    },
    /// The request could not be turned into an upstream request.
    #[error("cannot build the upstream request: {0}")]
    Request(#[from] http::Error),
    /// The request's host cannot be sent as a `Host` header.
    #[error("the request's host is not a valid header value")]
    InvalidHost,
}

impl ForwardError {
    /// The status to answer the client with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unreachable { .. } => StatusCode::BAD_GATEWAY,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Request(_) | Self::InvalidHost => StatusCode::BAD_REQUEST,
        }
    }

    /// The upstream that failed, when one was tried.
    pub fn upstream(&self) -> Option<&str> {
        match self {
            Self::Unreachable { upstream, .. } | Self::Timeout { upstream, .. } => Some(upstream),
            Self::Request(_) | Self::InvalidHost => None,
        }
    }
}

/// Rewrites a client request's (HTTP/1.1 or HTTP/2) head for HTTP/1.1 upstreams, once for every attempt:
/// hop-by-hop headers removed, HTTP/2 cookies joined, `Host` set to the client's when `preserve_host` (else
/// each attempt sets its upstream's), forwarding headers set, version HTTP/1.1.
pub fn rewrite_head(
    parts: &mut http::request::Parts,
    client: ClientSide<'_>,
    preserve_host: bool,
) -> Result<(), ForwardError> {
    let from_http2 = parts.version == Version::HTTP_2;
    parts.version = Version::HTTP_11;
    remove_hop_by_hop(&mut parts.headers);
    // Room for the four forwarding fields at once: inserted one by one into a map sized for what the client
    // sent, they grew it up to twice, rehashing each time.
    parts.headers.reserve(4);
    super::upgrade::restore_request_headers(&parts.extensions, &mut parts.headers);
    if from_http2 {
        join_cookies(&mut parts.headers);
    }
    // The client's `Host` field is the authority as a header value already (an HTTP/2 request has none).
    let host = match parts.headers.get(header::HOST) {
        Some(host) if host.as_bytes() == client.authority.as_bytes() => Some(host.clone()),
        _ => HeaderValue::from_str(client.authority).ok(),
    };
    if preserve_host {
        parts.headers.insert(header::HOST, host.clone().ok_or(ForwardError::InvalidHost)?);
    } else {
        parts.headers.remove(header::HOST);
    }
    set_forwarded(&mut parts.headers, client, host);
    Ok(())
}

/// One attempt's request: `method` and `path` (origin-form, as HTTP/1.1 sends it to an origin server), with
/// `headers` as [`rewrite_head`] left them and `host` (the upstream's own `Host`, when the client's is not
/// preserved).
pub fn upstream_request<B>(
    method: Method,
    path: PathAndQuery,
    mut headers: HeaderMap,
    host: Option<HeaderValue>,
    body: B,
) -> Result<Request<B>, ForwardError> {
    let mut uri = http::uri::Parts::default();
    uri.path_and_query = Some(path);
    if let Some(host) = host {
        headers.insert(header::HOST, host);
    }
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = Uri::from_parts(uri).map_err(http::Error::from)?;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Ok(request)
}

/// `path` with the route's prefix replaced as `rewrite` says. When the replacement ends with `/` and what follows
/// the prefix begins with one, one of the two goes, so that `path = "/api/"` and `path = "/api"` both rewrite
/// `/api/users` to `/users` under `prefix_rewrite = "/"`. The query is kept as it was.
pub fn rewrite_prefix(path: &PathAndQuery, rewrite: &PrefixRewrite) -> Result<PathAndQuery, ForwardError> {
    // The route matched, so the path begins with the prefix; were it not, it goes upstream unchanged.
    let Some(rest) = path.path().strip_prefix(rewrite.prefix.as_str()) else {
        return Ok(path.clone());
    };
    let rest = match rewrite.replacement.ends_with('/') {
        true => rest.strip_prefix('/').unwrap_or(rest),
        false => rest,
    };
    let mut rewritten =
        String::with_capacity(rewrite.replacement.len() + rest.len() + path.query().map_or(0, |q| q.len() + 1));
    rewritten.push_str(&rewrite.replacement);
    rewritten.push_str(rest);
    if let Some(query) = path.query() {
        rewritten.push('?');
        rewritten.push_str(query);
    }
    // Both parts were valid path characters already (the replacement was checked with the configuration).
    PathAndQuery::from_maybe_shared(Bytes::from(rewritten)).map_err(|e| ForwardError::Request(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_connection_listed_ones_go() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret-Hop , Upgrade"));
        headers.append(header::CONNECTION, HeaderValue::from_static("x-other"));
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert("x-other", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("Basic x"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut headers);
        let names: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn trailers_are_accepted_when_te_lists_them() {
        let te = |values: &[&'static str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(header::TE, HeaderValue::from_static(value));
            }
            accepts_trailers(&headers)
        };
        assert!(te(&["trailers"]) && te(&["gzip, Trailers"]) && te(&["deflate", "trailers;q=1"]));
        assert!(!te(&[]) && !te(&["gzip"]) && !te(&["trailersx"]));
    }

    #[test]
    fn forwarded_headers_replace_what_the_client_sent() {
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        headers.insert(FORWARDED, HeaderValue::from_static("for=6.6.6.6"));
        let peer: SocketAddr = "[2001:db8::1]:5555".parse().unwrap();
        let authority = "app.example.com:8443";
        let cache = ForwardingCache::default();
        set_forwarded(
            &mut headers,
            ClientSide { peer, authority, cache: &cache, client_certificate: None },
            HeaderValue::from_str(authority).ok(),
        );
        assert_eq!(headers[&X_FORWARDED_FOR], "2001:db8::1");
        assert_eq!(headers[&X_FORWARDED_PROTO], "https");
        assert_eq!(headers[&X_FORWARDED_HOST], "app.example.com:8443");
        assert_eq!(headers[&FORWARDED], "for=\"[2001:db8::1]\";host=\"app.example.com:8443\";proto=https");
        assert_eq!(headers.get_all(&X_FORWARDED_FOR).iter().count(), 1);

        for ip in ["0.0.0.0", "127.0.0.1", "10.9.99.100", "255.255.255.255", "192.168.1.20"] {
            let peer = SocketAddr::new(ip.parse().unwrap(), 1);
            let cache = ForwardingCache::default();
            set_forwarded(
                &mut headers,
                ClientSide { peer, authority: "a.test", cache: &cache, client_certificate: None },
                None,
            );
            assert_eq!(headers[&X_FORWARDED_FOR], ip);
            assert_eq!(headers[&FORWARDED], format!("for={ip};host=a.test;proto=https").as_str());
            assert!(!headers.contains_key(&X_FORWARDED_HOST));
        }
    }

    #[test]
    fn a_connections_values_serve_its_authority_and_no_other() {
        let peer: SocketAddr = "192.0.2.7:5555".parse().unwrap();
        let cache = ForwardingCache::default();
        let first = |authority| ClientSide { peer, authority, cache: &cache, client_certificate: None };
        let mut headers = HeaderMap::new();
        set_forwarded(&mut headers, first("a.test"), HeaderValue::from_str("a.test").ok());
        assert_eq!(headers[&FORWARDED], "for=192.0.2.7;host=a.test;proto=https");
        // Another authority on the same connection (HTTP/2 coalescing) gets its own values, not the cached ones.
        let mut other = HeaderMap::new();
        set_forwarded(&mut other, first("b.test:8443"), HeaderValue::from_str("b.test:8443").ok());
        assert_eq!(other[&FORWARDED], "for=192.0.2.7;host=\"b.test:8443\";proto=https");
        assert_eq!(other[&X_FORWARDED_HOST], "b.test:8443");
        // The first authority again: the cached values, still its own.
        let mut again = HeaderMap::new();
        again.insert(X_FORWARDED_HOST, HeaderValue::from_static("forged"));
        set_forwarded(&mut again, first("a.test"), None);
        assert_eq!(again, headers);
    }

    #[test]
    fn a_prefix_rewrite_replaces_what_the_route_matched_and_keeps_the_query() {
        let rewrite = |prefix: &str, replacement: &str, path: &str| {
            let rule = PrefixRewrite { prefix: prefix.to_owned(), replacement: replacement.to_owned() };
            rewrite_prefix(&path.parse().unwrap(), &rule).unwrap().to_string()
        };
        assert_eq!(rewrite("/api/", "/", "/api/users?id=7"), "/users?id=7");
        assert_eq!(rewrite("/api", "/", "/api/users"), "/users", "no doubled slash");
        assert_eq!(rewrite("/api", "/", "/api"), "/");
        assert_eq!(rewrite("/api", "/", "/api?x"), "/?x");
        assert_eq!(rewrite("/api", "/", "/apiary"), "/ary", "a plain string prefix, as the route matched it");
        assert_eq!(rewrite("/api", "/v2", "/api/users"), "/v2/users");
        assert_eq!(rewrite("/api/", "/v2", "/api/users"), "/v2users", "the replacement is taken literally");
        assert_eq!(rewrite("/", "/app/", "/index.html"), "/app/index.html");
        assert_eq!(rewrite("/old", "/new", "/other"), "/other", "a path without the prefix is left alone");
    }

    #[test]
    fn cookies_are_joined() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1"));
        headers.append(header::COOKIE, HeaderValue::from_static("b=2"));
        join_cookies(&mut headers);
        assert_eq!(headers.get_all(header::COOKIE).iter().collect::<Vec<_>>(), ["a=1; b=2"]);
    }
}
