//! [`ExportReader`]: reads one export again and again, cheaply when little changed.
//!
//! sealgate follows the export live, re-reading it on every file event and every few seconds, and must apply a
//! hot swap or a retirement within milliseconds however many certificates it holds. A full read decrypts every
//! key and validates every private key (about 0.4 ms per RSA-2048 key), so the reader keeps two kinds of memory:
//!
//! - **files**: every file's SHA-256 and parse, validated by its metadata (see [`super::cache`]), so that an
//!   unchanged file is stat'ed, not read, and a changed one is read once;
//! - **verdicts**: each outcome carries the digest of its inputs (see [`super::inputs`]). The caller says which
//!   digest its served generation of each certificate was verified from; when the digest is the same and check 1
//!   passes now, the association is [`Verdict::Unchanged`], without checks 2 to 5 and without decryption.
//!
//! Check 1 (the grant's state, lapse, grantee, `Decrypt` and key) is judged on every read from the cached grant
//! facts, so a lapse at `now` or a retirement is seen whatever the digests say.
//!
//! # Key material
//!
//! The caches hold public data only: file hashes, parsed certificates, sealed (encrypted) keys, association
//! entries (whose data keys are wrapped), and the non-secret fields of grant files. A grant file's key is never
//! cached: it is parsed and dropped when the file is cached, and read again from the file only to unwrap one
//! association's data key, in wiped buffers, and only while the file still has the bytes that passed check 1.
//! Grant keys and data keys thus live only for the verification of one association; decrypted private keys
//! leave in [`VerifiedCertificate`]s, for the keyring to take.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use time::OffsetDateTime;

use super::associations::AssociationsFile;
use super::cache::{self, Environment, FileCache, Problems, RefreshCounts, Suspects, EVERY_PATH};
use super::certificate::{self, CertificateFiles, CertificatePaths, Found, Leaf, ParsedChain, ParsedSealedKey};
use super::grants::{self as grant_files, Authorized, GrantFiles, Grants, Listing};
use super::inputs::{self, FileHashes};
use super::{
    checks, parallel, reason, AssociationOutcome, Check, ExportError, GrantStatus, Refusal, Result, Scope, Snapshot,
    Verdict, VerifiedCertificate,
};
use crate::custody::changes::{Changes, InLayout};
use crate::custody::format::{layout, AssociationEntry, FormatError};

/// What the last [`ExportReader::read`] did, for logs, metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Files whose metadata was checked.
    pub files_checked: usize,
    /// Files whose content was read: new, changed, or racy (timestamps too recent to trust).
    pub files_read: usize,
    /// Of those, files read only because their timestamps were too recent to trust.
    pub files_racy: usize,
    /// Associations that went through checks 2 to 5.
    pub verified: usize,
    /// Associations found [`Verdict::Unchanged`].
    pub unchanged: usize,
}

/// A stateful reader of one export for one holder: see the module documentation.
pub struct ExportReader {
    export: PathBuf,
    grantee: String,
    environment: Environment,
    associations: FileCache<Result<Arc<AssociationsFile>, FormatError>>,
    grants: GrantFiles,
    certificates: FileCache<ParsedChain>,
    sealed_keys: FileCache<ParsedSealedKey>,
    stats: ReadStats,
    /// What the last read left, when a read of named changes may start from it.
    last: Option<LastRead>,
    /// A superseded `associations.toml`, kept for [`ExportReader::drop_superseded`].
    superseded: Option<Arc<AssociationsFile>>,
}

/// What one read left for the next, so that a read of named changes judges only what they concern.
struct LastRead {
    /// SHA-256 of the `associations.toml` judged (`None` when there was none), and what it said.
    associations: (Option<[u8; 32]>, Arc<AssociationsFile>),
    /// The grant files found.
    listing: Listing,
    /// The first instant at which check 1 may judge a grant file found otherwise without any file changing.
    next_lapse: Option<OffsetDateTime>,
    /// Certificate ids of associations with files that could not be read: a fresh read would read them again,
    /// so every read judges them again.
    unsettled: Vec<String>,
}

