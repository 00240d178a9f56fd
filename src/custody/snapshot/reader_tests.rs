//! [`ExportReader`]: what it reads again, what it verifies again, and which file changes it must never miss.
//!
//! Most tests run the reader with a clock a minute ahead, so that every file the test wrote looks old enough for
//! its stamp to be trusted: a change must then show in the stamp to be seen. The tests of racy timestamps use the
//! real clock. Tests that must show that one field of the stamp is what reveals a change hide the ctime (which
//! any write or `set_times` on Linux updates) by reporting the mtime in its place, as a filesystem with coarse
//! timestamps would report an unchanged ctime for a rewrite within one tick.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::{Duration as StdDuration, SystemTime};

use time::Duration;

use super::cache::{Environment, FileStamp, Timestamp};
use super::tests::{
    assert_refused, kubernetes_layout, put, random_bytes, refusal, served as verified, Fixture, FIXTURE_FILES, GRANTEE,
};
use super::*;
use crate::custody::changes::Changes;
use crate::custody::format::{GrantState, SealedKey};
use crate::keyring::Keyring;

fn now() -> OffsetDateTime {
    super::tests::now()
}

/// A clock a minute ahead of the real one.
fn a_minute_ahead() -> SystemTime {
    SystemTime::now() + StdDuration::from_secs(60)
}

/// `stat`, with the ctime replaced by the mtime.
fn stat_without_ctime(path: &Path) -> io::Result<FileStamp> {
    FileStamp::of(path).map(|stamp| FileStamp { ctime: stamp.mtime, ..stamp })
}

/// A reader that trusts the stamp of every file the test wrote.
fn trusting_reader(fixture: &Fixture) -> ExportReader {
    reader_with(fixture, Environment { now: a_minute_ahead, ..Environment::default() })
}

/// A reader that trusts stamps, with the ctime hidden (which a rename updates): a file that comes back has the
/// stamp it left with.
fn ctime_blind_reader(fixture: &Fixture) -> ExportReader {
    reader_with(fixture, Environment { now: a_minute_ahead, stat: stat_without_ctime })
}

/// A keyring holding what the first read of `reader` serves.
fn keyring_after_first_read(fixture: &Fixture, reader: &mut ExportReader) -> Keyring {
    let mut keyring = Keyring::new(GRANTEE);
    keyring.apply(read(fixture, reader, now(), &Served::new()));
    keyring
}

fn reader_with(fixture: &Fixture, environment: Environment) -> ExportReader {
    let mut reader = ExportReader::new(fixture.dir.path().to_owned(), GRANTEE.to_owned());
    reader.set_environment(environment);
    reader
}

/// The inputs of every association a snapshot serves (or found unchanged), as a keyring would report them.
type Served = HashMap<String, [u8; 32]>;

fn served_inputs(snapshot: &Snapshot) -> Served {
    snapshot.associations.iter().filter(|a| a.is_served()).map(|a| (a.certificate_id.clone(), a.inputs)).collect()
}

/// Reads at `at`, telling the reader that `served` is what is served, and checks that no secret leaks.
fn read(fixture: &Fixture, reader: &mut ExportReader, at: OffsetDateTime, served: &Served) -> Snapshot {
    let snapshot = reader.read(at, &|id| served.get(id).copied()).unwrap();
    fixture.assert_no_secrets(&snapshot);
    snapshot
}

fn verdicts(snapshot: &Snapshot) -> Vec<&'static str> {
    snapshot
        .associations
        .iter()
        .map(|a| match a.result {
            Verdict::Served(_) => "served",
            Verdict::Unchanged => "unchanged",
            Verdict::Refused(_) => "refused",
        })
        .collect()
}

/// Two certificates under one grant, served.
fn two_certificates() -> Fixture {
    let mut fixture = Fixture::served();
    fixture.add_certificate("c-2", &["c2.example.test"]);
    fixture.associate("c-2", "g-1", None);
    fixture.write();
    fixture
}

/// Rewrites the sealed key of `id` in place (same inode) with one bit of its ciphertext flipped: same size,
/// different bytes, a seal that no longer opens.
fn tamper_sealed_key_in_place(fixture: &Fixture, id: &str) {
    let path = fixture.path(&format!("certificates/{id}/private-key.sealed"));
    std::fs::write(&path, tampered_sealed_key(&path)).unwrap();
}

fn tampered_sealed_key(path: &Path) -> String {
    let original = std::fs::read(path).unwrap();
    let mut sealed =
        SealedKey::parse(&original, path.parent().unwrap().file_name().unwrap().to_str().unwrap()).unwrap();
    sealed.ciphertext[3] ^= 0x80;
    let tampered = sealed.render();
    assert_eq!(tampered.len(), original.len());
    tampered
}

fn mtime(path: &Path) -> SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

fn set_mtime(path: &Path, mtime: SystemTime) {
    File::options().write(true).open(path).unwrap().set_modified(mtime).unwrap();
}

// -----------------------------------------------------------------------------------------------------------------
// What is read and verified again

#[test]
fn an_unchanged_export_is_stated_but_neither_read_nor_verified() {
    let fixture = two_certificates();
    let mut reader = trusting_reader(&fixture);
    let first = read(&fixture, &mut reader, now(), &Served::new());
    assert_eq!(verdicts(&first), ["served", "served"]);
    // associations.toml, one grant, two files per certificate.
    let stats = reader.last_read();
    assert_eq!((stats.files_checked, stats.files_read, stats.verified, stats.unchanged), (6, 6, 2, 0));

    let served = served_inputs(&first);
    let second = read(&fixture, &mut reader, now(), &served);
    assert_eq!(verdicts(&second), ["unchanged", "unchanged"]);
    assert_eq!(
        reader.last_read(),
        ReadStats { files_checked: 6, files_read: 0, files_racy: 0, verified: 0, unchanged: 2 }
    );
    for (before, after) in first.associations.iter().zip(&second.associations) {
        assert_eq!(after.inputs, before.inputs);
        assert!(after.is_served() && after.refusal().is_none());
        assert_eq!(after.outcome(), "served");
        assert_eq!(after.server_names, before.server_names);
        assert_eq!(after.certificate_not_after, before.certificate_not_after);
    }
    assert_eq!(second.grants, first.grants);

    // Without a known digest, everything is verified again, from the cached files.
    let third = read(&fixture, &mut reader, now(), &Served::new());
    assert_eq!(verdicts(&third), ["served", "served"]);
    assert_eq!((reader.last_read().files_read, reader.last_read().verified), (0, 2));
}

