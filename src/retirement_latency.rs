//! How long a grant's retirement took when no file event timed it.
//!
//! A retirement read after a file event is timed from that event. One found otherwise (by the periodic rescan
//! that backs the events up, by a retry, by a read asked for directly) has no event to start from, yet it is
//! exactly the case whose latency matters: the slow path. The export's files carry the best remaining witness of
//! when the grant ended, so the latency is estimated from them:
//!
//! - a grant whose file is gone: the grants directory's stamps (an unlink changes its directory), or, when the
//!   directory is gone too, those of the first of the export and its parent that still exists;
//! - a grant whose file changed (`state = "retired"`, another grantee, no `Decrypt`): the file's stamps;
//! - a lapse: the grant's `not_after`, when it has passed; else the file's stamps (it was rewritten with a
//!   `not_after` already past).
//!
//! A stamp is the later of the modification and the status-change times. A file replaced by rename, as custody
//! systems write, gets its status-change time at the rename, when the change became visible; the modification
//! time is that of the write before it, or whatever a copy that preserves times (`cp -p`, `rsync -t`, `tar`)
//! gave it, which could date a change back by days. A later change to the same directory or file (another grant
//! file created, a `chmod`) makes the estimate later, so the latency reported can only be shorter than the
//! real one by such a change, never longer by a preserved time.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use time::OffsetDateTime;

use crate::custody::format::layout;
use crate::keyring::{EndedGrant, GrantEnd};

/// The time from when `ended`'s grant ended in the export (see the module documentation) to `now`, or `None`
/// when no file tells (nothing of the export, nor its parent, can be `stat`ed). A stamp after `now` (a clock
/// stepped back, a coarse file system clock) counts as no time at all.
pub fn estimate(export: &Path, ended: &EndedGrant, now: OffsetDateTime) -> Option<Duration> {
    let at = ended_at(export, ended, now)?;
    Some(Duration::try_from(now - at).unwrap_or(Duration::ZERO))
}

/// When `ended`'s grant ended in the export, as far as its files (or its `not_after`) tell.
fn ended_at(export: &Path, ended: &EndedGrant, now: OffsetDateTime) -> Option<OffsetDateTime> {
    let grants_dir = export.join(layout::GRANTS_DIR);
    let grant_file = grants_dir.join(format!("{}.{}", ended.grant_id, layout::GRANT_EXTENSION));
    let removal = || {
        let candidates = [Some(grants_dir.clone()), Some(export.to_owned()), export.parent().map(Path::to_owned)];
        first_stamp(candidates.into_iter().flatten())
    };
    match ended.reason {
        GrantEnd::Gone => removal(),
        GrantEnd::Lapsed => match ended.not_after.filter(|t| *t <= now) {
            Some(not_after) => Some(not_after),
            None => stamp(&grant_file).or_else(removal),
        },
        // The file that says so may have gone since the read: then its removal is the latest witness.
        GrantEnd::Retired | GrantEnd::Revoked => stamp(&grant_file).or_else(removal),
    }
}

/// The stamp of the first of `paths` that exists.
fn first_stamp(mut paths: impl Iterator<Item = PathBuf>) -> Option<OffsetDateTime> {
    paths.find_map(|path| stamp(&path))
}

/// The later of `path`'s modification and status-change times (following symbolic links: a Kubernetes volume's
/// visible names are links).
fn stamp(path: &Path) -> Option<OffsetDateTime> {
    let metadata = std::fs::metadata(path).ok()?;
    let at = |seconds: i64, nanos: i64| {
        let nanos = i128::from(seconds) * 1_000_000_000 + i128::from(nanos);
        OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
    };
    let modified = at(metadata.mtime(), metadata.mtime_nsec());
    let changed = at(metadata.ctime(), metadata.ctime_nsec());
    modified.max(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(reason: GrantEnd, not_after: Option<OffsetDateTime>) -> EndedGrant {
        EndedGrant { grant_id: "g-1".to_owned(), not_after, reason, certificates: Vec::new() }
    }

    /// An export with `grants/g-1.toml`, and the instant just after it was written.
    fn export_with_grant() -> (tempfile::TempDir, PathBuf, OffsetDateTime) {
        let dir = tempfile::tempdir().unwrap();
        let export = dir.path().join("export");
        std::fs::create_dir_all(export.join("grants")).unwrap();
        std::fs::write(export.join("grants/g-1.toml"), "state = \"retired\"\n").unwrap();
        (dir, export, OffsetDateTime::now_utc())
    }

    #[test]
    fn a_changed_grant_file_dates_its_retirement() {
        let (_dir, export, written) = export_with_grant();
        let changed = stamp(&export.join("grants/g-1.toml")).unwrap();
        for reason in [GrantEnd::Retired, GrantEnd::Revoked] {
            let later = written + time::Duration::seconds(3);
            let latency = estimate(&export, &ended(reason, None), later).unwrap();
            assert_eq!(latency, Duration::try_from(later - changed).unwrap(), "{reason:?}");
            assert!(latency >= Duration::from_secs(3), "{reason:?}: {latency:?}");
        }
    }

    #[test]
    fn a_deleted_grant_file_is_dated_by_its_directory_then_the_nearest_one_left() {
        let (dir, export, _) = export_with_grant();
        std::fs::remove_file(export.join("grants/g-1.toml")).unwrap();
        let unlinked = stamp(&export.join("grants")).unwrap();
        let now = OffsetDateTime::now_utc() + time::Duration::seconds(1);
        assert_eq!(ended_at(&export, &ended(GrantEnd::Gone, None), now), Some(unlinked));
        // A grant file that said "retired" and is gone since: its removal dates it.
        assert_eq!(ended_at(&export, &ended(GrantEnd::Retired, None), now), Some(unlinked));

        std::fs::remove_dir_all(&export).unwrap();
        let removed = stamp(dir.path()).unwrap();
        assert!(removed >= unlinked);
        assert_eq!(ended_at(&export, &ended(GrantEnd::Gone, None), now), Some(removed));
    }

    #[test]
    fn a_lapse_is_dated_by_not_after_unless_the_file_was_rewritten_with_one_already_past() {
        let (_dir, export, written) = export_with_grant();
        let now = written + time::Duration::minutes(5);
        let not_after = now - time::Duration::minutes(1);
        let latency = estimate(&export, &ended(GrantEnd::Lapsed, Some(not_after)), now).unwrap();
        assert_eq!(latency, Duration::from_secs(60));
        // Held with no not_after (or a later one): the read found the file saying otherwise.
        let file = stamp(&export.join("grants/g-1.toml")).unwrap();
        for not_after in [None, Some(now + time::Duration::hours(1))] {
            assert_eq!(ended_at(&export, &ended(GrantEnd::Lapsed, not_after), now), Some(file));
        }
    }

    #[test]
    fn a_stamp_after_now_is_no_time_at_all_and_no_stamp_is_no_estimate() {
        let (_dir, export, written) = export_with_grant();
        let before = written - time::Duration::seconds(10);
        assert_eq!(estimate(&export, &ended(GrantEnd::Retired, None), before), Some(Duration::ZERO));
        let nowhere = Path::new("/nonexistent-sealgate-test/a/export");
        assert_eq!(estimate(nowhere, &ended(GrantEnd::Gone, None), written), None);
    }
}
