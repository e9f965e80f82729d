//! Broker settings: command-line flags, `EXTAUTH_*` environment variables and a TOML file.
//!
//! Precedence: flag > environment variable > `--config` file > built-in default. Every flag
//! `--some-flag` is also `EXTAUTH_SOME_FLAG` and the TOML key `some_flag` (`listen` is a list).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Deserialize;

use crate::extauth::Secret;

/// Flags of `extauth-broker run`; every field is optional so a file can fill it in.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunArgs {
    /// TOML file with any of these settings (keys are the flag names with `_` for `-`).
    #[arg(long, env = "EXTAUTH_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Where shims connect: `unix:/path` or `tcp:HOST:PORT`; repeatable (env: comma-separated).
    #[arg(long, env = "EXTAUTH_LISTEN", value_delimiter = ',')]
    #[serde(default)]
    pub listen: Vec<String>,

    /// Permission bits of Unix listening sockets, octal [default: 0660].
    #[arg(long, env = "EXTAUTH_SOCKET_MODE")]
    pub socket_mode: Option<String>,

    /// RFC 7662 token introspection endpoint (http:// or https://).
    #[arg(long, env = "EXTAUTH_INTROSPECTION_URL")]
    pub introspection_url: Option<String>,

    /// OAuth client id the broker authenticates to the introspection endpoint with (HTTP Basic).
    #[arg(long, env = "EXTAUTH_CLIENT_ID")]
    pub client_id: Option<String>,

    /// File holding the client secret (first line); the env var EXTAUTH_CLIENT_SECRET also works.
    #[arg(long, env = "EXTAUTH_CLIENT_SECRET_FILE")]
    pub client_secret_file: Option<PathBuf>,

    /// Token claim that names the user; falls back to `sub` when absent [default: username].
    #[arg(long, env = "EXTAUTH_SUBJECT_CLAIM")]
    pub subject_claim: Option<String>,

    /// Shared cache, e.g. `redis://127.0.0.1:6379/0`; without it verdicts stay in process.
    #[arg(long, env = "EXTAUTH_REDIS")]
    pub redis: Option<String>,

    /// File holding the cache key secret (>= 32 bytes); required with --redis, so every broker
    /// derives the same keys. Without Redis a random per-process secret is used.
    #[arg(long, env = "EXTAUTH_CACHE_SECRET_FILE")]
    pub cache_secret_file: Option<PathBuf>,

    /// Longest time a positive verdict is cached, seconds; never past the token's `exp` [default: 300].
    #[arg(long, env = "EXTAUTH_MAX_TTL")]
    pub max_ttl: Option<u64>,

    /// How long a definitive "no" (inactive, expired, other user) is cached, seconds [default: 10].
    #[arg(long, env = "EXTAUTH_NEGATIVE_TTL")]
    pub negative_ttl: Option<u64>,

    /// `isuser` answers 1 for users who logged in within this many seconds [default: 2592000 = 30 days].
    #[arg(long, env = "EXTAUTH_SEEN_TTL")]
    pub seen_ttl: Option<u64>,

    /// Total time allowed for one provider call, seconds [default: 5].
    #[arg(long, env = "EXTAUTH_PROVIDER_TIMEOUT")]
    pub provider_timeout: Option<u64>,

    /// Most verdicts kept in the in-process cache [default: 1000000].
    #[arg(long, env = "EXTAUTH_L1_CAPACITY")]
    pub l1_capacity: Option<u64>,

    /// Longest accepted token, bytes; longer ones are refused without a provider call [default: 16384].
    #[arg(long, env = "EXTAUTH_MAX_TOKEN_LEN")]
    pub max_token_len: Option<usize>,
}

/// Where the broker listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A Unix stream socket path.
    Unix(PathBuf),
    /// A TCP `host:port`.
    Tcp(String),
}

impl std::str::FromStr for ListenAddr {
    type Err = anyhow::Error;

