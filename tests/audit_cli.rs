//! `sealgate audit verify` and `sealgate audit head` as a security team runs them: the built binary on a log
//! written by the library.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sealgate::audit::{verify, AuditEvent, AuditLog};
use tempfile::TempDir;

/// A log of `n` records in `dir`.
fn log(dir: &TempDir, n: u64) -> PathBuf {
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path).unwrap();
    log.record(AuditEvent::started(Path::new("/srv/export"), "edge")).unwrap();
    for count in 1..n {
        log.record(AuditEvent::ConnectionsClosed { grant_id: "g-1", count }).unwrap();
    }
    path
}

fn sealgate(args: &[&str], file: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sealgate")).arg("audit").args(args).arg(file).output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

fn edit_lines(path: &Path, edit: impl FnOnce(&mut Vec<String>)) {
    let mut lines: Vec<String> = std::fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect();
    edit(&mut lines);
    std::fs::write(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

#[test]
fn an_intact_log_verifies_with_its_last_seq_and_hash() {
    let dir = TempDir::new().unwrap();
    let path = log(&dir, 3);
    let output = sealgate(&["verify"], &path);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let hash = verify(&path).unwrap().last_hash;
    assert_eq!(stdout(&output), format!("ok: 3 records, chain intact, last seq 2 hash {hash}\n"));
    assert!(output.stderr.is_empty());

    let dir = TempDir::new().unwrap();
    let output = sealgate(&["verify"], &log(&dir, 1));
    assert!(stdout(&output).starts_with("ok: 1 record, chain intact, last seq 0 hash "), "{}", stdout(&output));
}

#[test]
fn an_empty_log_verifies_but_has_no_head() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("audit.jsonl");
    drop(AuditLog::open(&path).unwrap());
    let output = sealgate(&["verify"], &path);
    assert_eq!((output.status.code(), stdout(&output).as_str()), (Some(0), "ok: 0 records, the log is empty\n"));
    let output = sealgate(&["head"], &path);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stderr(&output), format!("{}: the log is empty\n", path.display()));
}

#[test]
fn a_broken_chain_exits_1_naming_the_file_and_line() {
    let dir = TempDir::new().unwrap();
    let path = log(&dir, 5);
    edit_lines(&path, |lines| {
        lines[2] = lines[2].replace(r#""count":2"#, r#""count":3"#);
    });
    let output = sealgate(&["verify"], &path);
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty(), "{}", stdout(&output));
    let message = stderr(&output);
    assert!(message.starts_with(&format!("{}:4: seq 3: broken link: ", path.display())), "{message}");
    assert!(message.contains("that line was altered"), "{message}");
    assert_eq!(message.lines().count(), 1, "{message}");

    edit_lines(&path, |lines| {
        lines.remove(1);
    });
    let message = stderr(&sealgate(&["verify"], &path));
    assert!(message.starts_with(&format!("{}:2: seq 2: seq gap: expected seq 1", path.display())), "{message}");

    std::fs::write(&path, "not json\n").unwrap();
    let output = sealgate(&["verify"], &path);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).starts_with(&format!("{}:1: not a valid record: ", path.display())), "{}", stderr(&output));
}

#[test]
fn an_unreadable_file_exits_2() {
    let dir = TempDir::new().unwrap();
    let absent = dir.path().join("absent.jsonl");
    for command in ["verify", "head"] {
        let output = sealgate(&[command], &absent);
        assert_eq!(output.status.code(), Some(2), "{command}");
        assert!(stderr(&output).starts_with(&format!("{}: cannot open: ", absent.display())), "{}", stderr(&output));
        let output = sealgate(&[command], dir.path());
        assert_eq!(output.status.code(), Some(2), "{command}");
        assert!(stderr(&output).contains("is not a regular file"), "{}", stderr(&output));
    }
}

#[test]
fn head_prints_an_anchor_that_verify_checks() {
    let dir = TempDir::new().unwrap();
    let path = log(&dir, 4);
    let output = sealgate(&["head"], &path);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let anchor = stdout(&output).trim_end().to_owned();
    assert_eq!(anchor, format!("3:{}", verify(&path).unwrap().last_hash));

    // Later records do not disturb an anchor.
    AuditLog::open(&path).unwrap().record(AuditEvent::Stopped).unwrap();
    let output = sealgate(&["verify", "--anchor", &anchor], &path);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stdout(&output).starts_with("ok: 5 records, chain intact, last seq 4 hash "), "{}", stdout(&output));
    assert!(stdout(&output).ends_with(", 1 anchor matches\n"), "{}", stdout(&output));

    // Cutting records off the end keeps a valid chain; the anchor shows it.
    edit_lines(&path, |lines| lines.truncate(2));
    assert_eq!(sealgate(&["verify"], &path).status.code(), Some(0));
    let output = sealgate(&["verify", "--anchor", &anchor], &path);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr(&output),
        format!(
            "{}: an anchor names seq 3 but the log ends at seq 1: records were removed from its end\n",
            path.display()
        )
    );
}

#[test]
fn head_refuses_a_broken_log() {
    let dir = TempDir::new().unwrap();
    let path = log(&dir, 3);
    edit_lines(&path, |lines| lines.swap(0, 1));
    let output = sealgate(&["head"], &path);
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    assert!(stderr(&output).starts_with(&format!("{}:1: ", path.display())), "{}", stderr(&output));
}

#[test]
fn a_malformed_anchor_is_a_usage_error() {
    let dir = TempDir::new().unwrap();
    let path = log(&dir, 1);
    let output = sealgate(&["verify", "--anchor", "3:nothex"], &path);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("64 hexadecimal digits"), "{}", stderr(&output));
}

#[test]
fn help_explains_the_commands() {
    let help = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_sealgate")).args(args).output().unwrap();
        assert_eq!(output.status.code(), Some(0), "{args:?}");
        stdout(&output)
    };
    let audit = help(&["audit", "--help"]);
    assert!(audit.contains("verify") && audit.contains("head"), "{audit}");
    let verify = help(&["audit", "verify", "--help"]);
    assert!(verify.contains("--anchor <SEQ:HASH>") && verify.contains("cut off"), "{verify}");
    assert!(help(&["--help"]).contains("audit"));
}
