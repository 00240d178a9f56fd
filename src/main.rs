//! The `sealgate` command: parse the command line, dispatch.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sealgate::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

/// sealgate: a TLS-terminating reverse proxy that serves certificates from a custody export.
#[derive(Debug, Parser)]
#[command(name = "sealgate", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve: terminate TLS with the export's certificates and proxy to the routes' upstreams.
    Run {
        /// The configuration file.
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
    },
    /// Validate the configuration and the export; print one row per association.
    ///
    /// Exits non-zero when the configuration is invalid or no association can be served.
    Check {
        /// The configuration file.
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
    },
    /// The custody side: import, issue, associate, disassociate, retire grants, renew.
    Custody(sealgate::custody::tool::CustodyArgs),
    /// Check the audit log (the hash-chained record of what sealgate did with keys), or take an anchor of it.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Verify the hash chain of an audit log, line by line.
    ///
    /// Prints `ok: N records, chain intact, last seq S hash H` and exits 0; or prints the first broken line as
    /// `FILE:LINE: ...` on stderr and exits 1; exits 2 when the file cannot be read. A bare chain cannot show
    /// that records were cut off its end, or that its whole tail was rewritten with recomputed hashes: pass
    /// anchors taken earlier with `sealgate audit head` and kept off this host.
    Verify {
        /// The audit log; a rotated log's files, oldest first, are checked as one chain.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// A record known from elsewhere, as `sealgate audit head` printed it: the log must still hold it
        /// unchanged. Repeatable.
        #[arg(long, value_name = "SEQ:HASH")]
        anchor: Vec<sealgate::audit::Anchor>,
    },
    /// Verify an audit log, then print its last record's seq and hash as SEQ:HASH.
    ///
    /// Keep the output somewhere this host cannot rewrite; `sealgate audit verify --anchor SEQ:HASH` later
    /// shows whether the log still holds that record unchanged. Exits 1 when the chain is broken or the log
    /// is empty, 2 when the file cannot be read.
    Head {
        /// The audit log; a rotated log's files, oldest first, are checked as one chain.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(&config),
        Command::Check { config } => sealgate::check::run(&config),
        Command::Custody(args) => sealgate::custody::tool::run(args),
        Command::Audit(AuditCommand::Verify { files, anchor }) => sealgate::audit::verify_command(&files, &anchor),
        Command::Audit(AuditCommand::Head { files }) => sealgate::audit::head_command(&files),
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("sealgate: {error}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    // Before any key is read: no core dumps, not dumpable, memory locked.
    let hardened = sealgate::hygiene::harden(&config.process);
    tracing::info!(?hardened, "process hygiene");
    match sealgate::server::raise_open_files_limit() {
        Ok(limit) => tracing::debug!(?limit, "open files limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open files limit to its hard limit"),
    }
    let mut runtime = match config.runtime.worker_threads {
        // The connections on the main thread: the multi-threaded scheduler with one worker costs a fifth more
        // CPU per proxied request for nothing (see bench/README.md).
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(threads) => {
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            runtime.worker_threads(threads);
            runtime
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    runtime.enable_all();
    let runtime = match runtime.build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("sealgate: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match sealgate::daemon::run(path, config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(%error, "cannot start");
                ExitCode::FAILURE
            }
        }
    })
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
