//! The protocols extauth-shim and extauth-broker share, std-only so the shim links none of
//! tokio, redis or reqwest:
//!
//! - [`extauth`]: ejabberd's external authentication protocol (`{packet, 2}` frames, the
//!   commands, the 4-byte replies) and the redacting [`extauth::Secret`];
//! - [`wire`]: the shim <-> broker messages (postcard in 4-byte length frames, `docs/protocol.md`);
//! - [`tls`] (feature `tls`, rustls only): certificates, keys and configs for both ends.

pub mod extauth;
#[cfg(feature = "tls")]
pub mod tls;
pub mod wire;
