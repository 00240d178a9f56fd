//! The custody writer, checked the way a holder would read its exports: with `format` and `seal` directly (not
//! through the holder's reader), and rustls for key matching and chain verification.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use sealgate::custody::format::{self, Associations, Grant, GrantState, SealedKey};
use sealgate::custody::seal;
use sealgate::custody::writer::{
    export_paths, grant_id_of, AssociateRequest, Custody, CustodyError, ExportLayout, IssueRequest, KeyType, Origin,
    RenewRequest,
};
use sealgate::secret::{SecretBytes, SecretKey32};
use tempfile::TempDir;
use time::{Duration, OffsetDateTime};

struct Fixture {
    dir: TempDir,
    custody: Custody,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let custody = Custody::open(&dir.path().join("state")).unwrap();
        Self { dir, custody }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn export(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn issue(&self, id: &str, names: &[&str]) {
        let request = IssueRequest { certificate_id: Some(id.to_owned()), ..IssueRequest::new(names.iter().copied()) };
        self.custody.issue(&request).unwrap();
    }

    fn associate(&self, id: &str, export: &Path, grantee: &str) -> String {
        self.custody.associate(&AssociateRequest::new(id, export, grantee)).unwrap().grant_id
    }
}

/// Everything a holder learns from one association of an export, after checks 1 to 4.
struct Opened {
    grant: Grant,
    entry: format::AssociationEntry,
    sealed: SealedKey,
    data_key: SecretKey32,
    private_key: SecretBytes,
    chain: Vec<CertificateDer<'static>>,
}

fn associations(export: &Path) -> Associations {
    Associations::parse(&fs::read(ExportLayout::new(export).associations()).unwrap()).unwrap()
}

fn read_grant(export: &Path, grant_id: &str) -> Grant {
    Grant::parse(&fs::read(ExportLayout::new(export).grant(grant_id)).unwrap(), grant_id).unwrap()
}

/// Opens the association of `certificate_id` in `export` as a holder would, asserting every check.
fn open(export: &Path, certificate_id: &str) -> Opened {
    let entry = associations(export).entries.into_iter().find(|e| e.certificate_id == certificate_id).unwrap();
    let grant = read_grant(export, &entry.grant_id);
    assert_eq!(grant.state, GrantState::Active);
    assert!(grant.operations.iter().any(|o| o == format::DECRYPT_OPERATION));
    let paths = export_paths(export, certificate_id);
    let sealed = SealedKey::parse(&fs::read(&paths.sealed_key).unwrap(), certificate_id).unwrap();
    assert_eq!(grant.key_id, sealed.key_id, "check 2");
    let aad = seal::data_key_aad(&grant.grant_id, certificate_id, &grant.key_id);
    let data_key = seal::unwrap_data_key(grant.grant_key.as_ref().unwrap(), &entry.wrapped_data_key().unwrap(), &aad)
        .expect("the wrapped data key opens with the grant key");
    let private_key = seal::open_private_key(
        &data_key,
        &sealed.nonce,
        &sealed.ciphertext,
        &seal::sealed_key_aad(certificate_id, &sealed.key_id),
    )
    .expect("the sealed key opens with the data key");
    let chain: Vec<_> =
        CertificateDer::pem_slice_iter(&fs::read(&paths.certificate_pem).unwrap()).collect::<Result<_, _>>().unwrap();
    assert_key_matches(&chain, &private_key);
    Opened { grant, entry, sealed, data_key, private_key, chain }
}

fn assert_key_matches(chain: &[CertificateDer<'static>], pkcs8: &SecretBytes) {
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.expose()));
    let key = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der).expect("a PKCS#8 key rustls can use");
    CertifiedKey::new(chain.to_vec(), key).keys_match().expect("check 4: the key matches the leaf");
}

fn assert_verifies(ca_pem: &str, chain: &[CertificateDer<'static>], name: &str) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
    let name = ServerName::try_from(name.to_owned()).unwrap();
    verifier.verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now()).unwrap();
}

