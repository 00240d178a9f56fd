//! Robust parsing: property tests over mutated real files.
//!
//! The custody vectors (`tests/data/custody-vectors`) and the README's configuration reference are mutated the
//! way damaged, half-written or hand-edited files are (bytes flipped, files cut short, lines inserted, deleted
//! or repeated, values swapped between keys, base64 altered, files and ids swapped between files), and every
//! mutant must be refused cleanly: the parsers return `Ok` or `Err` and never panic; `read_export` returns an
//! error or a snapshot with one outcome per `[[association]]`, every refusal labelled with its check and a
//! reason; and no error, refusal or `Debug` output holds key material (a grant key or a data key, in base64 or
//! hex).
//!
//! Case counts are bounded so that the whole file runs in a few seconds; `fuzz/` has the open-ended version.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use proptest::prelude::*;
use sealgate::config::Config;
use sealgate::custody::format::{encode_base64, Associations, Grant, SealedKey};
use sealgate::custody::seal::{data_key_aad, unwrap_data_key};
use sealgate::custody::snapshot::{read_export, GrantStatus, Verdict};
use time::macros::datetime;

const GRANTEE: &str = "sealgate-vectors";

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/custody-vectors/export")
}

/// The vector export, file by file, by path relative to the export.
fn export_files() -> &'static BTreeMap<String, Vec<u8>> {
    static FILES: OnceLock<BTreeMap<String, Vec<u8>>> = OnceLock::new();
    FILES.get_or_init(|| {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(root, &path, out);
                } else {
                    let relative = path.strip_prefix(root).unwrap().to_str().unwrap().to_owned();
                    out.insert(relative, std::fs::read(&path).unwrap());
                }
            }
        }
        let mut files = BTreeMap::new();
        walk(&vectors(), &vectors(), &mut files);
        files
    })
}

fn file(relative: &str) -> &'static [u8] {
    &export_files()[relative]
}

/// `(grant_id, file)` of every grant in the vectors.
fn grant_files() -> Vec<(&'static str, &'static [u8])> {
    export_files()
        .iter()
        .filter_map(|(path, bytes)| Some((path.strip_prefix("grants/")?.strip_suffix(".toml")?, bytes.as_slice())))
        .collect()
}

/// `(certificate_id, file)` of every sealed key in the vectors.
fn sealed_key_files() -> Vec<(&'static str, &'static [u8])> {
    export_files()
        .iter()
        .filter_map(|(path, bytes)| {
            Some((path.strip_prefix("certificates/")?.strip_suffix("/private-key.sealed")?, bytes.as_slice()))
        })
        .collect()
}

/// Every grant and certificate id of the vectors.
fn ids() -> &'static [String] {
    static IDS: OnceLock<Vec<String>> = OnceLock::new();
    IDS.get_or_init(|| {
        let mut ids: Vec<String> = grant_files().iter().map(|(id, _)| (*id).to_owned()).collect();
        ids.extend(sealed_key_files().iter().map(|(id, _)| (*id).to_owned()));
        ids
    })
}

/// The key material of the vectors, as text that must never appear in a message: every grant key, and every
/// data key that the associations wrap under them, in base64 (with and without padding) and hex.
fn secrets() -> &'static [String] {
    static SECRETS: OnceLock<Vec<String>> = OnceLock::new();
    SECRETS.get_or_init(|| {
        let grants: Vec<Grant> = grant_files().iter().map(|(id, bytes)| Grant::parse(bytes, id).unwrap()).collect();
        let associations = Associations::parse(file("associations.toml")).unwrap();
        let mut keys: Vec<Vec<u8>> =
            grants.iter().filter_map(|g| g.grant_key.as_ref()).map(|k| k.expose().to_vec()).collect();
        for entry in &associations.entries {
            let Some(grant) = grants.iter().find(|g| g.grant_id == entry.grant_id) else { continue };
            let Some(grant_key) = &grant.grant_key else { continue };
            let aad = data_key_aad(&grant.grant_id, &entry.certificate_id, &grant.key_id);
            let data_key = unwrap_data_key(grant_key, &entry.wrapped_data_key().unwrap(), &aad).unwrap();
            keys.push(data_key.expose().to_vec());
        }
        // Two grant keys (the retired grant holds none) and five data keys.
        assert_eq!(keys.len(), 7);
        let mut texts = Vec::new();
        for key in keys {
            let base64 = encode_base64(&key);
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            texts.push(base64.trim_end_matches('=').to_owned());
            texts.push(hex.to_uppercase());
            texts.push(hex);
        }
        texts
    })
}

