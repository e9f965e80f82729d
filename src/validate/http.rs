//! What every provider call shares (validators, JWKS fetches, the `isuser` directory): a client
//! with timeouts, one retry on connection errors, no redirects, bounded bodies, `http://` only
//! to loopback unless allowed, and error messages that never carry a token or a secret.

use std::net::IpAddr;
use std::time::Duration;

use reqwest::header::LOCATION;
use serde::Deserialize;
use tracing::warn;

use super::{ProviderError, SetupError};
use crate::secrets::redact_url;

/// Default of [`ProviderPolicy::max_response_bytes`]: 1 MiB, hundreds of times an
/// introspection answer, a userinfo document or a JWK Set of a dozen RSA keys.
pub(crate) const DEFAULT_MAX_RESPONSE_BYTES: u64 = 1 << 20;

/// Broker-wide rules for every provider call (flags `--provider-max-response-bytes`,
/// `--insecure-provider-http`; TOML `provider_max_response_bytes`, `insecure_provider_http`).
///
/// Broker-wide rather than per validator: the cap bounds the memory of the whole process (cap x
/// provider calls in flight), which is sized per host, not per provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProviderPolicy {
    /// Largest response body read, bytes; a larger answer is refused (`upstream_unavailable`)
    /// [default: [`DEFAULT_MAX_RESPONSE_BYTES`]].
    pub max_response_bytes: u64,
    /// Allow `http://` URLs to hosts that are not loopback (tokens and client secrets then
    /// cross the network in clear) [default: false].
    pub insecure_http: bool,
}

impl Default for ProviderPolicy {
    fn default() -> Self {
        ProviderPolicy {
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            insecure_http: false,
        }
    }
}

/// Timeouts of one validator's HTTP calls: TOML `timeouts = { connect = 2, total = 5 }`, seconds.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HttpTimeouts {
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
    /// [`SetupError::Timeout`] naming the bad value.
    pub(crate) fn check(&self) -> Result<(), SetupError> {
        for (name, v) in [
            ("timeouts.connect", self.connect),
            ("timeouts.total", self.total),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 300.0) {
                return Err(SetupError::Timeout {
                    setting: name,
                    seconds: v,
                });
            }
        }
        Ok(())
    }
}

/// An HTTP client for one provider endpoint: both timeouts set (reqwest has none by default), a
/// bounded idle pool, redirects never followed, answers read up to a size cap.
#[derive(Clone)]
pub(crate) struct ProviderClient {
    http: reqwest::Client,
    /// Names the call in messages: "introspection", "JWKS", ...
    what: &'static str,
    max_body: u64,
}

