//! `sealgate custody`: the command-line front of [`super::writer`].

use std::process::ExitCode;

/// Arguments of `sealgate custody`.
#[derive(Debug, clap::Args)]
pub struct CustodyArgs {}

/// Runs `sealgate custody`.
pub fn run(args: CustodyArgs) -> ExitCode {
    let _ = args;
    eprintln!("sealgate custody: not implemented yet");
    ExitCode::FAILURE
}
