//! Every refusal, on small exports written by hand with [`format`] and [`seal`] and certificates from rcgen.
//!
//! Every read made through [`Fixture::read`] also checks that no grant key or data key, in base64 or hex, reaches
//! a refusal, a grant status or the snapshot's `Debug`.

use std::collections::HashMap;
use std::os::unix::fs::symlink;

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use tempfile::TempDir;
use time::macros::datetime;
use time::Duration;

use super::*;
use crate::custody::format::{self, AssociationEntry, Associations, Grant, GrantState, SealedKey};
use crate::custody::seal;
use crate::secret::SecretKey32;

pub(super) const GRANTEE: &str = "sealgate-test";
pub(super) const KEY_ID: &str = "arn:aws:kms:us-east-1:111122223333:key/0f1e2d3c-test";

pub(super) fn now() -> OffsetDateTime {
    datetime!(2026-11-28 12:00 UTC)
}

/// A certificate and its key, as issued.
pub(super) struct Issued {
    pub(super) pem: String,
    pub(super) key_der: Vec<u8>,
}

pub(super) fn issue(names: &[&str]) -> Issued {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let certificate = params.self_signed(&key).unwrap();
    Issued { pem: certificate.pem(), key_der: key.serialize_der() }
}

/// An export under construction. Grants and associations are kept as values and written by [`Fixture::write`],
/// so that a test can change them after associating; certificate files are written at once. Every file is
/// replaced atomically, as FORMAT.md says the custody system does.
pub(super) struct Fixture {
    pub(super) dir: TempDir,
    pub(super) grants: Vec<Grant>,
    pub(super) data_keys: HashMap<String, SecretKey32>,
    pub(super) entries: Vec<AssociationEntry>,
}

impl Fixture {
    pub(super) fn new() -> Self {
        Self { dir: TempDir::new().unwrap(), grants: Vec::new(), data_keys: HashMap::new(), entries: Vec::new() }
    }

    /// One active grant `g-1` and one certificate `c-1` for `a.example.test` and `*.b.example.test`, associated
    /// without `server_names`: served as it stands.
    pub(super) fn served() -> Self {
        let mut fixture = Self::new();
        fixture.add_grant("g-1");
        fixture.add_certificate("c-1", &["a.example.test", "*.b.example.test"]);
        fixture.associate("c-1", "g-1", None);
        fixture
    }

    pub(super) fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    pub(super) fn add_grant(&mut self, id: &str) -> &mut Grant {
        self.grants.push(Grant {
            grant_id: id.to_owned(),
            key_id: KEY_ID.to_owned(),
            key_alias: Some("aws/acm".to_owned()),
            grantee: GRANTEE.to_owned(),
            operations: vec!["Decrypt".to_owned(), "RetireGrant".to_owned()],
            state: GrantState::Active,
            grant_key: Some(SecretKey32::random().unwrap()),
            not_after: None,
            created: Some(now() - Duration::days(1)),
        });
        self.grants.last_mut().unwrap()
    }

    pub(super) fn grant(&mut self, id: &str) -> &mut Grant {
        self.grants.iter_mut().find(|g| g.grant_id == id).unwrap()
    }

    pub(super) fn entry(&mut self, certificate_id: &str) -> &mut AssociationEntry {
        self.entries.iter_mut().find(|e| e.certificate_id == certificate_id).unwrap()
    }

    /// Issues a certificate for `names` and writes it with its key sealed under a fresh data key.
    pub(super) fn add_certificate(&mut self, id: &str, names: &[&str]) -> Issued {
        let issued = issue(names);
        self.write_certificate(id, &issued.pem);
        self.write_sealed_key(id, &issued.key_der, KEY_ID);
        issued
    }

