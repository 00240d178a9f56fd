//! `sealgate custody`: the command-line front of [`super::writer`].
//!
//! Each command opens the state directory, does one operation and prints a short confirmation: ids and paths,
//! never a secret. Errors go to stderr with their whole cause chain, and the exit status is non-zero.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::writer::{
    cause_chain, fsio, AssociateRequest, CertificateRecord, Custody, CustodyError, GrantRecord, IssueRequest, KeyType,
    RenewRequest,
};

/// The environment variable that names the state directory when `--state` is absent.
pub const STATE_ENV: &str = "SEALGATE_CUSTODY_STATE";
/// The state directory when neither `--state` nor the environment names one.
pub const DEFAULT_STATE_DIR: &str = "custody-state";

/// A small certificate custody system (modelled on AWS ACM + KMS) that writes custody exports.
///
/// Its secrets (the KMS master key, data keys, grant keys, the local CA's key) stay in the state directory. An
/// export receives what FORMAT.md puts there: certificates, sealed private keys, grants and associations.
#[derive(Debug, Args)]
pub struct CustodyArgs {
    /// The state directory [default: $SEALGATE_CUSTODY_STATE, else ./custody-state]. Created on first use.
    #[arg(long, value_name = "DIR", global = true)]
    state: Option<PathBuf>,

    #[command(subcommand)]
    command: CustodyCommand,
}

#[derive(Debug, Subcommand)]
enum CustodyCommand {
    /// Issue a certificate from the local CA with a new key pair, and seal its key.
    Issue(IssueArgs),
    /// Import an existing certificate chain and private key, and seal the key.
    Import(ImportArgs),
    /// Associate a certificate with a grantee in an export: a new grant, the certificate, its sealed key and
    /// the wrapped data key are written into the export.
    Associate(AssociateArgs),
    /// Retire the association's grant, then remove the association and the certificate's files from the export.
    Disassociate(DisassociateArgs),
    /// Retire a grant (as if someone deleted it). The association stays in the export; holders refuse it.
    RetireGrant(RetireGrantArgs),
    /// Renew a certificate under the same id (new key pair, new data key) and rewrite every export it is
    /// associated with.
    Renew(RenewArgs),
    /// List certificates, grants and associations (no secrets).
    List,
    /// Print the local CA's certificate (what clients trust), or write it to a file.
    Ca(CaArgs),
}

#[derive(Debug, Args)]
struct IssueArgs {
    /// Certificate id, [A-Za-z0-9_-]{1,128} [default: random c-<12 hex>].
    #[arg(long, value_name = "ID")]
    id: Option<String>,
    /// DNS name (wildcards like *.example.com allowed); repeat or separate with commas. The first is the
    /// subject's common name.
    #[arg(long = "name", value_name = "NAME", required = true, value_delimiter = ',')]
    names: Vec<String>,
    /// Key type: ecdsa-p256, ecdsa-p384, rsa-2048 or ed25519.
    #[arg(long, value_name = "TYPE", default_value_t = KeyType::EcdsaP256)]
    key_type: KeyType,
    /// Start of validity: RFC 3339 (2030-01-01T00:00:00Z) or an offset from now (-1h, 0s) [default: -1h].
    #[arg(long, value_name = "TIME", value_parser = parse_time, allow_hyphen_values = true)]
    not_before: Option<OffsetDateTime>,
    /// End of validity: RFC 3339 or an offset from now (90d, 10years) [default: 90d].
    #[arg(long, value_name = "TIME", value_parser = parse_time, allow_hyphen_values = true)]
    not_after: Option<OffsetDateTime>,
}

#[derive(Debug, Args)]
struct ImportArgs {
    /// Certificate id [default: random c-<12 hex>].
    #[arg(long, value_name = "ID")]
    id: Option<String>,
    /// PEM file with the certificate chain, leaf first.
    #[arg(long, value_name = "FILE")]
    chain: PathBuf,
    /// PEM file with the unencrypted private key (PKCS#8, SEC1 "EC PRIVATE KEY" or PKCS#1 "RSA PRIVATE KEY").
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
}