/// Every regular file under `dir`, with its contents.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            let bytes = fs::read(&path).unwrap();
            files.push((path, bytes));
        }
    }
    files
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn issued_certificates_of_every_key_type_open_from_the_export() {
    let f = Fixture::new();
    let export = f.export("export");
    let ca = f.custody.ca_certificate_pem().unwrap();
    for key_type in KeyType::ALL {
        let id = format!("c-{key_type}");
        let name = format!("{key_type}.example.test");
        let request = IssueRequest {
            certificate_id: Some(id.clone()),
            key_type,
            ..IssueRequest::new([name.clone(), "*.Wild.Example.Test".to_owned()])
        };
        let record = f.custody.issue(&request).unwrap();
        assert_eq!(record.key_type, key_type.as_str());
        assert_eq!(record.names, [name.clone(), "*.wild.example.test".to_owned()]);
        assert_eq!(record.origin, Origin::Issued);
        let lifetime = record.not_after - record.not_before;
        assert_eq!(lifetime, Duration::days(90) + Duration::hours(1));

        let grant = f.custody.associate(&AssociateRequest::new(&id, &export, "holder")).unwrap();
        assert!(grant.grant_id.starts_with("g-") && grant.grant_id.len() == 14, "{}", grant.grant_id);
        assert_eq!(grant_id_of(&id, &export).unwrap().as_deref(), Some(grant.grant_id.as_str()));

        let opened = open(&export, &id);
        assert_eq!(opened.grant.grantee, "holder");
        assert_eq!(opened.grant.key_id, f.custody.key_id());
        assert_eq!(opened.grant.key_alias.as_deref(), Some("aws/acm"));
        assert!(opened.grant.not_after.is_none() && opened.entry.server_names.is_none());
        assert_eq!(opened.chain.len(), 1, "issued certificates are signed by the root directly");
        assert_verifies(&ca, &opened.chain, &name);
        assert_verifies(&ca, &opened.chain, "any.wild.example.test");
        assert_eq!(fs::read_to_string(export_paths(&export, &id).certificate_pem).unwrap(), record.certificate_pem);
    }
    assert_eq!(associations(&export).entries.len(), KeyType::ALL.len());
    assert!(f.custody.key_id().starts_with("arn:aws:kms:local:000000000000:key/"));
}

#[test]
fn the_state_is_reopened_with_the_same_key_and_ca() {
    let f = Fixture::new();
    let ca = f.custody.ca_certificate_pem().unwrap();
    f.issue("c-1", &["one.example.test"]);
    let again = Custody::open(&f.state()).unwrap();
    assert_eq!(again.key_id(), f.custody.key_id());
    assert_eq!(again.ca_certificate_pem().unwrap(), ca);
    let export = f.export("export");
    again.associate(&AssociateRequest::new("c-1", &export, "holder")).unwrap();
    assert_verifies(&ca, &open(&export, "c-1").chain, "one.example.test");
}

/// A chain of two (leaf, intermediate) made with rcgen, and the leaf's key as PKCS#8 PEM.
fn rcgen_chain(names: &[&str]) -> (String, String, Vec<u8>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let leaf = rcgen::CertificateParams::new(names).unwrap().signed_by(&leaf_key, &issuer).unwrap();
    (format!("{}{}", leaf.pem(), ca_cert.pem()), leaf_key.serialize_pem(), leaf_key.serialize_der())
}

#[test]
fn imported_chains_and_keys_open_from_the_export() {
    let f = Fixture::new();
    let export = f.export("export");
    let (chain_pem, key_pem, key_der) = rcgen_chain(&["imported.example.test"]);
    let record = f.custody.import(Some("c-imported"), chain_pem.as_bytes(), key_pem.as_bytes()).unwrap();
    assert_eq!((record.origin, record.key_type.as_str()), (Origin::Imported, "ecdsa-p384"));
    assert_eq!(record.names, ["imported.example.test"]);
    f.associate("c-imported", &export, "holder");
    let opened = open(&export, "c-imported");
    assert_eq!(opened.chain.len(), 2, "the intermediate is kept");
    assert_eq!(opened.private_key.expose(), key_der, "a PKCS#8 key is sealed as given");

    // A random id, and text around the blocks (as OpenSSL writes it) is dropped from the export.
    let (chain_pem, key_pem, _) = rcgen_chain(&["other.example.test"]);
    let noisy = format!("subject=CN = other\n{chain_pem}");
    let record = f.custody.import(None, noisy.as_bytes(), key_pem.as_bytes()).unwrap();
    assert!(record.certificate_id.starts_with("c-") && record.certificate_id.len() == 14);
    assert!(!record.certificate_pem.contains("subject="));
}

#[test]
fn sec1_and_pkcs1_keys_are_imported_as_pkcs8() {
    use aws_lc_rs::encoding::{AsDer, EcPrivateKeyRfc5915Der};
    use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};

    let f = Fixture::new();
    let export = f.export("export");

    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
    let signer = rcgen::KeyPair::try_from(pair.to_pkcs8v1().unwrap().as_ref()).unwrap();
    let cert =
        rcgen::CertificateParams::new(vec!["sec1.example.test".to_owned()]).unwrap().self_signed(&signer).unwrap();
    let sec1: EcPrivateKeyRfc5915Der<'static> = pair.private_key().as_der().unwrap();
    let sec1_pem = pem_block("EC PRIVATE KEY", sec1.as_ref());
    f.custody.import(Some("c-sec1"), cert.pem().as_bytes(), sec1_pem.as_bytes()).unwrap();

    let pkcs1_pem = include_str!("data/rsa-2048-pkcs1.pem");
    let signer = rcgen::KeyPair::from_pem(pkcs1_pem).unwrap();
    let cert =
        rcgen::CertificateParams::new(vec!["rsa.example.test".to_owned()]).unwrap().self_signed(&signer).unwrap();
    let record = f.custody.import(Some("c-pkcs1"), cert.pem().as_bytes(), pkcs1_pem.as_bytes()).unwrap();
    assert_eq!(record.key_type, "rsa-2048");

    for id in ["c-sec1", "c-pkcs1"] {
        f.associate(id, &export, "holder");
        // `open` loads the key as PKCS#8 and matches it against the leaf.
        open(&export, id);
    }
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = text.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

