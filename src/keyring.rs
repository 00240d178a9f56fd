//! The keys sealgate holds, grant by grant: what is served, what was kept from an earlier read, and what ended.
//!
//! The keyring turns a stream of [`Snapshot`]s into the set of certificates to serve. It is the one place that
//! remembers across reads, because FORMAT.md makes memory matter:
//!
//! - a refused new state of an association that is already being served keeps the last good state, because a
//!   reader can catch the custody system midway through a renewal;
//! - only the grant ends service: when a held grant is retired, lapses, disappears or stops naming us, every
//!   key decrypted under it is dropped at once and the grant's [`CancellationToken`] fires, which closes the
//!   connections made with its certificates;
//! - a retired grant never comes back for the life of the process, whatever a later file says; and a grant issued
//!   to us is retired as soon as its file is gone, whether or not anything was ever served under it.
//!
//! The keyring also remembers, for every served certificate, the inputs digest of the last read that verified it
//! (or found it unchanged): [`Keyring::inputs_of`] hands it to the [`ExportReader`](crate::custody::snapshot::ExportReader),
//! which then skips the verification of associations whose inputs did not change.
//!
//! Keys live only inside [`CertifiedKey`]s parsed by aws-lc (whose `OPENSSL_free` cleanses memory). The
//! decrypted PKCS#8 DER that came with a [`VerifiedCertificate`] is dropped (and wiped) as soon as it is taken.
//! Grant keys and data keys are never held here at all: they live only while a snapshot is being verified.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::custody::snapshot::{
    AssociationOutcome, Check, GrantStatus, Refusal, Scope, Snapshot, Verdict, VerifiedCertificate,
};

/// What identifies one *generation* of one association: a renewal (new certificate or key) or a change of
/// server names makes a new generation; an unchanged re-read keeps the old one. Connections keep this (and not
/// the [`LoadedCertificate`]) so that an open connection never keeps a replaced key alive.
#[derive(Debug)]
pub struct CertificateIdentity {
    /// The certificate id.
    pub certificate_id: String,
    /// The grant its key was decrypted under.
    pub grant_id: String,
    /// Unique for the life of the process.
    pub generation: u64,
    /// Names it is served for, normalised.
    pub server_names: Vec<String>,
    /// The leaf's validity start: among certificates for one name, the latest wins.
    pub not_before: OffsetDateTime,
    /// The leaf's validity end.
    pub not_after: OffsetDateTime,
    /// SHA-256 of the leaf.
    pub leaf_sha256: [u8; 32],
    /// The inputs digest of the association this generation was loaded from (see
    /// [`AssociationOutcome::inputs`](crate::custody::snapshot::AssociationOutcome::inputs)). A later read may
    /// verify the same certificate and key from other inputs (a re-wrapped data key, a rewritten grant file) and
    /// keep this generation: [`Keyring::inputs_of`] gives the latest.
    pub inputs: [u8; 32],
}

/// A certificate loaded for serving: its identity, its chain and key, and its grant's end signal.
pub struct LoadedCertificate {
    /// Which certificate and generation this is.
    pub identity: Arc<CertificateIdentity>,
    /// The chain and key; emptied when the grant ends, so that a handshake already holding this generation
    /// cannot sign with a retired key.
    key: ArcSwapOption<CertifiedKey>,
    /// Fires when the grant ends. Shared by every certificate of the grant and watched by every connection
    /// made with one of them.
    grant_ended: CancellationToken,
}

impl std::ops::Deref for LoadedCertificate {
    type Target = CertificateIdentity;

    fn deref(&self) -> &CertificateIdentity {
        &self.identity
    }
}

impl LoadedCertificate {
    /// The chain and key to sign with, or `None` once the grant has ended.
    pub fn certified_key(&self) -> Option<Arc<CertifiedKey>> {
        if self.grant_ended.is_cancelled() {
            return None;
        }
        self.key.load_full()
    }

    /// Fires when the grant this certificate depends on ends.
    pub fn grant_ended(&self) -> &CancellationToken {
        &self.grant_ended
    }

    /// Whether the grant has ended.
    pub fn is_retired(&self) -> bool {
        self.grant_ended.is_cancelled()
    }

    /// Drops this generation's key now rather than when the last reference goes.
    fn drop_key(&self) {
        self.key.store(None);
    }
}

impl fmt::Debug for LoadedCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedCertificate").field("identity", &self.identity).finish_non_exhaustive()
    }
}

/// Why a held grant ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantEnd {
    /// Its file is gone.
    Gone,
    /// Its file says `state = "retired"`.
    Retired,
    /// Its `not_after` has passed.
    Lapsed,
    /// Its file no longer names us as grantee, or no longer allows `Decrypt`.
    Revoked,
}

impl fmt::Display for GrantEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Gone => "its file is gone",
            Self::Retired => "it is retired",
            Self::Lapsed => "its not_after has passed",
            Self::Revoked => "it no longer allows this holder to decrypt",
        })
    }
}

/// A grant that ended during an [`Keyring::apply`], with the certificates that stopped with it.
#[derive(Debug)]
pub struct EndedGrant {
    /// The grant.
    pub grant_id: String,
    /// The instant the grant lapses (or lapsed), if it has one.
    pub not_after: Option<OffsetDateTime>,
    /// Why.
    pub reason: GrantEnd,
    /// Certificates whose keys were dropped.
    pub certificates: Vec<Arc<LoadedCertificate>>,
}

