//! The certificate table: which certificate answers which server name, and the TLS configuration of each.
//!
//! Every certificate generation gets its own [`ServerConfig`], and with it its own session storage. That is what
//! scopes resumption: a session made with one generation can only be resumed by that generation's config, so
//! no session made before a renewal or a retirement resumes after it (rustls does not tie a resumed session to
//! the key, and `ServerConfig` clones share their storage). The server reads the ClientHello first
//! ([`crate::tls_stream::accept`]), selects the generation by SNI here, then completes the handshake with its config.
//!
//! The table is immutable and published whole through [`ArcSwap`]: a handshake sees either the old table or the
//! new one, never a mix.
//!
//! The policy behind the configurations is published the same way: a reload that changes client certificate
//! trust ([`CertificateStore::replace_policy`]) makes every generation's configuration again, with fresh session
//! storage, and publishes policy and table together under the lock every publisher takes.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::{aws_lc_rs, SupportedKxGroup};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use rustls_pki_types::CertificateDer;

use crate::client_auth::{ClientConnections, ClientIdentity, ClientWatch};
use crate::config::{ClientAuthConfig, KeyExchange, TlsConfig, TlsVersion};
use crate::keyring::{Keyring, LoadedCertificate};
use crate::names;
use tokio_util::sync::CancellationToken;

/// ALPN protocol ids offered, in preference order.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN id of HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Errors building the TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the combination of provider and protocol versions.
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// `[tls.client_auth]` cannot be set up (its CA or CRL files).
    #[error(transparent)]
    ClientAuth(#[from] crate::client_auth::ClientAuthError),
    /// The crypto provider's random generator failed: no handshake could be made.
    #[error("the TLS random generator failed: {0:?}")]
    Random(rustls::crypto::GetRandomFailed),
}

/// Result alias of this module.
pub type Result<T, E = TlsError> = std::result::Result<T, E>;

/// Resolves every handshake of one generation to that generation's key, until the grant ends.
struct GenerationResolver {
    certificate: Arc<LoadedCertificate>,
}

impl fmt::Debug for GenerationResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenerationResolver").field("certificate", &self.certificate.certificate_id).finish()
    }
}

impl ResolvesServerCert for GenerationResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // rustls calls this on resumed handshakes too, so a retired key refuses those as well.
        self.certificate.certified_key()
    }
}

/// Resolves nothing: the handshake ends with an alert. Used for a ClientHello with no SNI or an unknown name.
#[derive(Debug)]
struct RefuseAll;

impl ResolvesServerCert for RefuseAll {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        None
    }
}

/// The TLS policy shared by every generation: provider, versions, ALPN, resumption, client certificates.
pub struct TlsPolicy {
    /// What it was built from (resumption, the default certificate and `[tls.client_auth] forward` are read
    /// from it).
    config: TlsConfig,
    /// A config with everything but the certificate resolver and session storage.
    template: ServerConfig,
    /// The config that refuses every handshake with an alert.
    refusing: Arc<ServerConfig>,
    /// With `[tls.client_auth]`: its digest (see [`crate::client_auth::ClientTrust`]).
    client_auth_digest: Option<[u8; 32]>,
    /// With `[tls.client_auth]`: the verifier its configurations use.
    client_verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
}

impl fmt::Debug for TlsPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsPolicy")
            .field("session_resumption", &self.config.session_resumption)
            .field("default_certificate", &self.config.default_certificate)
            .finish_non_exhaustive()
    }
}