#[test]
fn a_renewal_reads_and_verifies_only_what_changed() {
    let mut fixture = two_certificates();
    let mut reader = trusting_reader(&fixture);
    let served = served_inputs(&read(&fixture, &mut reader, now(), &Served::new()));

    // c-1 renewed: a new certificate and key, sealed under a new data key wrapped anew.
    fixture.data_keys.remove("c-1");
    fixture.add_certificate("c-1", &["a.example.test"]);
    fixture.entries.remove(0);
    fixture.associate("c-1", "g-1", None);
    fixture.entries.rotate_right(1);
    fixture.write();
    let snapshot = read(&fixture, &mut reader, now(), &served);
    assert_eq!(verdicts(&snapshot), ["served", "unchanged"]);
    assert_eq!(verified(&snapshot, 0).server_names, ["a.example.test"]);
    assert_ne!(snapshot.associations[0].inputs, served["c-1"]);
    assert_eq!(snapshot.associations[1].inputs, served["c-2"]);
    let stats = reader.last_read();
    // Fixture::write replaces the grant file too (same bytes, new inode): read, but the same inputs.
    assert_eq!((stats.files_read, stats.verified, stats.unchanged), (4, 1, 1));
}

#[test]
fn any_change_to_the_inputs_is_verified_again() {
    let mut fixture = two_certificates();
    let mut reader = trusting_reader(&fixture);
    let served = served_inputs(&read(&fixture, &mut reader, now(), &Served::new()));

    // Names requested in the entry.
    fixture.entry("c-1").server_names = Some(vec!["x.b.example.test".into()]);
    fixture.write();
    let snapshot = read(&fixture, &mut reader, now(), &served);
    assert_eq!(verdicts(&snapshot), ["served", "unchanged"]);
    assert_eq!(verified(&snapshot, 0).server_names, ["x.b.example.test"]);
    let served = served_inputs(&snapshot);

    // A data key wrapped again (a fresh nonce): the same key, other bytes.
    fixture.entries.remove(0);
    fixture.associate("c-1", "g-1", Some(&["x.b.example.test"]));
    fixture.entries.rotate_right(1);
    fixture.write();
    let snapshot = read(&fixture, &mut reader, now(), &served);
    assert_eq!(verdicts(&snapshot), ["served", "unchanged"]);

    // A grant file rewritten with another `not_after`: every association of the grant.
    let served = served_inputs(&snapshot);
    fixture.grant("g-1").not_after = Some(now() + Duration::days(30));
    fixture.write();
    let snapshot = read(&fixture, &mut reader, now(), &served);
    assert_eq!(verdicts(&snapshot), ["served", "served"]);

    // A digest that is not the current one.
    let stale: Served = served.keys().map(|id| (id.clone(), [7; 32])).collect();
    assert_eq!(verdicts(&read(&fixture, &mut reader, now(), &stale)), ["served", "served"]);
}

// -----------------------------------------------------------------------------------------------------------------
// Check 1 on every read

#[test]
fn a_lapse_is_seen_from_cached_files_whatever_the_digest() {
    let mut fixture = Fixture::served();
    fixture.grant("g-1").not_after = Some(now() + Duration::hours(1));
    fixture.write();
    let mut reader = trusting_reader(&fixture);
    let served = served_inputs(&read(&fixture, &mut reader, now(), &Served::new()));
    assert_eq!(verdicts(&read(&fixture, &mut reader, now() + Duration::minutes(59), &served)), ["unchanged"]);

    let later = now() + Duration::hours(2);
    let snapshot = read(&fixture, &mut reader, later, &served);
    assert_refused(&snapshot, 0, Check::Grant, reason::GRANT_LAPSED);
    assert_eq!(snapshot.grants["g-1"], GrantStatus::Lapsed);
    assert_eq!(reader.last_read().files_read, 0, "judged from the cache");
}

#[test]
fn a_retired_grant_is_refused_even_when_its_inputs_are_the_known_ones() {
    let mut fixture = Fixture::served();
    fixture.write();
    let mut reader = trusting_reader(&fixture);
    read(&fixture, &mut reader, now(), &Served::new());
    let grant = fixture.grant("g-1");
    grant.state = GrantState::Retired;
    grant.grant_key = None;
    fixture.write();
    let snapshot = read(&fixture, &mut reader, now(), &Served::new());
    assert_refused(&snapshot, 0, Check::Grant, reason::GRANT_RETIRED);
    // Told that the generation served is the one of exactly these inputs, the reader still refuses.
    let known: Served = [("c-1".to_owned(), snapshot.associations[0].inputs)].into();
    let snapshot = read(&fixture, &mut reader, now(), &known);
    assert_refused(&snapshot, 0, Check::Grant, reason::GRANT_RETIRED);
}