#[test]
fn imports_that_do_not_fit_are_refused() {
    let f = Fixture::new();
    let (chain_a, _, _) = rcgen_chain(&["a.example.test"]);
    let (_, key_b, _) = rcgen_chain(&["b.example.test"]);
    let err = f.custody.import(Some("c-mismatch"), chain_a.as_bytes(), key_b.as_bytes()).unwrap_err();
    assert!(matches!(err, CustodyError::KeyMismatch), "{err}");
    assert!(f.custody.list().unwrap().certificates.is_empty(), "nothing is stored");

    let (chain, key, _) = rcgen_chain(&["c.example.test"]);
    let err = f.custody.import(Some("c-x"), b"no pem here", key.as_bytes()).unwrap_err();
    assert!(matches!(err, CustodyError::Chain(_)), "{err}");
    let encrypted = key.replace("PRIVATE KEY", "ENCRYPTED PRIVATE KEY");
    let err = f.custody.import(Some("c-x"), chain.as_bytes(), encrypted.as_bytes()).unwrap_err();
    assert!(err.to_string().contains("encrypted"), "{err}");
    let err = f.custody.import(Some("../x"), chain.as_bytes(), key.as_bytes()).unwrap_err();
    assert!(matches!(err, CustodyError::InvalidId { .. }), "{err}");

    // A leaf without DNS names cannot be served by name.
    let no_names = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().self_signed(&no_names).unwrap();
    let err = f.custody.import(None, cert.pem().as_bytes(), no_names.serialize_pem().as_bytes()).unwrap_err();
    assert!(err.to_string().contains("DNS"), "{err}");

    f.custody.import(Some("c-ok"), chain.as_bytes(), key.as_bytes()).unwrap();
    let err = f.custody.import(Some("c-ok"), chain.as_bytes(), key.as_bytes()).unwrap_err();
    assert!(matches!(err, CustodyError::CertificateExists(ref id) if id == "c-ok"), "{err}");
}

