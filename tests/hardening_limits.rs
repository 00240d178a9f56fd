//! Limits on what clients may ask for: connections, header count and size, URI length, body size, HTTP/2
//! streams and flood protections; and file descriptors: the soft limit raised at start, and exhaustion that
//! neither spins nor drops the connections already open (the `sealgate` binary in a child process).

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::h2raw::{self, Event, H2};
use common::raw::{self, RawUpstream};
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

const HOST: &str = "app.example.test";
const DEADLINE: Duration = Duration::from_secs(5);

async fn server_with(f: &Fixture, routes: &str, extra: &str) -> sealgate::server::RunningServer {
    f.serve("c-app", &[HOST]);
    f.start(&format!("{routes}\n{extra}\n")).await
}

/// Sends a GET over a raw HTTP/1.1 connection and returns the status of the response.
async fn h1_status(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, path: &str, extra: &str) -> Option<u16> {
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n{extra}\r\n").as_bytes()).await.ok()?;
    raw::read_response(tls, DEADLINE).await.status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_are_closed_at_once_and_counted() {
    let f = Fixture::new();
    let server = server_with(&f, HELLO, "[limits]\nmax_connections = 3").await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut tls = tls_to(&f, &server, HOST, b"http/1.1").await;
        assert_eq!(h1_status(&mut tls, "/", "").await, Some(200));
        open.push(tls);
    }
    // The fourth is accepted and closed before its handshake.
    let start = Instant::now();
    let refused = connect(server.tls_addrs[0], HOST, f.client(&[b"http/1.1"])).await;
    assert!(refused.is_err(), "a fourth connection was served");
    assert!(start.elapsed() < Duration::from_secs(2), "refused, but not at once: {:?}", start.elapsed());
    let admin = server.admin_addr.unwrap();
    assert_eq!(raw::metric(admin, "sealgate_connections_refused_total{reason=\"MaxConnections\"}").await, 1.0);
    // The three are unaffected.
    for tls in &mut open {
        assert_eq!(h1_status(tls, "/", "").await, Some(200));
    }
    // A closed connection frees its place.
    drop(open.pop());
    let client = f.client(&[b"http/1.1"]);
    let addr = server.tls_addrs[0];
    assert!(
        eventually(DEADLINE, || {
            let client = client.clone();
            async move { connect(addr, HOST, client).await.is_ok() }
        })
        .await,
        "no place freed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_lowering_max_connections_below_those_open_closes_none_and_admits_no_more_until_they_close() {
    let f = Fixture::new();
    let server = server_with(&f, HELLO, "[limits]\nmax_connections = 3").await;
    let addr = server.tls_addrs[0];
    let admin = server.admin_addr.unwrap();
    let reload_with = |max: usize| {
        let path = f.dir.path().join("proxy.toml");
        std::fs::write(&path, f.config(&format!("{HELLO}\n[limits]\nmax_connections = {max}\n"))).unwrap();
        server.reload(sealgate::config::Config::load(&path).unwrap())
    };
    let open_count = || raw::metric(admin, "sealgate_connections_open");
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut tls = tls_to(&f, &server, HOST, b"http/1.1").await;
        assert_eq!(h1_status(&mut tls, "/", "").await, Some(200));
        open.push(tls);
    }

    reload_with(1).await.unwrap();
    for tls in &mut open {
        assert_eq!(h1_status(tls, "/", "").await, Some(200), "open connections go on above the lowered limit");
    }
    assert!(connect(addr, HOST, f.client(&[b"http/1.1"])).await.is_err(), "three open, limit one");
    // Two of the three close: one is still open, which is the new limit.
    open.truncate(1);
    assert!(eventually(DEADLINE, || async { open_count().await == 1.0 }).await, "the two closes are seen");
    assert!(connect(addr, HOST, f.client(&[b"http/1.1"])).await.is_err(), "one open, limit one");
    open.clear();
    assert!(eventually(DEADLINE, || async { open_count().await == 0.0 }).await);
    let mut one = tls_to(&f, &server, HOST, b"http/1.1").await;
    assert_eq!(h1_status(&mut one, "/", "").await, Some(200), "below the limit again");
    assert!(connect(addr, HOST, f.client(&[b"http/1.1"])).await.is_err(), "and only one place");

    // Raised again: a second place.
    reload_with(2).await.unwrap();
    let mut two = tls_to(&f, &server, HOST, b"http/1.1").await;
    assert_eq!(h1_status(&mut two, "/", "").await, Some(200));
    assert!(connect(addr, HOST, f.client(&[b"http/1.1"])).await.is_err(), "two open, limit two");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_or_too_large_headers_get_431_and_long_uris_414() {
    let f = Fixture::new();
    let server =
        server_with(&f, HELLO, "[limits]\nmax_header_count = 20\nmax_header_bytes = 4096\nmax_uri_bytes = 1024").await;
    let fields = |n: usize| (0..n).map(|i| format!("X-Field-{i}: {i}\r\n")).collect::<String>();

    // HTTP/1.1 (hyper enforces count and size; the URI limit is sealgate's): Host plus 19 fields is 20.
    for (extra, path, expected) in [
        (fields(19), "/".to_owned(), 200),
        (fields(20), "/".to_owned(), 431),
        (format!("X-Big: {}\r\n", "a".repeat(3000)), "/".to_owned(), 200),
        (format!("X-Big: {}\r\n", "a".repeat(5000)), "/".to_owned(), 431),
        (String::new(), format!("/{}", "u".repeat(1000)), 200),
        (String::new(), format!("/{}", "u".repeat(1100)), 414),
    ] {
        let mut tls = tls_to(&f, &server, HOST, b"http/1.1").await;
        let status = h1_status(&mut tls, &path, &extra).await;
        assert_eq!(status, Some(expected), "HTTP/1.1: {} field bytes, path of {}", extra.len(), path.len());
    }

    // HTTP/2 (the count and the URI limit are sealgate's, the header list size h2's).
    for (n, path, expected) in [
        (20, "/".to_owned(), StatusCode::OK),
        (21, "/".to_owned(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        (0, format!("/{}", "u".repeat(1100)), StatusCode::URI_TOO_LONG),
    ] {
        let mut h2 = http2(tls_to(&f, &server, HOST, b"h2").await).await;
        let mut request = get_h2(HOST, &path);
        for i in 0..n {
            request.headers_mut().insert(
                http::HeaderName::from_bytes(format!("x-field-{i}").as_bytes()).unwrap(),
                http::HeaderValue::from(i),
            );
        }
        let (status, _) = text(h2.send_request(request).await.unwrap()).await;
        assert_eq!(status, expected, "HTTP/2: {n} fields, path of {}", path.len());
    }
    let mut h2 = H2::start(tls_to(&f, &server, HOST, b"h2").await).await;
    let settings = h2.settled(DEADLINE).await;
    assert!(settings.contains(&(h2raw::SETTINGS_MAX_HEADER_LIST_SIZE, 4096)), "{settings:?}");
    let big = "a".repeat(5000);
    let block = h2raw::request_block("GET", HOST, "/", &[(b"x-big", big.as_bytes())]);
    // In two frames: HEADERS, then CONTINUATION.
    let (first, rest) = block.split_at(block.len() / 2);
    let mut frames = h2raw::frame(h2raw::HEADERS, h2raw::END_STREAM, 1, first);
    frames.extend(h2raw::frame(h2raw::CONTINUATION, h2raw::END_HEADERS, 1, rest));
    h2.send(&frames).await;
    let outcome = h2.outcome(1, DEADLINE).await;
    assert!(
        matches!(outcome, Some(Event::Headers { status: Some(431), .. }) | Some(Event::Reset { .. })),
        "an HTTP/2 header list over 4096 bytes: {outcome:?}"
    );

    // A head hyper's parser refuses as malformed: 400, counted with the rest.
    let mut tls = tls_to(&f, &server, HOST, b"http/1.1").await;
    assert_eq!(h1_status(&mut tls, "/", "Not a header line\r\n").await, Some(400));

    let admin = server.admin_addr.unwrap();
    assert_eq!(raw::metric(admin, "sealgate_requests_refused_total{reason=\"TooManyHeaders\"}").await, 1.0);
    assert_eq!(raw::metric(admin, "sealgate_requests_refused_total{reason=\"UriTooLong\"}").await, 2.0);
    // hyper's own refusals (the two HTTP/1.1 431s, the 400) are counted as their connections end, which the
    // client may see first.
    for (reason, count) in [("HeadTooLarge", 2.0), ("Malformed", 1.0)] {
        let series = format!("sealgate_requests_refused_total{{reason=\"{reason}\"}}");
        let counted = eventually(DEADLINE, || async { raw::metric(admin, &series).await == count }).await;
        assert!(counted, "{series}: {}", raw::metric(admin, &series).await);
    }
}

/// POSTs `path` over HTTP/2 without a declared length, the body in three DATA frames of `frame` bytes each;
/// returns how stream 1 ended.
async fn post_in_three_data_frames(
    f: &Fixture,
    server: &sealgate::server::RunningServer,
    path: &str,
    frame: usize,
) -> Option<Event> {
    let mut h2 = H2::start(tls_to(f, server, HOST, b"h2").await).await;
    let mut frames =
        h2raw::frame(h2raw::HEADERS, h2raw::END_HEADERS, 1, &h2raw::request_block("POST", HOST, path, &[]));
    for end in [0, 0, h2raw::END_STREAM] {
        frames.extend(h2raw::frame(h2raw::DATA, end, 1, &vec![b'e'; frame]));
    }
    h2.send(&frames).await;
    h2.outcome(1, DEADLINE).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_max_body_bytes_get_413_and_the_upstream_never_receives_more() {
    let f = Fixture::new();
    let names = ["declared", "exact", "chunked", "h2-declared", "h2-streamed"];
    let mut upstreams = Vec::new();
    let mut routes = String::new();
    for name in names {
        let upstream = RawUpstream::start().await;
        routes.push_str(&format!("[[route]]\npath = \"/{name}\"\nupstream = \"{}\"\n", upstream.url()));
        upstreams.push(upstream);
    }
    let server = server_with(&f, &routes, "[limits]\nmax_body_bytes = 1000").await;
    let [declared, exact, chunked, h2_declared, h2_streamed] = &upstreams[..] else { unreachable!() };

    // Declared too large, with `Expect: 100-continue`: 413 at once, no 100, nothing upstream.
    let mut tls = tls_to(&f, &server, HOST, b"http/1.1").await;
    let head =
        format!("POST /declared HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 1001\r\nExpect: 100-continue\r\n\r\n");
    let reply = raw::exchange(&mut tls, head.as_bytes(), DEADLINE).await;
    assert_eq!(reply.statuses(), [413], "{reply:?}");
    assert!(reply.closed);
    assert_eq!(declared.total_bytes(), 0);

    // Exactly the limit passes.
    let mut tls = tls_to(&f, &server, HOST, b"http/1.1").await;
    let request = format!("POST /exact HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 1000\r\n\r\n{}", "b".repeat(1000));
    assert_eq!(raw::exchange(&mut tls, request.as_bytes(), DEADLINE).await.status(), Some(200));
    assert_eq!(exact.requests()[0].body.len(), 1000);

    // Chunked, 3 x 400 bytes: cut off before the chunk that crosses the limit.
    let mut tls = tls_to(&f, &server, HOST, b"http/1.1").await;
    let chunk = format!("190\r\n{}\r\n", "c".repeat(400));
    let request = format!(
        "POST /chunked HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}{chunk}{chunk}0\r\n\r\n"
    );
    let reply = raw::exchange(&mut tls, request.as_bytes(), DEADLINE).await;
    assert_eq!(reply.status(), Some(413), "{reply:?}");

    // HTTP/2, declared too large.
    let mut h2 = http2(tls_to(&f, &server, HOST, b"h2").await).await;
    let request = Request::builder()
        .method("POST")
        .uri(format!("https://{HOST}/h2-declared"))
        .header("content-length", "1001")
        .body(Full::new(Bytes::from(vec![b'd'; 1001])))
        .unwrap();
    assert_eq!(h2.send_request(request).await.unwrap().status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(h2_declared.total_bytes(), 0);

    // HTTP/2 without content-length: three DATA frames of 400 bytes.
    let outcome = post_in_three_data_frames(&f, &server, "/h2-streamed", 400).await;
    assert!(matches!(outcome, Some(Event::Headers { status: Some(413), .. })), "{outcome:?}");

    // The upstream may have received the head and part of the body (or nothing, if the client's body failed
    // before the HTTP client wrote the head), then a close; never a complete request, never over the limit.
    for (upstream, what) in [(chunked, "chunked"), (h2_streamed, "HTTP/2 DATA")] {
        upstream.assert_unambiguous(what);
        let requests = upstream.requests();
        assert!(requests.iter().all(|r| !r.complete && r.body.len() <= 1000), "{what}: {requests:?}");
    }
    let admin = server.admin_addr.unwrap();
    assert_eq!(raw::metric(admin, "sealgate_requests_refused_total{reason=\"BodyTooLarge\"}").await, 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_own_body_limit_replaces_the_global_one_both_ways() {
    let f = Fixture::new();
    let (uploads, small) = (RawUpstream::start().await, RawUpstream::start().await);
    let routes = format!(
        "[[route]]\npath = \"/upload\"\nupstream = \"{}\"\nmax_body_bytes = 5000\n\
         [[route]]\npath = \"/tiny\"\nrespond = {{ status = 200 }}\nmax_body_bytes = 10\n\
         [[route]]\nupstream = \"{}\"\n",
        uploads.url(),
        small.url()
    );
    let server = server_with(&f, &routes, "[limits]\nmax_body_bytes = 1000").await;
    let post = |path: &str, len: usize| {
        format!("POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len}\r\n\r\n{}", "u".repeat(len))
    };
    let status = |request: String| {
        let (f, server) = (&f, &server);
        async move {
            let mut tls = tls_to(f, server, HOST, b"http/1.1").await;
            raw::exchange(&mut tls, request.as_bytes(), DEADLINE).await.status()
        }
    };
    // Above the global limit, within the route's: passes whole.
    assert_eq!(status(post("/upload", 4000)).await, Some(200));
    assert_eq!(uploads.requests()[0].body.len(), 4000);
    assert_eq!(status(post("/upload", 5001)).await, Some(413), "over the route's own limit");
    // Other routes keep the global limit, or their own smaller one.
    assert_eq!(status(post("/other", 4000)).await, Some(413));
    assert_eq!(small.total_bytes(), 0);
    assert_eq!(status(post("/tiny", 11)).await, Some(413));
    assert_eq!(status(post("/tiny", 10)).await, Some(200));

    // Streamed over HTTP/2 without a declared length, the route's limit holds too.
    let outcome = post_in_three_data_frames(&f, &server, "/upload", 1500).await;
    assert!(matches!(outcome, Some(Event::Headers { status: Some(200), .. })), "4500 bytes pass: {outcome:?}");
    assert_eq!(uploads.requests().iter().filter(|r| r.complete && r.body.len() == 4500).count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_are_bounded_and_reset_and_continuation_floods_end_the_connection() {
    let f = Fixture::new();
    // An upstream that holds every request, so that streams stay open.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            held.push(tcp);
        }
    });
    let routes = format!("[[route]]\npath = \"/hold\"\nupstream = \"http://{silent_addr}\"\n{HELLO}");
    let server = server_with(&f, &routes, "[limits]\nh2_max_concurrent_streams = 5").await;

    // Concurrent streams: the sixth open stream is refused.
    let mut h2 = H2::start(tls_to(&f, &server, HOST, b"h2").await).await;
    let settings = h2.settled(DEADLINE).await;
    assert!(settings.contains(&(h2raw::SETTINGS_MAX_CONCURRENT_STREAMS, 5)), "{settings:?}");
    let mut frames = Vec::new();
    for stream in (1..=11).step_by(2) {
        let block = h2raw::request_block("GET", HOST, "/hold", &[]);
        frames.extend(h2raw::frame(h2raw::HEADERS, h2raw::END_HEADERS | h2raw::END_STREAM, stream, &block));
    }
    h2.send(&frames).await;
    let refused = h2.until(DEADLINE, |e| matches!(e, Event::Reset { .. })).await;
    assert_eq!(refused, Some(Event::Reset { stream: 11, code: h2raw::REFUSED_STREAM }));

    // Rapid reset (CVE-2023-44487): streams opened and reset at once.
    let mut h2 = H2::start(tls_to(&f, &server, HOST, b"h2").await).await;
    h2.settled(DEADLINE).await;
    let mut frames = Vec::new();
    for stream in (1..400).step_by(2) {
        let block = h2raw::request_block("GET", HOST, "/", &[]);
        frames.extend(h2raw::frame(h2raw::HEADERS, h2raw::END_HEADERS, stream, &block));
        frames.extend(h2raw::frame(h2raw::RST_STREAM, 0, stream, &h2raw::CANCEL.to_be_bytes()));
    }
    h2.send(&frames).await;
    let end = h2.until(DEADLINE, |e| matches!(e, Event::GoAway { .. })).await;
    assert!(matches!(end, Some(Event::GoAway { code: h2raw::ENHANCE_YOUR_CALM, .. })), "rapid reset: {end:?}");

    // Streams the server must reset for the client's errors ("MadeYouReset"): GOAWAY after
    // H2_MAX_LOCAL_ERROR_RESET_STREAMS, far below hyper's default of 1024.
    let mut h2 = H2::start(tls_to(&f, &server, HOST, b"h2").await).await;
    h2.settled(DEADLINE).await;
    let mut frames = Vec::new();
    for stream in (1..200).step_by(2) {
        let block = h2raw::request_block("GET", HOST, "/", &[(b"content-length", b"+1")]);
        frames.extend(h2raw::frame(h2raw::HEADERS, h2raw::END_HEADERS | h2raw::END_STREAM, stream, &block));
    }
    h2.send(&frames).await;
    let mut resets = 0;
    let end = h2
        .until(DEADLINE, |e| {
            resets += usize::from(matches!(e, Event::Reset { .. }));
            matches!(e, Event::GoAway { .. })
        })
        .await;
    assert!(matches!(end, Some(Event::GoAway { code: h2raw::ENHANCE_YOUR_CALM, .. })), "error resets: {end:?}");
    // (Resets still queued when the GOAWAY is decided are not all sent.)
    assert!(resets <= sealgate::server::H2_MAX_LOCAL_ERROR_RESET_STREAMS, "{resets} streams reset before GOAWAY");

    // CONTINUATION flood (CVE-2024-27316 and kin): a header block that never ends.
    let mut h2 = H2::start(tls_to(&f, &server, HOST, b"h2").await).await;
    h2.settled(DEADLINE).await;
    let mut frames = h2raw::frame(h2raw::HEADERS, 0, 1, &h2raw::request_block("GET", HOST, "/", &[]));
    for i in 0..50 {
        frames.extend(h2raw::frame(h2raw::CONTINUATION, 0, 1, &h2raw::block(&[(b"x-c", format!("{i}").as_bytes())])));
    }
    h2.send(&frames).await;
    let end = h2.until(DEADLINE, |e| matches!(e, Event::GoAway { .. })).await;
    assert!(matches!(end, Some(Event::GoAway { code: h2raw::ENHANCE_YOUR_CALM, .. })), "continuation: {end:?}");
}

/// A `sealgate run` child process under a shell-set open-files limit (`ulimit_args`, e.g. `-n 64`).
struct Sealgate {
    child: KillOnDrop,
    tls: SocketAddr,
    admin: SocketAddr,
}

impl Sealgate {
    fn start(f: &Fixture, ulimit_args: &str) -> Self {
        let config = f.dir.path().join("proxy.toml");
        std::fs::write(&config, f.config(HELLO)).unwrap();
        let mut child = KillOnDrop(
            Command::new("sh")
                .arg("-c")
                .arg(format!("ulimit {ulimit_args} && exec \"$0\" run --config \"$1\""))
                .arg(env!("CARGO_BIN_EXE_sealgate"))
                .arg(&config)
                .env("RUST_LOG", "info")
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let lines_rx = stderr_lines(&mut child);
        let addr_in = |line: &str| line.split("addr=").nth(1).and_then(|a| a.trim().parse::<SocketAddr>().ok());
        let (mut tls, mut admin) = (None, None);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while tls.is_none() || admin.is_none() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = lines_rx.recv_timeout(left).expect("sealgate did not start");
            if line.contains("listening for TLS") {
                tls = addr_in(&line);
            } else if line.contains("admin endpoint listening") {
                admin = addr_in(&line);
            }
        }
        Self { child, tls: tls.unwrap(), admin: admin.unwrap() }
    }

    /// CPU time (user + system) the process has used so far.
    fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        let per_second: u64 = String::from_utf8(Command::new("getconf").arg("CLK_TCK").output().unwrap().stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        Duration::from_millis(ticks * 1000 / per_second)
    }

    /// The soft and hard open-files limits of the process.
    fn open_files_limits(&self) -> (String, String) {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.child.id())).unwrap();
        let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_owned();
        let values: Vec<&str> = line["Max open files".len()..].split_whitespace().collect();
        (values[0].to_owned(), values[1].to_owned())
    }
}

impl Drop for Sealgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_open_files_limit_is_raised_to_the_hard_limit_at_start() {
    let f = Fixture::new();
    f.serve("c-app", &[HOST]);
    let sealgate = Sealgate::start(&f, "-S -n 64");
    let (soft, hard) = sealgate.open_files_limits();
    assert_ne!(hard, "64", "this test needs a hard limit above 64");
    assert_eq!(soft, hard, "the soft limit stayed below the hard limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_neither_spins_nor_drops_open_connections() {
    let f = Fixture::new();
    f.serve("c-app", &[HOST]);
    let sealgate = Sealgate::start(&f, "-n 64");
    let client = f.client(&[b"http/1.1"]);

    // Open connections until the server cannot accept any more (a handshake that does not complete).
    let mut open = Vec::new();
    loop {
        assert!(open.len() < 200, "64 descriptors never ran out");
        match tokio::time::timeout(Duration::from_secs(1), connect(sealgate.tls, HOST, client.clone())).await {
            Ok(Ok(mut tls)) => {
                assert_eq!(h1_status(&mut tls, "/", "").await, Some(200));
                open.push(tls);
            }
            Ok(Err(error)) => panic!("a connection failed instead of waiting: {error}"),
            Err(_) => break,
        }
    }
    // Connections waiting in the backlog keep every accept failing with EMFILE.
    let mut waiting = Vec::new();
    for _ in 0..3 {
        waiting.push(TcpStream::connect(sealgate.tls).await.unwrap());
    }

    // No spin: over 2 s of failing accepts, the process uses a small fraction of a core.
    let before = sealgate.cpu_time();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = sealgate.cpu_time() - before;
    assert!(used < Duration::from_millis(500), "{used:?} of CPU in 2 s while out of descriptors");

    // The connections already open are served as before.
    for tls in &mut open {
        assert_eq!(h1_status(tls, "/", "").await, Some(200), "an open connection was dropped");
    }

    // Descriptors freed: accepting resumes.
    let opened = open.len();
    open.truncate(opened - 8);
    drop(waiting);
    let tls = sealgate.tls;
    assert!(
        eventually(Duration::from_secs(10), || {
            let client = client.clone();
            async move {
                matches!(tokio::time::timeout(Duration::from_secs(2), connect(tls, HOST, client)).await, Ok(Ok(_)))
            }
        })
        .await,
        "accepting did not resume"
    );
    assert!(raw::metric(sealgate.admin, "sealgate_accept_errors_total").await >= 1.0);
    eprintln!("{opened} connections open when descriptors ran out; {used:?} of CPU in 2 s");
}