#[test]
fn another_grantee_is_refused_even_when_its_inputs_are_the_known_ones() {
    let fixture = Fixture::served();
    fixture.write();
    let mut reader = ExportReader::new(fixture.dir.path().to_owned(), "someone-else".to_owned());
    reader.set_environment(Environment { now: a_minute_ahead, ..Environment::default() });
    let snapshot = read(&fixture, &mut reader, now(), &Served::new());
    assert_refused(&snapshot, 0, Check::Grant, reason::OTHER_GRANTEE);
    let known: Served = [("c-1".to_owned(), snapshot.associations[0].inputs)].into();
    let snapshot = read(&fixture, &mut reader, now(), &known);
    assert_refused(&snapshot, 0, Check::Grant, reason::OTHER_GRANTEE);

    // The holder is part of the inputs: the same files give another digest for another grantee.
    let mut ours = trusting_reader(&fixture);
    let snapshot_ours = read(&fixture, &mut ours, now(), &Served::new());
    assert_ne!(snapshot_ours.associations[0].inputs, snapshot.associations[0].inputs);
}

// -----------------------------------------------------------------------------------------------------------------
// Changes the stamp must reveal, and the ones it cannot

#[test]
fn a_rewrite_in_place_within_one_tick_is_caught_while_the_entry_is_racy() {
    let fixture = Fixture::served();
    fixture.write();
    // The real clock: the files were just written, so their entries are racy.
    let mut reader = reader_with(&fixture, Environment { stat: stat_without_ctime, ..Environment::default() });
    let served = served_inputs(&read(&fixture, &mut reader, now(), &Served::new()));

    let path = fixture.path("certificates/c-1/private-key.sealed");
    let (stamp, written) = (stat_without_ctime(&path).unwrap(), mtime(&path));
    tamper_sealed_key_in_place(&fixture, "c-1");
    set_mtime(&path, written);
    assert_eq!(stat_without_ctime(&path).unwrap(), stamp, "the rewrite must not show in the stamp");

    let snapshot = read(&fixture, &mut reader, now(), &served);
    assert_refused(&snapshot, 0, Check::Seal, reason::PRIVATE_KEY_SEAL);
    assert!(reader.last_read().files_racy >= 1, "{:?}", reader.last_read());
}

#[test]
fn a_racy_entry_is_trusted_after_a_read_past_the_margin() {
    let fixture = Fixture::served();
    fixture.write();
    let mut reader = reader_with(&fixture, Environment::default());
    let served = served_inputs(&read(&fixture, &mut reader, now(), &Served::new()));
    // Racy: read again, bytes compared, nothing parsed or verified again.
    read(&fixture, &mut reader, now(), &served);
    let stats = reader.last_read();
    assert_eq!((stats.files_read, stats.files_racy, stats.unchanged), (4, 4, 1));

    // The first read past the margin reads them once more; after it, their stamps are trusted.
    reader.set_environment(Environment { now: a_minute_ahead, ..Environment::default() });
    read(&fixture, &mut reader, now(), &served);
    assert_eq!(reader.last_read().files_racy, 4);
    read(&fixture, &mut reader, now(), &served);
    assert_eq!(reader.last_read().files_read, 0);
}

#[test]
fn a_file_replaced_by_rename_is_read_again_whatever_its_times() {
    let fixture = Fixture::served();
    fixture.write();
    let mut reader = ctime_blind_reader(&fixture);
    let served = served_inputs(&read(&fixture, &mut reader, now(), &Served::new()));

    // Same size, same mtime, another inode.
    let path = fixture.path("certificates/c-1/private-key.sealed");
    let temporary = fixture.path("certificates/c-1/.private-key.sealed.tmp");
    std::fs::write(&temporary, tampered_sealed_key(&path)).unwrap();
    set_mtime(&temporary, mtime(&path));
    std::fs::rename(&temporary, &path).unwrap();

    let snapshot = read(&fixture, &mut reader, now(), &served);
    assert_refused(&snapshot, 0, Check::Seal, reason::PRIVATE_KEY_SEAL);
    assert_eq!(reader.last_read().files_read, 1);
}

#[test]
fn a_kubernetes_data_swap_is_seen_through_the_links() {
    let fixture = two_certificates();
    kubernetes_layout(fixture.dir.path(), "..2026_11_28_10_00_00.1");
    let mut reader = ctime_blind_reader(&fixture);
    let served = served_inputs(&read(&fixture, &mut reader, now(), &Served::new()));
    assert_eq!(served.len(), 2);

    // The next generation: a copy of every file with its mtime, c-1's sealed key tampered at the same size.
    let (old, new) = (fixture.path("..2026_11_28_10_00_00.1"), fixture.path("..2026_11_28_10_05_00.2"));
    copy_tree(&old, &new);
    let sealed = new.join("certificates/c-1/private-key.sealed");
    let written = mtime(&sealed);
    std::fs::write(&sealed, tampered_sealed_key(&sealed)).unwrap();
    set_mtime(&sealed, written);
    symlink("..2026_11_28_10_05_00.2", fixture.path("..data_tmp")).unwrap();
    std::fs::rename(fixture.path("..data_tmp"), fixture.path("..data")).unwrap();

    let snapshot = read(&fixture, &mut reader, now(), &served);
    assert_refused(&snapshot, 0, Check::Seal, reason::PRIVATE_KEY_SEAL);
    assert_eq!(verdicts(&snapshot)[1], "unchanged", "c-2's files are new inodes with the same bytes");
    assert_eq!(reader.last_read().files_read, 6);
}

/// Copies a directory tree, keeping every file's mtime.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
            set_mtime(&target, mtime(&entry.path()));
        }
    }
}

// -----------------------------------------------------------------------------------------------------------------
// Files that vanish, break or change under the reader