#[test]
fn issue_validates_ids_names_and_validity() {
    let f = Fixture::new();
    let cases: [(IssueRequest, &str); 5] = [
        (IssueRequest { certificate_id: Some("c/1".into()), ..IssueRequest::new(["a.test"]) }, "not a valid id"),
        (IssueRequest::new(Vec::<String>::new()), "at least one DNS name"),
        (IssueRequest::new(["a..test"]), "a..test"),
        (IssueRequest::new(["127.0.0.1"]), "IP addresses"),
        (
            IssueRequest {
                not_after: Some(OffsetDateTime::now_utc() - Duration::days(1)),
                ..IssueRequest::new(["a.test"])
            },
            "must end after it begins",
        ),
    ];
    for (request, needle) in cases {
        let err = f.custody.issue(&request).unwrap_err().to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
    let past = OffsetDateTime::now_utc() - Duration::days(30);
    let request = IssueRequest {
        not_before: Some(past - Duration::days(1)),
        not_after: Some(past),
        ..IssueRequest::new(["expired.test"])
    };
    let record = f.custody.issue(&request).unwrap();
    assert_eq!(record.not_after.unix_timestamp(), past.unix_timestamp(), "expired certificates can be made for tests");
}

#[test]
fn renewal_keeps_the_id_and_rewrites_every_export_consistently() {
    let f = Fixture::new();
    let (a, b) = (f.export("a"), f.export("b"));
    f.issue("c-renew", &["renew.example.test"]);
    f.issue("c-other", &["other.example.test"]);
    let grant_a = f.associate("c-renew", &a, "holder-a");
    let grant_b = f.associate("c-renew", &b, "holder-b");
    f.associate("c-other", &a, "holder-a");
    let before_a = open(&a, "c-renew");
    let before_b = open(&b, "c-renew");
    let other_before = fs::read(ExportLayout::new(&a).sealed_key("c-other")).unwrap();
    let grant_file_before = fs::read(ExportLayout::new(&a).grant(&grant_a)).unwrap();

    let mut renewal = f.custody.renew("c-renew", &RenewRequest::reissue()).unwrap();
    assert_eq!(renewal.certificate.certificate_id, "c-renew");
    assert_eq!(renewal.certificate.generation, 2);
    renewal.exports.sort();
    assert_eq!(renewal.exports, [fs::canonicalize(&a).unwrap(), fs::canonicalize(&b).unwrap()]);

    for (export, before, grant_id) in [(&a, &before_a, &grant_a), (&b, &before_b, &grant_b)] {
        let after = open(export, "c-renew");
        assert_eq!(&after.grant.grant_id, grant_id, "the grant is unchanged");
        assert_ne!(after.chain, before.chain, "a new certificate");
        assert_ne!(after.private_key.expose(), before.private_key.expose(), "a new key pair");
        assert_ne!(after.data_key.expose(), before.data_key.expose(), "a new data key");
        assert_ne!(after.sealed, before.sealed);
        assert_ne!(after.entry.wrapped_data_key, before.entry.wrapped_data_key);
        // The old data key no longer opens anything.
        let aad = seal::sealed_key_aad("c-renew", &after.sealed.key_id);
        assert!(seal::open_private_key(&before.data_key, &after.sealed.nonce, &after.sealed.ciphertext, &aad).is_err());
        assert_verifies(&f.custody.ca_certificate_pem().unwrap(), &after.chain, "renew.example.test");
    }
    assert_eq!(open(&a, "c-renew").data_key.expose(), open(&b, "c-renew").data_key.expose(), "one data key");
    assert_eq!(fs::read(ExportLayout::new(&a).grant(&grant_a)).unwrap(), grant_file_before);
    assert_eq!(fs::read(ExportLayout::new(&a).sealed_key("c-other")).unwrap(), other_before, "others untouched");
    assert_eq!(associations(&a).entries.len(), 2);

    // A new key type on request.
    let request = RenewRequest::Reissue { key_type: Some(KeyType::Ed25519), not_before: None, not_after: None };
    assert_eq!(f.custody.renew("c-renew", &request).unwrap().certificate.key_type, "ed25519");
    open(&a, "c-renew");
}

#[test]
fn a_renewal_rewrites_every_export_it_can_and_names_those_it_cannot() {
    let f = Fixture::new();
    let (a, b) = (f.export("a"), f.export("b"));
    f.issue("c-renew", &["renew.example.test"]);
    let grant_a = f.associate("c-renew", &a, "holder-a");
    let grant_b = f.associate("c-renew", &b, "holder-b");
    // Break the export a renewal visits first (grants go in id order): stopping there would strand the other.
    let (broken, intact) = if grant_a < grant_b { (&a, &b) } else { (&b, &a) };
    let broken_before = open(broken, "c-renew");
    let intact_before = open(intact, "c-renew");
    let associations = ExportLayout::new(broken).associations();
    let good = fs::read(&associations).unwrap();
    fs::write(&associations, "format = [\n").unwrap();

    let err = f.custody.renew("c-renew", &RenewRequest::reissue()).unwrap_err();
    let text = err.to_string();
    let CustodyError::RenewalIncomplete { generation, rewritten, failed, .. } = &err else { panic!("{text}") };
    assert_eq!(*generation, 2);
    assert_eq!(rewritten, &[fs::canonicalize(intact).unwrap()]);
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].export, fs::canonicalize(broken).unwrap());
    assert!(text.contains("c-renew") && text.contains("associations.toml"), "{text}");
    assert_ne!(open(intact, "c-renew").chain, intact_before.chain, "the export after the broken one was rewritten");
    fs::write(&associations, good).unwrap();
    assert_eq!(open(broken, "c-renew").chain, broken_before.chain, "the broken export holds the last generation");

    // Fixed, a renewal reaches both.
    let renewal = f.custody.renew("c-renew", &RenewRequest::reissue()).unwrap();
    assert_eq!((renewal.certificate.generation, renewal.exports.len()), (3, 2));
    assert_eq!(open(broken, "c-renew").chain, open(intact, "c-renew").chain);
}