    /// Parses `unix:/path` or `tcp:HOST:PORT`.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().split_once(':') {
            Some(("unix", p)) if !p.is_empty() => Ok(ListenAddr::Unix(PathBuf::from(p))),
            Some(("tcp", hp)) if hp.rsplit_once(':').is_some() => Ok(ListenAddr::Tcp(hp.to_owned())),
            _ => bail!("bad listen address {s:?}: want unix:/path or tcp:HOST:PORT"),
        }
    }
}

/// Validated settings of a running broker.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listening sockets (at least one).
    pub listen: Vec<ListenAddr>,
    /// Mode of Unix sockets.
    pub socket_mode: u32,
    /// The introspection validator's settings.
    pub introspection: IntrospectionConfig,
    /// Redis URL, if any.
    pub redis: Option<String>,
    /// HMAC key for cache keys (>= 32 bytes).
    pub cache_secret: Secret,
    /// Cache lifetimes and sizes.
    pub cache: CacheConfig,
    /// Longest accepted token (bytes).
    pub max_token_len: usize,
}

/// RFC 7662 introspection client settings.
#[derive(Debug, Clone)]
pub struct IntrospectionConfig {
    /// Endpoint URL.
    pub url: String,
    /// Client id (HTTP Basic user).
    pub client_id: String,
    /// Client secret (HTTP Basic password).
    pub client_secret: Secret,
    /// Claim naming the user (falls back to `sub`).
    pub subject_claim: String,
    /// Total time for one call.
    pub timeout: Duration,
}

/// Cache lifetimes and sizes.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Cap on a positive verdict's lifetime.
    pub max_ttl: Duration,
    /// Lifetime of a definitive negative verdict.
    pub negative_ttl: Duration,
    /// How long a successful login makes `isuser` answer 1.
    pub seen_ttl: Duration,
    /// Most entries in the in-process cache.
    pub l1_capacity: u64,
}

impl RunArgs {
    /// Fills every unset field from `file` (the flags and environment win).
    fn merge(mut self, file: RunArgs) -> RunArgs {
        macro_rules! fill {
            ($($field:ident),*) => { $( if self.$field.is_none() { self.$field = file.$field; } )* };
        }
        fill!(
            socket_mode, introspection_url, client_id, client_secret_file, subject_claim, redis,
            cache_secret_file, max_ttl, negative_ttl, seen_ttl, provider_timeout, l1_capacity,
            max_token_len
        );
        if self.listen.is_empty() {
            self.listen = file.listen;
        }
        self
    }

    /// Reads `--config`, applies defaults and checks everything.
    ///
    /// # Errors
    /// A message naming the bad or missing setting (never its secret value).
    pub fn resolve(self) -> Result<Config> {
        let args = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                let file: RunArgs = toml::from_str(&text)
                    .with_context(|| format!("parsing config file {}", path.display()))?;
                self.merge(file)
            }
            None => self,
        };
        args.into_config()
    }

    fn into_config(self) -> Result<Config> {
        if self.listen.is_empty() {
            bail!("no listener: give --listen unix:/path or --listen tcp:HOST:PORT");
        }
        let listen = self.listen.iter().map(|s| s.parse()).collect::<Result<Vec<_>>>()?;
        let socket_mode = self.socket_mode.as_deref().unwrap_or("0660");
        let socket_mode = u32::from_str_radix(socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .with_context(|| format!("--socket-mode {socket_mode:?} is not an octal mode like 0660"))?;
        let url = self.introspection_url.context("--introspection-url is required")?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("--introspection-url must start with http:// or https://");
        }
        let client_id = self.client_id.context("--client-id is required")?;
        let client_secret = client_secret(self.client_secret_file.as_deref())?;
        let cache_secret = match (&self.redis, &self.cache_secret_file) {
            (_, Some(path)) => read_secret(path, "--cache-secret-file")?,
            (Some(_), None) => bail!(
                "--redis needs --cache-secret-file: every broker sharing Redis must derive the same \
                 cache keys (create one with: head -c 32 /dev/urandom | base64 > cache.key)"
            ),
            (None, None) => Secret::new(hex::encode(rand::random::<[u8; 32]>())),
        };
        if cache_secret.expose().len() < 32 {
            bail!("--cache-secret-file must hold at least 32 bytes");
        }
        let positive = |v: Option<u64>, default: u64, flag: &str| -> Result<Duration> {
            match v.unwrap_or(default) {
                0 => bail!("{flag} must be at least 1 second"),
                s => Ok(Duration::from_secs(s)),
            }
        };
        Ok(Config {
            listen,
            socket_mode,
            introspection: IntrospectionConfig {
                url,
                client_id,
                client_secret,
                subject_claim: self.subject_claim.unwrap_or_else(|| "username".to_owned()),
                timeout: positive(self.provider_timeout, 5, "--provider-timeout")?,
            },
            redis: self.redis,
            cache_secret,
            cache: CacheConfig {
                max_ttl: positive(self.max_ttl, 300, "--max-ttl")?,
                negative_ttl: positive(self.negative_ttl, 10, "--negative-ttl")?,
                seen_ttl: positive(self.seen_ttl, 30 * 24 * 3600, "--seen-ttl")?,
                l1_capacity: self.l1_capacity.unwrap_or(1_000_000),
            },
            max_token_len: self.max_token_len.unwrap_or(16 * 1024),
        })
    }
}