#[test]
fn a_vanished_or_broken_file_is_never_taken_from_the_cache() {
    let fixture = two_certificates();
    let mut reader = trusting_reader(&fixture);
    let served = served_inputs(&read(&fixture, &mut reader, now(), &Served::new()));
    assert_eq!(reader.cached_files(), 6);

    let pem_path = fixture.path("certificates/c-1/certificate.pem");
    let pem = std::fs::read(&pem_path).unwrap();
    std::fs::remove_file(&pem_path).unwrap();
    let snapshot = read(&fixture, &mut reader, now(), &served);
    let detail = assert_refused(&snapshot, 0, Check::Files, reason::CERTIFICATE_FILE);
    assert!(detail.contains("certificate.pem: no such file"), "{detail}");
    assert_eq!(verdicts(&snapshot)[1], "unchanged");
    assert_eq!(reader.cached_files(), 5, "the vanished file's entry is pruned");

    put(&pem_path, b"-----BEGIN CERTIFICATE-----\nAAAA\n");
    assert_refused(&read(&fixture, &mut reader, now(), &served), 0, Check::Files, reason::CERTIFICATE_FILE);
    put(&pem_path, &pem);
    assert_eq!(verdicts(&read(&fixture, &mut reader, now(), &served)), ["unchanged", "unchanged"]);

    let associations = fixture.path("associations.toml");
    let text = std::fs::read(&associations).unwrap();
    put(&associations, b"[[association]\n");
    let error = reader.read(now(), &|id| served.get(id).copied()).unwrap_err();
    assert!(matches!(error, ExportError::Format { .. }), "{error:?}");
    // Present but unreadable (here: a directory) is not absent: the whole read fails.
    std::fs::remove_file(&associations).unwrap();
    std::fs::create_dir(&associations).unwrap();
    let error = reader.read(now(), &|id| served.get(id).copied()).unwrap_err();
    assert!(matches!(error, ExportError::Io { .. }), "{error:?}");
    std::fs::remove_dir(&associations).unwrap();
    put(&associations, &text);
    assert_eq!(verdicts(&read(&fixture, &mut reader, now(), &served)), ["unchanged", "unchanged"]);
}

/// Moves `path` aside to a hidden sibling and returns where; [`restore`] puts it back, the same inode with the
/// same times, as a backup restored or a volume remounted would.
fn move_aside(path: &Path) -> std::path::PathBuf {
    let aside = path.with_file_name(format!(".{}.aside", path.file_name().unwrap().to_str().unwrap()));
    std::fs::rename(path, &aside).unwrap();
    aside
}

fn restore(aside: &Path, path: &Path) {
    std::fs::rename(aside, path).unwrap();
}

#[test]
fn an_absent_associations_file_associates_nothing_and_is_read_again_when_it_comes_back() {
    let fixture = two_certificates();
    // Stamps without the ctime (which a rename updates): the file that comes back has the stamp it left with.
    let mut reader = ctime_blind_reader(&fixture);
    let mut keyring = keyring_after_first_read(&fixture, &mut reader);
    assert_eq!(keyring.len(), 2);

    let path = fixture.path("associations.toml");
    let aside = move_aside(&path);
    let snapshot = reader.read(now(), &|id| keyring.inputs_of(id)).unwrap();
    assert!(snapshot.associations.is_empty());
    assert_eq!(snapshot.grants.len(), 1, "the grants are still read");
    assert_eq!(reader.cached_files(), 1, "only the grant file is left in the cache");
    let report = keyring.apply(snapshot);
    assert_eq!((report.replaced.len(), report.ended.len()), (2, 0), "{report:?}");
    assert!(keyring.is_empty());

    restore(&aside, &path);
    let snapshot = read(&fixture, &mut reader, now(), &Served::new());
    assert_eq!(verdicts(&snapshot), ["served", "served"]);
    assert_eq!(reader.last_read().files_read, 5, "associations.toml and the certificates' files, read again");
    assert_eq!(keyring.apply(snapshot).loaded.len(), 2);
}

#[test]
fn an_absent_grants_directory_holds_no_grants() {
    let fixture = two_certificates();
    let mut reader = ctime_blind_reader(&fixture);
    let served = served_inputs(&read(&fixture, &mut reader, now(), &Served::new()));

    let grants = fixture.path("grants");
    let aside = move_aside(&grants);
    let snapshot = read(&fixture, &mut reader, now(), &served);
    assert!(snapshot.grants.is_empty());
    assert_refused(&snapshot, 0, Check::Grant, reason::GRANT_MISSING);
    assert_refused(&snapshot, 1, Check::Grant, reason::GRANT_MISSING);
    assert_eq!(reader.cached_files(), 1, "only associations.toml is left in the cache");

    restore(&aside, &grants);
    let snapshot = read(&fixture, &mut reader, now(), &Served::new());
    assert_eq!(verdicts(&snapshot), ["served", "served"]);
    assert_eq!(reader.last_read().files_read, 5, "the grant file and the certificates' files, read again");
}

#[test]
fn a_deleted_export_holds_nothing_and_is_read_again_when_it_comes_back() {
    let fixture = two_certificates();
    let mut reader = ctime_blind_reader(&fixture);
    let mut keyring = keyring_after_first_read(&fixture, &mut reader);

    let export = &fixture.dir.path().to_owned();
    let aside = export.with_extension("aside");
    std::fs::rename(export, &aside).unwrap();
    let snapshot = reader.read(now(), &|id| keyring.inputs_of(id));
    // Put back before asserting, so that the temporary directory is removed whatever happens.
    std::fs::rename(&aside, export).unwrap();
    let snapshot = snapshot.unwrap();
    assert!(snapshot.associations.is_empty() && snapshot.grants.is_empty(), "{snapshot:?}");
    assert_eq!(reader.cached_files(), 0);
    // Every grant file is gone: the grant is retired, its keys dropped.
    let report = keyring.apply(snapshot);
    assert_eq!(report.ended.len(), 1, "{report:?}");
    assert_eq!(report.ended[0].certificates.len(), 2);
    assert!(keyring.is_empty() && keyring.is_retired("g-1"));

    // The same files, inodes and times again: read and verified anew, and the retired grant stays retired.
    let snapshot = read(&fixture, &mut reader, now(), &Served::new());
    assert_eq!(verdicts(&snapshot), ["served", "served"]);
    assert_eq!(reader.last_read().files_read, 6);
    let report = keyring.apply(snapshot);
    assert_eq!(report.refused.len(), 2, "{report:?}");
    assert!(keyring.is_empty());
}

