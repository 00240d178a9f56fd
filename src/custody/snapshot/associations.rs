//! `associations.toml` as a reader that reads it again and again keeps it: [`AssociationsFile`].
//!
//! Besides the entries, the file says things that follow from it alone and that every read needs: which entries
//! are refused before any other file is looked at (invalid ids, duplicates: they depend on file order), where
//! the others' files are, and which entry claims each certificate id. They are worked out once per version of
//! the file, and shared with the previous version when the ids are the same.
//!
//! With 10,000 associations the file is 1.7 MB, and parsing it whole takes about 20 ms on one core: most of the
//! cost of applying a renewal, which rewrites one entry's wrapped data key. So when the file has the shape the
//! custody system writes (a preamble, then `[[association]]` tables and no other), each table is parsed on its
//! own, and a table whose text is that of a table of the previous version is not parsed again: its entry is
//! shared. Whatever does not have that shape, or does not parse that way, is parsed whole by
//! [`Associations::parse`], so the entries, and every error, are those of a whole parse.

use std::hash::BuildHasher;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use super::certificate::CertificatePaths;
use super::{reason, Check, Refusal};
use crate::custody::format::{is_valid_id, AssociationEntry, Associations, FormatError};

/// A parsed `associations.toml`: see the module documentation.
pub(super) struct AssociationsFile {
    /// The entries, in file order.
    pub(super) entries: Vec<Arc<AssociationEntry>>,
    /// What the certificate ids of the entries, in their order, imply: shared with the previous version of the
    /// file when they are the same (a renewal changes a wrapped data key, not the ids).
    claims: Arc<Claims>,
    /// The text of each entry's table, when the file was parsed table by table.
    tables: Option<Tables>,
}

/// Which entry claims each certificate id, and where its files are.
struct Claims {
    /// One per entry: its certificate directory's files, or its refusal.
    by_entry: Vec<Result<Arc<CertificatePaths>, Refusal>>,
    /// The entry that claims each certificate id (the others naming it are refused whatever their files say).
    by_certificate: foldhash::HashMap<String, usize>,
}

/// The tables of a file parsed table by table, for the next version to share the entries of unchanged ones.
struct Tables {
    text: Box<str>,
    /// By entry index, the span of its table's body in `text`.
    spans: Vec<Range<usize>>,
    /// An entry index by the hash of its table's body (the first, if several tables hash alike).
    by_hash: foldhash::HashMap<u64, usize>,
    /// Hashes table bodies; passed on from version to version, so that their hashes compare.
    hasher: foldhash::fast::RandomState,
}

impl AssociationsFile {
    /// An absent file: nothing is associated.
    pub(super) fn empty() -> Self {
        let claims = Claims { by_entry: Vec::new(), by_certificate: foldhash::HashMap::default() };
        Self { entries: Vec::new(), claims: Arc::new(claims), tables: None }
    }

    /// Parses the file's bytes, sharing the entries of tables that `previous` (the file's previous version, if
    /// any) had with the same text. Paths are under `certificates_dir`, which must be the one `previous` used.
    pub(super) fn parse(
        bytes: &[u8],
        certificates_dir: &Path,
        previous: Option<&AssociationsFile>,
    ) -> Result<Self, FormatError> {
        if let Some(file) = Self::parse_tables(bytes, certificates_dir, previous) {
            return Ok(file);
        }
        let associations = Associations::parse(bytes)?;
        let entries = associations.entries.into_iter().map(Arc::new).collect();
        Ok(Self::new(entries, None, certificates_dir, previous))
    }

