//! Certificates and custody exports for the benchmark.
//!
//! - [`gen_cert`]: the one ECDSA P-256 certificate every server presents (a bench CA and a leaf).
//! - [`managed`]: certificates issued and associated by sealgate's own custody library, in a fresh state
//!   directory, so that `sealgate custody renew` and `retire-grant` can act on them.
//! - [`scale`]: an export with many certificates. Associating them one at a time through the custody library
//!   rewrites `associations.toml` each time (quadratic); so the bulk is written here, following FORMAT.md with
//!   sealgate's own format and sealing code, one grant per association as the custody tool makes them, and a few
//!   certificates are added through the library for the hot-swap measurement.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};
use sealgate::custody::format::{self, AssociationEntry, Associations, Grant, GrantState, SealedKey};
use sealgate::custody::seal;
use sealgate::custody::writer::{AssociateRequest, Custody, IssueRequest};
use sealgate::secret::SecretKey32;
use time::{Duration, OffsetDateTime};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn ca(common_name: &str) -> Result<CertifiedIssuer<'static, KeyPair>> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = OffsetDateTime::now_utc() - Duration::days(1);
    params.not_after = OffsetDateTime::now_utc() + Duration::days(3650);
    Ok(CertifiedIssuer::self_signed(params, key)?)
}

fn leaf(name: &str, issuer: &Issuer<'_, KeyPair>) -> Result<(String, KeyPair)> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(vec![name.to_owned()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = OffsetDateTime::now_utc() - Duration::days(1);
    params.not_after = OffsetDateTime::now_utc() + Duration::days(3650);
    let certificate = params.signed_by(&key, issuer)?;
    Ok((certificate.pem(), key))
}

/// Writes `ca.pem`, `leaf.pem` (the chain every server sends: the leaf), `leaf.key` (PKCS#8 PEM) and
/// `haproxy.pem` (leaf and key) into `dir`, for `name`.
pub fn gen_cert(dir: &Path, name: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let ca = ca("sealgate bench CA")?;
    let (leaf_pem, leaf_key) = leaf(name, &ca)?;
    let key_pem = leaf_key.serialize_pem();
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    std::fs::write(dir.join("leaf.pem"), &leaf_pem)?;
    std::fs::write(dir.join("leaf.key"), &key_pem)?;
    std::fs::write(dir.join("haproxy.pem"), format!("{leaf_pem}{key_pem}"))?;
    Ok(())
}

/// A fresh custody state in `state` and a fresh export in `export` holding `count` certificates
/// `c-<prefix><k>` for `<prefix><k>.bench.test`, each associated with `grantee` under its own grant.
pub fn managed(state: &Path, export: &Path, prefix: &str, count: usize, grantee: &str) -> Result<()> {
    for dir in [state, export] {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
    }
    let custody = Custody::open(state)?;
    add_managed(&custody, export, prefix, count, grantee)
}

fn add_managed(custody: &Custody, export: &Path, prefix: &str, count: usize, grantee: &str) -> Result<()> {
    for k in 0..count {
        let id = format!("c-{prefix}{k}");
        let mut request = IssueRequest::new([format!("{prefix}{k}.bench.test")]);
        request.certificate_id = Some(id.clone());
        request.not_after = Some(OffsetDateTime::now_utc() + Duration::days(3650));
        custody.issue(&request)?;
        custody.associate(&AssociateRequest::new(id, export, grantee))?;
    }
    Ok(())
}

/// An export with `count` certificates `c-n<i>` for `n<i>.bench.test` (ECDSA P-256, one grant each), plus
/// `swaps` certificates `c-swap<k>` for `swap<k>.bench.test` issued and associated through the custody library
/// in `state`. Skipped when `marker` says this export was already written with these numbers.
pub fn scale(state: &Path, export: &Path, count: usize, swaps: usize, grantee: &str, marker: &Path) -> Result<bool> {
    let stamp = format!("count={count} swaps={swaps} grantee={grantee} v1\n");
    if std::fs::read_to_string(marker).ok().as_deref() == Some(stamp.as_str())
        && export.join("associations.toml").exists()
    {
        return Ok(false);
    }
    for dir in [state, export] {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
    }
    let _ = std::fs::remove_file(marker);
    let custody = Custody::open(state)?;
    let key_id = custody.key_id().to_owned();
    std::fs::create_dir_all(export.join("grants"))?;
    std::fs::create_dir_all(export.join("certificates"))?;
    let ca = ca("sealgate bench bulk CA")?;
    let now = OffsetDateTime::now_utc();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let entries: Vec<AssociationEntry> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (ca, key_id) = (&ca, &key_id);
                scope.spawn(move || -> std::result::Result<Vec<AssociationEntry>, String> {
                    let mut entries = Vec::new();
                    for i in (t..count).step_by(threads) {
                        entries.push(bulk_one(export, i, ca, key_id, grantee, now).map_err(|e| e.to_string())?);
                    }
                    Ok(entries)
                })
            })
            .collect();
        let mut all = Vec::new();
        for handle in handles {
            all.extend(handle.join().map_err(|_| "an export writer thread panicked".to_owned())??);
        }
        Ok::<_, String>(all)
    })?;
    let mut entries = entries;
    entries.sort_by_key(|e| e.certificate_id[3..].parse::<usize>().unwrap_or(0));
    std::fs::write(export.join("associations.toml"), Associations { entries }.render())?;
    add_managed(&custody, export, "swap", swaps, grantee)?;
    std::fs::write(marker, stamp)?;
    Ok(true)
}

fn bulk_one(
    export: &Path,
    i: usize,
    ca: &Issuer<'_, KeyPair>,
    key_id: &str,
    grantee: &str,
    now: OffsetDateTime,
) -> Result<AssociationEntry> {
    let id = format!("c-n{i}");
    let grant_id = format!("g-n{i}");
    let (pem, key) = leaf(&format!("n{i}.bench.test"), ca)?;
    let data_key = SecretKey32::random().map_err(|e| e.to_string())?;
    let nonce = seal::random_nonce().map_err(|e| format!("{e:?}"))?;
    let ciphertext = seal::seal(&data_key, &nonce, &key.serialize_der(), &seal::sealed_key_aad(&id, key_id));
    let sealed = SealedKey { certificate_id: id.clone(), key_id: key_id.to_owned(), nonce, ciphertext };
    let dir = export.join("certificates").join(&id);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("certificate.pem"), pem)?;
    std::fs::write(dir.join("private-key.sealed"), sealed.render())?;
    let grant_key = SecretKey32::random().map_err(|e| e.to_string())?;
    let aad = seal::data_key_aad(&grant_id, &id, key_id);
    let wrapped = seal::wrap_data_key(&grant_key, &data_key, &aad).map_err(|e| format!("{e:?}"))?;
    let grant = Grant {
        grant_id: grant_id.clone(),
        key_id: key_id.to_owned(),
        key_alias: Some("aws/acm".to_owned()),
        grantee: grantee.to_owned(),
        operations: vec!["Decrypt".to_owned()],
        state: GrantState::Active,
        grant_key: Some(grant_key),
        not_after: None,
        created: Some(now),
    };
    std::fs::write(export.join("grants").join(format!("{grant_id}.toml")), grant.render().as_bytes())?;
    Ok(AssociationEntry {
        certificate_id: id,
        grant_id,
        server_names: None,
        wrapped_data_key: format::encode_base64(&wrapped),
    })
}
