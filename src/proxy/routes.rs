//! Route selection: which `[[route]]` answers a request.
//!
//! A route matches when its host matches (exact, `*.example.com` for one label, or any host when absent) and
//! its path is a prefix of the request's path. Among matching routes, the most specific host wins (exact, then
//! wildcard, then any), then the longest path prefix, then the first in the file: the order nginx users know
//! from `server_name` and `location`.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use prometheus_client::metrics::histogram::Histogram;

use super::rate_limit::RateLimiter;
use super::upstream::{UpstreamError, UpstreamGroup};
use crate::config::{ClientFilter, HeaderRule, ProxyConfig, RedirectRoute, RouteAction, RouteConfig};
use crate::metrics::Metrics;
use crate::names;

/// A route ready to serve.
#[derive(Debug)]
pub struct Route {
    /// Index in the configuration, for logs.
    pub index: usize,
    host: Option<String>,
    path: String,
    /// What the route does.
    pub action: Action,
    /// Time allowed for the upstreams to answer with headers, every attempt included.
    pub response_timeout: Duration,
    /// Headers set on or removed from the route's responses: the top-level `[response_headers]` with the
    /// route's own in place of those of the same name, merged once here.
    pub response_headers: Box<[HeaderRule]>,
    /// The route's per-client rate limit.
    pub rate_limit: Option<RateLimiter>,
    /// Which clients the route answers; `None` when it answers all.
    pub clients: Option<ClientFilter>,
    /// The route's own body limit, over `[limits] max_body_bytes`.
    pub max_body_bytes: Option<u64>,
    /// Only connections made with a verified client certificate are answered.
    pub require_client_certificate: bool,
    /// Whether `[compression]` applies to the route's responses.
    pub compress: bool,
    /// `sealgate_route_request_duration_seconds` of the route.
    pub duration: Histogram,
}

/// What a route does.
#[derive(Debug)]
pub enum Action {
    /// Forward to one of these upstreams (boxed: the group, with its pool, is several times a fixed answer's size).
    Upstream(Box<UpstreamGroup>),
    /// Answer directly.
    Respond(FixedResponse),
    /// Answer with a redirect.
    Redirect(RedirectRoute),
}

/// A `respond` route's answer, prepared once so that serving it copies nothing.
#[derive(Debug, Clone)]
pub struct FixedResponse {
    /// Status code.
    pub status: StatusCode,
    /// Body.
    pub body: Bytes,
    /// `Content-Type`.
    pub content_type: HeaderValue,
    /// `Content-Length`, made once here rather than by hyper for every answer; `None` for the statuses that
    /// carry no body (204, 304).
    pub content_length: Option<HeaderValue>,
}

impl Route {
    /// How specifically the route's host matches `host`: 2 exact, 1 wildcard, 0 any host; `None` no match.
    fn host_rank(&self, host: &str) -> Option<u8> {
        match &self.host {
            None => Some(0),
            Some(pattern) if pattern == host => Some(2),
            Some(pattern) if names::is_wildcard(pattern) && names::covers(pattern, host) => Some(1),
            Some(_) => None,
        }
    }
}

/// Every route of the configuration.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// Whether some route sets its own body limit: only then is a request's route looked up before its limits
    /// are checked.
    has_body_limits: bool,
}

impl RouteTable {
    /// Builds the table, with each upstream route's pool, balancer and health checks (started here, stopped
    /// when the table is dropped); `[proxy]` settings apply to routes that set none, and `response_headers` (the
    /// top-level ones) to every route, under the route's own.
    pub fn new(
        routes: &[RouteConfig],
        proxy: &ProxyConfig,
        response_headers: &[HeaderRule],
        metrics: &Metrics,
    ) -> Result<Self, UpstreamError> {
        let routes = routes
            .iter()
            .enumerate()
            .map(|(index, r)| {
                Ok(Route {
                    index,
                    host: r.host.clone(),
                    path: r.path.clone(),
                    action: match &r.action {
                        RouteAction::Upstream(group) => {
                            Action::Upstream(Box::new(UpstreamGroup::new(index, group, proxy, metrics)?))
                        }
                        RouteAction::Respond(response) => Action::Respond(FixedResponse {
                            status: response.status,
                            content_length: (!matches!(
                                response.status,
                                StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
                            ))
                            .then(|| HeaderValue::from(response.body.len())),
                            body: Bytes::from(response.body.clone()),
                            // The configuration checked that the content type is a valid header value.
                            content_type: HeaderValue::from_str(&response.content_type)
                                .unwrap_or(HeaderValue::from_static("text/plain")),
                        }),
                        RouteAction::Redirect(redirect) => Action::Redirect(redirect.clone()),
                    },
                    response_timeout: r.response_timeout.unwrap_or(proxy.response_timeout),
                    response_headers: merge_header_rules(response_headers, &r.response_headers),
                    rate_limit: r.rate_limit.as_ref().map(RateLimiter::new),
                    clients: (!r.clients.is_open()).then(|| r.clients.clone()),
                    max_body_bytes: r.max_body_bytes,
                    require_client_certificate: r.require_client_certificate,
                    compress: r.compress,
                    duration: metrics.route_duration(index, r.host.as_deref(), &r.path),
                })
            })
            .collect::<Result<Vec<Route>, UpstreamError>>()?;
        let has_body_limits = routes.iter().any(|route| route.max_body_bytes.is_some());
        Ok(Self { routes, has_body_limits })
    }

