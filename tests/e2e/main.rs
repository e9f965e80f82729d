//! The end-to-end tests: a real ejabberd cluster (logins, kicks, its launcher `extauth-lab`), tsung, and real identity
//! providers (django-oauth-toolkit, oidc-provider). Kept apart from `integration` because they
//! need the most set-up (`tests/run` installs it; without it each test says what is missing
//! and skips, unless the matching `EXTAUTH_REQUIRE_*` variable makes the absence a failure).
//!
//! Run one with a filter: `cargo test --test e2e -- interop::`.

mod ejabberd_e2e;
mod ejabberd_kick;
mod ejabberd_lab;
mod idp_providers;
mod interop;
mod tsung;