fn client_secret(file: Option<&Path>) -> Result<Secret> {
    match (file, std::env::var("EXTAUTH_CLIENT_SECRET")) {
        (Some(path), _) => read_secret(path, "--client-secret-file"),
        (None, Ok(s)) if !s.is_empty() => Ok(Secret::new(s)),
        _ => bail!("the client secret is required: set EXTAUTH_CLIENT_SECRET or --client-secret-file"),
    }
}

/// Reads a secret from the first line of a file (trailing newline and spaces removed).
fn read_secret(path: &Path, flag: &str) -> Result<Secret> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{flag}: reading {}", path.display()))?;
    let line = text.lines().next().unwrap_or("").trim();
    if line.is_empty() {
        bail!("{flag}: {} is empty", path.display());
    }
    Ok(Secret::new(line.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> RunArgs {
        RunArgs {
            listen: vec!["unix:/tmp/x.sock".into()],
            introspection_url: Some("http://127.0.0.1:1/introspect".into()),
            client_id: Some("broker".into()),
            ..RunArgs::default()
        }
    }

    #[test]
    fn file_values_fill_only_unset_flags() {
        let file: RunArgs = toml::from_str(
            "listen = [\"tcp:127.0.0.1:7000\"]\nmax_ttl = 60\nclient_id = \"from-file\"\n",
        )
        .unwrap();
        let merged = base().merge(file);
        assert_eq!(merged.listen, vec!["unix:/tmp/x.sock".to_owned()]);
        assert_eq!(merged.max_ttl, Some(60));
        assert_eq!(merged.client_id.as_deref(), Some("broker"));
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        assert!(toml::from_str::<RunArgs>("max_tll = 3\n").is_err());
    }

    #[test]
    fn redis_without_a_cache_secret_is_refused() {
        let args = RunArgs { redis: Some("redis://127.0.0.1:1".into()), ..base() };
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("client");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let args = RunArgs { client_secret_file: Some(secret), ..args };
        let err = args.into_config().unwrap_err().to_string();
        assert!(err.contains("--cache-secret-file"), "{err}");
    }

    #[test]
    fn listen_addresses_parse() {
        assert_eq!("unix:/a/b".parse::<ListenAddr>().unwrap(), ListenAddr::Unix("/a/b".into()));
        assert_eq!("tcp:127.0.0.1:9".parse::<ListenAddr>().unwrap(), ListenAddr::Tcp("127.0.0.1:9".into()));
        assert!("udp:1".parse::<ListenAddr>().is_err());
    }
}
