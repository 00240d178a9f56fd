//! Response compression (`[compression]`): gzip and Brotli for clients that accept them, as nginx's `gzip`,
//! Envoy's compressor filter and HAProxy's `compression` do.
//!
//! **Which responses.** A response is *compressible* when its route allows it, the request is not `HEAD` or
//! `CONNECT`, its status carries content that may be transformed (not 1xx, 204, 206 or 304), it has no
//! `Content-Encoding` already, no `Cache-Control: no-transform`, a `Content-Type` among the configured types
//! (never gRPC's, which compresses its messages itself),
//! and a declared length, if any, of at least `min_bytes`. A compressible response always gets `Vary:
//! Accept-Encoding` (a cache must not hand the compressed one to a client that cannot read it, nor the plain one
//! to every client); it is compressed when the client's `Accept-Encoding` accepts one of the configured codings
//! (the highest `q` wins, ties in the configuration's order; no `Accept-Encoding` at all means no compression,
//! as every server does despite RFC 9110's letter). A compressed response loses `Content-Length` (its body is
//! streamed) and `Accept-Ranges`, and a strong `ETag` becomes weak, as nginx does: the bytes are no longer the
//! upstream's.
//!
//! **Streaming.** The body is compressed as it arrives, never buffered whole: compressed bytes go out whenever
//! [`COMPRESSED_CHUNK`] of them are ready, and whenever the upstream pauses (its body is pending) everything
//! compressed so far is flushed, so server-sent events and long polls arrive as they are sent. Trailers pass.
//!
//! **Cost.** gzip level 5 (zlib-rs) and Brotli quality 4 with a 256 KiB window: the usual choices for content
//! compressed on the fly, each encoder a few hundred KiB while its response streams.

use std::io::Write as _;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};

use crate::config::{Coding, CompressionConfig};

/// Compressed bytes sent in one data frame at most, and the point at which they are sent without waiting for
/// more input.
pub const COMPRESSED_CHUNK: usize = 16 * 1024;

/// gzip's compression level.
const GZIP_LEVEL: u32 = 5;
/// Brotli's quality.
const BROTLI_QUALITY: u32 = 4;
/// Brotli's window, as a power of two: 256 KiB (the format's default, 4 MiB, is for content compressed once).
const BROTLI_WINDOW_BITS: u32 = 18;

/// The compression settings in force, made from `[compression]`.
#[derive(Debug)]
pub struct Compression {
    config: CompressionConfig,
}

/// What a request's `Accept-Encoding` chose, read before the request moves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// The request may not have its response compressed (`HEAD`, `CONNECT`).
    Never,
    /// The client accepts none of the configured codings.
    Plain,
    /// The coding to use.
    Use(Coding),
}

impl Compression {
    /// Compression as `config` says.
    pub fn new(config: &CompressionConfig) -> Self {
        Self { config: config.clone() }
    }

    /// The coding a request's response may use, by its method and `Accept-Encoding`.
    pub fn choose(&self, method: &Method, headers: &HeaderMap) -> Choice {
        if *method == Method::HEAD || *method == Method::CONNECT {
            return Choice::Never;
        }
        let mut best: Option<(u16, usize)> = None;
        let mut wildcard: Option<u16> = None;
        let mut listed = [false; Coding::ALL.len()];
        for (name, q) in codings(headers) {
            if name == "*" {
                wildcard = Some(q);
                continue;
            }
            let Some(coding) = Coding::ALL.iter().find(|c| name.eq_ignore_ascii_case(c.token())) else { continue };
            listed[*coding as usize] = true;
            self.consider(*coding, q, &mut best);
        }
        // `*` stands for every coding the header does not name.
        if let Some(q) = wildcard {
            for coding in Coding::ALL.iter().filter(|c| !listed[**c as usize]) {
                self.consider(*coding, q, &mut best);
            }
        }
        match best {
            Some((_, rank)) => Choice::Use(self.config.codings[rank]),
            None => Choice::Plain,
        }
    }