#[test]
fn renewal_skips_retired_grants_and_imported_certificates_need_a_new_chain() {
    let f = Fixture::new();
    let (a, b) = (f.export("a"), f.export("b"));
    let (chain, key, _) = rcgen_chain(&["imp.example.test"]);
    f.custody.import(Some("c-imp"), chain.as_bytes(), key.as_bytes()).unwrap();
    f.associate("c-imp", &a, "holder");
    let retired = f.associate("c-imp", &b, "holder");
    f.custody.retire_grant(&retired).unwrap();
    let retired_entry = associations(&b).entries;

    let err = f.custody.renew("c-imp", &RenewRequest::reissue()).unwrap_err();
    assert!(err.to_string().contains("imported"), "{err}");

    let (chain2, key2, key2_der) = rcgen_chain(&["imp.example.test"]);
    let request =
        RenewRequest::Replace { chain_pem: chain2.into_bytes(), key_pem: SecretBytes::new(key2.into_bytes()) };
    let renewal = f.custody.renew("c-imp", &request).unwrap();
    assert_eq!(renewal.exports, [fs::canonicalize(&a).unwrap()], "only the grant in force is rewritten");
    assert_eq!(open(&a, "c-imp").private_key.expose(), key2_der);
    assert_eq!(associations(&b).entries, retired_entry);

    // A replacement that no longer covers an association's server names is refused before anything changes.
    let c = f.export("c");
    let request = AssociateRequest {
        server_names: Some(vec!["imp.example.test".into()]),
        ..AssociateRequest::new("c-imp", &c, "holder")
    };
    f.custody.associate(&request).unwrap();
    let (chain3, key3, _) = rcgen_chain(&["elsewhere.example.test"]);
    let request =
        RenewRequest::Replace { chain_pem: chain3.into_bytes(), key_pem: SecretBytes::new(key3.into_bytes()) };
    let err = f.custody.renew("c-imp", &request).unwrap_err();
    assert!(matches!(err, CustodyError::NameNotCovered { .. }), "{err}");
    assert_eq!(f.custody.certificate("c-imp").unwrap().generation, 2);
}

#[test]
fn disassociation_retires_the_grant_and_removes_the_association_and_files() {
    let f = Fixture::new();
    let export = f.export("export");
    f.issue("c-gone", &["gone.example.test"]);
    f.issue("c-stays", &["stays.example.test"]);
    let grant_id = f.associate("c-gone", &export, "holder");
    f.associate("c-stays", &export, "holder");
    let paths = export_paths(&export, "c-gone");

    let ended = f.custody.disassociate("c-gone", &export).unwrap();
    assert_eq!(
        (ended.grant_id.as_str(), ended.state, ended.associated),
        (grant_id.as_str(), GrantState::Retired, false)
    );
    let grant = read_grant(&export, &grant_id);
    assert_eq!(grant.state, GrantState::Retired);
    assert!(grant.grant_key.is_none());
    let text = fs::read_to_string(ExportLayout::new(&export).grant(&grant_id)).unwrap();
    assert!(!text.contains("grant_key"), "{text}");
    assert_eq!(grant_id_of("c-gone", &export).unwrap(), None);
    assert!(!paths.certificate_dir.exists() && !paths.sealed_key.exists());
    open(&export, "c-stays");

    let listing = f.custody.list().unwrap();
    let recorded = listing.grants.iter().find(|g| g.grant_id == grant_id).unwrap();
    assert_eq!((recorded.state, recorded.associated), (GrantState::Retired, false));
    assert_eq!(listing.associations().count(), 1);

    let err = f.custody.disassociate("c-gone", &export).unwrap_err();
    assert!(matches!(err, CustodyError::NotAssociated { .. }), "{err}");

    // Re-association creates a new grant; the retired one stays retired.
    let again = f.associate("c-gone", &export, "holder");
    assert_ne!(again, grant_id);
    open(&export, "c-gone");
    assert_eq!(read_grant(&export, &grant_id).state, GrantState::Retired);
}

#[test]
fn retiring_a_grant_leaves_the_association_for_holders_to_refuse() {
    let f = Fixture::new();
    let export = f.export("export");
    f.issue("c-1", &["one.example.test"]);
    let grant_id = f.associate("c-1", &export, "holder");
    let err = f.custody.associate(&AssociateRequest::new("c-1", &export, "holder")).unwrap_err();
    assert!(
        matches!(err, CustodyError::AlreadyAssociated { grant_id: ref existing, .. } if *existing == grant_id),
        "{err}"
    );

    let retired = f.custody.retire_grant(&grant_id).unwrap();
    assert_eq!((retired.state, retired.associated), (GrantState::Retired, true));
    let grant = read_grant(&export, &grant_id);
    assert_eq!(grant.state, GrantState::Retired);
    assert!(grant.grant_key.is_none());
    assert_eq!(grant_id_of("c-1", &export).unwrap().as_deref(), Some(grant_id.as_str()), "the association stays");
    assert!(export_paths(&export, "c-1").sealed_key.exists());

    // Re-association replaces the entry, under a new grant.
    let new_grant = f.associate("c-1", &export, "holder");
    assert_ne!(new_grant, grant_id);
    assert_eq!(associations(&export).entries.len(), 1);
    open(&export, "c-1");
    assert!(!f.custody.grant(&grant_id).unwrap().associated);
    let err = f.custody.retire_grant("g-000000000000").unwrap_err();
    assert!(matches!(err, CustodyError::UnknownGrant(_)), "{err}");
}

