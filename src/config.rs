//! Broker settings: command-line flags, `EXTAUTH_*` environment variables and a TOML file.
//!
//! Precedence for global settings: flag > environment variable > `--config` file > built-in
//! default. Every flag `--some-flag` is also `EXTAUTH_SOME_FLAG` and the TOML key `some_flag`.
//!
//! Per-domain (vhost) settings come from the file's `[defaults]` table and its
//! `[domains."example.com"]` tables (see `docs/configuration.md`). A domain table overrides
//! `[defaults]`, which the validator flags (`--introspection-url`, `--subject-claim`, `--max-ttl`,
//! ...) override in turn. Without any domain configured (no `[domains]` table, no `--domain`),
//! every domain is served with the defaults; otherwise a request for another domain is refused
//! with reason `unknown_domain`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde::de::{DeserializeSeed, MapAccess, Visitor};
use serde::Deserialize;

use crate::decision::{BindingRules, Folding, Subject};
use crate::directory::DirectoryConfig;
use crate::endpoint::EndpointError;
use crate::endpoint::{self, EndpointLimits, HttpFrontConfig, IpRange};
use crate::kick::{KickConfig, KickConfigError, OnRevoke};
use crate::secrets::{read_secret, ConfigUrl, SecretError};
use crate::store::{RedisConfig, RedisMode};
use crate::validate::breaker::BreakerConfig;
use crate::validate::gate;
use crate::validate::http::{HttpTimeouts, ProviderPolicy, DEFAULT_MAX_RESPONSE_BYTES};
use crate::validate::introspection::IntrospectionConfig;
use crate::validate::ValidatorConfig;
use crate::verdict::{Lifetimes, MAX_LIFETIME};
use extauth_protocol::extauth::Secret;

