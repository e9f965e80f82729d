//! extauth-broker: validate ejabberd extauth logins whose password is an OAuth access token,
//! once for the whole cluster.
//!
//! The protocols it shares with the shim (extauth framing, wire messages, `Secret`, TLS configs)
//! are the std-only `extauth-protocol` crate (`src/protocol/`); the load harness is its own
//! package (`tests/load/`). See `docs/architecture.md` for the module map and the request path.

mod admin;
mod admission;
mod cache;
mod config;
mod daemon;
mod decision;
pub mod demo;
pub mod devprovider;
mod directory;
mod domain;
mod endpoint;
mod engine;
mod fds;
mod flight;
mod http_front;
mod keys;
mod kick;
mod listener;
mod metrics;
pub mod ops;
mod privileges;
mod revoke;
mod scrape;
mod seal;
mod secrets;
mod server;
mod store;
mod summary;
mod systemd;
mod throttle;
mod validate;
mod verdict;

// The public API: what `main`, the load harness, the test kit, the benches and the fuzz targets
// use, and the error types those items return. Every other item is `pub(crate)`; the
// `unreachable_pub` lint (workspace lints) flags a `pub` that is not reachable from here.
pub use config::{Config, ConfigError, ListenAddr, RedisArgs, RunArgs};
pub use daemon::{build_engine, run, LogLevelSetter, Reloader, RunContext};
pub use decision::{is_canonical, Folding};
pub use endpoint::EndpointError;
pub use engine::{Engine, Outcome};
pub use kick::KickConfigError;
pub use secrets::SecretError;
pub use store::RedisMode;
pub use systemd::{take_listeners, Inherited, Role, SystemdError};
pub use validate::SetupError;
pub use verdict::now_ms;

/// The parsers of values read from Redis (untrusted storage), public for the fuzz targets
/// (`tests/fuzz`): sealed values, verdict payloads and revocation hints.
pub mod untrusted {
    pub use crate::seal::{Purpose, SealError, Sealer};
    pub use crate::store::Hint;
    pub use crate::verdict::{parse_ms, Answer, Lifetimes, Verdict};
}