    /// Whether some route sets its own body limit.
    pub fn has_body_limits(&self) -> bool {
        self.has_body_limits
    }

    /// The route for a normalised `host` and a request `path`.
    pub fn find(&self, host: &str, path: &str) -> Option<&Route> {
        let mut best: Option<(&Route, (u8, usize))> = None;
        for route in &self.routes {
            let Some(host_rank) = route.host_rank(host) else { continue };
            if !path.starts_with(&route.path) {
                continue;
            }
            let rank = (host_rank, route.path.len());
            if best.is_none_or(|(_, best_rank)| rank > best_rank) {
                best = Some((route, rank));
            }
        }
        best.map(|(route, _)| route)
    }
}

/// `general` with each of `specific`'s names in place of `general`'s rule for it.
fn merge_header_rules(general: &[HeaderRule], specific: &[HeaderRule]) -> Box<[HeaderRule]> {
    general.iter().filter(|rule| !specific.iter().any(|s| s.name == rule.name)).chain(specific).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn table(routes: &str) -> RouteTable {
        let text =
            format!("[custody]\nexport = \"e\"\ngrantee = \"g\"\n[[listener]]\nbind = \"127.0.0.1:0\"\n{routes}");
        let config = Config::parse(&text, Path::new("proxy.toml")).unwrap();
        RouteTable::new(&config.routes, &config.proxy, &config.response_headers, &Metrics::new()).unwrap()
    }

    fn index(table: &RouteTable, host: &str, path: &str) -> Option<usize> {
        table.find(host, path).map(|r| r.index)
    }

    #[test]
    fn host_specificity_then_longest_prefix_then_file_order() {
        let t = table(
            r#"
[[route]]
respond = { status = 200 }
[[route]]
path = "/api"
respond = { status = 200 }
[[route]]
host = "*.example.com"
respond = { status = 200 }
[[route]]
host = "app.example.com"
respond = { status = 200 }
[[route]]
host = "app.example.com"
path = "/api/v2"
respond = { status = 200 }
[[route]]
path = "/api"
respond = { status = 200 }
"#,
        );
        assert_eq!(index(&t, "other.test", "/"), Some(0));
        assert_eq!(index(&t, "other.test", "/api/x"), Some(1), "longest prefix, first in file on a tie");
        assert_eq!(index(&t, "www.example.com", "/api"), Some(2), "a wildcard host beats any host");
        assert_eq!(index(&t, "app.example.com", "/api"), Some(3), "an exact host beats a wildcard");
        assert_eq!(index(&t, "app.example.com", "/api/v2/users"), Some(4));
        assert_eq!(index(&t, "a.b.example.com", "/"), Some(0), "a wildcard covers one label only");
    }

    #[test]
    fn fixed_answers_carry_their_length_unless_the_status_has_no_body() {
        let t = table(
            "[[route]]\npath = \"/a\"\nrespond = { status = 200, body = \"hello\\n\" }\n\
             [[route]]\npath = \"/b\"\nrespond = { status = 204 }\n\
             [[route]]\npath = \"/c\"\nrespond = { status = 304 }\n",
        );
        let length = |path: &str| match &t.find("h", path).unwrap().action {
            Action::Respond(fixed) => fixed.content_length.clone(),
            Action::Upstream(_) | Action::Redirect(_) => panic!("a respond route"),
        };
        assert_eq!(length("/a"), Some(HeaderValue::from_static("6")));
        assert_eq!(length("/b"), None);
        assert_eq!(length("/c"), None);
    }

    #[test]
    fn no_route_without_a_catch_all() {
        let t = table("[[route]]\nhost = \"a.test\"\npath = \"/x\"\nrespond = { status = 200 }\n");
        assert_eq!(index(&t, "a.test", "/y"), None);
        assert_eq!(index(&t, "b.test", "/x"), None);
        assert_eq!(index(&t, "a.test", "/x"), Some(0));
    }

    #[test]
    fn route_timeouts_default_to_the_proxy_response_timeout() {
        let t = table("[[route]]\nupstream = \"http://127.0.0.1:1\"\n[[route]]\npath = \"/x\"\nupstream = \"http://127.0.0.1:1\"\ntimeout = \"3s\"\n");
        assert_eq!(t.find("h", "/").unwrap().response_timeout, Duration::from_secs(60));
        assert_eq!(t.find("h", "/x").unwrap().response_timeout, Duration::from_secs(3));
        assert!(matches!(t.find("h", "/").unwrap().action, Action::Upstream(_)));
    }
}
