//! Cold start at scale: one read of an export with 10,000 associations (half ECDSA P-256, half RSA 2048, the
//! vectors' key pairs re-sealed per certificate), one grant per 100 certificates.
//!
//! Ignored by default (writing the export takes a while in a debug build); run it in release to measure:
//! `cargo test --release --test snapshot_scale -- --ignored --nocapture`. `SEALGATE_SCALE` changes the count.

use std::path::Path;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivatePkcs8KeyDer;
use sealgate::custody::format::{self, AssociationEntry, Associations, Grant, GrantState, SealedKey};
use sealgate::custody::seal;
use sealgate::custody::snapshot::read_export;
use sealgate::secret::SecretKey32;
use time::OffsetDateTime;

const GRANTEE: &str = "sealgate-scale";
const KEY_ID: &str = "arn:aws:kms:us-east-1:111122223333:key/scale";

/// The vectors' served key pairs: (certificate PEM, PKCS#8 DER).
fn key_pairs() -> Vec<(Vec<u8>, Vec<u8>)> {
    let vectors = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/custody-vectors");
    let expected: toml::Table = std::fs::read_to_string(vectors.join("expected.toml")).unwrap().parse().unwrap();
    let mut pairs = Vec::new();
    for entry in expected["association"].as_array().unwrap() {
        let Some(pem) = entry.get("private_key_pem").and_then(|v| v.as_str()) else { continue };
        let id = entry["certificate_id"].as_str().unwrap();
        let certificate = std::fs::read(vectors.join(format!("export/certificates/{id}/certificate.pem"))).unwrap();
        let key = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).unwrap();
        pairs.push((certificate, key.secret_pkcs8_der().to_vec()));
    }
    pairs
}

fn write_export(dir: &Path, count: usize) {
    let pairs = key_pairs();
    std::fs::create_dir_all(dir.join("grants")).unwrap();
    let grants: Vec<Grant> = (0..count.div_ceil(100))
        .map(|i| Grant {
            grant_id: format!("g-{i}"),
            key_id: KEY_ID.to_owned(),
            key_alias: None,
            grantee: GRANTEE.to_owned(),
            operations: vec!["Decrypt".to_owned()],
            state: GrantState::Active,
            grant_key: Some(SecretKey32::random().unwrap()),
            not_after: None,
            created: None,
        })
        .collect();
    for grant in &grants {
        std::fs::write(dir.join(format!("grants/{}.toml", grant.grant_id)), grant.render().as_bytes()).unwrap();
    }
    let mut entries = Vec::with_capacity(count);
    for i in 0..count {
        let (certificate, key) = &pairs[i % pairs.len()];
        let grant = &grants[i / 100];
        let id = format!("c-{i}");
        let data_key = SecretKey32::random().unwrap();
        let nonce = seal::random_nonce().unwrap();
        let ciphertext = seal::seal(&data_key, &nonce, key, &seal::sealed_key_aad(&id, KEY_ID));
        let sealed = SealedKey { certificate_id: id.clone(), key_id: KEY_ID.to_owned(), nonce, ciphertext };
        let cert_dir = dir.join(format!("certificates/{id}"));
        std::fs::create_dir_all(&cert_dir).unwrap();
        std::fs::write(cert_dir.join("certificate.pem"), certificate).unwrap();
        std::fs::write(cert_dir.join("private-key.sealed"), sealed.render()).unwrap();
        let aad = seal::data_key_aad(&grant.grant_id, &id, KEY_ID);
        let wrapped = seal::wrap_data_key(grant.grant_key.as_ref().unwrap(), &data_key, &aad).unwrap();
        entries.push(AssociationEntry {
            certificate_id: id,
            grant_id: grant.grant_id.clone(),
            server_names: None,
            wrapped_data_key: format::encode_base64(&wrapped),
        });
    }
    std::fs::write(dir.join("associations.toml"), Associations { entries }.render()).unwrap();
}

/// CPU time (user and system) used by this process so far, from `/proc/self/stat`; `None` off Linux. Clock
/// ticks are taken as 100 per second, the value on every Linux platform Rust supports.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces): utime is the 12th, stime 13th.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let ticks: u64 = fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

#[test]
#[ignore = "slow to set up; run in release to measure the cold start"]
fn ten_thousand_certificates_cold_start() {
    let count = std::env::var("SEALGATE_SCALE").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let dir = tempfile::TempDir::new().unwrap();
    let start = Instant::now();
    write_export(dir.path(), count);
    eprintln!("wrote {count} associations in {:?}", start.elapsed());

    let (start, cpu_start) = (Instant::now(), cpu_time());
    let snapshot = read_export(dir.path(), GRANTEE, OffsetDateTime::now_utc()).unwrap();
    let elapsed = start.elapsed();
    let cpu = cpu_time().zip(cpu_start).map(|(end, start)| end.saturating_sub(start));
    eprintln!("read {count} associations in {elapsed:?} (CPU time {cpu:?})");
    assert_eq!(snapshot.associations.len(), count);
    assert!(snapshot.associations.iter().all(|a| a.is_served()));
    if !cfg!(debug_assertions) {
        assert!(elapsed < Duration::from_secs(2) * count.div_ceil(10_000) as u32, "{elapsed:?}");
    }
}
