//! The files of the custody export, format v1: parsing and rendering (`../shared/custody/FORMAT.md`).
//!
//! This module knows the syntax of each file and nothing of what the files mean together; the holder's checks
//! live in [`super::snapshot`]. Parsing is strict about what the format fixes (the `format` tags, id syntax,
//! base64 and lengths) and lenient about fields it does not know, so that a newer writer's additions do not stop
//! an older reader.
//!
//! Errors never quote file contents: TOML errors are reduced to their message and position, and the one secret
//! a file can hold (a grant's `grant_key`) is decoded straight into a wiped buffer by its own deserializer, so
//! neither the key nor its base64 text can reach an error.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use toml::value::Datetime;
use zeroize::{Zeroize, Zeroizing};

use crate::secret::{SecretKey32, KEY_LEN};

/// `format` of a grant file.
pub const GRANT_FORMAT: &str = "custody-grant/v1";
/// `format` of a sealed private key file.
pub const SEALED_KEY_FORMAT: &str = "custody-sealed-key/v1";
/// `format` of `associations.toml`.
pub const ASSOCIATIONS_FORMAT: &str = "custody-associations/v1";
/// The only sealing algorithm of format v1.
pub const SEALING_ALGORITHM: &str = "AES-256-GCM-SIV";
/// The operation a grant must allow for its holder to decrypt.
pub const DECRYPT_OPERATION: &str = "Decrypt";

/// Length of an AES-GCM-SIV nonce.
pub const NONCE_LEN: usize = 12;
/// Length of an AES-GCM-SIV tag.
pub const TAG_LEN: usize = 16;
/// Length of a `wrapped_data_key`: nonce, the sealed 32-byte data key, tag.
pub const WRAPPED_DATA_KEY_LEN: usize = NONCE_LEN + KEY_LEN + TAG_LEN;

/// File and directory names inside an export.
pub mod layout {
    /// The associations file at the export's root.
    pub const ASSOCIATIONS: &str = "associations.toml";
    /// The directory of grant files, `<grant_id>.toml`.
    pub const GRANTS_DIR: &str = "grants";
    /// The directory of certificate directories, one per certificate id.
    pub const CERTIFICATES_DIR: &str = "certificates";
    /// The certificate chain inside a certificate directory.
    pub const CERTIFICATE_PEM: &str = "certificate.pem";
    /// The sealed private key inside a certificate directory.
    pub const SEALED_KEY: &str = "private-key.sealed";
    /// Extension of grant files.
    pub const GRANT_EXTENSION: &str = "toml";
}

/// Why a custody file could not be read. Messages name the field and the rule, never a value that could be
/// secret; the caller adds the file's path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The file is not valid UTF-8 TOML of the expected shape.
    #[error("line {line}, column {column}: {message}")]
    Toml {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// The parser's message (no file contents).
        message: String,
    },
    /// The file is not UTF-8.
    #[error("the file is not UTF-8")]
    NotUtf8,
    /// The `format` field holds another format (or another version).
    #[error("`format` is {}, expected {expected:?}", describe_format(found.as_deref()))]
    WrongFormat {
        /// What this reader understands.
        expected: &'static str,
        /// What the file says, when it is a format tag (`custody-…/v…`); any other text is not repeated, as it
        /// could be anything, a misplaced key included.
        found: Option<String>,
    },
    /// A field breaks a rule of the format.
    #[error("`{field}`: {reason}")]
    Field {
        /// The field's name.
        field: &'static str,
        /// The rule it breaks.
        reason: String,
    },
}

impl FormatError {
    fn field(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Field { field, reason: reason.into() }
    }

    /// Converts a TOML error into a message with a position and without the file's text (the default
    /// rendering of a TOML error quotes the offending line, which may hold a secret; serde's own messages quote
    /// the value they refuse, which [`redact_value`] removes).
    pub fn from_toml(text: &str, error: &toml::de::Error) -> Self {
        let (line, column) = match error.span() {
            Some(span) => line_and_column(text, span.start),
            None => (1, 1),
        };
        Self::Toml { line, column, message: redact_value(error.message().trim_end()) }
    }
}