#[derive(Debug, Args)]
struct AssociateArgs {
    /// The certificate to associate.
    certificate_id: String,
    /// The export directory (created if missing).
    #[arg(long, value_name = "DIR")]
    export: PathBuf,
    /// The principal the grant is issued to: the holder's `grantee` in proxy.toml.
    #[arg(long, value_name = "NAME")]
    grantee: String,
    /// Server name to serve, covered by the certificate; repeat or separate with commas [default: the
    /// certificate's DNS names].
    #[arg(long = "server-name", value_name = "NAME", value_delimiter = ',')]
    server_names: Vec<String>,
    /// When the grant lapses: RFC 3339 or an offset from now (30d) [default: never].
    #[arg(long, value_name = "TIME", value_parser = parse_time, allow_hyphen_values = true)]
    grant_not_after: Option<OffsetDateTime>,
}

#[derive(Debug, Args)]
struct DisassociateArgs {
    /// The certificate to disassociate.
    certificate_id: String,
    /// The export directory.
    #[arg(long, value_name = "DIR")]
    export: PathBuf,
}

#[derive(Debug, Args)]
struct RetireGrantArgs {
    /// The grant to retire (see `list`).
    grant_id: String,
}

#[derive(Debug, Args)]
struct RenewArgs {
    /// The certificate to renew.
    certificate_id: String,
    /// New chain (PEM, leaf first), for imported certificates; requires --key.
    #[arg(long, value_name = "FILE", requires = "key", conflicts_with_all = ["key_type", "not_before", "not_after"])]
    chain: Option<PathBuf>,
    /// New private key (PEM), with --chain.
    #[arg(long, value_name = "FILE", requires = "chain")]
    key: Option<PathBuf>,
    /// Key type of the new key pair of an issued certificate [default: the current one].
    #[arg(long, value_name = "TYPE")]
    key_type: Option<KeyType>,
    /// Start of validity: RFC 3339 or an offset from now [default: -1h].
    #[arg(long, value_name = "TIME", value_parser = parse_time, allow_hyphen_values = true)]
    not_before: Option<OffsetDateTime>,
    /// End of validity: RFC 3339 or an offset from now [default: 90d].
    #[arg(long, value_name = "TIME", value_parser = parse_time, allow_hyphen_values = true)]
    not_after: Option<OffsetDateTime>,
}

#[derive(Debug, Args)]
struct CaArgs {
    /// Write the CA certificate to this file (atomically) instead of printing it.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Write this CRL distribution point URL into every certificate the local CA issues from now on.
    #[arg(long, value_name = "URL", conflicts_with = "no_crl_url")]
    crl_url: Option<String>,
    /// Stop writing a CRL distribution point into new certificates.
    #[arg(long)]
    no_crl_url: bool,
}

/// Why a command failed: the custody operation, or reading an input file.
#[derive(Debug, thiserror::Error)]
enum ToolError {
    #[error(transparent)]
    Custody(#[from] CustodyError),
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Runs `sealgate custody`.
pub fn run(args: CustodyArgs) -> ExitCode {
    let state = args.state.unwrap_or_else(default_state_dir);
    match execute(&state, args.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("sealgate custody: error: {}", cause_chain(&err));
            ExitCode::FAILURE
        }
    }
}

fn default_state_dir() -> PathBuf {
    std::env::var_os(STATE_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), PathBuf::from)
}

