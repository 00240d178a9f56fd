//! A whole export from fuzzer bytes, read with `read_export`.
//!
//! The input is a grantee line, then files, each introduced by a header line as `head` prints them:
//!
//! ```text
//! sealgate-vectors
//! ==> associations.toml <==
//! format = "custody-associations/v1"
//! …
//! ==> grants/g-1.toml <==
//! …
//! ==> certificates/c-1/certificate.pem <==
//! …
//! ```
//!
//! Paths are relative to the export, at most four components of `[A-Za-z0-9._-]` (no `.` or `..`); others are
//! skipped. `read_export` must return an error or a snapshot with one outcome per entry, each refusal labelled
//! with its check and a reason, and no message or `Debug` output may contain a grant key or a data key (in
//! base64 or hex), nor a served private key.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sealgate::custody::format::{encode_base64, Associations, Grant};
use sealgate::custody::seal::{data_key_aad, unwrap_data_key};
use sealgate::custody::snapshot::{read_export, GrantStatus, Verdict};
use time::macros::datetime;

const MAX_FILES: usize = 32;

/// Splits the input into the grantee and `(path, contents)` files.
fn files(data: &[u8]) -> (String, Vec<(String, &[u8])>) {
    let mut headers = Vec::new();
    let mut at = 0;
    while let Some(found) = find(&data[at..], b"==> ") {
        let start = at + found;
        if start == 0 || data[start - 1] == b'\n' {
            headers.push(start);
        }
        at = start + 4;
    }
    let grantee_end = headers.first().copied().unwrap_or(data.len());
    let grantee = String::from_utf8_lossy(&data[..grantee_end]).trim().to_owned();
    let grantee = if grantee.is_empty() { "sealgate-vectors".to_owned() } else { grantee };
    let mut files = Vec::new();
    for (i, &start) in headers.iter().enumerate() {
        let end = headers.get(i + 1).copied().unwrap_or(data.len());
        let section = &data[start + 4..end];
        let (header, contents) = match find(section, b"\n") {
            Some(newline) => (&section[..newline], &section[newline + 1..]),
            None => (section, &section[section.len()..]),
        };
        let Some(path) = std::str::from_utf8(header).ok().and_then(|h| h.strip_suffix(" <==")) else { continue };
        if safe_path(path) && files.len() < MAX_FILES {
            files.push((path.to_owned(), contents));
        }
    }
    (grantee, files)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn safe_path(path: &str) -> bool {
    let components: Vec<&str> = path.split('/').collect();
    components.len() <= 4
        && components.iter().all(|c| {
            !c.is_empty()
                && *c != "."
                && *c != ".."
                && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The secrets the export holds, as text that must never appear in a message: every grant key that parses and
/// every data key that unwraps, in base64 and hex. A secret whose base64 the input repeats elsewhere (the
/// fuzzer copied it into another field, which messages may name) is left out.
fn secrets(data: &[u8], files: &[(String, &[u8])]) -> Vec<String> {
    let mut grants = Vec::new();
    for (path, contents) in files {
        let Some(id) = path.strip_prefix("grants/").and_then(|p| p.strip_suffix(".toml")) else { continue };
        if let Ok(grant) = Grant::parse(contents, id) {
            grants.push(grant);
        }
    }
    let mut keys = Vec::new();
    let associations = files.iter().rev().find(|(path, _)| path == "associations.toml");
    if let Some(Ok(associations)) = associations.map(|(_, contents)| Associations::parse(contents)) {
        for entry in &associations.entries {
            for grant in grants.iter().filter(|g| g.grant_id == entry.grant_id) {
                let (Some(grant_key), Ok(wrapped)) = (&grant.grant_key, entry.wrapped_data_key()) else { continue };
                let aad = data_key_aad(&grant.grant_id, &entry.certificate_id, &grant.key_id);
                if let Ok(data_key) = unwrap_data_key(grant_key, &wrapped, &aad) {
                    keys.push(data_key.expose().to_vec());
                }
            }
        }
    }
    keys.extend(grants.iter().filter_map(|g| g.grant_key.as_ref()).map(|k| k.expose().to_vec()));
    let mut texts = Vec::new();
    for key in keys {
        let base64 = encode_base64(&key);
        if find(data, base64.as_bytes()).is_some_and(|first| find(&data[first + 1..], base64.as_bytes()).is_some()) {
            continue;
        }
        texts.push(base64.trim_end_matches('=').to_owned());
        texts.push(hex(&key));
        texts.push(hex(&key).to_uppercase());
    }
    texts
}

fn assert_secret_free(what: &str, text: &str, secrets: &[String]) {
    for secret in secrets {
        assert!(!text.contains(secret.as_str()), "{what} contains key material: {text}");
    }
}

fuzz_target!(|data: &[u8]| {
    let (grantee, files) = files(data);
    let Ok(dir) = tempfile::tempdir() else { return };
    let export = dir.path().join("export");
    if std::fs::create_dir(&export).is_err() {
        return;
    }
    for (path, contents) in &files {
        let path = export.join(path);
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = std::fs::write(&path, contents);
    }
    let mut secrets = secrets(data, &files);

    let now = datetime!(2027-01-01 00:00:00 UTC);
    match read_export(&export, &grantee, now) {
        Err(error) => {
            let message = error.to_string();
            assert!(!message.is_empty());
            assert_secret_free("an export error", &message, &secrets);
            assert_secret_free("an export error", &format!("{error:?}"), &secrets);
        }
        Ok(snapshot) => {
            let contents = files.iter().rev().find(|(path, _)| path == "associations.toml").map(|(_, c)| *c);
            // An absent associations.toml associates nothing; one that exists must have parsed.
            let entries = match contents {
                None => Some(0),
                Some(c) => Associations::parse(c).ok().map(|a| a.entries.len()),
            };
            assert_eq!(Some(snapshot.associations.len()), entries, "one outcome per [[association]]");
            let mut texts = Vec::new();
            for outcome in &snapshot.associations {
                match &outcome.result {
                    Verdict::Refused(refusal) => {
                        assert!(!refusal.reason.is_empty(), "a refusal without a reason");
                        assert!(!refusal.check.label().is_empty(), "a refusal without a check label");
                        assert!(outcome.outcome().starts_with("refused: "));
                        assert!(outcome.outcome().ends_with(&format!("({})", refusal.check.label())));
                        texts.push(refusal.to_string());
                    }
                    // A fresh read knows of no served generation: nothing can be found unchanged.
                    Verdict::Unchanged => panic!("unchanged in a fresh read"),
                    Verdict::Served(verified) => {
                        assert!(!verified.server_names.is_empty(), "served for no name");
                        assert!(!verified.chain.is_empty());
                        assert!(!verified.private_key.is_empty());
                        let grant = snapshot.grants.get(&verified.grant_id);
                        assert!(
                            matches!(grant, Some(GrantStatus::Active { grantee: g, .. }) if *g == grantee),
                            "served under a grant that is not active for this holder"
                        );
                        let pkcs8 = verified.private_key.expose();
                        secrets.push(encode_base64(pkcs8).trim_end_matches('=').to_owned());
                        secrets.push(hex(pkcs8));
                    }
                }
            }
            for status in snapshot.grants.values() {
                if let GrantStatus::Unreadable(message) = status {
                    assert!(!message.is_empty());
                    texts.push(message.clone());
                }
            }
            texts.push(format!("{snapshot:?}"));
            for text in &texts {
                assert_secret_free("a refusal, a grant status or the snapshot's Debug", text, &secrets);
            }
        }
    }
    drop(dir);
});
