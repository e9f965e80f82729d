//! Real components for extauth-broker's tests and lab runs: redis-server, brokers and shims as
//! child processes, the development provider, real identity providers, ejabberd clusters, and
//! the attackers (hostile peers, a Redis writer, fake brokers). Only faults a real component
//! cannot produce are simulated (`mock_idp`, `fake_broker`).

// Fixtures start processes or generate keys: an explicit `new()` says so, `Default` would hide it.
#![allow(clippy::new_without_default)]

pub mod ejabberd;
pub mod fake_broker;
pub mod faults;
pub mod harness;
pub mod hostile_peers;
pub mod idp;
pub mod mock_idp;
pub mod pki;
pub mod redis_attacker;
pub mod services;
pub mod tokens;
pub mod wire_client;
