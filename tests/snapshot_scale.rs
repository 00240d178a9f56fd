//! Reading at scale: an export with 10,000 associations (half ECDSA P-256, half RSA 2048, the vectors' key pairs
//! re-sealed per certificate), one grant per 100 certificates, read as the holder does: a cold read, a read with
//! nothing changed, and a read after one certificate was renewed, each applied to a keyring.
//!
//! Ignored by default (writing the export takes a while in a debug build); run it in release to measure:
//! `cargo test --release --test snapshot_scale -- --ignored --nocapture`. `SEALGATE_SCALE` changes the count.

use std::path::Path;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivatePkcs8KeyDer;
use sealgate::custody::format::{self, AssociationEntry, Associations, Grant, GrantState, SealedKey};
use sealgate::custody::seal;
use sealgate::custody::snapshot::{ExportReader, Snapshot};
use sealgate::keyring::{ApplyReport, Keyring};
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

/// What the custody system keeps of an export it wrote: the grants (with their keys) and the entries.
struct Written {
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
    grants: Vec<Grant>,
    entries: Vec<AssociationEntry>,
}

fn write_export(dir: &Path, count: usize) -> Written {
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
    let mut written = Written { pairs, grants, entries: Vec::with_capacity(count) };
    for i in 0..count {
        let entry = write_certificate(dir, &written, i, i);
        written.entries.push(entry);
    }
    std::fs::write(dir.join("associations.toml"), Associations { entries: written.entries.clone() }.render()).unwrap();
    written
}

/// Writes certificate `c-{index}` with the key pair `pair` (modulo the pairs there are), its key sealed under a
/// fresh data key, each file replaced atomically; returns its entry, the data key wrapped for its grant.
fn write_certificate(dir: &Path, written: &Written, index: usize, pair: usize) -> AssociationEntry {
    let (certificate, key) = &written.pairs[pair % written.pairs.len()];
    let grant = &written.grants[index / 100];
    let id = format!("c-{index}");
    let data_key = SecretKey32::random().unwrap();
    let nonce = seal::random_nonce().unwrap();
    let ciphertext = seal::seal(&data_key, &nonce, key, &seal::sealed_key_aad(&id, KEY_ID));
    let sealed = SealedKey { certificate_id: id.clone(), key_id: KEY_ID.to_owned(), nonce, ciphertext };
    let cert_dir = dir.join(format!("certificates/{id}"));
    std::fs::create_dir_all(&cert_dir).unwrap();
    replace(&cert_dir.join("certificate.pem"), certificate);
    replace(&cert_dir.join("private-key.sealed"), sealed.render().as_bytes());
    let aad = seal::data_key_aad(&grant.grant_id, &id, KEY_ID);
    let wrapped = seal::wrap_data_key(grant.grant_key.as_ref().unwrap(), &data_key, &aad).unwrap();
    AssociationEntry {
        certificate_id: id,
        grant_id: grant.grant_id.clone(),
        server_names: None,
        wrapped_data_key: format::encode_base64(&wrapped),
    }
}

/// Renews certificate `c-{index}` as the custody system does: a new certificate and key (another of the pairs),
/// sealed under a new data key, then `associations.toml` with the new wrapped data key.
fn renew(dir: &Path, written: &mut Written, index: usize) {
    let entry = write_certificate(dir, written, index, index + 1);
    written.entries[index] = entry;
    replace(&dir.join("associations.toml"), Associations { entries: written.entries.clone() }.render().as_bytes());
}

/// Replaces a file atomically: a temporary beside it, renamed over it.
fn replace(path: &Path, contents: &[u8]) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, contents).unwrap();
    std::fs::rename(&temporary, path).unwrap();
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

/// Resident and peak resident memory of this process, from `/proc/self/status`; `None` off Linux.
fn memory() -> Option<(String, String)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field =
        |name: &str| status.lines().find_map(|line| line.strip_prefix(name)).map(|value| value.trim().to_owned());
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Times one read (wall and CPU), telling the reader what the keyring serves, and prints it with its counts.
fn timed_read(what: &str, reader: &mut ExportReader, keyring: &Keyring) -> (Snapshot, Duration) {
    let (start, cpu_start) = (Instant::now(), cpu_time());
    let snapshot = reader.read(OffsetDateTime::now_utc(), &|id| keyring.inputs_of(id)).unwrap();
    let elapsed = start.elapsed();
    let cpu = cpu_time().zip(cpu_start).map(|(end, start)| end.saturating_sub(start));
    eprintln!("{what}: read in {elapsed:?} (CPU time {cpu:?}); {:?}", reader.last_read());
    (snapshot, elapsed)
}