    /// Keeps `coding` at `q` as the best so far if it is configured and beats it (ties: the earlier configured).
    fn consider(&self, coding: Coding, q: u16, best: &mut Option<(u16, usize)>) {
        let Some(rank) = self.config.codings.iter().position(|c| *c == coding) else { return };
        if q == 0 {
            return;
        }
        let better = match *best {
            None => true,
            Some((best_q, best_rank)) => q > best_q || (q == best_q && rank < best_rank),
        };
        if better {
            *best = Some((q, rank));
        }
    }

    /// Compresses `response` as `choice` allows, when it is compressible (see the module documentation).
    pub fn apply<B>(&self, choice: Choice, response: Response<B>) -> Response<Compressible<B>>
    where
        B: Body,
    {
        let (mut head, body) = response.into_parts();
        let coding = match choice {
            Choice::Never => None,
            Choice::Plain | Choice::Use(_) if !self.compressible(head.status, &head.headers, &body) => None,
            Choice::Plain => {
                add_vary(&mut head.headers);
                None
            }
            Choice::Use(coding) => {
                add_vary(&mut head.headers);
                head.headers.remove(header::CONTENT_LENGTH);
                head.headers.remove(header::ACCEPT_RANGES);
                head.headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(coding.token()));
                weaken_etag(&mut head.headers);
                Some(coding)
            }
        };
        Response::from_parts(head, Compressible::new(body, coding))
    }

    fn compressible<B: Body>(&self, status: StatusCode, headers: &HeaderMap, body: &B) -> bool {
        if status.is_informational()
            || matches!(status, StatusCode::NO_CONTENT | StatusCode::PARTIAL_CONTENT | StatusCode::NOT_MODIFIED)
            || headers.contains_key(header::CONTENT_ENCODING)
            || body.is_end_stream()
        {
            return false;
        }
        if headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|directive| directive.trim().eq_ignore_ascii_case("no-transform"))
        {
            return false;
        }
        let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.or(body.size_hint().exact()).is_some_and(|length| length < self.config.min_bytes) {
            return false;
        }
        let Some(media_type) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let media_type = media_type.split(';').next().unwrap_or_default().trim();
        // gRPC compresses its messages itself, and its clients read no HTTP content coding: never, whatever
        // `types` says (`application/*` included).
        if media_type.get(..16).is_some_and(|start| start.eq_ignore_ascii_case("application/grpc")) {
            return false;
        }
        self.config.types.iter().any(|pattern| matches_type(pattern, media_type))
    }
}

/// Whether `media_type` is `pattern`: exactly (ASCII case aside), or within `type/*`.
fn matches_type(pattern: &str, media_type: &str) -> bool {
    match pattern.strip_suffix("/*") {
        Some(top) => media_type.split_once('/').is_some_and(|(media_top, _)| media_top.eq_ignore_ascii_case(top)),
        None => pattern.eq_ignore_ascii_case(media_type),
    }
}

/// The codings of `Accept-Encoding`, each with its `q` in thousandths (1000 when absent; unparsable: 0).
fn codings(headers: &HeaderMap) -> impl Iterator<Item = (&str, u16)> {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|element| {
            let mut parts = element.split(';');
            let name = parts.next()?.trim();
            if name.is_empty() {
                return None;
            }
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q=").or_else(|| p.trim().strip_prefix("Q=")))
                .next()
                .map_or(1000, parse_q);
            Some((name, q))
        })
}

/// An RFC 9110 qvalue in thousandths: `0`, `0.5`, `1.000`; anything else is 0 (not acceptable).
fn parse_q(text: &str) -> u16 {
    let text = text.trim();
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return 0;
    }
    let thousandths =
        fraction.bytes().chain(std::iter::repeat(b'0')).take(3).fold(0u16, |n, b| n * 10 + u16::from(b - b'0'));
    match whole {
        "0" => thousandths,
        "1" if thousandths == 0 => 1000,
        _ => 0,
    }
}

