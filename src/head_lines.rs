//! HTTP/1 request heads whose lines end in a bare LF are refused.
//!
//! RFC 9112 (section 2.2) lets a recipient take a lone LF as a line ending, and hyper's parser (httparse) does.
//! A server behind another proxy may not, and a head the two read differently is the stuff of request
//! smuggling. sealgate never forwards a head as received (hyper parses it and the upstream client writes it anew
//! with CRLF), so nothing ambiguous reaches an upstream either way; but a client sending bare LFs is at best
//! broken and at worst probing, and the edge should say so rather than guess: such a request gets 400 and its
//! connection is closed. (nginx accepts bare LFs, as the RFC allows; sealgate takes the stricter reading.)
//!
//! hyper does not expose the bytes of a head, so the connection's TLS stream looks at what it hands hyper while
//! a head is awaited, up to the empty line that ends the head: at the start of the connection, and once a
//! request has been answered *and* its body read to its end. (A connection parks only if none of its requests
//! had a body, so when a parked connection's client sends again, its last request was answered and read.) At
//! those moments the next byte hyper reads can only be the start of a head. It stops looking at the end of the
//! head, and when the head's request starts (a head hyper had already read ahead is then not looked at:
//! pipelining). A request whose body is never read to its end (a `respond` route ignoring it) leaves the heads
//! after it unlooked at, rather than risk taking the rest of its body for a head. A head not looked at is still
//! parsed by hyper and written anew like any other. [`HeadLines`] carries the verdict to the request handler.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, LazyLock};

/// Shared by an HTTP/1 connection's TLS stream (which looks at heads) and its request handling (which refuses
/// a head found with a bare LF). Both run in the connection's task.
#[derive(Debug)]
pub struct HeadLines {
    /// A head is awaited: the stream looks at what it reads.
    awaited: AtomicBool,
    /// Counts the heads awaited, so that the stream starts each afresh.
    generation: AtomicU32,
    /// A head was seen with a line ending in a bare LF.
    bare_lf: AtomicBool,
    /// The current request has been answered.
    answered: AtomicBool,
    /// The current request's body has been read to its end (or it had none).
    body_read: AtomicBool,
}

impl HeadLines {
    /// A connection's, awaiting its first head.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            awaited: AtomicBool::new(true),
            generation: AtomicU32::new(0),
            bare_lf: AtomicBool::new(false),
            answered: AtomicBool::new(false),
            body_read: AtomicBool::new(false),
        })
    }

    /// What the client sends next is a head: a request has been answered and its body read.
    fn await_head(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.awaited.store(true, Ordering::Relaxed);
    }

    /// A request's head has been read (hyper parsed it), `bodiless` or not: stops looking until the next head
    /// is awaited, and says whether this one had a line ending in a bare LF.
    pub fn head_read(&self, bodiless: bool) -> bool {
        self.awaited.store(false, Ordering::Relaxed);
        self.answered.store(false, Ordering::Relaxed);
        self.body_read.store(bodiless, Ordering::Relaxed);
        self.bare_lf.load(Ordering::Relaxed) && self.bare_lf.swap(false, Ordering::Relaxed)
    }

    /// The current request has been answered (its response sent).
    pub fn answered(&self) {
        self.answered.store(true, Ordering::Relaxed);
        if self.body_read.load(Ordering::Relaxed) {
            self.await_head();
        }
    }

    /// The current request's body has been read to its end.
    pub fn body_read(&self) {
        self.body_read.store(true, Ordering::Relaxed);
        if self.answered.load(Ordering::Relaxed) {
            self.await_head();
        }
    }
}

/// The reading side's state: where in a head the bytes read so far end.
#[derive(Debug)]
pub struct HeadScan {
    lines: Arc<HeadLines>,
    /// The [`HeadLines::generation`] this state is for.
    generation: u32,
    /// Bytes of the current line read so far.
    line_len: usize,
    /// The last byte read.
    last: u8,
    /// A line with content has been read (the request line): the next empty line ends the head. Empty lines
    /// before it are skipped, as RFC 9112 section 2.2 allows.
    started: bool,
}

