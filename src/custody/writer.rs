//! The custody side of the export: a small custody system that keeps its own secrets (data keys, grant keys,
//! the local CA's key) in a state directory and writes exports that follow FORMAT.md. Used by the
//! `sealgate custody` tool, by tests and by demos.
