//! A small PEM reader and writer (RFC 7468).
//!
//! It exists so that private keys never pass through a buffer that is not wiped: the general-purpose PEM
//! decoders keep the base64 text and the decoded bytes of every block in plain `Vec`s, including the private key
//! blocks of a file read for its certificates. Here, blocks are located by borrowing the input, and only the
//! blocks asked for are decoded, private keys into [`SecretBytes`].

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use zeroize::Zeroizing;

use crate::secret::SecretBytes;

/// One `-----BEGIN <label>-----` ... `-----END <label>-----` block, borrowed from the input.
#[derive(Debug)]
pub(super) struct Block<'a> {
    /// The label, e.g. `CERTIFICATE` or `PRIVATE KEY`.
    pub label: &'a str,
    /// Whether the block has RFC 1421 headers (`Proc-Type: 4,ENCRYPTED`): a legacy encrypted key.
    pub has_headers: bool,
    /// The base64 lines.
    lines: Vec<&'a str>,
}

/// Splits PEM text into its blocks. Text outside blocks (OpenSSL's "Bag Attributes", comments) is ignored.
pub(super) fn blocks(text: &str) -> Result<Vec<Block<'_>>, String> {
    let mut blocks = Vec::new();
    let mut current: Option<Block<'_>> = None;
    for (number, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
        if let Some(label) = line.strip_prefix("-----BEGIN ").and_then(|l| l.strip_suffix("-----")) {
            if current.is_some() {
                return Err(format!("line {number}: a BEGIN line inside a block"));
            }
            current = Some(Block { label, has_headers: false, lines: Vec::new() });
        } else if let Some(label) = line.strip_prefix("-----END ").and_then(|l| l.strip_suffix("-----")) {
            match current.take() {
                Some(block) if block.label == label => blocks.push(block),
                Some(block) => return Err(format!("line {number}: END {label} closes BEGIN {}", block.label)),
                None => return Err(format!("line {number}: an END line outside a block")),
            }
        } else if let Some(block) = current.as_mut() {
            if line.contains(':') {
                block.has_headers = true;
            } else if !line.is_empty() {
                block.lines.push(line);
            }
        }
    }
    match current {
        Some(block) => Err(format!("the {} block has no END line", block.label)),
        None => Ok(blocks),
    }
}

impl Block<'_> {
    fn base64_len(&self) -> usize {
        self.lines.iter().map(|l| l.len()).sum()
    }

    /// Decodes a block of public data.
    pub fn decode(&self) -> Result<Vec<u8>, String> {
        let text: String = self.lines.concat();
        BASE64.decode(text).map_err(|_| format!("the {} block is not valid base64", self.label))
    }

    /// Decodes a block that holds a secret. The base64 text and the bytes live only in wiped buffers allocated
    /// at their final size, and the error never quotes the block.
    pub fn decode_secret(&self) -> Result<SecretBytes, String> {
        let mut text = Zeroizing::new(String::with_capacity(self.base64_len()));
        for line in &self.lines {
            text.push_str(line);
        }
        let mut bytes = Zeroizing::new(vec![0u8; text.len() / 4 * 3 + 3]);
        let len = BASE64
            .decode_slice(text.as_bytes(), &mut bytes[..])
            .map_err(|_| format!("the {} block is not valid base64", self.label))?;
        let mut secret = SecretBytes::with_capacity(len);
        secret.buffer_mut().extend_from_slice(&bytes[..len]);
        Ok(secret)
    }
}

/// Encodes DER as a PEM block with 64-character lines.
pub(super) fn encode(label: &str, der: &[u8]) -> String {
    let text = BASE64.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    // Base64 output is ASCII, so every 64-byte chunk is valid UTF-8.
    for chunk in text.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(chunk));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_surrounding_text() {
        let der: Vec<u8> = (0..=200).collect();
        let pem = encode("CERTIFICATE", &der);
        assert!(pem.lines().all(|l| l.len() <= 64));
        let text = format!("Bag Attributes\n    localKeyID: 01\n{pem}\r\n{}", encode("PRIVATE KEY", &[1, 2, 3]));
        let blocks = blocks(&text).unwrap();
        assert_eq!(blocks.len(), 2);
        assert_eq!((blocks[0].label, blocks[0].decode().unwrap()), ("CERTIFICATE", der));
        assert_eq!(blocks[1].decode_secret().unwrap().expose(), [1, 2, 3]);
        assert!(!blocks[1].has_headers);
    }

    #[test]
    fn malformed_blocks_are_refused() {
        assert!(blocks("-----BEGIN A-----\nAAAA\n").unwrap_err().contains("no END"));
        assert!(blocks("-----BEGIN A-----\n-----END B-----\n").unwrap_err().contains("closes"));
        assert!(blocks("-----END A-----\n").unwrap_err().contains("outside"));
        let bad = blocks("-----BEGIN K-----\nsecret!!\n-----END K-----\n").unwrap();
        let err = bad[0].decode_secret().unwrap_err();
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn legacy_encryption_headers_are_noticed() {
        let text = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nAAAA\n\
                    -----END RSA PRIVATE KEY-----\n";
        assert!(blocks(text).unwrap()[0].has_headers);
    }
}