/// A bad or missing setting (the message names the flag, key or file, never a secret value).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The `--config` file cannot be read.
    #[error("reading config file {}", path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The `--config` file is not valid TOML for these settings (an unknown key, a bad value).
    #[error("parsing config file {}: {message}", path.display())]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// Where and what, with quoted values replaced by `"..."` (they may be secrets).
        message: String,
    },
    /// A `--listen` address that is neither `unix:/path` nor `tcp:HOST:PORT`.
    #[error("bad listen address {address:?}: want unix:/path or tcp:HOST:PORT")]
    ListenAddress {
        /// The address as given.
        address: String,
    },
    /// `--socket-mode` is not an octal permission mode.
    #[error("--socket-mode {mode:?} is not an octal mode like 0660")]
    SocketMode {
        /// The mode as given.
        mode: String,
    },
    /// A secret file cannot be used.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// `--redis` without `--cache-secret-file`.
    #[error(
        "--redis needs --cache-secret-file: every broker sharing Redis must derive the same \
         cache keys (create one with: head -c 32 /dev/urandom | base64 > cache.key)"
    )]
    RedisWithoutCacheSecret,
    /// The cache secret is shorter than 32 bytes.
    #[error("--cache-secret-file must hold at least 32 bytes")]
    ShortCacheSecret,
    /// `--admin-listen` without `--admin-secret-file`.
    #[error("--admin-listen needs --admin-secret-file (the bearer secret callers present)")]
    AdminWithoutSecret,
    /// A domain named by `--domain` (or `domain` in the file) has bad settings.
    #[error("domain {name}")]
    Domain {
        /// The domain as given.
        name: String,
        /// What is wrong with it.
        #[source]
        source: Box<ConfigError>,
    },
    /// A `[domains."..."]` table has bad settings.
    #[error("[domains.\"{name}\"]")]
    DomainTable {
        /// The table's domain.
        name: String,
        /// What is wrong with it.
        #[source]
        source: Box<ConfigError>,
    },
    /// No validator for a domain.
    #[error(
        "no validator: give --introspection-url or --issuer (with --client-id), or a validator \
         table in the config file"
    )]
    NoValidator,
    /// Both `subject_claim` and `jid_claim`.
    #[error("give subject_claim or jid_claim, not both")]
    SubjectAndJidClaim,
    /// `subject_claim` is an empty list or names an empty claim.
    #[error("subject_claim must name at least one claim, and no empty one")]
    EmptySubjectClaim,
    /// `isuser = "directory"` without a `directory` table.
    #[error("isuser = \"directory\" needs a directory = {{ url = ... }} table")]
    DirectoryMissing,
    /// A duration of 0 seconds.
    #[error("{key} must be at least 1 second")]
    ZeroSeconds {
        /// The key (`max_ttl`, `seen_ttl`, ...).
        key: &'static str,
    },
    /// A verdict lifetime longer than the revocation marks last.
    #[error(
        "{key} must be at most {} seconds: revocation marks outlive cached verdicts by that bound",
        MAX_LIFETIME.as_secs()
    )]
    LifetimeTooLong {
        /// The key (`max_ttl`, `negative_ttl`, `stale_if_error`).
        key: &'static str,
    },
    /// `provider_concurrency` out of range.
    #[error("provider_concurrency must be between 1 and 4096, not {value}")]
    ProviderConcurrency {
        /// The value given.
        value: usize,
    },
    /// `--log-format` is neither `text` nor `json`.
    #[error("--log-format {format:?}: want text or json")]
    LogFormat {
        /// The format as given.
        format: String,
    },
    /// `--group` without `--user`.
    #[error("--group needs --user")]
    GroupWithoutUser,
    /// An `--allow-uid` or `--allow-gid` entry names no user or group.
    #[error("{flag} {name}: no such user or group")]
    NoSuchId {
        /// `--allow-uid` or `--allow-gid`.
        flag: &'static str,
        /// The name as given.
        name: String,
    },
    /// A bad `[on_revoke] kick` table.
    #[error(transparent)]
    Kick(#[from] KickConfigError),
    /// `--provider-max-response-bytes` out of range.
    #[error("--provider-max-response-bytes must be between 1024 and 1073741824, got {value}")]
    ProviderMaxResponseBytes {
        /// The value given.
        value: u64,
    },
    /// `--http-tls` without a certificate.
    #[error("--http-tls needs --tls-cert and --tls-key")]
    HttpTlsWithoutCert,
    /// `--http-listen` with no way to authenticate callers.
    #[error(
        "--http-listen needs --http-secret-file (the secret callers present), or --http-tls \
         with --client-ca (callers present a client certificate)"
    )]
    HttpWithoutSecret,
    /// A bad `--http-allow` entry.
    #[error("--http-allow")]
    HttpAllow(#[source] EndpointError),
    /// `--client-ca` without a server certificate.
    #[error("--client-ca needs --tls-cert and --tls-key")]
    ClientCaWithoutCert,
    /// Only one of `--tls-cert` and `--tls-key`.
    #[error("--tls-cert and --tls-key go together")]
    TlsHalf,
    /// The TLS certificate, key or client CA cannot be loaded.
    #[error(transparent)]
    Tls(#[from] extauth_protocol::tls::TlsError),
}

/// The flags `run` and `revoke` share: the configuration file and the Redis every broker
/// shares. In the file, `redis`, `redis_mode`, `redis_master` and `cache_secret_file` are
/// top-level keys like `run`'s others (see [`RunArgs`]'s `Deserialize`).
#[derive(Debug, Clone, Default, Args)]
pub struct RedisArgs {
    /// TOML file with any of `run`'s settings (keys are the flag names with `_` for `-`), plus
    /// `[defaults]`, `[domains."example.com"]` and `[on_revoke]` tables; `revoke` reads its
    /// Redis settings, cache secret and `[on_revoke]` from it.
    #[arg(long, env = "EXTAUTH_CONFIG")]
    pub config: Option<PathBuf>,

    /// Shared cache, e.g. `redis://127.0.0.1:6379/0` (`rediss://` for TLS); with
    /// `--redis-mode sentinel` or `cluster`, a comma-separated list of sentinels or seed nodes.
    /// Without it verdicts stay in process.
    #[arg(long, env = "EXTAUTH_REDIS")]
    pub redis: Option<String>,

    /// How Redis is deployed: standalone, sentinel or cluster [default: standalone].
    #[arg(long, env = "EXTAUTH_REDIS_MODE")]
    pub redis_mode: Option<RedisMode>,

    /// The Sentinel service name of the master [default: mymaster].
    #[arg(long, env = "EXTAUTH_REDIS_MASTER")]
    pub redis_master: Option<String>,

    /// File holding the cache key secret (>= 32 bytes); required with --redis, so every broker
    /// derives the same keys. Without Redis a random per-process secret is used.
    #[arg(long, env = "EXTAUTH_CACHE_SECRET_FILE")]
    pub cache_secret_file: Option<PathBuf>,
}

/// The TOML keys of [`RedisArgs`] (`config` is a flag only).
const STORE_KEYS: [&str; 4] = ["redis", "redis_mode", "redis_master", "cache_secret_file"];

/// Flags of `extauth-broker run`; every field is optional so the file can fill it in.
///
/// The file's keys are read by the derived code (`remote = "Self"`) through `StoreKeys`,
/// which takes the [`RedisArgs`] keys out on the way: serde's `flatten` would silence
/// `deny_unknown_fields` and drop the line numbers of errors in those keys.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct RunArgs {
    /// The configuration file and the Redis every broker shares: flags shared with `revoke`,
    /// TOML keys at the top level of the file.
    #[command(flatten)]
    #[serde(skip)]
    pub store: RedisArgs,

    /// Where shims connect: `unix:/path` or `tcp:HOST:PORT`; repeatable (env: comma-separated).
    #[arg(long, env = "EXTAUTH_LISTEN", value_delimiter = ',')]
    #[serde(default)]
    pub listen: Vec<String>,

    /// Permission bits of Unix listening sockets, octal [default: 0660].
    #[arg(long, env = "EXTAUTH_SOCKET_MODE")]
    pub socket_mode: Option<String>,

    /// Serve only these XMPP domains (repeatable); others get `unknown_domain`. Domains with a
    /// `[domains]` table in the file are always served.
    #[arg(long = "domain", env = "EXTAUTH_DOMAIN", value_delimiter = ',')]
    #[serde(default, rename = "domain")]
    pub domain_names: Vec<String>,

    /// RFC 7662 token introspection endpoint (http:// or https://) of the default validator.
    #[arg(long, env = "EXTAUTH_INTROSPECTION_URL")]
    pub introspection_url: Option<String>,

    /// The provider's issuer identifier (`https://...`): without --introspection-url, its
    /// metadata (`/.well-known/openid-configuration`, RFC 8414) gives the introspection endpoint.
    #[arg(long, env = "EXTAUTH_ISSUER")]
    pub issuer: Option<String>,

    /// OAuth client id the broker authenticates to the introspection endpoint with (HTTP Basic).
    #[arg(long, env = "EXTAUTH_CLIENT_ID")]
    pub client_id: Option<String>,

    /// File holding the client secret (first line); the env var EXTAUTH_CLIENT_SECRET also works.
    #[arg(long, env = "EXTAUTH_CLIENT_SECRET_FILE")]
    pub client_secret_file: Option<PathBuf>,

    /// Token claim(s) naming the user, tried in order while absent (a present claim that is not
    /// a string refuses); comma-separated [default: `username` for introspection and http, `sub`
    /// for jwt and userinfo].
    #[arg(long, env = "EXTAUTH_SUBJECT_CLAIM", value_delimiter = ',')]
    #[serde(default, deserialize_with = "one_or_many")]
    pub subject_claim: Vec<String>,

    /// How the subject claim may differ from the localpart ejabberd sends: `exact`,
    /// `ascii_case` or `nodeprep` (see docs/configuration.md) [default: exact].
    #[arg(long, env = "EXTAUTH_CLAIM_FOLDING")]
    pub claim_folding: Option<Folding>,

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

    /// Largest answer read from any provider (introspection, userinfo, http, JWKS, directory),
    /// bytes; a larger one is refused as upstream_unavailable [default: 1048576].
    #[arg(long, env = "EXTAUTH_PROVIDER_MAX_RESPONSE_BYTES")]
    pub provider_max_response_bytes: Option<u64>,

    /// Allow plain http:// provider URLs to hosts that are not loopback (tokens and client
    /// secrets then cross the network in clear).
    #[arg(long, env = "EXTAUTH_INSECURE_PROVIDER_HTTP", value_parser = clap::builder::BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub insecure_provider_http: Option<bool>,

    /// Most verdicts kept in the in-process cache, and as many "seen" markers: about 45 bytes
    /// per verdict when full (1M in 42 MiB), 12 per marker [default: 1000000].
    #[arg(long, env = "EXTAUTH_L1_CAPACITY")]
    pub l1_capacity: Option<u64>,

    /// Longest accepted token, bytes; longer ones are refused without a provider call [default: 16384].
    #[arg(long, env = "EXTAUTH_MAX_TOKEN_LEN")]
    pub max_token_len: Option<usize>,

    /// Serve the admin HTTP endpoint (`POST /revoke`) on this `HOST:PORT`.
    #[arg(long, env = "EXTAUTH_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,

    /// File holding the admin bearer secret (first line); required with --admin-listen.
    #[arg(long, env = "EXTAUTH_ADMIN_SECRET_FILE")]
    pub admin_secret_file: Option<PathBuf>,

    /// Serve the HTTP check front (MongooseIM, ejabberd-contrib and Prosody HTTP auth, nginx
    /// `auth_request`) on this `HOST:PORT`: loopback, or TLS with --http-tls, or --insecure-tcp.
    #[arg(long, env = "EXTAUTH_HTTP_LISTEN")]
    pub http_listen: Option<String>,

    /// File holding the secret callers of the HTTP front present (first line); required with
    /// --http-listen unless --http-tls with --client-ca authenticates them by certificate.
    #[arg(long, env = "EXTAUTH_HTTP_SECRET_FILE")]
    pub http_secret_file: Option<PathBuf>,

    /// Serve the HTTP front over TLS with --tls-cert and --tls-key; with --client-ca callers
    /// must present a client certificate (mTLS).
    #[arg(long, env = "EXTAUTH_HTTP_TLS", value_parser = clap::builder::BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub http_tls: Option<bool>,

    /// Peer addresses allowed on the HTTP front (an address or CIDR range; repeatable; env:
    /// comma-separated). Without: any address that reaches the listener.
    #[arg(long, env = "EXTAUTH_HTTP_ALLOW", value_delimiter = ',')]
    #[serde(default)]
    pub http_allow: Vec<String>,

    /// Most connections the HTTP front serves at once; more are closed as soon as they are
    /// accepted [default: 256].
    #[arg(long, env = "EXTAUTH_HTTP_MAX_CONNECTIONS")]
    pub http_max_connections: Option<usize>,

    /// Serve `/metrics`, `/healthz` and `/readyz` on this `HOST:PORT`.
    #[arg(long, env = "EXTAUTH_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,

    /// Most connections the metrics endpoint serves at once; more are closed as soon as they
    /// are accepted [default: 64].
    #[arg(long, env = "EXTAUTH_METRICS_MAX_CONNECTIONS")]
    pub metrics_max_connections: Option<usize>,

    /// Most connections the admin endpoint serves at once; more are closed as soon as they are
    /// accepted [default: 16].
    #[arg(long, env = "EXTAUTH_ADMIN_MAX_CONNECTIONS")]
    pub admin_max_connections: Option<usize>,

    /// Metrics and admin endpoints: seconds a request head may take, from the connection's start
    /// or the first byte after an idle pause [default: 5].
    #[arg(long, env = "EXTAUTH_ENDPOINT_HEADER_TIMEOUT")]
    pub endpoint_header_timeout: Option<u64>,

    /// Metrics and admin endpoints: seconds a kept-alive connection may wait for its next
    /// request [default: 30].
    #[arg(long, env = "EXTAUTH_ENDPOINT_IDLE_TIMEOUT")]
    pub endpoint_idle_timeout: Option<u64>,

    /// Metrics and admin endpoints: seconds from a complete request head to the response; later
    /// answers are 503 [default: 10].
    #[arg(long, env = "EXTAUTH_ENDPOINT_REQUEST_TIMEOUT")]
    pub endpoint_request_timeout: Option<u64>,

    /// Log filter (tracing EnvFilter syntax: `info`, `debug`, `extauth_broker=debug`);
    /// reloaded on SIGHUP [default: info].
    #[arg(long, env = "EXTAUTH_LOG_LEVEL")]
    pub log_level: Option<String>,

    /// Log format: `text` or `json` (one object per line) [default: text].
    #[arg(long, env = "EXTAUTH_LOG_FORMAT")]
    pub log_format: Option<String>,

    /// When started as root: drop to this user after binding the sockets.
    #[arg(long, env = "EXTAUTH_USER")]
    pub user: Option<String>,

    /// When started as root: drop to this group after binding (Unix sockets get this group).
    #[arg(long, env = "EXTAUTH_GROUP")]
    pub group: Option<String>,

    /// Most shim connections served at once, counted from their first request; when all are
    /// taken, the idlest connection without a request in flight is closed for a new one (its
    /// shim reconnects by itself) [default: 4096].
    #[arg(long, env = "EXTAUTH_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Most requests in flight per connection; a connection over it is read no further until one
    /// completes [default: 256].
    #[arg(long, env = "EXTAUTH_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<usize>,

    /// Close a connection idle (no request) for this many seconds; shims reconnect by themselves
    /// [default: 3600].
    #[arg(long, env = "EXTAUTH_IDLE_TIMEOUT")]
    pub idle_timeout: Option<u64>,

    /// Certificate chain (PEM) for TCP listeners: shims then connect with `tls:HOST:PORT`.
    #[arg(long, env = "EXTAUTH_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "EXTAUTH_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// Require client certificates signed by this CA (PEM) on TLS listeners (mTLS).
    #[arg(long, env = "EXTAUTH_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,

    /// Allow plaintext TCP on non-loopback addresses (tokens then cross the network in clear).
    #[arg(long, env = "EXTAUTH_INSECURE_TCP", value_parser = clap::builder::BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub insecure_tcp: Option<bool>,

    /// Unix socket peers allowed (SO_PEERCRED uid; names or numbers; repeatable). Without
    /// --allow-uid/--allow-gid: root, the broker's own user, and members of the socket's group.
    #[arg(long, env = "EXTAUTH_ALLOW_UID", value_delimiter = ',')]
    #[serde(default)]
    pub allow_uid: Vec<String>,

    /// Unix socket peers allowed by group (the peer's primary group, or its membership).
    #[arg(long, env = "EXTAUTH_ALLOW_GID", value_delimiter = ',')]
    #[serde(default)]
    pub allow_gid: Vec<String>,

    /// Seconds a new connection may take for its peer check, TLS, protocol handshake and first
    /// request [default: 3].
    #[arg(long, env = "EXTAUTH_HANDSHAKE_TIMEOUT")]
    pub handshake_timeout: Option<u64>,

    /// Most connections in their handshake at once, across listeners; when full, the oldest
    /// handshake of the source holding the most is dropped for a new one [default: 256].
    #[arg(long, env = "EXTAUTH_MAX_HANDSHAKES")]
    pub max_handshakes: Option<usize>,

    /// Most handshakes in progress from one TCP source (an IPv4 address or an IPv6 /64); when
    /// full, that source's oldest handshake is dropped for its new one [default: 32].
    #[arg(long, env = "EXTAUTH_MAX_HANDSHAKES_PER_IP")]
    pub max_handshakes_per_ip: Option<usize>,

    /// Settings every domain starts from (file only).
    #[arg(skip)]
    #[serde(default)]
    pub(crate) defaults: DomainFile,

    /// Per-domain settings (file only).
    #[arg(skip)]
    #[serde(default)]
    pub(crate) domains: BTreeMap<String, DomainFile>,

    /// What a revocation this process performs does besides revoking (file only):
    /// `[on_revoke] kick = {...}` ends the user's sessions through ejabberd (`crate::kick`).
    #[arg(skip)]
    #[serde(default)]
    pub(crate) on_revoke: OnRevoke,
}