/// Panics when `text` holds any of `secrets`.
fn assert_no_key_material(what: &str, text: &str, secrets: &[&String]) {
    for secret in secrets {
        assert!(!text.contains(secret.as_str()), "{what} holds key material: {text}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Mutations

/// A position in whatever a mutation picks from (bytes, lines, values, ids): shrinks towards the first.
#[derive(Debug, Clone, Copy)]
struct At(usize);

impl At {
    /// The position among `len` things (`len` > 0).
    fn of(self, len: usize) -> usize {
        self.0 % len.max(1)
    }
}

fn at() -> impl Strategy<Value = At> {
    any::<usize>().prop_map(At)
}

/// Lines that a damaged or hand-edited file may gain.
const LINES: &[&str] = &[
    "",
    "[[association]]",
    "[association]",
    "format = \"custody-grant/v2\"",
    "format = \"custody-associations/v1\"",
    "state = \"retired\"",
    "state = \"revoked\"",
    "operations = []",
    "operations = \"Decrypt\"",
    "grant_key = \"\"",
    "grant_key = \"AAAA\"",
    "grant_key = 42",
    "not_after = 2020-01-01T00:00:00Z",
    "not_after = 9999-12-31T23:59:59-23:59",
    "not_after = 0000-01-01T00:00:00+23:59",
    "not_after = 2030-01-01T00:00:00",
    "not_after = 2030-01-01",
    "not_after = \"2030-01-01T00:00:00Z\"",
    "certificate_id = \"../../etc\"",
    "certificate_id = \"\"",
    "grant_id = \"g-87a07811b878\"",
    "server_names = []",
    "server_names = [\"\", \"*\", \"*.*.example.test\", \"xn--\", \"a..b\"]",
    "server_names = \"localhost\"",
    "wrapped_data_key = \"AAAA\"",
    "wrapped_data_key = \"====\"",
    "nonce = \"AAAAAAAAAAAAAAAA\"",
    "ciphertext = \"\"",
    "algorithm = \"AES-128-GCM\"",
    "key_id = \"\"",
    "-----BEGIN CERTIFICATE-----",
    "-----END CERTIFICATE-----",
    "-----BEGIN PRIVATE KEY-----",
    "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA",
    "\"quoted",
    "'''",
    "x = { y = [1, 2, { z = \"é\" }] }",
    "\u{feff}# a byte order mark",
    "\t= \"\"",
];

/// One change to a file.
#[derive(Debug, Clone)]
enum Mutation {
    /// XORs one byte with a non-zero value.
    FlipByte { at: At, xor: u8 },
    /// Cuts the file short.
    Truncate { at: At },
    /// Inserts one of [`LINES`], or random printable text.
    InsertLine { at: At, line: String },
    /// Deletes one line.
    DeleteLine { at: At },
    /// Repeats one line elsewhere: a duplicate key, a second `[[association]]` header…
    DuplicateLine { from: At, to: At },
    /// Swaps the values of two `key = value` lines.
    SwapValues { a: At, b: At },
    /// Changes one character of a base64 value (`"…"` of 12 or more characters): another base64 character, a
    /// character outside the alphabet, padding, or nothing.
    ChangeBase64 { value: At, at: At, replacement: &'static str },
    /// Replaces every occurrence of one grant or certificate id of the vectors by another.
    ReplaceId { from: At, to: At },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let line = prop_oneof![
        3 => prop::sample::select(LINES).prop_map(str::to_owned),
        1 => "[ -~]{0,40}",
        1 => "[a-z_]{1,12} = (\"[ -~]{0,12}\"|[0-9]{1,20}|true|\\[\\]|\\{\\})",
    ];
    prop_oneof![
        (at(), 1..=255u8).prop_map(|(at, xor)| Mutation::FlipByte { at, xor }),
        at().prop_map(|at| Mutation::Truncate { at }),
        (at(), line).prop_map(|(at, line)| Mutation::InsertLine { at, line }),
        at().prop_map(|at| Mutation::DeleteLine { at }),
        (at(), at()).prop_map(|(from, to)| Mutation::DuplicateLine { from, to }),
        (at(), at()).prop_map(|(a, b)| Mutation::SwapValues { a, b }),
        (at(), at(), prop::sample::select(&["A", "/", "+", "=", "==", "-", "_", " ", "é", ""][..]))
            .prop_map(|(value, at, replacement)| Mutation::ChangeBase64 { value, at, replacement }),
        (at(), at()).prop_map(|(from, to)| Mutation::ReplaceId { from, to }),
    ]
}

/// The file as lines, each with its line ending.
fn lines(bytes: &[u8]) -> Vec<Vec<u8>> {
    bytes.split_inclusive(|&b| b == b'\n').map(<[u8]>::to_vec).collect()
}

/// `key = value` split at the first `=`.
fn key_value(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let eq = line.iter().position(|&b| b == b'=')?;
    let (key, value) = (&line[..eq], &line[eq + 1..]);
    (!key.is_empty() && key.iter().all(|b| b.is_ascii_alphanumeric() || b"_- ".contains(b))).then_some((key, value))
}

/// Byte ranges of the quoted values of 12 or more base64 characters: keys, nonces, ciphertexts.
fn base64_values(bytes: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let mut start = None;
    for (i, &b) in bytes.iter().enumerate() {
        match (b, start) {
            (b'"', None) => start = Some(i + 1),
            (b'"', Some(s)) => {
                let value = &bytes[s..i];
                if value.len() >= 12 && value.iter().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(b)) {
                    ranges.push(s..i);
                }
                start = None;
            }
            (b'\n', _) => start = None,
            _ => {}
        }
    }
    ranges
}

fn replace_all(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut rest = haystack;
    while let Some(at) = rest.windows(from.len()).position(|w| w == from) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(to);
        rest = &rest[at + from.len()..];
    }
    out.extend_from_slice(rest);
    out
}

impl Mutation {
    fn apply(&self, bytes: &[u8]) -> Vec<u8> {
        let mut bytes = bytes.to_vec();
        let mut lines = lines(&bytes);
        match self {
            Self::FlipByte { at, xor } if !bytes.is_empty() => {
                let at = at.of(bytes.len());
                bytes[at] ^= xor;
                bytes
            }
            Self::Truncate { at } => {
                bytes.truncate(at.of(bytes.len() + 1));
                bytes
            }
            Self::InsertLine { at, line } => {
                lines.insert(at.of(lines.len() + 1), format!("{line}\n").into_bytes());
                lines.concat()
            }
            Self::DeleteLine { at } if !lines.is_empty() => {
                lines.remove(at.of(lines.len()));
                lines.concat()
            }
            Self::DuplicateLine { from, to } if !lines.is_empty() => {
                let mut line = lines[from.of(lines.len())].clone();
                if !line.ends_with(b"\n") {
                    line.push(b'\n');
                }
                lines.insert(to.of(lines.len() + 1), line);
                lines.concat()
            }
            Self::SwapValues { a, b } => {
                let pairs: Vec<usize> = (0..lines.len()).filter(|&i| key_value(&lines[i]).is_some()).collect();
                if pairs.len() < 2 {
                    return bytes;
                }
                let (a, b) = (pairs[a.of(pairs.len())], pairs[b.of(pairs.len())]);
                let (key_a, value_a) = key_value(&lines[a]).map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap();
                let (key_b, value_b) = key_value(&lines[b]).map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap();
                let ending = |v: &[u8]| if v.ends_with(b"\n") { Vec::new() } else { b"\n".to_vec() };
                lines[a] = [key_a, b"=".to_vec(), value_b.clone(), ending(&value_b)].concat();
                lines[b] = [key_b, b"=".to_vec(), value_a.clone(), ending(&value_a)].concat();
                lines.concat()
            }
            Self::ChangeBase64 { value, at, replacement } => {
                let values = base64_values(&bytes);
                if values.is_empty() {
                    return bytes;
                }
                let range = values[value.of(values.len())].clone();
                let at = range.start + at.of(range.len());
                bytes.splice(at..at + 1, replacement.bytes());
                bytes
            }
            Self::ReplaceId { from, to } => {
                let ids = ids();
                replace_all(&bytes, ids[from.of(ids.len())].as_bytes(), ids[to.of(ids.len())].as_bytes())
            }
            _ => bytes,
        }
    }
}

fn apply_all(bytes: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    mutations.iter().fold(bytes.to_vec(), |bytes, m| m.apply(&bytes))
}

fn mutations(max: usize) -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..=max)
}