impl HeadScan {
    /// Looks at heads for `lines`.
    pub fn new(lines: Arc<HeadLines>) -> Self {
        let generation = lines.generation.load(Ordering::Relaxed);
        Self { lines, generation, line_len: 0, last: b'\r', started: false }
    }

    /// Takes in `bytes`, the next ones read from the client.
    pub fn read(&mut self, mut bytes: &[u8]) {
        if bytes.is_empty() || !self.lines.awaited.load(Ordering::Relaxed) {
            return;
        }
        let generation = self.lines.generation.load(Ordering::Relaxed);
        if generation != self.generation {
            // A new head is awaited. An LF first may end a CRLF whose CR came before: it is not taken as bare.
            (self.generation, self.line_len, self.last, self.started) = (generation, 0, b'\r', false);
        }
        if self.line_len == 0 && !self.started && self.read_whole_head(bytes) {
            return;
        }
        while let Some(lf) = memchr::memchr(b'\n', bytes) {
            let line_len = self.line_len + lf;
            let before = match lf {
                0 => self.last,
                _ => bytes[lf - 1],
            };
            let crlf = before == b'\r';
            if !crlf {
                self.lines.bare_lf.store(true, Ordering::Relaxed);
            }
            let empty = line_len <= usize::from(crlf);
            (self.line_len, self.last) = (0, b'\n');
            bytes = &bytes[lf + 1..];
            if !empty {
                self.started = true;
            } else if self.started {
                // The end of the head: what follows is its body, or the next head once this one is answered.
                self.started = false;
                self.lines.awaited.store(false, Ordering::Relaxed);
                return;
            }
        }
        if let Some(&last) = bytes.last() {
            self.line_len += bytes.len();
            self.last = last;
        }
    }