/// What a wrong `format` is said to be: the tag, quoted, or no more than that it is not one.
fn describe_format(found: Option<&str>) -> String {
    found.map_or_else(|| "not a custody format tag".to_owned(), |tag| format!("{tag:?}"))
}

/// Removes the refused value from serde's messages, keeping its kind and what was expected:
/// `invalid type: string "…", expected a TOML datetime` becomes `invalid type: string, expected a TOML datetime`
/// and ``unknown variant `…`, expected `active` or `retired` `` becomes
/// ``unknown variant, expected `active` or `retired` ``. A value in the wrong field (a grant key swapped with
/// `created` or `state`) would otherwise reach the error, and from there a log. Other messages (TOML syntax
/// errors, which never quote the text, and serde's messages that name fields) are kept as they are.
pub fn redact_value(message: &str) -> String {
    // What follows the value. The value comes first and may itself contain these words, so the last one counts;
    // what serde appends (the expected type or variant names) never contains them.
    fn tail(rest: &str) -> &str {
        [", expected ", ", there are no "].iter().filter_map(|sep| rest.rfind(sep)).max().map_or("", |at| &rest[at..])
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            let tail = tail(rest);
            // `string "…"`, ``integer `5` ``, `sequence`: the kind is what precedes any quote.
            let unexpected = &rest[..rest.len() - tail.len()];
            let kind = unexpected.split(['"', '`', '\'']).next().unwrap_or_default().trim_end();
            return format!("{prefix}{kind}{tail}");
        }
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        return format!("unknown variant{}", tail(rest));
    }
    message.to_owned()
}

/// 1-based line and column of byte `offset` in `text`.
pub fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.as_bytes().get(..offset).unwrap_or_default();
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    let column = String::from_utf8_lossy(&before[line_start..]).chars().count() + 1;
    (line, column)
}

/// Whether `id` is a valid grant or certificate id: `[A-Za-z0-9_-]{1,128}`.
pub fn is_valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn check_id(field: &'static str, id: &str) -> Result<(), FormatError> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(FormatError::field(field, "must match [A-Za-z0-9_-]{1,128}"))
    }
}

fn check_format(expected: &'static str, found: &str) -> Result<(), FormatError> {
    if found == expected {
        return Ok(());
    }
    // A tag of this format family (another version, another file's format) is worth repeating; '-' is outside
    // standard base64 and a key in hex has no '-', so no key can look like one.
    let is_tag = found.starts_with("custody-")
        && found.len() <= 64
        && found.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-/._".contains(&b));
    Err(FormatError::WrongFormat { expected, found: is_tag.then(|| found.to_owned()) })
}

/// Decodes standard, padded base64 (RFC 4648 section 4).
pub fn decode_base64(field: &'static str, text: &str) -> Result<Vec<u8>, FormatError> {
    BASE64.decode(text.trim()).map_err(|_| FormatError::field(field, "is not standard padded base64"))
}

/// Encodes bytes as standard, padded base64.
pub fn encode_base64(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

/// Converts a TOML date-time that must carry an offset into an instant.
pub fn offset_datetime(field: &'static str, value: &Datetime) -> Result<OffsetDateTime, FormatError> {
    if value.date.is_none() || value.time.is_none() || value.offset.is_none() {
        return Err(FormatError::field(field, "must be an offset date-time (e.g. 2026-11-28T10:00:00Z)"));
    }
    OffsetDateTime::parse(&value.to_string(), &Rfc3339)
        .map_err(|e| FormatError::field(field, format!("is not a valid date-time: {e}")))
}

/// Converts an instant into a TOML offset date-time (UTC, whole seconds unless it has a fraction). RFC 3339
/// (and TOML) only spell years 0000 to 9999: instants outside are clamped to that range.
pub fn toml_datetime(instant: OffsetDateTime) -> Datetime {
    let utc = instant.to_offset(time::UtcOffset::UTC);
    let clamped = utc.clamp(
        time::macros::datetime!(0000-01-01 00:00:00 UTC),
        time::macros::datetime!(9999-12-31 23:59:59.999_999_999 UTC),
    );
    let value = clamped.format(&Rfc3339).ok().and_then(|text| Datetime::from_str(&text).ok());
    // Every instant in 0000..=9999 formats as RFC 3339, which TOML accepts; the fallback is unreachable.
    value.unwrap_or(Datetime { date: None, time: None, offset: None })
}

fn parse_toml<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, FormatError> {
    toml::from_str(text).map_err(|e| FormatError::from_toml(text, &e))
}

fn utf8(bytes: &[u8]) -> Result<&str, FormatError> {
    std::str::from_utf8(bytes).map_err(|_| FormatError::NotUtf8)
}

// ---------------------------------------------------------------------------------------------------------------
// grants/<grant_id>.toml

/// The state a grant file declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantState {
    /// The grantee may decrypt (unless `not_after` has passed).
    Active,
    /// The grant has ended for good.
    Retired,
}