// ---------------------------------------------------------------------------------------------------------------
// The parsers

fn all_secrets() -> Vec<&'static String> {
    secrets().iter().collect()
}

proptest! {
    // No failure files: a failing case is printed, minimized, and belongs in a unit test.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::with_cases(256) })]

    #[test]
    fn mutated_grants_parse_or_are_refused_without_key_material(
        which in at(),
        mutations in mutations(3),
    ) {
        let grants = grant_files();
        let (id, original) = grants[which.of(grants.len())];
        let bytes = apply_all(original, &mutations);
        if let Err(error) = Grant::parse(&bytes, id) {
            let message = error.to_string();
            prop_assert!(!message.is_empty());
            assert_no_key_material("a grant error", &message, &all_secrets());
            assert_no_key_material("a grant error", &format!("{error:?}"), &all_secrets());
        }
    }

    #[test]
    fn mutated_sealed_keys_parse_or_are_refused(which in at(), mutations in mutations(3)) {
        let files = sealed_key_files();
        let (id, original) = files[which.of(files.len())];
        let bytes = apply_all(original, &mutations);
        match SealedKey::parse(&bytes, id) {
            Ok(sealed) => prop_assert_eq!(sealed.certificate_id, id),
            Err(error) => {
                prop_assert!(!error.to_string().is_empty());
                assert_no_key_material("a sealed key error", &error.to_string(), &all_secrets());
            }
        }
    }

    #[test]
    fn mutated_associations_parse_or_are_refused(mutations in mutations(4)) {
        let bytes = apply_all(file("associations.toml"), &mutations);
        match Associations::parse(&bytes) {
            Ok(associations) => {
                for entry in &associations.entries {
                    let _ = entry.ids_are_valid();
                    if let Err(error) = entry.wrapped_data_key() {
                        assert_no_key_material("a wrapped data key error", &error.to_string(), &all_secrets());
                    }
                }
            }
            Err(error) => {
                prop_assert!(!error.to_string().is_empty());
                assert_no_key_material("an associations error", &error.to_string(), &all_secrets());
            }
        }
    }

    /// The reference block of the README, mutated: a configuration or an error naming the file.
    #[test]
    fn mutated_configurations_load_or_are_refused(mutations in mutations(4)) {
        let bytes = apply_all(readme_reference().as_bytes(), &mutations);
        let text = String::from_utf8_lossy(&bytes);
        let path = Path::new("/srv/sealgate/proxy.toml");
        match Config::parse(&text, path) {
            Ok(config) => prop_assert!(!config.listeners.is_empty()),
            Err(error) => {
                prop_assert_eq!(&error.path, path);
                prop_assert!(!error.message.is_empty());
                prop_assert!(error.to_string().starts_with("/srv/sealgate/proxy.toml"));
            }
        }
    }
}

