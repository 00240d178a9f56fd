//! The custody system's own state directory, which holds what an export never does: the master key (the "KMS"
//! key), the sealed data keys, grant keys and local CA key, and the record of where every grant was written.
//!
//! ```text
//! <state>/                            0700
//!   custody.toml                      key id and alias of the KMS key
//!   master.key                        the KMS key: 32 raw bytes, the only plaintext secret
//!   ca/certificate.pem                the local CA
//!   ca/private-key.sealed             its PKCS#8 key, sealed under the master key
//!   certificates/<certificate_id>.toml  chain, sealed private key, data key sealed under the master key
//!   grants/<grant_id>.toml            grantee, export, state, grant key sealed under the master key
//!   lock                              empty; held locked (flock) by the `sealgate custody` running on it
//! ```
//!
//! Every file is mode 0600 and replaced atomically. Each certificate and each grant is one file, so that every
//! change to one of them is a single atomic write. These files are private to this tool; only exports follow
//! FORMAT.md.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::error::{CustodyError, Result};
use super::fsio::{self, PRIVATE_DIR_MODE, SECRET_FILE_MODE};
use crate::custody::format::{self, decode_base64, encode_base64, FormatError, GrantState, NONCE_LEN};
use crate::custody::seal;
use crate::secret::{SecretBytes, SecretKey32, KEY_LEN};

/// `format` of `custody.toml`.
const STATE_FORMAT: &str = "sealgate-custody-state/v1";
/// `format` of a certificate's state file.
const CERTIFICATE_FORMAT: &str = "sealgate-custody-certificate/v1";
/// `format` of a grant's state file.
const GRANT_FORMAT: &str = "sealgate-custody-grant/v1";

/// An exclusive hold on a state directory, released when dropped (or when the process ends, however it ends).
///
/// Changes to the state are not one write: the first use creates the master key, then `custody.toml`; a renewal
/// replaces a certificate's state file, then its export files. Two commands interleaving on one directory could
/// seal with two master keys or leave an export's key and certificate from different renewals, so the CLI runs
/// one command at a time per directory.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