/// One `[defaults]` or `[domains."..."]` table; every key optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DomainFile {
    /// `{ kind = "introspection" | "userinfo" | "jwt" | "http", ... }`.
    pub validator: Option<ValidatorConfig>,
    /// Claim(s) holding the localpart, a string or a list tried in order while absent
    /// [default: `username` for introspection and http, `sub` for jwt and userinfo].
    #[serde(default, deserialize_with = "one_or_many_opt")]
    pub subject_claim: Option<Vec<String>>,
    /// Claim holding a full JID `user@domain` that must match; replaces `subject_claim`.
    pub jid_claim: Option<String>,
    /// `exact` (default), `ascii_case` or `nodeprep`.
    pub claim_folding: Option<Folding>,
    /// Claim (a string or an array of strings) that must name this domain.
    pub domain_claim: Option<String>,
    /// Positive verdict cap, seconds.
    pub max_ttl: Option<u64>,
    /// Negative verdict lifetime, seconds.
    pub negative_ttl: Option<u64>,
    /// "Seen" lifetime for `isuser`, seconds.
    pub seen_ttl: Option<u64>,
    /// Serve a cached positive verdict this many seconds past its TTL while the provider is
    /// unavailable (never past the token's `exp`) [default: 0 = off].
    pub stale_if_error: Option<u64>,
    /// Circuit breaker of the validator: `{ threshold = 5, cooldown = 10 }`.
    pub breaker: Option<BreakerConfig>,
    /// Most provider calls of this domain at once; more wait, served in turn by user
    /// [default: 32].
    pub provider_concurrency: Option<usize>,
    /// How `isuser` is answered: `seen` (default), `directory`, `always`, `never`.
    pub isuser: Option<IsUserPolicy>,
    /// The directory asked when `isuser = "directory"`.
    pub directory: Option<DirectoryConfig>,
}

