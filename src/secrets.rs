//! Secrets in configuration: URLs that may embed credentials ([`ConfigUrl`], shown only
//! through [`redact_url`]) and secret files ([`read_secret`]).
//!
//! A leaf module: configuration, validators, the Redis store and the CLI all use it, and it
//! uses none of them.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use extauth_protocol::extauth::Secret;

/// Words that mark a query or fragment parameter as secret, matched case-insensitively inside
/// its key (`access_token`, `client_secret`, `passwd`, `api_key`, `Authorization`, `sig`, ...).
const SECRET_PARAMS: [&str; 6] = ["token", "secret", "pass", "key", "auth", "sig"];

/// A URL as it may appear in a log line or an error message: a userinfo password becomes `***`
/// (`redis://:pw@host` -> `redis://:***@host`, `ftp://u:pw@host/x` -> `ftp://u:***@host/x`), a
/// userinfo without `:` (a token used as user name) becomes `***` as a whole, and so does the
/// value of every query or fragment parameter whose key names a secret (`?access_token=***`).
///
/// Works on text rather than a parsed URL so that a malformed or templated URL (`{user}`), the
/// very one an error message is about, is still redacted and otherwise shown as written. A
/// comma-separated list of URLs (`--redis` with sentinels or cluster seeds) is redacted item by
/// item. The userinfo is what precedes the last `@` before the first `/` after the scheme, as in
/// RFC 3986 (a password must percent-encode its `/`, `?`, `#` and `@`).
pub(crate) fn redact_url(url: &str) -> String {
    if url.contains(',') && url.split(',').all(|u| u.contains("://")) {
        return url
            .split(',')
            .map(redact_one_url)
            .collect::<Vec<_>>()
            .join(",");
    }
    redact_one_url(url)
}

fn redact_one_url(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let authority_end = url[start..].find('/').map_or(url.len(), |i| start + i);
    let mut out = String::with_capacity(url.len());
    let rest = match url[start..authority_end].rfind('@') {
        Some(at) => {
            out.push_str(&url[..start]);
            match url[start..start + at].split_once(':') {
                Some((user, _)) => {
                    out.push_str(user);
                    out.push_str(":***");
                }
                None => out.push_str("***"),
            }
            &url[start + at..]
        }
        None => url,
    };
    let (rest, fragment) = match rest.split_once('#') {
        Some((r, f)) => (r, Some(f)),
        None => (rest, None),
    };
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    out.push_str(path);
    for (mark, params) in [('?', query), ('#', fragment)] {
        let Some(params) = params else { continue };
        out.push(mark);
        let redacted: Vec<String> = params
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((key, _))
                    if SECRET_PARAMS
                        .iter()
                        .any(|word| key.to_ascii_lowercase().contains(word)) =>
                {
                    format!("{key}=***")
                }
                _ => param.to_owned(),
            })
            .collect();
        out.push_str(&redacted.join("&"));
    }
    out
}

/// A configured URL. It may embed credentials (`redis://:PASSWORD@host`), so `Debug` and
/// `Display` (hence `check-config` and every log line or message that formats it) show it
/// through [`redact_url`]; [`ConfigUrl::expose`] gives the URL itself, for connecting.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub(crate) struct ConfigUrl(String);

impl ConfigUrl {
    /// The URL as configured, credentials included; callers must not log it.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for ConfigUrl {
    fn from(url: String) -> Self {
        ConfigUrl(url)
    }
}

impl From<&str> for ConfigUrl {
    fn from(url: &str) -> Self {
        ConfigUrl(url.to_owned())
    }
}

impl std::fmt::Debug for ConfigUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", redact_url(&self.0))
    }
}

impl std::fmt::Display for ConfigUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// Why a secret file could not be used; names the setting and the path, never the content.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be read. The I/O error is part of the message rather than a separate
    /// source: the validators keep this message as text, and it is the end of the chain anyway.
    #[error("{flag}: reading {}: {error}", path.display())]
    Read {
        /// The flag or key naming the file (`--cache-secret-file`, `client_secret_file`, ...).
        flag: String,
        /// The file.
        path: PathBuf,
        /// What the system said.
        error: std::io::Error,
    },
    /// The file's first line is empty.
    #[error("{flag}: {} is empty", path.display())]
    Empty {
        /// The flag or key naming the file.
        flag: String,
        /// The file.
        path: PathBuf,
    },
}

/// Reads a secret from the first line of a file (trailing newline and spaces removed).
///
/// # Errors
/// An unreadable or empty file; the message names the flag and path, never the content.
pub(crate) fn read_secret(path: &Path, flag: &str) -> Result<Secret, SecretError> {
    let text = std::fs::read_to_string(path).map_err(|error| SecretError::Read {
        flag: flag.to_owned(),
        path: path.to_owned(),
        error,
    })?;
    let line = text.lines().next().unwrap_or("").trim();
    if line.is_empty() {
        return Err(SecretError::Empty {
            flag: flag.to_owned(),
            path: path.to_owned(),
        });
    }
    Ok(Secret::new(line.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        for (url, shown) in [
            ("ftp://u:PASSWORD123@127.0.0.1/x", "ftp://u:***@127.0.0.1/x"),
            (
                "redis://:PASSWORD123@127.0.0.1:6379/0",
                "redis://:***@127.0.0.1:6379/0",
            ),
            ("rediss://user:PASSWORD123@h:1", "rediss://user:***@h:1"),
            ("https://PASSWORD123@h/x", "https://***@h/x"),
            // The last `@` of the authority ends the userinfo; `#` or `?` in it changes nothing.
            ("redis://:PA@SS#WORD123@h/0", "redis://:***@h/0"),
            (
                "https://h/i?access_token=PASSWORD123&a=b&Client_Secret=PASSWORD123",
                "https://h/i?access_token=***&a=b&Client_Secret=***",
            ),
            (
                "https://h?api_key=PASSWORD123#sig=PASSWORD123",
                "https://h?api_key=***#sig=***",
            ),
            (
                "redis://:PASSWORD123@a:1,redis://:PASSWORD123@b:2",
                "redis://:***@a:1,redis://:***@b:2",
            ),
            ("u:PASSWORD123@h/x", "u:***@h/x"),
            // Nothing secret: shown as written.
            (
                "https://api/users/{user}@{domain}?d={domain}",
                "https://api/users/{user}@{domain}?d={domain}",
            ),
            (
                "http://127.0.0.1:8080/userinfo?a=b",
                "http://127.0.0.1:8080/userinfo?a=b",
            ),
            (
                "redis://127.0.0.1:6379/0#insecure",
                "redis://127.0.0.1:6379/0#insecure",
            ),
            ("not a url", "not a url"),
            ("", ""),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        let url = ConfigUrl::from("redis://:PASSWORD123@h:1/0");
        assert_eq!(url.expose(), "redis://:PASSWORD123@h:1/0");
        assert_eq!(url.to_string(), "redis://:***@h:1/0");
        assert_eq!(format!("{url:?}"), "\"redis://:***@h:1/0\"");
    }
}