#[test]
fn entries_of_files_no_longer_asked_for_are_pruned() {
    let mut fixture = two_certificates();
    let mut reader = trusting_reader(&fixture);
    read(&fixture, &mut reader, now(), &Served::new());
    assert_eq!(reader.cached_files(), 6);
    fixture.entries.truncate(1);
    fixture.write();
    read(&fixture, &mut reader, now(), &Served::new());
    assert_eq!(reader.cached_files(), 4);
    // A grant refused at check 1: its certificates' files are not read at all.
    fixture.grant("g-1").state = GrantState::Retired;
    fixture.write();
    read(&fixture, &mut reader, now(), &Served::new());
    assert_eq!(reader.cached_files(), 2);
}

/// `stat` that reports an unchanging stamp for grant files: a grant file rewritten after it was cached goes
/// unnoticed until its key is needed.
fn stat_freezing_grants(path: &Path) -> io::Result<FileStamp> {
    let stamp = FileStamp::of(path)?;
    if path.parent().and_then(Path::file_name).is_some_and(|name| name == "grants") {
        let epoch = Timestamp { seconds: 0, nanoseconds: 0 };
        return Ok(FileStamp { dev: 0, ino: 0, size: 0, mtime: epoch, ctime: epoch });
    }
    Ok(stamp)
}

#[test]
fn a_grant_file_that_changes_during_a_read_leaves_its_state_unknown_for_that_read() {
    let mut fixture = Fixture::served();
    fixture.write();
    let mut reader = reader_with(&fixture, Environment { now: a_minute_ahead, stat: stat_freezing_grants });
    let mut keyring = Keyring::new(GRANTEE);
    let first = read(&fixture, &mut reader, now(), &Served::new());
    keyring.apply(first);

    // The grant file is rewritten (still active, still ours) after check 1 was judged on its cached facts.
    fixture.grant("g-1").key_alias = Some("aws/acm-renamed".into());
    fixture.write();
    let snapshot = reader.read(now(), &|_| None).unwrap();
    let detail = assert_refused(&snapshot, 0, Check::Grant, reason::GRANT_CHANGED);
    assert!(detail.contains("g-1.toml") && detail.contains("retry"), "{detail}");
    assert_eq!(snapshot.grants["g-1"], GrantStatus::Unreadable(detail));
    // The keyring keeps serving the last good state, as for a grant file that does not parse.
    let report = keyring.apply(snapshot);
    assert_eq!((report.kept.len(), report.ended.len()), (1, 0), "{report:?}");
    assert_eq!(keyring.len(), 1);

    // The grant's entry was dropped: the next read reads the file again and serves.
    let snapshot = read(&fixture, &mut reader, now(), &Served::new());
    assert!(snapshot.associations[0].is_served(), "{:?}", refusal(&snapshot, 0));
}

/// A reader kept across every truncation and corruption of every file concludes what a fresh read concludes.
#[test]
fn a_reader_kept_across_changes_agrees_with_a_fresh_read() {
    let mut fixture = Fixture::served();
    fixture.entry("c-1").server_names = Some(vec!["a.example.test".into()]);
    fixture.write();
    // The real clock: every in-place rewrite below happens within the racy margin.
    let mut reader = reader_with(&fixture, Environment::default());
    let mut keyring = Keyring::new(GRANTEE);
    for relative in FIXTURE_FILES {
        let path = fixture.path(relative);
        let original = std::fs::read(&path).unwrap();
        let garbage = random_bytes(original.len());
        let prefixes = (0..original.len()).step_by(5).map(|n| original[..n].to_vec());
        for contents in prefixes.chain([garbage, original.clone()]) {
            std::fs::write(&path, &contents).unwrap();
            let fresh = read_export(fixture.dir.path(), GRANTEE, now());
            let kept = reader.read(now(), &|id| keyring.inputs_of(id));
            match (fresh, kept) {
                (Ok(fresh), Ok(kept)) => {
                    fixture.assert_no_secrets(&kept);
                    let outcomes = |s: &Snapshot| s.associations.iter().map(AssociationOutcome::outcome).collect();
                    let fresh_outcomes: Vec<String> = outcomes(&fresh);
                    assert_eq!(fresh_outcomes, outcomes(&kept), "{relative}: {:?}", String::from_utf8_lossy(&contents));
                    assert_eq!(fresh.grants, kept.grants);
                    assert_eq!(
                        fresh.associations.iter().map(|a| a.inputs).collect::<Vec<_>>(),
                        kept.associations.iter().map(|a| a.inputs).collect::<Vec<_>>()
                    );
                    keyring.apply(kept);
                }
                (Err(fresh), Err(kept)) => assert_eq!(fresh.to_string(), kept.to_string()),
                (fresh, kept) => panic!("{relative}: a fresh read gave {fresh:?}, the kept reader {kept:?}"),
            }
        }
    }
    assert!(reader.read(now(), &|id| keyring.inputs_of(id)).unwrap().associations[0].is_served());
}

/// Reads at `now`, examining only what `changes` names (and what the cache cannot trust).
fn read_changes(fixture: &Fixture, reader: &mut ExportReader, served: &Served, changes: &Changes) -> Snapshot {
    let snapshot = reader.read_changes(now(), &|id| served.get(id).copied(), changes).unwrap();
    fixture.assert_no_secrets(&snapshot);
    snapshot
}

/// Each association a snapshot judged, by certificate id, with its verdict.
fn judged(snapshot: &Snapshot) -> Vec<(&str, &'static str)> {
    snapshot.associations.iter().map(|a| a.certificate_id.as_str()).zip(verdicts(snapshot)).collect()
}

/// Changes naming `relative` paths of the fixture's export.
fn naming(fixture: &Fixture, relative: &[&str]) -> Changes {
    let mut changes = Changes::none(fixture.dir.path());
    for name in relative {
        changes.add(&fixture.path(name));
    }
    changes
}