impl TlsPolicy {
    /// Builds the policy from `[tls]`.
    pub fn new(config: &TlsConfig) -> Result<Self> {
        let mut provider = aws_lc_rs::default_provider();
        // aws-lc seeds its random generator on first use, from CPU jitter: about 0.4 billion instructions, once
        // per process. Here, at start, rather than in the first client's handshake.
        provider.secure_random.fill(&mut [0; 32]).map_err(TlsError::Random)?;
        if !config.key_exchange.is_empty() {
            provider.kx_groups = config.key_exchange.iter().map(|k| kx_group(*k)).collect();
        }
        let versions: &[&'static rustls::SupportedProtocolVersion] = match config.min_version {
            TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::Tls13 => &[&rustls::version::TLS13],
        };
        let provider = Arc::new(provider);
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider)).with_protocol_versions(versions)?;
        let (builder, client_auth_digest, client_verifier) = match &config.client_auth {
            Some(client_auth) => {
                let trust = crate::client_auth::load(client_auth, provider)?;
                let verifier = Arc::clone(&trust.verifier);
                (builder.with_client_cert_verifier(trust.verifier), Some(trust.digest), Some(verifier))
            }
            None => (builder.with_no_client_auth(), None, None),
        };
        let mut template = builder.with_cert_resolver(Arc::new(RefuseAll));
        template.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
        template.max_early_data_size = 0;
        // The server's cipher suite order (the provider's: AES-256-GCM, AES-128-GCM, ChaCha20-Poly1305, all AEAD
        // with forward secrecy) rather than the client's, as auditors such as testssl.sh expect.
        template.ignore_client_order = true;
        template.send_half_rtt_data = false;
        template.session_storage = Arc::new(NoServerSessionStorage {});
        if !config.session_resumption {
            template.send_tls13_tickets = 0;
        }
        Ok(Self {
            config: config.clone(),
            refusing: Arc::new(template.clone()),
            template,
            client_auth_digest,
            client_verifier,
        })
    }

    /// One generation ready to serve, with a config (and session storage) of its own.
    fn serving(&self, certificate: &Arc<LoadedCertificate>) -> Arc<ServingCertificate> {
        let mut config = self.template.clone();
        config.cert_resolver = Arc::new(GenerationResolver { certificate: Arc::clone(certificate) });
        // Fresh storage per generation: never the template's (clones share storage).
        config.session_storage = if self.config.session_resumption && self.config.session_cache_size > 0 {
            ServerSessionMemoryCache::new(self.config.session_cache_size)
        } else {
            Arc::new(NoServerSessionStorage {})
        };
        Arc::new(ServingCertificate { certificate: Arc::clone(certificate), config: Arc::new(config) })
    }

    /// `[tls] default_certificate`.
    fn default_certificate(&self) -> Option<&str> {
        self.config.default_certificate.as_deref()
    }

    /// The policy with `[tls.client_auth]` as `client_auth` says (its files read again) and the rest as it is;
    /// `None` when that changes nothing (the same section, the same file contents).
    pub fn with_client_auth(&self, client_auth: Option<&ClientAuthConfig>) -> Result<Option<Self>> {
        if client_auth.is_none() && self.config.client_auth.is_none() {
            return Ok(None);
        }
        let policy = Self::new(&TlsConfig { client_auth: client_auth.cloned(), ..self.config.clone() })?;
        Ok((policy.client_auth_digest != self.client_auth_digest).then_some(policy))
    }
}

fn kx_group(group: KeyExchange) -> &'static dyn SupportedKxGroup {
    use aws_lc_rs::kx_group;
    match group {
        KeyExchange::X25519MlKem768 => kx_group::X25519MLKEM768,
        KeyExchange::X25519 => kx_group::X25519,
        KeyExchange::Secp256r1 => kx_group::SECP256R1,
        KeyExchange::Secp384r1 => kx_group::SECP384R1,
    }
}

/// One generation ready to serve: the certificate and its TLS configuration.
pub struct ServingCertificate {
    /// The certificate, its key and its grant's end signal.
    pub certificate: Arc<LoadedCertificate>,
    /// Its own TLS configuration (and session storage).
    pub config: Arc<ServerConfig>,
}

impl fmt::Debug for ServingCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCertificate").field("certificate", &self.certificate).finish_non_exhaustive()
    }
}

/// Names to certificates. Keys are shared between successive tables (a change of one certificate copies the
/// maps, not the names), and hashed with foldhash: every handshake looks its SNI up here (the names come from
/// the custody export, whose writer is trusted with far more than hash flooding; foldhash is seeded per
/// process).
type NameMap = foldhash::HashMap<Arc<str>, Arc<ServingCertificate>>;

/// An immutable map from server name to the certificate that answers it.
#[derive(Debug, Default)]
pub struct CertificateTable {
    /// Best certificate for each exact name.
    exact: NameMap,
    /// Best wildcard certificate by the parent it covers: `*.example.com` is filed under `example.com`.
    wildcard: NameMap,
    /// The certificate for a ClientHello without SNI or with an unknown name, if configured and served.
    default: Option<Arc<ServingCertificate>>,
    /// Every certificate in the table.
    all: Vec<Arc<ServingCertificate>>,
}

