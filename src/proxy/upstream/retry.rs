//! When a failed request may be sent again, and to which upstreams it already went.
//!
//! A request is retried only when sending it again cannot do anything the client did not ask for:
//!
//! - its method is idempotent per RFC 9110 section 9.2.2: `GET`, `HEAD`, `OPTIONS`, `TRACE`, `PUT` and
//!   `DELETE` (RFC 9110 allows a proxy to retry those automatically; `POST`, `PATCH` and the rest are never
//!   retried, not even after a connect failure);
//! - it has no body (the client said so up front: no `Content-Length` or `Content-Length: 0` in HTTP/1.1,
//!   `END_STREAM` on the headers in HTTP/2). Bodies are streamed to the upstream as they arrive and never
//!   buffered, so once a body was handed to an attempt it is gone; a `PUT` or `DELETE` with a body is not
//!   retried. With no body there is nothing that could have been half sent;
//! - the attempt failed in the transport (refused, reset, closed before the response, TLS refused, connect
//!   timeout), or the upstream answered with a status the route lists in `retry_statuses` (nginx's
//!   `proxy_next_upstream http_503`, Envoy's `retry_on: gateway-error`; none by default). Any other response
//!   is passed to the client as is, and so is a listed one when no attempt is left; an attempt that ran into
//!   the route's timeout leaves no time for another;
//! - attempts stay within `1 + retries` and within the route's timeout, which is one deadline for all of them.

use http::Method;

use crate::config::MAX_RETRIES;

/// The most attempts a request can get.
pub const MAX_ATTEMPTS: usize = MAX_RETRIES as usize + 1;

/// Whether `method` is idempotent (RFC 9110 section 9.2.2), and so may be sent twice.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// The upstreams (indices) a request was sent to, in order; on the stack, since attempts are few.
#[derive(Debug, Default)]
pub struct Tried {
    indices: [usize; MAX_ATTEMPTS],
    len: usize,
}

impl Tried {
    /// Records an attempt to upstream `index`; past [`MAX_ATTEMPTS`] (which the caller never reaches) the
    /// attempt is not recorded.
    pub fn push(&mut self, index: usize) {
        if let Some(slot) = self.indices.get_mut(self.len) {
            *slot = index;
            self.len += 1;
        }
    }

    /// Whether upstream `index` was tried.
    pub fn contains(&self, index: usize) -> bool {
        self.indices[..self.len].contains(&index)
    }

    /// Number of attempts made.
    pub fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotent_methods_are_those_of_rfc_9110() {
        for method in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
            assert!(is_idempotent(&method.parse().unwrap()), "{method}");
        }
        for method in ["POST", "PATCH", "CONNECT", "PROPFIND", "get"] {
            assert!(!is_idempotent(&method.parse().unwrap()), "{method}");
        }
    }

    #[test]
    fn tried_remembers_and_never_overflows() {
        let mut tried = Tried::default();
        assert!(tried.len() == 0 && !tried.contains(0));
        for i in 0..MAX_ATTEMPTS + 3 {
            tried.push(i);
        }
        assert_eq!(tried.len(), MAX_ATTEMPTS);
        assert!(tried.contains(0) && tried.contains(MAX_ATTEMPTS - 1) && !tried.contains(MAX_ATTEMPTS));
    }
}
