//! extauth-broker: validate ejabberd extauth logins whose password is an OAuth access token,
//! once for the whole cluster.
//!
//! The protocols it shares with the shim (extauth framing, wire messages, `Secret`, TLS configs)
//! are the std-only `extauth-protocol` crate (`src/protocol/`); the load harness is its own
//! package (`tests/load/`). See `docs/architecture.md` for the module map and the request path.

pub mod admin;
pub mod admission;
pub mod cache;
pub mod config;
pub mod daemon;
pub mod decision;
pub mod demo;
pub mod devprovider;
pub mod directory;
pub mod domain;
pub mod endpoint;
pub mod engine;
pub mod fds;
pub mod flight;
pub mod http_front;
pub mod keys;
pub mod kick;
pub mod listener;
pub mod metrics;
pub mod ops;
pub mod privileges;
pub mod revoke;
pub mod scrape;
pub mod seal;
pub mod secrets;
pub mod server;
pub mod store;
pub mod summary;
pub mod systemd;
pub mod throttle;
pub mod validate;
pub mod verdict;