impl fmt::Debug for ExportReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportReader")
            .field("export", &self.export)
            .field("grantee", &self.grantee)
            .field("cached_grants", &self.grants.len())
            .field("cached_certificates", &self.certificates.len())
            .field("last_read", &self.stats)
            .finish_non_exhaustive()
    }
}

impl ExportReader {
    /// A reader of `export` as the holder `grantee`, with nothing cached.
    pub fn new(export: PathBuf, grantee: String) -> Self {
        Self {
            export,
            grantee,
            environment: Environment::default(),
            associations: FileCache::default(),
            grants: GrantFiles::default(),
            certificates: FileCache::default(),
            sealed_keys: FileCache::default(),
            stats: ReadStats::default(),
            last: None,
            superseded: None,
        }
    }

    /// Frees what the last read superseded (the parse of a large `associations.toml` takes milliseconds to
    /// free): for the caller to do once it has applied the read, rather than before.
    pub fn drop_superseded(&mut self) {
        self.superseded = None;
    }

    /// What the last read did.
    pub fn last_read(&self) -> ReadStats {
        self.stats
    }

    /// Replaces the clock and `stat`, for tests of racy timestamps and renamed files.
    #[cfg(test)]
    pub(super) fn set_environment(&mut self, environment: Environment) {
        self.environment = environment;
    }

    /// Trusts the stamps of files written in the last seconds (the clock a minute ahead), for tests elsewhere
    /// that must see which files a read examines.
    #[cfg(test)]
    pub(crate) fn trust_recent_stamps(&mut self) {
        let ahead = || std::time::SystemTime::now() + std::time::Duration::from_secs(60);
        self.environment = Environment { now: ahead, ..Environment::default() };
    }

    /// One read of the export, judging lapses at `now`: the same outcomes as [`super::read_export`], except
    /// that an association whose check 1 passes and whose inputs digest equals `known(certificate_id)` (the
    /// digest of the generation the caller already serves for it) comes back [`Verdict::Unchanged`], without
    /// checks 2 to 5 and without decrypting anything.
    ///
    /// What is absent reads as empty, as in [`super::read_export`]: no export directory, no `associations.toml`
    /// or no `grants/` is a state (a deleted export retires its grants), and nothing of it is taken from the
    /// cache. Fails only when the export as a whole cannot be judged: `associations.toml` exists but cannot be
    /// read or does not parse, or `grants/` exists but cannot be listed. Anything wrong with one association
    /// refuses that association alone. A file that is missing or does not parse is never acted on, and is read
    /// again next time it changes. This blocks, on up to one thread per core; call it from a blocking context.
    pub fn read(&mut self, now: OffsetDateTime, known: &dyn Fn(&str) -> Option<[u8; 32]>) -> Result<Snapshot> {
        self.read_with(now, known, EVERY_PATH, RefreshCounts::default())
    }

    /// As [`ExportReader::read`], after file events: examines on disk only the files that `changes` says may
    /// have changed (and those the cache cannot trust: new, missing, racy), and, when it can, judges only the
    /// associations they concern, returning a [`Scope::Partial`] snapshot.
    ///
    /// It can when the previous read of this reader succeeded (and the caller applied it), `associations.toml`
    /// has the bytes that read judged, no grant file it found lapses before `now`, and the events named no
    /// more than files and certificate directories. Then the associations judged are those whose certificate
    /// directory, grant file, or cache entries (racy, unreadable) may have changed, and the grant statuses
    /// reported are those of the grants they use and the grant files named; check 1 of every other
    /// association would judge as before. Otherwise every association is judged and the snapshot is complete.
    /// For reads prompted by file events, backed by full reads (see [`crate::custody::changes`]).
    pub fn read_changes(
        &mut self,
        now: OffsetDateTime,
        known: &dyn Fn(&str) -> Option<[u8; 32]>,
        changes: &Changes,
    ) -> Result<Snapshot> {
        let mut counts = RefreshCounts::default();
        if let Some(named) = changes.in_layout() {
            match self.read_named(now, known, &named) {
                Ok(snapshot) => return Ok(snapshot),
                Err(so_far) => counts = so_far,
            }
        }
        let export = self.export.clone();
        self.read_with(now, known, &|path| changes.may_have_changed(&export, path), counts)
    }

