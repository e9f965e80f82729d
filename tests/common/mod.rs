//! Helpers shared by the integration tests (each test file uses a part of them).
#![allow(dead_code, unreachable_pub)]

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
