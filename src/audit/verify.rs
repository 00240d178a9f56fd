//! Checking a log: every line a record, every record the successor of the one before.
//!
//! The verifier trusts nothing in the file: lines are read with a bounded length, each must be a JSON object
//! whose first keys are `seq`, `time` and `event` and whose last key is `prev`, with no key twice (so that no
//! two JSON readers can disagree about a record), and each must link to the line before by seq and hash. The
//! first line that does not is reported, with its line number; nothing after it is trusted.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read as _};
use std::path::Path;
use std::str::FromStr;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{line_hash, AuditError, Result, GENESIS_PREV, MAX_LINE_BYTES};

/// What [`verify`] found in an intact log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Number of records.
    pub records: u64,
    /// `seq` of the first record, when the chain does not begin in the files given: their first record is a
    /// `log_continued` (the log was reopened, after a rotation), whose `prev` links it to the last record of
    /// the file before. `None` when the chain begins with seq 0 (or there is no record).
    pub continued_from: Option<u64>,
    /// `seq` of the last record; `None` for an empty log.
    pub last_seq: Option<u64>,
    /// SHA-256 of the last line (what the next record's `prev` will be); [`GENESIS_PREV`] for an empty log.
    pub last_hash: String,
}

/// Why a line is not a valid link of the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineProblem {
    /// The file ends in the middle of a line.
    Unterminated,
    /// The line is longer than [`MAX_LINE_BYTES`].
    TooLong,
    /// The line is empty.
    Empty,
    /// The line is not UTF-8.
    NotUtf8,
    /// The line is not a record: bad JSON, or a missing, misplaced, repeated or ill-typed key.
    Malformed(String),
    /// `seq` is not the previous record's plus one (0 for the first line).
    UnexpectedSeq {
        /// What it should be.
        expected: u64,
        /// What it is.
        found: u64,
    },
    /// `prev` is not the SHA-256 of the line before.
    PrevMismatch {
        /// The SHA-256 of the line before ([`GENESIS_PREV`] on the first line).
        expected: String,
        /// The line's `prev`.
        found: String,
    },
    /// The line's SHA-256 is not the one anchored for its seq.
    AnchorMismatch {
        /// The anchored hash.
        anchored: String,
        /// The line's hash.
        found: String,
    },
    /// `seq` is the largest number there is: no record can follow it.
    SeqOverflow,
}

impl fmt::Display for LineProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unterminated => {
                f.write_str("the line has no final newline: a write was cut short, or the file was cut")
            }
            Self::TooLong => write!(f, "the line is longer than {MAX_LINE_BYTES} bytes: not a record"),
            Self::Empty => f.write_str("empty line: not a record"),
            Self::NotUtf8 => f.write_str("the line is not UTF-8: not a record"),
            Self::Malformed(why) => write!(f, "not a valid record: {why}"),
            Self::UnexpectedSeq { expected, found } if found > expected => write!(
                f,
                "seq gap: expected seq {expected}; records before this line were removed, or lines were reordered"
            ),
            Self::UnexpectedSeq { expected, .. } => {
                write!(f, "expected seq {expected}: this record is repeated or out of order")
            }
            Self::PrevMismatch { expected, found } if expected == GENESIS_PREV => write!(
                f,
                "broken link: the first record's `prev` must be 64 zeros, found {found}: \
                 records before it were removed, or it was altered"
            ),
            Self::PrevMismatch { expected, found } => write!(
                f,
                "broken link: `prev` is {found}, but the line before hashes to {expected}: \
                 that line was altered, or this one was inserted or moved"
            ),
            Self::AnchorMismatch { anchored, found } => write!(
                f,
                "the line hashes to {found}, not to its anchor {anchored}: \
                 the log was rewritten at or before this line"
            ),
            Self::SeqOverflow => f.write_str("seq is at its maximum: no record can follow"),
        }
    }
}

/// A record known from elsewhere: its seq and the SHA-256 of its line, as `sealgate audit head` prints them
/// (`SEQ:HASH`). A log that still holds it unchanged was neither cut short before it nor rewritten up to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// The record's seq.
    pub seq: u64,
    /// Lowercase hex SHA-256 of its line.
    pub hash: String,
}

impl fmt::Display for Anchor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}

