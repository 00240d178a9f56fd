//! The inputs digest of an association: SHA-256 over everything checks 2 to 5 depend on.
//!
//! Two reads that give one association the same digest would reach the same verdict in checks 2 to 5, so a
//! caller that already serves the generation verified from these inputs need not decrypt again. The digest
//! covers the holder, the association entry, and the bytes of the grant file (through its cached hash: the file
//! holds the grant key, which is hashed, never stored), the certificate and the sealed key. Check 1 also depends
//! on the instant, which is why it is judged on every read whatever the digest.
//!
//! The encoding is unambiguous: a domain tag, then every field length-prefixed, every optional value tagged, so
//! that no two different inputs encode alike.

use aws_lc_rs::digest::{Context, SHA256};

use crate::custody::format::AssociationEntry;

/// Domain separation, versioned with the encoding.
const DOMAIN: &[u8] = b"sealgate/association-inputs/v1";

/// The hashes of the association's three files, `None` where a file was missing or could not be read.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct FileHashes {
    pub(super) grant: Option<[u8; 32]>,
    pub(super) certificate: Option<[u8; 32]>,
    pub(super) sealed_key: Option<[u8; 32]>,
}

/// The inputs digest of `entry` as judged by `grantee` with the given files.
pub(super) fn digest(grantee: &str, entry: &AssociationEntry, files: &FileHashes) -> [u8; 32] {
    let mut encoder = Encoder(Context::new(&SHA256));
    encoder.bytes(DOMAIN);
    encoder.bytes(grantee.as_bytes());
    encoder.bytes(entry.certificate_id.as_bytes());
    encoder.bytes(entry.grant_id.as_bytes());
    match &entry.server_names {
        None => encoder.tag(0),
        Some(names) => {
            encoder.tag(1);
            encoder.length(names.len());
            for name in names {
                encoder.bytes(name.as_bytes());
            }
        }
    }
    encoder.bytes(entry.wrapped_data_key.as_bytes());
    for hash in [files.grant, files.certificate, files.sealed_key] {
        match hash {
            None => encoder.tag(0),
            Some(hash) => {
                encoder.tag(1);
                encoder.0.update(&hash);
            }
        }
    }
    encoder.finish()
}

/// A SHA-256 context fed with length-prefixed fields.
struct Encoder(Context);

impl Encoder {
    fn tag(&mut self, tag: u8) {
        self.0.update(&[tag]);
    }

    fn length(&mut self, length: usize) {
        // usize is at most 64 bits on every platform Rust supports.
        self.0.update(&(length as u64).to_be_bytes());
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.length(bytes.len());
        self.0.update(bytes);
    }

    fn finish(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        // A SHA-256 digest is 32 bytes: the zip copies all of it.
        for (o, b) in out.iter_mut().zip(self.0.finish().as_ref()) {
            *o = *b;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(certificate_id: &str, grant_id: &str, names: Option<&[&str]>, wrapped: &str) -> AssociationEntry {
        AssociationEntry {
            certificate_id: certificate_id.to_owned(),
            grant_id: grant_id.to_owned(),
            server_names: names.map(|n| n.iter().map(|s| s.to_string()).collect()),
            wrapped_data_key: wrapped.to_owned(),
        }
    }

    #[test]
    fn every_input_counts_and_boundaries_are_unambiguous() {
        let files = FileHashes { grant: Some([1; 32]), certificate: Some([2; 32]), sealed_key: Some([3; 32]) };
        let base = digest("me", &entry("c-1", "g-1", Some(&["a.test"]), "w"), &files);
        assert_eq!(base, digest("me", &entry("c-1", "g-1", Some(&["a.test"]), "w"), &files));
        let others = [
            digest("me2", &entry("c-1", "g-1", Some(&["a.test"]), "w"), &files),
            // The same bytes, split differently between fields.
            digest("me", &entry("c-1g", "-1", Some(&["a.test"]), "w"), &files),
            digest("me", &entry("c-1", "g-1", Some(&["a.", "test"]), "w"), &files),
            digest("me", &entry("c-1", "g-1", Some(&[]), "w"), &files),
            digest("me", &entry("c-1", "g-1", None, "w"), &files),
            digest("me", &entry("c-1", "g-1", Some(&["a.test"]), "x"), &files),
            digest("me", &entry("c-1", "g-1", Some(&["a.test"]), "w"), &FileHashes { grant: None, ..files }),
            digest("me", &entry("c-1", "g-1", Some(&["a.test"]), "w"), &FileHashes { certificate: None, ..files }),
            digest("me", &entry("c-1", "g-1", Some(&["a.test"]), "w"), &FileHashes { sealed_key: None, ..files }),
            digest(
                "me",
                &entry("c-1", "g-1", Some(&["a.test"]), "w"),
                &FileHashes { certificate: Some([3; 32]), sealed_key: Some([2; 32]), ..files },
            ),
        ];
        for (index, other) in others.iter().enumerate() {
            assert_ne!(base, *other, "{index}");
        }
    }
}