#[test]
fn grant_lapse_and_server_names_are_written() {
    let f = Fixture::new();
    let export = f.export("export");
    f.issue("c-1", &["www.example.test", "*.example.test"]);
    let not_after = OffsetDateTime::now_utc() + Duration::days(7);
    let request = AssociateRequest {
        server_names: Some(vec!["WWW.example.test.".into(), "api.example.test".into(), "www.example.test".into()]),
        grant_not_after: Some(not_after),
        ..AssociateRequest::new("c-1", &export, "holder")
    };
    let record = f.custody.associate(&request).unwrap();
    let opened = open(&export, "c-1");
    assert_eq!(opened.grant.not_after.unwrap().unix_timestamp(), not_after.unix_timestamp());
    assert_eq!(record.not_after, opened.grant.not_after);
    let names = ["www.example.test".to_owned(), "api.example.test".to_owned()];
    assert_eq!(opened.entry.server_names.as_deref(), Some(&names[..]));

    let uncovered = AssociateRequest {
        server_names: Some(vec!["a.b.example.test".into()]),
        ..AssociateRequest::new("c-1", f.export("other"), "holder")
    };
    let err = f.custody.associate(&uncovered).unwrap_err();
    assert!(matches!(err, CustodyError::NameNotCovered { .. }), "{err}");
    // Holders' tests may still write one, for check 5 to refuse.
    let forced = AssociateRequest { allow_uncovered_server_names: true, ..uncovered };
    f.custody.associate(&forced).unwrap();
    let entry = associations(&f.export("other")).entries.remove(0);
    assert_eq!(entry.server_names.unwrap(), ["a.b.example.test"]);

    // A grant that has already lapsed is accepted, and can be replaced like a retired one.
    f.issue("c-2", &["two.example.test"]);
    let lapsed = AssociateRequest {
        grant_not_after: Some(OffsetDateTime::now_utc() - Duration::hours(1)),
        ..AssociateRequest::new("c-2", &export, "holder")
    };
    let old = f.custody.associate(&lapsed).unwrap().grant_id;
    let new = f.associate("c-2", &export, "holder");
    assert_ne!(old, new);
}

#[test]
fn state_secrets_never_reach_the_export() {
    use base64::Engine as _;
    let f = Fixture::new();
    let export = f.export("export");
    f.issue("c-1", &["one.example.test"]);
    f.associate("c-1", &export, "holder");
    let grant_id = f.associate("c-1", &f.export("second"), "holder");
    f.custody.retire_grant(&grant_id).unwrap();

    let master = fs::read(f.state().join("master.key")).unwrap();
    assert_eq!(master.len(), 32);
    let master_b64 = base64::engine::general_purpose::STANDARD.encode(&master);
    // Every value the state seals under the master key.
    let mut sealed_values =
        vec![fs::read_to_string(f.state().join("ca/private-key.sealed")).unwrap().trim().to_owned()];
    for (path, bytes) in files_under(&f.state()) {
        if path.extension().is_some_and(|e| e == "toml") {
            let doc: toml::Table = toml::from_str(std::str::from_utf8(&bytes).unwrap()).unwrap();
            for key in ["data_key", "grant_key"] {
                if let Some(value) = doc.get(key).and_then(|v| v.as_str()) {
                    sealed_values.push(value.to_owned());
                }
            }
        }
    }
    // The CA key, the data key and the active grant's key (a retired grant's key is forgotten).
    assert_eq!(sealed_values.len(), 3, "{sealed_values:?}");
    for (path, bytes) in files_under(&export).into_iter().chain(files_under(&f.export("second"))) {
        assert!(!contains(&bytes, &master) && !contains(&bytes, master_b64.as_bytes()), "{}", path.display());
        for value in &sealed_values {
            assert!(!contains(&bytes, value.as_bytes()), "{} holds a state secret", path.display());
        }
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("PRIVATE KEY"), "{}", path.display());
    }
}

#[test]
fn writes_leave_no_temporary_files_and_state_files_are_private() {
    let f = Fixture::new();
    let export = f.export("export");
    f.issue("c-1", &["one.example.test"]);
    f.associate("c-1", &export, "holder");
    f.custody.renew("c-1", &RenewRequest::reissue()).unwrap();
    f.issue("c-2", &["two.example.test"]);
    f.associate("c-2", &export, "holder");
    f.custody.disassociate("c-2", &export).unwrap();

    for root in [f.state(), export.clone()] {
        for (path, _) in files_under(&root) {
            let name = path.file_name().unwrap().to_string_lossy();
            assert!(!name.starts_with('.'), "left behind: {}", path.display());
        }
    }
    for (path, _) in files_under(&f.state()) {
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600, "{}", path.display());
        let dir = path.parent().unwrap();
        assert_eq!(fs::metadata(dir).unwrap().permissions().mode() & 0o777, 0o700, "{}", dir.display());
    }
    let grant = ExportLayout::new(&export).grant(&grant_id_of("c-1", &export).unwrap().unwrap());
    assert_eq!(fs::metadata(grant).unwrap().permissions().mode() & 0o777, 0o600, "grant files hold a key");
}

