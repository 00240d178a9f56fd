use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;

use tempfile::TempDir;
use time::macros::datetime;

use super::*;
use crate::custody::snapshot::reason;
use crate::keyring::Keyring;
use crate::test_util;

fn log_path(dir: &TempDir) -> PathBuf {
    dir.path().join("audit.jsonl")
}

/// A log of `n` `connections_closed` records (count = seq), closed again.
fn write_log(path: &Path, n: u64) {
    let log = AuditLog::open(path).unwrap();
    for count in 0..n {
        log.record(AuditEvent::ConnectionsClosed { grant_id: "g-1", count }).unwrap();
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

/// The line and problem of the first broken link.
fn broken(path: &Path) -> (u64, Option<u64>, LineProblem) {
    match verify(path) {
        Err(AuditError::Broken { line, seq, problem, .. }) => (line, seq, problem),
        other => panic!("expected a broken chain, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Writing and reopening.

#[test]
fn a_written_log_verifies() {
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    write_log(&path, 5);
    let report = verify(&path).unwrap();
    let lines = lines(&path);
    assert_eq!(report.records, 5);
    assert_eq!(report.last_seq, Some(4));
    assert_eq!(report.last_hash, line_hash(lines[4].as_bytes()));
    assert!(lines[0].ends_with(&format!(r#""prev":"{GENESIS_PREV}"}}"#)), "{}", lines[0]);
    for pair in lines.windows(2) {
        assert!(pair[1].ends_with(&format!(r#""prev":"{}"}}"#, line_hash(pair[0].as_bytes()))), "{}", pair[1]);
    }
}

#[test]
fn an_empty_log_verifies_with_no_record() {
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    drop(AuditLog::open(&path).unwrap());
    let report = verify(&path).unwrap();
    assert_eq!(
        report,
        VerifyReport { records: 0, continued_from: None, last_seq: None, last_hash: GENESIS_PREV.to_owned() }
    );
    assert!(matches!(head(&[&path]), Err(AuditError::Empty { .. })));
}

#[test]
fn reopening_continues_the_chain() {
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    write_log(&path, 2);
    let log = AuditLog::open(&path).unwrap();
    assert_eq!(log.next_seq(), 2);
    log.record(AuditEvent::Stopped).unwrap();
    drop(log);
    let lines = lines(&path);
    assert!(lines[2].starts_with(r#"{"seq":2,"#), "{}", lines[2]);
    assert!(lines[2].ends_with(&format!(r#""prev":"{}"}}"#, line_hash(lines[1].as_bytes()))), "{}", lines[2]);
    assert_eq!(verify(&path).unwrap().records, 3);
}

/// An empty file (as a log rotator's `create` leaves one) starts a new chain.
#[test]
fn an_existing_empty_file_starts_the_chain() {
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    std::fs::write(&path, "").unwrap();
    AuditLog::open(&path).unwrap().record(AuditEvent::Stopped).unwrap();
    assert_eq!(verify(&path).unwrap().records, 1);
}

#[test]
fn a_new_log_is_created_0600() {
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    drop(AuditLog::open(&path).unwrap());
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777, 0o600);
}

#[test]
fn a_world_writable_log_is_refused() {
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    write_log(&path, 1);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let error = AuditLog::open(&path).unwrap_err();
    assert!(matches!(error, AuditError::WorldWritable { mode: 0o666, .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.starts_with(&path.display().to_string()) && message.contains("world-writable"), "{message}");
    // Group-writable is the operator's choice.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660)).unwrap();
    assert_eq!(AuditLog::open(&path).unwrap().next_seq(), 1);
}

#[test]
fn a_directory_is_not_a_log() {
    let dir = TempDir::new().unwrap();
    assert!(AuditLog::open(dir.path()).is_err());
    assert!(matches!(verify(dir.path()), Err(AuditError::NotAFile { .. })));
    assert!(matches!(verify(&dir.path().join("absent")), Err(AuditError::Io { .. })));
}

/// The log as it is, then `tail` appended: what `AuditLog::open` says about it.
fn reopen_with_tail(tail: &[u8]) -> AuditError {
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    write_log(&path, 3);
    std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(tail).unwrap();
    let error = AuditLog::open(&path).unwrap_err();
    assert!(error.to_string().starts_with(&format!("{}:4: ", path.display())), "{error}");
    error
}

#[test]
fn reopening_refuses_a_last_line_that_is_not_a_record() {
    for tail in [&b"garbage\n"[..], b"\n", b"{\"seq\":3}\n", b"\xff\xfe\n"] {
        let error = reopen_with_tail(tail);
        assert!(matches!(error, AuditError::Broken { line: 4, .. }), "{error:?}");
    }
    let error = reopen_with_tail(br#"{"seq":3,"time":"2026-05-01T09:00:00.000000Z","event":"stop"#);
    assert!(matches!(error, AuditError::Broken { problem: LineProblem::Unterminated, .. }), "{error:?}");
}

#[test]
fn reopening_refuses_a_last_seq_that_cannot_be_followed() {
    let line = format!(
        r#"{{"seq":{},"time":"2026-05-01T09:00:00.000000Z","event":"stopped","prev":"{GENESIS_PREV}"}}"#,
        u64::MAX
    );
    let error = reopen_with_tail(format!("{line}\n").as_bytes());
    assert!(matches!(error, AuditError::Broken { problem: LineProblem::SeqOverflow, .. }), "{error:?}");
}

#[test]
fn reopening_refuses_an_over_long_last_line() {
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    write_log(&path, 2);
    let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    file.write_all(&vec![b'x'; MAX_LINE_BYTES + 10]).unwrap();
    file.write_all(b"\n").unwrap();
    let error = AuditLog::open(&path).unwrap_err();
    assert!(matches!(error, AuditError::Broken { line: 3, problem: LineProblem::TooLong, .. }), "{error:?}");
    assert!(matches!(verify(&path), Err(AuditError::Broken { line: 3, problem: LineProblem::TooLong, .. })));
}

#[test]
fn reopening_reads_a_last_line_longer_than_one_chunk() {
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    let names: Vec<String> = (0..2000).map(|i| format!("host-{i}.example.test")).collect();
    let log = AuditLog::open(&path).unwrap();
    log.record(AuditEvent::Stopped).unwrap();
    log.record(AuditEvent::AssociationServed {
        certificate_id: "c-many",
        grant_id: "g-1",
        generation: 1,
        server_names: &names,
        not_after: datetime!(2030-01-01 0:00 UTC),
    })
    .unwrap();
    drop(log);
    assert!(lines(&path)[1].len() > 3 * 8192);
    let log = AuditLog::open(&path).unwrap();
    assert_eq!(log.next_seq(), 2);
    log.record(AuditEvent::Stopped).unwrap();
    assert_eq!(verify(&path).unwrap().records, 3);
}

// ---------------------------------------------------------------------------------------------------------------
// Tampering.

#[test]
fn editing_any_byte_of_a_middle_line_breaks_the_chain_at_that_line_or_the_next() {
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    write_log(&path, 5);
    let original = std::fs::read(&path).unwrap();
    let start = original.iter().enumerate().filter(|(_, &b)| b == b'\n').nth(1).unwrap().0 + 1;
    let end = start + original[start..].iter().position(|&b| b == b'\n').unwrap();
    for at in start..end {
        for flip in [0x01, 0x20] {
            let mut edited = original.clone();
            edited[at] ^= flip;
            std::fs::write(&path, &edited).unwrap();
            let (line, _, problem) = broken(&path);
            let what = format!("byte {} ^ {flip:#x}: line {line}: {problem}", at - start);
            match line {
                3 => {}
                4 => assert!(matches!(problem, LineProblem::PrevMismatch { .. }), "{what}"),
                _ => panic!("{what}"),
            }
        }
    }
}

#[test]
fn editing_a_value_without_breaking_the_json_is_caught_by_the_next_line() {
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    write_log(&path, 5);
    let mut lines = lines(&path);
    lines[2] = lines[2].replace(r#""count":2"#, r#""count":0"#);
    write_lines(&path, &lines);
    let (line, seq, problem) = broken(&path);
    assert_eq!((line, seq), (4, Some(3)));
    assert!(matches!(problem, LineProblem::PrevMismatch { .. }), "{problem}");
}

#[test]
fn deleting_a_line_breaks_the_chain_there() {
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    write_log(&path, 5);
    let mut lines = lines(&path);
    lines.remove(2);
    write_lines(&path, &lines);
    assert_eq!(broken(&path), (3, Some(3), LineProblem::UnexpectedSeq { expected: 2, found: 3 }));
    assert!(broken(&path).2.to_string().contains("seq gap"));
}

#[test]
fn deleting_the_first_line_breaks_the_chain_at_line_1() {
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    write_log(&path, 3);
    let lines = lines(&path);
    write_lines(&path, &lines[1..]);
    assert_eq!(broken(&path), (1, Some(1), LineProblem::UnexpectedSeq { expected: 0, found: 1 }));
}

#[test]
fn swapping_two_lines_breaks_the_chain_at_the_first() {
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    write_log(&path, 5);
    let mut lines = lines(&path);
    lines.swap(2, 3);
    write_lines(&path, &lines);
    assert_eq!(broken(&path), (3, Some(3), LineProblem::UnexpectedSeq { expected: 2, found: 3 }));
}

/// A record as a forger would write it: linked to `previous`.
fn forged(seq: u64, previous: &str) -> String {
    let event = AuditEvent::KeyZeroized { certificate_id: "c-1", grant_id: "g-1", generation: 1 };
    let line = encode_line(seq, "2026-05-01T09:00:00.000000Z", &event, &line_hash(previous.as_bytes())).unwrap();
    String::from_utf8(line).unwrap()
}

#[test]
fn inserting_a_forged_line_breaks_the_chain_after_it() {
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    write_log(&path, 5);
    let mut lines = lines(&path);
    let forgery = forged(2, &lines[1]);
    lines.insert(2, forgery);
    write_lines(&path, &lines);
    // The forgery itself links; the record it displaced does not.
    assert_eq!(broken(&path), (4, Some(2), LineProblem::UnexpectedSeq { expected: 3, found: 2 }));

    // Renumbering the records after it does not help: their hashes name the old lines.
    for (seq, line) in lines.iter_mut().enumerate().skip(3) {
        *line = line.replacen(&format!(r#"{{"seq":{}"#, seq - 1), &format!(r#"{{"seq":{seq}"#), 1);
    }
    write_lines(&path, &lines);
    let (line, seq, problem) = broken(&path);
    assert_eq!((line, seq), (4, Some(3)));
    assert!(matches!(problem, LineProblem::PrevMismatch { .. }), "{problem}");
}

#[test]
fn a_first_record_that_does_not_start_the_chain_is_refused() {
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    write_lines(&path, &[forged(0, "something before")]);
    let (line, _, problem) = broken(&path);
    assert_eq!(line, 1);
    assert!(problem.to_string().contains("64 zeros"), "{problem}");
}

// ---------------------------------------------------------------------------------------------------------------
// Rotation.

fn connections_closed(log: &AuditLog, count: u64) {
    log.record(AuditEvent::ConnectionsClosed { grant_id: "g-1", count }).unwrap();
}

#[test]
fn a_log_moved_aside_goes_on_in_a_new_file_that_continues_the_chain() {
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    let rotated = dir.path().join("audit.jsonl.1");
    let log = AuditLog::open(&path).unwrap();
    (0..3).for_each(|n| connections_closed(&log, n));
    assert_eq!(log.reopen().unwrap(), Reopened::Unchanged, "nothing moved: nothing to do");
    assert_eq!(lines(&path).len(), 3);

    std::fs::rename(&path, &rotated).unwrap();
    connections_closed(&log, 3); // before the signal: still in the moved file
    assert_eq!(log.reopen().unwrap(), Reopened::Continued { seq: 4, reason: "reopened" });
    connections_closed(&log, 5);
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let new = lines(&path);
    assert!(new[0].starts_with(r#"{"seq":4,"#) && new[0].contains(r#""event":"log_continued","reason":"reopened""#));
    assert!(new[0].ends_with(&format!(r#""prev":"{}"}}"#, line_hash(lines(&rotated)[3].as_bytes()))));

    let alone = verify(&path).unwrap();
    assert_eq!((alone.records, alone.continued_from, alone.last_seq), (2, Some(4), Some(5)));
    let both = verify_files(&[&rotated, &path], &[]).unwrap();
    assert_eq!((both.records, both.continued_from, both.last_seq), (6, None, Some(5)));
    assert_eq!(both.last_hash, alone.last_hash);
    // Out of order, or with a file missing in between, the files are not one chain.
    let error = verify_files(&[&path, &rotated], &[]).unwrap_err();
    assert!(matches!(error, AuditError::Broken { line: 1, seq: Some(0), .. }), "{error:?}");

    // An anchor in the older file needs that file.
    let anchor = Anchor { seq: 1, hash: line_hash(lines(&rotated)[1].as_bytes()) };
    let error = verify_anchored(&path, std::slice::from_ref(&anchor)).unwrap_err();
    assert!(matches!(error, AuditError::AnchorBeforeStart { anchored: 1, first_seq: 4, .. }), "{error}");
    assert_eq!(verify_files(&[&rotated, &path], &[anchor]).unwrap().records, 6);
}

#[test]
fn a_log_reopens_into_the_empty_file_a_rotation_left_but_not_into_one_with_content() {
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    let log = AuditLog::open(&path).unwrap();
    connections_closed(&log, 0);
    std::fs::rename(&path, dir.path().join("old")).unwrap();
    std::fs::write(&path, "not ours\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let error = log.reopen().unwrap_err();
    assert!(matches!(error, AuditError::ReopenOccupied { len: 9, .. }), "{error:?}");
    assert!(error.to_string().contains("records still go to the file sealgate had open"), "{error}");
    connections_closed(&log, 1);
    assert_eq!(lines(&dir.path().join("old")).len(), 2, "the records go on in the file it had");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "not ours\n", "the other file is left alone");

    std::fs::write(&path, "").unwrap(); // logrotate's `create`
    assert_eq!(log.reopen().unwrap(), Reopened::Continued { seq: 2, reason: "reopened" });
    connections_closed(&log, 3);
    assert_eq!(verify_files(&[dir.path().join("old"), path.clone()], &[]).unwrap().records, 4);
}

#[test]
fn a_log_cut_under_the_writer_begins_again_with_a_continuation() {
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    let log = AuditLog::open(&path).unwrap();
    (0..3).for_each(|n| connections_closed(&log, n));
    // logrotate's `copytruncate`: the copy keeps the records, the file is cut to nothing.
    let copy = dir.path().join("audit.jsonl.1");
    std::fs::copy(&path, &copy).unwrap();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(0).unwrap();
    // The next record notices, without any signal.
    connections_closed(&log, 3);
    let cut = lines(&path);
    assert_eq!(cut.len(), 2);
    assert!(cut[0].starts_with(r#"{"seq":3,"#) && cut[0].contains(r#""reason":"truncated""#), "{}", cut[0]);
    assert_eq!(verify(&path).unwrap().continued_from, Some(3));
    assert_eq!(verify_files(&[&copy, &path], &[]).unwrap().records, 5);
    // Cut again, then signalled before any record: the reopen writes the continuation.
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(0).unwrap();
    assert_eq!(log.reopen().unwrap(), Reopened::Continued { seq: 5, reason: "truncated" });
    assert_eq!(verify(&path).unwrap().continued_from, Some(5));
}

#[test]
fn only_a_continuation_may_begin_a_file_mid_chain() {
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    let log = AuditLog::open(&path).unwrap();
    (0..3).for_each(|n| connections_closed(&log, n));
    std::fs::rename(&path, dir.path().join("old")).unwrap();
    log.reopen().unwrap();
    (4..7).for_each(|n| connections_closed(&log, n));
    // Deleting the continuation record leaves a file that begins mid-chain with an ordinary record.
    let lines = lines(&path);
    write_lines(&path, &lines[1..]);
    assert_eq!(broken(&path), (1, Some(4), LineProblem::UnexpectedSeq { expected: 0, found: 4 }));
}

#[test]
fn a_torn_last_line_is_reported() {
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    write_log(&path, 3);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() - 10);
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(broken(&path), (3, None, LineProblem::Unterminated));

    // Only the newline is missing: the record is whole, but nothing may be appended to it.
    let path = dir.path().join("whole.jsonl");
    write_log(&path, 3);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.pop();
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(broken(&path), (3, Some(2), LineProblem::Unterminated));
    let error = AuditLog::open(&path).unwrap_err();
    assert!(matches!(error, AuditError::Broken { line: 3, problem: LineProblem::Unterminated, .. }), "{error:?}");
}

/// What a bare chain cannot see, and anchors can.
#[test]
fn truncation_and_a_rewritten_tail_pass_the_chain_but_not_an_anchor() {
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    write_log(&path, 5);
    let anchor = head(&[&path]).unwrap();
    assert_eq!(anchor.seq, 4);
    assert_eq!(verify_anchored(&path, std::slice::from_ref(&anchor)).unwrap().records, 5);

    let lines = lines(&path);
    write_lines(&path, &lines[..3]);
    assert_eq!(verify(&path).unwrap().records, 3);
    let error = verify_anchored(&path, std::slice::from_ref(&anchor)).unwrap_err();
    assert!(matches!(error, AuditError::Truncated { anchored: 4, last_seq: Some(2), .. }), "{error:?}");

    let mut rewritten = lines[..3].to_vec();
    rewritten.push(forged(3, &rewritten[2]));
    rewritten.push(forged(4, &rewritten[3]));
    write_lines(&path, &rewritten);
    assert_eq!(verify(&path).unwrap().records, 5);
    let error = verify_anchored(&path, &[anchor]).unwrap_err();
    assert!(
        matches!(error, AuditError::Broken { line: 5, seq: Some(4), problem: LineProblem::AnchorMismatch { .. }, .. }),
        "{error:?}"
    );
}

#[test]
fn control_characters_in_fields_stay_on_one_line() {
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    let refusal = Refusal::new(Check::Files, reason::CERTIFICATE_FILE, "a\nb\r\u{2028}\"\u{0}");
    AuditLog::open(&path).unwrap().record(AuditEvent::refused("c-1\n", "g-1", &refusal)).unwrap();
    assert_eq!(lines(&path).len(), 1);
    assert_eq!(verify(&path).unwrap().records, 1);
    let value: serde_json::Value = serde_json::from_str(&lines(&path)[0]).unwrap();
    assert_eq!(value["detail"], "a\nb\r\u{2028}\"\u{0}");
}

#[test]
fn concurrent_writers_keep_the_chain_intact() {
    const THREADS: u64 = 8;
    const EACH: u64 = 40;
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    let log = Arc::new(AuditLog::open(&path).unwrap());
    let grants: Vec<String> = (0..THREADS).map(|t| format!("g-{t}")).collect();
    std::thread::scope(|scope| {
        for grant in &grants {
            let log = Arc::clone(&log);
            scope.spawn(move || {
                for count in 0..EACH {
                    log.record(AuditEvent::ConnectionsClosed { grant_id: grant, count }).unwrap();
                }
            });
        }
    });
    assert_eq!(verify(&path).unwrap().records, THREADS * EACH);
    // Every thread's records are there, each in its own order.
    for grant in &grants {
        let counts: Vec<u64> = lines(&path)
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["grant_id"] == grant.as_str())
            .map(|v| v["count"].as_u64().unwrap())
            .collect();
        assert_eq!(counts, (0..EACH).collect::<Vec<_>>(), "{grant}");
    }
}

#[test]
fn times_have_microseconds_in_utc() {
    assert_eq!(timestamp(datetime!(2026-05-01 11:00:00.5 +2)), "2026-05-01T09:00:00.500000Z");
    assert_eq!(timestamp(datetime!(2026-05-01 9:00:00.000_001_999 UTC)), "2026-05-01T09:00:00.000001Z");
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    write_log(&path, 1);
    let value: serde_json::Value = serde_json::from_str(&lines(&path)[0]).unwrap();
    let time = value["time"].as_str().unwrap();
    assert_eq!((time.len(), &time[19..20], &time[26..]), (27, ".", "Z"), "{time}");
    assert!(OffsetDateTime::parse(time, &Rfc3339).is_ok(), "{time}");
}

// ---------------------------------------------------------------------------------------------------------------
// Events.

const TIME: &str = "2026-05-01T09:00:00.012345Z";

fn json(event: &AuditEvent<'_>) -> String {
    String::from_utf8(encode_line(7, TIME, event, GENESIS_PREV).unwrap()).unwrap()
}

/// The JSON of one of each event between `"time"` and `"prev"`, in the order of [`every_event`].
const EVENT_SNAPSHOT: &str = r#"
"event":"started","version":"0.1.0","export":"/srv/export","grantee":"edge"
"event":"grant_seen","grant_id":"g-1","grantee":"edge","not_after":"2030-01-01T00:00:00Z"
"event":"grant_seen","grant_id":"g-1","grantee":"edge","not_after":null
"event":"association_served","certificate_id":"c-1","grant_id":"g-1","generation":3,"server_names":["a.example.test","*.example.test"],"not_after":"2030-01-01T00:00:00Z"
"event":"association_refused","certificate_id":"c-2","grant_id":"g-2","check":"check 3","reason":"the wrapped data key does not open","detail":"grants/g-2.toml: tag does not verify"
"event":"association_kept","certificate_id":"c-1","grant_id":"g-1","generation":3,"check":"files","reason":"the certificate file is unusable","detail":""
"event":"key_loaded","certificate_id":"c-1","grant_id":"g-1","generation":3,"public_key_sha256":"abababababababababababababababababababababababababababababababab"
"event":"key_zeroized","certificate_id":"c-1","grant_id":"g-1","generation":3
"event":"certificate_swapped","certificate_id":"c-1","from_generation":3,"to_generation":4
"event":"certificate_removed","certificate_id":"c-1","generation":4
"event":"grant_retired","grant_id":"g-1","reason":"retired","certificates":["c-1","c-3"],"latency_us":1234
"event":"grant_retired","grant_id":"g-1","reason":"gone","certificates":[],"latency_us":null
"event":"connections_closed","grant_id":"g-1","count":12
"event":"stopped"
"event":"log_continued","reason":"reopened"
"#;

/// Every event, optional fields both present and absent.
fn every_event<'a>(names: &'a [String], refusal: &'a Refusal) -> Vec<AuditEvent<'a>> {
    let not_after = datetime!(2030-01-01 0:00 UTC);
    vec![
        AuditEvent::Started { version: "0.1.0", export: Path::new("/srv/export"), grantee: "edge" },
        AuditEvent::GrantSeen { grant_id: "g-1", grantee: "edge", not_after: Some(not_after) },
        AuditEvent::GrantSeen { grant_id: "g-1", grantee: "edge", not_after: None },
        AuditEvent::AssociationServed {
            certificate_id: "c-1",
            grant_id: "g-1",
            generation: 3,
            server_names: names,
            not_after,
        },
        AuditEvent::refused("c-2", "g-2", refusal),
        AuditEvent::AssociationKept {
            certificate_id: "c-1",
            grant_id: "g-1",
            generation: 3,
            check: Check::Files,
            reason: reason::CERTIFICATE_FILE,
            detail: "",
        },
        AuditEvent::KeyLoaded {
            certificate_id: "c-1",
            grant_id: "g-1",
            generation: 3,
            public_key_sha256: PublicKeyFingerprint([0xab; 32]),
        },
        AuditEvent::KeyZeroized { certificate_id: "c-1", grant_id: "g-1", generation: 3 },
        AuditEvent::CertificateSwapped { certificate_id: "c-1", from_generation: 3, to_generation: 4 },
        AuditEvent::CertificateRemoved { certificate_id: "c-1", generation: 4 },
        AuditEvent::GrantRetired {
            grant_id: "g-1",
            reason: GrantEnd::Retired,
            certificates: vec!["c-1", "c-3"],
            latency_us: Some(1234),
        },
        AuditEvent::GrantRetired { grant_id: "g-1", reason: GrantEnd::Gone, certificates: vec![], latency_us: None },
        AuditEvent::ConnectionsClosed { grant_id: "g-1", count: 12 },
        AuditEvent::Stopped,
        AuditEvent::LogContinued { reason: "reopened" },
    ]
}

/// One of each event, with its fields in order: the format security teams parse.
#[test]
fn every_event_serialises_with_its_fields_in_order() {
    let names = ["a.example.test".to_owned(), "*.example.test".to_owned()];
    let refusal = Refusal::new(Check::Seal, reason::DATA_KEY_SEAL, "grants/g-2.toml: tag does not verify");
    let events = every_event(&names, &refusal);
    let bodies: Vec<&str> = EVENT_SNAPSHOT.trim().lines().collect();
    assert_eq!(events.len(), bodies.len());
    for (event, body) in events.iter().zip(bodies) {
        let expected = format!(r#"{{"seq":7,"time":"{TIME}",{body},"prev":"{GENESIS_PREV}"}}"#);
        assert_eq!(json(event), expected);
        let tag = format!(r#""event":"{}""#, event.name());
        assert!(body == tag || body.starts_with(&format!("{tag},")), "{} is not {body}", event.name());
        assert_eq!(verify::parse_line(expected.as_bytes()).unwrap().seq, 7);
    }
    let names: HashSet<&str> = events.iter().map(AuditEvent::name).collect();
    assert_eq!(names.len(), 13, "one of each event: {names:?}");
}

/// The constructors take what the keyring reports, and nothing secret reaches the line.
#[test]
fn events_from_the_keyring_carry_ids_and_public_data_only() {
    let verified = test_util::verified("c-1", "g-1", &["a.example.test"]);
    let secret = hex(verified.private_key.expose());
    let spki = verified.signing_key.public_key().unwrap().into_owned();
    let mut keyring = Keyring::new("me");
    let report = keyring.apply(test_util::snapshot(&[("g-1", test_util::active())], vec![test_util::served(verified)]));
    let loaded = &report.loaded[0];
    let key = loaded.certified_key().unwrap();
    let fingerprint = PublicKeyFingerprint::of_signing_key(key.key.as_ref()).unwrap();
    assert_eq!(fingerprint, PublicKeyFingerprint::of_spki(&spki));
    assert_eq!(fingerprint.to_string(), hex(&sha256(spki.as_ref())));
    drop(key);

    let ended = keyring.end_grant("g-1", GrantEnd::Lapsed);
    let refusal = Refusal::new(Check::KeyMatch, reason::KEY_MISMATCH, "");
    let events = [
        AuditEvent::started(Path::new("/srv/export"), "me"),
        AuditEvent::served(loaded),
        AuditEvent::key_loaded(loaded, fingerprint),
        AuditEvent::kept(loaded, &refusal),
        AuditEvent::swapped(loaded, loaded),
        AuditEvent::removed(loaded),
        AuditEvent::key_zeroized(loaded),
        AuditEvent::grant_retired(&ended, Some(Duration::from_micros(2500))),
    ];
    let dir = TempDir::new().unwrap();
    let path = log_path(&dir);
    let log = AuditLog::open(&path).unwrap();
    for event in events {
        log.record(event).unwrap();
    }
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains(&secret) && !text.contains(&secret.to_uppercase()));
    let lines = lines(&path);
    assert!(lines[0].contains(&format!(r#""version":"{}""#, env!("CARGO_PKG_VERSION"))), "{}", lines[0]);
    assert!(lines[2].contains(&format!(r#""public_key_sha256":"{fingerprint}""#)), "{}", lines[2]);
    assert!(
        lines[7].contains(r#""grant_id":"g-1","reason":"lapsed","certificates":["c-1"],"latency_us":2500"#),
        "{}",
        lines[7]
    );
    assert_eq!(verify(&path).unwrap().records, 8);
}

#[test]
fn the_audit_handle_is_a_no_op_when_disabled() {
    let audit = Audit::open(None).unwrap();
    assert!(!audit.is_enabled() && audit.log().is_none());
    audit.record(AuditEvent::Stopped);

    let dir = TempDir::new().unwrap();
    let config = AuditConfig { path: log_path(&dir) };
    let audit = Audit::open(Some(&config)).unwrap();
    let copy = audit.clone();
    audit.record(AuditEvent::Stopped);
    copy.record(AuditEvent::Stopped);
    assert_eq!(verify(&config.path).unwrap().records, 2);
    assert!(Audit::open(Some(&AuditConfig { path: dir.path().join("absent/audit.jsonl") })).is_err());
}
