//! extauth-broker: validate ejabberd extauth logins whose password is an OAuth access token,
//! once for the whole cluster.
//!
//! The protocol modules ([`extauth`], [`wire`]) are std-only and always built; everything else
//! is behind the default `broker` feature so the shim links none of tokio, redis or reqwest.
//! See `docs/architecture.md` for the request path.

pub mod extauth;
#[cfg(feature = "tls")]
pub mod tls;
pub mod wire;

#[cfg(feature = "broker")]
pub mod admin;
#[cfg(feature = "broker")]
pub mod admission;
#[cfg(feature = "broker")]
pub mod binding;
#[cfg(feature = "broker")]
pub mod cache;
#[cfg(feature = "broker")]
pub mod config;
#[cfg(feature = "broker")]
pub mod daemon;
#[cfg(feature = "broker")]
pub mod demo;
#[cfg(feature = "broker")]
pub mod devprovider;
#[cfg(feature = "broker")]
pub mod directory;
#[cfg(feature = "broker")]
pub mod domain;
#[cfg(feature = "broker")]
pub mod endpoint;
#[cfg(feature = "broker")]
pub mod engine;
#[cfg(feature = "broker")]
pub mod fds;
#[cfg(feature = "broker")]
pub mod flight;
#[cfg(feature = "broker")]
pub mod http_front;
#[cfg(feature = "broker")]
pub mod keys;
#[cfg(feature = "broker")]
pub mod kick;
#[cfg(feature = "broker")]
pub mod listener;
#[cfg(feature = "broker")]
pub mod load;
#[cfg(feature = "broker")]
pub mod metrics;
#[cfg(feature = "broker")]
pub mod ops;
#[cfg(feature = "broker")]
pub mod privileges;
#[cfg(feature = "broker")]
pub mod revoke;
#[cfg(feature = "broker")]
pub mod scrape;
#[cfg(feature = "broker")]
pub mod seal;
#[cfg(feature = "broker")]
pub mod secrets;
#[cfg(feature = "broker")]
pub mod server;
#[cfg(feature = "broker")]
pub mod store;
#[cfg(feature = "broker")]
pub mod summary;
#[cfg(feature = "broker")]
pub mod systemd;
#[cfg(feature = "broker")]
pub mod throttle;
#[cfg(feature = "broker")]
pub mod validate;
#[cfg(feature = "broker")]
pub mod verdict;