#[test]
fn errors_name_what_failed_and_never_the_keys() {
    use base64::Engine as _;
    let f = Fixture::new();
    let export = f.export("export");
    let err = f.custody.associate(&AssociateRequest::new("c-nope", &export, "holder")).unwrap_err();
    assert_eq!(err.to_string(), "no certificate c-nope in the custody state");
    f.issue("c-1", &["one.example.test"]);

    // Another master key: nothing sealed under the old one opens, and the error says which secret.
    let master_path = f.state().join("master.key");
    let old_master = fs::read(&master_path).unwrap();
    fs::write(&master_path, [7u8; 32]).unwrap();
    let custody = Custody::open(&f.state()).unwrap();
    let err = custody.associate(&AssociateRequest::new("c-1", &export, "holder")).unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(matches!(err, CustodyError::Seal { .. }) && text.contains("c-1"), "{text}");
    let old_b64 = base64::engine::general_purpose::STANDARD.encode(&old_master);
    assert!(!text.contains(&old_b64) && !text.contains("BwcH"), "{text}");
    assert!(!format!("{custody:?}").contains("BwcH"));

    fs::write(&master_path, [7u8; 31]).unwrap();
    let err = Custody::open(&f.state()).unwrap_err();
    assert!(err.to_string().contains("master.key"), "{err}");
}

// -----------------------------------------------------------------------------------------------------------------
// The command line.

fn sealgate(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_sealgate"))
        .arg("custody")
        .args(args)
        .current_dir(dir)
        .env("SEALGATE_CUSTODY_STATE", dir.join("state"))
        .output()
        .unwrap();
    (output.status.success(), String::from_utf8(output.stdout).unwrap(), String::from_utf8(output.stderr).unwrap())
}

#[test]
fn the_command_line_works_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let (ok, stdout, stderr) = sealgate(dir.path(), args);
        assert!(ok, "{args:?}: {stderr}");
        stdout
    };
    let out = run(&["issue", "--id", "c-cli", "--name", "cli.example.test,www.cli.example.test", "--not-after", "30d"]);
    assert!(out.contains("issued c-cli") && out.contains("ecdsa-p256"), "{out}");
    let out = run(&["associate", "c-cli", "--export", "export", "--grantee", "holder", "--grant-not-after", "7d"]);
    assert!(out.contains("under grant g-"), "{out}");
    let export = dir.path().join("export");
    let grant_id = grant_id_of("c-cli", &export).unwrap().unwrap();
    assert!(out.contains(&grant_id), "{out}");
    let opened = open(&export, "c-cli");
    assert!(opened.grant.not_after.is_some());

    let listing = run(&["list"]);
    assert!(
        listing.contains("arn:aws:kms:local:") && listing.contains("c-cli") && listing.contains(&grant_id),
        "{listing}"
    );
    assert!(!listing.contains(&format::encode_base64(opened.grant.grant_key.as_ref().unwrap().expose())), "{listing}");

    let ca = run(&["ca"]);
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{ca}");
    assert_verifies(&ca, &opened.chain, "www.cli.example.test");
    run(&["--state", "state", "ca", "--out", "ca.pem"]);
    assert_eq!(fs::read_to_string(dir.path().join("ca.pem")).unwrap(), ca);

    let out = run(&["renew", "c-cli"]);
    assert!(out.contains("generation 2") && out.contains("rewrote"), "{out}");
    open(&export, "c-cli");

    let out = run(&["disassociate", "c-cli", "--export", "export"]);
    assert!(out.contains(&grant_id) && out.contains("retired"), "{out}");
    assert_eq!(read_grant(&export, &grant_id).state, GrantState::Retired);
    assert!(run(&["list"]).contains(&format!("{grant_id} retired")));

    let (ok, _, stderr) = sealgate(dir.path(), &["associate", "c-nope", "--export", "export", "--grantee", "x"]);
    assert!(!ok && stderr.contains("c-nope"), "{stderr}");
    let (ok, _, stderr) = sealgate(dir.path(), &["import", "--chain", "missing.pem", "--key", "missing.key"]);
    assert!(!ok && stderr.contains("missing.pem") && stderr.contains("No such file"), "{stderr}");
    let (ok, _, stderr) = sealgate(dir.path(), &["retire-grant", "--help"]);
    assert!(ok && stderr.is_empty());
}

