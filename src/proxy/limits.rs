//! Request limits and framing checks, applied to every request before routing.
//!
//! hyper has already refused much by the time a request reaches sealgate (see the README's "Limits and
//! timeouts"): heads over `max_header_bytes` or with too many fields, invalid `Content-Length`s, a
//! `Transfer-Encoding` whose last coding is not `chunked` or that comes with HTTP/1.0, obs-folds, control
//! characters, malformed chunks; h2 refuses connection-specific headers and `content-length`s that disagree
//! with each other or with the DATA received. What is left is done here:
//!
//! - the request target's length (414) and, for HTTP/2, the number of header fields (431);
//! - framing: a `Transfer-Encoding` must be exactly `chunked` (hyper accepts `gzip, chunked`, whose `gzip` would
//!   be lost, as the header is hop-by-hop); every `Content-Length` must be the same plain decimal number and agree
//!   with the length hyper framed the body with; it is forwarded once, in canonical form; header names that CGI,
//!   WSGI and Rack read as a framing or forwarding header (`Content_Length`, `X_Forwarded_For`) are refused;
//! - the body: a declared length over `max_body_bytes` is refused at once (413, before any `100 Continue`);
//!   a streamed body is counted as it is forwarded and cut off at the limit, so the upstream never receives
//!   more than `max_body_bytes`; and it must have ended `timeouts.request` after the head (408).
//!
//! A refused body reaches the upstream as an aborted request (its connection closed mid-body), never as a
//! complete one.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::config::{LimitsConfig, TimeoutsConfig};
use crate::head_lines::HeadLines;
use crate::metrics::RequestRefusal;