    /// The partial read of [`ExportReader::read_changes`], or what it refreshed before finding that it cannot
    /// be partial.
    fn read_named(
        &mut self,
        now: OffsetDateTime,
        known: &dyn Fn(&str) -> Option<[u8; 32]>,
        named: &InLayout,
    ) -> Result<Snapshot, RefreshCounts> {
        let no_counts = RefreshCounts::default();
        let mut last = self.last.take().ok_or(no_counts)?;
        if last.next_lapse.is_some_and(|lapse| lapse <= now) {
            return Err(no_counts);
        }
        let associations_path = self.export.join(layout::ASSOCIATIONS);
        let certificates_dir = self.export.join(layout::CERTIFICATES_DIR);
        let suspect = named.associations;
        let (sha256, associations, mut counts) = refresh_associations(
            &mut self.associations,
            &associations_path,
            &certificates_dir,
            &self.environment,
            &|_| suspect,
        )
        .map_err(|_| no_counts)?;
        let (changed_entries, removed) = if sha256 == last.associations.0 {
            (Vec::new(), Vec::new())
        } else {
            associations.changes_since(&last.associations.1).ok_or(counts)?
        };

        // The grant files that may have changed, and the associations that use them or whose own files may have.
        let mut touched_grants: Vec<String> = named
            .grant_files
            .iter()
            .filter_map(|name| grant_files::grant_id_of(name))
            .chain(self.grants.racy_ids())
            .chain(last.listing.unreadable_ids())
            .map(str::to_owned)
            .collect();
        touched_grants.sort_unstable();
        touched_grants.dedup();
        let (gone_grants, grant_counts) =
            self.grants.refresh_some(&mut last.listing, &touched_grants, &self.environment);
        counts += grant_counts;
        let racy_files = self.certificates.racy_paths().chain(self.sealed_keys.racy_paths());
        let racy_directories = racy_files.filter_map(|path| path.parent()?.file_name());
        let mut touched: Vec<usize> = named
            .certificate_dirs
            .iter()
            .map(|name| name.as_os_str())
            .chain(racy_directories)
            .filter_map(|name| name.to_str())
            .chain(last.unsettled.iter().map(String::as_str))
            .filter_map(|id| associations.claiming(id))
            .chain(associations.entries_under(&touched_grants))
            .chain(changed_entries)
            .collect();
        touched.sort_unstable();
        touched.dedup();

        let mut grant_ids: Vec<&str> = touched_grants.iter().map(String::as_str).collect();
        grant_ids.extend(touched.iter().map(|&i| associations.entries[i].grant_id.as_str()));
        grant_ids.sort_unstable();
        grant_ids.dedup();
        let grants = self.grants.view_some(&last.listing, &grant_ids);
        let gates = gate(&associations, &touched, &grants, &self.grantee, now);
        // Files of associations whose grant now refuses them leave the cache, as a full read prunes them: a read
        // that trusts an unchanged stamp must only ever find entries refreshed since the last event.
        for gate in &gates {
            if let (GateState::Refused(_), Some(paths)) = (&gate.state, associations.paths_of(gate.index)) {
                self.certificates.forget(&paths.certificate);
                self.sealed_keys.forget(&paths.sealed_key);
            }
        }
        let (problems, file_counts) =
            refresh_certificates(&mut self.certificates, &mut self.sealed_keys, &gates, &self.environment, None);
        counts += file_counts;
        let judged = self.judge(&grants, &associations_path, &problems, &gates, known);
        let (statuses, changed_grants) = statuses(&grants, &judged, now);
        let next_lapse = [last.next_lapse, grants.next_lapse(now)].into_iter().flatten().min();
        drop(gates);
        drop(grants);
        self.stats = ReadStats::of(counts, &judged);
        if changed_grants.is_empty() {
            last.unsettled.retain(|id| associations.claiming(id).is_some_and(|i| touched.binary_search(&i).is_err()));
            let unsettled = judged.iter().filter(|j| j.unsettled).map(|j| j.outcome.certificate_id.clone());
            last.unsettled.extend(unsettled);
            last.next_lapse = next_lapse;
            let earlier = std::mem::replace(&mut last.associations, (sha256, Arc::clone(&associations)));
            self.superseded = Some(earlier.1);
            self.last = Some(last);
        } else {
            // A grant file changed during the read: it is read again, and everything judged, next time.
            for path in &changed_grants {
                self.grants.forget(path);
            }
        }
        Ok(Snapshot {
            export: self.export.clone(),
            read_at: now,
            grants: statuses,
            associations: judged.into_iter().map(|j| j.outcome).collect(),
            scope: Scope::Partial { gone_grants, removed },
        })
    }

