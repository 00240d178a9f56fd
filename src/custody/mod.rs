//! The custody export: the contract with the certificate custody system (`../shared/custody/FORMAT.md`).
//!
//! - [`format`](mod@format): the files' syntax (serde types), parsing and rendering;
//! - [`seal`]: AES-256-GCM-SIV opening and sealing of data keys and private keys;
//! - [`snapshot`]: one consistent read of an export, with the holder's five checks applied to every association;
//! - [`watch`]: file events on the export, which say "re-read now";
//! - [`writer`]: the custody side, used by the `sealgate custody` tool and by tests.

pub mod changes;
pub mod format;
pub mod seal;
pub mod snapshot;
pub mod tool;
pub mod watch;
pub mod writer;