impl fmt::Display for GrantState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Active => "active",
            Self::Retired => "retired",
        })
    }
}

/// A parsed grant file.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The grant's id; equals the file's stem.
    pub grant_id: String,
    /// The KMS key the grant is on (opaque).
    pub key_id: String,
    /// Informational alias of the KMS key.
    pub key_alias: Option<String>,
    /// The principal the grant was issued to.
    pub grantee: String,
    /// Operations the grant allows.
    pub operations: Vec<String>,
    /// Declared state.
    pub state: GrantState,
    /// The key that unwraps data keys; present while active.
    pub grant_key: Option<SecretKey32>,
    /// The instant the grant lapses, with or without a further write.
    pub not_after: Option<OffsetDateTime>,
    /// Informational creation time.
    pub created: Option<OffsetDateTime>,
}

#[derive(Deserialize)]
struct GrantDocument<'a> {
    #[serde(borrow)]
    format: Cow<'a, str>,
    grant_id: String,
    key_id: String,
    key_alias: Option<String>,
    grantee: String,
    operations: Vec<String>,
    state: GrantState,
    #[serde(default, deserialize_with = "deserialize_grant_key")]
    grant_key: Option<SecretKey32>,
    not_after: Option<Datetime>,
    created: Option<Datetime>,
}

#[derive(Serialize)]
struct GrantDocumentOut<'a> {
    format: &'static str,
    grant_id: &'a str,
    key_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_alias: Option<&'a str>,
    grantee: &'a str,
    operations: &'a [String],
    state: GrantState,
    #[serde(skip_serializing_if = "Option::is_none")]
    grant_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    not_after: Option<Datetime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<Datetime>,
}

/// Decodes `grant_key` straight from the parser's string into a wiped buffer. Its errors never include the value
/// (serde's own type errors would quote it).
fn deserialize_grant_key<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<SecretKey32>, D::Error> {
    struct KeyVisitor;

    impl KeyVisitor {
        fn decode<E: serde::de::Error>(text: &str) -> Result<Option<SecretKey32>, E> {
            // Room for any text of up to 80 characters, so that a wrong length is reported as such.
            let mut buffer = Zeroizing::new([0u8; 64]);
            if text.len() > 80 {
                return Err(E::custom("`grant_key` must decode to exactly 32 bytes"));
            }
            match BASE64.decode_slice(text.trim(), &mut buffer[..]) {
                Ok(KEY_LEN) => Ok(SecretKey32::from_slice(&buffer[..KEY_LEN])),
                Ok(_) => Err(E::custom("`grant_key` must decode to exactly 32 bytes")),
                Err(_) => Err(E::custom("`grant_key` is not standard padded base64")),
            }
        }
    }

    impl<'de> serde::de::Visitor<'de> for KeyVisitor {
        type Value = Option<SecretKey32>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a base64 string")
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
            Self::decode(text)
        }

        fn visit_string<E: serde::de::Error>(self, mut text: String) -> Result<Self::Value, E> {
            let result = Self::decode(&text);
            text.zeroize();
            result
        }

        fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
            deserializer.deserialize_str(self)
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        // Any other type: refuse without echoing the value.
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Err(E::custom("`grant_key` must be a base64 string"))
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Err(E::custom("`grant_key` must be a base64 string"))
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Err(E::custom("`grant_key` must be a base64 string"))
        }
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Err(E::custom("`grant_key` must be a base64 string"))
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(serde::de::Error::custom("`grant_key` must be a base64 string"))
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(serde::de::Error::custom("`grant_key` must be a base64 string"))
        }
    }

    deserializer.deserialize_option(KeyVisitor)
}

