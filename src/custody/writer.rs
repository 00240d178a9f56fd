//! The custody side of the export: a small custody system, used by the `sealgate custody` tool, by tests and by
//! demos, that writes exports following FORMAT.md.
//!
//! It models AWS ACM + KMS. A [`Custody`] lives in a **state directory** that holds its own secrets: the master
//! key (the "KMS key", which never leaves the state), and sealed under it every certificate's data key, every
//! grant's key and the local CA's private key. An **export** is what a holder reads; it receives only what
//! FORMAT.md puts there: certificates, private keys sealed under their data keys, grant files (with the grant
//! key while active) and data keys wrapped under grant keys.
//!
//! - [`Custody::issue`] creates a key pair and a certificate signed by the local CA; [`Custody::import`] takes an
//!   existing chain and key. Either way the private key is sealed once, under a fresh data key.
//! - [`Custody::associate`] creates a grant for a grantee and writes the certificate, its sealed key, the grant
//!   and the association (the data key wrapped under the grant key) into an export.
//! - [`Custody::disassociate`] retires that grant and removes the association and the certificate's files;
//!   [`Custody::retire_grant`] only retires the grant, leaving the association for holders to refuse.
//! - [`Custody::renew`] replaces a certificate's key pair and data key and rewrites every export it is
//!   associated with, one atomic file write at a time.
//!
//! Every file is replaced atomically (a dot-named temporary file, flushed, renamed). One process at a time
//! should change a state directory: operations are not locked against each other.
//!
//! Tests of holders can corrupt, replace or remove any file of an export: [`ExportLayout`], [`export_paths`] and
//! [`grant_id_of`] give their paths.

mod ca;
mod chain;
mod error;
mod export;
pub(crate) mod fsio;
mod keys;
mod pem;
mod state;

use std::path::{Path, PathBuf};

use time::{Duration, OffsetDateTime};

pub use self::ca::CA_COMMON_NAME;
pub use self::error::{cause_chain, CustodyError, ExportFailure, Result};
pub use self::export::{export_paths, grant_id_of, CertificatePaths, ExportLayout};
pub use self::keys::KeyType;
pub use self::state::{Origin, StateLock};

use self::ca::LocalCa;
use self::chain::Chain;
use self::keys::ImportedKey;
use self::state::{KeyRole, MasterKey, StateDir, StoredCertificate, StoredGrant};
use super::format::{self, encode_base64, is_valid_id, AssociationEntry, Associations, GrantState, DECRYPT_OPERATION};
use super::seal;
use crate::names;
use crate::secret::{SecretBytes, SecretKey32};

/// How long before "now" a certificate's validity begins by default, to absorb clock skew between hosts.
pub const DEFAULT_BACKDATE: Duration = Duration::hours(1);
/// How long a certificate is valid by default, as ACM's public certificates were.
pub const DEFAULT_LIFETIME: Duration = Duration::days(90);

/// The id the local CA's sealed key is bound to.
const CA_SEAL_ID: &str = "local-ca";

/// What [`Custody::issue`] should create.
#[derive(Debug, Clone, Default)]
pub struct IssueRequest {
    /// The certificate id; a random `c-<12 hex>` when `None`.
    pub certificate_id: Option<String>,
    /// DNS names (wildcards allowed), at least one. The first is also the subject's common name.
    pub names: Vec<String>,
    /// The key pair to generate.
    pub key_type: KeyType,
    /// Start of validity; default now minus [`DEFAULT_BACKDATE`].
    pub not_before: Option<OffsetDateTime>,
    /// End of validity; default now plus [`DEFAULT_LIFETIME`].
    pub not_after: Option<OffsetDateTime>,
}

impl IssueRequest {
    /// A request for an ECDSA P-256 certificate for `names`, with a random id and the default validity.
    pub fn new<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        Self { names: names.into_iter().map(Into::into).collect(), ..Self::default() }
    }
}

/// What [`Custody::associate`] should write.
#[derive(Debug, Clone)]
pub struct AssociateRequest {
    /// The certificate to associate.
    pub certificate_id: String,
    /// The export directory; created when missing.
    pub export: PathBuf,
    /// The principal the grant is issued to (the holder's `grantee`).
    pub grantee: String,
    /// Names to serve, each covered by the certificate; `None` lets holders use the leaf's DNS names.
    pub server_names: Option<Vec<String>>,
    /// When the grant lapses, if ever. An instant in the past is accepted (a lapsed grant, for tests).
    pub grant_not_after: Option<OffsetDateTime>,
    /// Write `server_names` the certificate does not cover, which holders refuse (check 5). For tests of
    /// holders only.
    pub allow_uncovered_server_names: bool,
}

