//! sealgate: a TLS-terminating reverse proxy that serves certificates from a custody export, holding their
//! private keys in memory only and dropping them the moment their grant is retired.
//!
//! Data flows one way: export -> [`custody::snapshot`] -> [`keyring`] -> [`tls`] certificate table -> handshake
//! -> connection ([`server`]) -> route ([`proxy`]) -> upstream. Retirement flows back only as events.

pub mod check;
pub mod config;
pub mod custody;
pub mod names;
pub mod secret;