/// What one [`Keyring::apply`] changed. Every refusal is reported, so that the caller can log it.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// New generations: new associations, renewals, changed names.
    pub loaded: Vec<Arc<LoadedCertificate>>,
    /// Generations no longer served because a newer one replaced them or their association was removed
    /// (their grant still holds; connections made with them go on).
    pub replaced: Vec<Arc<LoadedCertificate>>,
    /// Grants that ended, with the certificates they took down.
    pub ended: Vec<EndedGrant>,
    /// Associations whose new state was refused while the last good one goes on being served.
    pub kept: Vec<(Arc<LoadedCertificate>, Refusal)>,
    /// Associations not served: (certificate id, grant id, why).
    pub refused: Vec<(String, String, Refusal)>,
    /// Grant files that exist but do not parse (perhaps half-written).
    pub unreadable_grants: Vec<String>,
    /// After a partial snapshot, the certificate ids it judged: the refusals above are theirs, and every other
    /// association is as the previous apply left it. `None` after a complete snapshot.
    pub partial: Option<Vec<String>>,
}

impl ApplyReport {
    /// Whether the set of served certificates changed (the certificate table must be rebuilt).
    pub fn changed(&self) -> bool {
        !(self.loaded.is_empty() && self.replaced.is_empty() && self.ended.is_empty())
    }

    /// Whether the read met nothing that may be a write in progress: no kept (refused) new state, no unparseable
    /// certificate file, no unparseable grant file. An unsettled read is retried soon.
    pub fn is_settled(&self) -> bool {
        self.kept.is_empty()
            && self.unreadable_grants.is_empty()
            && !self.refused.iter().any(|(_, _, refusal)| refusal.check == Check::Files)
    }
}

struct HeldGrant {
    ended: CancellationToken,
    /// When the grant lapses, with or without a further write: the holder ends it then by timer.
    not_after: Option<OffsetDateTime>,
}

/// The served set an [`Keyring::apply`] builds, and how it came about.
struct Next {
    /// Hashed while it is built (a lookup and an insert per association), sorted once when committed.
    served: foldhash::HashMap<String, Arc<LoadedCertificate>>,
    /// The keyring's inputs, updated in place (most certificates keep their key from one read to the next);
    /// `commit` drops those no longer served.
    inputs: foldhash::HashMap<String, [u8; 32]>,
    /// How many generations served before go on being served.
    carried: usize,
    /// Generations loaded by this apply.
    loaded: Vec<Arc<LoadedCertificate>>,
}

impl Next {
    fn new(inputs: foldhash::HashMap<String, [u8; 32]>) -> Self {
        let served = foldhash::HashMap::with_capacity_and_hasher(inputs.len(), Default::default());
        Self { served, inputs, carried: 0, loaded: Vec::new() }
    }

    /// Goes on serving a generation served before, now known from `inputs`.
    fn carry(&mut self, certificate_id: String, certificate: Arc<LoadedCertificate>, inputs: [u8; 32]) {
        self.carried += 1;
        self.set_inputs(&certificate_id, inputs);
        self.served.insert(certificate_id, certificate);
    }

    /// Serves a generation loaded by this apply.
    fn load(&mut self, certificate_id: String, certificate: Arc<LoadedCertificate>, inputs: [u8; 32]) {
        self.loaded.push(Arc::clone(&certificate));
        self.set_inputs(&certificate_id, inputs);
        self.served.insert(certificate_id, certificate);
    }

    fn set_inputs(&mut self, certificate_id: &str, inputs: [u8; 32]) {
        match self.inputs.get_mut(certificate_id) {
            Some(known) => *known = inputs,
            None => {
                self.inputs.insert(certificate_id.to_owned(), inputs);
            }
        }
    }
}

/// The certificates being served and the grants they were decrypted under.
pub struct Keyring {
    /// The holder's principal: of the grants a read shows, only those naming it go into `seen`.
    grantee: String,
    /// Served certificates by certificate id.
    served: BTreeMap<String, Arc<LoadedCertificate>>,
    /// Grants with at least one served certificate.
    grants: foldhash::HashMap<String, HeldGrant>,
    /// Grants seen retired, lapsed, ended, or gone after being seen: never served again.
    retired: foldhash::HashSet<String>,
    /// Grants issued to us that a read has shown active and that are not retired, whether or not any of their
    /// associations was ever served (one refused because its certificate was mid-write, say). FORMAT.md retires
    /// a grant for its holder as soon as its file is gone, so when the file of one of these goes, it moves to
    /// `retired`: the same file restored later (a backup) must not be served. Held grants are among them. Each
    /// id is in `seen` or `retired`, never both, so remembering them costs one string per grant of ours.
    seen: foldhash::HashSet<String>,
    /// By served certificate id, the inputs digest of the last read that verified the served generation or found
    /// it unchanged. (foldhash for these maps: every read looks up each association in them, and with 10,000
    /// certificates SipHash was a visible part of applying a read.)
    inputs: foldhash::HashMap<String, [u8; 32]>,
    next_generation: u64,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("served", &self.served.keys().collect::<Vec<_>>())
            .field("grants", &self.grants.keys().collect::<Vec<_>>())
            .field("retired", &self.retired)
            .field("seen", &self.seen.len())
            .finish()
    }
}

impl Keyring {
    /// An empty keyring for the holder `grantee` (the principal grants must name to be ours).
    pub fn new(grantee: impl Into<String>) -> Self {
        Self {
            grantee: grantee.into(),
            served: BTreeMap::new(),
            grants: foldhash::HashMap::default(),
            retired: foldhash::HashSet::default(),
            seen: foldhash::HashSet::default(),
            inputs: foldhash::HashMap::default(),
            next_generation: 0,
        }
    }

    /// The certificates currently served, by certificate id.
    pub fn served(&self) -> impl Iterator<Item = &Arc<LoadedCertificate>> {
        self.served.values()
    }

