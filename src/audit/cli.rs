//! `sealgate audit verify` and `sealgate audit head`.
//!
//! Exit status: 0 when the chain is intact (and every anchor matches), 1 when it is broken, cut short before an
//! anchor, or (for `head`) empty, 2 when the file cannot be read. A failure is one line on stderr beginning with
//! `FILE:LINE:` when a line is at fault, so that editors and `grep` can jump to it.

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use super::{head, verify_files, Anchor, AuditError, VerifyReport};

/// Exit status of a broken chain.
const BROKEN: u8 = 1;
/// Exit status of an unreadable file.
const UNREADABLE: u8 = 2;

/// Runs `sealgate audit verify FILE... [--anchor SEQ:HASH]...` (a log's files oldest first).
pub fn verify_command<P: AsRef<Path>>(files: &[P], anchors: &[Anchor]) -> ExitCode {
    match verify_files(files, anchors) {
        Ok(report) => say(&summary(&report, anchors.len())),
        Err(error) => fail(&error),
    }
}

/// Runs `sealgate audit head FILE...`: prints `SEQ:HASH` of the last record of a verified log.
pub fn head_command<P: AsRef<Path>>(files: &[P]) -> ExitCode {
    match head(files) {
        Ok(anchor) => say(&anchor.to_string()),
        Err(error) => fail(&error),
    }
}

/// `ok: N records, chain intact, last seq S hash H`, and how many anchors matched when there were some.
fn summary(report: &VerifyReport, anchors: usize) -> String {
    let mut text = match report.last_seq {
        None => "ok: 0 records, the log is empty".to_owned(),
        Some(seq) => format!(
            "ok: {} record{}, chain intact, last seq {seq} hash {}",
            report.records,
            if report.records == 1 { "" } else { "s" },
            report.last_hash
        ),
    };
    if let Some(seq) = report.continued_from {
        text.push_str(&format!(
            ", continued from seq {} in an older file (give it first to check that link too)",
            seq.saturating_sub(1)
        ));
    }
    match anchors {
        0 => {}
        1 => text.push_str(", 1 anchor matches"),
        n => text.push_str(&format!(", {n} anchors match")),
    }
    text
}

/// Prints to stdout. Written rather than `println!`ed, which panics when stdout is closed.
fn say(text: &str) -> ExitCode {
    match writeln!(std::io::stdout().lock(), "{text}") {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::from(UNREADABLE),
    }
}

fn fail(error: &AuditError) -> ExitCode {
    let _ = writeln!(std::io::stderr().lock(), "{error}");
    ExitCode::from(match error {
        AuditError::Io { .. } | AuditError::NotAFile { .. } => UNREADABLE,
        _ => BROKEN,
    })
}
