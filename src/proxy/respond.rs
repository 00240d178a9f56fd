//! Responses sealgate writes itself: `respond` routes and errors. Error bodies are short, fixed texts: they
//! never echo request data or internal details (those go to the log).

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

use super::routes::FixedResponse;
use super::ReplyBody as ProxyBody;

/// The answer of a `respond` route.
pub fn fixed(response: &FixedResponse) -> Response<ProxyBody> {
    let mut r = Response::new(Either::Right(Full::new(response.body.clone())));
    *r.status_mut() = response.status;
    let headers = r.headers_mut();
    headers.insert(header::CONTENT_TYPE, response.content_type.clone());
    if let Some(length) = &response.content_length {
        headers.insert(header::CONTENT_LENGTH, length.clone());
    }
    r
}

/// A `redirect` route's answer: `status` with `Location` and an empty body.
pub fn redirect(status: StatusCode, location: HeaderValue) -> Response<ProxyBody> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::new())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::LOCATION, location);
    r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    r
}

/// `429 Too Many Requests`, with `Retry-After` in whole seconds (at least 1).
pub fn too_many_requests(retry_after: std::time::Duration) -> Response<ProxyBody> {
    let mut r = error(StatusCode::TOO_MANY_REQUESTS);
    let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    r
}

/// An error answer with a one-line plain-text body.
pub fn error(status: StatusCode) -> Response<ProxyBody> {
    let text: &'static str = match status {
        StatusCode::BAD_REQUEST => "bad request\n",
        StatusCode::NOT_FOUND => "no route for this host and path\n",
        StatusCode::FORBIDDEN => "forbidden\n",
        StatusCode::MISDIRECTED_REQUEST => {
            "misdirected request: this connection's certificate does not serve this host\n"
        }
        StatusCode::REQUEST_TIMEOUT => "request timeout: the request was not received in time\n",
        StatusCode::PAYLOAD_TOO_LARGE => "payload too large\n",
        StatusCode::URI_TOO_LONG => "uri too long\n",
        StatusCode::TOO_MANY_REQUESTS => "too many requests: slow down\n",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "request header fields too large\n",
        StatusCode::BAD_GATEWAY => "bad gateway: the upstream is unreachable\n",
        StatusCode::GATEWAY_TIMEOUT => "gateway timeout: the upstream did not answer in time\n",
        _ => status.canonical_reason().unwrap_or("error"),
    };
    let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(text.as_bytes()))));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}