impl FromStr for Anchor {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let (seq, hash) = text.trim().split_once(':').ok_or("expected SEQ:HASH, as `sealgate audit head` prints")?;
        let seq = seq.parse().map_err(|_| format!("{seq:?} is not a seq (a whole number)"))?;
        let hash = hash.to_ascii_lowercase();
        if !is_sha256_hex(&hash) {
            return Err("the hash must be 64 hexadecimal digits (a SHA-256)".to_owned());
        }
        Ok(Self { seq, hash })
    }
}

/// Verifies the whole chain of the log at `path`.
pub fn verify(path: &Path) -> Result<VerifyReport> {
    verify_anchored(path, &[])
}

/// Verifies the whole chain, and that every anchor's record is still in the log with the anchored hash.
pub fn verify_anchored(path: &Path, anchors: &[Anchor]) -> Result<VerifyReport> {
    verify_files(&[path], anchors)
}

/// Verifies a log kept in several files, oldest first (a log and its rotations: `audit.jsonl.2`,
/// `audit.jsonl.1`, `audit.jsonl`), as one chain: each file must continue the one before it, by seq and hash.
/// The first file may itself continue an older one (it begins with a `log_continued` record); the link to that
/// one is then unchecked, and the report says where the chain was taken up. Every anchor must fall within the
/// files given.
pub fn verify_files<P: AsRef<Path>>(paths: &[P], anchors: &[Anchor]) -> Result<VerifyReport> {
    let mut report =
        VerifyReport { records: 0, continued_from: None, last_seq: None, last_hash: GENESIS_PREV.to_owned() };
    let mut line = Vec::new();
    for path in paths {
        let path = path.as_ref();
        let mut reader = open(path)?;
        let mut number = 0;
        loop {
            number += 1;
            let broken = |seq, problem| AuditError::Broken { path: path.to_owned(), line: number, seq, problem };
            let read = read_line(&mut reader, &mut line, MAX_LINE_BYTES).map_err(AuditError::io(path, "read"))?;
            match read {
                None => break,
                Some(Read::Complete) => {}
                Some(Read::TooLong) => return Err(broken(None, LineProblem::TooLong)),
                Some(Read::Unterminated) => {
                    return Err(broken(parse_line(&line).ok().map(|h| h.seq), LineProblem::Unterminated))
                }
            }
            let head = parse_line(&line).map_err(|problem| broken(None, problem))?;
            match report.last_seq {
                // The chain's first record: seq 0 from nothing, or the record that takes a rotated log up.
                None if head.seq != 0 && head.event == CONTINUED_EVENT => report.continued_from = Some(head.seq),
                None if head.seq != 0 => {
                    return Err(broken(Some(head.seq), LineProblem::UnexpectedSeq { expected: 0, found: head.seq }))
                }
                None if head.prev != GENESIS_PREV => {
                    let problem = LineProblem::PrevMismatch { expected: GENESIS_PREV.to_owned(), found: head.prev };
                    return Err(broken(Some(head.seq), problem));
                }
                None => {}
                Some(last) => {
                    // `last` < u64::MAX: a record at the maximum seq is refused below before it becomes `last`.
                    let expected = last.saturating_add(1);
                    if head.seq != expected {
                        return Err(broken(Some(head.seq), LineProblem::UnexpectedSeq { expected, found: head.seq }));
                    }
                    if head.prev != report.last_hash {
                        let problem = LineProblem::PrevMismatch { expected: report.last_hash, found: head.prev };
                        return Err(broken(Some(head.seq), problem));
                    }
                }
            }
            if head.seq == u64::MAX {
                return Err(broken(Some(head.seq), LineProblem::SeqOverflow));
            }
            let hash = line_hash(&line);
            if let Some(anchor) = anchors.iter().find(|a| a.seq == head.seq && a.hash != hash) {
                let problem = LineProblem::AnchorMismatch { anchored: anchor.hash.clone(), found: hash };
                return Err(broken(Some(head.seq), problem));
            }
            report.records += 1;
            report.last_seq = Some(head.seq);
            report.last_hash = hash;
        }
    }
    let Some(last) = paths.last().map(|p| p.as_ref().to_owned()) else {
        return Ok(report);
    };
    if let Some(first_seq) = report.continued_from {
        if let Some(anchored) = anchors.iter().map(|a| a.seq).filter(|&seq| seq < first_seq).min() {
            let first = paths.first().map(|p| p.as_ref().to_owned()).unwrap_or(last);
            return Err(AuditError::AnchorBeforeStart { path: first, anchored, first_seq });
        }
    }
    let beyond = anchors.iter().map(|a| a.seq).filter(|&seq| report.last_seq.is_none_or(|last| seq > last)).max();
    if let Some(anchored) = beyond {
        return Err(AuditError::Truncated { path: last, anchored, last_seq: report.last_seq });
    }
    Ok(report)
}