impl Grant {
    /// Parses a grant file whose stem is `file_id`.
    pub fn parse(bytes: &[u8], file_id: &str) -> Result<Self, FormatError> {
        let text = utf8(bytes)?;
        let doc: GrantDocument<'_> = parse_toml(text)?;
        check_format(GRANT_FORMAT, &doc.format)?;
        check_id("grant_id", &doc.grant_id)?;
        if doc.grant_id != file_id {
            return Err(FormatError::field("grant_id", "differs from the file's name"));
        }
        if doc.key_id.is_empty() {
            return Err(FormatError::field("key_id", "is empty"));
        }
        let not_after = doc.not_after.as_ref().map(|d| offset_datetime("not_after", d)).transpose()?;
        let created = doc.created.as_ref().map(|d| offset_datetime("created", d)).transpose()?;
        Ok(Self {
            grant_id: doc.grant_id,
            key_id: doc.key_id,
            key_alias: doc.key_alias,
            grantee: doc.grantee,
            operations: doc.operations,
            state: doc.state,
            grant_key: doc.grant_key,
            not_after,
            created,
        })
    }

    /// Renders the grant as a file. The text holds the grant key while the grant is active, so it is returned
    /// in a buffer that is wiped on drop.
    pub fn render(&self) -> Zeroizing<String> {
        let grant_key = self.grant_key.as_ref().map(|k| Zeroizing::new(encode_base64(k.expose())));
        let doc = GrantDocumentOut {
            format: GRANT_FORMAT,
            grant_id: &self.grant_id,
            key_id: &self.key_id,
            key_alias: self.key_alias.as_deref(),
            grantee: &self.grantee,
            operations: &self.operations,
            state: self.state,
            grant_key: grant_key.as_ref().map(|k| k.as_str()),
            not_after: self.not_after.map(toml_datetime),
            created: self.created.map(toml_datetime),
        };
        Zeroizing::new(toml::to_string(&doc).expect("a grant document always serializes to TOML"))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// certificates/<certificate_id>/private-key.sealed

/// A parsed sealed private key file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedKey {
    /// Equals the directory's name.
    pub certificate_id: String,
    /// The KMS key under which the data key was generated.
    pub key_id: String,
    /// The AES-GCM-SIV nonce.
    pub nonce: [u8; NONCE_LEN],
    /// The sealed PKCS#8 DER followed by the 16-byte tag.
    pub ciphertext: Vec<u8>,
}

#[derive(Deserialize)]
struct SealedKeyDocument<'a> {
    #[serde(borrow)]
    format: Cow<'a, str>,
    certificate_id: String,
    key_id: String,
    #[serde(borrow)]
    algorithm: Cow<'a, str>,
    #[serde(borrow)]
    nonce: Cow<'a, str>,
    #[serde(borrow)]
    ciphertext: Cow<'a, str>,
}

#[derive(Serialize)]
struct SealedKeyDocumentOut<'a> {
    format: &'static str,
    certificate_id: &'a str,
    key_id: &'a str,
    algorithm: &'static str,
    nonce: String,
    ciphertext: String,
}