impl CertificateTable {
    /// Builds a table. Where several certificates claim a name: an exact name beats a wildcard (by lookup
    /// order); then the certificate whose validity began latest; then the smaller certificate id (FORMAT.md).
    fn build(certificates: Vec<Arc<ServingCertificate>>, default_certificate: Option<&str>) -> Self {
        let mut table = Self::default();
        for serving in &certificates {
            for name in &serving.certificate.server_names {
                table.offer(serving, name);
            }
        }
        table.default = default_certificate
            .and_then(|id| certificates.iter().find(|c| c.certificate.certificate_id == id))
            .cloned();
        table.all = certificates;
        table
    }

    /// This table without the generations of `removed` and with `added`: the table [`CertificateTable::build`]
    /// would build from the certificates that leaves, at the cost of copying the maps and looking again only at
    /// the names those generations claim.
    fn patched(
        &self,
        removed: &foldhash::HashSet<u64>,
        added: Vec<Arc<ServingCertificate>>,
        default_certificate: Option<&str>,
    ) -> Self {
        let gone = |serving: &&Arc<ServingCertificate>| removed.contains(&serving.certificate.generation);
        let mut all: Vec<_> = self.all.iter().filter(|s| !gone(s)).cloned().collect();
        let kept = all.len();
        all.extend(added);
        let mut affected: foldhash::HashSet<&str> = foldhash::HashSet::default();
        for serving in self.all.iter().filter(gone).chain(&all[kept..]) {
            affected.extend(serving.certificate.server_names.iter().map(String::as_str));
        }
        let mut table = Self { exact: self.exact.clone(), wildcard: self.wildcard.clone(), ..Self::default() };
        for name in &affected {
            match name.strip_prefix("*.") {
                Some(parent) => table.wildcard.remove(parent),
                None => table.exact.remove(*name),
            };
        }
        for serving in &all {
            for name in serving.certificate.server_names.iter().filter(|n| affected.contains(n.as_str())) {
                table.offer(serving, name);
            }
        }
        drop(affected);
        table.default =
            default_certificate.and_then(|id| all.iter().find(|c| c.certificate.certificate_id == id)).cloned();
        table.all = all;
        table
    }

    /// Files `serving` under `name` (normalised) unless a preferred certificate already answers it.
    fn offer(&mut self, serving: &Arc<ServingCertificate>, name: &str) {
        let (map, key) = match name.strip_prefix("*.") {
            Some(parent) => (&mut self.wildcard, parent),
            None => (&mut self.exact, name),
        };
        match map.get_mut(key) {
            Some(current) if !preferred(serving, current) => {}
            Some(current) => *current = Arc::clone(serving),
            None => {
                map.insert(Arc::from(key), Arc::clone(serving));
            }
        }
    }

    /// The certificate for a ClientHello's SNI (already lower-cased by rustls), or the default.
    pub fn select(&self, sni: Option<&str>) -> Option<&Arc<ServingCertificate>> {
        let Some(sni) = sni else {
            return self.default.as_ref();
        };
        let normalized;
        let name = if sni.ends_with('.') || sni.bytes().any(|b| b.is_ascii_uppercase()) {
            normalized = names::normalize(sni);
            normalized.as_str()
        } else {
            sni
        };
        self.exact
            .get(name)
            .or_else(|| names::wildcard_parent(name).and_then(|parent| self.wildcard.get(parent)))
            .or(self.default.as_ref())
    }

    /// Whether some certificate is served for `name` (normalised), not counting the default certificate.
    pub fn serves(&self, name: &str) -> bool {
        self.exact.contains_key(name)
            || names::wildcard_parent(name).is_some_and(|parent| self.wildcard.contains_key(parent))
    }

    /// Every certificate in the table.
    pub fn certificates(&self) -> &[Arc<ServingCertificate>] {
        &self.all
    }

    /// Whether the table serves nothing.
    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }
}

/// Whether `candidate` beats `current` for a name both claim with the same kind of match.
fn preferred(candidate: &ServingCertificate, current: &ServingCertificate) -> bool {
    let (a, b) = (&candidate.certificate, &current.certificate);
    (a.not_before, std::cmp::Reverse(&a.certificate_id)) > (b.not_before, std::cmp::Reverse(&b.certificate_id))
}

/// The published certificate table and the policy that builds each generation's configuration.
pub struct CertificateStore {
    policy: ArcSwap<TlsPolicy>,
    table: ArcSwap<CertificateTable>,
    /// Held by whoever publishes a table: custody changes and a new policy must not overwrite each other's.
    publishing: std::sync::Mutex<()>,
    /// The open connections made with a client certificate, verified again when the policy changes.
    clients: Arc<ClientConnections>,
    /// Counts the policies put in force (see [`CertificateStore::trust_generation`]).
    trust_generation: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for CertificateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateStore").field("policy", &self.policy).finish_non_exhaustive()
    }
}