    fn read_with(
        &mut self,
        now: OffsetDateTime,
        known: &dyn Fn(&str) -> Option<[u8; 32]>,
        suspects: Suspects<'_>,
        mut counts: RefreshCounts,
    ) -> Result<Snapshot> {
        self.last = None;
        let associations_path = self.export.join(layout::ASSOCIATIONS);
        let certificates_dir = self.export.join(layout::CERTIFICATES_DIR);
        let (associations_sha256, associations, association_counts) = refresh_associations(
            &mut self.associations,
            &associations_path,
            &certificates_dir,
            &self.environment,
            suspects,
        )?;
        counts += association_counts;
        let (listing, grant_counts) =
            self.grants.refresh(&self.export.join(layout::GRANTS_DIR), &self.environment, suspects)?;
        counts += grant_counts;
        let grants = self.grants.view(&listing);
        let every: Vec<usize> = (0..associations.entries.len()).collect();
        let gates = gate(&associations, &every, &grants, &self.grantee, now);
        let (problems, file_counts) = refresh_certificates(
            &mut self.certificates,
            &mut self.sealed_keys,
            &gates,
            &self.environment,
            Some(suspects),
        );
        counts += file_counts;

        let judged = self.judge(&grants, &associations_path, &problems, &gates, known);
        let (statuses, changed_grants) = statuses(&grants, &judged, now);
        let next_lapse = grants.next_lapse(now);
        // The gates and the view borrow the grant cache, which is changed below.
        drop(gates);
        drop(grants);
        // A grant file that changed during the read is read again next time, whatever its stamp says then.
        for path in &changed_grants {
            self.grants.forget(path);
        }
        self.stats = ReadStats::of(counts, &judged);
        if changed_grants.is_empty() {
            let unsettled = judged.iter().filter(|j| j.unsettled).map(|j| j.outcome.certificate_id.clone()).collect();
            let associations = (associations_sha256, associations);
            self.last = Some(LastRead { associations, listing, next_lapse, unsettled });
        }
        Ok(Snapshot {
            export: self.export.clone(),
            read_at: now,
            grants: statuses,
            associations: judged.into_iter().map(|j| j.outcome).collect(),
            scope: Scope::Complete,
        })
    }
}

