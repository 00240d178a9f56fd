//! Request smuggling: messages whose framing two parsers could read differently, written byte by byte over TLS,
//! against an upstream that records the raw bytes it receives and parses them strictly. Whatever sealgate does
//! with such a message (refuse it with 400, close, or forward it re-framed), the upstream must never receive
//! ambiguous framing, nor a request the client hid inside another.
//!
//! Each case names who stops it: `hyper` (httparse and hyper's HTTP/1 parser, h2 for HTTP/2) or `sealgate`
//! (`src/proxy/limits.rs`). The `sealgate` cases fail without the framing checks.

mod common;

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use common::h2raw::{self, Event, H2};
use common::raw::{self, RawRequest, RawUpstream, Reply};
use common::*;
use sealgate::server::RunningServer;

const HOST: &str = "app.example.test";
const WAIT: Duration = Duration::from_secs(5);

/// What must happen to a case.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Nothing reaches the upstream; the client gets 400 (or a bare close) and the connection is closed.
    Refused,
    /// The upstream receives this many complete, well-framed requests, and the client a 200 for each.
    Forwarded(usize),
    /// The body fails mid-stream: the upstream may have received the head and part of the body, then a close,
    /// but never a complete request; the client gets 400 or a close.
    Aborted,
}

struct Case {
    name: &'static str,
    /// Who stops it (documentation, and the failure message).
    by: &'static str,
    /// The bytes, given the case's path prefix.
    bytes: fn(&str) -> Vec<u8>,
    expect: Expect,
    /// More checks on what the upstream received.
    check: fn(&[RawRequest]),
    /// Whether the client closes its side after writing.
    half_close: bool,
}

fn none(_: &[RawRequest]) {}

fn cat(parts: &[&str]) -> Vec<u8> {
    parts.concat().into_bytes()
}