impl CertificateStore {
    /// An empty store.
    pub fn new(policy: TlsPolicy) -> Self {
        Self {
            policy: ArcSwap::from_pointee(policy),
            table: ArcSwap::from_pointee(CertificateTable::default()),
            publishing: std::sync::Mutex::new(()),
            clients: Arc::default(),
            trust_generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many policies were put in force since the start. A connection reads it before it selects its
    /// certificate, and again once it is watched as a client connection: when the two differ, a new trust came
    /// in meanwhile and may have revalidated the open connections without it, so it checks itself
    /// ([`CertificateStore::admits_client`]). The count goes up after the new table and policy are published:
    /// a connection that read the new count selected from the new table.
    pub fn trust_generation(&self) -> u64 {
        self.trust_generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether the client trust in force admits a client that presented `chain` (always, without client
    /// authentication).
    pub fn admits_client(&self, chain: &[CertificateDer<'static>]) -> bool {
        let Some(verifier) = self.policy.load().client_verifier.clone() else { return true };
        crate::client_auth::admits(verifier.as_ref(), chain, rustls_pki_types::UnixTime::now())
    }

    /// Whether client certificates are asked for (`[tls.client_auth]`).
    pub fn asks_client_certificates(&self) -> bool {
        self.policy.load().client_verifier.is_some()
    }

    /// Watches a connection made with the client certificate `chain` (see [`ClientConnections`]).
    pub fn watch_client(&self, chain: &[CertificateDer<'static>], close: CancellationToken) -> ClientWatch {
        self.clients.register(chain, close)
    }

    fn publishing(&self) -> std::sync::MutexGuard<'_, ()> {
        // The guard protects nothing of its own: a holder's panic leaves no state to distrust.
        self.publishing.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<TlsPolicy> {
        self.policy.load_full()
    }

    /// Puts `policy` in force (a reload's new `[tls.client_auth]`): every certificate gets a configuration made
    /// with it, with session storage of its own, so that no session made under the old trust resumes under the
    /// new one. The connections already open are then for [`CertificateStore::revalidate_clients`].
    pub fn replace_policy(&self, policy: TlsPolicy) {
        let _publishing = self.publishing();
        let current = self.table.load_full();
        let certificates = current.all.iter().map(|serving| policy.serving(&serving.certificate)).collect();
        let table = CertificateTable::build(certificates, policy.default_certificate());
        // The table first: a connection that loads the new policy selects from the new table.
        self.table.store(Arc::new(table));
        self.policy.store(Arc::new(policy));
        self.trust_generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        drop(current);
    }

    /// Closes the open connections made with a client certificate that the policy in force refuses; how many.
    /// A signature check per such connection: blocking work, for a blocking thread. Without client
    /// authentication any more, none is refused.
    pub fn revalidate_clients(&self) -> usize {
        let verifier = self.policy.load().client_verifier.clone();
        verifier.map_or(0, |verifier| self.clients.revalidate(verifier.as_ref()))
    }

    /// Builds a new table from the keyring's served certificates and publishes it in one step. Generations
    /// already in the current table keep their configuration (and their resumable sessions).
    pub fn publish(&self, keyring: &Keyring) {
        let _publishing = self.publishing();
        let policy = self.policy.load();
        let current = self.table.load_full();
        let by_generation: foldhash::HashMap<u64, &Arc<ServingCertificate>> =
            current.all.iter().map(|s| (s.certificate.generation, s)).collect();
        let certificates = keyring
            .served()
            .map(|certificate| match by_generation.get(&certificate.generation) {
                Some(existing) => Arc::clone(existing),
                None => policy.serving(certificate),
            })
            .collect();
        let table = CertificateTable::build(certificates, policy.default_certificate());
        drop(by_generation);
        self.table.store(Arc::new(table));
        // `current` goes last: the replaced generations' configs (and keys) are freed once no handshake holds
        // them.
        drop(current);
    }

    /// Publishes the table changed by one apply of the keyring: without the generations `removed` (replaced, or
    /// ended with their grant) and with `added` (loaded). The same table as [`CertificateStore::publish`] would
    /// build from the keyring afterwards, for a fraction of the work when a few of many certificates change.
    pub fn publish_changes<'a>(
        &self,
        removed: impl Iterator<Item = &'a Arc<LoadedCertificate>>,
        added: &[Arc<LoadedCertificate>],
    ) {
        let _publishing = self.publishing();
        let policy = self.policy.load();
        let current = self.table.load_full();
        let removed: foldhash::HashSet<u64> = removed.map(|c| c.generation).collect();
        let added = added.iter().map(|certificate| policy.serving(certificate)).collect();
        let table = current.patched(&removed, added, policy.default_certificate());
        self.table.store(Arc::new(table));
        drop(current);
    }

    /// The certificate for a ClientHello's SNI.
    pub fn select(&self, sni: Option<&str>) -> Option<Arc<ServingCertificate>> {
        self.table.load().select(sni).cloned()
    }

    /// Whether some certificate is served for `name` (normalised).
    pub fn serves(&self, name: &str) -> bool {
        self.table.load().serves(name)
    }

    /// The current table.
    pub fn table(&self) -> Arc<CertificateTable> {
        self.table.load_full()
    }

    /// The identity of the verified client certificate a connection was made with (its chain as rustls gives
    /// it), when `[tls.client_auth]` asks clients for one.
    pub fn client_identity(&self, chain: Option<&[CertificateDer<'static>]>) -> Option<Arc<ClientIdentity>> {
        let forward = self.policy.load().config.client_auth.as_ref()?.forward;
        ClientIdentity::of(chain?.first()?, forward).map(Arc::new)
    }

    /// The config that ends a handshake with an alert.
    pub fn refusing_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.policy.load().refusing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::custody::snapshot::GrantStatus;
    use crate::test_util::{active, served, snapshot, unchanged, verified_from};
    use time::{Duration, OffsetDateTime};

    fn store(extra: &str) -> CertificateStore {
        let text = format!("[custody]\nexport = \"e\"\ngrantee = \"g\"\n[[listener]]\nbind = \"127.0.0.1:0\"\n{extra}");
        let config = Config::parse(&text, std::path::Path::new("proxy.toml")).unwrap();
        CertificateStore::new(TlsPolicy::new(&config.tls).unwrap())
    }

    fn selected(store: &CertificateStore, sni: Option<&str>) -> Option<String> {
        store.select(sni).map(|s| s.certificate.certificate_id.clone())
    }

    #[test]
    fn selection_follows_the_format_rules() {
        let now = OffsetDateTime::now_utc();
        let older = now - Duration::days(10);
        let mut keyring = Keyring::new("me");
        keyring.apply(snapshot(
            &[("g-1", active())],
            vec![
                served(verified_from("c-wild-new", "g-1", &["*.example.test"], now)),
                served(verified_from("c-exact-old", "g-1", &["www.example.test"], older)),
                served(verified_from("c-b", "g-1", &["same.example.test"], now)),
                served(verified_from("c-a", "g-1", &["same.example.test"], now)),
                served(verified_from("c-old", "g-1", &["newest.example.test"], older)),
                served(verified_from("c-z-new", "g-1", &["newest.example.test"], now)),
            ],
        ));
        let store = store("");
        store.publish(&keyring);
        assert_eq!(selected(&store, Some("www.example.test")).as_deref(), Some("c-exact-old"), "exact beats wildcard");
        assert_eq!(selected(&store, Some("other.example.test")).as_deref(), Some("c-wild-new"));
        assert_eq!(selected(&store, Some("a.b.example.test")), None, "a wildcard covers one label");
        assert_eq!(selected(&store, Some("example.test")), None);
        assert_eq!(selected(&store, Some("newest.example.test")).as_deref(), Some("c-z-new"), "newest validity");
        assert_eq!(selected(&store, Some("same.example.test")).as_deref(), Some("c-a"), "smaller id on a tie");
        assert_eq!(selected(&store, Some("WWW.Example.Test.")).as_deref(), Some("c-exact-old"));
        assert_eq!(selected(&store, None), None, "no default certificate unless configured");
        assert!(store.serves("x.example.test") && !store.serves("nothing.test"));
    }

    #[test]
    fn the_default_certificate_answers_unknown_names_when_configured() {
        let mut keyring = Keyring::new("me");
        let now = OffsetDateTime::now_utc();
        keyring.apply(snapshot(&[("g-1", active())], vec![served(verified_from("c-1", "g-1", &["a.test"], now))]));
        let store = store("[tls]\ndefault_certificate = \"c-1\"\n");
        store.publish(&keyring);
        assert_eq!(selected(&store, None).as_deref(), Some("c-1"));
        assert_eq!(selected(&store, Some("unknown.test")).as_deref(), Some("c-1"));
        assert!(!store.serves("unknown.test"), "the default does not make a name served");
    }

    /// Who answers each of a pool of names, and the default.
    fn answers(store: &CertificateStore, names: &[String]) -> Vec<Option<(String, u64)>> {
        let table = store.table();
        let select = |sni: Option<&str>| {
            table.select(sni).map(|s| (s.certificate.certificate_id.clone(), s.certificate.generation))
        };
        names.iter().map(|n| select(Some(n))).chain([select(None)]).collect()
    }

    #[test]
    fn a_table_patched_with_each_change_answers_as_a_rebuilt_one() {
        let now = OffsetDateTime::now_utc();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut random = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let pool = ["a.test", "b.test", "x.a.test", "y.a.test", "*.a.test", "*.b.test", "c.test", "*.c.test"];
        let mut names: Vec<String> = pool.iter().map(|n| n.replace('*', "w")).collect();
        names.push("unknown.test".into());
        let mut keyring = Keyring::new("me");
        let (rebuilt, patched) =
            (store("[tls]\ndefault_certificate = \"c-3\"\n"), store("[tls]\ndefault_certificate = \"c-3\"\n"));
        let mut grants: Vec<(String, GrantStatus)> = (0..4).map(|g| (format!("g-{g}"), active())).collect();
        for step in 0..200 {
            // Every certificate of every grant still active, most of them as before, some renewed or with other
            // names, some dropped; now and then a grant retired.
            let mut outcomes = Vec::new();
            for id in 0..8 {
                let grant = format!("g-{}", id % 4);
                if random(10) == 0 {
                    continue;
                }
                let certificate_id = format!("c-{id}");
                let held = keyring.served().find(|c| c.certificate_id == certificate_id).cloned();
                match held.filter(|_| random(4) != 0) {
                    Some(held) => outcomes.push(unchanged(&certificate_id, &grant, held.inputs)),
                    None => {
                        let count = 1 + random(3) as usize;
                        let chosen: Vec<&str> = (0..count).map(|_| pool[random(pool.len() as u64) as usize]).collect();
                        let not_before = now - Duration::days(random(3) as i64);
                        outcomes.push(served(verified_from(&certificate_id, &grant, &chosen, not_before)));
                    }
                }
            }
            if step % 37 == 36 {
                let g = random(4) as usize;
                grants[g].1 = GrantStatus::Retired;
            }
            let statuses: Vec<(&str, GrantStatus)> = grants.iter().map(|(g, s)| (g.as_str(), s.clone())).collect();
            let report = keyring.apply(snapshot(&statuses, outcomes));
            rebuilt.publish(&keyring);
            let ended = report.ended.iter().flat_map(|grant| &grant.certificates);
            patched.publish_changes(report.replaced.iter().chain(ended), &report.loaded);
            assert_eq!(answers(&patched, &names), answers(&rebuilt, &names), "step {step}: {report:?}");
            assert_eq!(patched.table().certificates().len(), keyring.len());
            if grants.iter().all(|(_, s)| *s == GrantStatus::Retired) {
                grants = (4..8).map(|g| (format!("g-{}", g % 4), active())).collect();
                keyring = Keyring::new("me");
                rebuilt.publish(&keyring);
                patched.publish(&keyring);
            }
        }
    }

    #[test]
    fn unchanged_generations_keep_their_config_and_renewals_get_a_new_one() {
        let now = OffsetDateTime::now_utc();
        let mut keyring = Keyring::new("me");
        keyring.apply(snapshot(&[("g-1", active())], vec![served(verified_from("c-1", "g-1", &["a.test"], now))]));
        let store = store("");
        store.publish(&keyring);
        let first = store.select(Some("a.test")).unwrap();
        store.publish(&keyring);
        let republished = store.select(Some("a.test")).unwrap();
        assert!(Arc::ptr_eq(&first.config, &republished.config), "same generation, same config and sessions");
        keyring.apply(snapshot(&[("g-1", active())], vec![served(verified_from("c-1", "g-1", &["a.test"], now))]));
        store.publish(&keyring);
        let renewed = store.select(Some("a.test")).unwrap();
        assert!(!Arc::ptr_eq(&first.config, &renewed.config), "a renewal gets a config (and sessions) of its own");
        assert!(!Arc::ptr_eq(&first.config.session_storage, &renewed.config.session_storage));
    }
}
