//! `sealgate check`: validates the configuration and the export, and prints one row per association.

use std::path::Path;
use std::process::ExitCode;

/// Runs `sealgate check --config PATH`.
pub fn run(config: &Path) -> ExitCode {
    let _ = config;
    eprintln!("sealgate check: not implemented yet");
    ExitCode::FAILURE
}
