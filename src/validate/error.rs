//! The validators' two error types: what stops one from being built ([`SetupError`], at start
//! or reload: the configuration is refused) and what stops one from answering
//! ([`ProviderError`], per call: the login fails closed as `upstream_unavailable` and nothing is
//! cached). Messages name the setting or the call ("introspection", "JWKS"), never a token, a
//! secret or a URL's credentials (URLs are shown through `secrets::redact_url`).

use thiserror::Error;

/// A validator (or the HTTP client of one of its endpoints) that cannot be built from its
/// configuration.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SetupError {
    /// An endpoint that is not an absolute `http://` or `https://` URL with a host.
    #[error("{setting} must be an http:// or https:// URL, got {url:?}")]
    NotHttpUrl {
        /// The setting (`url`, `jwks_url`, ...).
        setting: String,
        /// The value, redacted.
        url: String,
    },
    /// A plain `http://` endpoint on a host that is not loopback, without
    /// `insecure_provider_http`.
    #[error(
        "{setting} {url:?}: http:// is only allowed to a loopback host (127.0.0.0/8, ::1, \
         localhost), tokens and client secrets would cross the network in clear; use https://, \
         or set insecure_provider_http = true (--insecure-provider-http)"
    )]
    PlainHttp {
        /// The setting.
        setting: String,
        /// The value, redacted.
        url: String,
    },
    /// A timeout outside (0, 300] seconds.
    #[error("{setting} must be in (0, 300] seconds, got {seconds}")]
    Timeout {
        /// `timeouts.connect` or `timeouts.total`.
        setting: &'static str,
        /// The value (s).
        seconds: f64,
    },
    /// A method that is not an HTTP token (RFC 9110 section 9.1).
    #[error("{setting}: bad HTTP method {name:?}")]
    Method {
        /// The setting.
        setting: String,
        /// The value.
        name: String,
    },
    /// A secret file that cannot be read or is empty (the message names the file, never its
    /// content).
    #[error("{0}")]
    SecretFile(String),
    /// The HTTP client itself (TLS set-up).
    #[error("building the HTTP client: {0}")]
    Client(String),
    /// A rule of one validator kind: missing or conflicting settings (the message names them).
    #[error("{0}")]
    Rule(String),
}

/// Why a provider gave no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub(crate) enum ProviderError {
    /// No answer: could not connect, timed out, or the transport failed. `detail` is the
    /// innermost cause (a TLS or socket error), without the URL.
    #[error("{what} request {failure}: {detail}")]
    Transport {
        /// The call: "introspection", "userinfo", "JWKS", ...
        what: &'static str,
        /// "could not connect", "timed out" or "failed".
        failure: &'static str,
        /// The innermost cause.
        detail: String,
    },
    /// A 3xx answer: redirects are never followed, they would re-send the token elsewhere.
    #[error(
        "{what} endpoint {url} answered HTTP {status}, a redirect to {target:?}: redirects are \
         never followed (configure the final URL)"
    )]
    Redirect {
        /// The call.
        what: &'static str,
        /// The URL asked, redacted.
        url: String,
        /// The 3xx status.
        status: u16,
        /// Where it pointed: scheme, host, port, at most 200 characters of path.
        target: String,
    },
    /// An HTTP status the protocol gives no meaning to here (5xx, 404, ...).
    #[error("{what} endpoint answered HTTP {status}")]
    Status {
        /// The call.
        what: &'static str,
        /// The status.
        status: u16,
    },
    /// 401 or 403 for the broker's own client credentials (RFC 7662 section 2.1), not the token.
    #[error("{what} endpoint refused the broker's client credentials (HTTP {status})")]
    CredentialsRefused {
        /// The call.
        what: &'static str,
        /// 401 or 403.
        status: u16,
    },
    /// An answer over the size cap (`max_response_bytes`), refused unread or cut at the chunk
    /// that crossed it.
    #[error("{what} answer larger than {limit} bytes")]
    TooLarge {
        /// The call.
        what: &'static str,
        /// The cap (bytes).
        limit: u64,
    },
    /// An answer that is not what the protocol says: not JSON, not an object, no boolean
    /// `active`, a non-numeric `exp`, not a JWK set, metadata naming another issuer...
    #[error("{what} answer {problem}")]
    Malformed {
        /// The call.
        what: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// Nothing to ask: the endpoint could not be discovered (OpenID Connect Discovery 1.0,
    /// RFC 8414); `detail` says what each metadata URL answered.
    #[error("discovering the endpoints of {issuer}: {detail}")]
    Discovery {
        /// The configured issuer, redacted.
        issuer: String,
        /// Every attempt's error.
        detail: String,
    },
    /// The JWK Set could not be had, and the token's key is not among those known
    /// (RFC 7517 section 5).
    #[error("JWKS from {from}: {detail}")]
    KeySet {
        /// Where the set comes from (URL redacted, or file).
        from: String,
        /// What went wrong.
        detail: String,
    },
    /// The validator's circuit is open after repeated failures: failing fast.
    #[error("{kind} circuit open: failing fast")]
    CircuitOpen {
        /// The validator kind.
        kind: &'static str,
    },
    /// The domain's validator is being replaced by a reload.
    #[error("the broker is reloading this domain")]
    Reloading,
}