    /// The parse table by table, or `None` when the file does not have the shape for it or something in it
    /// does not parse (the whole parse then says what).
    fn parse_tables(bytes: &[u8], certificates_dir: &Path, previous: Option<&AssociationsFile>) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        // Multi-line strings need no check of their own: one that hides a header line leaves a table before that
        // line with a string that never ends, which does not parse alone.
        let (preamble, spans) = split(text)?;
        Associations::parse_preamble(preamble).ok()?;
        let earlier = previous.and_then(|p| Some((p, p.tables.as_ref()?)));
        let hasher = earlier.map_or_else(foldhash::fast::RandomState::default, |(_, t)| t.hasher.clone());
        let mut entries = Vec::with_capacity(spans.len());
        let mut by_hash = foldhash::HashMap::with_capacity_and_hasher(spans.len(), Default::default());
        for (index, span) in spans.iter().enumerate() {
            let body = &text[span.clone()];
            // A parser takes a byte order mark at the start of its input for one, which here is the middle of
            // the file, where TOML does not allow it: the whole parse refuses it.
            if body.starts_with('\u{feff}') {
                return None;
            }
            let hash = hasher.hash_one(body);
            let shared = earlier.and_then(|(file, tables)| {
                let &i = tables.by_hash.get(&hash)?;
                (tables.text.get(tables.spans[i].clone()) == Some(body)).then(|| Arc::clone(&file.entries[i]))
            });
            let entry = match shared {
                Some(entry) => entry,
                None => Arc::new(AssociationEntry::parse_table(body).ok()?),
            };
            by_hash.entry(hash).or_insert(index);
            entries.push(entry);
        }
        let tables = Tables { text: text.into(), spans, by_hash, hasher };
        Some(Self::new(entries, Some(tables), certificates_dir, previous))
    }

    fn new(
        entries: Vec<Arc<AssociationEntry>>,
        tables: Option<Tables>,
        certificates_dir: &Path,
        previous: Option<&AssociationsFile>,
    ) -> Self {
        let same_ids = |p: &&AssociationsFile| {
            p.entries.len() == entries.len()
                && p.entries
                    .iter()
                    .zip(&entries)
                    .all(|(a, b)| Arc::ptr_eq(a, b) || a.certificate_id == b.certificate_id)
        };
        if let Some(previous) = previous.filter(same_ids) {
            return Self { entries, claims: Arc::clone(&previous.claims), tables };
        }
        let mut by_certificate = foldhash::HashMap::with_capacity_and_hasher(entries.len(), Default::default());
        let by_entry = entries
            .iter()
            .enumerate()
            .map(|(index, entry)| {
                claim(entry, index, &mut by_certificate)?;
                // The paths depend on the certificate id alone: those of the previous version are shared.
                let earlier = previous.and_then(|p| p.paths_for(&entry.certificate_id));
                let id = &entry.certificate_id;
                Ok(earlier.map_or_else(|| Arc::new(CertificatePaths::new(certificates_dir, id)), Arc::clone))
            })
            .collect();
        Self { entries, claims: Arc::new(Claims { by_entry, by_certificate }), tables }
    }

    /// The entry that claims `certificate_id`, if one does.
    pub(super) fn claiming(&self, certificate_id: &str) -> Option<usize> {
        self.claims.by_certificate.get(certificate_id).copied()
    }

    /// The claim of the entry at `index`: its certificate directory's files, or its refusal.
    pub(super) fn claim(&self, index: usize) -> &Result<Arc<CertificatePaths>, Refusal> {
        &self.claims.by_entry[index]
    }

    fn paths_for(&self, certificate_id: &str) -> Option<&Arc<CertificatePaths>> {
        self.claims.by_entry.get(self.claiming(certificate_id)?)?.as_ref().ok()
    }

    /// The entries that claim a certificate under one of `grant_ids` (sorted), in file order.
    pub(super) fn entries_under<'a>(&'a self, grant_ids: &'a [String]) -> impl Iterator<Item = usize> + 'a {
        let wanted = move |(index, entry): &(usize, &Arc<AssociationEntry>)| {
            !grant_ids.is_empty()
                && self.claims.by_entry[*index].is_ok()
                && grant_ids.binary_search_by(|id| id.as_str().cmp(&entry.grant_id)).is_ok()
        };
        self.entries.iter().enumerate().filter(wanted).map(|(index, _)| index)
    }

    /// Which entries differ from `earlier`'s (by index here; new ones included), and the certificate ids
    /// `earlier` claimed that this file no longer does. `None` when either file refuses an entry by its ids or
    /// as a duplicate: such refusals depend on file order, and are left to a complete read.
    pub(super) fn changes_since(&self, earlier: &AssociationsFile) -> Option<(Vec<usize>, Vec<String>)> {
        if self.claims.by_entry.iter().chain(&earlier.claims.by_entry).any(Result::is_err) {
            return None;
        }
        let mut new_ids = 0;
        let changed = self
            .entries
            .iter()
            .enumerate()
            .filter(|(index, entry)| {
                // The same entry at the same place, the common case, needs no lookup.
                if earlier.entries.get(*index).is_some_and(|before| Arc::ptr_eq(before, entry)) {
                    return false;
                }
                match earlier.claiming(&entry.certificate_id) {
                    Some(i) => *earlier.entries[i] != ***entry,
                    None => {
                        new_ids += 1;
                        true
                    }
                }
            })
            .map(|(index, _)| index)
            .collect();
        // Every entry claims an id of its own: unless ids came and went, none was removed.
        let removed = if earlier.entries.len() + new_ids == self.entries.len() {
            Vec::new()
        } else {
            let gone = |entry: &&Arc<AssociationEntry>| self.claiming(&entry.certificate_id).is_none();
            earlier.entries.iter().filter(gone).map(|entry| entry.certificate_id.clone()).collect()
        };
        Some((changed, removed))
    }

    /// The paths of the entry at `index`, when it claims its certificate.
    pub(super) fn paths_of(&self, index: usize) -> Option<&CertificatePaths> {
        self.claims.by_entry.get(index)?.as_deref().ok()
    }
}