/// Verifies the log (its files oldest first), then returns its last record as an anchor: taking one of a
/// broken log would vouch for it.
pub fn head<P: AsRef<Path>>(paths: &[P]) -> Result<Anchor> {
    let report = verify_files(paths, &[])?;
    match report.last_seq {
        Some(seq) => Ok(Anchor { seq, hash: report.last_hash }),
        None => Err(AuditError::Empty { path: paths.last().map(|p| p.as_ref().to_owned()).unwrap_or_default() }),
    }
}

fn open(path: &Path) -> Result<BufReader<File>> {
    let file = File::open(path).map_err(AuditError::io(path, "open"))?;
    // A directory opens, and a FIFO would block the reader: only a regular file is a log.
    if !file.metadata().map_err(AuditError::io(path, "read the metadata of"))?.is_file() {
        return Err(AuditError::NotAFile { path: path.to_owned() });
    }
    Ok(BufReader::with_capacity(64 << 10, file))
}

/// How a line ended.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    /// With `\n` (removed from the buffer).
    Complete,
    /// At the end of the file without `\n`.
    Unterminated,
    /// Not within `max` bytes.
    TooLong,
}

/// Reads the next line into `line` (cleared first), reading at most `max + 1` bytes. `None` at the end of the
/// file.
fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>, max: usize) -> io::Result<Option<Read>> {
    line.clear();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    if reader.take(limit).read_until(b'\n', line)? == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
        return Ok(Some(Read::Complete));
    }
    Ok(Some(if line.len() > max { Read::TooLong } else { Read::Unterminated }))
}

/// The chain's fields of a record; the event's own fields are checked to be JSON and otherwise ignored, so that
/// a log written by a later version, with events this one does not know, still verifies.
#[derive(Debug)]
pub(super) struct RecordHead {
    pub(super) seq: u64,
    pub(super) event: String,
    pub(super) prev: String,
}

/// The event of the record that begins a reopened log file (see [`super::AuditLog::reopen`]).
pub(super) const CONTINUED_EVENT: &str = "log_continued";

/// Parses one line (without its `\n`) as a record.
pub(super) fn parse_line(line: &[u8]) -> std::result::Result<RecordHead, LineProblem> {
    if line.is_empty() {
        return Err(LineProblem::Empty);
    }
    let text = std::str::from_utf8(line).map_err(|_| LineProblem::NotUtf8)?;
    serde_json::from_str(text).map_err(|e| LineProblem::Malformed(e.to_string()))
}

impl<'de> Deserialize<'de> for RecordHead {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_map(HeadVisitor)
    }
}

/// The keys that begin every record, in order.
const LEADING_KEYS: [&str; 3] = ["seq", "time", "event"];

struct HeadVisitor;