impl AssociateRequest {
    /// Associates `certificate_id` with `grantee` in `export`, for the leaf's names, with a grant that never
    /// lapses.
    pub fn new(certificate_id: impl Into<String>, export: impl Into<PathBuf>, grantee: impl Into<String>) -> Self {
        Self {
            certificate_id: certificate_id.into(),
            export: export.into(),
            grantee: grantee.into(),
            server_names: None,
            grant_not_after: None,
            allow_uncovered_server_names: false,
        }
    }
}

/// How [`Custody::renew`] gets the certificate's next key pair.
#[derive(Debug, Clone)]
pub enum RenewRequest {
    /// Issued certificates: a new key pair and a new certificate from the local CA, for the same names.
    Reissue {
        /// The new key pair's type; the current one when `None`.
        key_type: Option<KeyType>,
        /// Start of validity; default now minus [`DEFAULT_BACKDATE`].
        not_before: Option<OffsetDateTime>,
        /// End of validity; default now plus [`DEFAULT_LIFETIME`].
        not_after: Option<OffsetDateTime>,
    },
    /// Any certificate: a new chain and key pair, brought in like [`Custody::import`]'s.
    Replace {
        /// PEM chain, leaf first.
        chain_pem: Vec<u8>,
        /// PEM private key (PKCS#8, SEC1 or PKCS#1), in a wiped buffer.
        key_pem: SecretBytes,
    },
}

impl RenewRequest {
    /// Reissue with the same key type and the default validity.
    pub fn reissue() -> Self {
        Self::Reissue { key_type: None, not_before: None, not_after: None }
    }
}

/// A certificate held in custody. No secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRecord {
    /// The certificate id.
    pub certificate_id: String,
    /// Issued by the local CA, or imported.
    pub origin: Origin,
    /// The key pair's type: `ecdsa-p256`, `ecdsa-p384`, `rsa-2048`, `ed25519` (or e.g. `rsa-4096` if imported).
    pub key_type: String,
    /// The leaf's DNS names.
    pub names: Vec<String>,
    /// The leaf's validity.
    pub not_before: OffsetDateTime,
    /// The leaf's validity.
    pub not_after: OffsetDateTime,
    /// 1 when issued or imported, incremented by each renewal.
    pub generation: u64,
    /// The chain, leaf first, exactly as written into exports.
    pub certificate_pem: String,
}

/// A grant, and so an association: each association has its own grant. No secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRecord {
    /// The grant id.
    pub grant_id: String,
    /// The associated certificate.
    pub certificate_id: String,
    /// The principal the grant was issued to.
    pub grantee: String,
    /// The export the grant was written to (absolute).
    pub export: PathBuf,
    /// Active or retired.
    pub state: GrantState,
    /// Whether the association is still listed in the export's `associations.toml`.
    pub associated: bool,
    /// When the grant was created.
    pub created: OffsetDateTime,
    /// When the grant lapses, if ever.
    pub not_after: Option<OffsetDateTime>,
    /// The association's `server_names`, if given.
    pub server_names: Option<Vec<String>>,
}

/// An association is its grant: [`Custody::associate`] creates one grant per association.
pub type AssociationRecord = GrantRecord;

/// What [`Custody::renew`] did.
#[derive(Debug, Clone)]
pub struct Renewal {
    /// The certificate's new generation.
    pub certificate: CertificateRecord,
    /// The exports that were rewritten (associations whose grant is in force).
    pub exports: Vec<PathBuf>,
}

/// Everything in custody. No secrets.
#[derive(Debug, Clone)]
pub struct Listing {
    /// The KMS key id.
    pub key_id: String,
    /// The KMS key alias.
    pub key_alias: String,
    /// Certificates, by id.
    pub certificates: Vec<CertificateRecord>,
    /// Grants, by id, retired ones included.
    pub grants: Vec<GrantRecord>,
}

impl Listing {
    /// The associations still listed in their exports.
    pub fn associations(&self) -> impl Iterator<Item = &AssociationRecord> {
        self.grants.iter().filter(|g| g.associated)
    }
}

/// One generation of a certificate before it is sealed: its chain and its private key.
struct Generation {
    origin: Origin,
    key_type: String,
    chain: Chain,
    /// PKCS#8 DER, wiped on drop.
    pkcs8: SecretBytes,
}

/// A custody system whose state lives in one directory. See the [module documentation](self).
pub struct Custody {
    state: StateDir,
    master: MasterKey,
    key_alias: String,
}

impl std::fmt::Debug for Custody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Custody")
            .field("state_dir", &self.state.root())
            .field("key_id", &self.key_id())
            .finish_non_exhaustive()
    }
}

