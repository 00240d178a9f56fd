//! Every holder check, end to end: an export where one association passes and each of the others fails one
//! check. The server serves the good one, refuses handshakes for every refused name with an alert, and reports
//! each refusal naming the certificate, the grant and the check.

mod common;

use common::*;
use sealgate::custody::format::{Associations, SealedKey};
use sealgate::custody::snapshot::Check;
use sealgate::custody::writer::{export_paths, AssociateRequest};
use time::OffsetDateTime;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_refused_association_is_refused_alone_and_the_rest_is_served() {
    let f = Fixture::new();
    f.serve("c-good", &["good.example.test"]);

    // Check 1: retired, another grantee, lapsed, missing.
    let retired = f.serve("c-retired", &["retired.example.test"]);
    f.custody.retire_grant(&retired).unwrap();
    f.issue("c-other", &["other.example.test"]);
    f.custody.associate(&AssociateRequest::new("c-other", &f.export, "someone-else")).unwrap();
    f.issue("c-lapsed", &["lapsed.example.test"]);
    let mut lapsed = AssociateRequest::new("c-lapsed", &f.export, GRANTEE);
    lapsed.grant_not_after = Some(OffsetDateTime::now_utc() - time::Duration::minutes(1));
    f.custody.associate(&lapsed).unwrap();
    let missing = f.serve("c-missing", &["missing.example.test"]);
    std::fs::remove_file(f.export.join("grants").join(format!("{missing}.toml"))).unwrap();

    // Check 2: the sealed key names another KMS key.
    f.serve("c-key-id", &["keyid.example.test"]);
    let sealed_path = export_paths(&f.export, "c-key-id").sealed_key;
    let mut sealed = SealedKey::parse(&std::fs::read(&sealed_path).unwrap(), "c-key-id").unwrap();
    sealed.key_id = "arn:aws:kms:local:000000000000:key/another".to_owned();
    std::fs::write(&sealed_path, sealed.render()).unwrap();

    // Check 3: a tampered sealed key, and a tampered wrapped data key.
    f.serve("c-sealed", &["sealed.example.test"]);
    let sealed_path = export_paths(&f.export, "c-sealed").sealed_key;
    let mut sealed = SealedKey::parse(&std::fs::read(&sealed_path).unwrap(), "c-sealed").unwrap();
    sealed.ciphertext[10] ^= 0x01;
    std::fs::write(&sealed_path, sealed.render()).unwrap();
    f.serve("c-wrapped", &["wrapped.example.test"]);
    let associations_path = f.export.join("associations.toml");
    let mut associations = Associations::parse(&std::fs::read(&associations_path).unwrap()).unwrap();
    let entry = associations.entries.iter_mut().find(|e| e.certificate_id == "c-wrapped").unwrap();
    let mut wrapped = entry.wrapped_data_key().unwrap();
    wrapped[20] ^= 0x01;
    entry.wrapped_data_key = sealgate::custody::format::encode_base64(&wrapped);
    std::fs::write(&associations_path, associations.render()).unwrap();

    // Check 4: a certificate that is not the key's (another certificate's leaf in its place).
    f.serve("c-mismatch", &["mismatch.example.test"]);
    f.issue("c-donor", &["mismatch.example.test"]);
    std::fs::write(
        export_paths(&f.export, "c-mismatch").certificate_pem,
        f.custody.certificate("c-donor").unwrap().certificate_pem,
    )
    .unwrap();

    // Check 5: a server name the certificate does not cover.
    f.issue("c-uncovered", &["narrow.example.test"]);
    let mut uncovered = AssociateRequest::new("c-uncovered", &f.export, GRANTEE);
    uncovered.server_names = Some(vec!["wide.example.test".to_owned()]);
    uncovered.allow_uncovered_server_names = true;
    f.custody.associate(&uncovered).unwrap();

    let server = f.start(HELLO).await;
    let addr = server.tls_addrs[0];
    let tls = connect(addr, "good.example.test", f.client(&[])).await.unwrap();
    assert_eq!(peer_leaf(&tls), f.leaf("c-good"));
    for name in ["retired", "other", "lapsed", "missing", "keyid", "sealed", "wrapped", "mismatch", "narrow", "wide"] {
        let sni = format!("{name}.example.test");
        let error = connect(addr, &sni, f.client(&[])).await.expect_err(&sni);
        assert!(
            matches!(
                error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()),
                Some(rustls::Error::AlertReceived(_))
            ),
            "{sni}: expected an alert, got {error}"
        );
    }

    // Each refusal names the certificate, the grant and the check.
    let report = server.holder.reload().unwrap();
    let mut refused: Vec<(String, Check)> =
        report.refused.iter().map(|(certificate, _, refusal)| (certificate.clone(), refusal.check)).collect();
    refused.sort();
    assert_eq!(
        refused,
        [
            ("c-key-id".to_owned(), Check::KeyId),
            ("c-lapsed".to_owned(), Check::Grant),
            ("c-mismatch".to_owned(), Check::KeyMatch),
            ("c-missing".to_owned(), Check::Grant),
            ("c-other".to_owned(), Check::Grant),
            ("c-retired".to_owned(), Check::Grant),
            ("c-sealed".to_owned(), Check::Seal),
            ("c-uncovered".to_owned(), Check::ServerNames),
            ("c-wrapped".to_owned(), Check::Seal),
        ]
    );
    for (certificate, grant, refusal) in &report.refused {
        assert!(!grant.is_empty());
        let line = format!("{certificate} {grant} {refusal}");
        assert!(line.contains("check"), "{line}");
    }
    assert_eq!(server.holder.reload().unwrap().refused.len(), 9, "refusals are stable across reads");
}