impl<'de> Visitor<'de> for HeadVisitor {
    type Value = RecordHead;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an audit record (a JSON object)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<RecordHead, A::Error> {
        let mut keys = HashSet::new();
        let (mut seq, mut time, mut event, mut prev) = (None, None, None, None);
        while let Some(key) = map.next_key::<String>()? {
            if prev.is_some() {
                return Err(de::Error::custom(format!("`{key}` follows `prev`, which must be the last key")));
            }
            let position = keys.len();
            if LEADING_KEYS.get(position).is_some_and(|expected| *expected != key) {
                return Err(de::Error::custom("a record begins with the keys `seq`, `time`, `event`, in this order"));
            }
            if !keys.insert(key.clone()) {
                return Err(de::Error::custom(format!("the key `{key}` appears twice")));
            }
            match key.as_str() {
                "seq" => seq = Some(map.next_value::<u64>()?),
                "time" => time = Some(map.next_value::<String>()?),
                "event" => event = Some(map.next_value::<String>()?),
                "prev" => prev = Some(map.next_value::<String>()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let (Some(seq), Some(time), Some(event)) = (seq, time, event) else {
            return Err(de::Error::custom("a record begins with the keys `seq`, `time`, `event`, in this order"));
        };
        let prev = prev.ok_or_else(|| de::Error::missing_field("prev"))?;
        if OffsetDateTime::parse(&time, &Rfc3339).is_err() {
            return Err(de::Error::custom("`time` is not an RFC 3339 time"));
        }
        if event.is_empty() || !event.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
            return Err(de::Error::custom("`event` is not a snake_case name"));
        }
        if !is_sha256_hex(&prev) {
            return Err(de::Error::custom("`prev` is not 64 lowercase hexadecimal digits"));
        }
        Ok(RecordHead { seq, event, prev })
    }
}

fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_read_within_their_bound() {
        let mut line = Vec::new();
        let mut reader = io::Cursor::new(b"abc\nabcd\nabcde\nab".to_vec());
        assert_eq!(read_line(&mut reader, &mut line, 4).unwrap(), Some(Read::Complete));
        assert_eq!(line, b"abc");
        assert_eq!(read_line(&mut reader, &mut line, 4).unwrap(), Some(Read::Complete));
        assert_eq!(line, b"abcd");
        assert_eq!(read_line(&mut reader, &mut line, 4).unwrap(), Some(Read::TooLong));
        assert_eq!(line, b"abcde");
        // The `\n` after the over-long line is the next read's empty line; the verifier stops before it.
        assert_eq!(read_line(&mut reader, &mut line, 4).unwrap(), Some(Read::Complete));
        assert_eq!(read_line(&mut reader, &mut line, 4).unwrap(), Some(Read::Unterminated));
        assert_eq!(line, b"ab");
        assert_eq!(read_line(&mut reader, &mut line, 4).unwrap(), None);
    }

    #[test]
    fn records_must_have_the_chain_keys_in_place() {
        let prev = GENESIS_PREV;
        let time = "2026-05-01T09:00:00.000000Z";
        let ok = format!(r#"{{"seq":0,"time":"{time}","event":"stopped","prev":"{prev}"}}"#);
        assert_eq!(parse_line(ok.as_bytes()).unwrap().seq, 0);
        for (line, needle) in [
            (String::new(), "empty"),
            ("[]".to_owned(), "invalid type"),
            (format!(r#"{{"time":"{time}","seq":0,"event":"stopped","prev":"{prev}"}}"#), "begins with"),
            (format!(r#"{{"seq":0,"time":"{time}","event":"stopped"}}"#), "missing field `prev`"),
            (format!(r#"{{"seq":0,"time":"{time}","event":"stopped","prev":"{prev}","x":1}}"#), "follows `prev`"),
            (format!(r#"{{"seq":0,"time":"{time}","event":"stopped","x":1,"x":2,"prev":"{prev}"}}"#), "twice"),
            (format!(r#"{{"seq":0,"time":"{time}","event":"stopped","seq":1,"prev":"{prev}"}}"#), "twice"),
            (format!(r#"{{"seq":-1,"time":"{time}","event":"stopped","prev":"{prev}"}}"#), "expected u64"),
            (format!(r#"{{"seq":0,"time":"yesterday","event":"stopped","prev":"{prev}"}}"#), "RFC 3339"),
            (format!(r#"{{"seq":0,"time":"{time}","event":"Stopped!","prev":"{prev}"}}"#), "snake_case"),
            (format!(r#"{{"seq":0,"time":"{time}","event":"stopped","prev":"{}"}}"#, "A".repeat(64)), "hexadecimal"),
            (format!(r#"{{"seq":0,"time":"{time}","event":"stopped","prev":"{prev}"}} x"#), "trailing"),
        ] {
            let problem = parse_line(line.as_bytes()).map(|_| ()).map_err(|e| e.to_string()).expect_err(&line);
            assert!(problem.contains(needle), "{line}: {problem}");
        }
        assert_eq!(parse_line(b"{\"seq\":\xff}").unwrap_err(), LineProblem::NotUtf8);
        // Deep nesting in an event's fields is skipped without recursion: no stack overflow.
        let deep = format!(
            r#"{{"seq":0,"time":"{time}","event":"stopped","x":{}0{},"prev":"{prev}"}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(parse_line(deep.as_bytes()).unwrap().seq, 0);
    }

    #[test]
    fn anchors_parse_as_head_prints_them() {
        let hash = "ab".repeat(32);
        let anchor: Anchor = format!("41:{}", hash.to_uppercase()).parse().unwrap();
        assert_eq!(anchor, Anchor { seq: 41, hash: hash.clone() });
        assert_eq!(anchor.to_string(), format!("41:{hash}"));
        for bad in ["41", "x:00", "41:abc", &format!("-1:{hash}"), &format!("41:{}", "g".repeat(64))] {
            assert!(bad.parse::<Anchor>().is_err(), "{bad}");
        }
    }
}
