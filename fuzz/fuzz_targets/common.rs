//! Oracles shared by the fuzz targets.

#![allow(dead_code)]

/// Runs of the base64 alphabet this long or longer are what a key looks like in a file: a grant key is 44
/// characters of base64, a wrapped data key 80, a data key in hex 64. No message should repeat one.
pub const KEY_LIKE_RUN: usize = 40;

/// Every maximal run of standard base64 characters (`A-Za-z0-9+/=`) in `input` at least [`KEY_LIKE_RUN`] long.
pub fn key_like_runs(input: &[u8]) -> Vec<&[u8]> {
    input
        .split(|b| !(b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/' || *b == b'='))
        .filter(|run| run.len() >= KEY_LIKE_RUN)
        .collect()
}

/// Panics when `message` repeats any key-like run of `input`: the parsers' errors never quote file contents.
pub fn assert_no_echo(input: &[u8], message: &str) {
    for run in key_like_runs(input) {
        // The run's first KEY_LIKE_RUN characters are enough to be key material.
        let head = &run[..KEY_LIKE_RUN];
        assert!(
            !message.as_bytes().windows(head.len()).any(|w| w == head),
            "an error message repeats {} characters of the file: {message}",
            head.len()
        );
    }
}

/// The id a file declares in `field = "…"` (a plain scan, not a TOML parse), so that inputs derived from real
/// files get past the "equals the file's name" rules and reach the rest of the parser; `fallback` otherwise.
pub fn declared_id(input: &[u8], field: &str, fallback: &str) -> String {
    let text = String::from_utf8_lossy(input);
    text.lines()
        .filter_map(|line| line.trim_start().strip_prefix(field))
        .filter_map(|rest| rest.trim_start().strip_prefix('='))
        .filter_map(|rest| rest.trim().strip_prefix('"')?.split('"').next().map(str::to_owned))
        .next()
        .unwrap_or_else(|| fallback.to_owned())
}