impl ProviderClient {
    /// Checks `url` (the setting named `setting`, see [`check_url`]) and `timeouts`, and builds
    /// the client for calls named `what` in messages.
    ///
    /// # Errors
    /// A bad URL or timeout (naming `setting`), or a TLS set-up failure.
    pub(crate) fn new(
        what: &'static str,
        setting: &str,
        url: &str,
        timeouts: HttpTimeouts,
        policy: &ProviderPolicy,
    ) -> Result<Self, SetupError> {
        check_url(setting, url, policy)?;
        timeouts.check()?;
        extauth_protocol::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs_f64(
                timeouts.connect.min(timeouts.total),
            ))
            .timeout(Duration::from_secs_f64(timeouts.total))
            .pool_max_idle_per_host(64)
            // A redirect would re-send the token (and a client secret in a form) to wherever the
            // answer points, and the broker would believe that host's answer.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("extauth-broker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SetupError::Client(e.to_string()))?;
        Ok(ProviderClient {
            http,
            what,
            max_body: policy.max_response_bytes,
        })
    }

    /// A request to `url` (the checked URL, or one expanded from a checked template).
    pub(crate) fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        self.http.request(method, url)
    }

    /// Sends `request`, once more if the first attempt failed to connect (nothing reached the
    /// provider, so a retry cannot double an effect).
    ///
    /// # Errors
    /// [`ProviderError::Transport`] or [`ProviderError::Redirect`] (3xx), without token or
    /// secret.
    pub(crate) async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ProviderError> {
        let retry = request.try_clone();
        let response = match (request.send().await, retry) {
            (Err(e), Some(again)) if e.is_connect() => again.send().await,
            (first, _) => first,
        }
        .map_err(|e| describe(self.what, &e))?;
        if response.status().is_redirection() {
            return Err(self.redirect_refused(&response));
        }
        Ok(response)
    }

    /// Reads the body chunk by chunk, up to the cap: an announced `Content-Length` over it is
    /// refused before reading, a stream that grows over it is dropped at the first chunk past it
    /// (which closes the connection).
    ///
    /// # Errors
    /// [`ProviderError::TooLarge`], or [`ProviderError::Transport`] while reading.
    pub(crate) async fn body(
        &self,
        mut response: reqwest::Response,
    ) -> Result<Vec<u8>, ProviderError> {
        let too_large = || ProviderError::TooLarge {
            what: self.what,
            limit: self.max_body,
        };
        let announced = response.content_length().unwrap_or(0);
        if announced > self.max_body {
            return Err(too_large());
        }
        let mut body = Vec::with_capacity(announced as usize);
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| describe(self.what, &e))?
        {
            if (body.len() + chunk.len()) as u64 > self.max_body {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// Reads the body ([`ProviderClient::body`]) as JSON.
    ///
    /// # Errors
    /// As [`ProviderClient::body`], or [`ProviderError::Malformed`] ("is not JSON").
    pub(crate) async fn json(
        &self,
        response: reqwest::Response,
    ) -> Result<serde_json::Value, ProviderError> {
        let body = self.body(response).await?;
        serde_json::from_slice(&body).map_err(|_| self.malformed("is not JSON"))
    }

    /// [`ProviderError::Malformed`] for this call.
    pub(crate) fn malformed(&self, problem: impl Into<String>) -> ProviderError {
        ProviderError::Malformed {
            what: self.what,
            problem: problem.into(),
        }
    }

    /// [`ProviderError::Status`] for this call: `response`'s status when the protocol gives it
    /// no meaning.
    pub(crate) fn status(&self, response: &reqwest::Response) -> ProviderError {
        ProviderError::Status {
            what: self.what,
            status: response.status().as_u16(),
        }
    }

    /// The error for a 3xx answer: its status, the URL asked (redacted) and where the answer
    /// pointed ([`shown_location`]).
    fn redirect_refused(&self, response: &reqwest::Response) -> ProviderError {
        let target = match response.headers().get(LOCATION) {
            Some(l) => shown_location(response.url(), &String::from_utf8_lossy(l.as_bytes())),
            None => "nowhere".to_owned(),
        };
        ProviderError::Redirect {
            what: self.what,
            url: redact_url(response.url().as_str()),
            status: response.status().as_u16(),
            target,
        }
    }
}

/// A redirect target as it may be logged: scheme, host, port and at most 200 characters of path.
/// User info, query and fragment are left out (a query is shown as `?...`): they may carry a
/// secret, and the provider chose them.
fn shown_location(base: &reqwest::Url, location: &str) -> String {
    let Ok(url) = base.join(location) else {
        return "an unparsable Location".to_owned();
    };
    let mut shown = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown.extend(url.path().chars().take(200));
    if url.query().is_some() || url.fragment().is_some() {
        shown.push_str("?...");
    }
    shown
}

/// Checks a configured endpoint: an absolute `http://` or `https://` URL with a host, once any
/// `{user}` and `{domain}` placeholders are filled in; `http://` only to a loopback host
/// (127.0.0.0/8, `::1`, `localhost`) unless `policy.insecure_http`, and then with a warning.
///
/// # Errors
/// [`SetupError::NotHttpUrl`] or [`SetupError::PlainHttp`] naming `setting` and the value, its
/// credentials redacted ([`redact_url`]).
pub(crate) fn check_url(
    setting: &str,
    url: &str,
    policy: &ProviderPolicy,
) -> Result<(), SetupError> {
    let parsed = match reqwest::Url::parse(&expand_template(url, "u", "d")) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => u,
        _ => {
            return Err(SetupError::NotHttpUrl {
                setting: setting.to_owned(),
                url: redact_url(url),
            })
        }
    };
    if parsed.scheme() == "https" || is_loopback(&parsed) {
        return Ok(());
    }
    if !policy.insecure_http {
        return Err(SetupError::PlainHttp {
            setting: setting.to_owned(),
            url: redact_url(url),
        });
    }
    warn!(
        "{setting} {:?}: plain http:// to a host that is not loopback (insecure_provider_http): \
         tokens and client secrets cross the network in clear",
        redact_url(url)
    );
    Ok(())
}

/// Is the URL's host 127.0.0.0/8, `::1` or `localhost`? (The URL parser has already turned
/// `127.1` or `0x7f.1` into `127.0.0.1` and lower-cased names.)
fn is_loopback(url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    match host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host == "localhost",
    }
}

/// Parses a configured HTTP method (`GET`, `post`, ...; case-insensitive).
///
/// # Errors
/// [`SetupError::Method`] when `name` is not an HTTP token (RFC 9110 section 9.1).
pub(crate) fn method(setting: &str, name: &str) -> Result<reqwest::Method, SetupError> {
    reqwest::Method::from_bytes(name.to_uppercase().as_bytes()).map_err(|_| SetupError::Method {
        setting: setting.to_owned(),
        name: name.to_owned(),
    })
}