fn is_partial(snapshot: &Snapshot) -> bool {
    matches!(snapshot.scope, Scope::Partial { .. })
}

#[test]
fn a_read_of_named_changes_examines_and_judges_only_what_they_concern() {
    let mut fixture = two_certificates();
    let mut reader = trusting_reader(&fixture);
    let served = served_inputs(&read(&fixture, &mut reader, now(), &Served::new()));

    // Nothing named: nothing examined, nothing judged.
    let snapshot = read_changes(&fixture, &mut reader, &served, &naming(&fixture, &[]));
    assert!(is_partial(&snapshot) && snapshot.associations.is_empty() && snapshot.grants.is_empty());
    assert_eq!((reader.last_read().files_checked, reader.last_read().files_read), (0, 0));

    // c-2 renewed under the same data key: its two files are named, and it alone is judged.
    fixture.add_certificate("c-2", &["c2.example.test"]);
    let names = ["certificates/c-2/certificate.pem", "certificates/c-2/private-key.sealed"];
    let snapshot = read_changes(&fixture, &mut reader, &served, &naming(&fixture, &names));
    assert!(is_partial(&snapshot));
    assert_eq!(judged(&snapshot), [("c-2", "served")]);
    assert!(snapshot.grants.contains_key("g-1"), "the grant of a judged association is reported");
    assert_eq!((reader.last_read().files_checked, reader.last_read().files_read), (2, 2));

    // The grant file named: both of its associations are judged (unchanged: same bytes).
    let mut served = served_inputs(&read(&fixture, &mut reader, now(), &served));
    fixture.write();
    let snapshot = read_changes(&fixture, &mut reader, &served, &naming(&fixture, &["grants/g-1.toml"]));
    assert_eq!(judged(&snapshot), [("c-1", "unchanged"), ("c-2", "unchanged")]);

    // c-1 renewed under a new data key, and associations.toml rewritten with its entry changed and the entries
    // in another order: c-1 alone is judged.
    fixture.data_keys.remove("c-1");
    fixture.add_certificate("c-1", &["a.example.test"]);
    fixture.entries.remove(0);
    fixture.associate("c-1", "g-1", None);
    fixture.entries.rotate_right(1);
    fixture.write();
    let names = ["associations.toml", "certificates/c-1/certificate.pem", "certificates/c-1/private-key.sealed"];
    let snapshot = read_changes(&fixture, &mut reader, &served, &naming(&fixture, &names));
    assert!(is_partial(&snapshot));
    assert_eq!(judged(&snapshot), [("c-1", "served")]);
    assert_eq!(verified(&snapshot, 0).server_names, ["a.example.test"]);
    assert_eq!((reader.last_read().files_checked, reader.last_read().files_read), (3, 3));

    // The full read agrees, and finds the unnamed grant file's new inode (same bytes, same inputs).
    served.extend(served_inputs(&snapshot));
    let full = read(&fixture, &mut reader, now(), &served);
    assert_eq!(verdicts(&full), ["unchanged", "unchanged"]);
    assert_eq!(reader.last_read().files_read, 1);

    // c-2's association removed: nothing is judged, and the removal is reported.
    fixture.entries.retain(|e| e.certificate_id != "c-2");
    fixture.write();
    let snapshot = read_changes(&fixture, &mut reader, &served, &naming(&fixture, &["associations.toml"]));
    assert!(snapshot.associations.is_empty());
    assert_eq!(snapshot.scope, Scope::Partial { gone_grants: Vec::new(), removed: vec!["c-2".to_owned()] });

    // An entry refused by its ids makes the read complete: such refusals depend on the order of the file.
    let mut duplicate = fixture.entries[0].clone();
    duplicate.server_names = Some(vec!["a.example.test".into()]);
    fixture.entries.push(duplicate);
    fixture.write();
    let snapshot = read_changes(&fixture, &mut reader, &served, &naming(&fixture, &["associations.toml"]));
    assert!(!is_partial(&snapshot));
    assert_eq!(verdicts(&snapshot), ["unchanged", "refused"]);

    // A directory of the layout named, or anything outside it: every association is judged.
    for named in ["grants", "certificates", "..data"] {
        let snapshot = read_changes(&fixture, &mut reader, &served, &naming(&fixture, &[named]));
        assert!(!is_partial(&snapshot), "{named}");
    }
}

#[test]
fn a_read_of_named_changes_still_examines_racy_new_and_missing_files() {
    let fixture = two_certificates();
    // The real clock: the files were just written, so their entries are racy and examined whatever is named.
    let mut reader = reader_with(&fixture, Environment::default());
    let served = served_inputs(&read(&fixture, &mut reader, now(), &Served::new()));
    tamper_sealed_key_in_place(&fixture, "c-1");
    let snapshot = read_changes(&fixture, &mut reader, &served, &naming(&fixture, &[]));
    assert!(is_partial(&snapshot));
    assert_eq!(judged(&snapshot)[0].0, "c-1");
    assert_refused(&snapshot, 0, Check::Seal, reason::PRIVATE_KEY_SEAL);

    // A new association: associations.toml changed, so everything is judged, and the new files are read.
    let mut fixture = two_certificates();
    let mut reader = trusting_reader(&fixture);
    let served = served_inputs(&read(&fixture, &mut reader, now(), &Served::new()));
    assert_eq!(served.len(), 2);
    fixture.add_certificate("c-3", &["c3.example.test"]);
    fixture.associate("c-3", "g-1", None);
    fixture.write();
    let snapshot = read_changes(&fixture, &mut reader, &served, &naming(&fixture, &["associations.toml"]));
    assert_eq!(judged(&snapshot), [("c-3", "served")]);
    let mut served = served;
    served.extend(served_inputs(&snapshot));

    // A file that went missing has no entry: every later read judges its association again, named or not.
    let aside = move_aside(&fixture.path("certificates/c-3/certificate.pem"));
    let snapshot =
        read_changes(&fixture, &mut reader, &served, &naming(&fixture, &["certificates/c-3/certificate.pem"]));
    assert_eq!(judged(&snapshot), [("c-3", "refused")]);
    let snapshot = read_changes(&fixture, &mut reader, &served, &naming(&fixture, &[]));
    assert_eq!(judged(&snapshot), [("c-3", "refused")]);
    restore(&aside, &fixture.path("certificates/c-3/certificate.pem"));
    let snapshot = read_changes(&fixture, &mut reader, &served, &naming(&fixture, &[]));
    assert_eq!(judged(&snapshot), [("c-3", "unchanged")]);
    let snapshot = read_changes(&fixture, &mut reader, &served, &naming(&fixture, &[]));
    assert!(snapshot.associations.is_empty(), "settled again: {:?}", judged(&snapshot));
}