/// Paths of the state directory.
#[derive(Debug, Clone)]
pub(super) struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes the directory's lock (creating the directory, mode 0700, if missing), calling `waiting` first if
    /// another process holds it.
    pub fn lock(&self, waiting: impl FnOnce()) -> Result<StateLock> {
        fsio::create_dir_all(&self.root, PRIVATE_DIR_MODE)?;
        let path = self.root.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(SECRET_FILE_MODE)
            .open(&path)
            .map_err(|e| CustodyError::io(&path, "open", e))?;
        // rustix's flock: std's `File::lock` is newer than the crate's minimum Rust.
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                waiting();
                rustix::fs::flock(&file, FlockOperation::LockExclusive)
                    .map_err(|e| CustodyError::io(&path, "lock", e.into()))?;
            }
            Err(e) => return Err(CustodyError::io(&path, "lock", e.into())),
        }
        Ok(StateLock { _file: file })
    }

    fn custody_file(&self) -> PathBuf {
        self.root.join("custody.toml")
    }

    pub fn master_key_file(&self) -> PathBuf {
        self.root.join("master.key")
    }

    fn ca_dir(&self) -> PathBuf {
        self.root.join("ca")
    }

    pub fn ca_certificate_file(&self) -> PathBuf {
        self.ca_dir().join("certificate.pem")
    }

    pub fn ca_key_file(&self) -> PathBuf {
        self.ca_dir().join("private-key.sealed")
    }

    /// The CRL distribution point URL the local CA writes into certificates, if one was set.
    pub fn ca_crl_url_file(&self) -> PathBuf {
        self.ca_dir().join("crl-url")
    }

    /// Reads the CA's CRL URL.
    pub fn read_ca_crl_url(&self) -> Result<Option<String>> {
        let path = self.ca_crl_url_file();
        let Some(bytes) = fsio::read_optional(&path)? else { return Ok(None) };
        let url = String::from_utf8(bytes).map_err(|_| CustodyError::state(&path, "is not UTF-8"))?;
        Ok(Some(url.trim().to_owned()).filter(|u| !u.is_empty()))
    }

    /// Stores (or, with `None`, clears) the CA's CRL URL.
    pub fn write_ca_crl_url(&self, url: Option<&str>) -> Result<()> {
        self.write(&self.ca_crl_url_file(), url.unwrap_or_default().as_bytes())
    }

    fn certificates_dir(&self) -> PathBuf {
        self.root.join("certificates")
    }

    pub fn certificate_file(&self, certificate_id: &str) -> PathBuf {
        self.certificates_dir().join(format!("{certificate_id}.toml"))
    }

    fn grants_dir(&self) -> PathBuf {
        self.root.join("grants")
    }

    fn grant_file(&self, grant_id: &str) -> PathBuf {
        self.grants_dir().join(format!("{grant_id}.toml"))
    }

    /// Writes a state file, creating its directory (0700) when needed.
    fn write(&self, path: &Path, contents: &[u8]) -> Result<()> {
        if let Some(dir) = path.parent() {
            fsio::create_dir_all(dir, PRIVATE_DIR_MODE)?;
        }
        fsio::write_atomic(path, contents, SECRET_FILE_MODE)
    }

    /// Reads `custody.toml` and the master key, creating both when the state is new.
    pub fn open_or_initialize(&self, now: OffsetDateTime) -> Result<(CustodyFile, MasterKey)> {
        fsio::create_dir_all(&self.root, PRIVATE_DIR_MODE)?;
        let custody_path = self.custody_file();
        let custody = match fsio::read_optional(&custody_path)? {
            Some(bytes) => parse_toml::<CustodyFile>(&custody_path, &bytes)?,
            None => self.initialize(now)?,
        };
        if custody.format != STATE_FORMAT {
            return Err(CustodyError::state(&custody_path, format!("`format` must be {STATE_FORMAT:?}")));
        }
        let key = self.read_master_key()?;
        Ok((custody.clone(), MasterKey { key, key_id: custody.key_id }))
    }

    /// Creates the KMS key: the master key first, then `custody.toml`, whose presence marks a complete state.
    fn initialize(&self, now: OffsetDateTime) -> Result<CustodyFile> {
        let key = SecretKey32::random()?;
        self.write(&self.master_key_file(), key.expose())?;
        let custody = CustodyFile {
            format: STATE_FORMAT.to_owned(),
            key_id: new_key_id()?,
            key_alias: "aws/acm".to_owned(),
            created: now,
        };
        self.write(&self.custody_file(), to_toml(&custody).as_bytes())?;
        Ok(custody)
    }

    fn read_master_key(&self) -> Result<SecretKey32> {
        let path = self.master_key_file();
        let bytes = fsio::read_secret_file(&path)?;
        SecretKey32::from_slice(bytes.expose())
            .ok_or_else(|| CustodyError::state(&path, format!("the master key must be exactly {KEY_LEN} bytes")))
    }

    /// The local CA's certificate and sealed key, if the CA exists.
    pub fn read_ca(&self) -> Result<Option<(String, String)>> {
        let cert_path = self.ca_certificate_file();
        let Some(pem) = fsio::read_optional(&cert_path)? else { return Ok(None) };
        let pem = String::from_utf8(pem).map_err(|_| CustodyError::state(&cert_path, "is not UTF-8"))?;
        let key_path = self.ca_key_file();
        let sealed = fsio::read(&key_path)?;
        let sealed = String::from_utf8(sealed).map_err(|_| CustodyError::state(&key_path, "is not UTF-8"))?;
        Ok(Some((pem, sealed.trim().to_owned())))
    }

    /// Stores the local CA: its sealed key first, then its certificate, whose presence marks a complete CA.
    pub fn write_ca(&self, certificate_pem: &str, sealed_key: &str) -> Result<()> {
        self.write(&self.ca_key_file(), format!("{sealed_key}\n").as_bytes())?;
        self.write(&self.ca_certificate_file(), certificate_pem.as_bytes())
    }

    pub fn read_certificate(&self, certificate_id: &str) -> Result<Option<StoredCertificate>> {
        let path = self.certificate_file(certificate_id);
        let Some(bytes) = fsio::read_optional(&path)? else { return Ok(None) };
        let stored: StoredCertificate = parse_toml(&path, &bytes)?;
        if stored.format != CERTIFICATE_FORMAT || stored.certificate_id != certificate_id {
            return Err(CustodyError::state(&path, "is not the state file of this certificate"));
        }
        Ok(Some(stored))
    }

    pub fn write_certificate(&self, stored: &StoredCertificate) -> Result<()> {
        self.write(&self.certificate_file(&stored.certificate_id), to_toml(stored).as_bytes())
    }

    pub fn certificate_ids(&self) -> Result<Vec<String>> {
        fsio::toml_stems(&self.certificates_dir())
    }

    pub fn read_grant(&self, grant_id: &str) -> Result<Option<StoredGrant>> {
        let path = self.grant_file(grant_id);
        let Some(bytes) = fsio::read_optional(&path)? else { return Ok(None) };
        let stored: StoredGrant = parse_toml(&path, &bytes)?;
        if stored.format != GRANT_FORMAT || stored.grant_id != grant_id {
            return Err(CustodyError::state(&path, "is not the state file of this grant"));
        }
        Ok(Some(stored))
    }

    pub fn write_grant(&self, stored: &StoredGrant) -> Result<()> {
        self.write(&self.grant_file(&stored.grant_id), to_toml(stored).as_bytes())
    }

    pub fn grant_ids(&self) -> Result<Vec<String>> {
        fsio::toml_stems(&self.grants_dir())
    }

    /// Every grant in the state, in id order.
    pub fn grants(&self) -> Result<Vec<StoredGrant>> {
        let mut grants = Vec::new();
        for id in self.grant_ids()? {
            if let Some(grant) = self.read_grant(&id)? {
                grants.push(grant);
            }
        }
        Ok(grants)
    }
}