/// Applies a snapshot to the keyring, printing how long it took.
fn timed_apply(keyring: &mut Keyring, snapshot: Snapshot) -> ApplyReport {
    let start = Instant::now();
    let report = keyring.apply(snapshot);
    eprintln!(
        "  applied in {:?}: {} loaded, {} replaced, {} refused",
        start.elapsed(),
        report.loaded.len(),
        report.replaced.len(),
        report.refused.len()
    );
    report
}

/// The smallest, the median and the largest of `times`.
fn spread(times: &mut [Duration]) -> (Duration, Duration, Duration) {
    times.sort();
    (times[0], times[times.len() / 2], times[times.len() - 1])
}

/// Reads until no file is read only for being racy (written within the reader's margin of about two seconds,
/// whose stamps are not trusted yet), as for an export that has been in place for a while: the reads timed after
/// this see the steady state. Waits for that with a deadline, never for a fixed time.
fn settle(reader: &mut ExportReader, keyring: &mut Keyring) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let snapshot = reader.read(OffsetDateTime::now_utc(), &|id| keyring.inputs_of(id)).unwrap();
        assert!(!keyring.apply(snapshot).changed());
        let stats = reader.last_read();
        if stats.files_read == 0 {
            return;
        }
        assert_eq!(stats.files_read, stats.files_racy, "nothing changed but the clock");
        assert!(Instant::now() < deadline, "files still racy: {stats:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// How many times the cheap reads are repeated, for their spread.
const SAMPLES: usize = 7;

#[test]
#[ignore = "slow to set up; run in release to measure"]
fn ten_thousand_certificates_cold_start_and_hot_swap() {
    let count = std::env::var("SEALGATE_SCALE").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let dir = tempfile::TempDir::new().unwrap();
    let start = Instant::now();
    let mut written = write_export(dir.path(), count);
    eprintln!("wrote {count} associations in {:?}", start.elapsed());

    let mut reader = ExportReader::new(dir.path().to_owned(), GRANTEE.to_owned());
    let mut keyring = Keyring::new(GRANTEE);
    let (snapshot, cold) = timed_read("cold", &mut reader, &keyring);
    assert_eq!(snapshot.associations.len(), count);
    assert!(snapshot.associations.iter().all(|a| a.is_served()));
    assert_eq!(timed_apply(&mut keyring, snapshot).loaded.len(), count);
    settle(&mut reader, &mut keyring);

    let mut unchanged = Vec::new();
    for _ in 0..SAMPLES {
        let (snapshot, elapsed) = timed_read("nothing changed", &mut reader, &keyring);
        assert_eq!((reader.last_read().files_read, reader.last_read().unchanged), (0, count));
        assert!(!timed_apply(&mut keyring, snapshot).changed());
        unchanged.push(elapsed);
    }

    let mut renewals = Vec::new();
    for index in 0..SAMPLES.min(count) {
        renew(dir.path(), &mut written, index);
        let (snapshot, elapsed) = timed_read("one renewal", &mut reader, &keyring);
        let stats = reader.last_read();
        // The renewed certificate's two files and associations.toml; the files of the renewals just before are
        // still racy, and read again (compared, not parsed nor verified).
        assert_eq!((stats.files_read - stats.files_racy, stats.verified, stats.unchanged), (3, 1, count - 1));
        let report = timed_apply(&mut keyring, snapshot);
        assert_eq!((report.loaded.len(), report.replaced.len()), (1, 1));
        assert_eq!(report.loaded[0].certificate_id, format!("c-{index}"));
        renewals.push(elapsed);
    }
    assert_eq!(keyring.len(), count);

    let (unchanged, renewal) = (spread(&mut unchanged), spread(&mut renewals));
    eprintln!("cold read: {cold:?}");
    eprintln!("read with nothing changed: min {:?}, median {:?}, max {:?}", unchanged.0, unchanged.1, unchanged.2);
    eprintln!("read after one renewal: min {:?}, median {:?}, max {:?}", renewal.0, renewal.1, renewal.2);
    if let Some((rss, peak)) = memory() {
        eprintln!("memory: {rss} resident, {peak} at peak (the whole test process, export writing included)");
    }

    // Whatever the machine's load: a read that verified everything again would cost about a cold read. The cheap
    // reads get no budget of their own in time: on a shared 2-core machine they vary with the load far more than
    // with the code (their counts, asserted above, say what they did).
    assert!(unchanged.1 * 4 < cold && renewal.1 * 4 < cold, "{unchanged:?} {renewal:?} against {cold:?}");
    if !cfg!(debug_assertions) {
        assert!(cold < Duration::from_secs(2) * count.div_ceil(10_000) as u32, "cold read {cold:?}");
    }
}