impl Custody {
    /// Locks the state in `state_dir` against other processes, waiting for one that holds it (after calling
    /// `waiting`): hold the lock across [`Custody::open`] and the command. Within one process, share one
    /// [`Custody`] instead: a second lock waits for the first.
    pub fn lock(state_dir: &Path, waiting: impl FnOnce()) -> Result<StateLock> {
        StateDir::new(state_dir.to_owned()).lock(waiting)
    }

    /// Opens the state in `state_dir`, creating it (mode 0700) with a new KMS key on first use.
    pub fn open(state_dir: &Path) -> Result<Self> {
        let state = StateDir::new(state_dir.to_owned());
        let (custody, master) = state.open_or_initialize(now())?;
        Ok(Self { state, master, key_alias: custody.key_alias })
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        self.state.root()
    }

    /// The KMS key id, e.g. `arn:aws:kms:local:000000000000:key/<uuid>`.
    pub fn key_id(&self) -> &str {
        self.master.key_id()
    }

    /// The local CA's certificate (PEM), created on first use: what clients of this custody's certificates
    /// trust.
    pub fn ca_certificate_pem(&self) -> Result<String> {
        Ok(self.local_ca()?.certificate_pem)
    }

    /// Issues a certificate from the local CA with a new key pair, and seals its key.
    pub fn issue(&self, request: &IssueRequest) -> Result<CertificateRecord> {
        let names = valid_names(&request.names)?;
        let certificate_id = self.new_certificate_id(request.certificate_id.as_deref())?;
        let now = now();
        let (not_before, not_after) = validity(request.not_before, request.not_after, now)?;
        let generation = self.reissue(&certificate_id, request.key_type, &names, not_before, not_after)?;
        let stored = self.seal_certificate(&certificate_id, &generation, 1, now)?;
        Ok(certificate_record(&stored))
    }

    /// Imports an existing certificate: a PEM chain (leaf first) and its private key as PEM (PKCS#8, SEC1 or
    /// PKCS#1; converted to PKCS#8). The key must match the leaf, and the leaf must have a DNS name.
    pub fn import(&self, certificate_id: Option<&str>, chain_pem: &[u8], key_pem: &[u8]) -> Result<CertificateRecord> {
        let certificate_id = self.new_certificate_id(certificate_id)?;
        let stored = self.seal_certificate(&certificate_id, &read_import(chain_pem, key_pem)?, 1, now())?;
        Ok(certificate_record(&stored))
    }

    /// Associates a certificate with a grantee in an export: creates a grant (id `g-<12 hex>`), then writes the
    /// certificate and its sealed key, the grant file, and the association entry with the data key wrapped
    /// under the grant key.
    ///
    /// If the export already lists the certificate under a grant that is retired or lapsed, the entry is
    /// replaced (re-association: a new grant, never the old one). Under a grant in force, it is an error.
    pub fn associate(&self, request: &AssociateRequest) -> Result<AssociationRecord> {
        let certificate_id = request.certificate_id.as_str();
        let certificate = self.load_certificate(certificate_id)?;
        let grantee = valid_grantee(&request.grantee)?;
        let server_names = match &request.server_names {
            Some(names) => Some(covered_names(&certificate, names, request.allow_uncovered_server_names)?),
            None => None,
        };
        let export = ExportLayout::new(prepare_export(&request.export)?);
        let mut associations = export::read_associations(&export)?;
        let now = now();
        let replaced = self.replaceable_grant(&associations, certificate_id, export.root(), now)?;

        let grant_id = self.new_grant_id()?;
        let grant_key = SecretKey32::random()?;
        let wrapped = self.wrap_data_key(&certificate, &grant_id, &grant_key)?;
        let sealed_grant_key = self.master.seal(KeyRole::Grant, &grant_id, grant_key.expose())?;
        let grant = StoredGrant::new(
            grant_id,
            certificate_id.to_owned(),
            grantee,
            export.root().to_owned(),
            now,
            request.grant_not_after.map(whole_seconds),
            server_names,
            sealed_grant_key,
        );
        // The state first: whatever happens to the export next, the grant is on record and can be retired.
        self.state.write_grant(&grant)?;
        if let Some(mut old) = replaced {
            old.associated = false;
            self.state.write_grant(&old)?;
        }

        export::create_dirs(&export)?;
        export::write_certificate(&export, &certificate.chain_pem, &self.sealed_key(&certificate)?)?;
        export::write_grant(&export, &self.grant_file(&grant, Some(grant_key)))?;
        let entry = AssociationEntry {
            certificate_id: certificate_id.to_owned(),
            grant_id: grant.grant_id.clone(),
            server_names: grant.server_names.clone(),
            wrapped_data_key: encode_base64(&wrapped),
        };
        upsert(&mut associations, entry);
        export::write_associations(&export, &associations)?;
        Ok(grant_record(&grant))
    }