/// The configuration reference block of the README.
fn readme_reference() -> &'static str {
    static BLOCK: OnceLock<String> = OnceLock::new();
    BLOCK.get_or_init(|| {
        let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
        let section = readme.split("## Configuration reference").nth(1).unwrap();
        section.split("```toml\n").nth(1).and_then(|b| b.split("```").next()).unwrap().to_owned()
    })
}

// ---------------------------------------------------------------------------------------------------------------
// Whole exports

/// A change to the export: a mutation of one file, or two files' contents swapped.
#[derive(Debug, Clone)]
enum ExportMutation {
    File { which: At, mutation: Mutation },
    SwapFiles { a: At, b: At },
    RemoveFile { which: At },
}

fn export_mutation() -> impl Strategy<Value = ExportMutation> {
    prop_oneof![
        6 => (at(), mutation()).prop_map(|(which, mutation)| ExportMutation::File { which, mutation }),
        1 => (at(), at()).prop_map(|(a, b)| ExportMutation::SwapFiles { a, b }),
        1 => at().prop_map(|which| ExportMutation::RemoveFile { which }),
    ]
}

/// The vector export with `mutations` applied; `None` for a removed file.
fn mutated_export(mutations: &[ExportMutation]) -> BTreeMap<String, Option<Vec<u8>>> {
    let mut files: BTreeMap<String, Option<Vec<u8>>> =
        export_files().iter().map(|(path, bytes)| (path.clone(), Some(bytes.clone()))).collect();
    let paths: Vec<String> = files.keys().cloned().collect();
    for mutation in mutations {
        match mutation {
            ExportMutation::File { which, mutation } => {
                if let Some(bytes) = files.get_mut(&paths[which.of(paths.len())]).and_then(Option::as_mut) {
                    *bytes = mutation.apply(bytes);
                }
            }
            ExportMutation::SwapFiles { a, b } => {
                let (a, b) = (&paths[a.of(paths.len())], &paths[b.of(paths.len())]);
                let contents_a = files[a].clone();
                let contents_b = std::mem::replace(files.get_mut(b).unwrap(), contents_a);
                files.insert(a.clone(), contents_b);
            }
            ExportMutation::RemoveFile { which } => {
                files.insert(paths[which.of(paths.len())].clone(), None);
            }
        }
    }
    files
}