/// Refuses an entry whose ids are invalid (they must never become paths) or whose certificate an earlier entry
/// already associates (a second association must not compete with the first); otherwise records it, the entry
/// at `index`, as the one that claims its certificate id.
fn claim(
    entry: &AssociationEntry,
    index: usize,
    claimed: &mut foldhash::HashMap<String, usize>,
) -> Result<(), Refusal> {
    for (field, id) in [("certificate_id", &entry.certificate_id), ("grant_id", &entry.grant_id)] {
        if !is_valid_id(id) {
            let detail = format!("`{field}` {id:?} does not match [A-Za-z0-9_-]{{1,128}}");
            return Err(Refusal::new(Check::Files, reason::INVALID_ID, detail));
        }
    }
    match claimed.entry(entry.certificate_id.clone()) {
        std::collections::hash_map::Entry::Occupied(_) => {
            let detail =
                format!("an earlier [[association]] entry names {}; only the first is judged", entry.certificate_id);
            Err(Refusal::new(Check::Files, reason::DUPLICATE, detail))
        }
        std::collections::hash_map::Entry::Vacant(vacant) => {
            vacant.insert(index);
            Ok(())
        }
    }
}

/// The header of every table of the file.
const TABLE_HEADER: &str = "[[association]]";

/// Splits `text` into its preamble and the spans of its tables' bodies, when it has the shape for parsing
/// table by table: every line that starts with `[` (after spaces and tabs) is exactly a table header (not
/// another table, not an array's element on a line of its own: neither would parse alone). (An `association` key in the preamble is for
/// [`Associations::parse_preamble`] to refuse.)
fn split(text: &str) -> Option<(&str, Vec<Range<usize>>)> {
    let mut preamble_end = None;
    let mut spans = Vec::new();
    let mut body_start = None;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        // TOML's whitespace, and the line's end; not `str::trim`, which would also take a stray '\r' or other
        // Unicode spaces for whitespace, which TOML does not.
        let content = line.strip_suffix('\n').map_or(line, |l| l.strip_suffix('\r').unwrap_or(l));
        let content = content.trim_matches([' ', '\t']);
        if content.starts_with('[') {
            if content != TABLE_HEADER {
                return None;
            }
            match body_start {
                Some(start) => spans.push(start..offset),
                None => preamble_end = Some(offset),
            }
            body_start = Some(offset + line.len());
        }
        offset += line.len();
    }
    if let Some(start) = body_start {
        spans.push(start..text.len());
    }
    Some((&text[..preamble_end.unwrap_or(text.len())], spans))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::custody::format::ASSOCIATIONS_FORMAT;

    fn entry(id: usize) -> AssociationEntry {
        AssociationEntry {
            certificate_id: format!("c-{id}"),
            grant_id: format!("g-{}", id % 3),
            server_names: (id % 2 == 0).then(|| vec![format!("n{id}.example.test"), "*.w.example.test".into()]),
            wrapped_data_key: format!("{id:0>8}AAAA=="),
        }
    }

    fn rendered(count: usize) -> String {
        Associations { entries: (0..count).map(entry).collect() }.render()
    }

    fn parsed(text: &str, previous: Option<&AssociationsFile>) -> Result<AssociationsFile, FormatError> {
        AssociationsFile::parse(text.as_bytes(), Path::new("/export/certificates"), previous)
    }

    fn plain(file: &AssociationsFile) -> Vec<AssociationEntry> {
        file.entries.iter().map(|e| (**e).clone()).collect()
    }

    #[test]
    fn a_byte_order_mark_starting_a_table_body_is_refused_as_the_whole_parse_refuses_it() {
        let text = rendered(3).replacen("[[association]]\n", "[[association]]\n\u{feff}# a byte order mark\n", 2);
        assert!(Associations::parse(text.as_bytes()).is_err(), "TOML allows a BOM only at the start");
        assert!(parsed(&text, None).is_err(), "{text}");
        let leading = format!("\u{feff}{}", rendered(3));
        assert_eq!(parsed(&leading, None).is_ok(), Associations::parse(leading.as_bytes()).is_ok());
    }

    #[test]
    fn the_custody_writers_file_is_parsed_table_by_table_and_unchanged_tables_are_shared() {
        let text = rendered(50);
        let first = parsed(&text, None).unwrap();
        assert!(first.tables.is_some(), "the writer's shape splits: {text}");
        assert_eq!(plain(&first), Associations::parse(text.as_bytes()).unwrap().entries);

        let mut associations = Associations::parse(text.as_bytes()).unwrap();
        associations.entries[7].wrapped_data_key = "changed=".into();
        associations.entries.remove(20);
        let second = parsed(&associations.render(), Some(&first)).unwrap();
        assert_eq!(plain(&second), associations.entries);
        let shared = second.entries.iter().filter(|e| first.entries.iter().any(|f| Arc::ptr_eq(e, f))).count();
        assert_eq!(shared, 48, "every table but the changed one is shared");
        let (changed, removed) = second.changes_since(&first).unwrap();
        assert_eq!(changed, [7]);
        assert_eq!(removed, ["c-20"]);
        assert!(!Arc::ptr_eq(&second.claims, &first.claims));

        // Only a wrapped data key changed: the claims of the same ids are shared.
        associations.entries[3].wrapped_data_key = "renewed=".into();
        let third = parsed(&associations.render(), Some(&second)).unwrap();
        assert!(Arc::ptr_eq(&third.claims, &second.claims));
        assert_eq!(third.changes_since(&second).unwrap(), (vec![3], vec![]));
    }

    #[test]
    fn a_file_of_another_shape_is_parsed_whole() {
        let format = format!("format = \"{ASSOCIATIONS_FORMAT}\"\n");
        let table = "certificate_id = \"c-1\"\ngrant_id = \"g-1\"\nwrapped_data_key = \"AAAA\"\n";
        for (text, splits) in [
            // An array over several lines is no obstacle; another table, or a header spelt otherwise, is.
            (format!("{format}[[association]]\n{table}server_names = [\n  \"a.test\",\n]\n"), true),
            (format!("{format}[[association]]\n{table}[meta]\nx = 1\n"), false),
            (format!("{format}[[ association ]]\n{table}"), false),
            (format!("{format}[[association]]\n{table}note = \"\"\"\n[[association]]\n\"\"\"\n"), false),
            (format!("{format}association = []\n"), false),
            (format!("{format}\"association\" = [{{ certificate_id = \"c-1\" }}]\n[[association]]\n{table}"), false),
            (format!("{format}association.x = 1\n"), false),
        ] {
            let whole = Associations::parse(text.as_bytes()).map(|a| a.entries);
            let file = parsed(&text, None);
            assert_eq!(file.as_ref().is_ok_and(|f| f.tables.is_some()), splits, "{text}");
            assert_eq!(file.map(|f| plain(&f)), whole, "{text}");
        }
    }

    /// Whatever is done to the file, the parse table by table (with or without an earlier version to share
    /// from) gives what the whole parse gives: the same entries, or the same error.
    #[test]
    fn every_mutation_parses_as_the_whole_parse_does() {
        let original = rendered(6);
        let base = parsed(&original, None).unwrap();
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut random = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let pieces = [
            "[",
            "]",
            "[[association]]",
            "\n",
            "\r",
            "\r\n",
            "\"",
            "'''",
            "\"\"\"",
            "#",
            "=",
            " ",
            "\t",
            "x",
            "certificate_id = \"c-1\"\n",
            "\n[[association]]\n",
            "\u{3000}",
            "association",
            "format = \"x\"\n",
            "note = \"\"\"\n[[association]]\n\"\"\"\n",
            "note = '''\n[[association]]\n'''\n",
        ];
        for _ in 0..3000 {
            let mut text = original.clone().into_bytes();
            for _ in 0..1 + random(3) {
                // Half the edits at the start of a line, where the shape of the file is decided.
                let line_starts: Vec<usize> = std::iter::once(0)
                    .chain(text.iter().enumerate().filter(|(_, b)| **b == b'\n').map(|(i, _)| i + 1))
                    .collect();
                let at = match random(2) {
                    0 => line_starts[random(line_starts.len())],
                    _ => random(text.len() + 1),
                };
                match random(3) {
                    0 => {
                        let piece = pieces[random(pieces.len())].as_bytes();
                        text.splice(at..at, piece.iter().copied());
                    }
                    1 if at < text.len() => {
                        let end = (at + 1 + random(40)).min(text.len());
                        text.drain(at..end);
                    }
                    _ => text.insert(at.min(text.len()), random(256) as u8),
                }
            }
            let whole = Associations::parse(&text).map(|a| a.entries);
            let directory = Path::new("/export/certificates");
            let alone = AssociationsFile::parse(&text, directory, None).map(|f| plain(&f));
            let sharing = AssociationsFile::parse(&text, directory, Some(&base)).map(|f| plain(&f));
            let shown = String::from_utf8_lossy(&text);
            assert_eq!(alone, whole, "{shown}");
            assert_eq!(sharing, whole, "{shown}");
        }
    }
}
