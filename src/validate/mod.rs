//! Token validators: ask an OAuth provider whether a token is valid and whose it is.
//!
//! A validator only reports what the provider said ([`Validation`]); binding the token to the JID
//! (subject claim vs. localpart) and caching are the engine's job, the same for every validator.

pub mod introspection;

use std::future::Future;
use std::pin::Pin;

use crate::extauth::Secret;
use crate::wire::Reason;

/// What a provider said about a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Validation {
    /// The token is active. `subject` is the user claim as the provider spelled it (not yet
    /// normalised); `exp` is the expiry in seconds since the Unix epoch, if the provider gave one.
    Valid { subject: Option<String>, exp: Option<u64> },
    /// A definitive "no" (cacheable as a negative verdict), with its reason.
    Invalid(Reason),
    /// The provider could not answer (transport error, timeout, 5xx, unparseable body). Never
    /// cached. The message is for logs and holds no secret.
    Unavailable(String),
}

/// A boxed future, so validators can live behind `dyn Validator`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A token validator (one per provider kind).
pub trait Validator: Send + Sync {
    /// Asks the provider about `token`. Must not log the token.
    fn validate<'a>(&'a self, token: &'a Secret) -> BoxFuture<'a, Validation>;
}