    /// What nearly every read that starts a head holds: the whole head, ended by CRLF CRLF. One search for the
    /// end and one pass the compiler vectorises, instead of a search per line (a sixth of the cost). Up to the
    /// first CRLF CRLF, a head with only CRLF line endings has no other empty line, so the bytes looked at are
    /// the head's, unless a bare LF ended it earlier, which this pass finds. Returns whether it looked at the
    /// head; otherwise the line-by-line scan does, from the same place (a head not whole in this read, or
    /// starting with empty lines).
    fn read_whole_head(&mut self, bytes: &[u8]) -> bool {
        static END: LazyLock<memchr::memmem::Finder<'static>> =
            LazyLock::new(|| memchr::memmem::Finder::new(b"\r\n\r\n"));
        if matches!(bytes.first(), None | Some(b'\r' | b'\n')) {
            return false;
        }
        let Some(end) = END.find(bytes) else { return false };
        let head = &bytes[..end + 4];
        // Same-length slices and no early exit: the compiler vectorises the pass.
        let (bytes, befores) = (&head[1..], &head[..head.len() - 1]);
        let bare = bytes
            .iter()
            .zip(befores)
            .fold(0u8, |bare, (&byte, &before)| bare | (u8::from(byte == b'\n') & u8::from(before != b'\r')));
        if bare != 0 {
            self.lines.bare_lf.store(true, Ordering::Relaxed);
        }
        self.lines.awaited.store(false, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether reading `chunks` in turn finds a bare LF, and whether the head was found to end.
    fn scan(chunks: &[&[u8]]) -> (bool, bool) {
        let lines = HeadLines::new();
        let mut scan = HeadScan::new(Arc::clone(&lines));
        for chunk in chunks {
            scan.read(chunk);
        }
        let ended = !lines.awaited.load(Ordering::Relaxed);
        (lines.head_read(true), ended)
    }

    #[test]
    fn crlf_heads_pass_and_bare_lf_anywhere_in_a_head_is_found() {
        assert_eq!(scan(&[b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"]), (false, true));
        assert_eq!(scan(&[b"GET / HTTP/1.1\nHost: a\r\n\r\n"]), (true, true));
        assert_eq!(scan(&[b"GET / HTTP/1.1\r\nHost: a\n\r\n"]), (true, true));
        assert_eq!(scan(&[b"GET / HTTP/1.1\r\nHost: a\r\n\n"]), (true, true));
        assert_eq!(scan(&[b"GET / HTTP/1.1\nHost: a\n\n"]), (true, true));
        // Empty lines before the request line are skipped; a bare LF among them counts.
        assert_eq!(scan(&[b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"]), (false, true));
        assert_eq!(scan(&[b"\n\nGET / HTTP/1.1\r\n\r\n"]), (true, true));
        assert_eq!(scan(&[b"\r\n\r\nGET / HTTP/1.1\nHost: a\n\n"]), (true, true));
        // A head ended early by a bare LF, a body after it balancing the count of CRs and LFs.
        assert_eq!(scan(&[b"GET / HTTP/1.1\r\nHost: a\r\n\nX\r\r\n\r\n"]), (true, true));
        assert_eq!(scan(&[b"GET / HTTP/1.1\r\nHost: a\n\r\nbody\r\n\r\n"]), (true, true));
        // A body with LFs after a whole CRLF head.
        assert_eq!(scan(&[b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\na\nb\n"]), (false, true));
    }

    #[test]
    fn heads_split_anywhere_across_reads_read_the_same() {
        let head: &[u8] = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n";
        for cut in 0..=head.len() {
            assert_eq!(scan(&[&head[..cut], &head[cut..]]), (false, true), "cut at {cut}");
        }
        let bare: &[u8] = b"POST /x HTTP/1.1\r\nHost: a\nContent-Length: 3\r\n\r\n";
        for cut in 0..=bare.len() {
            assert_eq!(scan(&[&bare[..cut], &bare[cut..]]), (true, true), "cut at {cut}");
        }
        assert_eq!(scan(&[b"GET / HTTP/1.1\r\nHost: a\r\n"]), (false, false), "not ended yet");
    }

    #[test]
    fn a_head_is_awaited_once_its_request_is_answered_and_its_body_read_in_either_order() {
        let lines = HeadLines::new();
        let mut scan = HeadScan::new(Arc::clone(&lines));
        scan.read(b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\na\nb\n");
        assert!(!lines.head_read(false), "LFs in a body are the body's business");
        scan.read(b"c\n");
        lines.answered(); // early: the rest of the body is still to come
        scan.read(b"d\n\n");
        assert!(!lines.awaited.load(Ordering::Relaxed));
        lines.body_read();
        scan.read(b"GET / HTTP/1.1\nHost: a\r\n\r\n");
        assert!(lines.head_read(true));
        lines.answered();
        scan.read(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n");
        assert!(!lines.head_read(false), "taken once");
        lines.body_read();
        lines.answered();
        scan.read(b"GET / HTTP/1.1\r\nHost: a\n\n");
        assert!(lines.head_read(true));
    }

    #[test]
    fn after_a_body_never_read_to_its_end_no_head_is_looked_at() {
        let lines = HeadLines::new();
        let mut scan = HeadScan::new(Arc::clone(&lines));
        scan.read(b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\n");
        assert!(!lines.head_read(false));
        lines.answered();
        scan.read(b"a\nb\nGET / HTTP/1.1\nHost: a\n\n");
        assert!(!lines.head_read(true));
    }

    #[test]
    fn a_request_started_stops_the_looking_and_a_crlf_cut_at_the_new_head_is_no_bare_lf() {
        let lines = HeadLines::new();
        let mut scan = HeadScan::new(Arc::clone(&lines));
        scan.read(b"GET /1 HTTP/1.1\r\n\r\n");
        assert!(!lines.head_read(true));
        // The next head read ahead (pipelining) with half its CRLF, while the first is answered.
        scan.read(b"POST / HTTP/1.1\r\nContent-Length: 4\r");
        lines.answered();
        scan.read(b"\n\r\n");
        assert!(!lines.head_read(false), "an LF first in a new head may end a CRLF begun before");
        scan.read(b"a\nb\n");
        assert!(!lines.awaited.load(Ordering::Relaxed), "its body is not looked at");
    }
}