fn parse_toml<T: for<'de> Deserialize<'de>>(path: &Path, bytes: &[u8]) -> Result<T> {
    let text = std::str::from_utf8(bytes).map_err(|_| CustodyError::state(path, "is not UTF-8"))?;
    toml::from_str(text).map_err(|e| CustodyError::state(path, FormatError::from_toml(text, &e).to_string()))
}

fn to_toml<T: Serialize>(value: &T) -> String {
    // The state's documents hold strings, integers, booleans, arrays and date-times only, in fields declared
    // before any table: TOML can always represent them.
    toml::to_string(value).expect("a state document always serializes to TOML")
}

/// A random KMS key id in the shape of an AWS KMS key ARN, with a version 4 UUID.
fn new_key_id() -> Result<String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|byte| format!("{byte:02x}")).collect();
    Ok(format!(
        "arn:aws:kms:local:000000000000:key/{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

/// `custody.toml`: who the KMS key is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct CustodyFile {
    pub format: String,
    pub key_id: String,
    pub key_alias: String,
    #[serde(with = "toml_time")]
    pub created: OffsetDateTime,
}

/// What a secret sealed under the master key is; part of its associated data, so that no sealed secret can be
/// passed off as another.
#[derive(Debug, Clone, Copy)]
pub(super) enum KeyRole {
    /// The local CA's PKCS#8 key.
    Ca,
    /// A certificate's data key.
    Data,
    /// A grant's key.
    Grant,
}

impl KeyRole {
    fn label(self) -> &'static str {
        match self {
            Self::Ca => "ca-key",
            Self::Data => "data-key",
            Self::Grant => "grant-key",
        }
    }
}

/// The KMS key: every secret of the state is sealed under it with AES-256-GCM-SIV.
pub(super) struct MasterKey {
    key: SecretKey32,
    key_id: String,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKey").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

impl MasterKey {
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Associated data: `sealgate-custody-state/v1\n<role>\n<id>\n<key_id>`.
    fn aad(&self, role: KeyRole, id: &str) -> Vec<u8> {
        [STATE_FORMAT, role.label(), id, &self.key_id].join("\n").into_bytes()
    }

