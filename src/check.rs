//! `sealgate check`: validates the configuration and the export, and prints one row per association; warns of
//! routes for names that no served certificate covers.
//!
//! Exit status: 0 when at least one association is served, 1 when none is, 2 when the configuration or the
//! export as a whole cannot be read.

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use crate::config::Config;
use crate::custody::snapshot::{read_export, AssociationOutcome, Snapshot};

/// Exit status when nothing can be served.
const NOTHING_SERVED: u8 = 1;
/// Exit status when the configuration or the export cannot be read.
const UNREADABLE: u8 = 2;

/// Runs `sealgate check --config PATH`.
pub fn run(config: &Path) -> ExitCode {
    let config = match Config::load(config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("sealgate check: {e}");
            return ExitCode::from(UNREADABLE);
        }
    };
    // The TLS settings and the upstream routes read files too (`[tls.client_auth]`'s CAs and CRLs, a route's
    // `ca`): refused here as `run` would refuse them.
    if let Err(e) = crate::tls::TlsPolicy::new(&config.tls) {
        eprintln!("sealgate check: {e}");
        return ExitCode::from(UNREADABLE);
    }
    for (index, route) in config.routes.iter().enumerate() {
        if let crate::config::RouteAction::Upstream(group) = &route.action {
            if let Err(e) = crate::proxy::upstream::UpstreamGroup::check_files(index, group, &config.proxy) {
                eprintln!("sealgate check: {e}");
                return ExitCode::from(UNREADABLE);
            }
        }
    }
    let custody = &config.custody;
    let snapshot = match read_export(&custody.export, &custody.grantee, OffsetDateTime::now_utc()) {
        Ok(snapshot) => snapshot,
        Err(e) => {
            eprintln!("sealgate check: cannot read the custody export: {e}");
            return ExitCode::from(UNREADABLE);
        }
    };
    // An absent export reads as empty (while running, that retires every grant); say why the table is empty.
    for (path, what) in
        [(custody.export.clone(), "export directory"), (custody.export.join("associations.toml"), "associations file")]
    {
        if !path.exists() {
            eprintln!("sealgate check: the {what} {} does not exist: nothing is associated", path.display());
            break;
        }
    }
    // Written rather than `print!`ed: `print!` panics when stdout is closed (`sealgate check | head -1`).
    if let Err(e) = std::io::stdout().lock().write_all(render_table(&snapshot).as_bytes()) {
        eprintln!("sealgate check: cannot write the report: {e}");
        return ExitCode::from(UNREADABLE);
    }
    for warning in unreachable_routes(&config, &snapshot) {
        eprintln!("sealgate check: warning: {warning}");
    }
    if snapshot.associations.iter().any(AssociationOutcome::is_served) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(NOTHING_SERVED)
    }
}

/// The routes whose host no served certificate covers, said as warnings: a request for such a host cannot
/// arrive (a handshake for the name finds no certificate, and a connection made with another certificate gets
/// 421), which is nearly always a typo or a certificate not associated yet. A route without a host, or with a
/// wildcard host under which some served name falls, is reachable.
pub fn unreachable_routes(config: &Config, snapshot: &Snapshot) -> Vec<String> {
    let served: Vec<&str> = snapshot
        .associations
        .iter()
        .filter(|a| a.is_served())
        .flat_map(|a| a.server_names.iter().map(String::as_str))
        .collect();
    config
        .routes
        .iter()
        .enumerate()
        .filter_map(|(index, route)| {
            let host = route.host.as_deref()?;
            let reachable = served.iter().any(|name| crate::names::covers(name, host) || crate::names::covers(host, name));
            (!reachable).then(|| {
                format!("route[{index}] (host {host}) is for a name no served certificate covers: its requests cannot arrive")
            })
        })
        .collect()
}

/// Column titles of the report.
const HEADER: [&str; 5] = ["CERTIFICATE", "GRANT", "SERVER NAMES", "NOT AFTER", "OUTCOME"];