/// How `isuser` is answered for a domain (see `docs/configuration.md` for the consequences).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum IsUserPolicy {
    /// 1 if the user logged in successfully within `seen_ttl`.
    #[default]
    Seen,
    /// Ask the directory; fall back to `seen` when it gives no definitive answer.
    Directory,
    /// Always 1 (every localpart exists; offline messages are never bounced).
    Always,
    /// Always 0 (offline messages to this domain are always bounced).
    Never,
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
    type Err = ConfigError;

    /// Parses `unix:/path` or `tcp:HOST:PORT`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s.trim().split_once(':') {
            Some(("unix", p)) if !p.is_empty() => Ok(ListenAddr::Unix(PathBuf::from(p))),
            Some(("tcp", hp)) if hp.rsplit_once(':').is_some() => {
                Ok(ListenAddr::Tcp(hp.to_owned()))
            }
            _ => Err(ConfigError::ListenAddress {
                address: s.to_owned(),
            }),
        }
    }
}

/// Validated settings of one domain (vhost).
#[derive(Debug, Clone)]
pub(crate) struct DomainConfig {
    /// The validator asked about new tokens.
    pub validator: ValidatorConfig,
    /// Token-to-JID binding.
    pub binding: BindingRules,
    /// Cap on a positive verdict's lifetime.
    pub max_ttl: Duration,
    /// Lifetime of a definitive negative verdict.
    pub negative_ttl: Duration,
    /// How long a successful login makes `isuser` answer 1.
    pub seen_ttl: Duration,
    /// Grace period for serving stale positive verdicts while the provider is down (0 = off).
    pub stale_if_error: Duration,
    /// Circuit breaker settings of the validator.
    pub breaker: BreakerConfig,
    /// Most concurrent provider calls (1 to 4096), the rest waiting in turn by user.
    pub provider_concurrency: usize,
    /// `isuser` policy.
    pub isuser: IsUserPolicy,
    /// The directory, when the policy is `directory`.
    pub directory: Option<DirectoryConfig>,
}

/// Validated settings of a running broker.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listening sockets (at least one).
    pub(crate) listen: Vec<ListenAddr>,
    /// Mode of Unix sockets.
    pub(crate) socket_mode: u32,
    /// The shared store, if any.
    pub(crate) redis: Option<RedisConfig>,
    /// HMAC key for cache keys (>= 32 bytes).
    pub(crate) cache_secret: Secret,
    /// Most entries in the in-process cache.
    pub(crate) l1_capacity: u64,
    /// Longest accepted token (bytes).
    pub(crate) max_token_len: usize,
    /// Configured domains.
    pub(crate) domains: BTreeMap<String, DomainConfig>,
    /// Settings for any other domain, when no domain is configured (single-tenant mode).
    pub(crate) any_domain: Option<DomainConfig>,
    /// Rules for every provider call (answer size cap, plain http).
    pub(crate) provider: ProviderPolicy,
    /// The admin endpoint's `HOST:PORT` (it may also come from systemd).
    pub(crate) admin_listen: Option<String>,
    /// The admin endpoint's bearer secret.
    pub(crate) admin_secret: Option<Secret>,
    /// The HTTP check front, when `--http-listen` is given.
    pub(crate) http: Option<HttpFrontConfig>,
    /// The metrics endpoint's `HOST:PORT`.
    pub(crate) metrics_listen: Option<String>,
    /// The metrics endpoint's connection cap and timeouts.
    pub(crate) metrics_limits: EndpointLimits,
    /// The admin endpoint's connection cap and timeouts.
    pub(crate) admin_limits: EndpointLimits,
    /// Log filter.
    pub(crate) log_level: String,
    /// Log as JSON lines?
    pub(crate) log_json: bool,
    /// User and group to run as after binding (when root).
    pub(crate) run_as: Option<(String, Option<String>)>,
    /// Connection limits.
    pub(crate) limits: Limits,
    /// Unix socket peer checks.
    pub(crate) peers: PeerPolicy,
    /// TCP transport security.
    pub(crate) tcp: TcpSecurity,
    /// The revoke hook ending a revoked user's sessions through ejabberd (checked; its secret
    /// files are read when the hook is built).
    pub(crate) kick: Option<KickConfig>,
}

/// Limits on what shims may hold (see `crate::admission`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Most connections served at once (each from its first request on); the idlest gives way.
    pub max_connections: usize,
    /// Most requests in flight per connection.
    pub max_in_flight: usize,
    /// A connection without a request for this long is closed.
    pub idle_timeout: Duration,
    /// Time for a new connection's peer check, TLS, protocol handshake and first request.
    pub handshake_timeout: Duration,
    /// Most handshakes in progress at once.
    pub max_handshakes: usize,
    /// Most handshakes in progress from one TCP source.
    pub max_handshakes_per_ip: usize,
}

/// Which Unix socket peers may talk to the broker (SO_PEERCRED).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PeerPolicy {
    /// Allowed user ids; with `gids`, empty both = the default policy.
    pub uids: Vec<u32>,
    /// Allowed group ids.
    pub gids: Vec<u32>,
}

/// TCP transport security.
#[derive(Clone)]
pub(crate) struct TcpSecurity {
    /// TLS for every TCP listener, when configured.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Plaintext allowed on non-loopback addresses.
    pub insecure: bool,
}

impl std::fmt::Debug for TcpSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpSecurity")
            .field("tls", &self.tls.is_some())
            .field("insecure", &self.insecure)
            .finish()
    }
}