/// Adds `Accept-Encoding` to `Vary`, unless it is there already (or `Vary: *`).
fn add_vary(headers: &mut HeaderMap) {
    let present = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|name| name.trim() == "*" || name.trim().eq_ignore_ascii_case("accept-encoding"));
    if !present {
        headers.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
}

/// A strong `ETag` made weak: the compressed bytes are not the ones it was made for.
fn weaken_etag(headers: &mut HeaderMap) {
    let Some(etag) = headers.get(header::ETAG) else { return };
    if etag.as_bytes().starts_with(b"W/") {
        return;
    }
    let weak = [&b"W/"[..], etag.as_bytes()].concat();
    if let Ok(weak) = HeaderValue::from_bytes(&weak) {
        headers.insert(header::ETAG, weak);
    }
}

/// A response body, compressed as it streams when a coding was chosen, passed through otherwise.
#[derive(Debug)]
pub struct Compressible<B> {
    inner: B,
    /// Boxed: most responses are not compressed, and pay a pointer.
    encoder: Option<Box<Encoder>>,
}

impl<B> Compressible<B> {
    /// `inner`, compressed with `coding` if any.
    pub fn new(inner: B, coding: Option<Coding>) -> Self {
        Self { inner, encoder: coding.map(|coding| Box::new(Encoder::new(coding))) }
    }

    /// The body passed through as it is.
    pub fn plain(inner: B) -> Self {
        Self { inner, encoder: None }
    }

    /// The coding the body is compressed with, if any.
    pub fn coding(&self) -> Option<Coding> {
        self.encoder.as_ref().map(|encoder| encoder.coding)
    }
}

/// One response's encoder, the compressed bytes it has made and not sent yet, and where the body stands.
struct Encoder {
    coding: Coding,
    /// `None` once finished.
    writer: Option<Writer>,
    /// The response body's trailers, held until the compressed bytes before them have gone.
    trailers: Option<HeaderMap>,
    /// Input given since the last flush: a flush without any would still emit an empty block.
    unflushed: bool,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").field("finished", &self.writer.is_none()).finish_non_exhaustive()
    }
}

/// Each encoder boxed: Brotli's is 5.5 KiB inline, gzip's a few hundred bytes (their tables are allocated
/// apart anyway).
enum Writer {
    Gzip(Box<flate2::write::GzEncoder<Vec<u8>>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
}

impl Encoder {
    fn new(coding: Coding) -> Self {
        let writer = match coding {
            Coding::Gzip => {
                Writer::Gzip(Box::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(GZIP_LEVEL))))
            }
            Coding::Brotli => Writer::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                COMPRESSED_CHUNK,
                BROTLI_QUALITY,
                BROTLI_WINDOW_BITS,
            ))),
        };
        Self { coding, writer: Some(writer), trailers: None, unflushed: false }
    }

    /// Compresses `data`.
    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.unflushed |= !data.is_empty();
        match &mut self.writer {
            Some(Writer::Gzip(writer)) => writer.write_all(data),
            Some(Writer::Brotli(writer)) => writer.write_all(data),
            None => Ok(()),
        }
    }

    /// Pushes out everything compressed so far (a sync flush: the client can decode all input given so far).
    fn flush(&mut self) -> std::io::Result<()> {
        if !std::mem::take(&mut self.unflushed) {
            return Ok(());
        }
        match &mut self.writer {
            Some(Writer::Gzip(writer)) => writer.flush(),
            Some(Writer::Brotli(writer)) => writer.flush(),
            None => Ok(()),
        }
    }

    /// Ends the stream: the compressed bytes not sent yet.
    fn finish(&mut self) -> std::io::Result<Vec<u8>> {
        match self.writer.take() {
            Some(Writer::Gzip(writer)) => (*writer).finish(),
            Some(Writer::Brotli(writer)) => Ok((*writer).into_inner()),
            None => Ok(Vec::new()),
        }
    }

    /// How many compressed bytes wait to be sent.
    fn pending(&self) -> usize {
        match &self.writer {
            Some(Writer::Gzip(writer)) => writer.get_ref().len(),
            Some(Writer::Brotli(writer)) => writer.get_ref().len(),
            None => 0,
        }
    }

    /// The compressed bytes made so far, to send.
    fn take(&mut self) -> Bytes {
        let buffer = match &mut self.writer {
            Some(Writer::Gzip(writer)) => writer.get_mut(),
            Some(Writer::Brotli(writer)) => writer.get_mut(),
            None => return Bytes::new(),
        };
        Bytes::from(std::mem::take(buffer))
    }
}