/// The refusal as the binary logs it: `sealgate run`'s stderr names the certificate, the grant and the check, and
/// holds no byte of the grant key (base64, as in the grant file, or hex).
#[test]
fn the_binary_logs_each_refusal_naming_the_certificate_the_grant_and_the_check_and_no_key() {
    let f = Fixture::new();
    f.serve("c-good", &["good.example.test"]);
    let grant = f.serve("c-mismatch", &["mismatch.example.test"]);
    f.issue("c-donor", &["mismatch.example.test"]);
    let donor = f.custody.certificate("c-donor").unwrap().certificate_pem;
    std::fs::write(export_paths(&f.export, "c-mismatch").certificate_pem, donor).unwrap();
    let grant_file = std::fs::read_to_string(f.export.join("grants").join(format!("{grant}.toml"))).unwrap();
    let grant_key = grant_file.lines().find_map(|l| l.strip_prefix("grant_key = ")).unwrap().trim_matches('"');
    let key_bytes = sealgate::custody::format::decode_base64("grant_key", grant_key).unwrap();
    let key_hex: String = key_bytes.iter().map(|b| format!("{b:02x}")).collect();
    let config = f.dir.path().join("proxy.toml");
    std::fs::write(&config, f.config(HELLO)).unwrap();

    let mut child = spawn_run(&config);
    let lines = stderr_lines(&mut child);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut seen = Vec::new();
    let refusal = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = lines.recv_timeout(left).unwrap_or_else(|_| panic!("no refusal logged in: {seen:#?}"));
        let line = without_ansi(&line);
        seen.push(line.clone());
        if line.contains("association refused") {
            break line;
        }
    };
    assert!(refusal.contains("certificate=\"c-mismatch\""), "{refusal}");
    assert!(refusal.contains(&format!("grant=\"{grant}\"")), "{refusal}");
    assert!(refusal.contains("check=\"check 4\""), "{refusal}");

    // Everything it wrote, up to its end.
    drop(child);
    seen.extend(lines.into_iter().map(|line| without_ansi(&line)));
    for line in &seen {
        assert!(!line.contains(grant_key) && !line.to_lowercase().contains(&key_hex), "key material: {line}");
    }
}

/// `line` without terminal colour sequences (`ESC [ ... m`), which the binary writes only to a terminal.
fn without_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}