impl RunArgs {
    /// Fills every unset global field from `file` (the flags and environment win) and takes the
    /// file's domain tables.
    fn merge(mut self, file: RunArgs) -> RunArgs {
        macro_rules! fill {
            ($($field:ident),*) => { $( if self.$field.is_none() { self.$field = file.$field; } )* };
        }
        fill!(
            socket_mode,
            introspection_url,
            issuer,
            client_id,
            client_secret_file,
            claim_folding,
            max_ttl,
            negative_ttl,
            seen_ttl,
            provider_timeout,
            provider_max_response_bytes,
            insecure_provider_http,
            l1_capacity,
            max_token_len,
            admin_listen,
            admin_secret_file,
            http_listen,
            http_secret_file,
            http_tls,
            http_max_connections,
            metrics_listen,
            metrics_max_connections,
            admin_max_connections,
            endpoint_header_timeout,
            endpoint_idle_timeout,
            endpoint_request_timeout,
            log_level,
            log_format,
            user,
            group,
            max_connections,
            max_in_flight,
            idle_timeout,
            tls_cert,
            tls_key,
            client_ca,
            insecure_tcp,
            handshake_timeout,
            max_handshakes,
            max_handshakes_per_ip
        );
        self.store.redis = self.store.redis.or(file.store.redis);
        self.store.redis_mode = self.store.redis_mode.or(file.store.redis_mode);
        self.store.redis_master = self.store.redis_master.or(file.store.redis_master);
        self.store.cache_secret_file = self
            .store
            .cache_secret_file
            .or(file.store.cache_secret_file);
        if self.subject_claim.is_empty() {
            self.subject_claim = file.subject_claim;
        }
        if self.allow_uid.is_empty() {
            self.allow_uid = file.allow_uid;
        }
        if self.allow_gid.is_empty() {
            self.allow_gid = file.allow_gid;
        }
        if self.listen.is_empty() {
            self.listen = file.listen;
        }
        if self.http_allow.is_empty() {
            self.http_allow = file.http_allow;
        }
        if self.domain_names.is_empty() {
            self.domain_names = file.domain_names;
        }
        self.defaults = file.defaults;
        self.domains = file.domains;
        self.on_revoke = file.on_revoke;
        self
    }

    /// Reads `--config`, applies defaults and checks everything.
    ///
    /// # Errors
    /// A message naming the bad or missing setting (never its secret value).
    pub fn resolve(self) -> Result<Config, ConfigError> {
        self.with_file()?.into_config()
    }

