//! Mutual TLS: the client certificate verifier built from `[tls.client_auth]`, and the identity of a verified
//! client as upstreams are told it (`X-Forwarded-Client-Cert`).
//!
//! The verifier is rustls' WebPKI one: the chain must lead to one of the configured CAs, be valid now, carry the
//! client-authentication usage, and (with `crl`) be revoked nowhere along it. In `optional` mode a client may
//! send no certificate at all; one that sends a certificate that fails any check is refused, as nginx's
//! `ssl_verify_client optional` does.
//!
//! Upstreams learn the client's identity only when `forward` is on, in Envoy's `X-Forwarded-Client-Cert`
//! format: `Hash` (SHA-256 of the leaf, hex), `Subject` (RFC 4514), and one `URI` and `DNS` element per
//! subject alternative name of those kinds. Whatever a client sends under that name is always removed first
//! ([`crate::proxy::forward::set_forwarded`]): an upstream that trusts the field must only ever see sealgate's.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http::HeaderValue;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::UnixTime;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use tokio_util::sync::CancellationToken;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::config::{ClientAuthConfig, ClientAuthMode};

/// Errors building the client certificate verifier; each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ClientAuthError {
    /// A CA or CRL file cannot be read.
    #[error("cannot read the client {what} file {}: {source}", path.display())]
    Read {
        /// `CA` or `CRL`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A CA or CRL file holds nothing of its kind.
    #[error("the client {what} file {} holds no PEM {what}", path.display())]
    Empty {
        /// `CA` or `CRL`.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A CA or CRL file holds something unusable.
    #[error("the client {what} file {} is invalid: {reason}", path.display())]
    Invalid {
        /// `CA` or `CRL`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the verifier (a CRL it cannot use, for one).
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Result alias of this module.
pub type Result<T, E = ClientAuthError> = std::result::Result<T, E>;

/// The client certificate trust `[tls.client_auth]` describes, as read from its files.
pub struct ClientTrust {
    /// The verifier, with the provider's signature algorithms.
    pub verifier: Arc<dyn ClientCertVerifier>,
    /// SHA-256 over the section and the bytes of every file it names: a reload with the same digest changes
    /// nothing.
    pub digest: [u8; 32],
}

/// Reads `[tls.client_auth]`'s CA and CRL files and makes their verifier.
pub fn load(config: &ClientAuthConfig, provider: Arc<CryptoProvider>) -> Result<ClientTrust> {
    let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    digest.update(format!("{config:?}").as_bytes());
    let mut roots = RootCertStore::empty();
    for certificate in pem_items::<CertificateDer<'static>>(&config.ca, "CA", &mut digest)? {
        roots.add(certificate).map_err(|e| invalid("CA", &config.ca, e))?;
    }
    let mut crls = Vec::new();
    for path in &config.crl {
        crls.extend(pem_items::<CertificateRevocationListDer<'static>>(path, "CRL", &mut digest)?);
    }
    let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).with_crls(crls);
    if config.mode == ClientAuthMode::Optional {
        builder = builder.allow_unauthenticated();
    }
    let mut out = [0; 32];
    out.copy_from_slice(digest.finish().as_ref());
    Ok(ClientTrust { verifier: builder.build()?, digest: out })
}

/// Every PEM item of type `T` in `path`; at least one. The file's bytes go into `digest`.
fn pem_items<T: PemObject>(path: &Path, what: &'static str, digest: &mut aws_lc_rs::digest::Context) -> Result<Vec<T>> {
    let pem = crate::hygiene::read_trusted_file(path, "client certificate trust file")
        .map_err(|source| ClientAuthError::Read { what, path: path.to_owned(), source })?;
    digest.update(&(pem.len() as u64).to_be_bytes());
    digest.update(&pem);
    let items = T::pem_slice_iter(&pem).collect::<Result<Vec<T>, _>>().map_err(|e| invalid(what, path, e))?;
    if items.is_empty() {
        return Err(ClientAuthError::Empty { what, path: path.to_owned() });
    }
    Ok(items)
}

fn invalid(what: &'static str, path: &Path, reason: impl std::fmt::Display) -> ClientAuthError {
    ClientAuthError::Invalid { what, path: path.to_owned(), reason: reason.to_string() }
}

/// The open connections made while client certificates were asked for, each with the chain it presented (none,
/// in `optional` mode) and the signal that closes it: when a reload changes the trust, every chain is verified
/// again and the connections the new trust refuses (revoked by a renewed CRL, from a CA no longer trusted,
/// without a certificate where one is now required) are closed, as connections are when their certificate's
/// grant ends.
#[derive(Debug, Default)]
pub struct ClientConnections {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Watched>>,
}

/// A watched connection's chain (shared, so that a revalidation copies pointers) and close signal.
type Watched = (Arc<[CertificateDer<'static>]>, CancellationToken);

impl ClientConnections {
    /// Watches a connection made with `chain` until the guard is dropped; `close` is cancelled should a new
    /// trust refuse the chain.
    pub fn register(self: &Arc<Self>, chain: &[CertificateDer<'static>], close: CancellationToken) -> ClientWatch {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, (Arc::from(chain), close));
        ClientWatch { connections: Arc::clone(self), id }
    }

    /// Verifies every watched chain with `verifier` and closes the connections whose chain fails; how many.
    /// The chains are verified outside the lock (a signature check each): connections keep opening and closing
    /// meanwhile; one opened meanwhile was verified by its handshake, with whichever trust it met.
    pub fn revalidate(&self, verifier: &dyn ClientCertVerifier) -> usize {
        let now = UnixTime::now();
        let mut closed = 0;
        let watched: Vec<Watched> = self.lock().values().cloned().collect();
        for (chain, close) in &watched {
            if !close.is_cancelled() && !admits(verifier, chain, now) {
                close.cancel();
                closed += 1;
            }
        }
        closed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Watched>> {
        // Inserts and removes only: the map is valid after any panic of a holder.
        self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Whether `verifier` admits a client that presented `chain`: a chain that verifies, or none at all where a
/// certificate is optional.
pub fn admits(verifier: &dyn ClientCertVerifier, chain: &[CertificateDer<'static>], now: UnixTime) -> bool {
    match chain.split_first() {
        Some((leaf, intermediates)) => verifier.verify_client_cert(leaf, intermediates, now).is_ok(),
        None => !verifier.client_auth_mandatory(),
    }
}

/// Keeps a connection watched; dropping it (the connection closed) stops watching it.
#[derive(Debug)]
pub struct ClientWatch {
    connections: Arc<ClientConnections>,
    id: u64,
}

impl Drop for ClientWatch {
    fn drop(&mut self) {
        self.connections.lock().remove(&self.id);
    }
}

/// A verified client certificate, as the connection made with it knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// SHA-256 of the leaf certificate (DER), lowercase hex.
    pub hash: String,
    /// The leaf's subject as RFC 4514 writes it (see [`subject`]); may hold any character but control ones.
    pub subject: String,
    /// The `X-Forwarded-Client-Cert` value upstreams are told, with `[tls.client_auth] forward` only.
    pub forwarded: Option<HeaderValue>,
}

impl ClientIdentity {
    /// The identity of a verified client's leaf certificate; `forward` makes its `X-Forwarded-Client-Cert`
    /// value. `None` only for a certificate x509-parser cannot read, which the verifier has accepted: then the
    /// connection is treated as one without a certificate, and upstreams are told nothing rather than something
    /// partial.
    pub fn of(leaf: &CertificateDer<'_>, forward: bool) -> Option<Self> {
        let (_, certificate) = X509Certificate::from_der(leaf).ok()?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf);
        let mut hash = String::with_capacity(64);
        for byte in digest.as_ref() {
            // Infallible: writing to a String.
            let _ = write!(hash, "{byte:02x}");
        }
        let subject = subject(&certificate);
        let forwarded = match forward {
            true => Some(forwarded_value(&certificate, &hash, &subject)?),
            false => None,
        };
        Some(Self { hash, subject, forwarded })
    }
}

/// `Hash=…;Subject="…"`, then `;URI=…` and `;DNS=…` for each such subject alternative name.
fn forwarded_value(certificate: &X509Certificate<'_>, hash: &str, subject: &str) -> Option<HeaderValue> {
    let mut value = String::with_capacity(256);
    value.push_str("Hash=");
    value.push_str(hash);
    value.push_str(";Subject=");
    push_quoted(&mut value, subject);
    if let Ok(Some(names)) = certificate.subject_alternative_name() {
        for name in &names.value.general_names {
            let (key, name) = match name {
                GeneralName::URI(uri) => ("URI", uri),
                GeneralName::DNSName(dns) => ("DNS", dns),
                _ => continue,
            };
            value.push(';');
            value.push_str(key);
            value.push('=');
            if name.bytes().all(|b| b.is_ascii_graphic() && !b"\",;=\\".contains(&b)) {
                value.push_str(name);
            } else {
                push_quoted(&mut value, name);
            }
        }
    }
    // Every byte pushed is printable ASCII (`push_quoted` escapes the rest), which a header value accepts.
    HeaderValue::from_str(&value).ok()
}

/// The attribute type names RFC 4514 defines; others are written as dotted OIDs.
const RFC4514_NAMES: &[&str] = &["CN", "L", "ST", "O", "OU", "C", "STREET", "DC", "UID"];

/// The subject as RFC 4514 renders it: the last RDN first, `+` between the attributes of one RDN, the types
/// RFC 4514 names by their short names, others by their dotted OID (a value that is not a string as `#` and
/// its bytes in hex).
fn subject(certificate: &X509Certificate<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let mut out = String::new();
    for (i, rdn) in certificate.subject().iter_rdn().collect::<Vec<_>>().into_iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, attribute) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            match x509_parser::objects::oid2abbrev(attribute.attr_type(), registry) {
                Ok(short) if RFC4514_NAMES.contains(&short) => out.push_str(short),
                _ => out.push_str(&attribute.attr_type().to_id_string()),
            }
            out.push('=');
            match attribute.as_str() {
                Ok(text) => push_rfc4514_value(&mut out, text),
                Err(_) => {
                    out.push('#');
                    for byte in attribute.as_slice() {
                        let _ = write!(out, "{byte:02x}");
                    }
                }
            }
        }
    }
    out
}

/// An attribute value with RFC 4514's escapes: the special characters by a backslash, a leading `#` or space
/// and a trailing space too.
fn push_rfc4514_value(out: &mut String, text: &str) {
    let last = text.chars().count().saturating_sub(1);
    for (i, c) in text.chars().enumerate() {
        let special = matches!(c, '"' | '+' | ',' | ';' | '<' | '>' | '\\')
            || (i == 0 && matches!(c, '#' | ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
}

/// `text` in double quotes for an `X-Forwarded-Client-Cert` element: `"` and `\` escaped by a backslash, and
/// every byte that is not printable ASCII (control characters, UTF-8) as `\XX` in hex, RFC 4514's escape, so
/// that the value is a valid header value and reads back unambiguously.
fn push_quoted(out: &mut String, text: &str) {
    out.push('"');
    for byte in text.bytes() {
        match byte {
            b'"' | b'\\' => {
                out.push('\\');
                out.push(char::from(byte));
            }
            b' '..=b'~' => out.push(char::from(byte)),
            _ => {
                let _ = write!(out, "\\{byte:02X}");
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    fn leaf(params: CertificateParams) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn value_of(params: CertificateParams) -> String {
        ClientIdentity::of(&leaf(params), true).unwrap().forwarded.unwrap().to_str().unwrap().to_owned()
    }

    #[test]
    fn the_value_names_hash_subject_and_alternative_names() {
        let mut params = CertificateParams::new(vec!["client.example.test".to_owned()]).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CountryName, "DE");
        params.distinguished_name.push(DnType::OrganizationName, "Example, Inc.");
        params.distinguished_name.push(DnType::CommonName, "billing");
        params.subject_alt_names.push(SanType::URI("spiffe://example.test/billing".try_into().unwrap()));
        let der = leaf(params.clone());
        let identity = ClientIdentity::of(&der, true).unwrap();
        let value = identity.forwarded.as_ref().unwrap().to_str().unwrap();
        let hash: String = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            value,
            format!(
                "Hash={hash};Subject=\"CN=billing,O=Example\\\\, Inc.,C=DE\";DNS=client.example.test;\
                 URI=spiffe://example.test/billing"
            )
        );
        assert_eq!(
            (identity.hash.as_str(), identity.subject.as_str()),
            (hash.as_str(), "CN=billing,O=Example\\, Inc.,C=DE")
        );
        assert_eq!(ClientIdentity::of(&der, false).unwrap().forwarded, None, "made only to be forwarded");
    }

    #[test]
    fn characters_that_would_break_the_field_or_the_header_are_escaped() {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "a\"b;c\r\nd é");
        params.subject_alt_names.push(SanType::URI("urn:x;y=z".try_into().unwrap()));
        let value = value_of(params);
        assert!(value.contains(r#";Subject="CN=a\\\"b\\;c\0D\0Ad \C3\A9""#), "{value}");
        assert!(value.ends_with(r#";URI="urn:x;y=z""#), "{value}");
    }

    #[test]
    fn a_connection_is_watched_until_its_guard_drops() {
        let connections = Arc::new(ClientConnections::default());
        let first = connections
            .register(&[leaf(CertificateParams::new(Vec::<String>::new()).unwrap())], CancellationToken::new());
        let second = connections.register(&[], CancellationToken::new());
        assert_eq!(connections.lock().len(), 2);
        drop(first);
        assert_eq!(connections.lock().len(), 1, "a closed connection is no longer watched");
        drop(second);
        assert!(connections.lock().is_empty());
    }

    #[test]
    fn a_leading_hash_or_space_and_a_trailing_space_are_escaped_in_the_subject() {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "#x ");
        let value = value_of(params);
        assert!(value.ends_with(r#";Subject="CN=\\#x\\ ""#), "{value}");
    }
}