    /// Ends the association of a certificate with an export: retires its grant (the grant file is rewritten
    /// with `state = "retired"` and no key, first, so that holders stop at once), then removes the association
    /// entry and the certificate's files. Safe to repeat after a failure.
    pub fn disassociate(&self, certificate_id: &str, export: &Path) -> Result<AssociationRecord> {
        check_id("certificate id", certificate_id)?;
        let not_associated =
            || CustodyError::NotAssociated { certificate_id: certificate_id.to_owned(), export: export.to_owned() };
        let root = std::fs::canonicalize(export).map_err(|_| not_associated())?;
        let layout = ExportLayout::new(root);
        let mut associations = export::read_associations(&layout)?;
        let listed =
            associations.entries.iter().find(|e| e.certificate_id == certificate_id).map(|e| e.grant_id.clone());
        let mut grant = match &listed {
            Some(grant_id) => {
                let grant_id = grant_id.clone();
                check_id("grant id", &grant_id)?;
                self.state
                    .read_grant(&grant_id)?
                    .filter(|g| g.certificate_id == certificate_id)
                    .ok_or(CustodyError::UnknownGrant(grant_id))?
            }
            None => self
                .state
                .grants()?
                .into_iter()
                .find(|g| g.certificate_id == certificate_id && g.export == layout.root() && g.associated)
                .ok_or_else(not_associated)?,
        };

        grant.retire();
        export::write_grant(&layout, &self.grant_file(&grant, None))?;
        if listed.is_some() {
            associations.entries.retain(|e| e.certificate_id != certificate_id);
            export::write_associations(&layout, &associations)?;
        }
        export::remove_certificate(&layout, certificate_id)?;
        grant.associated = false;
        self.state.write_grant(&grant)?;
        Ok(grant_record(&grant))
    }

    /// Retires a grant, as when someone deletes it: its grant file, in the export it was written to, is
    /// rewritten with `state = "retired"` and no key. The association entry and the certificate's files stay;
    /// holders refuse them (check 1). The grant key is forgotten: a retired grant never comes back.
    pub fn retire_grant(&self, grant_id: &str) -> Result<GrantRecord> {
        check_id("grant id", grant_id)?;
        let mut grant =
            self.state.read_grant(grant_id)?.ok_or_else(|| CustodyError::UnknownGrant(grant_id.to_owned()))?;
        grant.retire();
        let layout = ExportLayout::new(&grant.export);
        // An export that no longer exists has no holder to tell.
        if layout.root().is_dir() {
            export::write_grant(&layout, &self.grant_file(&grant, None))?;
        }
        self.state.write_grant(&grant)?;
        Ok(grant_record(&grant))
    }

    /// Renews a certificate under the same id: a new key pair and certificate, sealed under a new data key.
    /// Then every export it is associated with under a grant in force gets, one atomic write at a time, the
    /// new certificate, the new sealed key and the new wrapped data key (a holder may briefly see a mix, which
    /// FORMAT.md tells it to ride out).
    pub fn renew(&self, certificate_id: &str, request: &RenewRequest) -> Result<Renewal> {
        let old = self.load_certificate(certificate_id)?;
        let now = now();
        let generation = match request {
            RenewRequest::Reissue { key_type, not_before, not_after } => {
                if old.origin != Origin::Issued {
                    return Err(CustodyError::invalid(format!(
                        "certificate {certificate_id} was imported: renew it with a new chain and key"
                    )));
                }
                let key_type = match key_type {
                    Some(key_type) => *key_type,
                    None => old.key.parse().map_err(|_| {
                        CustodyError::invalid(format!("certificate {certificate_id} has key type {:?}", old.key))
                    })?,
                };
                let (not_before, not_after) = validity(*not_before, *not_after, now)?;
                self.reissue(certificate_id, key_type, &old.names, not_before, not_after)?
            }
            RenewRequest::Replace { chain_pem, key_pem } => read_import(chain_pem, key_pem.expose())?,
        };
        self.check_associations_still_covered(certificate_id, &generation.chain)?;
        let stored = self.seal_certificate(certificate_id, &generation, old.generation + 1, old.created)?;
        let (exports, failed) = self.republish(&stored)?;
        if !failed.is_empty() {
            return Err(CustodyError::RenewalIncomplete {
                certificate_id: certificate_id.to_owned(),
                generation: stored.generation,
                rewritten: exports,
                failed,
            });
        }
        Ok(Renewal { certificate: certificate_record(&stored), exports })
    }

    /// One certificate.
    pub fn certificate(&self, certificate_id: &str) -> Result<CertificateRecord> {
        self.load_certificate(certificate_id).map(|c| certificate_record(&c))
    }

