//! The connection pool of a route: a hyper-util client speaking HTTP/1.1 to `http` and `https` upstreams.
//!
//! TLS to upstreams is rustls with the aws-lc-rs provider (as on the client side), through `hyper-rustls`'
//! connector: the connector the rustls project maintains for hyper, which does the SNI and verification wiring
//! that would otherwise be copied here. Certificates are verified against the route's `ca` file only: no
//! system roots are loaded behind the user's back, and verification cannot be turned off. The server name
//! (SNI, and the name the certificate must carry) is the upstream URL's host; an IP address is checked against
//! the certificate's IP addresses and sent without SNI, as RFC 6066 requires. ALPN offers `http/1.1` only.
//!
//! Each route has its own pool, since each route has its own trust: two routes to the same upstream do not
//! share connections.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::proxy::limits::RequestBody as ClientBody;
use bytes::Bytes;
use http::Request;
use http_body_util::{Either, Empty};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::ClientConfig;

use crate::config::ProxyConfig;

/// The body of a request sent upstream: the client's, streamed, or none (a bodiless request, which can be sent
/// again on a retry).
pub type UpstreamBody = Either<ClientBody, Empty<Bytes>>;

/// Why a route's pool could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The CA file cannot be read.
    #[error("cannot read the upstream CA file {}: {source}", path.display())]
    ReadCa {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The CA file holds no usable certificate.
    #[error("the upstream CA file {} holds no PEM certificate", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A certificate of the CA file is not a usable trust anchor.
    #[error("the upstream CA file {} holds an invalid certificate: {reason}", path.display())]
    InvalidCertificate {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the client configuration.
    #[error("cannot build the upstream TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// A route's pooled client.
#[derive(Debug, Clone)]
pub struct Pool {
    client: Client<HttpsConnector<HttpConnector>, UpstreamBody>,
}

impl Pool {
    /// A pool with the `[proxy]` settings, trusting the CAs in `ca` for `https` upstreams (none without it:
    /// the configuration refuses `https` upstreams without a `ca`).
    pub fn new(config: &ProxyConfig, ca: Option<&Path>) -> Result<Self, PoolError> {
        let mut roots = rustls::RootCertStore::empty();
        if let Some(path) = ca {
            load_roots(path, &mut roots)?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];

        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        // The https connector below passes `http://` URIs to this one and wraps `https://` ones in TLS.
        http.enforce_http(false);
        let connector = HttpsConnector::from((http, tls));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .build(connector);
        Ok(Self { client })
    }

    /// Sends `request`, whose URI is absolute (`scheme://authority/path`).
    pub fn request(&self, request: Request<UpstreamBody>) -> ResponseFuture {
        self.client.request(request)
    }
}

fn load_roots(path: &Path, roots: &mut rustls::RootCertStore) -> Result<(), PoolError> {
    let pem = std::fs::read(path).map_err(|source| PoolError::ReadCa { path: path.to_owned(), source })?;
    let mut found = false;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| PoolError::InvalidCertificate { path: path.to_owned(), reason: e.to_string() })?;
        roots.add(cert).map_err(|e| PoolError::InvalidCertificate { path: path.to_owned(), reason: e.to_string() })?;
        found = true;
    }
    if found {
        Ok(())
    } else {
        Err(PoolError::NoCertificate { path: path.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy_config() -> ProxyConfig {
        ProxyConfig {
            connect_timeout: std::time::Duration::from_secs(1),
            response_timeout: std::time::Duration::from_secs(1),
            pool_idle_timeout: std::time::Duration::from_secs(1),
            pool_max_idle_per_host: 1,
            preserve_host: true,
        }
    }

    #[test]
    fn ca_files_that_trust_nothing_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        assert!(matches!(Pool::new(&proxy_config(), Some(&missing)), Err(PoolError::ReadCa { .. })));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        assert!(matches!(Pool::new(&proxy_config(), Some(&empty)), Err(PoolError::NoCertificate { .. })));
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        assert!(matches!(Pool::new(&proxy_config(), Some(&garbage)), Err(PoolError::InvalidCertificate { .. })));
    }

    #[test]
    fn a_ca_file_with_certificates_builds() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca.self_signed(&key).unwrap().pem()).unwrap();
        assert!(Pool::new(&proxy_config(), Some(&path)).is_ok());
        assert!(Pool::new(&proxy_config(), None).is_ok());
    }
}
