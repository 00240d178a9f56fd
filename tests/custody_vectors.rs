//! The shared custody vectors: an export written by an independent implementation of FORMAT.md, and
//! `expected.toml`, what a holder whose grantee is `sealgate-vectors` must conclude from it.
//!
//! The vectors are copied into `tests/data/custody-vectors/` so that a clean clone tests without `../shared`;
//! when `../shared/custody/vectors` is present, the copy must be identical to it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivatePkcs8KeyDer;
use sealgate::custody::format::{self, Associations, Grant};
use sealgate::custody::seal;
use sealgate::custody::snapshot::{read_export, AssociationOutcome, Snapshot, Verdict};
use time::OffsetDateTime;

const GRANTEE: &str = "sealgate-vectors";

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/custody-vectors")
}

fn export() -> PathBuf {
    vectors().join("export")
}

fn expected() -> Vec<toml::Table> {
    let text = std::fs::read_to_string(vectors().join("expected.toml")).unwrap();
    let mut table: toml::Table = text.parse().unwrap();
    assert_eq!(table["grantee"].as_str(), Some(GRANTEE));
    match table.remove("association") {
        Some(toml::Value::Array(entries)) => {
            entries.into_iter().map(|e| e.as_table().cloned().expect("[[association]] is a table")).collect()
        }
        other => panic!("expected.toml has no [[association]] array: {other:?}"),
    }
}

fn snapshot() -> Snapshot {
    read_export(&export(), GRANTEE, OffsetDateTime::now_utc()).unwrap()
}

fn str_field<'a>(table: &'a toml::Table, key: &str) -> &'a str {
    table.get(key).and_then(toml::Value::as_str).unwrap_or_else(|| panic!("`{key}` missing in {table:?}"))
}

/// The data key, unwrapped here straight from the files with the grant file's key.
fn data_key_base64(certificate_id: &str) -> String {
    let export = export();
    let associations = Associations::parse(&std::fs::read(export.join("associations.toml")).unwrap()).unwrap();
    let entry = associations.entries.iter().find(|e| e.certificate_id == certificate_id).unwrap();
    let grant_file = export.join("grants").join(format!("{}.toml", entry.grant_id));
    let grant = Grant::parse(&std::fs::read(grant_file).unwrap(), &entry.grant_id).unwrap();
    let aad = seal::data_key_aad(&entry.grant_id, certificate_id, &grant.key_id);
    let data_key =
        seal::unwrap_data_key(grant.grant_key.as_ref().unwrap(), &entry.wrapped_data_key().unwrap(), &aad).unwrap();
    format::encode_base64(data_key.expose())
}

#[test]
fn outcomes_are_exactly_the_expected_ones_in_order() {
    let snapshot = snapshot();
    let expected = expected();
    let ids: Vec<&str> = snapshot.associations.iter().map(|a| a.certificate_id.as_str()).collect();
    let expected_ids: Vec<&str> = expected.iter().map(|e| str_field(e, "certificate_id")).collect();
    assert_eq!(ids, expected_ids);
    for (outcome, want) in snapshot.associations.iter().zip(&expected) {
        assert_eq!(outcome.outcome(), str_field(want, "outcome"), "{}", outcome.certificate_id);
    }
}

#[test]
fn served_certificates_have_the_expected_names_and_keys() {
    let snapshot = snapshot();
    let outcomes: BTreeMap<&str, &AssociationOutcome> =
        snapshot.associations.iter().map(|a| (a.certificate_id.as_str(), a)).collect();
    let mut served = 0;
    for want in expected().iter().filter(|e| str_field(e, "outcome") == "served") {
        let id = str_field(want, "certificate_id");
        let Verdict::Served(verified) = &outcomes[id].result else { panic!("{id} is not served") };
        let names: Vec<&str> = want["server_names"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(verified.server_names, names, "{id}");

        assert_eq!(data_key_base64(id), str_field(want, "data_key"), "{id}");

        let expected_key = PrivatePkcs8KeyDer::from_pem_slice(str_field(want, "private_key_pem").as_bytes()).unwrap();
        assert!(verified.private_key.expose() == expected_key.secret_pkcs8_der(), "{id}: private key differs");
        assert_eq!(verified.chain.len(), 1, "{id}");
        served += 1;
    }
    assert_eq!(served, 2);
}

#[test]
fn grant_statuses() {
    use sealgate::custody::snapshot::GrantStatus;
    let grants = snapshot().grants;
    assert_eq!(grants.len(), 3);
    assert_eq!(grants["g-87a07811b878"], GrantStatus::Active { grantee: GRANTEE.to_owned(), not_after: None });
    assert_eq!(grants["g-15fc8f5ffe1e"], GrantStatus::Retired);
    assert!(matches!(&grants["g-9beb94d1c9eb"], GrantStatus::Active { grantee, .. } if grantee == "someone-else"));
}

/// Every file under `root`, by path relative to it.
fn tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.insert(path.strip_prefix(root).unwrap().to_owned(), std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn the_copy_matches_the_shared_vectors() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/custody/vectors");
    if !shared.is_dir() {
        eprintln!("{} is absent: drift check skipped", shared.display());
        return;
    }
    let (copy, original) = (tree(&vectors()), tree(&shared));
    assert_eq!(
        copy.keys().collect::<Vec<_>>(),
        original.keys().collect::<Vec<_>>(),
        "tests/data/custody-vectors lists other files than {}",
        shared.display()
    );
    for (path, bytes) in &original {
        assert!(copy[path] == *bytes, "{} differs from the shared vectors: copy them again", path.display());
    }
}