/// Why a request is refused.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// The request target is too long.
    #[error("the request target is {len} bytes, over the limit of {max}")]
    UriTooLong {
        /// Its length.
        len: usize,
        /// `limits.max_uri_bytes`.
        max: usize,
    },
    /// Too many header fields.
    #[error("the request has {count} header fields, over the limit of {max}")]
    TooManyHeaders {
        /// How many.
        count: usize,
        /// `limits.max_header_count`.
        max: usize,
    },
    /// The declared body length is over the limit.
    #[error("Content-Length {len} is over the body limit of {max} bytes")]
    DeclaredTooLarge {
        /// The declared length.
        len: u64,
        /// `limits.max_body_bytes`.
        max: u64,
    },
    /// The streamed body went over the limit.
    #[error("the body went over the limit of {max} bytes")]
    BodyTooLarge {
        /// `limits.max_body_bytes`.
        max: u64,
    },
    /// The body was still arriving at the request deadline.
    #[error("the request was not received within {0:?}")]
    Timeout(Duration),
    /// The message framing is ambiguous.
    #[error("ambiguous framing: {0}")]
    Framing(&'static str),
    /// The client's body was malformed or cut short (hyper's error says which).
    #[error("the client's body failed: {0}")]
    Body(#[source] hyper::Error),
}

impl LimitError {
    /// The status to answer with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            Self::TooManyHeaders { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::DeclaredTooLarge { .. } | Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Framing(_) | Self::Body(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// The metric label.
    pub fn reason(&self) -> RequestRefusal {
        match self {
            Self::UriTooLong { .. } => RequestRefusal::UriTooLong,
            Self::TooManyHeaders { .. } => RequestRefusal::TooManyHeaders,
            Self::DeclaredTooLarge { .. } | Self::BodyTooLarge { .. } => RequestRefusal::BodyTooLarge,
            Self::Timeout(_) => RequestRefusal::Timeout,
            Self::Framing(_) => RequestRefusal::Framing,
            Self::Body(_) => RequestRefusal::BadBody,
        }
    }

    /// The `LimitError` that made an upstream exchange fail, if any: a [`RequestBody`] error travels up through
    /// the HTTP client's errors as their source.
    pub fn find_in<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Self> {
        let mut current = Some(error);
        while let Some(e) = current {
            if let Some(limit) = e.downcast_ref::<Self>() {
                return Some(limit);
            }
            current = e.source();
        }
        None
    }
}

/// The request limits of one server.
#[derive(Debug, Clone)]
pub struct Limits {
    max_uri_bytes: usize,
    max_header_count: usize,
    max_body_bytes: u64,
    request_timeout: Duration,
}

impl Limits {
    /// Limits from `[limits]` and `[timeouts]`.
    pub fn new(limits: &LimitsConfig, timeouts: &TimeoutsConfig) -> Self {
        Self {
            max_uri_bytes: limits.max_uri_bytes,
            max_header_count: limits.max_header_count,
            max_body_bytes: limits.max_body_bytes,
            request_timeout: timeouts.request,
        }
    }

    /// Checks `request` and returns it with its body wrapped in a [`RequestBody`] that enforces the body limit
    /// (`max_body_bytes` when its route sets one, else `[limits]`'s) and the request deadline; the deadline
    /// starts now.
    pub fn admit(
        &self,
        request: Request<Incoming>,
        max_body_bytes: Option<u64>,
        head_lines: Option<&Arc<HeadLines>>,
    ) -> Result<Request<RequestBody>, LimitError> {
        let max_body_bytes = max_body_bytes.unwrap_or(self.max_body_bytes);
        let (mut parts, body) = request.into_parts();
        check_uri(&parts.uri, self.max_uri_bytes)?;
        let count = parts.headers.len();
        if count > self.max_header_count {
            return Err(LimitError::TooManyHeaders { count, max: self.max_header_count });
        }
        // One pass over the names; the framing fields are looked up only when there are some (most requests,
        // bodiless, carry neither).
        if check_names(&parts.headers)? {
            check_transfer_encoding(&parts.headers)?;
            if let Some(len) = content_length(&mut parts.headers, body.size_hint().exact())? {
                if len > max_body_bytes {
                    return Err(LimitError::DeclaredTooLarge { len, max: max_body_bytes });
                }
            }
        }
        let mut body = RequestBody::new(body, max_body_bytes, self.request_timeout);
        body.head_lines = head_lines.cloned();
        Ok(Request::from_parts(parts, body))
    }
}

/// The request target's length: scheme, authority, path and query, as received.
fn check_uri(uri: &http::Uri, max: usize) -> Result<(), LimitError> {
    let len = uri.scheme_str().map_or(0, str::len)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    if len > max {
        return Err(LimitError::UriTooLong { len, max });
    }
    Ok(())
}

/// Header names that sealgate treats as unrelated to framing or forwarding, but that CGI-style servers (CGI,
/// WSGI, Rack, PHP) read as exactly that, since they turn `-` and `_` alike into `_`: `X_Forwarded_For` would
/// pass through untouched and be read as the `X-Forwarded-For` sealgate set. nginx drops every name with an
/// underscore by default; sealgate refuses just these.
const LOOK_ALIKES: [&str; 10] = [
    "content-length",
    "transfer-encoding",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "x-real-ip",
    "forwarded-for",
];

/// Refuses a look-alike name (see [`LOOK_ALIKES`]); says whether the request has framing fields
/// (`Content-Length` or `Transfer-Encoding`).
fn check_names(headers: &HeaderMap) -> Result<bool, LimitError> {
    let mut framing = false;
    for name in headers.keys() {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            framing = true;
            continue;
        }
        let name = name.as_str().as_bytes();
        if name.contains(&b'_')
            && LOOK_ALIKES.iter().any(|look_alike| same_but_for_underscores(name, look_alike.as_bytes()))
        {
            return Err(LimitError::Framing(
                "a header name that CGI-style servers read as a framing or forwarding header",
            ));
        }
    }
    Ok(framing)
}

/// Whether `name` is `dashed` with some dashes written as underscores (both are lowercase: header names are).
fn same_but_for_underscores(name: &[u8], dashed: &[u8]) -> bool {
    name.len() == dashed.len() && name.iter().zip(dashed).all(|(&a, &b)| a == b || (a == b'_' && b == b'-'))
}