#[test]
fn a_read_of_named_changes_judges_everything_once_a_grant_lapses() {
    let mut fixture = two_certificates();
    fixture.grant("g-1").not_after = Some(now() + Duration::hours(1));
    fixture.write();
    let mut reader = trusting_reader(&fixture);
    let served = served_inputs(&read(&fixture, &mut reader, now(), &Served::new()));
    let known = |id: &str| served.get(id).copied();
    let before = reader.read_changes(now() + Duration::minutes(59), &known, &naming(&fixture, &[])).unwrap();
    assert!(is_partial(&before));
    let after = reader.read_changes(now() + Duration::hours(1), &known, &naming(&fixture, &[])).unwrap();
    assert!(!is_partial(&after));
    assert_eq!(after.grants["g-1"], GrantStatus::Lapsed);
    assert_refused(&after, 0, Check::Grant, reason::GRANT_LAPSED);
}

/// Where a step changed files of the export: the paths, relative to it, that file events would name.
type Step<'a> = (&'a str, Box<dyn Fn(&mut Fixture) -> Vec<String> + 'a>);

fn write_grant(fixture: &Fixture, id: &str) -> Vec<String> {
    let grant = fixture.grants.iter().find(|g| g.grant_id == id).unwrap();
    let relative = format!("grants/{id}.toml");
    put(&fixture.path(&relative), grant.render().as_bytes());
    vec![relative]
}

/// Writes the grants and `associations.toml`, as [`Fixture::write`] does, naming them all.
fn write_all(fixture: &Fixture) -> Vec<String> {
    fixture.write();
    let grants = fixture.grants.iter().map(|g| format!("grants/{}.toml", g.grant_id));
    grants.chain(["associations.toml".to_owned()]).collect()
}

fn certificate_files(id: &str) -> Vec<String> {
    vec![format!("certificates/{id}/certificate.pem"), format!("certificates/{id}/private-key.sealed")]
}

/// What a keyring serves, by certificate id: the leaf and the names.
fn serving(keyring: &Keyring) -> Vec<(String, [u8; 32], Vec<String>)> {
    keyring.served().map(|c| (c.certificate_id.clone(), c.leaf_sha256, c.server_names.clone())).collect()
}