/// The secrets that a refusal may not name. `sealgate check` names a grant's `grantee` and `key_id` in its
/// refusals (they are not secrets); a mutant that moved a key's text into one of those fields is the one case
/// where the key's text is no longer only a key, and it is left out of the check for that mutant.
fn secrets_for(files: &BTreeMap<String, Option<Vec<u8>>>) -> Vec<&'static String> {
    let named_fields: Vec<&[u8]> = files
        .values()
        .flatten()
        .flat_map(|bytes| bytes.split(|&b| b == b'\n'))
        .filter(|line| line.starts_with(b"grantee") || line.starts_with(b"key_id"))
        .collect();
    secrets()
        .iter()
        .filter(|s| !named_fields.iter().any(|line| line.windows(s.len()).any(|w| w == s.as_bytes())))
        .collect()
}

proptest! {
    // No failure files: a failing case is printed, minimized, and belongs in a unit test.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::with_cases(128) })]

    #[test]
    fn mutated_exports_are_read_or_refused_cleanly(mutations in prop::collection::vec(export_mutation(), 1..=3)) {
        let files = mutated_export(&mutations);
        let dir = tempfile::tempdir().unwrap();
        for (path, bytes) in &files {
            let Some(bytes) = bytes else { continue };
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
        let secrets = secrets_for(&files);
        let now = datetime!(2027-01-01 00:00:00 UTC);
        match read_export(dir.path(), GRANTEE, now) {
            Err(error) => {
                prop_assert!(!error.to_string().is_empty());
                assert_no_key_material("an export error", &error.to_string(), &secrets);
            }
            Ok(snapshot) => {
                // An absent associations.toml associates nothing; one that exists must have parsed.
                let entries = match files["associations.toml"].as_deref() {
                    None => Some(0),
                    Some(bytes) => Associations::parse(bytes).ok().map(|a| a.entries.len()),
                };
                prop_assert_eq!(Some(snapshot.associations.len()), entries);
                for outcome in &snapshot.associations {
                    match &outcome.result {
                        Verdict::Served(verified) => {
                            prop_assert!(!verified.server_names.is_empty());
                            let grant = snapshot.grants.get(&verified.grant_id);
                            let active = matches!(grant, Some(GrantStatus::Active { grantee, .. }) if grantee == GRANTEE);
                            prop_assert!(active, "{} served under a grant that is not active for us", outcome.certificate_id);
                        }
                        // A fresh read knows of no served generation: nothing can be found unchanged.
                        Verdict::Unchanged => prop_assert!(false, "{} unchanged in a fresh read", outcome.certificate_id),
                        Verdict::Refused(refusal) => {
                            prop_assert!(!refusal.reason.is_empty());
                            prop_assert!(!refusal.check.label().is_empty());
                            let outcome_text = outcome.outcome();
                            prop_assert!(outcome_text.starts_with("refused: "));
                            let label = format!("({})", refusal.check.label());
                            prop_assert!(outcome_text.ends_with(&label), "{} lacks {}", outcome_text, label);
                            assert_no_key_material("a refusal", &refusal.to_string(), &secrets);
                        }
                    }
                }
                for status in snapshot.grants.values() {
                    if let GrantStatus::Unreadable(message) = status {
                        prop_assert!(!message.is_empty());
                        assert_no_key_material("a grant status", message, &secrets);
                    }
                }
                assert_no_key_material("the snapshot's Debug", &format!("{snapshot:?}"), &secrets);
            }
        }
    }
}

/// Every single-line edit of every vector file, exhaustively: each pair of values swapped, each line deleted,
/// each line repeated. Cheap enough to try them all, and the likeliest way for a key to land in another field.
#[test]
fn every_swap_deletion_and_repetition_of_a_line_is_refused_without_key_material() {
    let secrets = all_secrets();
    for (path, original) in export_files() {
        if path.ends_with(".pem") {
            continue;
        }
        let count = lines(original).len();
        let mut mutants = Vec::new();
        let pairs = lines(original).iter().filter(|line| key_value(line).is_some()).count();
        for a in 0..count {
            mutants.push(Mutation::DeleteLine { at: At(a) });
            // Repeated at the top, just after itself (a duplicate key) and at the end (a duplicate in the last table).
            for to in [0, a + 1, count] {
                mutants.push(Mutation::DuplicateLine { from: At(a), to: At(to) });
            }
        }
        for a in 0..pairs {
            for b in a + 1..pairs {
                mutants.push(Mutation::SwapValues { a: At(a), b: At(b) });
            }
        }
        for mutation in mutants {
            let bytes = mutation.apply(original);
            let error = if let Some(id) = path.strip_prefix("grants/").and_then(|p| p.strip_suffix(".toml")) {
                Grant::parse(&bytes, id).err()
            } else if let Some(id) =
                path.strip_prefix("certificates/").and_then(|p| p.strip_suffix("/private-key.sealed"))
            {
                SealedKey::parse(&bytes, id).err()
            } else {
                Associations::parse(&bytes).err()
            };
            if let Some(error) = error {
                assert_no_key_material(&format!("{path} after {mutation:?}"), &error.to_string(), &secrets);
            }
        }
    }
}

/// The mutations do reach every kind of refusal, and the unmutated vectors still give the expected outcomes
/// (so that a mutation helper that broke every file would not pass unnoticed).
#[test]
fn unmutated_vectors_are_served_as_expected() {
    let files = mutated_export(&[]);
    assert_eq!(files.len(), export_files().len());
    let snapshot = read_export(&vectors(), GRANTEE, datetime!(2027-01-01 00:00:00 UTC)).unwrap();
    assert_eq!(snapshot.associations.iter().filter(|a| a.is_served()).count(), 2);
    assert!(Config::parse(readme_reference(), Path::new("/srv/proxy.toml")).is_ok());
    for (id, bytes) in grant_files() {
        assert!(Grant::parse(bytes, id).is_ok());
    }
}

#[test]
fn mutations_change_what_they_say() {
    let grant = file("grants/g-87a07811b878.toml");
    let swapped = Mutation::SwapValues { a: At(0), b: At(8) }.apply(grant);
    let text = String::from_utf8(swapped).unwrap();
    assert!(text.starts_with("format = 2026-11-28T14:25:27Z\n"), "{text}");
    assert!(text.ends_with("created = \"custody-grant/v1\"\n"), "{text}");
    let changed = Mutation::ChangeBase64 { value: At(0), at: At(0), replacement: "-" }.apply(grant);
    assert!(String::from_utf8(changed).unwrap().contains("grant_key = \"-bVN"));
    let replaced = Mutation::ReplaceId { from: At(1), to: At(0) }.apply(grant);
    let text = String::from_utf8(replaced).unwrap();
    assert!(text.contains("grant_id = \"g-15fc8f5ffe1e\"") && !text.contains("g-87a07811b878"), "{text}");
}
