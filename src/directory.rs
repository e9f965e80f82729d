//! `isuser` answers from a user directory: an HTTP endpoint that says whether an account exists.
//!
//! ejabberd asks `isuser` before storing offline messages; a wrong `0` bounces them. So only a
//! definitive answer counts: `200` means the user exists, `404` that it does not (both cached for
//! `ttl`); anything else (5xx, a redirect, timeout, other codes) is no answer, and the engine
//! falls back to the "seen" set without caching. The status decides: the body is never read.

use std::path::PathBuf;
use std::time::Duration;

use moka::future::Cache;
use serde::Deserialize;
use tracing::warn;

use crate::keys::Key;
use crate::secrets::ConfigUrl;
use crate::validate::http::{self, HttpTimeouts, ProviderClient, ProviderPolicy};
use crate::validate::SetupError;
use extauth_protocol::extauth::Secret;

/// Settings of a directory (TOML: `directory = { url = "https://api/users/{user}@{domain}" }`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DirectoryConfig {
    /// URL template; `{user}` and `{domain}` are replaced, percent-encoded.
    pub url: ConfigUrl,
    /// HTTP method [default: GET].
    #[serde(default = "default_method")]
    pub method: String,
    /// File whose first line is sent as `Authorization: Bearer ...`.
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    /// Seconds a 200 or 404 answer is cached in process [default: 60].
    #[serde(default = "default_ttl")]
    pub ttl: u64,
    /// Connect and total timeouts.
    #[serde(default)]
    pub timeouts: HttpTimeouts,
}

fn default_method() -> String {
    "GET".into()
}

fn default_ttl() -> u64 {
    60
}

/// A directory client with its answer cache.
pub(crate) struct Directory {
    http: ProviderClient,
    method: reqwest::Method,
    config: DirectoryConfig,
    bearer: Option<Secret>,
    answers: Cache<Key, bool>,
}

impl Directory {
    /// Builds the client under the broker-wide provider `policy`.
    ///
    /// # Errors
    /// A bad method, URL, timeout or unreadable token file.
    pub(crate) fn new(
        config: DirectoryConfig,
        policy: &ProviderPolicy,
    ) -> Result<Self, SetupError> {
        let http = ProviderClient::new(
            "directory",
            "directory url",
            config.url.expose(),
            config.timeouts,
            policy,
        )?;
        let method = http::method("directory method", &config.method)?;
        let bearer = match &config.bearer_token_file {
            Some(path) => Some(
                crate::secrets::read_secret(path, "directory.bearer_token_file")
                    .map_err(|e| SetupError::SecretFile(format!("{e:#}")))?,
            ),
            None => None,
        };
        let answers = Cache::builder()
            .max_capacity(1_000_000)
            .time_to_live(Duration::from_secs(config.ttl.max(1)))
            .build();
        Ok(Directory {
            http,
            method,
            config,
            bearer,
            answers,
        })
    }

    /// Does `user@domain` exist? `None` when the directory gave no definitive answer.
    pub(crate) async fn exists(&self, user: &str, domain: &str, user_key: Key) -> Option<bool> {
        if let Some(known) = self.answers.get(&user_key).await {
            return Some(known);
        }
        let url = http::expand_template(self.config.url.expose(), user, domain);
        let mut request = self.http.request(self.method.clone(), &url);
        if let Some(bearer) = &self.bearer {
            request = request.bearer_auth(bearer.expose());
        }
        let answer = match self.http.send(request).await {
            Ok(r) if r.status().is_success() => Some(true),
            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => Some(false),
            Ok(r) => {
                warn!(
                    user,
                    domain,
                    status = r.status().as_u16(),
                    "directory gave no answer; using the seen set"
                );
                None
            }
            Err(why) => {
                warn!(user, domain, "{why}; using the seen set");
                None
            }
        };
        if let Some(exists) = answer {
            self.answers.insert(user_key, exists).await;
        }
        answer
    }
}