    /// Seals `plaintext` for `role` and `id`: base64 of nonce || ciphertext || tag.
    pub fn seal(&self, role: KeyRole, id: &str, plaintext: &[u8]) -> Result<String> {
        let nonce = seal::random_nonce().map_err(|_| CustodyError::Random)?;
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&seal::seal(&self.key, &nonce, plaintext, &self.aad(role, id)));
        Ok(encode_base64(&sealed))
    }

    /// Opens what [`Self::seal`] sealed; `what` names the secret in errors.
    pub fn open(&self, role: KeyRole, id: &str, sealed: &str, what: impl Fn() -> String) -> Result<SecretBytes> {
        let seal_error = |source| CustodyError::Seal { what: what(), source };
        let sealed = decode_base64("sealed", sealed).map_err(|_| seal_error(seal::SealError::Length))?;
        if sealed.len() < NONCE_LEN {
            return Err(seal_error(seal::SealError::Length));
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| seal_error(seal::SealError::Length))?;
        seal::open_private_key(&self.key, &nonce, ciphertext, &self.aad(role, id)).map_err(seal_error)
    }

    /// Opens a sealed 256-bit key.
    pub fn open_key(&self, role: KeyRole, id: &str, sealed: &str, what: impl Fn() -> String) -> Result<SecretKey32> {
        let bytes = self.open(role, id, sealed, &what)?;
        SecretKey32::from_slice(bytes.expose())
            .ok_or(CustodyError::Seal { what: what(), source: seal::SealError::Length })
    }
}

/// Where a certificate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Signed by the local CA (`issue`); `renew` can reissue it.
    Issued,
    /// Brought in by `import`; `renew` needs a new chain and key.
    Imported,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Issued => "issued",
            Self::Imported => "imported",
        })
    }
}

/// `certificates/<certificate_id>.toml`: one generation of a certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct StoredCertificate {
    pub format: String,
    pub certificate_id: String,
    pub origin: Origin,
    /// `ecdsa-p256`, `rsa-3072`, ...
    pub key: String,
    /// The leaf's DNS names.
    pub names: Vec<String>,
    #[serde(with = "toml_time")]
    pub not_before: OffsetDateTime,
    #[serde(with = "toml_time")]
    pub not_after: OffsetDateTime,
    /// 1 when issued or imported, incremented by every renewal.
    pub generation: u64,
    #[serde(with = "toml_time")]
    pub created: OffsetDateTime,
    #[serde(with = "toml_time")]
    pub updated: OffsetDateTime,
    /// The data key, sealed under the master key.
    pub data_key: String,
    /// The private key sealed under the data key, exactly as exports carry it (base64).
    pub sealed_key_nonce: String,
    pub sealed_key_ciphertext: String,
    /// The chain, leaf first, normalised PEM.
    pub chain_pem: String,
}

impl StoredCertificate {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        certificate_id: &str,
        origin: Origin,
        key: String,
        chain: &super::chain::Chain,
        generation: u64,
        created: OffsetDateTime,
        updated: OffsetDateTime,
        data_key: String,
        sealed: &format::SealedKey,
    ) -> Self {
        Self {
            format: CERTIFICATE_FORMAT.to_owned(),
            certificate_id: certificate_id.to_owned(),
            origin,
            key,
            names: chain.dns_names.clone(),
            not_before: chain.not_before,
            not_after: chain.not_after,
            generation,
            created,
            updated,
            data_key,
            sealed_key_nonce: encode_base64(&sealed.nonce),
            sealed_key_ciphertext: encode_base64(&sealed.ciphertext),
            chain_pem: chain.pem.clone(),
        }
    }

    /// The sealed private key, as written into exports.
    pub fn sealed_key(&self, key_id: &str, path: impl Fn() -> PathBuf) -> Result<format::SealedKey> {
        let broken = || CustodyError::state(&path(), "the sealed private key is malformed");
        let nonce = decode_base64("sealed_key_nonce", &self.sealed_key_nonce).map_err(|_| broken())?;
        let ciphertext = decode_base64("sealed_key_ciphertext", &self.sealed_key_ciphertext).map_err(|_| broken())?;
        Ok(format::SealedKey {
            certificate_id: self.certificate_id.clone(),
            key_id: key_id.to_owned(),
            nonce: nonce.try_into().map_err(|_| broken())?,
            ciphertext,
        })
    }
}