impl ExportReader {
    /// Judges the gated entries, their files refreshed (`problems`: those that could not be read).
    fn judge(
        &self,
        grants: &Grants<'_>,
        associations_path: &Path,
        problems: &Problems,
        gates: &[Gate<'_>],
        known: &dyn Fn(&str) -> Option<[u8; 32]>,
    ) -> Vec<Judged> {
        let judge = Judge {
            grantee: &self.grantee,
            grants,
            associations_path,
            certificates: &self.certificates,
            sealed_keys: &self.sealed_keys,
            problems,
        };
        judge.judge_all(gates, known)
    }
}

impl ReadStats {
    fn of(counts: RefreshCounts, judged: &[Judged]) -> Self {
        Self {
            files_checked: counts.checked,
            files_read: counts.read,
            files_racy: counts.racy,
            verified: judged.iter().filter(|j| j.verified).count(),
            unchanged: judged.iter().filter(|j| matches!(j.outcome.result, Verdict::Unchanged)).count(),
        }
    }
}

/// Refreshes the certificate directories of the entries whose grant passed check 1 (and only those: the files
/// of an association refused before are not looked at, as in a fresh read).
///
/// With `suspects`, the gates are every entry's, and the caches are pruned to their files. Without, the gates
/// are some entries' (a partial read), and their files are stat'ed whatever their entries say.
fn refresh_certificates(
    certificates: &mut FileCache<ParsedChain>,
    sealed_keys: &mut FileCache<ParsedSealedKey>,
    gates: &[Gate<'_>],
    environment: &Environment,
    suspects: Option<Suspects<'_>>,
) -> (Problems, RefreshCounts) {
    let paths: Vec<&CertificatePaths> = gates.iter().filter_map(Gate::paths).collect();
    let certificate_paths: Vec<&Path> = paths.iter().map(|p| p.certificate.as_path()).collect();
    let sealed_key_paths: Vec<&Path> = paths.iter().map(|p| p.sealed_key.as_path()).collect();
    let (mut problems, mut counts) = match suspects {
        Some(suspects) => certificates.refresh(&certificate_paths, environment, suspects, certificate::parse_chain),
        None => certificates.refresh_some(&certificate_paths, environment, certificate::parse_chain),
    };
    let (sealed_key_problems, sealed_key_counts) = match suspects {
        Some(suspects) => sealed_keys.refresh(&sealed_key_paths, environment, suspects, certificate::parse_sealed_key),
        None => sealed_keys.refresh_some(&sealed_key_paths, environment, certificate::parse_sealed_key),
    };
    problems.extend(sealed_key_problems);
    counts += sealed_key_counts;
    (problems, counts)
}

/// Every grant file's status at `now`, as read, except those that changed during the read: unknown (unreadable,
/// retry) for this read. Also returns the paths of those.
fn statuses(
    grants: &Grants<'_>,
    judged: &[Judged],
    now: OffsetDateTime,
) -> (BTreeMap<String, GrantStatus>, HashSet<PathBuf>) {
    let mut statuses = grants.statuses(now);
    let mut changed = HashSet::new();
    for judged in judged {
        if let Some(message) = &judged.grant_changed {
            statuses.insert(judged.outcome.grant_id.clone(), GrantStatus::Unreadable(message.clone()));
            changed.insert(grants.path_of(&judged.outcome.grant_id));
        }
    }
    (statuses, changed)
}

/// Refreshes `associations.toml`. An absent file (or a dangling link, or no export directory at all) associates
/// nothing; a file that exists but cannot be read or does not parse fails the whole read. Either way the file
/// has no cache entry left, so a file that comes back is read again. Also returns the file's SHA-256, `None`
/// when absent.
fn refresh_associations(
    cache: &mut FileCache<Result<Arc<AssociationsFile>, FormatError>>,
    path: &Path,
    certificates_dir: &Path,
    environment: &Environment,
    suspects: Suspects<'_>,
) -> Result<(Option<[u8; 32]>, Arc<AssociationsFile>, RefreshCounts)> {
    let paths = [path];
    let parse = |_: &Path, bytes: &[u8], previous: Option<&Result<Arc<AssociationsFile>, FormatError>>| {
        let previous = previous.and_then(|p| p.as_deref().ok());
        AssociationsFile::parse(bytes, certificates_dir, previous).map(Arc::new)
    };
    let (mut problems, counts) = cache.refresh_from_previous(&paths, environment, suspects, parse);
    match problems.remove(path) {
        Some(error) if cache::is_missing(&error) => return Ok((None, Arc::clone(&NO_ASSOCIATIONS), counts)),
        Some(source) => return Err(ExportError::Io { path: path.to_owned(), source }),
        None => {}
    }
    match cache.get(path).map(|cached| (cached.sha256, &cached.value)) {
        Some((sha256, Ok(associations))) => Ok((Some(sha256), Arc::clone(associations), counts)),
        Some((_, Err(source))) => Err(ExportError::Format { path: path.to_owned(), source: source.clone() }),
        // A refreshed path is either cached or a problem; were it neither, failing the read changes nothing.
        None => Err(ExportError::Io { path: path.to_owned(), source: std::io::Error::other("was not read") }),
    }
}

/// What an absent `associations.toml` says: nothing is associated.
static NO_ASSOCIATIONS: std::sync::LazyLock<Arc<AssociationsFile>> =
    std::sync::LazyLock::new(|| Arc::new(AssociationsFile::empty()));

/// One entry after the checks that need no certificate file: its ids, its uniqueness, and check 1.
struct Gate<'a> {
    /// The entry's index in the file.
    index: usize,
    entry: &'a AssociationEntry,
    state: GateState<'a>,
}

enum GateState<'a> {
    /// Refused before any certificate file is looked at.
    Refused(Refusal),
    /// Check 1 passed: the certificate directory's files are to be read.
    Open { grant: Authorized<'a>, paths: &'a CertificatePaths },
}

