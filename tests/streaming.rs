//! Bodies are streamed through the proxy, never buffered whole: 64 MiB up and 64 MiB down, over HTTP/1.1 and
//! HTTP/2, while the peak resident memory of the whole process (client, proxy and upstream together) grows by
//! far less than one body.
//!
//! One test in its own binary, so that nothing else runs in the process while its memory is measured.

mod common;

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};

const BODY_LEN: u64 = 64 * 1024 * 1024;
const CHUNK: &[u8] = &[b's'; 64 * 1024];
/// Peak RSS growth allowed while one 64 MiB body crosses the proxy.
const MEMORY_BOUND: u64 = 24 * 1024 * 1024;

/// A body of `remaining` bytes generated on the fly.
struct Generated {
    remaining: u64,
}

impl Body for Generated {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(CHUNK.len() as u64);
        self.get_mut().remaining -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&CHUNK[..n as usize])))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Counts a body's bytes without keeping them.
async fn drain(mut body: Incoming) -> u64 {
    let mut total = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            total += data.len() as u64;
        }
    }
    total
}

/// An upstream that counts what is uploaded to it and generates what is downloaded from it.
async fn start_upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                    let body = if request.uri().path() == "/download" {
                        http_body_util::Either::Left(Generated { remaining: BODY_LEN })
                    } else {
                        let received = drain(request.into_body()).await;
                        http_body_util::Either::Right(http_body_util::Full::new(Bytes::from(received.to_string())))
                    };
                    Ok::<_, Infallible>(Response::new(body))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
            });
        }
    });
    addr
}

/// Peak resident set size of this process, in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

fn reset_peak_rss() {
    // Writing 5 to clear_refs resets VmHWM to the current RSS (Linux 4.0+).
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

fn current_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mebibytes_each_way_with_bounded_memory() {
    let f = Fixture::new();
    f.serve("c-bulk", &["bulk.example.test"]);
    let upstream = start_upstream().await;
    let server = f.start(&format!("[[route]]\nupstream = \"http://{upstream}\"\n")).await;
    let addr = server.tls_addrs[0];

    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        let protocol = String::from_utf8_lossy(alpn).into_owned();
        let tls = connect(addr, "bulk.example.test", f.client(&[alpn])).await.unwrap();
        let h2 = alpn == b"h2";
        let mut h1_sender = None;
        let mut h2_sender = None;
        if h2 {
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
            tokio::spawn(conn);
            h2_sender = Some(sender);
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
            tokio::spawn(conn);
            h1_sender = Some(sender);
        }
        let request = |method: &str, path: &str, body: Generated| {
            let builder = Request::builder().method(method);
            let builder = if h2 {
                builder.uri(format!("https://bulk.example.test{path}")).version(http::Version::HTTP_2)
            } else {
                builder.uri(path).header("host", "bulk.example.test")
            };
            builder.body(body).unwrap()
        };

        // Upload.
        reset_peak_rss();
        let baseline = current_rss();
        let upload = request("POST", "/upload", Generated { remaining: BODY_LEN });
        let response = match (&mut h1_sender, &mut h2_sender) {
            (Some(s), _) => s.send_request(upload).await.unwrap(),
            (_, Some(s)) => s.send_request(upload).await.unwrap(),
            _ => unreachable!(),
        };
        assert_eq!(response.status(), StatusCode::OK);
        let received = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(received, BODY_LEN.to_string().as_bytes(), "{protocol}: the upstream got every byte");
        let growth = peak_rss().saturating_sub(baseline);
        assert!(growth < MEMORY_BOUND, "{protocol} upload: peak RSS grew by {} MiB", growth >> 20);

        // Download.
        reset_peak_rss();
        let baseline = current_rss();
        let download = request("GET", "/download", Generated { remaining: 0 });
        let response = match (&mut h1_sender, &mut h2_sender) {
            (Some(s), _) => {
                // The connection may still be finishing the previous exchange.
                s.ready().await.unwrap();
                s.send_request(download).await.unwrap()
            }
            (_, Some(s)) => s.send_request(download).await.unwrap(),
            _ => unreachable!(),
        };
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(drain(response.into_body()).await, BODY_LEN, "{protocol}: the client got every byte");
        let growth = peak_rss().saturating_sub(baseline);
        assert!(growth < MEMORY_BOUND, "{protocol} download: peak RSS grew by {} MiB", growth >> 20);
        eprintln!("{protocol}: streamed 64 MiB each way; last peak growth {} KiB", growth >> 10);
    }
}