/// A `Transfer-Encoding` must be a single `chunked` (any case, as codings are case-insensitive): hyper framed the
/// body by its last coding and drops the header (hop-by-hop), so any other coding would silently be lost on the
/// way upstream.
fn check_transfer_encoding(headers: &HeaderMap) -> Result<(), LimitError> {
    let mut values = headers.get_all(header::TRANSFER_ENCODING).iter();
    match (values.next(), values.next()) {
        (None, _) => Ok(()),
        (Some(value), None) if value.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked") => Ok(()),
        _ => Err(LimitError::Framing("Transfer-Encoding other than a single `chunked`")),
    }
}

/// The body length a request declares, after checking that every `Content-Length` field is the same plain
/// decimal number and that it agrees with `framed`, the length hyper framed the body with (when it knows one).
/// Leaves exactly one `Content-Length` in canonical form (no leading zeros), so that what the upstream reads
/// is what sealgate counted.
fn content_length(headers: &mut HeaderMap, framed: Option<u64>) -> Result<Option<u64>, LimitError> {
    let mut declared: Option<u64> = None;
    let mut fields = 0;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        let len = parse_decimal(value.as_bytes()).ok_or(LimitError::Framing("Content-Length is not a number"))?;
        if declared.is_some_and(|first| first != len) {
            return Err(LimitError::Framing("Content-Length fields disagree"));
        }
        declared = Some(len);
        fields += 1;
    }
    let Some(len) = declared else { return Ok(None) };
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return Err(LimitError::Framing("both Content-Length and Transfer-Encoding"));
    }
    if framed.is_some_and(|framed| framed != len) {
        return Err(LimitError::Framing("Content-Length disagrees with the body's framing"));
    }
    let first = headers.get(header::CONTENT_LENGTH).map(HeaderValue::as_bytes).unwrap_or_default();
    let canonical = fields == 1 && (first == b"0" || !first.starts_with(b"0"));
    if !canonical {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    Ok(Some(len))
}