impl Gate<'_> {
    fn paths(&self) -> Option<&CertificatePaths> {
        match &self.state {
            GateState::Refused(_) => None,
            GateState::Open { paths, .. } => Some(paths),
        }
    }
}

/// Check 1 for every entry of `items` (with its claim) that was not refused by its ids or as a duplicate, on
/// several threads.
fn gate<'a>(
    associations: &'a AssociationsFile,
    indices: &[usize],
    grants: &'a Grants<'a>,
    grantee: &str,
    now: OffsetDateTime,
) -> Vec<Gate<'a>> {
    parallel::map(indices, |&index| {
        let entry = &*associations.entries[index];
        let state = match associations.claim(index) {
            Ok(paths) => match grants.authorize(&entry.grant_id, grantee, now) {
                Ok(grant) => GateState::Open { grant, paths },
                Err(refusal) => GateState::Refused(refusal),
            },
            Err(refusal) => GateState::Refused(refusal.clone()),
        };
        Gate { index, entry, state }
    })
}

/// What one read needs to judge entries once their files were refreshed.
struct Judge<'a> {
    grantee: &'a str,
    grants: &'a Grants<'a>,
    associations_path: &'a Path,
    certificates: &'a FileCache<ParsedChain>,
    sealed_keys: &'a FileCache<ParsedSealedKey>,
    problems: &'a Problems,
}

/// An outcome, with what the reader needs to know about how it was reached.
struct Judged {
    outcome: AssociationOutcome,
    /// Whether checks 2 to 5 were run.
    verified: bool,
    /// The grant file changed after check 1 was judged on it: the message for its status.
    grant_changed: Option<String>,
    /// A file of the association could not be read (missing, unreadable, or its grant changed): a fresh read
    /// would read it again.
    unsettled: bool,
}