fn execute(state: &Path, command: CustodyCommand) -> Result<(), ToolError> {
    let _lock = Custody::lock(state, || {
        eprintln!("sealgate custody: another sealgate custody is using {}; waiting for it", state.display());
    })?;
    let custody = Custody::open(state)?;
    match command {
        CustodyCommand::Issue(args) => issue(&custody, args),
        CustodyCommand::Import(args) => import(&custody, args),
        CustodyCommand::Associate(args) => associate(&custody, args),
        CustodyCommand::Disassociate(args) => {
            let grant = custody.disassociate(&args.certificate_id, &args.export)?;
            println!(
                "disassociated {} from {}: grant {} retired, association and certificate files removed",
                grant.certificate_id,
                grant.export.display(),
                grant.grant_id
            );
            Ok(())
        }
        CustodyCommand::RetireGrant(args) => {
            let grant = custody.retire_grant(&args.grant_id)?;
            println!(
                "retired grant {} (certificate {}) in {}; the association entry stays",
                grant.grant_id,
                grant.certificate_id,
                grant.export.display()
            );
            Ok(())
        }
        CustodyCommand::Renew(args) => renew(&custody, args),
        CustodyCommand::List => list(&custody),
        CustodyCommand::Ca(args) => ca(&custody, args),
    }
}

fn issue(custody: &Custody, args: IssueArgs) -> Result<(), ToolError> {
    let request = IssueRequest {
        certificate_id: args.id,
        names: args.names,
        key_type: args.key_type,
        not_before: args.not_before,
        not_after: args.not_after,
    };
    let record = custody.issue(&request)?;
    println!("issued {}", describe_certificate(&record));
    Ok(())
}

fn import(custody: &Custody, args: ImportArgs) -> Result<(), ToolError> {
    let chain = read_file(&args.chain)?;
    let key = read_secret(&args.key)?;
    let record = custody.import(args.id.as_deref(), &chain, key.expose())?;
    println!("imported {}", describe_certificate(&record));
    Ok(())
}

fn associate(custody: &Custody, args: AssociateArgs) -> Result<(), ToolError> {
    let request = AssociateRequest {
        server_names: (!args.server_names.is_empty()).then_some(args.server_names),
        grant_not_after: args.grant_not_after,
        ..AssociateRequest::new(args.certificate_id, args.export, args.grantee)
    };
    let grant = custody.associate(&request)?;
    println!(
        "associated {} with grantee {:?} in {} under grant {}{}",
        grant.certificate_id,
        grant.grantee,
        grant.export.display(),
        grant.grant_id,
        grant.not_after.map(|t| format!(" (lapses {})", timestamp(t))).unwrap_or_default()
    );
    Ok(())
}

fn renew(custody: &Custody, args: RenewArgs) -> Result<(), ToolError> {
    let request = match (args.chain, args.key) {
        (Some(chain), Some(key)) => {
            RenewRequest::Replace { chain_pem: read_file(&chain)?, key_pem: read_secret(&key)? }
        }
        _ => RenewRequest::Reissue { key_type: args.key_type, not_before: args.not_before, not_after: args.not_after },
    };
    let renewal = custody.renew(&args.certificate_id, &request)?;
    println!("renewed {}", describe_certificate(&renewal.certificate));
    for export in &renewal.exports {
        println!("  rewrote {}", export.display());
    }
    Ok(())
}

fn list(custody: &Custody) -> Result<(), ToolError> {
    let listing = custody.list()?;
    println!("KMS key {} (alias {})", listing.key_id, listing.key_alias);
    println!("certificates:");
    if listing.certificates.is_empty() {
        println!("  (none)");
    }
    for record in &listing.certificates {
        println!("  {}", describe_certificate(record));
    }
    println!("grants:");
    if listing.grants.is_empty() {
        println!("  (none)");
    }
    for grant in &listing.grants {
        println!("  {}", describe_grant(grant));
    }
    Ok(())
}

fn ca(custody: &Custody, args: CaArgs) -> Result<(), ToolError> {
    if let Some(url) = &args.crl_url {
        custody.set_crl_url(Some(url))?;
        eprintln!("new certificates will name the CRL at {url}");
    } else if args.no_crl_url {
        custody.set_crl_url(None)?;
        eprintln!("new certificates will name no CRL");
    }
    let pem = custody.ca_certificate_pem()?;
    match args.out {
        Some(path) => {
            fsio::write_atomic(&path, pem.as_bytes(), fsio::PUBLIC_FILE_MODE)?;
            println!("wrote the local CA certificate to {}", path.display());
        }
        None => print!("{pem}"),
    }
    Ok(())
}

