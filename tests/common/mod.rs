//! Helpers shared by the integration tests (each test file uses a part of them).
#![allow(dead_code)]

pub mod ejabberd;
pub mod faults;
pub mod harness;
pub mod services;
pub mod tokens;
pub mod wire_client;