/// Renders the report: an aligned table with one row per association in file order, each refusal's detail on an
/// indented line below its row, then a summary line.
pub fn render_table(snapshot: &Snapshot) -> String {
    let rows: Vec<([String; 5], Option<String>)> = snapshot.associations.iter().map(row).collect();
    let mut widths = HEADER.map(|title| title.chars().count());
    for (cells, _) in &rows {
        for (width, cell) in widths.iter_mut().zip(cells) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    push_line(&mut out, &HEADER.map(str::to_owned), &widths);
    for (cells, detail) in &rows {
        push_line(&mut out, cells, &widths);
        if let Some(detail) = detail {
            out.push_str("  ");
            out.push_str(detail);
            out.push('\n');
        }
    }
    let served = snapshot.associations.iter().filter(|a| a.is_served()).count();
    let refused = snapshot.associations.len() - served;
    out.push_str(&format!("{served} served, {refused} refused\n"));
    out
}

/// One association's cells, and its refusal's detail when there is one.
fn row(outcome: &AssociationOutcome) -> ([String; 5], Option<String>) {
    let names = if outcome.server_names.is_empty() { "-".to_owned() } else { outcome.server_names.join(",") };
    let not_after = outcome.certificate_not_after.map_or_else(|| "-".to_owned(), rfc3339);
    let detail = outcome.refusal().filter(|r| !r.detail.is_empty()).map(|r| printable(&r.detail));
    let cells = [&outcome.certificate_id, &outcome.grant_id, &names, &not_after, &outcome.outcome()];
    (cells.map(|cell| printable(cell)), detail)
}

/// Appends cells padded to `widths`, without trailing spaces.
fn push_line(out: &mut String, cells: &[String; 5], widths: &[usize; 5]) {
    let mut line = String::new();
    for (cell, width) in cells.iter().zip(widths) {
        line.push_str(&format!("{cell:<width$}   "));
    }
    out.push_str(line.trim_end());
    out.push('\n');
}

/// An instant as RFC 3339 in UTC.
fn rfc3339(instant: OffsetDateTime) -> String {
    instant.to_offset(UtcOffset::UTC).format(&Rfc3339).unwrap_or_else(|_| "-".to_owned())
}

/// `text` with control characters escaped: ids and names of refused entries come straight from the export, and
/// must not break the table or drive the terminal.
fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use time::macros::datetime;

    use super::*;
    use crate::custody::snapshot::{reason, Check, Refusal, Scope, Verdict, VerifiedCertificate};
    use crate::secret::SecretBytes;

    fn verified() -> VerifiedCertificate {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialized_der()));
        VerifiedCertificate {
            certificate_id: "c-ecdsa".into(),
            grant_id: "g-1".into(),
            grant_not_after: None,
            server_names: vec!["localhost".into(), "*.example.test".into()],
            chain: vec![CertificateDer::from(vec![0x30, 0x00])],
            leaf_sha256: [0; 32],
            not_before: datetime!(2026-11-28 13:25:27 UTC),
            not_after: datetime!(2126-11-04 13:25:27 UTC),
            signing_key: rustls::crypto::aws_lc_rs::sign::any_supported_type(&der).unwrap(),
            private_key: SecretBytes::new(key.serialize_der()),
        }
    }

    fn outcome(
        certificate_id: &str,
        names: &[&str],
        not_after: Option<OffsetDateTime>,
        result: Verdict,
    ) -> AssociationOutcome {
        AssociationOutcome {
            certificate_id: certificate_id.into(),
            grant_id: "g-1".into(),
            server_names: names.iter().map(|n| n.to_string()).collect(),
            certificate_not_after: not_after,
            inputs: [0; 32],
            result,
        }
    }

    #[test]
    fn the_table_is_aligned_with_details_under_their_rows() {
        let snapshot = Snapshot {
            export: PathBuf::from("/export"),
            read_at: datetime!(2026-11-28 14:00 UTC),
            grants: BTreeMap::new(),
            associations: vec![
                outcome(
                    "c-ecdsa",
                    &["localhost", "*.example.test"],
                    Some(datetime!(2126-11-04 13:25:27 UTC)),
                    Verdict::Served(verified()),
                ),
                outcome(
                    "c-old",
                    &[],
                    None,
                    Verdict::Refused(Refusal::new(
                        Check::Grant,
                        reason::GRANT_RETIRED,
                        "/export/grants/g-1.toml: retired",
                    )),
                ),
                outcome(
                    "c-bad\nid",
                    &["wide.example.test"],
                    Some(datetime!(2027-01-01 00:00 +01:00)),
                    Verdict::Refused(Refusal::new(Check::ServerNames, reason::NAME_NOT_COVERED, "")),
                ),
            ],
            scope: Scope::Complete,
        };
        let expected = "\
CERTIFICATE   GRANT   SERVER NAMES               NOT AFTER              OUTCOME
c-ecdsa       g-1     localhost,*.example.test   2126-11-04T13:25:27Z   served
c-old         g-1     -                          -                      refused: the grant is retired (check 1)
  /export/grants/g-1.toml: retired
c-bad\\nid     g-1     wide.example.test          2026-12-31T23:00:00Z   refused: server name not covered by the certificate (check 5)
1 served, 2 refused
";
        assert_eq!(render_table(&snapshot), expected);
    }

    #[test]
    fn an_empty_export_still_has_a_header_and_a_summary() {
        let snapshot = Snapshot {
            export: PathBuf::from("/export"),
            read_at: datetime!(2026-11-28 14:00 UTC),
            grants: BTreeMap::new(),
            associations: Vec::new(),
            scope: Scope::Complete,
        };
        assert_eq!(
            render_table(&snapshot),
            "CERTIFICATE   GRANT   SERVER NAMES   NOT AFTER   OUTCOME\n0 served, 0 refused\n"
        );
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("a\tb\u{1b}[2Jc"), "a\\tb\\u{1b}[2Jc");
        assert_eq!(printable("plain é"), "plain é");
    }
}