impl SealedKey {
    /// Parses a sealed key file found in the certificate directory `directory_id`.
    pub fn parse(bytes: &[u8], directory_id: &str) -> Result<Self, FormatError> {
        let text = utf8(bytes)?;
        let doc: SealedKeyDocument<'_> = parse_toml(text)?;
        check_format(SEALED_KEY_FORMAT, &doc.format)?;
        check_id("certificate_id", &doc.certificate_id)?;
        if doc.certificate_id != directory_id {
            return Err(FormatError::field("certificate_id", "differs from the certificate directory's name"));
        }
        if doc.key_id.is_empty() {
            return Err(FormatError::field("key_id", "is empty"));
        }
        if doc.algorithm != SEALING_ALGORITHM {
            return Err(FormatError::field("algorithm", format!("must be {SEALING_ALGORITHM:?}")));
        }
        let nonce: [u8; NONCE_LEN] = decode_base64("nonce", &doc.nonce)?
            .try_into()
            .map_err(|_| FormatError::field("nonce", format!("must decode to {NONCE_LEN} bytes")))?;
        let ciphertext = decode_base64("ciphertext", &doc.ciphertext)?;
        if ciphertext.len() < TAG_LEN {
            return Err(FormatError::field("ciphertext", format!("is shorter than the {TAG_LEN}-byte tag")));
        }
        Ok(Self { certificate_id: doc.certificate_id, key_id: doc.key_id, nonce, ciphertext })
    }

    /// Renders the sealed key as a file.
    pub fn render(&self) -> String {
        let doc = SealedKeyDocumentOut {
            format: SEALED_KEY_FORMAT,
            certificate_id: &self.certificate_id,
            key_id: &self.key_id,
            algorithm: SEALING_ALGORITHM,
            nonce: encode_base64(&self.nonce),
            ciphertext: encode_base64(&self.ciphertext),
        };
        toml::to_string(&doc).expect("a sealed key document always serializes to TOML")
    }
}

// ---------------------------------------------------------------------------------------------------------------
// associations.toml

/// One `[[association]]` entry, as written. Its fields are checked one association at a time (see
/// [`AssociationEntry::wrapped_data_key`]), so that one bad entry refuses that association alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssociationEntry {
    /// The associated certificate.
    pub certificate_id: String,
    /// The grant that lets the holder decrypt its key.
    pub grant_id: String,
    /// Names to serve; defaults to the leaf certificate's DNS names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_names: Option<Vec<String>>,
    /// Base64 of nonce || sealed data key || tag.
    pub wrapped_data_key: String,
}

impl AssociationEntry {
    /// Whether both ids are syntactically valid.
    pub fn ids_are_valid(&self) -> bool {
        is_valid_id(&self.certificate_id) && is_valid_id(&self.grant_id)
    }

    /// Parses the body of one `[[association]]` table (the lines after its header), as [`Associations::parse`]
    /// parses each entry of the document.
    pub fn parse_table(text: &str) -> Result<Self, FormatError> {
        parse_toml(text)
    }

    /// Decodes `wrapped_data_key`, checking its length.
    pub fn wrapped_data_key(&self) -> Result<[u8; WRAPPED_DATA_KEY_LEN], FormatError> {
        decode_base64("wrapped_data_key", &self.wrapped_data_key)?
            .try_into()
            .map_err(|_| FormatError::field("wrapped_data_key", format!("must decode to {WRAPPED_DATA_KEY_LEN} bytes")))
    }
}

/// The parsed `associations.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Associations {
    /// Entries in file order.
    pub entries: Vec<AssociationEntry>,
}

#[derive(Deserialize)]
struct AssociationsDocument<'a> {
    #[serde(borrow)]
    format: Cow<'a, str>,
    #[serde(default)]
    association: Vec<AssociationEntry>,
}

#[derive(Serialize)]
struct AssociationsDocumentOut<'a> {
    format: &'static str,
    association: &'a [AssociationEntry],
}