/// A plain decimal number: ASCII digits only (no sign, no spaces, no list), at most 19 of them so that it fits
/// in a u64.
fn parse_decimal(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() || bytes.len() > 19 || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(bytes.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// A client's request body on its way upstream: counted against the body limit and cut off at the request
/// deadline. It fails (and so aborts the upstream request) *before* yielding the chunk that would cross the
/// limit, so the upstream never receives more than the limit.
#[derive(Debug)]
pub struct RequestBody {
    inner: Incoming,
    /// Bytes still allowed.
    remaining: u64,
    max: u64,
    /// The request deadline, armed only while a body is still to come (a boxed timer: the body must be `Unpin`
    /// for the HTTP client, and bodiless requests, most of them, need none).
    deadline: Option<Pin<Box<Sleep>>>,
    timeout: Duration,
    done: bool,
    /// HTTP/1: told when the body has been read to its end (see [`crate::head_lines`]).
    head_lines: Option<Arc<HeadLines>>,
}

impl RequestBody {
    fn new(inner: Incoming, max: u64, timeout: Duration) -> Self {
        let done = inner.is_end_stream();
        let deadline = (!done).then(|| Box::pin(tokio::time::sleep_until(Instant::now() + timeout)));
        Self { inner, remaining: max, max, deadline, timeout, done, head_lines: None }
    }

    /// The body has been read to its end: the client's next bytes are a head.
    fn read_to_end(&mut self) {
        if let Some(lines) = self.head_lines.take() {
            lines.body_read();
        }
    }

    fn fail(&mut self, error: LimitError) -> Poll<Option<Result<Frame<Bytes>, LimitError>>> {
        self.done = true;
        self.deadline = None;
        Poll::Ready(Some(Err(error)))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = LimitError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, LimitError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(deadline) = self.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                let timeout = self.timeout;
                return self.fail(LimitError::Timeout(timeout));
            }
        }
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                self.done = true;
                self.deadline = None;
                self.read_to_end();
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(error))) => return self.fail(LimitError::Body(error)),
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        if let Some(data) = frame.data_ref() {
            let len = data.len() as u64;
            if len > self.remaining {
                let max = self.max;
                return self.fail(LimitError::BodyTooLarge { max });
            }
            self.remaining -= len;
        }
        // Readers stop at `is_end_stream` rather than poll for the `None` after the last frame.
        if self.inner.is_end_stream() {
            self.read_to_end();
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(fields: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in fields {
            map.append(header::HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn decimal_lengths_are_plain_digits() {
        assert_eq!(parse_decimal(b"0"), Some(0));
        assert_eq!(parse_decimal(b"0005"), Some(5));
        assert_eq!(parse_decimal(b"9999999999999999999"), Some(9_999_999_999_999_999_999));
        for bad in [&b""[..], b"+5", b"-1", b"5 ", b" 5", b"5,5", b"0x5", b"1e3", b"99999999999999999999"] {
            assert_eq!(parse_decimal(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn content_length_is_checked_and_made_canonical() {
        let mut map = headers(&[("content-length", "5")]);
        assert_eq!(content_length(&mut map, Some(5)).unwrap(), Some(5));
        assert_eq!(map.get_all(header::CONTENT_LENGTH).iter().collect::<Vec<_>>(), ["5"]);

        let mut map = headers(&[("content-length", "005"), ("content-length", "5")]);
        assert_eq!(content_length(&mut map, None).unwrap(), Some(5));
        assert_eq!(map.get_all(header::CONTENT_LENGTH).iter().collect::<Vec<_>>(), ["5"]);

        let mut map = headers(&[("content-length", "00")]);
        assert_eq!(content_length(&mut map, Some(0)).unwrap(), Some(0));
        assert_eq!(map.get_all(header::CONTENT_LENGTH).iter().collect::<Vec<_>>(), ["0"]);

        assert_eq!(content_length(&mut headers(&[]), None).unwrap(), None);
        for (fields, framed) in [
            (&[("content-length", "5"), ("content-length", "6")][..], None),
            (&[("content-length", "+5")][..], None),
            (&[("content-length", "5, 5")][..], None),
            (&[("content-length", "5")][..], Some(6)),
            (&[("content-length", "5"), ("transfer-encoding", "chunked")][..], None),
        ] {
            let error = content_length(&mut headers(fields), framed).unwrap_err();
            assert!(matches!(error, LimitError::Framing(_)), "{fields:?}: {error}");
        }
    }

    #[test]
    fn transfer_encoding_must_be_a_single_chunked() {
        for ok in [&[][..], &[("transfer-encoding", "chunked")][..], &[("transfer-encoding", "Chunked")][..]] {
            assert!(check_transfer_encoding(&headers(ok)).is_ok(), "{ok:?}");
        }
        for bad in [
            &[("transfer-encoding", "gzip, chunked")][..],
            &[("transfer-encoding", "chunked, chunked")][..],
            &[("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")][..],
            &[("transfer-encoding", "identity")][..],
        ] {
            assert!(check_transfer_encoding(&headers(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn look_alike_names_are_refused_and_others_kept() {
        for bad in ["x_forwarded_for", "content_length", "transfer_encoding", "x-forwarded_host"] {
            assert!(check_names(&headers(&[(bad, "1")])).is_err(), "{bad}");
            // Found wherever it is among the names, framing fields included.
            assert!(check_names(&headers(&[("content-length", "1"), (bad, "1"), ("a", "1")])).is_err(), "{bad}");
        }
        for ok in ["x_request_id", "x-forwarded-for", "my_header"] {
            assert!(!check_names(&headers(&[(ok, "1")])).unwrap(), "{ok}");
        }
    }

    #[test]
    fn framing_fields_are_noticed() {
        assert!(!check_names(&headers(&[("host", "a"), ("accept", "*/*")])).unwrap());
        assert!(check_names(&headers(&[("host", "a"), ("content-length", "1")])).unwrap());
        assert!(check_names(&headers(&[("transfer-encoding", "chunked"), ("host", "a")])).unwrap());
    }

    #[test]
    fn long_targets_are_measured_whole() {
        let uri: http::Uri = "https://a.example/0123456789?q=1".parse().unwrap();
        assert!(check_uri(&uri, 29).is_ok());
        assert!(matches!(check_uri(&uri, 28), Err(LimitError::UriTooLong { len: 29, max: 28 })));
    }
}