/// `grants/<grant_id>.toml`: one grant, hence one association.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct StoredGrant {
    pub format: String,
    pub grant_id: String,
    pub certificate_id: String,
    pub grantee: String,
    /// The export the grant was written to, absolute.
    pub export: PathBuf,
    pub state: GrantState,
    /// Whether the export's `associations.toml` holds the association (false once disassociated or replaced).
    pub associated: bool,
    #[serde(with = "toml_time")]
    pub created: OffsetDateTime,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "toml_time::option")]
    pub not_after: Option<OffsetDateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_names: Option<Vec<String>>,
    /// The grant key sealed under the master key; absent once retired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_key: Option<String>,
}

impl StoredGrant {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        grant_id: String,
        certificate_id: String,
        grantee: String,
        export: PathBuf,
        created: OffsetDateTime,
        not_after: Option<OffsetDateTime>,
        server_names: Option<Vec<String>>,
        grant_key: String,
    ) -> Self {
        Self {
            format: GRANT_FORMAT.to_owned(),
            grant_id,
            certificate_id,
            grantee,
            export,
            state: GrantState::Active,
            associated: true,
            created,
            not_after,
            server_names,
            grant_key: Some(grant_key),
        }
    }

    /// Whether holders may still use the grant at `now`: active and not lapsed.
    pub fn in_force(&self, now: OffsetDateTime) -> bool {
        self.state == GrantState::Active && self.not_after.is_none_or(|t| t > now)
    }

    /// Marks the grant retired, forgetting its key for good.
    pub fn retire(&mut self) {
        self.state = GrantState::Retired;
        self.grant_key = None;
    }
}

/// Serde for instants as TOML offset date-times.
mod toml_time {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use time::OffsetDateTime;
    use toml::value::Datetime;

    use crate::custody::format::{offset_datetime, toml_datetime};

    pub fn serialize<S: Serializer>(instant: &OffsetDateTime, serializer: S) -> Result<S::Ok, S::Error> {
        toml_datetime(*instant).serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<OffsetDateTime, D::Error> {
        let value = Datetime::deserialize(deserializer)?;
        offset_datetime("date-time", &value).map_err(serde::de::Error::custom)
    }

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(instant: &Option<OffsetDateTime>, serializer: S) -> Result<S::Ok, S::Error> {
            instant.map(toml_datetime).serialize(serializer)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<OffsetDateTime>, D::Error> {
            Option::<Datetime>::deserialize(deserializer)?
                .map(|value| offset_datetime("date-time", &value).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_look_like_kms_arns() {
        let id = new_key_id().unwrap();
        let uuid = id.strip_prefix("arn:aws:kms:local:000000000000:key/").unwrap();
        let groups: Vec<_> = uuid.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert_eq!(&uuid[14..15], "4");
        assert_ne!(new_key_id().unwrap(), id);
    }

    #[test]
    fn sealed_secrets_are_bound_to_their_role_and_id() {
        let master = MasterKey { key: SecretKey32::random().unwrap(), key_id: "k".to_owned() };
        let sealed = master.seal(KeyRole::Data, "c-1", b"secret").unwrap();
        let what = || "the test secret".to_owned();
        assert_eq!(master.open(KeyRole::Data, "c-1", &sealed, what).unwrap().expose(), b"secret");
        for (role, id) in [(KeyRole::Grant, "c-1"), (KeyRole::Data, "c-2")] {
            let err = master.open(role, id, &sealed, what).unwrap_err();
            assert!(matches!(err, CustodyError::Seal { .. }), "{err}");
        }
        assert!(master.open(KeyRole::Data, "c-1", "AAAA", what).is_err());
        assert!(!format!("{master:?}").contains("key:"));
    }
}