impl<B> Body for Compressible<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: From<std::io::Error>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let Some(encoder) = this.encoder.as_mut() else {
            return Pin::new(&mut this.inner).poll_frame(cx);
        };
        if encoder.writer.is_none() {
            // Finished: the trailers, if the body had them, then the end.
            return Poll::Ready(encoder.trailers.take().map(|trailers| Ok(Frame::trailers(trailers))));
        }
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        encoder.write(&data)?;
                        if encoder.pending() >= COMPRESSED_CHUNK {
                            return Poll::Ready(Some(Ok(Frame::data(encoder.take()))));
                        }
                    }
                    Err(frame) => {
                        // Trailers end the body: finish first, send them after the last compressed bytes.
                        encoder.trailers = frame.into_trailers().ok();
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(encoder.finish()?)))));
                    }
                },
                Poll::Ready(None) => {
                    let rest = encoder.finish()?;
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Pending => {
                    // The upstream paused: what it sent so far goes out now, decodable (a flush with no new input
                    // since the last one does nothing).
                    encoder.flush()?;
                    return match encoder.pending() {
                        0 => Poll::Pending,
                        _ => Poll::Ready(Some(Ok(Frame::data(encoder.take())))),
                    };
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.encoder {
            None => self.inner.is_end_stream(),
            Some(encoder) => encoder.writer.is_none() && encoder.trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.encoder {
            None => self.inner.size_hint(),
            Some(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};
    use std::io::Read as _;

    fn compression(codings: &[Coding]) -> Compression {
        Compression::new(&CompressionConfig {
            codings: codings.to_vec(),
            types: crate::config::DEFAULT_COMPRESSED_TYPES.iter().map(|t| (*t).to_owned()).collect(),
            min_bytes: 100,
        })
    }

    fn choose(c: &Compression, accept: Option<&'static str>) -> Choice {
        let mut headers = HeaderMap::new();
        if let Some(accept) = accept {
            headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static(accept));
        }
        c.choose(&Method::GET, &headers)
    }

    #[test]
    fn the_client_chooses_by_q_and_the_configuration_breaks_ties() {
        let both = compression(&[Coding::Brotli, Coding::Gzip]);
        assert_eq!(choose(&both, Some("gzip, deflate, br")), Choice::Use(Coding::Brotli));
        assert_eq!(choose(&both, Some("gzip;q=1.0, br;q=0.8")), Choice::Use(Coding::Gzip));
        assert_eq!(choose(&both, Some("GZIP")), Choice::Use(Coding::Gzip));
        assert_eq!(choose(&both, Some("br;q=0, gzip;q=0.001")), Choice::Use(Coding::Gzip));
        assert_eq!(choose(&both, Some("*")), Choice::Use(Coding::Brotli));
        assert_eq!(choose(&both, Some("br;q=0, *;q=0.5")), Choice::Use(Coding::Gzip), "* is every other coding");
        assert_eq!(choose(&both, Some("identity")), Choice::Plain);
        assert_eq!(choose(&both, Some("gzip;q=0, br;q=0")), Choice::Plain);
        assert_eq!(choose(&both, Some("gzip;q=2")), Choice::Plain, "an invalid q accepts nothing");
        assert_eq!(choose(&both, Some("")), Choice::Plain);
        assert_eq!(choose(&both, None), Choice::Plain, "no header: no compression");
        let gzip_only = compression(&[Coding::Gzip]);
        assert_eq!(choose(&gzip_only, Some("br")), Choice::Plain);
        assert_eq!(choose(&gzip_only, Some("br, gzip;q=0.1")), Choice::Use(Coding::Gzip));
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        assert_eq!(both.choose(&Method::HEAD, &headers), Choice::Never);
        assert_eq!(both.choose(&Method::CONNECT, &headers), Choice::Never);
    }

    #[test]
    fn qvalues_parse_as_rfc_9110_writes_them() {
        for (text, q) in [("1", 1000), ("1.000", 1000), ("0", 0), ("0.5", 500), ("0.125", 125), ("0.", 0)] {
            assert_eq!(parse_q(text), q, "{text}");
        }
        for text in ["1.5", "2", "0.1234", "-1", "abc", "0.5x"] {
            assert_eq!(parse_q(text), 0, "{text}");
        }
    }

    #[test]
    fn media_types_match_exactly_or_by_top_level_type() {
        assert!(matches_type("text/*", "text/html") && matches_type("text/*", "TEXT/CSS"));
        assert!(matches_type("application/json", "Application/JSON"));
        assert!(!matches_type("application/json", "application/json-seq") && !matches_type("text/*", "image/png"));
    }

    /// A body whose error can hold an encoder's, as every body sealgate compresses does.
    type TestBody = http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

    fn response(content_type: &str, body: &'static str) -> Response<TestBody> {
        Response::builder()
            .header(header::CONTENT_TYPE, content_type)
            .header(header::CONTENT_LENGTH, body.len())
            .header(header::ETAG, "\"v1\"")
            .header(header::ACCEPT_RANGES, "bytes")
            .body(Full::new(Bytes::from_static(body.as_bytes())).map_err(|never| match never {}).boxed())
            .unwrap()
    }

    const PAGE: &str = "<html><body>sealgate compresses what is worth compressing, and streams it while it does. \
                        sealgate compresses what is worth compressing, and streams it while it does.</body></html>";

    async fn decoded(coding: Coding, body: impl Body<Data = Bytes, Error = impl std::fmt::Debug>) -> String {
        let bytes = body.collect().await.unwrap().to_bytes();
        let mut text = String::new();
        match coding {
            Coding::Gzip => flate2::read::GzDecoder::new(&bytes[..]).read_to_string(&mut text).unwrap(),
            Coding::Brotli => brotli::Decompressor::new(&bytes[..], 4096).read_to_string(&mut text).unwrap(),
        };
        text
    }

    #[tokio::test]
    async fn a_compressed_response_is_marked_and_decodes_to_the_original() {
        let c = compression(&[Coding::Brotli, Coding::Gzip]);
        for coding in Coding::ALL {
            let compressed = c.apply(Choice::Use(coding), response("text/html; charset=utf-8", PAGE));
            let headers = compressed.headers();
            assert_eq!(headers[header::CONTENT_ENCODING], coding.token());
            assert_eq!(headers[header::VARY], "Accept-Encoding");
            assert_eq!(headers[header::ETAG], "W/\"v1\"");
            assert!(!headers.contains_key(header::CONTENT_LENGTH) && !headers.contains_key(header::ACCEPT_RANGES));
            assert_eq!(decoded(coding, compressed.into_body()).await, PAGE);
        }
    }

    #[tokio::test]
    async fn what_is_not_worth_or_not_for_compressing_passes_as_it_is() {
        let c = compression(&[Coding::Gzip]);
        let plain = |r: Response<Compressible<TestBody>>| r.body().encoder.is_none();
        // Small, or not text, or already encoded, or no-transform: untouched, but for `Vary` where the answer
        // depends on the client.
        let small = c.apply(Choice::Use(Coding::Gzip), response("text/html", "<p>hi</p>"));
        assert!(plain(small));
        let everything = Compression::new(&CompressionConfig {
            codings: vec![Coding::Gzip],
            types: vec!["application/*".to_owned()],
            min_bytes: 0,
        });
        for grpc in ["application/grpc", "application/grpc+proto", "Application/GRPC-web"] {
            assert!(plain(everything.apply(Choice::Use(Coding::Gzip), response(grpc, PAGE))), "{grpc}");
        }
        let image = c.apply(Choice::Use(Coding::Gzip), response("image/png", PAGE));
        assert!(!image.headers().contains_key(header::VARY) && plain(image));
        let mut encoded = response("text/html", PAGE);
        encoded.headers_mut().insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert!(plain(c.apply(Choice::Use(Coding::Gzip), encoded)));
        let mut no_transform = response("text/html", PAGE);
        no_transform.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, no-transform"));
        assert!(plain(c.apply(Choice::Use(Coding::Gzip), no_transform)));
        let mut partial = response("text/html", PAGE);
        *partial.status_mut() = StatusCode::PARTIAL_CONTENT;
        assert!(plain(c.apply(Choice::Use(Coding::Gzip), partial)));
        // A client that accepts nothing: plain, and `Vary` says why.
        let declined = c.apply(Choice::Plain, response("text/html", PAGE));
        assert_eq!(declined.headers()[header::VARY], "Accept-Encoding");
        assert_eq!(declined.headers()[header::CONTENT_LENGTH], PAGE.len().to_string().as_str());
        assert!(plain(declined));
        let mut varied = response("text/html", PAGE);
        varied.headers_mut().insert(header::VARY, HeaderValue::from_static("Origin, accept-encoding"));
        let varied = c.apply(Choice::Use(Coding::Gzip), varied);
        assert_eq!(varied.headers().get_all(header::VARY).iter().count(), 1, "named once");
        assert!(plain(c.apply(Choice::Never, response("text/html", PAGE))));
    }

    #[tokio::test]
    async fn a_paused_stream_is_flushed_decodable_and_trailers_follow_the_last_bytes() {
        type Item = Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>;
        let (sender, receiver) = tokio::sync::mpsc::channel::<Item>(4);
        let stream = tokio_stream_from(receiver);
        let response = Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .body(StreamBody::new(stream))
            .unwrap();
        let c = Compression::new(&CompressionConfig {
            codings: vec![Coding::Gzip],
            types: vec!["text/*".to_owned()],
            min_bytes: 100,
        });
        let mut body = c.apply(Choice::Use(Coding::Gzip), response).into_body();
        sender.send(Ok(Frame::data(Bytes::from_static(b"data: first\n\n")))).await.unwrap();
        // The upstream pauses: the first event arrives whole, before the stream ends.
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        let mut decoder = flate2::write::GzDecoder::new(Vec::new());
        std::io::Write::write_all(&mut decoder, &first).unwrap();
        std::io::Write::flush(&mut decoder).unwrap();
        assert_eq!(decoder.get_ref().as_slice(), b"data: first\n\n");
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("1"));
        sender.send(Ok(Frame::data(Bytes::from_static(b"data: second\n\n")))).await.unwrap();
        sender.send(Ok(Frame::trailers(trailers))).await.unwrap();
        drop(sender);
        let mut rest = Vec::new();
        let mut got_trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            match frame.into_data() {
                Ok(data) => rest.extend_from_slice(&data),
                Err(frame) => got_trailers = frame.into_trailers().ok(),
            }
        }
        std::io::Write::write_all(&mut decoder, &rest).unwrap();
        assert_eq!(decoder.finish().unwrap(), b"data: first\n\ndata: second\n\n");
        assert_eq!(got_trailers.unwrap()["x-checksum"], "1");
        assert!(body.is_end_stream());
    }

    /// A stream of the frames `receiver` gets.
    fn tokio_stream_from<T>(
        mut receiver: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> + Unpin {
        Box::pin(futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx)))
    }
}