#[test]
fn the_command_line_runs_one_command_at_a_time_per_state_directory() {
    use std::io::BufRead as _;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // This test holds the directory, as another `sealgate custody` midway through a command would.
    let held = Custody::lock(&state, || panic!("nothing else holds the state yet")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sealgate"))
        .args(["custody", "issue", "--id", "c-wait", "--name", "wait.example.test"])
        .current_dir(dir.path())
        .env("SEALGATE_CUSTODY_STATE", &state)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, received) = std::sync::mpsc::channel();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || stderr.lines().map_while(Result::ok).try_for_each(|line| lines.send(line)));
    let said = received.recv_timeout(Duration::from_secs(30)).expect("the command says why it waits");
    assert!(said.contains("another sealgate custody is using") && said.contains("state"), "{said}");
    assert!(child.try_wait().unwrap().is_none(), "it waits for the lock");
    assert!(!state.join("custody.toml").exists(), "it has not touched the state while waiting");

    drop(held);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the command still waits after the lock was released");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    assert!(status.success() && stdout.contains("issued c-wait"), "{status}: {stdout}");
    // Released when the command ended: the next one does not wait.
    let (ok, _, stderr) = sealgate(dir.path(), &["list"]);
    assert!(ok && !stderr.contains("waiting"), "{stderr}");
}

#[test]
fn the_command_line_imports_and_renews_imported_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let (chain, key, _) = rcgen_chain(&["imp.example.test"]);
    fs::write(dir.path().join("chain.pem"), chain).unwrap();
    fs::write(dir.path().join("key.pem"), key).unwrap();
    let (ok, out, err) = sealgate(dir.path(), &["import", "--id", "c-imp", "--chain", "chain.pem", "--key", "key.pem"]);
    assert!(ok && out.contains("imported c-imp"), "{err}");
    let (ok, _, err) = sealgate(dir.path(), &["associate", "c-imp", "--export", "e", "--grantee", "g"]);
    assert!(ok, "{err}");
    let (chain, key, _) = rcgen_chain(&["imp.example.test"]);
    fs::write(dir.path().join("chain2.pem"), chain).unwrap();
    fs::write(dir.path().join("key2.pem"), key).unwrap();
    let (ok, out, err) = sealgate(dir.path(), &["renew", "c-imp", "--chain", "chain2.pem", "--key", "key2.pem"]);
    assert!(ok && out.contains("generation 2"), "{err}");
    open(&dir.path().join("e"), "c-imp");
}

#[test]
fn the_committed_demo_export_is_consistent() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = sealgate::config::Config::load(&root.join("proxy.toml")).unwrap();
    assert_eq!(config.custody.export, root.join("certs-example/export"));
    let opened = open(&config.custody.export, "c-localhost");
    assert_eq!(opened.grant.grantee, config.custody.grantee);
    assert_eq!(opened.grant.grantee, "sealgate-demo");
    let ca = fs::read_to_string(root.join("certs-example/ca.pem")).unwrap();
    assert_verifies(&ca, &opened.chain, "localhost");
    let (_, leaf) = x509_parser::parse_x509_certificate(&opened.chain[0]).unwrap();
    let not_after = leaf.validity().not_after.to_datetime();
    assert!(not_after > OffsetDateTime::now_utc() + Duration::days(5 * 365), "regenerate certs-example: {not_after}");
}

#[test]
fn the_local_ca_names_a_crl_in_certificates_issued_after_it_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let (ok, stdout, stderr) = sealgate(dir.path(), args);
        assert!(ok, "{args:?}: {stderr}");
        stdout
    };
    let crl_of = |id: &str| {
        run(&["associate", id, "--export", "export", "--grantee", "holder"]);
        let pem = fs::read(export_paths(&dir.path().join("export"), id).certificate_pem).unwrap();
        let der = CertificateDer::pem_slice_iter(&pem).next().unwrap().unwrap();
        let (_, certificate) = x509_parser::parse_x509_certificate(&der).unwrap();
        certificate.extensions().iter().find_map(|extension| match extension.parsed_extension() {
            x509_parser::extensions::ParsedExtension::CRLDistributionPoints(points) => Some(format!("{points:?}")),
            _ => None,
        })
    };
    run(&["issue", "--id", "c-before", "--name", "a.example.test"]);
    assert_eq!(crl_of("c-before"), None);

    run(&["ca", "--crl-url", "http://crl.example.test/ca.crl"]);
    run(&["issue", "--id", "c-after", "--name", "a.example.test"]);
    let points = crl_of("c-after").expect("a CRL distribution point");
    assert!(points.contains("http://crl.example.test/ca.crl"), "{points}");

    let (ok, _, stderr) = sealgate(dir.path(), &["ca", "--crl-url", "ftp://nope"]);
    assert!(!ok && stderr.contains("http(s) URL"), "{stderr}");
    run(&["ca", "--no-crl-url"]);
    run(&["issue", "--id", "c-cleared", "--name", "a.example.test"]);
    assert_eq!(crl_of("c-cleared"), None);
}
