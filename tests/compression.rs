//! `[compression]`: responses compressed (gzip, Brotli) for clients that accept it, through a real proxy to a
//! real upstream, over HTTP/1.1 and HTTP/2, and read back by curl; what must not be compressed is not.

mod common;

use std::io::Read as _;
use std::process::{Command, Stdio};

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};

/// A page worth compressing: 8 KiB of repetitive HTML.
fn page() -> String {
    let mut page = String::from("<!doctype html><html><body>");
    while page.len() < 8 * 1024 {
        page.push_str("<p>sealgate keeps the keys and compresses the pages.</p>\n");
    }
    page.push_str("</body></html>");
    page
}

async fn upstream() -> Upstream {
    Upstream::start_with(|request| {
        let builder = Response::builder().header("etag", "\"page-1\"");
        match request.uri.path() {
            "/logo.png" => builder.header("content-type", "image/png").body(Full::new(Bytes::from(vec![7u8; 4096]))),
            "/pre-gzipped" => builder
                .header("content-type", "text/html")
                .header("content-encoding", "gzip")
                .body(Full::new(Bytes::from_static(b"not really gzip, but the upstream says so"))),
            _ => builder.header("content-type", "text/html; charset=utf-8").body(Full::new(Bytes::from(page()))),
        }
        .unwrap()
    })
    .await
}

fn decode(encoding: Option<&str>, body: &[u8]) -> String {
    let mut text = String::new();
    match encoding {
        Some("gzip") => flate2::read::GzDecoder::new(body).read_to_string(&mut text).unwrap(),
        Some("br") => brotli::Decompressor::new(body, 4096).read_to_string(&mut text).unwrap(),
        None => return String::from_utf8(body.to_vec()).unwrap(),
        Some(other) => panic!("unexpected coding {other}"),
    };
    text
}

/// Status, headers and raw body bytes of `request`.
async fn fetch(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> (StatusCode, HeaderMap, Bytes) {
    sender.ready().await.unwrap();
    let response = sender.send_request(request).await.unwrap();
    let (head, body) = response.into_parts();
    (head.status, head.headers, body.collect().await.unwrap().to_bytes())
}

fn with_encoding(method: &str, path: &str, accept: Option<&str>) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(path).header("host", "app.example.test");
    if let Some(accept) = accept {
        builder = builder.header("accept-encoding", accept);
    }
    builder.body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_are_compressed_for_clients_that_accept_it_and_nothing_else_is() {
    let f = Fixture::new();
    f.serve("c-app", &["app.example.test"]);
    let upstream = upstream().await;
    let routes = format!(
        "[compression]\n\n[[route]]\npath = \"/raw/\"\nupstream = \"{url}\"\ncompress = false\n\n\
         [[route]]\nupstream = \"{url}\"\n",
        url = upstream.url()
    );
    let server = f.start(&routes).await;
    let tls = connect(server.tls_addrs[0], "app.example.test", f.client(&[])).await.unwrap();
    let mut client = http1(tls).await;

    // Brotli preferred when both are accepted; gzip when only it is.
    for (accept, expected) in [("gzip, deflate, br", "br"), ("gzip", "gzip"), ("br;q=0.5, gzip", "gzip")] {
        let (status, headers, body) = fetch(&mut client, with_encoding("GET", "/index.html", Some(accept))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["content-encoding"], expected, "{accept}");
        assert_eq!(headers["vary"], "Accept-Encoding");
        assert_eq!(headers["etag"], "W/\"page-1\"");
        assert!(!headers.contains_key("content-length"));
        assert!(body.len() < page().len() / 4, "{accept}: {} bytes", body.len());
        assert_eq!(decode(Some(expected), &body), page());
    }
    let metrics = server.metrics.encode();
    assert!(metrics.contains("sealgate_responses_compressed_total{coding=\"br\"} 1"), "{metrics}");
    assert!(metrics.contains("sealgate_responses_compressed_total{coding=\"gzip\"} 2"), "{metrics}");
    // The upstream is asked with the client's Accept-Encoding (it may compress itself).
    assert_eq!(upstream.last().headers["accept-encoding"], "br;q=0.5, gzip");

    // Not compressed: a client that accepts nothing (but `Vary` tells caches it could be), an image, what the
    // upstream encoded itself, a HEAD, a route that turns compression off.
    let (_, headers, body) = fetch(&mut client, with_encoding("GET", "/index.html", None)).await;
    assert!(!headers.contains_key("content-encoding") && headers["vary"] == "Accept-Encoding");
    assert_eq!(headers["content-length"], page().len().to_string().as_str());
    assert_eq!(decode(None, &body), page());
    let (_, headers, body) = fetch(&mut client, with_encoding("GET", "/logo.png", Some("gzip"))).await;
    assert!(!headers.contains_key("content-encoding") && !headers.contains_key("vary"));
    assert_eq!(body.len(), 4096);
    let (_, headers, body) = fetch(&mut client, with_encoding("GET", "/pre-gzipped", Some("gzip"))).await;
    assert_eq!(headers["content-encoding"], "gzip");
    assert_eq!(&body[..], b"not really gzip, but the upstream says so");
    let (_, headers, _) = fetch(&mut client, with_encoding("HEAD", "/index.html", Some("gzip"))).await;
    assert!(!headers.contains_key("content-encoding"));
    let (_, headers, body) = fetch(&mut client, with_encoding("GET", "/raw/index.html", Some("gzip"))).await;
    assert!(!headers.contains_key("content-encoding") && !headers.contains_key("vary"));
    assert_eq!(body.len(), page().len());

    // HTTP/2 too.
    let tls = connect(server.tls_addrs[0], "app.example.test", f.client(&[b"h2"])).await.unwrap();
    let mut h2 = http2(tls).await;
    let mut request = get_h2("app.example.test", "/index.html");
    request.headers_mut().insert("accept-encoding", http::HeaderValue::from_static("gzip"));
    let response = h2.send_request(request).await.unwrap();
    assert_eq!(response.headers()["content-encoding"], "gzip");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(decode(Some("gzip"), &body), page());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reads_the_compressed_pages() {
    let f = Fixture::new();
    f.serve("c-app", &["app.example.test"]);
    let upstream = upstream().await;
    let server = f
        .start(&format!("[compression]\ncodings = [\"gzip\"]\n\n[[route]]\nupstream = \"{}\"\n", upstream.url()))
        .await;
    let ca = f.dir.path().join("ca.pem");
    std::fs::write(&ca, &f.ca_pem).unwrap();
    let port = server.tls_addrs[0].port();
    for version in ["--http1.1", "--http2"] {
        let mut curl = Command::new("curl");
        curl.args(["--silent", "--show-error", "--max-time", "10", "--compressed", "--dump-header", "-", version])
            .arg("--cacert")
            .arg(&ca)
            .args(["--resolve", &format!("app.example.test:{port}:127.0.0.1")])
            .arg(format!("https://app.example.test:{port}/index.html"))
            .stdin(Stdio::null());
        let out = tokio::task::spawn_blocking(move || curl.output().expect("curl must be installed")).await.unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.to_ascii_lowercase().contains("content-encoding: gzip"), "{version}: {head}");
        assert_eq!(body, page(), "{version}: curl decodes it to the page");
    }
}
