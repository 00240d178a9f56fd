//! sealgate: a TLS-terminating reverse proxy that serves certificates from a custody export, holding their
//! private keys in memory only and dropping them the moment their grant is retired.
//!
//! Data flows one way: export -> [`custody::snapshot`] -> [`keyring`] -> [`tls`] certificate table -> handshake
//! ([`tls_stream`], rustls' unbuffered API) -> connection ([`server`]) -> route ([`proxy`]) -> upstream. Retirement flows back only as events: the
//! keyring drops a grant's keys and fires its signal, which the table and the connections made with its
//! certificates obey. [`holder`] drives the first half of that flow. [`audit`] keeps the hash-chained record of
//! those custody events (never of requests) that security teams verify with `sealgate audit verify`.

pub mod access_log;
pub mod admin;
pub mod audit;
pub mod check;
pub mod client_auth;
pub mod config;
pub mod connection_limit;
pub mod custody;
pub mod daemon;
pub mod h2streams;
pub mod head_lines;
pub mod holder;
pub mod hygiene;
pub mod keyring;
pub mod metrics;
pub mod names;
pub mod parking;
pub mod proxy;
pub mod proxy_header;
pub mod redirect;
pub mod registry;
pub mod retirement_latency;
pub mod secret;
pub mod server;
pub mod tls;
pub mod tls_stream;

#[cfg(test)]
mod test_util;