impl Judge<'_> {
    /// Judges every gated entry, on several threads. `known` need not be `Sync`: it is asked here, once per
    /// entry whose grant passed check 1, before the judging starts.
    fn judge_all(&self, gates: &[Gate<'_>], known: &dyn Fn(&str) -> Option<[u8; 32]>) -> Vec<Judged> {
        let items: Vec<(&Gate<'_>, Option<[u8; 32]>)> =
            gates.iter().map(|g| (g, g.paths().and_then(|_| known(&g.entry.certificate_id)))).collect();
        parallel::map(&items, |(gate, known)| self.judge(gate, *known))
    }

    /// Judges one gated entry: [`Verdict::Unchanged`] when check 1 passed and `known` is its inputs digest,
    /// otherwise checks 2 to 5.
    fn judge(&self, gate: &Gate<'_>, known: Option<[u8; 32]>) -> Judged {
        let entry = gate.entry;
        let mut facts = Known::from_entry(entry);
        let mut verified = false;
        let mut grant_changed = None;
        let mut unsettled = false;
        let (inputs, result) = match &gate.state {
            GateState::Refused(refusal) => {
                let hashes = FileHashes { grant: self.grants.sha256(&entry.grant_id), ..FileHashes::default() };
                (inputs::digest(self.grantee, entry, &hashes), Verdict::Refused(refusal.clone()))
            }
            GateState::Open { grant, paths } => {
                let chain = self.certificates.get(&paths.certificate);
                let sealed_key = self.sealed_keys.get(&paths.sealed_key);
                let hashes = FileHashes {
                    grant: Some(grant.sha256),
                    certificate: chain.map(|c| c.sha256),
                    sealed_key: sealed_key.map(|c| c.sha256),
                };
                let inputs = inputs::digest(self.grantee, entry, &hashes);
                unsettled = chain.is_none() || sealed_key.is_none();
                let chain = found(chain.map(|c| &c.value), self.problems, &paths.certificate);
                let sealed_key = found(sealed_key.map(|c| &c.value), self.problems, &paths.sealed_key);
                let files = CertificateFiles::new(paths, chain, sealed_key);
                let result = if known == Some(inputs) {
                    if let Ok(files) = &files {
                        facts.learn(entry, files.leaf);
                    }
                    Verdict::Unchanged
                } else {
                    verified = true;
                    match self.verify(grant, entry, files, &mut facts) {
                        Ok(certificate) => Verdict::Served(certificate),
                        Err(Failure::Refused(refusal)) => Verdict::Refused(refusal),
                        Err(Failure::GrantChanged(refusal)) => {
                            unsettled = true;
                            grant_changed = Some(refusal.detail.clone());
                            Verdict::Refused(refusal)
                        }
                    }
                };
                (inputs, result)
            }
        };
        let (server_names, certificate_not_after) = match &result {
            Verdict::Served(certificate) => (certificate.server_names.clone(), Some(certificate.not_after)),
            Verdict::Unchanged | Verdict::Refused(_) => (facts.server_names, facts.not_after),
        };
        let outcome = AssociationOutcome {
            certificate_id: entry.certificate_id.clone(),
            grant_id: entry.grant_id.clone(),
            server_names,
            certificate_not_after,
            inputs,
            result,
        };
        Judged { outcome, verified, grant_changed, unsettled }
    }

    /// Checks 2 to 5, in order, for an entry whose grant passed check 1 at this read's instant.
    fn verify(
        &self,
        grant: &Authorized<'_>,
        entry: &AssociationEntry,
        files: Result<CertificateFiles<'_>, Refusal>,
        facts: &mut Known,
    ) -> Result<VerifiedCertificate, Failure> {
        let files = files?;
        facts.learn(entry, files.leaf);
        checks::key_ids(grant, &files)?;
        let private_key = self
            .grants
            .with_grant_key(grant, |grant_key| {
                checks::open_seals(grant.grant, grant_key, entry, self.associations_path, &files)
            })
            .map_err(|changed| {
                Failure::GrantChanged(Refusal::new(Check::Grant, reason::GRANT_CHANGED, changed.to_string()))
            })??;
        let signing_key = checks::key_matches(&private_key, &files)?;
        let server_names = checks::server_names(entry.server_names.as_deref(), files.leaf)?;
        Ok(VerifiedCertificate {
            certificate_id: entry.certificate_id.clone(),
            grant_id: entry.grant_id.clone(),
            grant_not_after: grant.grant.not_after,
            server_names,
            leaf_sha256: files.leaf.sha256,
            not_before: files.leaf.not_before,
            not_after: files.leaf.not_after,
            chain: files.chain.to_vec(),
            signing_key,
            private_key,
        })
    }
}

/// Why [`Judge::verify`] refused.
enum Failure {
    /// A check failed.
    Refused(Refusal),
    /// The grant file changed after check 1 was judged on it: its state is unknown for this read.
    GrantChanged(Refusal),
}

impl From<Refusal> for Failure {
    fn from(refusal: Refusal) -> Self {
        Self::Refused(refusal)
    }
}

/// The cached parse at `path`, or the I/O error that kept it from being read.
fn found<'a, T>(cached: Option<&'a Result<T, String>>, problems: &'a Problems, path: &Path) -> Found<'a, T> {
    match (cached, problems.get(path)) {
        (Some(parsed), _) => Found::Cached(parsed),
        (None, Some(error)) => Found::Unreadable(error),
        (None, None) => Found::NotRead,
    }
}

/// What became known about an association before its outcome was decided, for reports of refusals.
struct Known {
    server_names: Vec<String>,
    not_after: Option<OffsetDateTime>,
}

impl Known {
    /// The entry's own `server_names`, normalised, before any file is read.
    fn from_entry(entry: &AssociationEntry) -> Self {
        let server_names = entry.server_names.as_deref().map(super::normalized_names).unwrap_or_default();
        Self { server_names, not_after: None }
    }

    /// Adds what the leaf says: its validity, and its DNS names when the entry named none.
    fn learn(&mut self, entry: &AssociationEntry, leaf: &Leaf) {
        self.not_after = Some(leaf.not_after);
        if entry.server_names.is_none() {
            self.server_names = leaf.dns_names.clone();
        }
    }
}

#[cfg(test)]
impl ExportReader {
    /// Number of files cached, for tests of pruning.
    pub(super) fn cached_files(&self) -> usize {
        self.associations.len() + self.grants.len() + self.certificates.len() + self.sealed_keys.len()
    }
}