/// Expands `{user}` and `{domain}` in a URL template, percent-encoding each value (RFC 3986
/// section 2.1) so a localpart like `a&b` or `a/b` cannot change the URL's structure.
pub(crate) fn expand_template(template: &str, user: &str, domain: &str) -> String {
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
fn describe(what: &'static str, e: &reqwest::Error) -> ProviderError {
    let failure = if e.is_timeout() {
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
    ProviderError::Transport {
        what,
        failure,
        detail,
    }
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
        let strict = ProviderPolicy::default();
        assert!(check_url("url", "https://api.example/users/{user}@{domain}", &strict).is_ok());
        assert!(check_url("url", "http://127.0.0.1:8080/userinfo", &strict).is_ok());
        for bad in ["ftp://x/", "https://", "/relative", "not a url"] {
            assert!(check_url("url", bad, &strict).is_err(), "{bad}");
        }
        let err = check_url(
            "introspection url",
            "ftp://u:PASSWORD123@127.0.0.1/x",
            &strict,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "introspection url must be an http:// or https:// URL, got \"ftp://u:***@127.0.0.1/x\""
        );
        assert_eq!(method("method", "post"), Ok(reqwest::Method::POST));
        assert!(method("method", "GE T").is_err());
    }

    #[test]
    fn plain_http_is_for_loopback_unless_allowed() {
        let strict = ProviderPolicy::default();
        for local in [
            "http://127.0.0.1/x",
            "http://127.9.8.7:81/x",
            "http://127.1/x",
            "http://[::1]:8080/x",
            "http://LOCALHOST/x",
            "http://localhost:9/{user}",
        ] {
            assert!(check_url("url", local, &strict).is_ok(), "{local}");
        }
        for remote in [
            "http://192.0.2.1/x",
            "http://idp.example/x",
            "http://localhost.example/x",
            "http://[::ffff:127.0.0.1]/x",
            "http://{domain}/users/{user}",
        ] {
            assert!(check_url("url", remote, &strict).is_err(), "{remote}");
        }
        let err = check_url(
            "jwks_url",
            "http://u:PASSWORD123@idp.example/k?access_token=PASSWORD123",
            &strict,
        )
        .unwrap_err()
        .to_string();
        assert!(!err.contains("PASSWORD123"), "{err}");
        assert!(
            err.starts_with("jwks_url \"http://u:***@idp.example/k?access_token=***\": http://"),
            "{err}"
        );
        assert!(err.contains("insecure_provider_http"), "{err}");
        let insecure = ProviderPolicy {
            insecure_http: true,
            ..strict
        };
        assert!(check_url("url", "http://idp.example/x", &insecure).is_ok());
    }

    #[test]
    fn redirect_targets_are_shown_without_secrets() {
        let base = reqwest::Url::parse("https://idp.example/introspect").unwrap();
        assert_eq!(
            shown_location(
                &base,
                "https://u:SECRET@evil.example:8443/steal?token=SECRET#x"
            ),
            "https://evil.example:8443/steal?..."
        );
        assert_eq!(shown_location(&base, "/login"), "https://idp.example/login");
        assert_eq!(
            shown_location(&base, "http://[::1"),
            "an unparsable Location"
        );
    }

    fn client(url: &str, max_response_bytes: u64) -> ProviderClient {
        let policy = ProviderPolicy {
            max_response_bytes,
            insecure_http: false,
        };
        ProviderClient::new("test", "url", url, HttpTimeouts::default(), &policy).unwrap()
    }

    /// Serves `head` (status line and headers) then `body_len` bytes to each connection, and
    /// closes it; returns the server's URL.
    async fn raw_server(head: &'static str, body_len: usize) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await;
                let head = head.replace("{len}", &body_len.to_string());
                let mut answer = head.into_bytes();
                answer.resize(answer.len() + body_len, b'x');
                let _ = stream.write_all(&answer).await;
            }
        });
        url
    }

    #[tokio::test]
    async fn bodies_over_the_cap_are_refused_announced_or_streamed() {
        let announced = raw_server("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n", 2048).await;
        let streamed = raw_server("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", 2048).await;
        for url in [&announced, &streamed] {
            let small = client(url, 1024);
            let response = small.send(small.request(reqwest::Method::GET, url)).await;
            assert_eq!(
                small.body(response.unwrap()).await,
                Err(ProviderError::TooLarge {
                    what: "test",
                    limit: 1024
                }),
                "{url}"
            );
            let fits = client(url, 2048);
            let response = fits.send(fits.request(reqwest::Method::GET, url)).await;
            assert_eq!(fits.body(response.unwrap()).await.unwrap().len(), 2048);
        }
    }

    #[tokio::test]
    async fn redirects_are_answers_never_followed() {
        use wiremock::matchers::any;
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let (asked, elsewhere) = (MockServer::start().await, MockServer::start().await);
        Mock::given(any())
            .respond_with(ResponseTemplate::new(200))
            .expect(0)
            .mount(&elsewhere)
            .await;
        for status in [301, 302, 303, 307, 308] {
            Mock::given(any())
                .respond_with(ResponseTemplate::new(status).insert_header(
                    "location",
                    format!("{}/steal?token=SECRET", elsewhere.uri()).as_str(),
                ))
                .up_to_n_times(1)
                .mount(&asked)
                .await;
            let url = format!("{}/introspect?client_secret=SECRET", asked.uri());
            let c = client(&url, 1024);
            let err = c
                .send(c.request(reqwest::Method::POST, &url).body("token=SECRET"))
                .await
                .unwrap_err()
                .to_string();
            assert!(!err.contains("SECRET"), "{err}");
            assert!(
                err.starts_with(&format!(
                    "test endpoint {}/introspect?client_secret=*** answered HTTP {status}, a redirect to \"{}/steal?...\"",
                    asked.uri(),
                    elsewhere.uri()
                )),
                "{err}"
            );
        }
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