    /// These settings with the `--config` file's values filled in (nothing checked yet).
    ///
    /// # Errors
    /// An unreadable or invalid file.
    pub fn with_file(self) -> Result<RunArgs, ConfigError> {
        let Some(path) = &self.store.config else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.clone(),
            source,
        })?;
        let file: RunArgs = toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
            path: path.clone(),
            message: describe_toml_error(&e, &text),
        })?;
        Ok(self.merge(file))
    }

    /// Applies defaults and checks everything (after [`RunArgs::with_file`]).
    ///
    /// # Errors
    /// A message naming the bad or missing setting (never its secret value).
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let listen = self
            .listen
            .iter()
            .map(|s| s.parse())
            .collect::<Result<Vec<_>, _>>()?;
        let socket_mode = self.socket_mode.as_deref().unwrap_or("0660");
        let socket_mode = u32::from_str_radix(socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| ConfigError::SocketMode {
                mode: socket_mode.to_owned(),
            })?;
        let cache_secret = match (&self.store.redis, &self.store.cache_secret_file) {
            (_, Some(path)) => read_secret(path, "--cache-secret-file")?,
            (Some(_), None) => return Err(ConfigError::RedisWithoutCacheSecret),
            (None, None) => Secret::new(hex::encode(rand::random::<[u8; 32]>())),
        };
        if cache_secret.expose().len() < 32 {
            return Err(ConfigError::ShortCacheSecret);
        }
        if self.admin_listen.is_some() && self.admin_secret_file.is_none() {
            return Err(ConfigError::AdminWithoutSecret);
        }
        let admin_secret = self
            .admin_secret_file
            .as_deref()
            .map(|p| read_secret(p, "--admin-secret-file"))
            .transpose()?;
        let tls = self.tls()?;
        let http = self.http_front(&tls)?;
        let defaults = self.flag_defaults();
        let mut domains = BTreeMap::new();
        for name in &self.domain_names {
            domains.insert(
                name.to_lowercase(),
                defaults.resolve().map_err(|e| ConfigError::Domain {
                    name: name.clone(),
                    source: Box::new(e),
                })?,
            );
        }
        for (name, table) in &self.domains {
            let merged = table.clone().over(defaults.clone());
            domains.insert(
                name.to_lowercase(),
                merged.resolve().map_err(|e| ConfigError::DomainTable {
                    name: name.clone(),
                    source: Box::new(e),
                })?,
            );
        }
        let any_domain = match domains.is_empty() {
            true => Some(defaults.resolve()?),
            false => None,
        };
        Ok(Config {
            listen,
            socket_mode,
            redis: self.redis_config(),
            cache_secret,
            l1_capacity: self.l1_capacity.unwrap_or(1_000_000),
            max_token_len: self.max_token_len.unwrap_or(16 * 1024),
            domains,
            any_domain,
            provider: self.provider_policy()?,
            admin_listen: self.admin_listen.clone(),
            admin_secret,
            http,
            metrics_listen: self.metrics_listen.clone(),
            metrics_limits: self.endpoint_limits(
                self.metrics_max_connections,
                endpoint::DEFAULT_METRICS_CONNECTIONS,
            ),
            admin_limits: self.endpoint_limits(
                self.admin_max_connections,
                endpoint::DEFAULT_ADMIN_CONNECTIONS,
            ),
            log_level: self.log_level.clone().unwrap_or_else(|| "info".into()),
            log_json: match self.log_format.as_deref().unwrap_or("text") {
                "text" => false,
                "json" => true,
                other => {
                    return Err(ConfigError::LogFormat {
                        format: other.to_owned(),
                    })
                }
            },
            run_as: match (&self.user, &self.group) {
                (Some(u), g) => Some((u.clone(), g.clone())),
                (None, Some(_)) => return Err(ConfigError::GroupWithoutUser),
                (None, None) => None,
            },
            limits: Limits {
                max_connections: self.max_connections.unwrap_or(4096).max(1),
                max_in_flight: self.max_in_flight.unwrap_or(256).max(1),
                idle_timeout: Duration::from_secs(self.idle_timeout.unwrap_or(3600).max(1)),
                // A shim gives up connecting after its --connect-timeout (2 s by default), so a
                // longer handshake serves nobody; 3 s leaves a slow link room and lets a silent
                // peer hold its place a third as long as the former 10 s.
                handshake_timeout: Duration::from_secs(self.handshake_timeout.unwrap_or(3).max(1)),
                // Every node's pool reconnecting at once after a broker restart fits (4 nodes x
                // 32 shims = 128), and so does one node's pool from one address.
                max_handshakes: self.max_handshakes.unwrap_or(256).max(1),
                max_handshakes_per_ip: self.max_handshakes_per_ip.unwrap_or(32).max(1),
            },
            peers: PeerPolicy {
                uids: ids(&self.allow_uid, "--allow-uid", user_id)?,
                gids: ids(&self.allow_gid, "--allow-gid", group_id)?,
            },
            tcp: TcpSecurity {
                tls,
                insecure: self.insecure_tcp.unwrap_or(false),
            },
            kick: self.kick()?,
        })
    }

    /// The `[on_revoke] kick` hook, checked.
    fn kick(&self) -> Result<Option<KickConfig>, ConfigError> {
        let Some(kick) = &self.on_revoke.kick else {
            return Ok(None);
        };
        kick.check()?;
        Ok(Some(kick.clone()))
    }

    /// The rules for every provider call (and the kick hook's HTTP call).
    ///
    /// # Errors
    /// `provider_max_response_bytes` out of range.
    pub(crate) fn provider_policy(&self) -> Result<ProviderPolicy, ConfigError> {
        let max = self
            .provider_max_response_bytes
            .unwrap_or(DEFAULT_MAX_RESPONSE_BYTES);
        // Below 1 KiB no real answer fits; above 1 GiB the cap no longer protects the host.
        if !(1024..=1 << 30).contains(&max) {
            return Err(ConfigError::ProviderMaxResponseBytes { value: max });
        }
        Ok(ProviderPolicy {
            max_response_bytes: max,
            insecure_http: self.insecure_provider_http.unwrap_or(false),
        })
    }

    /// An HTTP endpoint's limits: `max_connections` (else `default`) and the shared timeouts.
    fn endpoint_limits(&self, max_connections: Option<usize>, default: usize) -> EndpointLimits {
        let seconds = |flag: Option<u64>, default: Duration| {
            flag.map_or(default, |s| Duration::from_secs(s.max(1)))
        };
        EndpointLimits {
            max_connections: max_connections.unwrap_or(default).max(1),
            header_timeout: seconds(
                self.endpoint_header_timeout,
                endpoint::DEFAULT_HEADER_TIMEOUT,
            ),
            idle_timeout: seconds(self.endpoint_idle_timeout, endpoint::DEFAULT_IDLE_TIMEOUT),
            request_timeout: seconds(
                self.endpoint_request_timeout,
                endpoint::DEFAULT_REQUEST_TIMEOUT,
            ),
        }
    }

    /// The HTTP front's settings, when `--http-listen` is given.
    fn http_front(
        &self,
        tls: &Option<Arc<rustls::ServerConfig>>,
    ) -> Result<Option<HttpFrontConfig>, ConfigError> {
        let Some(listen) = &self.http_listen else {
            return Ok(None);
        };
        let tls = match (self.http_tls.unwrap_or(false), tls) {
            (true, Some(tls)) => Some(tls.clone()),
            (true, None) => return Err(ConfigError::HttpTlsWithoutCert),
            (false, _) => None,
        };
        let mtls = tls.is_some() && self.client_ca.is_some();
        let secret = self
            .http_secret_file
            .as_deref()
            .map(|p| read_secret(p, "--http-secret-file"))
            .transpose()?;
        if secret.is_none() && !mtls {
            return Err(ConfigError::HttpWithoutSecret);
        }
        let allow = self
            .http_allow
            .iter()
            .map(|s| s.trim().parse().map_err(ConfigError::HttpAllow))
            .collect::<Result<Vec<IpRange>, _>>()?;
        Ok(Some(HttpFrontConfig {
            listen: listen.clone(),
            secret,
            tls,
            mtls,
            allow,
            limits: self.endpoint_limits(
                self.http_max_connections,
                endpoint::DEFAULT_HTTP_CONNECTIONS,
            ),
        }))
    }

    /// The TLS server settings, when `--tls-cert` is given.
    fn tls(&self) -> Result<Option<Arc<rustls::ServerConfig>>, ConfigError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(extauth_protocol::tls::server_config(
                cert,
                key,
                self.client_ca.as_deref(),
            )?)),
            (None, None) if self.client_ca.is_some() => Err(ConfigError::ClientCaWithoutCert),
            (None, None) => Ok(None),
            _ => Err(ConfigError::TlsHalf),
        }
    }

    /// The shared store's settings, when `--redis` is given.
    pub(crate) fn redis_config(&self) -> Option<RedisConfig> {
        let store = &self.store;
        let urls = store
            .redis
            .as_ref()?
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(ConfigUrl::from)
            .collect();
        Some(RedisConfig {
            mode: store.redis_mode.unwrap_or_default(),
            urls,
            master: store
                .redis_master
                .clone()
                .unwrap_or_else(|| "mymaster".into()),
        })
    }

    /// The `[defaults]` table with the validator flags laid over it.
    fn flag_defaults(&self) -> DomainFile {
        let flagged = self.introspection_url.is_some() || self.issuer.is_some();
        let validator = flagged.then(|| {
            ValidatorConfig::Introspection(IntrospectionConfig {
                url: self.introspection_url.clone().map(Into::into),
                issuer: self.issuer.clone().map(Into::into),
                client_id: self.client_id.clone().unwrap_or_default(),
                client_secret: None,
                client_secret_file: self.client_secret_file.clone(),
                client_auth: Default::default(),
                require: Default::default(),
                timeouts: HttpTimeouts {
                    total: self
                        .provider_timeout
                        .map_or(HttpTimeouts::default().total, |s| s as f64),
                    ..HttpTimeouts::default()
                },
            })
        });
        let flags = DomainFile {
            validator,
            subject_claim: (!self.subject_claim.is_empty()).then(|| self.subject_claim.clone()),
            claim_folding: self.claim_folding,
            max_ttl: self.max_ttl,
            negative_ttl: self.negative_ttl,
            seen_ttl: self.seen_ttl,
            ..DomainFile::default()
        };
        flags.over(self.defaults.clone())
    }
}

impl<'de> Deserialize<'de> for RunArgs {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut store = RedisArgs::default();
        let mut args = RunArgs::deserialize(StoreKeys {
            inner: deserializer,
            store: &mut store,
        })?;
        args.store = store;
        Ok(args)
    }
}

/// A deserializer for [`RunArgs`]'s table that reads the [`STORE_KEYS`] into `store` and hands
/// every other key to the derived code. The values are read by the file's own deserializer, so
/// an error in them keeps its line and column.
struct StoreKeys<'a, D> {
    inner: D,
    store: &'a mut RedisArgs,
}

impl<'de, D: serde::Deserializer<'de>> serde::Deserializer<'de> for StoreKeys<'_, D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.inner.deserialize_any(visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        let visitor = StoreVisitor {
            visitor,
            store: self.store,
            fields,
        };
        self.inner.deserialize_struct(name, fields, visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// The derived visitor of [`RunArgs`], given the table through [`StoreMap`].
struct StoreVisitor<'a, V> {
    visitor: V,
    store: &'a mut RedisArgs,
    fields: &'static [&'static str],
}

impl<'de, V: Visitor<'de>> Visitor<'de> for StoreVisitor<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.visitor.expecting(f)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.visitor.visit_map(StoreMap {
            map,
            store: self.store,
            fields: self.fields,
        })
    }
}

