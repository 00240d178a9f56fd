//! Builders shared by unit tests: verified certificates and snapshots without an export on disk.

use std::path::PathBuf;

use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::custody::snapshot::{AssociationOutcome, GrantStatus, Snapshot, Verdict, VerifiedCertificate};
use crate::secret::SecretBytes;

/// A self-signed ECDSA certificate for `names`, verified as if read from an export, valid from now.
pub fn verified(certificate_id: &str, grant_id: &str, names: &[&str]) -> VerifiedCertificate {
    verified_from(certificate_id, grant_id, names, OffsetDateTime::now_utc())
}

/// As [`verified`], with the validity starting at `not_before`.
pub fn verified_from(
    certificate_id: &str,
    grant_id: &str,
    names: &[&str],
    not_before: OffsetDateTime,
) -> VerifiedCertificate {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.not_before = not_before;
    params.not_after = not_before + time::Duration::days(1);
    let cert = params.self_signed(&key).unwrap();
    let der = key.serialize_der();
    let signing_key =
        rustls::crypto::aws_lc_rs::sign::any_supported_type(&PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(&der[..])))
            .unwrap();
    let leaf = cert.der().clone();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &leaf);
    VerifiedCertificate {
        certificate_id: certificate_id.to_owned(),
        grant_id: grant_id.to_owned(),
        grant_not_after: None,
        server_names: names.iter().map(|n| n.to_string()).collect(),
        chain: vec![leaf],
        leaf_sha256: digest.as_ref().try_into().unwrap(),
        not_before,
        not_after: not_before + time::Duration::days(1),
        signing_key,
        private_key: SecretBytes::new(der),
    }
}

/// An active grant for "me".
pub fn active() -> GrantStatus {
    GrantStatus::Active { grantee: "me".to_owned(), not_after: None }
}

/// A snapshot read now.
pub fn snapshot(grants: &[(&str, GrantStatus)], associations: Vec<AssociationOutcome>) -> Snapshot {
    Snapshot {
        export: PathBuf::from("export"),
        read_at: OffsetDateTime::now_utc(),
        grants: grants.iter().map(|(id, s)| (id.to_string(), s.clone())).collect(),
        associations,
        scope: crate::custody::snapshot::Scope::Complete,
    }
}

/// A served outcome, whose inputs digest is the leaf's hash (distinct for every [`verified`] certificate).
pub fn served(v: VerifiedCertificate) -> AssociationOutcome {
    let inputs = v.leaf_sha256;
    served_from(v, inputs)
}

/// A served outcome with the given inputs digest.
pub fn served_from(v: VerifiedCertificate, inputs: [u8; 32]) -> AssociationOutcome {
    AssociationOutcome {
        certificate_id: v.certificate_id.clone(),
        grant_id: v.grant_id.clone(),
        server_names: v.server_names.clone(),
        certificate_not_after: Some(v.not_after),
        inputs,
        result: Verdict::Served(v),
    }
}

/// An outcome the reader found unchanged, with the given inputs digest.
pub fn unchanged(certificate_id: &str, grant_id: &str, inputs: [u8; 32]) -> AssociationOutcome {
    AssociationOutcome {
        certificate_id: certificate_id.to_owned(),
        grant_id: grant_id.to_owned(),
        server_names: Vec::new(),
        certificate_not_after: None,
        inputs,
        result: Verdict::Unchanged,
    }
}