    /// Number of certificates served.
    pub fn len(&self) -> usize {
        self.served.len()
    }

    /// Whether nothing is served.
    pub fn is_empty(&self) -> bool {
        self.served.is_empty()
    }

    /// Whether `grant_id` was retired during the life of this keyring.
    pub fn is_retired(&self, grant_id: &str) -> bool {
        self.retired.contains(grant_id)
    }

    /// Number of grants currently held.
    pub fn grants_held(&self) -> usize {
        self.grants.len()
    }

    /// Number of grants retired so far.
    pub fn grants_retired(&self) -> usize {
        self.retired.len()
    }

    /// The inputs digest the served generation of `certificate_id` was last verified from (or found unchanged
    /// against), or `None` when nothing is served for it: the `known` callback of
    /// [`ExportReader::read`](crate::custody::snapshot::ExportReader::read).
    pub fn inputs_of(&self, certificate_id: &str) -> Option<[u8; 32]> {
        // `inputs` only holds served certificates: `commit` and `end_grant` keep it so.
        self.inputs.get(certificate_id).copied()
    }

    /// Applies a new read of the export: a complete snapshot replaces the served set; a partial one changes the
    /// associations and grants it lists and leaves the others as they are.
    pub fn apply(&mut self, snapshot: Snapshot) -> ApplyReport {
        let mut report = ApplyReport::default();
        self.end_grants(&snapshot, &mut report);
        report.unreadable_grants = snapshot
            .grants
            .iter()
            .filter(|(_, status)| matches!(status, GrantStatus::Unreadable(_)))
            .map(|(id, _)| id.clone())
            .collect();
        let mut next = Next::new(std::mem::take(&mut self.inputs));
        let mut judged = Vec::new();
        let partial = matches!(snapshot.scope, Scope::Partial { .. });
        for outcome in snapshot.associations {
            if partial {
                judged.push(outcome.certificate_id.clone());
            }
            self.take(outcome, &snapshot.grants, &mut next, &mut report);
        }
        if let Scope::Partial { removed, .. } = snapshot.scope {
            // A removed association is judged to have nothing to serve.
            judged.extend(removed);
            self.commit_partial(next, &judged, &mut report);
            report.partial = Some(judged);
        } else {
            self.commit(next, &mut report);
        }
        for (id, status) in &snapshot.grants {
            if let (GrantStatus::Active { not_after, .. }, Some(grant)) = (status, self.grants.get_mut(id)) {
                grant.not_after = *not_after;
            }
        }
        report
    }

    /// Decides what one association's outcome means for the next served set.
    fn take(
        &mut self,
        outcome: AssociationOutcome,
        grants: &BTreeMap<String, GrantStatus>,
        next: &mut Next,
        report: &mut ApplyReport,
    ) {
        if self.retired.contains(&outcome.grant_id) {
            report.refused.push((outcome.certificate_id, outcome.grant_id, retired_earlier()));
            return;
        }
        if next.served.contains_key(&outcome.certificate_id) {
            // A duplicate entry: the snapshot refuses it too, but it must never replace the first.
            return;
        }
        let held = self.served.get(&outcome.certificate_id).filter(|c| c.grant_id == outcome.grant_id).cloned();
        match outcome.result {
            Verdict::Served(verified) => match held {
                Some(old) if old.is_same(&verified) => next.carry(outcome.certificate_id, old, outcome.inputs),
                _ => {
                    let certificate = self.load(verified, outcome.inputs);
                    next.load(outcome.certificate_id, certificate, outcome.inputs);
                }
            },
            Verdict::Unchanged => match held {
                Some(old) => next.carry(outcome.certificate_id, old, outcome.inputs),
                None => report.refused.push((outcome.certificate_id, outcome.grant_id, nothing_held())),
            },
            Verdict::Refused(refusal) => {
                // Grants that ended were handled above, so the grant still holds: a refusal of the new state keeps
                // the last good one, unless the grant itself refuses us.
                let grant_unreadable = matches!(grants.get(&outcome.grant_id), Some(GrantStatus::Unreadable(_)));
                match held {
                    Some(old) if refusal.check != Check::Grant || grant_unreadable => {
                        report.kept.push((Arc::clone(&old), refusal));
                        // The last good generation keeps the inputs it was verified from: the refused ones are
                        // verified again next time.
                        let inputs = next.inputs.get(&outcome.certificate_id).copied().unwrap_or(old.inputs);
                        next.carry(outcome.certificate_id, old, inputs);
                    }
                    _ => report.refused.push((outcome.certificate_id, outcome.grant_id, refusal)),
                }
            }
        }
    }

    /// Makes `next` the served set, reporting the generations loaded and replaced.
    fn commit(&mut self, next: Next, report: &mut ApplyReport) {
        let previous = std::mem::replace(&mut self.served, next.served.into_iter().collect());
        self.inputs = next.inputs;
        if self.inputs.len() != self.served.len() {
            let served = &self.served;
            self.inputs.retain(|id, _| served.contains_key(id));
        }
        report.loaded = next.loaded;
        report.loaded.sort_by(|a, b| a.certificate_id.cmp(&b.certificate_id));
        // Every generation carried over is served under its own id: when all of them were, none was replaced.
        if next.carried != previous.len() {
            // Both maps are ordered by certificate id: one walk down each, in step.
            let mut current = self.served.iter().peekable();
            report.replaced = previous
                .into_iter()
                .filter_map(|(id, old)| {
                    while current.next_if(|(served_id, _)| served_id.as_str() < id.as_str()).is_some() {}
                    let kept =
                        current.peek().is_some_and(|(served_id, new)| **served_id == id && Arc::ptr_eq(new, &old));
                    (!kept).then_some(old)
                })
                .collect();
        }
        if !report.loaded.is_empty() || !report.replaced.is_empty() {
            let held_grants: foldhash::HashSet<&str> = self.served.values().map(|c| c.grant_id.as_str()).collect();
            self.grants.retain(|id, _| held_grants.contains(id.as_str()));
        }
    }