    pub(super) fn write_certificate(&self, id: &str, pem: &str) {
        let dir = self.path(&format!("certificates/{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        put(&dir.join("certificate.pem"), pem.as_bytes());
    }

    /// Seals `key_der` under the certificate's data key (made on first use) with associated data naming `key_id`.
    pub(super) fn write_sealed_key(&mut self, id: &str, key_der: &[u8], key_id: &str) {
        let data_key = self.data_keys.entry(id.to_owned()).or_insert_with(|| SecretKey32::random().unwrap());
        let nonce = seal::random_nonce().unwrap();
        let ciphertext = seal::seal(data_key, &nonce, key_der, &seal::sealed_key_aad(id, key_id));
        let sealed = SealedKey { certificate_id: id.to_owned(), key_id: key_id.to_owned(), nonce, ciphertext };
        let dir = self.path(&format!("certificates/{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        put(&dir.join("private-key.sealed"), sealed.render().as_bytes());
    }

    /// Associates a certificate with a grant, wrapping its data key under the grant's key as FORMAT.md says.
    pub(super) fn associate(&mut self, certificate_id: &str, grant_id: &str, server_names: Option<&[&str]>) {
        let grant = self.grants.iter().find(|g| g.grant_id == grant_id).unwrap();
        let aad = seal::data_key_aad(grant_id, certificate_id, &grant.key_id);
        let wrapped =
            seal::wrap_data_key(grant.grant_key.as_ref().unwrap(), &self.data_keys[certificate_id], &aad).unwrap();
        self.entries.push(AssociationEntry {
            certificate_id: certificate_id.to_owned(),
            grant_id: grant_id.to_owned(),
            server_names: server_names.map(|names| names.iter().map(|n| n.to_string()).collect()),
            wrapped_data_key: format::encode_base64(&wrapped),
        });
    }

    /// Writes the grants and `associations.toml`.
    pub(super) fn write(&self) {
        std::fs::create_dir_all(self.path("grants")).unwrap();
        for grant in &self.grants {
            put(&self.path(&format!("grants/{}.toml", grant.grant_id)), grant.render().as_bytes());
        }
        let associations = Associations { entries: self.entries.clone() };
        put(&self.path("associations.toml"), associations.render().as_bytes());
    }

    /// Writes everything, then reads the export as [`GRANTEE`] at [`now`].
    pub(super) fn read(&self) -> Snapshot {
        self.write();
        self.snapshot()
    }

    /// Reads the export as the files stand, checking that no secret leaks.
    pub(super) fn snapshot(&self) -> Snapshot {
        let snapshot = read_export(self.dir.path(), GRANTEE, now()).unwrap();
        self.assert_no_secrets(&snapshot);
        snapshot
    }

    /// Every grant key and data key, in base64 and hex.
    fn secrets(&self) -> Vec<String> {
        let keys = self.grants.iter().filter_map(|g| g.grant_key.as_ref()).chain(self.data_keys.values());
        keys.flat_map(|k| {
            let hex: String = k.expose().iter().map(|b| format!("{b:02x}")).collect();
            [format::encode_base64(k.expose()), hex]
        })
        .collect()
    }

    /// No 12-character window of any secret's text appears in what a snapshot can print.
    pub(super) fn assert_no_secrets(&self, snapshot: &Snapshot) {
        let mut texts = vec![format!("{snapshot:?}")];
        texts.extend(snapshot.associations.iter().filter_map(AssociationOutcome::refusal).map(Refusal::to_string));
        texts.extend(snapshot.grants.values().filter_map(|s| match s {
            GrantStatus::Unreadable(message) => Some(message.clone()),
            _ => None,
        }));
        for secret in self.secrets() {
            for window in secret.as_bytes().windows(12) {
                let window = std::str::from_utf8(window).unwrap();
                for text in &texts {
                    assert!(!text.contains(window), "a secret leaks into: {text}");
                }
            }
        }
    }
}

/// Replaces a file as the custody system does: a temporary beside it, renamed over it (a new inode).
pub(super) fn put(path: &Path, contents: &[u8]) {
    let temporary = path.with_extension("tmp-write");
    std::fs::write(&temporary, contents).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

pub(super) fn refusal(snapshot: &Snapshot, index: usize) -> &Refusal {
    match &snapshot.associations[index].result {
        Verdict::Refused(refusal) => refusal,
        other => panic!("association {index} is not refused: {other:?}"),
    }
}

pub(super) fn assert_refused(snapshot: &Snapshot, index: usize, check: Check, reason: &str) -> String {
    let refusal = refusal(snapshot, index);
    assert_eq!((refusal.check, refusal.reason), (check, reason), "{refusal}");
    refusal.detail.clone()
}

pub(super) fn served(snapshot: &Snapshot, index: usize) -> &VerifiedCertificate {
    match &snapshot.associations[index].result {
        Verdict::Served(verified) => verified,
        other => panic!("association {index} is not served: {other:?}"),
    }
}

/// Flips one bit of a base64 value's decoded bytes.
fn flip_base64(text: &str, index: usize) -> String {
    let mut bytes = format::decode_base64("test", text).unwrap();
    bytes[index] ^= 1;
    format::encode_base64(&bytes)
}

// -----------------------------------------------------------------------------------------------------------------
// Served

#[test]
fn a_consistent_association_is_served() {
    let mut fixture = Fixture::new();
    fixture.add_grant("g-1").not_after = Some(now() + Duration::hours(1));
    let issued = fixture.add_certificate("c-1", &["A.Example.Test", "*.b.example.test", "a.example.test"]);
    fixture.associate("c-1", "g-1", None);
    let snapshot = fixture.read();

    assert_eq!(snapshot.export, fixture.dir.path());
    assert_eq!(snapshot.read_at, now());
    assert_eq!(
        snapshot.grants["g-1"],
        GrantStatus::Active { grantee: GRANTEE.to_owned(), not_after: Some(now() + Duration::hours(1)) }
    );
    let outcome = &snapshot.associations[0];
    assert_eq!((outcome.certificate_id.as_str(), outcome.grant_id.as_str()), ("c-1", "g-1"));
    assert_eq!(outcome.outcome(), "served");
    let verified = served(&snapshot, 0);
    assert_eq!(verified.server_names, ["a.example.test", "*.b.example.test"]);
    assert_eq!(outcome.server_names, verified.server_names);
    assert_eq!(outcome.certificate_not_after, Some(verified.not_after));
    assert_eq!(verified.grant_not_after, Some(now() + Duration::hours(1)));
    assert!(verified.private_key.expose() == issued.key_der.as_slice());
    assert_eq!(verified.chain.len(), 1);
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &verified.chain[0]);
    assert_eq!(verified.leaf_sha256.as_slice(), digest.as_ref());
    assert!(verified.not_before < verified.not_after);
    let spki = verified.signing_key.public_key().unwrap();
    let certified = rustls::sign::CertifiedKey::new(verified.chain.clone(), verified.signing_key.clone());
    assert!(certified.keys_match().is_ok(), "{spki:?}");
}

#[test]
fn requested_names_are_normalised_and_wildcards_cover_one_label() {
    let mut fixture = Fixture::served();
    fixture.entry("c-1").server_names =
        Some(vec!["X.B.Example.Test.".into(), "a.example.test".into(), "x.b.example.test".into()]);
    let snapshot = fixture.read();
    assert_eq!(served(&snapshot, 0).server_names, ["x.b.example.test", "a.example.test"]);

    fixture.entry("c-1").server_names = Some(vec!["*.b.example.test".into()]);
    assert_eq!(served(&fixture.read(), 0).server_names, ["*.b.example.test"]);

    fixture.entry("c-1").server_names = Some(vec!["x.y.b.example.test".into()]);
    assert_refused(&fixture.read(), 0, Check::ServerNames, reason::NAME_NOT_COVERED);
}

#[test]
fn a_chain_keeps_every_block_in_order() {
    let fixture = Fixture::served();
    let leaf = std::fs::read_to_string(fixture.path("certificates/c-1/certificate.pem")).unwrap();
    let intermediate = issue(&["ca.example.test"]).pem;
    fixture.write_certificate("c-1", &format!("{leaf}{intermediate}"));
    let snapshot = fixture.read();
    let chain = &served(&snapshot, 0).chain;
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1].as_ref(), CertificateDer::from_pem_slice(intermediate.as_bytes()).unwrap().as_ref());

    // A second block that is not X.509 makes the file unusable.
    let junk = "-----BEGIN CERTIFICATE-----\nAAECAwQ=\n-----END CERTIFICATE-----\n";
    fixture.write_certificate("c-1", &format!("{leaf}{junk}"));
    let detail = assert_refused(&fixture.read(), 0, Check::Files, reason::CERTIFICATE_FILE);
    assert!(detail.contains("certificate.pem") && detail.contains("certificate 2 "), "{detail}");
    use rustls_pki_types::pem::PemObject;
}

// -----------------------------------------------------------------------------------------------------------------
// Check 1

#[test]
fn a_missing_grant_is_refused() {
    let fixture = Fixture::served();
    fixture.write();
    std::fs::remove_file(fixture.path("grants/g-1.toml")).unwrap();
    let snapshot = fixture.snapshot();
    let detail = assert_refused(&snapshot, 0, Check::Grant, reason::GRANT_MISSING);
    assert!(detail.contains("g-1.toml"), "{detail}");
    assert!(snapshot.grants.is_empty());
    assert_eq!(snapshot.associations[0].outcome(), "refused: the grant does not exist (check 1)");
}

#[test]
fn a_missing_grants_directory_holds_no_grants() {
    let fixture = Fixture::served();
    fixture.write();
    std::fs::remove_dir_all(fixture.path("grants")).unwrap();
    let snapshot = fixture.snapshot();
    assert!(snapshot.grants.is_empty());
    assert_refused(&snapshot, 0, Check::Grant, reason::GRANT_MISSING);
}

#[test]
fn a_retired_grant_is_refused_before_anything_else_is_looked_at() {
    let mut fixture = Fixture::served();
    let grant = fixture.grant("g-1");
    grant.state = GrantState::Retired;
    grant.grant_key = None;
    grant.grantee = "someone-else".into();
    grant.not_after = Some(now() - Duration::days(1));
    fixture.write();
    std::fs::remove_file(fixture.path("certificates/c-1/certificate.pem")).unwrap();
    let snapshot = fixture.snapshot();
    assert_eq!(snapshot.grants["g-1"], GrantStatus::Retired);
    assert_refused(&snapshot, 0, Check::Grant, reason::GRANT_RETIRED);
    assert_eq!(snapshot.associations[0].outcome(), "refused: the grant is retired (check 1)");
    assert_eq!(snapshot.associations[0].certificate_not_after, None);
    assert!(snapshot.associations[0].server_names.is_empty());
}

#[test]
fn a_lapsed_grant_is_refused_from_the_instant_of_not_after() {
    let mut fixture = Fixture::served();
    fixture.grant("g-1").not_after = Some(now() - Duration::seconds(1));
    let snapshot = fixture.read();
    assert_eq!(snapshot.grants["g-1"], GrantStatus::Lapsed);
    let detail = assert_refused(&snapshot, 0, Check::Grant, reason::GRANT_LAPSED);
    assert!(detail.contains("2026-11-28T11:59:59Z"), "{detail}");

    fixture.grant("g-1").not_after = Some(now());
    assert_refused(&fixture.read(), 0, Check::Grant, reason::GRANT_LAPSED);

    fixture.grant("g-1").not_after = Some(now() + Duration::seconds(1));
    assert!(fixture.read().associations[0].is_served());
}

#[test]
fn a_grant_for_another_grantee_is_refused() {
    let mut fixture = Fixture::served();
    fixture.grant("g-1").grantee = "someone-else".into();
    let snapshot = fixture.read();
    let detail = assert_refused(&snapshot, 0, Check::Grant, reason::OTHER_GRANTEE);
    assert!(detail.contains("\"someone-else\"") && detail.contains(GRANTEE), "{detail}");
    assert_eq!(snapshot.associations[0].outcome(), "refused: the grant names another grantee (check 1)");
    assert!(matches!(&snapshot.grants["g-1"], GrantStatus::Active { grantee, .. } if grantee == "someone-else"));
}

#[test]
fn a_grant_without_decrypt_is_refused() {
    let mut fixture = Fixture::served();
    fixture.grant("g-1").operations = vec!["Encrypt".into(), "decrypt".into()];
    assert_refused(&fixture.read(), 0, Check::Grant, reason::NO_DECRYPT);
}

#[test]
fn an_active_grant_without_its_key_is_refused() {
    let mut fixture = Fixture::served();
    fixture.grant("g-1").grant_key = None;
    assert_refused(&fixture.read(), 0, Check::Grant, reason::NO_GRANT_KEY);
}

#[test]
fn an_unparseable_grant_file_is_refused_and_reported_without_its_contents() {
    let fixture = Fixture::served();
    fixture.write();
    let path = fixture.path("grants/g-1.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    // A syntax error on the key's own line: the message must give a position, not the line.
    let broken = text.replace("grant_key = \"", "grant_key = oops \"");
    assert_ne!(broken, text);
    std::fs::write(&path, broken).unwrap();
    let snapshot = fixture.snapshot();
    let GrantStatus::Unreadable(message) = &snapshot.grants["g-1"] else { panic!("{:?}", snapshot.grants) };
    assert!(message.starts_with(&path.display().to_string()), "{message}");
    assert!(message.contains("line "), "{message}");
    let detail = assert_refused(&snapshot, 0, Check::Grant, reason::GRANT_UNREADABLE);
    assert_eq!(&detail, message);

    // A grant file that names another grant is no more readable.
    std::fs::write(&path, text.replace("grant_id = \"g-1\"", "grant_id = \"g-2\"")).unwrap();
    assert!(matches!(fixture.snapshot().grants["g-1"], GrantStatus::Unreadable(_)));
}

// -----------------------------------------------------------------------------------------------------------------
// Checks 2 to 4

#[test]
fn a_sealed_key_under_another_kms_key_is_refused() {
    let mut fixture = Fixture::new();
    fixture.add_grant("g-1");
    let issued = fixture.add_certificate("c-1", &["a.example.test"]);
    fixture.write_sealed_key("c-1", &issued.key_der, "arn:aws:kms:eu-west-1:111122223333:key/other");
    fixture.associate("c-1", "g-1", None);
    let snapshot = fixture.read();
    let detail = assert_refused(&snapshot, 0, Check::KeyId, reason::KEY_ID_MISMATCH);
    assert!(detail.contains("private-key.sealed") && detail.contains("eu-west-1"), "{detail}");
    // The leaf had been read: its validity and names are reported.
    assert!(snapshot.associations[0].certificate_not_after.is_some());
    assert_eq!(snapshot.associations[0].server_names, ["a.example.test"]);
}

#[test]
fn a_tampered_or_malformed_wrapped_data_key_is_refused() {
    let mut fixture = Fixture::served();
    let original = fixture.entry("c-1").wrapped_data_key.clone();
    for (index, wrapped) in [
        flip_base64(&original, 0),  // nonce
        flip_base64(&original, 20), // ciphertext
        flip_base64(&original, 59), // tag
        "not base64!".to_owned(),
        format::encode_base64(&[0; 59]),
        String::new(),
    ]
    .into_iter()
    .enumerate()
    {
        fixture.entry("c-1").wrapped_data_key = wrapped;
        let detail = assert_refused(&fixture.read(), 0, Check::Seal, reason::DATA_KEY_SEAL);
        assert!(detail.contains("associations.toml") && detail.contains("wrapped_data_key"), "{index}: {detail}");
    }
}

#[test]
fn a_data_key_wrapped_for_another_association_does_not_open() {
    let mut fixture = Fixture::served();
    fixture.add_certificate("c-2", &["c2.example.test"]);
    fixture.associate("c-2", "g-1", None);
    // The associated data binds the certificate id: swapping wrapped keys between entries fails.
    let (first, second) = (fixture.entries[0].wrapped_data_key.clone(), fixture.entries[1].wrapped_data_key.clone());
    fixture.entries[0].wrapped_data_key = second;
    fixture.entries[1].wrapped_data_key = first;
    let snapshot = fixture.read();
    assert_refused(&snapshot, 0, Check::Seal, reason::DATA_KEY_SEAL);
    assert_refused(&snapshot, 1, Check::Seal, reason::DATA_KEY_SEAL);
}

#[test]
fn a_tampered_sealed_key_is_refused() {
    let fixture = Fixture::served();
    fixture.write();
    let path = fixture.path("certificates/c-1/private-key.sealed");
    let mut sealed = SealedKey::parse(&std::fs::read(&path).unwrap(), "c-1").unwrap();
    sealed.ciphertext[3] ^= 0x80;
    std::fs::write(&path, sealed.render()).unwrap();
    let snapshot = fixture.snapshot();
    let detail = assert_refused(&snapshot, 0, Check::Seal, reason::PRIVATE_KEY_SEAL);
    assert!(detail.contains("private-key.sealed"), "{detail}");
    assert_eq!(snapshot.associations[0].outcome(), "refused: the sealed key does not open (check 3)");
}

#[test]
fn a_key_that_is_not_the_certificates_is_refused() {
    let mut fixture = Fixture::served();
    let other = issue(&["a.example.test"]);
    fixture.write_sealed_key("c-1", &other.key_der, KEY_ID);
    let detail = assert_refused(&fixture.read(), 0, Check::KeyMatch, reason::KEY_MISMATCH);
    assert!(detail.contains("certificate.pem"), "{detail}");

    // A sealed plaintext that is no private key at all.
    fixture.write_sealed_key("c-1", b"\x30\x03\x02\x01\x00", KEY_ID);
    assert_refused(&fixture.read(), 0, Check::KeyMatch, reason::KEY_MISMATCH);
}

/// Check 4 parses the key with the leaf's key type's parser first; a valid key of another type still gets the
/// refusal that says the keys differ, not that the key is unusable.
#[test]
fn a_valid_key_of_another_type_than_the_leafs_is_refused_as_not_the_certificates() {
    let mut fixture = Fixture::served();
    let ed25519 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    fixture.write_sealed_key("c-1", &ed25519.serialize_der(), KEY_ID);
    let detail = assert_refused(&fixture.read(), 0, Check::KeyMatch, reason::KEY_MISMATCH);
    assert!(detail.contains("is not the sealed private key's"), "{detail}");
}

// -----------------------------------------------------------------------------------------------------------------
// Check 5

#[test]
fn a_name_the_certificate_does_not_cover_is_refused() {
    let mut fixture = Fixture::served();
    fixture.entry("c-1").server_names = Some(vec!["a.example.test".into(), "b.example.test".into()]);
    let snapshot = fixture.read();
    let detail = assert_refused(&snapshot, 0, Check::ServerNames, reason::NAME_NOT_COVERED);
    assert!(detail.contains("\"b.example.test\""), "{detail}");
    assert_eq!(snapshot.associations[0].server_names, ["a.example.test", "b.example.test"]);
    assert_eq!(snapshot.associations[0].outcome(), "refused: server name not covered by the certificate (check 5)");
}

#[test]
fn an_invalid_or_empty_name_list_is_refused() {
    let mut fixture = Fixture::served();
    for bad in ["a..example.test", "a.*.example.test", "exa mple.test", ""] {
        fixture.entry("c-1").server_names = Some(vec![bad.to_owned()]);
        let detail = assert_refused(&fixture.read(), 0, Check::ServerNames, reason::INVALID_NAME);
        assert!(detail.starts_with(&format!("{bad:?}")), "{detail}");
    }
    fixture.entry("c-1").server_names = Some(Vec::new());
    assert_refused(&fixture.read(), 0, Check::ServerNames, reason::NO_NAMES);
}

#[test]
fn a_certificate_without_dns_names_needs_explicit_names_it_cannot_cover() {
    let mut fixture = Fixture::new();
    fixture.add_grant("g-1");
    fixture.add_certificate("c-1", &["192.0.2.1"]);
    fixture.associate("c-1", "g-1", None);
    assert_refused(&fixture.read(), 0, Check::ServerNames, reason::NO_NAMES);
}

#[test]
fn by_default_only_the_leafs_valid_dns_names_are_served() {
    let mut fixture = Fixture::new();
    fixture.add_grant("g-1");
    fixture.add_certificate("c-1", &["_srv.example.test", "Ok.Example.Test"]);
    fixture.associate("c-1", "g-1", None);
    fixture.add_certificate("c-2", &["_srv.example.test"]);
    fixture.associate("c-2", "g-1", None);
    let snapshot = fixture.read();
    assert_eq!(served(&snapshot, 0).server_names, ["ok.example.test"]);
    assert_refused(&snapshot, 1, Check::ServerNames, reason::NO_NAMES);
}

// -----------------------------------------------------------------------------------------------------------------
// Files

#[test]
fn a_second_association_of_one_certificate_is_refused() {
    let mut fixture = Fixture::served();
    fixture.add_grant("g-2");
    fixture.associate("c-1", "g-2", None);
    let snapshot = fixture.read();
    assert!(snapshot.associations[0].is_served());
    let detail = assert_refused(&snapshot, 1, Check::Files, reason::DUPLICATE);
    assert!(detail.contains("c-1"), "{detail}");
}

#[test]
fn invalid_ids_are_refused_and_never_become_paths() {
    let mut fixture = Fixture::served();
    // A valid certificate directory reachable through `..`: it must not be read.
    let wrapped = fixture.entry("c-1").wrapped_data_key.clone();
    for (certificate_id, grant_id) in [("../certificates/c-1", "g-1"), ("c-1", "../grants/g-1"), ("", "g-1")] {
        fixture.entries = vec![AssociationEntry {
            certificate_id: certificate_id.to_owned(),
            grant_id: grant_id.to_owned(),
            server_names: None,
            wrapped_data_key: wrapped.clone(),
        }];
        let detail = assert_refused(&fixture.read(), 0, Check::Files, reason::INVALID_ID);
        assert!(detail.contains("[A-Za-z0-9_-]{1,128}"), "{detail}");
    }
}

#[test]
fn missing_or_malformed_certificate_files_are_refused() {
    let fixture = Fixture::served();
    fixture.write();
    let pem_path = fixture.path("certificates/c-1/certificate.pem");
    let pem = std::fs::read(&pem_path).unwrap();
    let sealed_path = fixture.path("certificates/c-1/private-key.sealed");
    let sealed = std::fs::read(&sealed_path).unwrap();

    std::fs::remove_file(&pem_path).unwrap();
    let detail = assert_refused(&fixture.snapshot(), 0, Check::Files, reason::CERTIFICATE_FILE);
    assert!(detail.contains("certificate.pem: no such file"), "{detail}");

    for (contents, needle) in [
        (&b"hello"[..], "no CERTIFICATE block"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n", "no END line"),
        (b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n", "base64"),
        (b"-----BEGIN CERTIFICATE-----\nAAECAwQ=\n-----END CERTIFICATE-----\n", "not an X.509 certificate"),
    ] {
        std::fs::write(&pem_path, contents).unwrap();
        let detail = assert_refused(&fixture.snapshot(), 0, Check::Files, reason::CERTIFICATE_FILE);
        assert!(detail.contains(needle), "{detail}");
    }
    // Present but unreadable as a file.
    std::fs::remove_file(&pem_path).unwrap();
    std::fs::create_dir(&pem_path).unwrap();
    assert_refused(&fixture.snapshot(), 0, Check::Files, reason::CERTIFICATE_FILE);
    std::fs::remove_dir(&pem_path).unwrap();
    std::fs::write(&pem_path, &pem).unwrap();

    std::fs::remove_file(&sealed_path).unwrap();
    let detail = assert_refused(&fixture.snapshot(), 0, Check::Files, reason::SEALED_KEY_FILE);
    assert!(detail.contains("private-key.sealed: no such file"), "{detail}");
    let text = String::from_utf8(sealed).unwrap();
    for (contents, needle) in [
        (text.replace("certificate_id = \"c-1\"", "certificate_id = \"c-2\""), "certificate_id"),
        (text.replace("AES-256-GCM-SIV", "AES-256-GCM"), "algorithm"),
        (text.replace("custody-sealed-key/v1", "custody-sealed-key/v2"), "format"),
        ("garbage".to_owned(), "line 1"),
    ] {
        std::fs::write(&sealed_path, contents).unwrap();
        let detail = assert_refused(&fixture.snapshot(), 0, Check::Files, reason::SEALED_KEY_FILE);
        assert!(detail.contains(needle), "{detail}");
    }
}

#[test]
fn an_unusable_associations_file_fails_the_whole_read() {
    let fixture = Fixture::served();
    fixture.write();
    let path = fixture.path("associations.toml");
    for contents in [&b"[[association]\n"[..], b"format = \"custody-associations/v2\"\n", b"\xff\xfe", b""] {
        std::fs::write(&path, contents).unwrap();
        let err = read_export(fixture.dir.path(), GRANTEE, now()).unwrap_err();
        assert!(matches!(err, ExportError::Format { .. }), "{err:?}");
        assert!(err.to_string().starts_with(&path.display().to_string()), "{err}");
    }
    // Present but unreadable (here: a directory) is not absent.
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    let err = read_export(fixture.dir.path(), GRANTEE, now()).unwrap_err();
    assert!(matches!(err, ExportError::Io { .. }) && err.to_string().contains("associations.toml"), "{err}");
}

#[test]
fn an_absent_associations_file_associates_nothing() {
    let fixture = Fixture::served();
    fixture.write();
    std::fs::remove_file(fixture.path("associations.toml")).unwrap();
    let snapshot = read_export(fixture.dir.path(), GRANTEE, now()).unwrap();
    assert!(snapshot.associations.is_empty());
    assert_eq!(snapshot.grants.len(), 1, "the grants are still read");
}

#[test]
fn an_absent_export_directory_holds_nothing() {
    let fixture = Fixture::served();
    let snapshot = read_export(&fixture.dir.path().join("not-there"), GRANTEE, now()).unwrap();
    assert!(snapshot.associations.is_empty() && snapshot.grants.is_empty());
}

#[test]
fn an_export_without_associations_is_empty() {
    let mut fixture = Fixture::served();
    fixture.entries.clear();
    let snapshot = fixture.read();
    assert!(snapshot.associations.is_empty());
    assert_eq!(snapshot.grants.len(), 1);
}

#[test]
fn one_refusal_leaves_the_other_associations_served() {
    let mut fixture = Fixture::served();
    fixture.add_grant("g-2").state = GrantState::Retired;
    fixture.add_certificate("c-2", &["c2.example.test"]);
    fixture.associate("c-2", "g-2", None);
    fixture.add_certificate("c-3", &["c3.example.test"]);
    fixture.associate("c-3", "g-1", None);
    let snapshot = fixture.read();
    let outcomes: Vec<_> = snapshot.associations.iter().map(AssociationOutcome::outcome).collect();
    assert_eq!(outcomes, ["served", "refused: the grant is retired (check 1)", "served"]);
}

// -----------------------------------------------------------------------------------------------------------------
// Links and Kubernetes volumes

#[test]
fn symlinked_files_are_followed() {
    let fixture = Fixture::served();
    fixture.write();
    let elsewhere = TempDir::new().unwrap();
    for relative in ["grants/g-1.toml", "certificates/c-1/certificate.pem", "certificates/c-1/private-key.sealed"] {
        let target = elsewhere.path().join(relative.replace('/', "_"));
        std::fs::rename(fixture.path(relative), &target).unwrap();
        symlink(&target, fixture.path(relative)).unwrap();
    }
    assert!(fixture.snapshot().associations[0].is_served());

    // A dangling grant link is a grant that is gone.
    std::fs::remove_file(elsewhere.path().join("grants_g-1.toml")).unwrap();
    let snapshot = fixture.snapshot();
    assert!(snapshot.grants.is_empty());
    assert_refused(&snapshot, 0, Check::Grant, reason::GRANT_MISSING);
}

/// Moves `dir`'s visible entries into a Kubernetes-style generation directory and links them through `..data`.
pub(super) fn kubernetes_layout(dir: &Path, generation: &str) {
    let hidden = dir.join(generation);
    std::fs::create_dir(&hidden).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name();
        if !name.to_string_lossy().starts_with('.') {
            std::fs::rename(dir.join(&name), hidden.join(&name)).unwrap();
            symlink(Path::new("..data").join(&name), dir.join(&name)).unwrap();
        }
    }
    symlink(generation, dir.join("..data")).unwrap();
}

#[test]
fn a_kubernetes_grants_volume_is_read_through_its_links() {
    let mut fixture = Fixture::served();
    fixture.add_grant("g-2");
    fixture.write();
    kubernetes_layout(&fixture.path("grants"), "..2026_11_28_10_00_00.1");
    // Hidden files and non-grant names are never entries, even when they would parse.
    let g2 = std::fs::read(fixture.path("grants/g-2.toml")).unwrap();
    std::fs::write(fixture.path("grants/.g-2.toml"), &g2).unwrap();
    std::fs::write(fixture.path("grants/README"), "not a grant").unwrap();
    std::fs::write(fixture.path("grants/g-3.toml.tmp"), "half a grant").unwrap();

    let snapshot = fixture.snapshot();
    assert_eq!(snapshot.grants.keys().collect::<Vec<_>>(), ["g-1", "g-2"]);
    assert!(snapshot.associations[0].is_served());
}

#[test]
fn a_kubernetes_export_volume_is_read_through_its_links_and_swapped_atomically() {
    let mut fixture = Fixture::served();
    fixture.write();
    kubernetes_layout(fixture.dir.path(), "..2026_11_28_10_00_00.1");
    assert!(fixture.snapshot().associations[0].is_served());

    // The next generation retires the grant; the visible names do not change, only `..data` does.
    let next = fixture.path("..2026_11_28_10_05_00.2");
    std::fs::create_dir_all(next.join("grants")).unwrap();
    let grant = fixture.grant("g-1");
    grant.state = GrantState::Retired;
    grant.grant_key = None;
    std::fs::write(next.join("grants/g-1.toml"), fixture.grants[0].render().as_bytes()).unwrap();
    std::fs::rename(fixture.path("..2026_11_28_10_00_00.1/certificates"), next.join("certificates")).unwrap();
    std::fs::rename(fixture.path("..2026_11_28_10_00_00.1/associations.toml"), next.join("associations.toml")).unwrap();
    symlink("..2026_11_28_10_05_00.2", fixture.path("..data_tmp")).unwrap();
    std::fs::rename(fixture.path("..data_tmp"), fixture.path("..data")).unwrap();
    let snapshot = fixture.snapshot();
    assert_eq!(snapshot.grants["g-1"], GrantStatus::Retired);
    assert_refused(&snapshot, 0, Check::Grant, reason::GRANT_RETIRED);
}

// -----------------------------------------------------------------------------------------------------------------
// Robustness

/// Every file of a served fixture with one certificate `c-1` under grant `g-1`.
pub(super) const FIXTURE_FILES: [&str; 4] =
    ["associations.toml", "grants/g-1.toml", "certificates/c-1/certificate.pem", "certificates/c-1/private-key.sealed"];

/// `len` random bytes.
pub(super) fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    getrandom::fill(&mut bytes).unwrap();
    bytes
}

/// Every prefix of every file, then random bytes in its place: the read refuses or fails, and never panics.
#[test]
fn truncated_and_garbage_files_never_panic() {
    let mut fixture = Fixture::served();
    fixture.entry("c-1").server_names = Some(vec!["a.example.test".into()]);
    fixture.write();
    for relative in FIXTURE_FILES {
        let path = fixture.path(relative);
        let original = std::fs::read(&path).unwrap();
        let garbage = random_bytes(original.len());
        let variants = (0..original.len()).map(|n| original[..n].to_vec()).chain([garbage, vec![0xff; 3]]);
        for contents in variants {
            std::fs::write(&path, &contents).unwrap();
            let Ok(snapshot) = read_export(fixture.dir.path(), GRANTEE, now()) else { continue };
            fixture.assert_no_secrets(&snapshot);
            // A prefix may lose only a trailing newline, or (for a grant) its optional trailing fields and stay
            // valid; anything else must be refused. A shortened associations.toml may simply list nothing.
            let must_refuse = match relative {
                "associations.toml" => false,
                "grants/g-1.toml" => Grant::parse(&contents, "g-1").is_err(),
                _ => contents.len() + 1 < original.len() || contents != original[..contents.len()],
            };
            if must_refuse {
                assert!(!snapshot.associations[0].is_served(), "{relative}: {:?}", String::from_utf8_lossy(&contents));
            }
        }
        std::fs::write(&path, &original).unwrap();
    }
    assert!(fixture.snapshot().associations[0].is_served());
}

#[test]
fn world_writable_export_files_and_certificate_directories_are_not_taken_in() {
    use std::os::unix::fs::PermissionsExt;
    let chmod = |path: &Path, mode: u32| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    let mut fixture = Fixture::served();
    fixture.add_certificate("c-2", &["c2.example.test"]);
    fixture.associate("c-2", "g-1", None);
    fixture.write();
    let second = |snapshot: &Snapshot| {
        assert!(matches!(snapshot.associations[0].result, Verdict::Served(_)), "the other certificate is served");
        assert_refused(snapshot, 1, Check::Files, reason::CERTIFICATE_FILE)
    };

    let pem = fixture.path("certificates/c-2/certificate.pem");
    chmod(&pem, 0o666);
    let detail = second(&fixture.snapshot());
    assert!(detail.contains("certificate.pem") && detail.contains("world-writable"), "{detail}");
    chmod(&pem, 0o644);

    // Whoever may write to the directory may replace the file.
    let directory = fixture.path("certificates/c-2");
    chmod(&directory, 0o777);
    let detail = second(&fixture.snapshot());
    assert!(detail.contains("certificates/c-2") && detail.contains("world-writable"), "{detail}");
    chmod(&directory, 0o755);

    // A grant file anyone may rewrite (to retire the grant) is unreadable, not gone.
    let grant = fixture.path("grants/g-1.toml");
    chmod(&grant, 0o666);
    let snapshot = fixture.snapshot();
    match &snapshot.grants["g-1"] {
        GrantStatus::Unreadable(detail) => assert!(detail.contains("world-writable"), "{detail}"),
        other => panic!("{other:?}"),
    }
    chmod(&grant, 0o644);
    assert!(fixture.snapshot().associations.iter().all(|a| matches!(a.result, Verdict::Served(_))));
}