/// The table without the [`STORE_KEYS`], which it reads into `store` as it meets them.
struct StoreMap<'a, A> {
    map: A,
    store: &'a mut RedisArgs,
    fields: &'static [&'static str],
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for StoreMap<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let mut seed = Some(seed);
        loop {
            let key = KeySeed {
                seed: &mut seed,
                fields: self.fields,
            };
            match self.map.next_key_seed(key)? {
                None => return Ok(None),
                Some(Key::Field(field)) => return Ok(Some(field)),
                Some(Key::Store("redis")) => self.store.redis = self.map.next_value()?,
                Some(Key::Store("redis_mode")) => self.store.redis_mode = self.map.next_value()?,
                Some(Key::Store("redis_master")) => {
                    self.store.redis_master = self.map.next_value()?
                }
                Some(Key::Store(_)) => self.store.cache_secret_file = self.map.next_value()?,
            }
        }
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        self.map.next_value_seed(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        self.map.size_hint()
    }
}

/// A key of the table: one of [`STORE_KEYS`], or a field of the derived code.
enum Key<F> {
    Store(&'static str),
    Field(F),
}

/// Reads a key; an unknown one is refused here, listing the [`STORE_KEYS`] with the others.
struct KeySeed<'s, K> {
    seed: &'s mut Option<K>,
    fields: &'static [&'static str],
}

impl<'de, K: DeserializeSeed<'de>> DeserializeSeed<'de> for KeySeed<'_, K> {
    type Value = Key<K::Value>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        use serde::de::{Error, IntoDeserializer};
        let name = String::deserialize(d)?;
        if let Some(key) = STORE_KEYS.iter().find(|k| **k == name) {
            return Ok(Key::Store(key));
        }
        if !self.fields.contains(&name.as_str()) {
            static EXPECTED: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
            let fields = self.fields;
            let expected =
                EXPECTED.get_or_init(|| STORE_KEYS.iter().chain(fields).copied().collect());
            return Err(D::Error::unknown_field(&name, expected));
        }
        let seed = self
            .seed
            .take()
            .ok_or_else(|| D::Error::custom("key read twice"))?;
        seed.deserialize(name.into_deserializer()).map(Key::Field)
    }
}

impl DomainFile {
    /// `self` with every unset key taken from `base`.
    fn over(self, base: DomainFile) -> DomainFile {
        DomainFile {
            validator: self.validator.or(base.validator),
            subject_claim: self.subject_claim.or(base.subject_claim),
            jid_claim: self.jid_claim.or(base.jid_claim),
            claim_folding: self.claim_folding.or(base.claim_folding),
            domain_claim: self.domain_claim.or(base.domain_claim),
            max_ttl: self.max_ttl.or(base.max_ttl),
            negative_ttl: self.negative_ttl.or(base.negative_ttl),
            seen_ttl: self.seen_ttl.or(base.seen_ttl),
            stale_if_error: self.stale_if_error.or(base.stale_if_error),
            breaker: self.breaker.or(base.breaker),
            provider_concurrency: self.provider_concurrency.or(base.provider_concurrency),
            isuser: self.isuser.or(base.isuser),
            directory: self.directory.or(base.directory),
        }
    }

    fn resolve(&self) -> Result<DomainConfig, ConfigError> {
        let validator = self.validator.clone().ok_or(ConfigError::NoValidator)?;
        let subject = match (&self.jid_claim, &self.subject_claim) {
            (Some(_), Some(_)) => return Err(ConfigError::SubjectAndJidClaim),
            (Some(jid), None) => Subject::Jid(jid.clone()),
            (None, Some(names)) if names.is_empty() || names.iter().any(String::is_empty) => {
                return Err(ConfigError::EmptySubjectClaim)
            }
            (None, Some(names)) => Subject::Localpart(names.clone()),
            (None, None) => Subject::Localpart(vec![default_subject_claim(&validator).into()]),
        };
        let binding = BindingRules {
            subject,
            folding: self.claim_folding.unwrap_or_default(),
            domain_claim: self.domain_claim.clone(),
        };
        let isuser = self.isuser.unwrap_or_default();
        if isuser == IsUserPolicy::Directory && self.directory.is_none() {
            return Err(ConfigError::DirectoryMissing);
        }
        let seconds = |v: Option<u64>, default: u64, key| match v.unwrap_or(default) {
            0 => Err(ConfigError::ZeroSeconds { key }),
            s => Ok(Duration::from_secs(s)),
        };
        let lifetime = |v: Option<u64>, default: u64, key| {
            let d = seconds(v, default, key)?;
            if d > MAX_LIFETIME {
                return Err(ConfigError::LifetimeTooLong { key });
            }
            Ok(d)
        };
        Ok(DomainConfig {
            validator,
            binding,
            max_ttl: lifetime(self.max_ttl, 300, "max_ttl")?,
            negative_ttl: lifetime(self.negative_ttl, 10, "negative_ttl")?,
            seen_ttl: seconds(self.seen_ttl, 30 * 24 * 3600, "seen_ttl")?,
            stale_if_error: match self.stale_if_error.unwrap_or(0) {
                0 => Duration::ZERO,
                s => lifetime(Some(s), 0, "stale_if_error")?,
            },
            breaker: self.breaker.unwrap_or_default(),
            provider_concurrency: match self
                .provider_concurrency
                .unwrap_or(gate::DEFAULT_CONCURRENCY)
            {
                n @ 1..=4096 => n,
                value => return Err(ConfigError::ProviderConcurrency { value }),
            },
            isuser,
            directory: self.directory.clone(),
        })
    }
}

/// The claim that names the user when `subject_claim` is not set: `username` for RFC 7662
/// introspection (section 2.2: "human-readable identifier for the resource owner") and for a
/// site API, `sub` for RFC 9068 JWT access tokens and OIDC UserInfo (OIDC Core section 5.3.2).
fn default_subject_claim(validator: &ValidatorConfig) -> &'static str {
    match validator {
        ValidatorConfig::Introspection(_) | ValidatorConfig::Http(_) => "username",
        ValidatorConfig::Jwt(_) | ValidatorConfig::Userinfo(_) => "sub",
    }
}

/// A TOML value that is one string or an array of strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl From<OneOrMany> for Vec<String> {
    fn from(v: OneOrMany) -> Self {
        match v {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(list) => list,
        }
    }
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    OneOrMany::deserialize(d).map(Into::into)
}

fn one_or_many_opt<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<String>>, D::Error> {
    one_or_many(d).map(Some)
}

impl DomainConfig {
    /// How long this domain lets verdicts live.
    pub(crate) fn lifetimes(&self) -> Lifetimes {
        Lifetimes {
            max_ttl: self.max_ttl,
            negative_ttl: self.negative_ttl,
            stale_if_error: self.stale_if_error,
        }
    }
}

/// Resolves names or numbers to ids.
fn ids(
    names: &[String],
    flag: &'static str,
    lookup: fn(&str) -> Option<u32>,
) -> Result<Vec<u32>, ConfigError> {
    names
        .iter()
        .map(|n| {
            n.parse()
                .ok()
                .or_else(|| lookup(n))
                .ok_or_else(|| ConfigError::NoSuchId {
                    flag,
                    name: n.clone(),
                })
        })
        .collect()
}

fn user_id(name: &str) -> Option<u32> {
    nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw())
}