    /// Changes the served set where a partial snapshot judged (`judged`: its certificate ids), reporting the
    /// generations loaded and replaced.
    fn commit_partial(&mut self, next: Next, judged: &[String], report: &mut ApplyReport) {
        let Next { mut served, inputs, loaded, .. } = next;
        self.inputs = inputs;
        report.loaded = loaded;
        report.loaded.sort_by(|a, b| a.certificate_id.cmp(&b.certificate_id));
        for certificate_id in judged {
            let new = served.remove(certificate_id);
            let old = match &new {
                Some(new) => self.served.insert(certificate_id.clone(), Arc::clone(new)),
                None => {
                    self.inputs.remove(certificate_id);
                    self.served.remove(certificate_id)
                }
            };
            if let Some(old) = old.filter(|old| !new.as_ref().is_some_and(|new| Arc::ptr_eq(new, old))) {
                report.replaced.push(old);
            }
        }
        report.replaced.sort_by(|a, b| a.certificate_id.cmp(&b.certificate_id));
        // A grant is held while it serves a certificate: only those of replaced generations may have stopped.
        for replaced in &report.replaced {
            let grant_id = replaced.grant_id.as_str();
            if self.grants.contains_key(grant_id) && !self.served.values().any(|c| c.grant_id == grant_id) {
                self.grants.remove(grant_id);
            }
        }
    }

    /// The earliest instant at which a held grant lapses, if any does.
    pub fn next_lapse(&self) -> Option<OffsetDateTime> {
        self.grants.values().filter_map(|g| g.not_after).min()
    }