fn http1_cases() -> Vec<Case> {
    vec![
        Case {
            name: "Content-Length then Transfer-Encoding (CL.TE)",
            by: "hyper: framed by Transfer-Encoding alone, Content-Length dropped, connection closed after",
            bytes: |p| {
                cat(&[
                    &format!("POST {p} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 44\r\n"),
                    "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                    &format!("GET {p}smuggled HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
                ])
            },
            expect: Expect::Forwarded(1),
            check: |requests| {
                assert!(requests[0].all("content-length").is_empty(), "{requests:?}");
                assert!(requests[0].body.is_empty());
            },
            half_close: false,
        },
        Case {
            name: "Transfer-Encoding then Content-Length (TE.CL)",
            by: "hyper: framed by Transfer-Encoding alone, Content-Length dropped, connection closed after",
            bytes: |p| {
                let hidden = format!("GET {p}smuggled HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
                cat(&[
                    &format!("POST {p} HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n"),
                    "Content-Length: 3\r\n\r\n",
                    &format!("{:x}\r\n{hidden}\r\n0\r\n\r\n", hidden.len()),
                ])
            },
            expect: Expect::Forwarded(1),
            check: |requests| {
                assert!(requests[0].all("content-length").is_empty(), "{requests:?}");
                // The "smuggled" request is body bytes, forwarded as such, never as a request.
                assert!(String::from_utf8_lossy(&requests[0].body).starts_with("GET "), "{requests:?}");
            },
            half_close: false,
        },
        Case {
            name: "Transfer-Encoding on HTTP/1.0",
            by: "hyper",
            bytes: |p| {
                format!("POST {p} HTTP/1.0\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").into_bytes()
            },
            expect: Expect::Refused,
            check: none,
            half_close: false,
        },
        Case {
            name: "Transfer-Encoding: gzip, chunked",
            by: "sealgate (hyper accepts it; the gzip coding would be lost with the hop-by-hop header)",
            bytes: |p| {
                format!(
                    "POST {p} HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                )
                .into_bytes()
            },
            expect: Expect::Refused,
            check: none,
            half_close: false,
        },
        Case {
            name: "Transfer-Encoding: chunked, chunked",
            by: "sealgate",
            bytes: |p| {
                format!(
                    "POST {p} HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                )
                .into_bytes()
            },
            expect: Expect::Refused,
            check: none,
            half_close: false,
        },
        Case {
            name: "two Transfer-Encoding fields",
            by: "sealgate",
            bytes: |p| {
                format!(
                    "POST {p} HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                )
                .into_bytes()
            },
            expect: Expect::Refused,
            check: none,
            half_close: false,
        },
        Case {
            name: "Transfer-Encoding: identity",
            by: "hyper",
            bytes: |p| {
                format!("POST {p} HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: identity\r\nContent-Length: 3\r\n\r\nabc")
                    .into_bytes()
            },
            expect: Expect::Refused,
            check: none,
            half_close: false,
        },
        Case {
            name: "Transfer-Encoding: xchunked",
            by: "hyper",
            bytes: |p| {
                format!("POST {p} HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n").into_bytes()
            },
            expect: Expect::Refused,
            check: none,
            half_close: false,
        },
        Case {
            name: "Transfer-Encoding: CHUNKED with tabs around it (codings are case-insensitive, OWS is trimmed)",
            by: "accepted: one unambiguous reading",
            bytes: |p| {
                format!(
                    "POST {p} HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding:\tCHUNKED\t\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                )
                .into_bytes()
            },
            expect: Expect::Forwarded(1),
            check: |requests| assert_eq!(requests[0].body, b"abc"),
            half_close: false,
        },
        Case {
            name: "Transfer-Encoding with a vertical tab",
            by: "hyper (httparse)",
            bytes: |p| {
                format!("POST {p} HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n").into_bytes()
            },
            expect: Expect::Refused,
            check: none,
            half_close: false,
        },
        Case {
            name: "space before the colon",
            by: "hyper (httparse)",
            bytes: |p| {
                format!(
                    "POST {p} HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding : chunked\r\nContent-Length: 3\r\n\r\nabc"
                )
                .into_bytes()
            },
            expect: Expect::Refused,
            check: none,
            half_close: false,
        },
        Case {
            name: "Transfer_Encoding look-alike with Content-Length",
            by: "sealgate (CGI-style servers read Transfer_Encoding as Transfer-Encoding)",
            bytes: |p| {
                format!(
                    "POST {p} HTTP/1.1\r\nHost: {HOST}\r\nTransfer_Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"
                )
                .into_bytes()
            },
            expect: Expect::Refused,
            check: none,
            half_close: false,
        },
        Case {
            name: "X_Forwarded_For look-alike",
            by: "sealgate (would reach a WSGI app as the X-Forwarded-For sealgate sets)",
            bytes: |p| format!("GET {p} HTTP/1.1\r\nHost: {HOST}\r\nX_Forwarded_For: 203.0.113.9\r\n\r\n").into_bytes(),
            expect: Expect::Refused,
            check: none,
            half_close: false,
        },
        Case {
            name: "two differing Content-Length fields",
            by: "hyper",
            bytes: |p| {
                format!("POST {p} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde")
                    .into_bytes()
            },
            expect: Expect::Refused,
            check: none,
            half_close: false,
        },
        Case {
            name: "two equal Content-Length fields",
            by: "accepted, forwarded with one",
            bytes: |p| {
                format!("POST {p} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc")
                    .into_bytes()
            },
            expect: Expect::Forwarded(1),
            check: |requests| assert_eq!(requests[0].all("content-length"), ["3"]),
            half_close: false,
        },
        Case {
            name: "Content-Length: 3, 3",
            by: "hyper",
            bytes: |p| format!("POST {p} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 3, 3\r\n\r\nabc").into_bytes(),
            expect: Expect::Refused,
            check: none,
            half_close: false,
        },
        Case {
            name: "Content-Length: +3",
            by: "hyper",
            bytes: |p| format!("POST {p} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: +3\r\n\r\nabc").into_bytes(),
            expect: Expect::Refused,
            check: none,
            half_close: false,
        },
        Case {
            name: "Content-Length: -1",
            by: "hyper",
            bytes: |p| format!("POST {p} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: -1\r\n\r\nabc").into_bytes(),
            expect: Expect::Refused,
            check: none,
            half_close: false,
        },
        Case {
            name: "Content-Length: 0x3",
            by: "hyper",
            bytes: |p| format!("POST {p} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 0x3\r\n\r\nabc").into_bytes(),
            expect: Expect::Refused,
            check: none,
            half_close: false,
        },
        Case {
            name: "Content-Length: 003 (leading zeros)",
            by: "sealgate forwards it as 3 (hyper accepts 003; parsers that read it as octal or refuse it would not agree)",
            bytes: |p| format!("POST {p} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 003\r\n\r\nabc").into_bytes(),
            expect: Expect::Forwarded(1),
            check: |requests| assert_eq!(requests[0].all("content-length"), ["3"]),
            half_close: false,
        },
        Case {
            name: "obs-fold (a field line starting with whitespace)",
            by: "hyper (httparse)",
            bytes: |p| format!("GET {p} HTTP/1.1\r\nHost: {HOST}\r\nX-Folded: a\r\n b\r\n\r\n").into_bytes(),
            expect: Expect::Refused,
            check: none,
            half_close: false,
        },
        Case {
            name: "obs-fold hiding Transfer-Encoding",
            by: "hyper (httparse)",
            bytes: |p| {
                format!(
                    "POST {p} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n"
                )
                .into_bytes()
            },
            expect: Expect::Refused,
            check: none,
            half_close: false,
        },
        Case {
            name: "bare LF line endings in the head",
            by: "sealgate (head_lines: hyper would accept them, as RFC 9112 2.2 allows)",
            bytes: |p| format!("GET {p} HTTP/1.1\nHost: {HOST}\nX-A: 1\n\n").into_bytes(),
            expect: Expect::Refused,
            check: none,
            half_close: false,
        },
        Case {
            name: "one bare LF among CRLF line endings (hiding a Transfer-Encoding)",
            by: "sealgate (head_lines)",
            bytes: |p| {
                format!(
                    "POST {p} HTTP/1.1\r\nHost: {HOST}\r\nX-A: 1\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc"
                )
                .into_bytes()
            },
            expect: Expect::Refused,
            check: none,
            half_close: false,
        },
        Case {
            name: "bare LF in a chunk-size line",
            by: "hyper (strict chunked parser)",
            bytes: |p| {
                format!("POST {p} HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n")
                    .into_bytes()
            },
            expect: Expect::Aborted,
            check: none,
            half_close: false,
        },
        Case {
            name: "chunk-size overflow (ffffffffffffffffff)",
            by: "hyper",
            bytes: |p| {
                format!(
                    "POST {p} HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nabc\r\n0\r\n\r\n"
                )
                .into_bytes()
            },
            expect: Expect::Aborted,
            check: none,
            half_close: false,
        },
        Case {
            name: "negative chunk size",
            by: "hyper",
            bytes: |p| {
                format!("POST {p} HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n")
                    .into_bytes()
            },
            expect: Expect::Aborted,
            check: none,
            half_close: false,
        },
        Case {
            name: "chunk data longer than its size",
            by: "hyper",
            bytes: |p| {
                format!("POST {p} HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n")
                    .into_bytes()
            },
            expect: Expect::Aborted,
            check: none,
            half_close: false,
        },
        Case {
            name: "Content-Length in the chunked trailer section",
            by: "trailers are not forwarded (the Trailer header is hop-by-hop)",
            bytes: |p| {
                format!(
                    "POST {p} HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nContent-Length: 50\r\n\r\n"
                )
                .into_bytes()
            },
            expect: Expect::Forwarded(1),
            check: |requests| {
                assert_eq!(requests[0].body, b"abc");
                assert!(requests[0].all("content-length").is_empty(), "{requests:?}");
            },
            half_close: false,
        },
        Case {
            name: "CR inside a header value",
            by: "hyper (httparse)",
            bytes: |p| format!("GET {p} HTTP/1.1\r\nHost: {HOST}\r\nX-A: a\rContent-Length: 5\r\n\r\n").into_bytes(),
            expect: Expect::Refused,
            check: none,
            half_close: false,
        },
        Case {
            name: "NUL inside a header value",
            by: "hyper (httparse)",
            bytes: |p| format!("GET {p} HTTP/1.1\r\nHost: {HOST}\r\nX-A: a\0b\r\n\r\n").into_bytes(),
            expect: Expect::Refused,
            check: none,
            half_close: false,
        },
        Case {
            name: "NUL in the request target",
            by: "hyper (httparse)",
            bytes: |p| format!("GET {p}\0x HTTP/1.1\r\nHost: {HOST}\r\n\r\n").into_bytes(),
            expect: Expect::Refused,
            check: none,
            half_close: false,
        },
        Case {
            name: "a field line without a colon",
            by: "hyper (httparse)",
            bytes: |p| format!("GET {p} HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding chunked\r\n\r\n").into_bytes(),
            expect: Expect::Refused,
            check: none,
            half_close: false,
        },
        Case {
            name: "two spaces in the request line",
            by: "hyper (httparse)",
            bytes: |p| format!("GET  {p} HTTP/1.1\r\nHost: {HOST}\r\n\r\n").into_bytes(),
            expect: Expect::Refused,
            check: none,
            half_close: false,
        },
        Case {
            name: "HTTP/1.2",
            by: "hyper (httparse)",
            bytes: |p| format!("GET {p} HTTP/1.2\r\nHost: {HOST}\r\n\r\n").into_bytes(),
            expect: Expect::Refused,
            check: none,
            half_close: false,
        },
        Case {
            name: "two Host fields",
            by: "routed by the first, forwarded with exactly one Host",
            bytes: |p| format!("GET {p} HTTP/1.1\r\nHost: {HOST}\r\nHost: evil.test\r\n\r\n").into_bytes(),
            expect: Expect::Forwarded(1),
            check: |requests| assert_eq!(requests[0].all("host"), [HOST]),
            half_close: false,
        },
        Case {
            name: "pipelined requests stay separate requests",
            by: "sanity",
            bytes: |p| {
                format!(
                    "POST {p} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 3\r\n\r\nabcGET {p}second HTTP/1.1\r\nHost: {HOST}\r\n\r\n"
                )
                .into_bytes()
            },
            expect: Expect::Forwarded(2),
            check: |requests| {
                assert_eq!(requests[0].body, b"abc");
                assert!(requests[1].line.contains("second"), "{requests:?}");
            },
            half_close: false,
        },
        Case {
            name: "Content-Length longer than the body, then the client closes",
            by: "hyper (incomplete body)",
            bytes: |p| format!("POST {p} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 10\r\n\r\nabc").into_bytes(),
            expect: Expect::Aborted,
            check: |requests| assert!(requests.iter().all(|r| r.body.len() <= 3), "{requests:?}"),
            half_close: true,
        },
    ]
}

/// A server for [`HOST`] with one recording upstream per case: case `i` is routed to `upstreams[i]` by `/c{i}/`.
async fn serve_with_raw_upstreams(cases: usize) -> (Fixture, RunningServer, Vec<RawUpstream>) {
    let f = Fixture::new();
    f.serve("c-app", &[HOST]);
    let mut upstreams = Vec::new();
    let mut routes = String::new();
    for i in 0..cases {
        let upstream = RawUpstream::start().await;
        routes.push_str(&format!("[[route]]\npath = \"/c{i}/\"\nupstream = \"{}\"\n", upstream.url()));
        upstreams.push(upstream);
    }
    let server = f.start(&routes).await;
    (f, server, upstreams)
}

fn judge(case: &Case, reply: &Reply, upstream: &RawUpstream) {
    let name = format!("{} (stopped by {})", case.name, case.by);
    upstream.assert_unambiguous(&name);
    let requests = upstream.requests();
    for request in &requests {
        assert!(!request.line.contains("smuggled"), "{name}: a hidden request reached the upstream: {requests:?}");
    }
    match case.expect {
        Expect::Refused => {
            assert!(matches!(reply.status(), Some(400) | None), "{name}: {reply:?}");
            assert!(reply.closed, "{name}: the connection must be closed: {reply:?}");
            assert_eq!(upstream.total_bytes(), 0, "{name}: {requests:?}");
        }
        Expect::Forwarded(n) => {
            let complete: Vec<RawRequest> = requests.iter().filter(|r| r.complete).cloned().collect();
            assert_eq!(complete.len(), n, "{name}: {requests:?} {reply:?}");
            assert_eq!(reply.statuses(), vec![200; n], "{name}: {reply:?}");
            (case.check)(&complete);
        }
        Expect::Aborted => {
            assert!(matches!(reply.status(), Some(400) | None), "{name}: {reply:?}");
            assert!(reply.closed, "{name}: the connection must be closed: {reply:?}");
            assert!(requests.iter().all(|r| !r.complete), "{name}: {requests:?}");
            (case.check)(&requests);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_ambiguous_framing_never_reaches_the_upstream() {
    let cases = http1_cases();
    let (f, server, upstreams) = serve_with_raw_upstreams(cases.len()).await;
    for (i, (case, upstream)) in cases.iter().zip(&upstreams).enumerate() {
        let mut tls = tls_to(&f, &server, HOST, b"http/1.1").await;
        // The upstream records a request before it answers, and the client's answer comes after the upstream's
        // (or after sealgate gave up on it): by the time the reply is here, what reached the upstream is recorded.
        let reply = if case.half_close {
            tls.write_all(&(case.bytes)(&format!("/c{i}/"))).await.unwrap();
            tls.shutdown().await.unwrap();
            raw::read_reply(&mut tls, WAIT).await
        } else {
            raw::exchange(&mut tls, &(case.bytes)(&format!("/c{i}/")), WAIT).await
        };
        judge(case, &reply, upstream);
    }
}

/// Bare LF line endings are refused on the heads after the first on a kept-alive connection too (after a request
/// without a body, and after one whose body was read to its end), and the bodies in between, LFs and all, are
/// left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_heads_are_refused_on_kept_alive_connections_and_bodies_are_left_alone() {
    let (f, server, upstreams) = serve_with_raw_upstreams(1).await;
    let post = format!("POST /c0/post HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 7\r\n\r\na\nb\nc\n\n");
    let get = |path: &str, eol: &str| format!("GET /c0/{path} HTTP/1.1{eol}Host: {HOST}{eol}{eol}");
    let refused = |reply: &Reply| reply.status() == Some(400) && reply.closed;

    // A body full of bare LFs, a head after it, then a head with bare LFs after a bodiless request.
    let mut tls = tls_to(&f, &server, HOST, b"http/1.1").await;
    for request in [post.clone(), get("one", "\r\n")] {
        let reply = raw::exchange(&mut tls, request.as_bytes(), WAIT).await;
        assert_eq!((reply.status(), reply.closed), (Some(200), false), "{request:?}: {reply:?}");
    }
    let reply = raw::exchange(&mut tls, get("bare", "\n").as_bytes(), WAIT).await;
    assert!(refused(&reply), "{reply:?}");

    // A head with bare LFs right after a request whose body the upstream read.
    let mut tls = tls_to(&f, &server, HOST, b"http/1.1").await;
    let reply = raw::exchange(&mut tls, post.as_bytes(), WAIT).await;
    assert_eq!((reply.status(), reply.closed), (Some(200), false), "{reply:?}");
    let reply = raw::exchange(&mut tls, get("bare", "\n").as_bytes(), WAIT).await;
    assert!(refused(&reply), "{reply:?}");

    let received = upstreams[0].requests();
    assert_eq!(received.len(), 3, "the three CRLF requests, never a bare-LF one: {received:?}");
    assert!(received.iter().all(|r| !r.line.contains("bare")), "{received:?}");
}

/// A header field as raw bytes.
type Field<'a> = (&'a [u8], &'a [u8]);

/// An HTTP/2 case: header fields after the pseudo-headers, and DATA frames (the last ends the stream; none: the
/// HEADERS frame does).
struct H2Case {
    name: &'static str,
    by: &'static str,
    fields: &'static [Field<'static>],
    data: &'static [&'static [u8]],
    expect: Expect,
    check: fn(&[RawRequest]),
}

fn http2_cases() -> Vec<H2Case> {
    vec![
        H2Case {
            name: "content-length: +3",
            by: "h2",
            fields: &[(b"content-length", b"+3")],
            data: &[b"abc"],
            expect: Expect::Refused,
            check: none,
        },
        H2Case {
            name: "two differing content-length fields",
            by: "h2",
            fields: &[(b"content-length", b"3"), (b"content-length", b"5")],
            data: &[b"abc"],
            expect: Expect::Refused,
            check: none,
        },
        H2Case {
            name: "transfer-encoding: chunked",
            by: "h2 (connection-specific header)",
            fields: &[(b"transfer-encoding", b"chunked")],
            data: &[b"3\r\nabc\r\n0\r\n\r\n"],
            expect: Expect::Refused,
            check: none,
        },
        H2Case {
            name: "connection: keep-alive",
            by: "h2 (connection-specific header)",
            fields: &[(b"connection", b"keep-alive")],
            data: &[],
            expect: Expect::Refused,
            check: none,
        },
        H2Case {
            name: "CRLF in a value, injecting Transfer-Encoding into the HTTP/1.1 request upstream",
            by: "h2 (field values are checked as HTTP header values)",
            fields: &[(b"x-a", b"a\r\nTransfer-Encoding: chunked")],
            data: &[],
            expect: Expect::Refused,
            check: none,
        },
        H2Case {
            name: "NUL in a value",
            by: "h2",
            fields: &[(b"x-a", b"a\0b")],
            data: &[],
            expect: Expect::Refused,
            check: none,
        },
        H2Case {
            name: "an uppercase field name",
            by: "h2",
            fields: &[(b"Content-Length", b"3")],
            data: &[b"abc"],
            expect: Expect::Refused,
            check: none,
        },
        H2Case {
            name: "a space in :path",
            by: "h2 (http's URI parser)",
            fields: &[(b":path", b"/x HTTP/1.1\r\nHost: evil")],
            data: &[],
            expect: Expect::Refused,
            check: none,
        },
        H2Case {
            name: "transfer_encoding look-alike",
            by: "sealgate",
            fields: &[(b"transfer_encoding", b"chunked")],
            data: &[b"abc"],
            expect: Expect::Refused,
            check: none,
        },
        H2Case {
            name: "content-length: 003",
            by: "sealgate forwards it as 3",
            fields: &[(b"content-length", b"003")],
            data: &[b"abc"],
            expect: Expect::Forwarded(1),
            check: |requests| {
                assert_eq!(requests[0].all("content-length"), ["3"]);
                assert_eq!(requests[0].body, b"abc");
            },
        },
        H2Case {
            name: "no content-length: forwarded chunked",
            by: "sanity",
            fields: &[],
            data: &[b"ab", b"c"],
            expect: Expect::Forwarded(1),
            check: |requests| {
                assert_eq!(requests[0].all("transfer-encoding"), ["chunked"]);
                assert_eq!(requests[0].body, b"abc");
            },
        },
        H2Case {
            name: "more DATA than content-length",
            by: "h2 (the excess is never delivered)",
            fields: &[(b"content-length", b"3")],
            data: &[b"abcdef"],
            expect: Expect::Aborted,
            check: |requests| assert!(requests.iter().all(|r| r.body.len() <= 3), "{requests:?}"),
        },
        H2Case {
            name: "less DATA than content-length",
            by: "h2",
            fields: &[(b"content-length", b"6")],
            data: &[b"abc"],
            expect: Expect::Aborted,
            check: none,
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_malformed_requests_never_reach_the_upstream_ambiguously() {
    let cases = http2_cases();
    let (f, server, upstreams) = serve_with_raw_upstreams(cases.len()).await;
    for (i, (case, upstream)) in cases.iter().zip(&upstreams).enumerate() {
        let name = format!("{} (stopped by {})", case.name, case.by);
        let path = format!("/c{i}/");
        let (path_field, extra): (&[u8], Vec<Field>) = match case.fields.first() {
            Some((b":path", value)) => (value, case.fields[1..].to_vec()),
            _ => (path.as_bytes(), case.fields.to_vec()),
        };
        let mut fields: Vec<Field> = vec![
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":authority", HOST.as_bytes()),
            (b":path", path_field),
        ];
        fields.extend(extra);
        let mut bytes = h2raw::frame(
            h2raw::HEADERS,
            h2raw::END_HEADERS | if case.data.is_empty() { h2raw::END_STREAM } else { 0 },
            1,
            &h2raw::block(&fields),
        );
        for (n, data) in case.data.iter().enumerate() {
            let end = if n + 1 == case.data.len() { h2raw::END_STREAM } else { 0 };
            bytes.extend(h2raw::frame(h2raw::DATA, end, 1, data));
        }
        let mut h2 = H2::start(tls_to(&f, &server, HOST, b"h2").await).await;
        h2.send(&bytes).await;
        let outcome = h2.outcome(1, WAIT).await;
        upstream.assert_unambiguous(&name);
        let requests = upstream.requests();
        match case.expect {
            Expect::Refused | Expect::Aborted => {
                assert!(
                    matches!(
                        outcome,
                        Some(Event::Reset { .. } | Event::GoAway { .. } | Event::Headers { status: Some(400), .. })
                    ),
                    "{name}: {outcome:?}"
                );
                if matches!(case.expect, Expect::Refused) {
                    assert_eq!(upstream.total_bytes(), 0, "{name}: {requests:?}");
                }
                assert!(requests.iter().all(|r| !r.complete), "{name}: {requests:?}");
            }
            Expect::Forwarded(n) => {
                assert!(matches!(outcome, Some(Event::Headers { status: Some(200), .. })), "{name}: {outcome:?}");
                assert_eq!(requests.iter().filter(|r| r.complete).count(), n, "{name}: {requests:?}");
            }
        }
        (case.check)(&requests);
    }
}