fn group_id(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// A TOML error as `line L, column C: message`, without the snippet of the file that
/// `toml::de::Error`'s Display shows and with quoted values replaced by `"..."`: the offending
/// line may hold a secret (a password in a URL, a secret pasted into the wrong key).
fn describe_toml_error(error: &toml::de::Error, text: &str) -> String {
    let at = error.span().map_or_else(String::new, |span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!("line {line}, column {column}: ")
    });
    let mut message = String::new();
    for (i, part) in error.message().split('"').enumerate() {
        match i {
            0 => message.push_str(part),
            _ if i % 2 == 1 => message.push_str("\"..."),
            _ => {
                message.push('"');
                message.push_str(part);
            }
        }
    }
    format!("{at}{message}")
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
        assert!(toml::from_str::<RunArgs>("[domains.\"a\"]\nmax_tll = 3\n").is_err());
        let err = toml::from_str::<RunArgs>(
            "[defaults.validator]\nkind = \"introspection\"\nurl = \"http://x\"\nclient_id = \"c\"\nclient_secret_fil = \"/x\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("client_secret_fil"), "{err}");
    }

    #[test]
    fn config_file_errors_never_show_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(
            &path,
            "max_ttl = 60\nredis = \"redis://:hunter2@h\"\nmax_ttl = \"hunter3\"\n",
        )
        .unwrap();
        let args = RunArgs {
            store: RedisArgs {
                config: Some(path.clone()),
                ..RedisArgs::default()
            },
            ..RunArgs::default()
        };
        let err = format!("{:#}", args.with_file().unwrap_err());
        assert!(!err.contains("hunter"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        std::fs::write(&path, "max_ttl = \"hunter4\"\n").unwrap();
        let args = RunArgs {
            store: RedisArgs {
                config: Some(path),
                ..RedisArgs::default()
            },
            ..RunArgs::default()
        };
        let err = format!("{:#}", args.with_file().unwrap_err());
        assert!(!err.contains("hunter"), "{err}");
        assert!(
            err.contains("line 1, column 11: invalid type: string \"...\""),
            "{err}"
        );
    }

    #[test]
    fn check_config_output_redacts_urls() {
        let dir = tempfile::tempdir().unwrap();
        let cache_secret = dir.path().join("cache");
        std::fs::write(&cache_secret, "c".repeat(32)).unwrap();
        let config = RunArgs {
            introspection_url: Some("https://u:PASSWORD123@idp/i?access_token=PASSWORD123".into()),
            client_secret_file: Some(cache_secret.clone()),
            store: RedisArgs {
                redis: Some("redis://:PASSWORD123@127.0.0.1:1/0".into()),
                cache_secret_file: Some(cache_secret),
                ..RedisArgs::default()
            },
            ..base()
        }
        .into_config()
        .unwrap();
        let shown = format!("{config:#?}");
        assert!(!shown.contains("PASSWORD123"), "{shown}");
        assert!(
            shown.contains("https://u:***@idp/i?access_token=***"),
            "{shown}"
        );
        assert!(shown.contains("redis://:***@127.0.0.1:1/0"), "{shown}");
    }

    #[test]
    fn redis_without_a_cache_secret_is_refused() {
        let args = RunArgs {
            store: RedisArgs {
                redis: Some("redis://127.0.0.1:1".into()),
                ..RedisArgs::default()
            },
            ..base()
        };
        let err = args.into_config().unwrap_err().to_string();
        assert!(err.contains("--cache-secret-file"), "{err}");
    }

    #[test]
    fn flags_alone_serve_every_domain() {
        let config = base().into_config().unwrap();
        assert!(config.domains.is_empty());
        let any = config.any_domain.unwrap();
        assert_eq!(
            any.binding.subject,
            Subject::Localpart(vec!["username".into()]),
            "introspection names the user in `username`"
        );
        assert_eq!(any.binding.folding, Folding::Exact);
        assert_eq!(any.max_ttl, Duration::from_secs(300));
    }

    #[test]
    fn domain_tables_override_defaults_which_flags_override() {
        let file: RunArgs = toml::from_str(
            r#"
            domain = ["plain.example"]
            [defaults]
            max_ttl = 100
            negative_ttl = 7
            [domains."Jwt.Example"]
            jid_claim = "jid"
            max_ttl = 50
            validator = { kind = "introspection", url = "http://127.0.0.1:2/i", client_id = "other", client_auth = "client_secret_post", require = { scopes = ["xmpp"] } }
            "#,
        )
        .unwrap();
        let args = RunArgs {
            max_ttl: Some(200),
            ..base()
        }
        .merge(file);
        let config = args.into_config().unwrap();
        assert!(
            config.any_domain.is_none(),
            "domains configured: others are unknown"
        );
        let plain = &config.domains["plain.example"];
        assert_eq!(
            plain.max_ttl,
            Duration::from_secs(200),
            "flag over [defaults]"
        );
        assert_eq!(
            plain.negative_ttl,
            Duration::from_secs(7),
            "[defaults] over built-in"
        );
        let jwt = &config.domains["jwt.example"];
        assert_eq!(
            jwt.max_ttl,
            Duration::from_secs(50),
            "domain table over flag"
        );
        assert_eq!(jwt.binding.subject, Subject::Jid("jid".into()));
        match &jwt.validator {
            ValidatorConfig::Introspection(i) => {
                assert_eq!(i.client_id, "other");
                assert_eq!(i.require.scopes, vec!["xmpp".to_owned()]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn missing_validator_and_conflicting_claims_are_refused() {
        let args = RunArgs {
            introspection_url: None,
            ..base()
        };
        assert!(args
            .into_config()
            .unwrap_err()
            .to_string()
            .contains("no validator"));
        let file: RunArgs =
            toml::from_str("[domains.\"a\"]\njid_claim = \"jid\"\nsubject_claim = \"sub\"\n")
                .unwrap();
        // As main prints it: the table, then what is wrong with it.
        let err = anyhow::Error::from(base().merge(file).into_config().unwrap_err());
        let err = format!("{err:#}");
        assert_eq!(
            err, "[domains.\"a\"]: give subject_claim or jid_claim, not both",
            "{err}"
        );
    }

    #[test]
    fn provider_rules_default_to_strict_and_are_checked() {
        assert_eq!(
            base().into_config().unwrap().provider,
            ProviderPolicy::default()
        );
        let file: RunArgs =
            toml::from_str("provider_max_response_bytes = 4096\ninsecure_provider_http = true\n")
                .unwrap();
        assert_eq!(
            base().merge(file).into_config().unwrap().provider,
            ProviderPolicy {
                max_response_bytes: 4096,
                insecure_http: true
            }
        );
        for bad in [0, 1023, (1 << 30) + 1] {
            let args = RunArgs {
                provider_max_response_bytes: Some(bad),
                ..base()
            };
            let err = args.into_config().unwrap_err().to_string();
            assert!(err.contains("--provider-max-response-bytes"), "{err}");
        }
    }

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            "unix:/a/b".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/a/b".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:9".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("127.0.0.1:9".into())
        );
        assert!("udp:1".parse::<ListenAddr>().is_err());
    }
}
