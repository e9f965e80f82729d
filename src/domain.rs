//! The served domains (vhosts): for each, its settings, its validator, its user directory and
//! the [`Decider`] that turns its validator's answers into verdicts. Built at start-up and on
//! reload; the engine looks a request's domain up here and hands its parts to the flight.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{Config, DomainConfig};
use crate::decision::Decider;
use crate::directory::Directory;
use crate::validate::http::ProviderPolicy;
use crate::validate::{self, ProviderError, SetupError, Validator};

/// A domain whose validator or directory cannot be built.
#[derive(Debug, thiserror::Error)]
#[error("domain {domain}: {error}")]
pub(crate) struct DomainError {
    /// The domain as configured (`*` for the one serving any domain).
    pub domain: String,
    /// What is wrong with its settings (part of the message, so not a separate cause).
    pub error: SetupError,
}

/// One served domain.
pub(crate) struct Domain {
    /// Its settings.
    pub config: DomainConfig,
    /// Its validator (behind a circuit breaker).
    pub validator: Arc<dyn Validator>,
    /// Its user directory, when `isuser = "directory"`.
    pub directory: Option<Directory>,
    /// How its validator's answers become verdicts.
    pub decider: Decider,
}

/// Every served domain, looked up by the (lowercase) domain ejabberd sends.
pub(crate) struct Domains {
    named: HashMap<String, Arc<Domain>>,
    /// Serves any domain when none is configured.
    any: Option<Arc<Domain>>,
}

impl Domains {
    /// Builds every domain's validator.
    ///
    /// # Errors
    /// [`DomainError`]: a validator or directory that cannot be built, naming its domain.
    pub(crate) fn build(config: &Config) -> Result<Domains, DomainError> {
        let build = |name: &str, c| {
            Domain::build(c, &config.provider)
                .map(Arc::new)
                .map_err(|error| DomainError {
                    domain: name.to_owned(),
                    error,
                })
        };
        let mut named = HashMap::new();
        for (name, c) in &config.domains {
            named.insert(name.clone(), build(name, c)?);
        }
        let any = config
            .any_domain
            .as_ref()
            .map(|c| build("*", c))
            .transpose()?;
        Ok(Domains { named, any })
    }

    /// The domain serving `name`, if any.
    pub(crate) fn get(&self, name: &str) -> Option<&Arc<Domain>> {
        self.named.get(name).or(self.any.as_ref())
    }

    /// Every domain with its name (`*` for the one serving any domain).
    fn all(&self) -> impl Iterator<Item = (&str, &Arc<Domain>)> {
        let named = self.named.iter().map(|(n, d)| (n.as_str(), d));
        named.chain(self.any.iter().map(|d| ("*", d)))
    }

    /// Discovers now the endpoint of every validator configured with `issuer` alone:
    /// `(domain, what is discovered, the URL or why not)`, for `check-config`.
    pub(crate) async fn discover(&self) -> Vec<(String, String, Result<String, ProviderError>)> {
        let mut found = Vec::new();
        for (name, domain) in self.all() {
            if let Some(url) = domain.validator.discovered() {
                let got = url.get().await;
                found.push((name.to_owned(), url.to_string(), got));
            }
        }
        found
    }

    /// Starts discovering endpoints in the background, so the first login does not wait for
    /// it (and a provider that cannot be discovered is logged at start-up).
    pub(crate) fn prefetch(&self) {
        for (_, domain) in self.all() {
            if let Some(url) = domain.validator.discovered() {
                tokio::spawn(async move {
                    let _ = url.get().await;
                });
            }
        }
    }
}

impl Domain {
    /// Builds the domain's validator and directory.
    ///
    /// # Errors
    /// [`SetupError`]: a validator or directory that cannot be built (the message names the
    /// setting).
    pub(crate) fn build(
        config: &DomainConfig,
        policy: &ProviderPolicy,
    ) -> Result<Domain, SetupError> {
        let validator = validate::build(
            &config.validator,
            config.breaker,
            config.provider_concurrency,
            policy,
        )?;
        let directory = config
            .directory
            .clone()
            .map(|d| Directory::new(d, policy))
            .transpose()?;
        Ok(Domain {
            config: config.clone(),
            decider: Decider::new(config.binding.clone(), config.lifetimes(), validator.kind()),
            validator,
            directory,
        })
    }
}
