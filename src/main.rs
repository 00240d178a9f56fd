//! The `sealgate` command: parse the command line, dispatch.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => {
            let _ = config;
            eprintln!("sealgate run: not implemented yet");
            ExitCode::FAILURE
        }
        Command::Check { config } => sealgate::check::run(&config),
        Command::Custody(args) => sealgate::custody::tool::run(args),
    }
}