    /// One grant.
    pub fn grant(&self, grant_id: &str) -> Result<GrantRecord> {
        check_id("grant id", grant_id)?;
        let grant = self.state.read_grant(grant_id)?.ok_or_else(|| CustodyError::UnknownGrant(grant_id.to_owned()))?;
        Ok(grant_record(&grant))
    }

    /// Certificates, grants and associations. No secrets.
    pub fn list(&self) -> Result<Listing> {
        let certificates = self
            .state
            .certificate_ids()?
            .iter()
            .map(|id| self.load_certificate(id).map(|c| certificate_record(&c)))
            .collect::<Result<_>>()?;
        let grants = self.state.grants()?.iter().map(grant_record).collect();
        Ok(Listing { key_id: self.key_id().to_owned(), key_alias: self.key_alias.clone(), certificates, grants })
    }

    // -----------------------------------------------------------------------------------------------------------

    /// Sets (or clears) the CRL distribution point URL that the local CA writes into the certificates it issues
    /// from now on (an `http://` or `https://` URL).
    pub fn set_crl_url(&self, url: Option<&str>) -> Result<()> {
        if let Some(url) = url {
            let valid = (url.starts_with("http://") || url.starts_with("https://"))
                && url.len() <= 2048
                && url.bytes().all(|b| b.is_ascii_graphic());
            if !valid {
                return Err(CustodyError::state(&self.state.ca_crl_url_file(), "the CRL URL must be an http(s) URL"));
            }
        }
        self.local_ca()?;
        self.state.write_ca_crl_url(url)
    }

    /// The local CA, created on first use.
    fn local_ca(&self) -> Result<LocalCa> {
        if let Some((certificate_pem, sealed)) = self.state.read_ca()? {
            let pkcs8 = self.master.open(KeyRole::Ca, CA_SEAL_ID, &sealed, || {
                format!("{}: the local CA's key", self.state.ca_key_file().display())
            })?;
            let mut ca = LocalCa::load(certificate_pem, &pkcs8)?;
            ca.crl_url = self.state.read_ca_crl_url()?;
            return Ok(ca);
        }
        let (ca, pkcs8) = LocalCa::create(now())?;
        let sealed = self.master.seal(KeyRole::Ca, CA_SEAL_ID, pkcs8.expose())?;
        self.state.write_ca(&ca.certificate_pem, &sealed)?;
        Ok(ca)
    }