impl Associations {
    /// Parses `associations.toml`.
    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        let text = utf8(bytes)?;
        let doc: AssociationsDocument<'_> = parse_toml(text)?;
        check_format(ASSOCIATIONS_FORMAT, &doc.format)?;
        Ok(Self { entries: doc.association })
    }

    /// Parses the preamble of `associations.toml` (what precedes its first `[[association]]`), checking what
    /// [`Associations::parse`] checks of the document itself: the format tag. For readers that parse the
    /// entries one by one, which must then parse the whole file instead when this fails: it also fails when
    /// the preamble has an `association` key of its own, however spelt.
    pub fn parse_preamble(text: &str) -> Result<(), FormatError> {
        #[derive(Deserialize)]
        struct Preamble<'a> {
            #[serde(borrow)]
            format: Cow<'a, str>,
            #[serde(default)]
            association: Option<serde::de::IgnoredAny>,
        }
        let preamble: Preamble<'_> = parse_toml(text)?;
        if preamble.association.is_some() {
            return Err(FormatError::field("association", "is defined before the first [[association]]"));
        }
        check_format(ASSOCIATIONS_FORMAT, &preamble.format)
    }

    /// Renders the file.
    pub fn render(&self) -> String {
        let doc = AssociationsDocumentOut { format: ASSOCIATIONS_FORMAT, association: &self.entries };
        toml::to_string(&doc).expect("an associations document always serializes to TOML")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_B64: &str = "cbVNw9SJSy7W+8BlsXdyoXJmhiXJ5+bIPGhd9FOv+gM=";

    fn grant_text(extra: &str) -> String {
        format!(
            "format = \"custody-grant/v1\"\ngrant_id = \"g-1\"\nkey_id = \"k\"\ngrantee = \"me\"\n\
             operations = [\"Decrypt\"]\nstate = \"active\"\n{extra}"
        )
    }

    #[test]
    fn grant_round_trips() {
        let text = grant_text(&format!("grant_key = \"{KEY_B64}\"\nnot_after = 2030-01-02T03:04:05Z\n"));
        let grant = Grant::parse(text.as_bytes(), "g-1").unwrap();
        assert_eq!(grant.state, GrantState::Active);
        assert_eq!(encode_base64(grant.grant_key.as_ref().unwrap().expose()), KEY_B64);
        assert_eq!(grant.not_after.unwrap().unix_timestamp(), 1_893_553_445);
        let again = Grant::parse(grant.render().as_bytes(), "g-1").unwrap();
        assert_eq!(again.grant_key.unwrap().expose(), grant.grant_key.unwrap().expose());
        assert_eq!(again.not_after, grant.not_after);
    }

    #[test]
    fn grant_errors_never_quote_the_key() {
        // A key one byte short, a key of the wrong type, a syntax error on the key's line.
        let short = "cbVNw9SJSy7W+8BlsXdyoXJmhiXJ5+bIPGhd9FOv+g==";
        for extra in [
            format!("grant_key = \"{short}\"\n"),
            "grant_key = 123456789\n".to_owned(),
            format!("grant_key = \"{KEY_B64}\" oops\n"),
            format!("grant_key = [\"{KEY_B64}\"]\n"),
        ] {
            let err = Grant::parse(grant_text(&extra).as_bytes(), "g-1").unwrap_err().to_string();
            assert!(!err.contains("cbVN") && !err.contains("123456789"), "{err}");
            assert!(err.contains("grant_key") || err.contains("line 7"), "{err}");
        }
    }

    #[test]
    fn grant_file_name_must_match() {
        let err = Grant::parse(grant_text("").as_bytes(), "g-2").unwrap_err();
        assert!(err.to_string().contains("grant_id"), "{err}");
    }

    #[test]
    fn local_datetimes_are_refused() {
        let err = Grant::parse(grant_text("not_after = 2030-01-02T03:04:05\n").as_bytes(), "g-1").unwrap_err();
        assert!(err.to_string().contains("offset date-time"), "{err}");
    }

    #[test]
    fn wrong_format_is_named() {
        let text = grant_text("").replace("custody-grant/v1", "custody-grant/v2");
        let err = Grant::parse(text.as_bytes(), "g-1").unwrap_err();
        assert_eq!(
            err,
            FormatError::WrongFormat { expected: GRANT_FORMAT, found: Some("custody-grant/v2".to_owned()) }
        );
        assert_eq!(err.to_string(), "`format` is \"custody-grant/v2\", expected \"custody-grant/v1\"");
    }

    /// Regression (found while writing `fuzz/` and `tests/properties.rs`): serde's messages quote the value they
    /// refuse, so a grant key swapped with `created` (or written into `state` or `operations`) reached the error,
    /// and from there the grant's refusal, `sealgate check` and the audit log.
    #[test]
    fn a_key_in_the_wrong_field_is_not_quoted() {
        for (text, expected) in [
            (grant_text(&format!("created = \"{KEY_B64}\"\n")), "invalid type: string, expected a TOML datetime"),
            (
                grant_text("").replace("state = \"active\"", &format!("state = \"{KEY_B64}\"")),
                "unknown variant, expected `active` or `retired`",
            ),
            (
                grant_text("").replace("operations = [\"Decrypt\"]", &format!("operations = \"{KEY_B64}\"")),
                "invalid type: string, expected a sequence",
            ),
        ] {
            let err = Grant::parse(text.as_bytes(), "g-1").unwrap_err().to_string();
            assert!(!err.contains("cbVN"), "{err}");
            assert!(err.ends_with(expected), "{err}");
        }
        // A key in `format` (beside a valid `grant_key`) is not repeated either.
        let text = grant_text(&format!("grant_key = \"{KEY_B64}\"\n"))
            .replace("format = \"custody-grant/v1\"", &format!("format = \"{KEY_B64}\""));
        let err = Grant::parse(text.as_bytes(), "g-1").unwrap_err();
        assert_eq!(err, FormatError::WrongFormat { expected: GRANT_FORMAT, found: None });
        assert_eq!(err.to_string(), "`format` is not a custody format tag, expected \"custody-grant/v1\"");
    }

    #[test]
    fn redaction_keeps_the_kind_and_the_expectation() {
        for (message, redacted) in [
            (
                "invalid type: string \"a, expected b\", expected a sequence",
                "invalid type: string, expected a sequence",
            ),
            ("invalid type: integer `5`, expected a string", "invalid type: integer, expected a string"),
            ("invalid type: sequence, expected a string", "invalid type: sequence, expected a string"),
            ("invalid value: string \"x\"", "invalid value: string"),
            ("unknown variant `x`, expected `active` or `retired`", "unknown variant, expected `active` or `retired`"),
            ("unknown variant `x`, there are no variants", "unknown variant, there are no variants"),
            ("unknown variant `x` oops", "unknown variant"),
            ("missing field `grant_id`", "missing field `grant_id`"),
            ("duplicate key", "duplicate key"),
        ] {
            assert_eq!(redact_value(message), redacted);
        }
    }

    #[test]
    fn toml_errors_have_positions() {
        let err = Associations::parse(b"format = \"custody-associations/v1\"\n[[association]\n").unwrap_err();
        match err {
            FormatError::Toml { line, .. } => assert_eq!(line, 2),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sealed_key_checks_lengths() {
        let text = "format = \"custody-sealed-key/v1\"\ncertificate_id = \"c\"\nkey_id = \"k\"\n\
                    algorithm = \"AES-256-GCM-SIV\"\nnonce = \"AAAA\"\nciphertext = \"AAAAAAAAAAAAAAAAAAAAAA==\"\n";
        let err = SealedKey::parse(text.as_bytes(), "c").unwrap_err();
        assert!(err.to_string().contains("nonce"), "{err}");
    }

    #[test]
    fn datetimes_outside_rfc3339_are_clamped() {
        let before_year_zero = time::macros::datetime!(-0001-06-01 00:00:00 UTC);
        assert_eq!(toml_datetime(before_year_zero).to_string(), "0000-01-01T00:00:00Z");
        let instant = time::macros::datetime!(2030-01-02 03:04:05 UTC);
        assert_eq!(toml_datetime(instant).to_string(), "2030-01-02T03:04:05Z");
    }

    #[test]
    fn ids() {
        assert!(is_valid_id("c-2f1e9a_X"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("../etc"));
        assert!(!is_valid_id(&"a".repeat(129)));
    }

    #[test]
    fn line_and_column_counts_characters() {
        assert_eq!(line_and_column("ab\ncdé f", 8), (2, 5));
        assert_eq!(line_and_column("x", 0), (1, 1));
    }
}