fn describe_certificate(record: &CertificateRecord) -> String {
    format!(
        "{} ({}, {}, generation {}) for {}, valid {} to {}",
        record.certificate_id,
        record.origin,
        record.key_type,
        record.generation,
        record.names.join(", "),
        timestamp(record.not_before),
        timestamp(record.not_after)
    )
}

fn describe_grant(grant: &GrantRecord) -> String {
    let mut text = format!(
        "{} {} grantee={:?} certificate={} export={}",
        grant.grant_id,
        grant.state,
        grant.grantee,
        grant.certificate_id,
        grant.export.display()
    );
    text.push_str(if grant.associated { " associated" } else { " not-associated" });
    if let Some(not_after) = grant.not_after {
        text.push_str(&format!(" not_after={}", timestamp(not_after)));
    }
    if let Some(names) = &grant.server_names {
        text.push_str(&format!(" server_names={}", names.join(",")));
    }
    text
}

fn timestamp(instant: OffsetDateTime) -> String {
    instant.format(&Rfc3339).unwrap_or_else(|_| instant.to_string())
}

fn read_file(path: &Path) -> Result<Vec<u8>, ToolError> {
    std::fs::read(path).map_err(|source| ToolError::Read { path: path.to_owned(), source })
}

fn read_secret(path: &Path) -> Result<crate::secret::SecretBytes, ToolError> {
    Ok(fsio::read_secret_file(path)?)
}

/// Parses a time given on the command line: an RFC 3339 instant, `now`, or a duration from now in humantime's
/// syntax (`90d`, `1h 30m`, `10years`), negative with a leading `-`.
fn parse_time(text: &str) -> Result<OffsetDateTime, String> {
    parse_time_at(text, OffsetDateTime::now_utc())
}

fn parse_time_at(text: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("now") {
        return Ok(now);
    }
    if let Ok(instant) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(instant);
    }
    let (negative, duration) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let duration = humantime::parse_duration(duration.trim()).map_err(|e| {
        format!("expected an RFC 3339 time (2030-01-01T00:00:00Z) or a duration from now (90d, -1h): {e}")
    })?;
    let out_of_range = || "the time is out of range".to_owned();
    let duration = time::Duration::try_from(duration).map_err(|_| out_of_range())?;
    if negative { now.checked_sub(duration) } else { now.checked_add(duration) }.ok_or_else(out_of_range)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: CustodyArgs,
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn times_are_rfc3339_or_offsets_from_now() {
        let now = OffsetDateTime::parse("2026-01-01T00:00:00Z", &Rfc3339).unwrap();
        let at = |text| parse_time_at(text, now).unwrap().format(&Rfc3339).unwrap();
        assert_eq!(at("2030-05-06T07:08:09+02:00"), "2030-05-06T07:08:09+02:00");
        assert_eq!(at("90d"), "2026-04-01T00:00:00Z");
        assert_eq!(at("-1h"), "2025-12-31T23:00:00Z");
        assert_eq!(at("+30m"), "2026-01-01T00:30:00Z");
        assert_eq!(at("now"), "2026-01-01T00:00:00Z");
        assert!(parse_time_at("tomorrow", now).unwrap_err().contains("RFC 3339"));
    }

    #[test]
    fn renew_takes_a_chain_and_key_together() {
        assert!(Cli::try_parse_from(["x", "renew", "c-1", "--chain", "a.pem"]).is_err());
        assert!(Cli::try_parse_from(["x", "renew", "c-1", "--chain", "a.pem", "--key", "k.pem"]).is_ok());
        assert!(
            Cli::try_parse_from(["x", "renew", "c-1", "--chain", "a", "--key", "k", "--key-type", "ed25519"]).is_err()
        );
    }
}
