//! Wires a [`Config`] into a running broker: validator, caches, engine, listeners.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::cache::{KeyDeriver, Redis};
use crate::config::Config;
use crate::domain::Domains;
use crate::engine::{Engine, EngineParts};
use crate::server::{self, Listener};

/// How long shutdown waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(5);

/// Installs the process-wide rustls crypto provider (ring). Call once before any HTTPS client
/// is built; later calls are no-ops.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Builds the engine for `config`.
///
/// # Errors
/// A bad Redis URL or an HTTP client that cannot be built.
pub fn engine(config: &Config) -> Result<Engine> {
    let redis = match &config.redis {
        Some(url) => Some(Redis::new(url).context("--redis")?),
        None => None,
    };
    Ok(Engine::new(EngineParts {
        keys: KeyDeriver::new(&config.cache_secret),
        redis,
        domains: Domains::build(config)?,
        l1_capacity: config.l1_capacity,
        max_token_len: config.max_token_len,
    }))
}

/// Binds every listener, then serves until `shutdown` is cancelled and in-flight requests
/// have drained (at most 5 s).
///
/// # Errors
/// Start-up failures (bind, engine); nothing fails once serving.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let engine = Arc::new(engine(&config)?);
    engine.spawn_revocation_listener();
    if let Some((addr, secret)) = &config.admin {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding --admin-listen {addr}"))?;
        tokio::spawn(crate::admin::serve(
            listener,
            engine.clone(),
            secret.clone(),
            shutdown.clone(),
        ));
    }
    let mut listeners = Vec::new();
    for addr in &config.listen {
        listeners.push(Listener::bind(addr, config.socket_mode).await?);
    }
    let domains: Vec<&str> = config.domains.keys().map(String::as_str).collect();
    info!(
        redis = config.redis.is_some(),
        domains = if domains.is_empty() {
            "any".to_owned()
        } else {
            domains.join(",")
        },
        "extauth-broker {} ready",
        env!("CARGO_PKG_VERSION")
    );
    server::serve(listeners, engine, shutdown, DRAIN).await;
    info!("stopped");
    Ok(())
}
