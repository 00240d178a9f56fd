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

use time::OffsetDateTime;

use super::cache::{self, Environment, FileCache, Problems, RefreshCounts, Suspects, EVERY_PATH};
use super::certificate::{self, CertificateFiles, CertificatePaths, Found, Leaf, ParsedChain, ParsedSealedKey};
use super::grants::{Authorized, GrantFiles, Grants};
use super::inputs::{self, FileHashes};
use super::{
    checks, parallel, reason, AssociationOutcome, Check, ExportError, GrantStatus, Refusal, Result, Snapshot, Verdict,
    VerifiedCertificate,
};
use crate::custody::changes::Changes;
use crate::custody::format::{layout, AssociationEntry, Associations, FormatError};

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
    associations: FileCache<Result<AssociationsFile, FormatError>>,
    grants: GrantFiles,
    certificates: FileCache<ParsedChain>,
    sealed_keys: FileCache<ParsedSealedKey>,
    stats: ReadStats,
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
        }
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
        self.read_with(now, known, EVERY_PATH)
    }

    /// As [`ExportReader::read`], examining on disk only the files that `changes` says may have changed (and
    /// those the cache cannot trust: new, missing, racy); every other file keeps its cached state. Judging is
    /// the same: check 1 of every association is judged at `now`. For reads prompted by file events, backed by
    /// full reads (see [`crate::custody::changes`]).
    pub fn read_changes(
        &mut self,
        now: OffsetDateTime,
        known: &dyn Fn(&str) -> Option<[u8; 32]>,
        changes: &Changes,
    ) -> Result<Snapshot> {
        let export = self.export.clone();
        self.read_with(now, known, &|path| changes.may_have_changed(&export, path))
    }

    fn read_with(
        &mut self,
        now: OffsetDateTime,
        known: &dyn Fn(&str) -> Option<[u8; 32]>,
        suspects: Suspects<'_>,
    ) -> Result<Snapshot> {
        let associations_path = self.export.join(layout::ASSOCIATIONS);
        let certificates_dir = self.export.join(layout::CERTIFICATES_DIR);
        let (associations, mut counts) = refresh_associations(
            &mut self.associations,
            &associations_path,
            &certificates_dir,
            &self.environment,
            suspects,
        )?;
        let (listing, grant_counts) =
            self.grants.refresh(&self.export.join(layout::GRANTS_DIR), &self.environment, suspects)?;
        counts += grant_counts;
        let grants = self.grants.view(&listing);
        let gates = gate(associations, &grants, &self.grantee, now);
        let (problems, file_counts) =
            refresh_certificates(&mut self.certificates, &mut self.sealed_keys, &gates, &self.environment, suspects);
        counts += file_counts;

        let judge = Judge {
            grantee: &self.grantee,
            grants: &grants,
            associations_path: &associations_path,
            certificates: &self.certificates,
            sealed_keys: &self.sealed_keys,
            problems: &problems,
        };
        let judged = judge.judge_all(&gates, known);
        let (statuses, changed_grants) = statuses(&grants, &judged, now);
        // The gates and the view borrow the grant cache, which is changed below.
        drop(gates);
        drop(grants);
        // A grant file that changed during the read is read again next time, whatever its stamp says then.
        for path in &changed_grants {
            self.grants.forget(path);
        }
        self.stats = ReadStats::of(counts, &judged);
        Ok(Snapshot {
            export: self.export.clone(),
            read_at: now,
            grants: statuses,
            associations: judged.into_iter().map(|j| j.outcome).collect(),
        })
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
fn refresh_certificates(
    certificates: &mut FileCache<ParsedChain>,
    sealed_keys: &mut FileCache<ParsedSealedKey>,
    gates: &[Gate<'_>],
    environment: &Environment,
    suspects: Suspects<'_>,
) -> (Problems, RefreshCounts) {
    let paths: Vec<&CertificatePaths> = gates.iter().filter_map(Gate::paths).collect();
    let certificate_paths: Vec<&Path> = paths.iter().map(|p| p.certificate.as_path()).collect();
    let sealed_key_paths: Vec<&Path> = paths.iter().map(|p| p.sealed_key.as_path()).collect();
    let (mut problems, mut counts) =
        certificates.refresh(&certificate_paths, environment, suspects, certificate::parse_chain);
    let (sealed_key_problems, sealed_key_counts) =
        sealed_keys.refresh(&sealed_key_paths, environment, suspects, certificate::parse_sealed_key);
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
/// has no cache entry left, so a file that comes back is read again.
fn refresh_associations<'c>(
    cache: &'c mut FileCache<Result<AssociationsFile, FormatError>>,
    path: &Path,
    certificates_dir: &Path,
    environment: &Environment,
    suspects: Suspects<'_>,
) -> Result<(&'c AssociationsFile, RefreshCounts)> {
    let paths = [path];
    let parse = |_: &Path, bytes: &[u8]| Associations::parse(bytes).map(|a| AssociationsFile::new(a, certificates_dir));
    let (mut problems, counts) = cache.refresh(&paths, environment, suspects, parse);
    match problems.remove(path) {
        Some(error) if cache::is_missing(&error) => return Ok((&NO_ASSOCIATIONS, counts)),
        Some(source) => return Err(ExportError::Io { path: path.to_owned(), source }),
        None => {}
    }
    match cache.get(path).map(|cached| &cached.value) {
        Some(Ok(associations)) => Ok((associations, counts)),
        Some(Err(source)) => Err(ExportError::Format { path: path.to_owned(), source: source.clone() }),
        // A refreshed path is either cached or a problem; were it neither, failing the read changes nothing.
        None => Err(ExportError::Io { path: path.to_owned(), source: std::io::Error::other("was not read") }),
    }
}

/// What an absent `associations.toml` says: nothing is associated.
static NO_ASSOCIATIONS: AssociationsFile = AssociationsFile { entries: Vec::new(), claims: Vec::new() };

/// A parsed `associations.toml`, with what follows from it alone: which entries are refused before any other
/// file is looked at (invalid ids, duplicates: they depend on file order), and where the others' files are.
/// Cached with the file, so that a read with an unchanged file redoes none of it.
struct AssociationsFile {
    entries: Vec<AssociationEntry>,
    /// One per entry: its certificate directory's files, or its refusal.
    claims: Vec<Result<CertificatePaths, Refusal>>,
}

impl AssociationsFile {
    fn new(associations: Associations, certificates_dir: &Path) -> Self {
        let mut claimed = HashSet::with_capacity(associations.entries.len());
        let claims = associations
            .entries
            .iter()
            .map(|entry| {
                claim(entry, &mut claimed).map(|()| CertificatePaths::new(certificates_dir, &entry.certificate_id))
            })
            .collect();
        Self { entries: associations.entries, claims }
    }
}

/// One entry after the checks that need no certificate file: its ids, its uniqueness, and check 1.
struct Gate<'a> {
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

/// Check 1 for every entry that was not refused by its ids or as a duplicate, on several threads.
fn gate<'a>(
    associations: &'a AssociationsFile,
    grants: &'a Grants<'a>,
    grantee: &str,
    now: OffsetDateTime,
) -> Vec<Gate<'a>> {
    let items: Vec<_> = associations.entries.iter().zip(&associations.claims).collect();
    parallel::map(&items, |&(entry, claim)| {
        let state = match claim {
            Ok(paths) => match grants.authorize(&entry.grant_id, grantee, now) {
                Ok(grant) => GateState::Open { grant, paths },
                Err(refusal) => GateState::Refused(refusal),
            },
            Err(refusal) => GateState::Refused(refusal.clone()),
        };
        Gate { entry, state }
    })
}

/// Refuses an entry whose ids are invalid (they must never become paths) or whose certificate an earlier entry
/// already associates (a second association must not compete with the first); otherwise records its
/// certificate id in `claimed`.
fn claim<'e>(entry: &'e AssociationEntry, claimed: &mut HashSet<&'e str>) -> Result<(), Refusal> {
    for (field, id) in [("certificate_id", &entry.certificate_id), ("grant_id", &entry.grant_id)] {
        if !crate::custody::format::is_valid_id(id) {
            let detail = format!("`{field}` {id:?} does not match [A-Za-z0-9_-]{{1,128}}");
            return Err(Refusal::new(Check::Files, reason::INVALID_ID, detail));
        }
    }
    if !claimed.insert(&entry.certificate_id) {
        let detail =
            format!("an earlier [[association]] entry names {}; only the first is judged", entry.certificate_id);
        return Err(Refusal::new(Check::Files, reason::DUPLICATE, detail));
    }
    Ok(())
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
        Judged { outcome, verified, grant_changed }
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