    /// A new key pair of `key_type` and a certificate for it from the local CA; checks that the certificate
    /// holds that key.
    fn reissue(
        &self,
        certificate_id: &str,
        key_type: KeyType,
        names: &[String],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Generation> {
        let key = keys::generate(key_type)?;
        let pem = self.local_ca()?.issue(certificate_id, names, &key.public_key, not_before, not_after)?;
        let chain = Chain::from_pem(pem.as_bytes())?;
        keys::check_key_matches(&chain.ders, &key.pkcs8)?;
        Ok(Generation { origin: Origin::Issued, key_type: key_type.to_string(), chain, pkcs8: key.pkcs8 })
    }

    /// Seals a certificate's private key under a fresh data key, seals the data key under the master key, and
    /// stores the certificate's new generation (one atomic write).
    fn seal_certificate(
        &self,
        certificate_id: &str,
        generation: &Generation,
        number: u64,
        created: OffsetDateTime,
    ) -> Result<StoredCertificate> {
        let data_key = SecretKey32::random()?;
        let nonce = seal::random_nonce().map_err(|_| CustodyError::Random)?;
        let aad = seal::sealed_key_aad(certificate_id, self.key_id());
        let sealed = format::SealedKey {
            certificate_id: certificate_id.to_owned(),
            key_id: self.key_id().to_owned(),
            nonce,
            ciphertext: seal::seal(&data_key, &nonce, generation.pkcs8.expose(), &aad),
        };
        let sealed_data_key = self.master.seal(KeyRole::Data, certificate_id, data_key.expose())?;
        let stored = StoredCertificate::new(
            certificate_id,
            generation.origin,
            generation.key_type.clone(),
            &generation.chain,
            number,
            created,
            now(),
            sealed_data_key,
            &sealed,
        );
        self.state.write_certificate(&stored)?;
        Ok(stored)
    }

    /// Rewrites every export `certificate` is associated with under a grant in force. One export failing does
    /// not stop the others: returns those rewritten and those that failed.
    fn republish(&self, certificate: &StoredCertificate) -> Result<(Vec<PathBuf>, Vec<ExportFailure>)> {
        let certificate_id = certificate.certificate_id.as_str();
        let sealed = self.sealed_key(certificate)?;
        let (mut exports, mut failed) = (Vec::new(), Vec::new());
        for grant in self.state.grants()? {
            // A retired grant has no key to wrap the new data key under; holders refuse its association anyway.
            if grant.certificate_id != certificate_id || !grant.associated || grant.grant_key.is_none() {
                continue;
            }
            match self.republish_to(certificate, &sealed, &grant) {
                Ok(true) => exports.push(grant.export),
                Ok(false) => {}
                Err(error) => failed.push(ExportFailure { export: grant.export, error: Box::new(error) }),
            }
        }
        Ok((exports, failed))
    }

    /// Rewrites `certificate` in the export of `grant`; `false` when the export no longer lists the association.
    fn republish_to(
        &self,
        certificate: &StoredCertificate,
        sealed: &format::SealedKey,
        grant: &StoredGrant,
    ) -> Result<bool> {
        let certificate_id = certificate.certificate_id.as_str();
        let layout = ExportLayout::new(&grant.export);
        let mut associations = export::read_associations(&layout)?;
        let Some(entry) = associations
            .entries
            .iter_mut()
            .find(|e| e.certificate_id == certificate_id && e.grant_id == grant.grant_id)
        else {
            return Ok(false);
        };
        let grant_key = self.grant_key(grant)?;
        entry.wrapped_data_key = encode_base64(&self.wrap_data_key(certificate, &grant.grant_id, &grant_key)?);
        // Everything is written before anything is renamed into place: a holder sees the three files change
        // together, not a new certificate beside an old data key while a large associations.toml is written.
        let mut staged = export::stage_certificate(&layout, &certificate.chain_pem, sealed)?;
        staged.push(export::stage_associations(&layout, &associations)?);
        fsio::publish(staged)?;
        Ok(true)
    }

    /// A renewal may not strand an association whose `server_names` the new certificate does not cover.
    fn check_associations_still_covered(&self, certificate_id: &str, chain: &Chain) -> Result<()> {
        for grant in self.state.grants()? {
            if grant.certificate_id != certificate_id || !grant.associated {
                continue;
            }
            for name in grant.server_names.iter().flatten() {
                if !names::any_covers(&chain.dns_names, name) {
                    return Err(CustodyError::NameNotCovered {
                        certificate_id: certificate_id.to_owned(),
                        name: name.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// If `associations` lists the certificate, the grant of that entry, provided it is one of ours that is
    /// no longer in force (so that the entry may be replaced).
    fn replaceable_grant(
        &self,
        associations: &Associations,
        certificate_id: &str,
        export: &Path,
        now: OffsetDateTime,
    ) -> Result<Option<StoredGrant>> {
        let Some(entry) = associations.entries.iter().find(|e| e.certificate_id == certificate_id) else {
            return Ok(None);
        };
        let old = if is_valid_id(&entry.grant_id) { self.state.read_grant(&entry.grant_id)? } else { None };
        match old {
            Some(grant) if grant.certificate_id == certificate_id && !grant.in_force(now) => Ok(Some(grant)),
            _ => Err(CustodyError::AlreadyAssociated {
                certificate_id: certificate_id.to_owned(),
                export: export.to_owned(),
                grant_id: entry.grant_id.clone(),
            }),
        }
    }

    fn load_certificate(&self, certificate_id: &str) -> Result<StoredCertificate> {
        check_id("certificate id", certificate_id)?;
        self.state
            .read_certificate(certificate_id)?
            .ok_or_else(|| CustodyError::UnknownCertificate(certificate_id.to_owned()))
    }

    fn new_certificate_id(&self, given: Option<&str>) -> Result<String> {
        let certificate_id = match given {
            Some(id) => {
                check_id("certificate id", id)?;
                id.to_owned()
            }
            None => random_id("c")?,
        };
        if self.state.read_certificate(&certificate_id)?.is_some() {
            return Err(CustodyError::CertificateExists(certificate_id));
        }
        Ok(certificate_id)
    }

    fn new_grant_id(&self) -> Result<String> {
        loop {
            let grant_id = random_id("g")?;
            if self.state.read_grant(&grant_id)?.is_none() {
                return Ok(grant_id);
            }
        }
    }

    fn data_key(&self, certificate: &StoredCertificate) -> Result<SecretKey32> {
        let id = &certificate.certificate_id;
        self.master.open_key(KeyRole::Data, id, &certificate.data_key, || format!("the data key of certificate {id}"))
    }

    fn grant_key(&self, grant: &StoredGrant) -> Result<SecretKey32> {
        let id = &grant.grant_id;
        let sealed =
            grant.grant_key.as_deref().ok_or_else(|| CustodyError::invalid(format!("grant {id} is retired")))?;
        self.master.open_key(KeyRole::Grant, id, sealed, || format!("the key of grant {id}"))
    }

    /// The certificate's data key wrapped under `grant_key`, as `associations.toml` carries it.
    fn wrap_data_key(
        &self,
        certificate: &StoredCertificate,
        grant_id: &str,
        grant_key: &SecretKey32,
    ) -> Result<[u8; format::WRAPPED_DATA_KEY_LEN]> {
        let data_key = self.data_key(certificate)?;
        let aad = seal::data_key_aad(grant_id, &certificate.certificate_id, self.key_id());
        seal::wrap_data_key(grant_key, &data_key, &aad).map_err(|_| CustodyError::Random)
    }

    fn sealed_key(&self, certificate: &StoredCertificate) -> Result<format::SealedKey> {
        certificate.sealed_key(self.key_id(), || self.state.certificate_file(&certificate.certificate_id))
    }

    /// The grant file of `grant`, with `grant_key` while active.
    fn grant_file(&self, grant: &StoredGrant, grant_key: Option<SecretKey32>) -> format::Grant {
        format::Grant {
            grant_id: grant.grant_id.clone(),
            key_id: self.key_id().to_owned(),
            key_alias: Some(self.key_alias.clone()),
            grantee: grant.grantee.clone(),
            operations: vec![DECRYPT_OPERATION.to_owned()],
            state: grant.state,
            grant_key: grant_key.filter(|_| grant.state == GrantState::Active),
            not_after: grant.not_after,
            created: Some(grant.created),
        }
    }
}

/// Reads an imported chain and key and checks that they belong together.
fn read_import(chain_pem: &[u8], key_pem: &[u8]) -> Result<Generation> {
    let chain = Chain::from_pem(chain_pem)?;
    let ImportedKey { pkcs8, description } = keys::read_private_key_pem(key_pem)?;
    keys::check_key_matches(&chain.ders, &pkcs8)?;
    Ok(Generation { origin: Origin::Imported, key_type: description, chain, pkcs8 })
}

/// Creates the export directory if needed and returns its canonical path: the identity under which the state
/// records it.
fn prepare_export(export: &Path) -> Result<PathBuf> {
    fsio::create_dir_all(export, fsio::PUBLIC_DIR_MODE)?;
    let root = std::fs::canonicalize(export).map_err(|e| CustodyError::io(export, "resolve the path of", e))?;
    if root.to_str().is_none() {
        return Err(CustodyError::invalid(format!("the export path {} is not UTF-8", root.display())));
    }
    Ok(root)
}

/// Replaces the entry of the same certificate, or appends.
fn upsert(associations: &mut Associations, entry: AssociationEntry) {
    match associations.entries.iter_mut().find(|e| e.certificate_id == entry.certificate_id) {
        Some(existing) => *existing = entry,
        None => associations.entries.push(entry),
    }
}

fn check_id(what: &'static str, id: &str) -> Result<()> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(CustodyError::InvalidId { what, id: id.chars().take(140).collect() })
    }
}

/// `<prefix>-<12 hex digits>` from the system's CSPRNG.
fn random_id(prefix: &str) -> Result<String> {
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes)?;
    Ok(bytes.iter().fold(format!("{prefix}-"), |mut id, byte| {
        id.push_str(&format!("{byte:02x}"));
        id
    }))
}

/// Normalises and checks a certificate's DNS names: at least one, valid, no IP addresses (SNI carries names
/// only), duplicates dropped.
fn valid_names(requested: &[String]) -> Result<Vec<String>> {
    if requested.is_empty() {
        return Err(CustodyError::invalid("a certificate needs at least one DNS name"));
    }
    let mut valid: Vec<String> = Vec::new();
    for name in requested {
        let normalized = valid_name(name)?;
        if normalized.parse::<std::net::IpAddr>().is_ok() {
            return Err(CustodyError::InvalidName {
                name: name.clone(),
                reason: "IP addresses are not supported: holders select certificates by SNI, which carries names",
            });
        }
        if !valid.contains(&normalized) {
            valid.push(normalized);
        }
    }
    Ok(valid)
}

fn valid_name(name: &str) -> Result<String> {
    let normalized = names::normalize(name.trim());
    names::validate_server_name(&normalized)
        .map_err(|reason| CustodyError::InvalidName { name: name.to_owned(), reason })?;
    Ok(normalized)
}

/// Normalises and checks an association's `server_names` against the certificate's names.
fn covered_names(certificate: &StoredCertificate, requested: &[String], allow_uncovered: bool) -> Result<Vec<String>> {
    if requested.is_empty() {
        return Err(CustodyError::invalid("server_names, when given, must list at least one name"));
    }
    let mut covered: Vec<String> = Vec::new();
    for name in requested {
        let normalized = valid_name(name)?;
        if !allow_uncovered && !names::any_covers(&certificate.names, &normalized) {
            return Err(CustodyError::NameNotCovered {
                certificate_id: certificate.certificate_id.clone(),
                name: name.clone(),
            });
        }
        if !covered.contains(&normalized) {
            covered.push(normalized);
        }
    }
    Ok(covered)
}

fn valid_grantee(grantee: &str) -> Result<String> {
    if grantee.trim().is_empty() || grantee.len() > 256 || grantee.chars().any(char::is_control) {
        return Err(CustodyError::invalid("the grantee must be 1 to 256 printable characters"));
    }
    Ok(grantee.to_owned())
}

/// The validity of a new certificate, defaults applied, in whole seconds (what X.509 can say).
fn validity(
    not_before: Option<OffsetDateTime>,
    not_after: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> Result<(OffsetDateTime, OffsetDateTime)> {
    let not_before = whole_seconds(not_before.unwrap_or(now - DEFAULT_BACKDATE));
    let not_after = whole_seconds(not_after.unwrap_or(now + DEFAULT_LIFETIME));
    if not_before >= not_after {
        return Err(CustodyError::invalid(format!(
            "the validity must end after it begins (not_before {not_before}, not_after {not_after})"
        )));
    }
    Ok((not_before, not_after))
}

fn now() -> OffsetDateTime {
    whole_seconds(OffsetDateTime::now_utc())
}

fn whole_seconds(instant: OffsetDateTime) -> OffsetDateTime {
    instant.to_offset(time::UtcOffset::UTC).replace_nanosecond(0).unwrap_or(instant)
}

fn certificate_record(stored: &StoredCertificate) -> CertificateRecord {
    CertificateRecord {
        certificate_id: stored.certificate_id.clone(),
        origin: stored.origin,
        key_type: stored.key.clone(),
        names: stored.names.clone(),
        not_before: stored.not_before,
        not_after: stored.not_after,
        generation: stored.generation,
        certificate_pem: stored.chain_pem.clone(),
    }
}

fn grant_record(stored: &StoredGrant) -> GrantRecord {
    GrantRecord {
        grant_id: stored.grant_id.clone(),
        certificate_id: stored.certificate_id.clone(),
        grantee: stored.grantee.clone(),
        export: stored.export.clone(),
        state: stored.state,
        associated: stored.associated,
        created: stored.created,
        not_after: stored.not_after,
        server_names: stored.server_names.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.extend(files_under(&path));
            } else {
                let bytes = std::fs::read(&path).unwrap();
                files.push((path, bytes));
            }
        }
        files
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// The integration tests can only look for sealed values; here the plaintexts themselves are looked for.
    #[test]
    fn plaintext_secrets_never_reach_the_export() {
        let dir = tempfile::tempdir().unwrap();
        let custody = Custody::open(&dir.path().join("state")).unwrap();
        let request = IssueRequest { certificate_id: Some("c-1".into()), ..IssueRequest::new(["one.test"]) };
        custody.issue(&request).unwrap();
        let export = dir.path().join("export");
        custody.associate(&AssociateRequest::new("c-1", &export, "holder")).unwrap();

        let (_, sealed_ca) = custody.state.read_ca().unwrap().unwrap();
        let ca_key = custody.master.open(KeyRole::Ca, CA_SEAL_ID, &sealed_ca, String::new).unwrap();
        let certificate = custody.load_certificate("c-1").unwrap();
        let data_key = custody.data_key(&certificate).unwrap();
        let sealed = custody.sealed_key(&certificate).unwrap();
        let aad = seal::sealed_key_aad("c-1", custody.key_id());
        let leaf_key = seal::open_private_key(&data_key, &sealed.nonce, &sealed.ciphertext, &aad).unwrap();
        assert!(ca_key.len() > 32 && leaf_key.len() > 32);

        for (path, bytes) in files_under(&export) {
            for secret in [ca_key.expose(), data_key.expose(), leaf_key.expose()] {
                assert!(!contains(&bytes, secret), "{}", path.display());
                assert!(!contains(&bytes, encode_base64(secret).as_bytes()), "{}", path.display());
            }
        }
    }

    #[test]
    fn debug_output_holds_no_key() {
        let dir = tempfile::tempdir().unwrap();
        let custody = Custody::open(dir.path()).unwrap();
        let text = format!("{custody:?}");
        assert!(text.contains(custody.key_id()), "{text}");
        let master = std::fs::read(dir.path().join("master.key")).unwrap();
        assert!(!text.contains(&encode_base64(&master)) && !text.contains("key:"), "{text}");
    }
}
