//! What every HTTP-based validator shares: a client with timeouts, one retry on connection
//! errors, and error messages that never carry a token.

use std::time::Duration;

use serde::Deserialize;

use crate::config::redact_url;

/// Timeouts of one validator's HTTP calls: TOML `timeouts = { connect = 2, total = 5 }`, seconds.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTimeouts {
    /// Time to establish a connection, seconds [default: 2].
    #[serde(default = "default_connect_timeout")]
    pub connect: f64,
    /// Total time of one call including the body, seconds [default: 5].
    #[serde(default = "default_timeout")]
    pub total: f64,
}

fn default_connect_timeout() -> f64 {
    2.0
}

fn default_timeout() -> f64 {
    5.0
}

impl Default for HttpTimeouts {
    fn default() -> Self {
        HttpTimeouts {
            connect: default_connect_timeout(),
            total: default_timeout(),
        }
    }
}

impl HttpTimeouts {
    /// Checks both are positive and at most 300 s.
    ///
    /// # Errors
    /// A message naming the bad value.
    pub fn check(&self) -> Result<(), String> {
        for (name, v) in [
            ("timeouts.connect", self.connect),
            ("timeouts.total", self.total),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 300.0) {
                return Err(format!("{name} must be in (0, 300] seconds, got {v}"));
            }
        }
        Ok(())
    }
}

/// Builds a client with both timeouts set (reqwest has none by default) and a bounded idle pool.
///
/// # Errors
/// When TLS cannot be set up.
pub fn client(timeouts: HttpTimeouts) -> reqwest::Result<reqwest::Client> {
    crate::daemon::install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs_f64(
            timeouts.connect.min(timeouts.total),
        ))
        .timeout(Duration::from_secs_f64(timeouts.total))
        .pool_max_idle_per_host(64)
        .user_agent(concat!("extauth-broker/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Sends `request`, once more if the first attempt failed to connect (nothing reached the
/// provider, so a retry cannot double an effect).
///
/// # Errors
/// A message without URL or body (`what` names the call, e.g. "introspection").
pub async fn send(
    request: reqwest::RequestBuilder,
    what: &str,
) -> Result<reqwest::Response, String> {
    let retry = request.try_clone();
    match request.send().await {
        Ok(r) => Ok(r),
        Err(e) if e.is_connect() => match retry {
            Some(again) => again.send().await.map_err(|e| describe(what, &e)),
            None => Err(describe(what, &e)),
        },
        Err(e) => Err(describe(what, &e)),
    }
}

/// Checks a configured endpoint: an absolute `http://` or `https://` URL with a host, once any
/// `{user}` and `{domain}` placeholders are filled in.
///
/// # Errors
/// A message naming `setting` and the bad value, its credentials redacted ([`redact_url`]).
pub fn check_url(setting: &str, url: &str) -> Result<(), String> {
    match reqwest::Url::parse(&expand_template(url, "u", "d")) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => Ok(()),
        _ => Err(format!(
            "{setting} must be an http:// or https:// URL, got {:?}",
            redact_url(url)
        )),
    }
}

/// Parses a configured HTTP method (`GET`, `post`, ...; case-insensitive).
///
/// # Errors
/// A message naming `setting` when `name` is not an HTTP token (RFC 9110 section 9.1).
pub fn method(setting: &str, name: &str) -> Result<reqwest::Method, String> {
    reqwest::Method::from_bytes(name.to_uppercase().as_bytes())
        .map_err(|_| format!("{setting}: bad HTTP method {name:?}"))
}

/// Expands `{user}` and `{domain}` in a URL template, percent-encoding each value (RFC 3986
/// section 2.1) so a localpart like `a&b` or `a/b` cannot change the URL's structure.
pub fn expand_template(template: &str, user: &str, domain: &str) -> String {
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    template
        .replace(
            "{user}",
            &utf8_percent_encode(user, NON_ALPHANUMERIC).to_string(),
        )
        .replace(
            "{domain}",
            &utf8_percent_encode(domain, NON_ALPHANUMERIC).to_string(),
        )
}

/// A transport error as a log-safe message: reqwest names the URL, which may embed credentials
/// (`https://user:password@host`), so only the innermost cause is kept.
fn describe(what: &str, e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    format!("{what} request {kind}: {detail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_encode_their_values() {
        assert_eq!(
            expand_template(
                "https://api/users/{user}?d={domain}",
                "a&b/c",
                "example.com"
            ),
            "https://api/users/a%26b%2Fc?d=example%2Ecom"
        );
        assert_eq!(
            expand_template("http://x/{user}/{user}", "é", "d"),
            "http://x/%C3%A9/%C3%A9"
        );
    }

    #[test]
    fn urls_and_methods_are_checked() {
        assert!(check_url("url", "https://api.example/users/{user}@{domain}").is_ok());
        assert!(check_url("url", "http://127.0.0.1:8080/userinfo").is_ok());
        for bad in ["ftp://x/", "https://", "/relative", "not a url"] {
            assert!(check_url("url", bad).is_err(), "{bad}");
        }
        let err = check_url("introspection url", "ftp://u:PASSWORD123@127.0.0.1/x").unwrap_err();
        assert_eq!(
            err,
            "introspection url must be an http:// or https:// URL, got \"ftp://u:***@127.0.0.1/x\""
        );
        assert_eq!(method("method", "post"), Ok(reqwest::Method::POST));
        assert!(method("method", "GE T").is_err());
    }

    #[test]
    fn timeouts_are_checked() {
        assert!(HttpTimeouts::default().check().is_ok());
        assert!(HttpTimeouts {
            connect: 0.0,
            total: 5.0
        }
        .check()
        .is_err());
        assert!(HttpTimeouts {
            connect: 1.0,
            total: f64::NAN
        }
        .check()
        .is_err());
    }
}