    /// Ends every held grant whose `not_after` is at or before `now`: a grant lapses at that instant, whether or
    /// not any file changes.
    pub fn end_lapsed(&mut self, now: OffsetDateTime) -> Vec<EndedGrant> {
        let lapsed: Vec<String> = self
            .grants
            .iter()
            .filter(|(_, g)| g.not_after.is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        lapsed.into_iter().map(|id| self.end_grant(&id, GrantEnd::Lapsed)).collect()
    }

    /// Ends every held grant the snapshot says is over, remembers every grant seen retired or lapsed, and retires
    /// every grant of ours seen before whose file is gone.
    fn end_grants(&mut self, snapshot: &Snapshot, report: &mut ApplyReport) {
        for (id, status) in &snapshot.grants {
            match status {
                GrantStatus::Retired | GrantStatus::Lapsed => self.retire(id),
                GrantStatus::Active { grantee, .. } if *grantee == self.grantee => self.see(id),
                // Another holder's grant is none of ours; an unreadable file is present, its state unknown.
                GrantStatus::Active { .. } | GrantStatus::Unreadable(_) => {}
            }
        }
        let now = snapshot.read_at;
        let refused_by_grant = refused_by_their_grant(snapshot);
        let end_reason = |id: &str, status: Option<&GrantStatus>| match status {
            None => Some(GrantEnd::Gone),
            Some(GrantStatus::Retired) => Some(GrantEnd::Retired),
            Some(GrantStatus::Lapsed) => Some(GrantEnd::Lapsed),
            Some(GrantStatus::Active { not_after: Some(t), .. }) if *t <= now => Some(GrantEnd::Lapsed),
            Some(GrantStatus::Active { .. }) => refused_by_grant.contains(id).then_some(GrantEnd::Revoked),
            Some(GrantStatus::Unreadable(_)) => None,
        };
        let (ending, gone): (Vec<(String, GrantEnd)>, Vec<String>) = match &snapshot.scope {
            Scope::Complete => {
                // One lookup per grant of ours: hashed, not a walk down the snapshot's ordered map (cache misses
                // at every level, most of the cost of applying a read of 10,000 grants).
                let statuses: foldhash::HashMap<&str, &GrantStatus> =
                    snapshot.grants.iter().map(|(id, status)| (id.as_str(), status)).collect();
                let ending = self
                    .grants
                    .keys()
                    .filter_map(|id| Some((id.clone(), end_reason(id, statuses.get(id.as_str()).copied())?)))
                    .collect();
                // What the snapshot does not list is not in the export. (A complete read walks every grant file
                // anyway: this walk of ours costs no more.)
                let gone = self.seen.iter().filter(|id| !statuses.contains_key(id.as_str())).cloned().collect();
                (ending, gone)
            }
            // Only the grants listed may have changed. (A grant seen was found by the previous read, so one that
            // is gone is listed as gone; and every association judged has its grant's status listed.)
            Scope::Partial { gone_grants, .. } => {
                let listed = snapshot.grants.iter().map(|(id, status)| (id, Some(status)));
                let ending = listed
                    .chain(gone_grants.iter().map(|id| (id, None)))
                    .filter(|(id, _)| self.grants.contains_key(id.as_str()))
                    .filter_map(|(id, status)| Some((id.clone(), end_reason(id, status)?)))
                    .collect();
                let gone = gone_grants.iter().filter(|id| self.seen.contains(id.as_str())).cloned().collect();
                (ending, gone)
            }
        };
        for (id, reason) in ending {
            report.ended.push(self.end_grant(&id, reason));
        }
        // Held grants among them ended above, with their certificates; the others served nothing to end.
        for id in gone {
            self.retire(&id);
        }
    }

    /// Remembers a grant of ours that a read showed, unless it is retired already.
    fn see(&mut self, grant_id: &str) {
        if !self.seen.contains(grant_id) && !self.retired.contains(grant_id) {
            self.seen.insert(grant_id.to_owned());
        }
    }

    /// Never serves `grant_id` again. Looked up before inserting: most reads find the same retired grants again.
    fn retire(&mut self, grant_id: &str) {
        if !self.retired.contains(grant_id) {
            self.retired.insert(grant_id.to_owned());
        }
        self.seen.remove(grant_id);
    }

    /// Ends a held grant now: drops its keys, fires its token, forgets its certificates, never serves it again.
    /// Also used when `not_after` passes with no file event at all.
    pub fn end_grant(&mut self, grant_id: &str, reason: GrantEnd) -> EndedGrant {
        self.retire(grant_id);
        let certificates: Vec<_> = self.served.values().filter(|c| c.grant_id == grant_id).cloned().collect();
        self.served.retain(|_, c| c.grant_id != grant_id);
        for certificate in &certificates {
            certificate.drop_key();
            self.inputs.remove(&certificate.certificate_id);
        }
        let mut not_after = None;
        if let Some(grant) = self.grants.remove(grant_id) {
            grant.ended.cancel();
            not_after = grant.not_after;
        }
        EndedGrant { grant_id: grant_id.to_owned(), not_after, reason, certificates }
    }

    fn load(&mut self, verified: VerifiedCertificate, inputs: [u8; 32]) -> Arc<LoadedCertificate> {
        self.next_generation += 1;
        let grant = self
            .grants
            .entry(verified.grant_id.clone())
            .or_insert_with(|| HeldGrant { ended: CancellationToken::new(), not_after: verified.grant_not_after });
        // `verified.private_key` (the DER) is dropped, and wiped, when `verified` goes out of scope below.
        let key = CertifiedKey::new(verified.chain, verified.signing_key);
        let identity = CertificateIdentity {
            certificate_id: verified.certificate_id,
            grant_id: verified.grant_id,
            generation: self.next_generation,
            server_names: verified.server_names,
            not_before: verified.not_before,
            not_after: verified.not_after,
            leaf_sha256: verified.leaf_sha256,
            inputs,
        };
        Arc::new(LoadedCertificate {
            identity: Arc::new(identity),
            key: ArcSwapOption::from_pointee(key),
            grant_ended: grant.ended.clone(),
        })
    }
}

impl LoadedCertificate {
    fn is_same(&self, verified: &VerifiedCertificate) -> bool {
        self.leaf_sha256 == verified.leaf_sha256
            && self.server_names == verified.server_names
            && self.grant_id == verified.grant_id
            && self.key.load().as_ref().is_some_and(|k| k.key.public_key() == verified.signing_key.public_key())
    }
}

/// The grants that refused one of their associations at check 1. A held grant among them whose file is readable
/// and active (another grantee, no `Decrypt`, no key) has ended for us as surely as a retired one.
fn refused_by_their_grant(snapshot: &Snapshot) -> HashSet<&str> {
    snapshot
        .associations
        .iter()
        .filter(|a| a.refusal().is_some_and(|r| r.check == Check::Grant))
        .map(|a| a.grant_id.as_str())
        .collect()
}

/// The reader said an association is unchanged from the generation served for it, but none is: the reader and
/// the keyring disagree. Refused (never served on the reader's word alone); the next read, asked with no digest
/// for it, verifies it in full.
fn nothing_held() -> Refusal {
    Refusal {
        check: Check::Files,
        reason: "the association was reported unchanged, but no generation is held for it",
        detail: "internal inconsistency between the export reader and the keyring; the next read verifies it in full"
            .to_owned(),
    }
}

fn retired_earlier() -> Refusal {
    Refusal {
        check: Check::Grant,
        reason: "the grant was retired earlier",
        detail: "a retired grant never comes back; re-association needs a new grant id".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_util::{active, served, served_from, snapshot, unchanged, verified};

    fn refused(certificate_id: &str, grant_id: &str, check: Check) -> AssociationOutcome {
        AssociationOutcome {
            certificate_id: certificate_id.to_owned(),
            grant_id: grant_id.to_owned(),
            server_names: Vec::new(),
            certificate_not_after: None,
            inputs: [0; 32],
            result: Verdict::Refused(Refusal { check, reason: "test", detail: String::new() }),
        }
    }

    #[test]
    fn an_unchanged_read_keeps_the_generation() {
        let mut keyring = Keyring::new("me");
        let v = verified("c-1", "g-1", &["a.test"]);
        let again = same_again(&v);
        let report = keyring.apply(snapshot(&[("g-1", active())], vec![served(v)]));
        assert_eq!(report.loaded.len(), 1);
        let generation = report.loaded[0].generation;
        let report = keyring.apply(snapshot(&[("g-1", active())], vec![served(again)]));
        assert!(!report.changed(), "{report:?}");
        assert_eq!(keyring.served().next().unwrap().generation, generation);
    }

    #[test]
    fn a_renewal_makes_a_new_generation_and_keeps_the_grant() {
        let mut keyring = Keyring::new("me");
        keyring.apply(snapshot(&[("g-1", active())], vec![served(verified("c-1", "g-1", &["a.test"]))]));
        let old = Arc::clone(keyring.served().next().unwrap());
        let report = keyring.apply(snapshot(&[("g-1", active())], vec![served(verified("c-1", "g-1", &["a.test"]))]));
        assert_eq!(report.loaded.len(), 1);
        assert_eq!(report.replaced.len(), 1);
        assert!(report.loaded[0].generation > old.generation);
        assert!(!old.is_retired(), "a renewal does not end the grant");
        assert!(old.certified_key().is_some(), "connections and handshakes on the old generation go on");
    }

    #[test]
    fn a_refused_new_state_keeps_the_last_good_one() {
        let mut keyring = Keyring::new("me");
        keyring.apply(snapshot(&[("g-1", active())], vec![served(verified("c-1", "g-1", &["a.test"]))]));
        for check in [Check::Files, Check::KeyId, Check::Seal, Check::KeyMatch, Check::ServerNames] {
            let report = keyring.apply(snapshot(&[("g-1", active())], vec![refused("c-1", "g-1", check)]));
            assert_eq!(report.kept.len(), 1, "{check:?}");
            assert!(!report.changed());
            assert_eq!(keyring.len(), 1);
        }
        // An unreadable grant file (half-written) keeps it too.
        let unreadable = GrantStatus::Unreadable("line 1".to_owned());
        let report = keyring.apply(snapshot(&[("g-1", unreadable)], vec![refused("c-1", "g-1", Check::Grant)]));
        assert_eq!(report.kept.len(), 1);
        assert_eq!(keyring.len(), 1);
    }

    #[test]
    fn a_new_association_refused_is_not_served() {
        let mut keyring = Keyring::new("me");
        let report = keyring.apply(snapshot(&[("g-1", active())], vec![refused("c-1", "g-1", Check::Seal)]));
        assert_eq!(report.refused.len(), 1);
        assert!(keyring.is_empty());
    }

    #[test]
    fn the_grant_ends_service_however_it_ends() {
        for (status, reason) in [
            (None, GrantEnd::Gone),
            (Some(GrantStatus::Retired), GrantEnd::Retired),
            (Some(GrantStatus::Lapsed), GrantEnd::Lapsed),
            (
                Some(GrantStatus::Active {
                    grantee: "me".to_owned(),
                    not_after: Some(OffsetDateTime::now_utc() - time::Duration::seconds(1)),
                }),
                GrantEnd::Lapsed,
            ),
        ] {
            let mut keyring = Keyring::new("me");
            keyring.apply(snapshot(&[("g-1", active())], vec![served(verified("c-1", "g-1", &["a.test"]))]));
            let certificate = Arc::clone(keyring.served().next().unwrap());
            let token = certificate.grant_ended().clone();
            let grants: Vec<(&str, GrantStatus)> = status.clone().map(|s| ("g-1", s)).into_iter().collect();
            let report = keyring.apply(snapshot(&grants, vec![served(verified("c-1", "g-1", &["a.test"]))]));
            assert_eq!(report.ended.len(), 1, "{status:?}");
            assert_eq!(report.ended[0].reason, reason);
            assert!(token.is_cancelled());
            assert!(certificate.certified_key().is_none(), "the key is dropped at once");
            assert!(keyring.is_empty(), "{status:?}: a fresh verified state must not bring it back");
            assert!(keyring.is_retired("g-1"));
        }
    }

    #[test]
    fn a_grant_that_stops_naming_us_ends_service() {
        let mut keyring = Keyring::new("me");
        keyring.apply(snapshot(&[("g-1", active())], vec![served(verified("c-1", "g-1", &["a.test"]))]));
        let report = keyring.apply(snapshot(&[("g-1", active())], vec![refused("c-1", "g-1", Check::Grant)]));
        assert_eq!(report.ended.len(), 1);
        assert_eq!(report.ended[0].reason, GrantEnd::Revoked);
        assert!(keyring.is_empty());
    }

    #[test]
    fn a_retired_grant_never_comes_back() {
        let mut keyring = Keyring::new("me");
        keyring.apply(snapshot(&[("g-1", GrantStatus::Retired)], vec![refused("c-1", "g-1", Check::Grant)]));
        let report = keyring.apply(snapshot(&[("g-1", active())], vec![served(verified("c-1", "g-1", &["a.test"]))]));
        assert!(keyring.is_empty());
        assert_eq!(report.refused[0].2.reason, "the grant was retired earlier");
        // A new grant id serves again.
        keyring.apply(snapshot(&[("g-2", active())], vec![served(verified("c-1", "g-2", &["a.test"]))]));
        assert_eq!(keyring.len(), 1);
    }

    #[test]
    fn ending_one_grant_leaves_the_others() {
        let mut keyring = Keyring::new("me");
        let both = |a, b| vec![served(a), served(b)];
        keyring.apply(snapshot(
            &[("g-1", active()), ("g-2", active())],
            both(verified("c-1", "g-1", &["a.test"]), verified("c-2", "g-2", &["b.test"])),
        ));
        let report = keyring.apply(snapshot(
            &[("g-1", GrantStatus::Retired), ("g-2", active())],
            vec![refused("c-1", "g-1", Check::Grant), served(verified("c-2", "g-2", &["b.test"]))],
        ));
        assert_eq!(report.ended.len(), 1);
        assert_eq!(keyring.served().map(|c| c.certificate_id.as_str()).collect::<Vec<_>>(), ["c-2"]);
    }

    /// A second verified state of `v`: the same certificate and key, as a read from other inputs would give.
    fn partial(
        grants: &[(&str, GrantStatus)],
        gone_grants: &[&str],
        associations: Vec<AssociationOutcome>,
    ) -> Snapshot {
        let mut snapshot = snapshot(grants, associations);
        let gone_grants = gone_grants.iter().map(|g| g.to_string()).collect();
        snapshot.scope = Scope::Partial { gone_grants, removed: Vec::new() };
        snapshot
    }

    fn served_ids(keyring: &Keyring) -> Vec<&str> {
        keyring.served().map(|c| c.certificate_id.as_str()).collect()
    }

    #[test]
    fn a_partial_snapshot_changes_only_what_it_lists() {
        let mut keyring = Keyring::new("me");
        let three = vec![
            served(verified("c-1", "g-1", &["a.test"])),
            served(verified("c-2", "g-1", &["b.test"])),
            served(verified("c-3", "g-2", &["c.test"])),
        ];
        keyring.apply(snapshot(&[("g-1", active()), ("g-2", active())], three));
        let untouched = Arc::clone(keyring.served().nth(1).unwrap());

        // c-1 renewed; nothing said of c-2, c-3 or g-2: they stay as they are.
        let report =
            keyring.apply(partial(&[("g-1", active())], &[], vec![served(verified("c-1", "g-1", &["a.test"]))]));
        assert_eq!((report.loaded.len(), report.replaced.len(), report.ended.len()), (1, 1, 0), "{report:?}");
        assert_eq!(report.partial.as_deref(), Some(&["c-1".to_owned()][..]));
        assert_eq!(served_ids(&keyring), ["c-1", "c-2", "c-3"]);
        assert!(Arc::ptr_eq(keyring.served().nth(1).unwrap(), &untouched));
        assert!(keyring.inputs_of("c-2").is_some() && keyring.inputs_of("c-3").is_some());

        // c-2's new state refused: its last good one is kept, its inputs too.
        let inputs = keyring.inputs_of("c-2");
        let report = keyring.apply(partial(&[("g-1", active())], &[], vec![refused("c-2", "g-1", Check::Seal)]));
        assert_eq!(report.kept.len(), 1);
        assert_eq!(keyring.inputs_of("c-2"), inputs);
        assert_eq!(served_ids(&keyring), ["c-1", "c-2", "c-3"]);

        // g-2's file is gone: its certificate ends, and nothing else does.
        let report = keyring.apply(partial(&[], &["g-2"], vec![refused("c-3", "g-2", Check::Grant)]));
        assert_eq!(report.ended.len(), 1, "{report:?}");
        assert_eq!((report.ended[0].grant_id.as_str(), report.ended[0].reason), ("g-2", GrantEnd::Gone));
        assert_eq!(served_ids(&keyring), ["c-1", "c-2"]);
        assert!(keyring.is_retired("g-2") && keyring.inputs_of("c-3").is_none());
        assert_eq!(keyring.grants_held(), 1);

        // g-1 retired: both of its certificates end.
        let outcomes = vec![refused("c-1", "g-1", Check::Grant), refused("c-2", "g-1", Check::Grant)];
        let report = keyring.apply(partial(&[("g-1", GrantStatus::Retired)], &[], outcomes));
        assert_eq!(report.ended[0].certificates.len(), 2);
        assert!(keyring.is_empty() && keyring.grants_held() == 0);
    }

    #[test]
    fn a_partial_snapshot_that_refuses_an_association_stops_serving_it_when_its_grant_refuses() {
        let mut keyring = Keyring::new("me");
        let two = vec![served(verified("c-1", "g-1", &["a.test"])), served(verified("c-2", "g-2", &["b.test"]))];
        keyring.apply(snapshot(&[("g-1", active()), ("g-2", active())], two));
        let other = GrantStatus::Active { grantee: "someone-else".to_owned(), not_after: None };
        let report = keyring.apply(partial(&[("g-2", other)], &[], vec![refused("c-2", "g-2", Check::Grant)]));
        assert_eq!(report.ended.len(), 1);
        assert_eq!(report.ended[0].reason, GrantEnd::Revoked);
        assert_eq!(served_ids(&keyring), ["c-1"]);
    }

    /// g-1 is ours and shown active, but its association refused (check 4: a certificate mid-write), so it is
    /// never held; then `gone` (a snapshot without g-1's file) is applied, then the file comes back as it was.
    fn restored_after(gone: Snapshot) -> (Keyring, ApplyReport) {
        let mut keyring = Keyring::new("me");
        let report = keyring.apply(snapshot(&[("g-1", active())], vec![refused("c-1", "g-1", Check::KeyMatch)]));
        assert_eq!((report.refused.len(), keyring.grants_held()), (1, 0), "{report:?}");
        keyring.apply(gone);
        let report = keyring.apply(snapshot(&[("g-1", active())], vec![served(verified("c-1", "g-1", &["a.test"]))]));
        (keyring, report)
    }

    #[test]
    fn a_grant_of_ours_gone_before_it_was_ever_served_never_comes_back() {
        let complete = snapshot(&[], vec![refused("c-1", "g-1", Check::Grant)]);
        let partial = partial(&[], &["g-1"], vec![refused("c-1", "g-1", Check::Grant)]);
        for (scope, gone) in [("complete", complete), ("partial", partial)] {
            let (mut keyring, report) = restored_after(gone);
            assert!(keyring.is_empty(), "{scope}: the restored grant file is served: {report:?}");
            assert!(keyring.is_retired("g-1"), "{scope}");
            assert_eq!(report.refused[0].2.reason, "the grant was retired earlier", "{scope}");
            assert_eq!(keyring.grants_retired(), 1, "{scope}");
            // A new grant id serves the same certificate.
            keyring.apply(snapshot(&[("g-2", active())], vec![served(verified("c-1", "g-2", &["a.test"]))]));
            assert_eq!(served_ids(&keyring), ["c-1"], "{scope}");
        }
    }

    #[test]
    fn only_a_grant_of_ours_whose_file_is_gone_is_retired_unserved() {
        // Present but unreadable (perhaps half-written) is not gone.
        let unreadable = GrantStatus::Unreadable("line 1".to_owned());
        let (keyring, report) =
            restored_after(snapshot(&[("g-1", unreadable)], vec![refused("c-1", "g-1", Check::Grant)]));
        assert_eq!(served_ids(&keyring), ["c-1"], "{report:?}");
        assert!(!keyring.is_retired("g-1"));

        // Nor is a grant a partial read does not mention (it may not have changed).
        let (keyring, report) = restored_after(partial(&[], &[], Vec::new()));
        assert_eq!(served_ids(&keyring), ["c-1"], "{report:?}");

        // Another holder's grant is none of ours: seen for them, gone, and issued to us later under the same id,
        // it was never retired for us.
        for gone in [snapshot(&[], Vec::new()), partial(&[], &["g-1"], Vec::new())] {
            let mut keyring = Keyring::new("me");
            let theirs = GrantStatus::Active { grantee: "someone-else".to_owned(), not_after: None };
            keyring.apply(snapshot(&[("g-1", theirs)], vec![refused("c-1", "g-1", Check::Grant)]));
            keyring.apply(gone);
            keyring.apply(snapshot(&[("g-1", active())], vec![served(verified("c-1", "g-1", &["a.test"]))]));
            assert_eq!(served_ids(&keyring), ["c-1"]);
            assert_eq!(keyring.grants_retired(), 0);
        }
    }

    fn same_again(v: &VerifiedCertificate) -> VerifiedCertificate {
        VerifiedCertificate {
            certificate_id: v.certificate_id.clone(),
            grant_id: v.grant_id.clone(),
            grant_not_after: None,
            server_names: v.server_names.clone(),
            chain: v.chain.clone(),
            leaf_sha256: v.leaf_sha256,
            not_before: v.not_before,
            not_after: v.not_after,
            signing_key: Arc::clone(&v.signing_key),
            private_key: v.private_key.clone(),
        }
    }

    #[test]
    fn an_unchanged_association_keeps_its_generation_and_inputs() {
        let mut keyring = Keyring::new("me");
        assert_eq!(keyring.inputs_of("c-1"), None);
        keyring.apply(snapshot(&[("g-1", active())], vec![served_from(verified("c-1", "g-1", &["a.test"]), [1; 32])]));
        let held = Arc::clone(keyring.served().next().unwrap());
        assert_eq!(held.inputs, [1; 32]);
        assert_eq!(keyring.inputs_of("c-1"), Some([1; 32]));

        let report = keyring.apply(snapshot(&[("g-1", active())], vec![unchanged("c-1", "g-1", [1; 32])]));
        assert!(!report.changed() && report.refused.is_empty() && report.kept.is_empty(), "{report:?}");
        assert!(Arc::ptr_eq(keyring.served().next().unwrap(), &held));
        assert_eq!(keyring.inputs_of("c-1"), Some([1; 32]));
    }

    #[test]
    fn unchanged_without_a_held_generation_is_refused_not_served() {
        let mut keyring = Keyring::new("me");
        let report = keyring.apply(snapshot(&[("g-1", active())], vec![unchanged("c-1", "g-1", [1; 32])]));
        assert!(keyring.is_empty());
        assert_eq!(report.refused.len(), 1);
        assert!(report.refused[0].2.reason.contains("no generation is held"), "{:?}", report.refused[0]);

        // Held under another grant: not the same association.
        keyring.apply(snapshot(&[("g-1", active())], vec![served(verified("c-1", "g-1", &["a.test"]))]));
        let report =
            keyring.apply(snapshot(&[("g-1", active()), ("g-2", active())], vec![unchanged("c-1", "g-2", [1; 32])]));
        assert_eq!(report.refused.len(), 1);
        assert_eq!(report.replaced.len(), 1);
        assert!(keyring.is_empty());
        assert_eq!(keyring.inputs_of("c-1"), None);
    }

    #[test]
    fn the_same_certificate_verified_from_other_inputs_keeps_the_generation_with_the_new_inputs() {
        let mut keyring = Keyring::new("me");
        let v = verified("c-1", "g-1", &["a.test"]);
        let again = same_again(&v);
        keyring.apply(snapshot(&[("g-1", active())], vec![served_from(v, [1; 32])]));
        let generation = keyring.served().next().unwrap().generation;
        let report = keyring.apply(snapshot(&[("g-1", active())], vec![served_from(again, [2; 32])]));
        assert!(!report.changed());
        let held = keyring.served().next().unwrap();
        assert_eq!((held.generation, held.inputs), (generation, [1; 32]));
        assert_eq!(keyring.inputs_of("c-1"), Some([2; 32]), "the next read must find it unchanged");
    }

    #[test]
    fn a_refused_new_state_keeps_the_inputs_of_the_last_good_one() {
        let mut keyring = Keyring::new("me");
        keyring.apply(snapshot(&[("g-1", active())], vec![served_from(verified("c-1", "g-1", &["a.test"]), [1; 32])]));
        let mut refusal = refused("c-1", "g-1", Check::Seal);
        refusal.inputs = [2; 32];
        let report = keyring.apply(snapshot(&[("g-1", active())], vec![refusal]));
        assert_eq!(report.kept.len(), 1);
        assert_eq!(keyring.inputs_of("c-1"), Some([1; 32]), "the refused inputs are verified again next time");

        // Once the grant ends, nothing is known any more.
        keyring.end_grant("g-1", GrantEnd::Retired);
        assert_eq!(keyring.inputs_of("c-1"), None);
    }
}
