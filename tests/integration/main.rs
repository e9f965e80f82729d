//! The integration tests: one binary, one module per capability. Each runs real processes
//! (the broker and shim binaries, redis-server, nginx, the development provider) through
//! `extauth-testkit` (`tests/kit/`); `tests/run` installs what they need. The end-to-end tests
//! against ejabberd, tsung and real identity providers are the separate `e2e` binary.
//!
//! Run one capability with a filter: `cargo test --test integration -- revoke::`.

mod admission;
mod auth;
mod codec_props;
mod daemon;
mod dedup;
mod deploy;
mod discovery;
mod doc_links;
mod domains;
mod endpoints;
mod faults;
mod hostile_provider;
mod http_front;
mod load;
mod module_graph;
mod redis_attacks;
mod redis_topologies;
mod revoke;
mod security;
mod shim;
mod shim_protocols;
mod validators;