/// A reader kept across changes, reading only what events name and applying partial snapshots to its keyring,
/// ends each step serving, refusing and retiring exactly what a reader that judges everything every time does.
#[test]
fn partial_reads_of_named_changes_agree_with_complete_reads() {
    let mut fixture = Fixture::new();
    for (grant, certificates) in
        [("g-1", &["c-1", "c-2"][..]), ("g-2", &["c-3"]), ("g-3", &["c-4"]), ("g-4", &["c-5"]), ("g-5", &["c-6"])]
    {
        fixture.add_grant(grant);
        for id in certificates {
            fixture.add_certificate(id, &[&format!("{id}.example.test")]);
            fixture.associate(id, grant, None);
        }
    }
    // c-7's grant does not exist yet; c-8's sealed key is not there yet.
    fixture.add_grant("g-7");
    fixture.add_certificate("c-7", &["c-7.example.test"]);
    fixture.associate("c-7", "g-7", None);
    fixture.add_certificate("c-8", &["c-8.example.test"]);
    fixture.associate("c-8", "g-1", None);
    fixture.write();
    std::fs::remove_file(fixture.path("grants/g-7.toml")).unwrap();
    let c8_sealed_key = move_aside(&fixture.path("certificates/c-8/private-key.sealed"));
    let original_c1_key = std::fs::read(fixture.path("certificates/c-1/private-key.sealed")).unwrap();

    let steps: Vec<Step<'_>> = vec![
        (
            "renew c-2",
            Box::new(|f| {
                f.add_certificate("c-2", &["c-2.example.test", "www.c-2.example.test"]);
                certificate_files("c-2")
            }),
        ),
        (
            "tamper with c-1's sealed key",
            Box::new(|f| {
                tamper_sealed_key_in_place(f, "c-1");
                vec!["certificates/c-1/private-key.sealed".into()]
            }),
        ),
        (
            "restore c-1's sealed key",
            Box::new(|f| {
                put(&f.path("certificates/c-1/private-key.sealed"), &original_c1_key);
                vec!["certificates/c-1/private-key.sealed".into()]
            }),
        ),
        (
            "retire g-2",
            Box::new(|f| {
                f.grant("g-2").state = GrantState::Retired;
                write_grant(f, "g-2")
            }),
        ),
        (
            "give g-3 to someone else",
            Box::new(|f| {
                f.grant("g-3").grantee = "someone-else".into();
                write_grant(f, "g-3")
            }),
        ),
        (
            "delete g-4",
            Box::new(|f| {
                std::fs::remove_file(f.path("grants/g-4.toml")).unwrap();
                vec!["grants/g-4.toml".into()]
            }),
        ),
        (
            "half-write g-5",
            Box::new(|f| {
                put(&f.path("grants/g-5.toml"), b"grant_id = \"g-5\"\nkey_");
                vec!["grants/g-5.toml".into()]
            }),
        ),
        ("finish g-5", Box::new(|f| write_grant(f, "g-5"))),
        (
            "remove c-1's certificate",
            Box::new(|f| {
                std::fs::remove_file(f.path("certificates/c-1/certificate.pem")).unwrap();
                vec!["certificates/c-1/certificate.pem".into()]
            }),
        ),
        ("create g-7", Box::new(|f| write_grant(f, "g-7"))),
        (
            "put c-8's sealed key back, unnamed",
            Box::new(|f| {
                restore(&c8_sealed_key, &f.path("certificates/c-8/private-key.sealed"));
                vec![]
            }),
        ),
        (
            "renew c-1",
            Box::new(|f| {
                f.add_certificate("c-1", &["c-1.example.test"]);
                certificate_files("c-1")
            }),
        ),
        (
            "bring g-2 back as active (a restored backup)",
            Box::new(|f| {
                f.grant("g-2").state = GrantState::Active;
                write_grant(f, "g-2")
            }),
        ),
        (
            "associate c-9",
            Box::new(|f| {
                f.add_certificate("c-9", &["c-9.example.test"]);
                f.associate("c-9", "g-5", None);
                let mut named = certificate_files("c-9");
                named.extend(write_all(f));
                named
            }),
        ),
        (
            "renew c-9 under a new data key",
            Box::new(|f| {
                f.data_keys.remove("c-9");
                f.add_certificate("c-9", &["c-9.example.test"]);
                f.entries.retain(|e| e.certificate_id != "c-9");
                f.associate("c-9", "g-5", None);
                let mut named = certificate_files("c-9");
                named.extend(write_all(f));
                named
            }),
        ),
        (
            "narrow c-2's names",
            Box::new(|f| {
                f.entry("c-2").server_names = Some(vec!["www.c-2.example.test".into()]);
                write_all(f)
            }),
        ),
        (
            "move c-8 to g-5",
            Box::new(|f| {
                f.entries.retain(|e| e.certificate_id != "c-8");
                f.associate("c-8", "g-5", None);
                write_all(f)
            }),
        ),
        (
            "dissociate c-7",
            Box::new(|f| {
                f.entries.retain(|e| e.certificate_id != "c-7");
                write_all(f)
            }),
        ),
        (
            "associate c-2 twice",
            Box::new(|f| {
                let again = f.entry("c-2").clone();
                f.entries.push(again);
                write_all(f)
            }),
        ),
    ];

    let mut partial_reader = trusting_reader(&fixture);
    let mut complete_reader = trusting_reader(&fixture);
    let (mut partial, mut complete) = (Keyring::new(GRANTEE), Keyring::new(GRANTEE));
    let first = partial_reader.read(now(), &|_| None).unwrap();
    let mut outcomes: HashMap<String, String> =
        first.associations.iter().map(|a| (a.certificate_id.clone(), a.outcome())).collect();
    partial.apply(first);
    complete.apply(complete_reader.read(now(), &|_| None).unwrap());
    let mut partial_reads = 0;
    for (what, step) in std::iter::once(("nothing", Box::new(|_: &mut Fixture| vec![]) as Box<_>)).chain(steps) {
        let named = step(&mut fixture);
        let names: Vec<&str> = named.iter().map(String::as_str).collect();
        let snapshot =
            partial_reader.read_changes(now(), &|id| partial.inputs_of(id), &naming(&fixture, &names)).unwrap();
        fixture.assert_no_secrets(&snapshot);
        partial_reads += usize::from(is_partial(&snapshot));
        match &snapshot.scope {
            Scope::Complete => outcomes.clear(),
            Scope::Partial { removed, .. } => outcomes.retain(|id, _| !removed.contains(id)),
        }
        for outcome in &snapshot.associations {
            outcomes.insert(outcome.certificate_id.clone(), outcome.outcome());
        }
        partial.apply(snapshot);

        let snapshot = complete_reader.read(now(), &|id| complete.inputs_of(id)).unwrap();
        let expected: HashMap<String, String> =
            snapshot.associations.iter().map(|a| (a.certificate_id.clone(), a.outcome())).collect();
        complete.apply(snapshot);
        assert_eq!(serving(&partial), serving(&complete), "after: {what}");
        assert_eq!(outcomes, expected, "after: {what}");
        for grant in ["g-1", "g-2", "g-3", "g-4", "g-5", "g-7"] {
            assert_eq!(partial.is_retired(grant), complete.is_retired(grant), "{grant} after: {what}");
        }
    }
    assert_eq!(partial_reads, 19, "every read but the one after the duplicate entry is partial");
    let served: Vec<String> = serving(&partial).into_iter().map(|(id, ..)| id).collect();
    assert_eq!(served, ["c-1", "c-2", "c-6", "c-8", "c-9"]);
}

#[test]
fn a_named_directory_makes_every_file_under_it_suspect() {
    let fixture = two_certificates();
    let mut reader = trusting_reader(&fixture);
    let served = served_inputs(&read(&fixture, &mut reader, now(), &Served::new()));
    let export = &fixture.dir.path().to_owned();
    // The certificate directory replaced by rename with a tampered copy: only the directory is named.
    let dir = fixture.path("certificates/c-1");
    let copy = fixture.dir.path().join("certificates/.c-1.new");
    copy_tree(&dir, &copy);
    std::fs::write(copy.join("private-key.sealed"), tampered_sealed_key(&dir.join("private-key.sealed"))).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::rename(&copy, &dir).unwrap();
    let mut changes = Changes::none(export);
    changes.add(&dir);
    let snapshot = read_changes(&fixture, &mut reader, &served, &changes);
    assert_eq!(judged(&snapshot), [("c-1", "refused")]);
    assert_refused(&snapshot, 0, Check::Seal, reason::PRIVATE_KEY_SEAL);
    assert_eq!(reader.last_read().files_checked, 2);
}
