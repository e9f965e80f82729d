//! What `extauth-broker check-config` prints: the effective settings as an operator reads them
//! (octal socket modes, seconds, redacted URLs, never a secret), then warnings about settings
//! that work but are probably not what was meant.

use std::fmt::Write;

use crate::config::{Config, DomainConfig, IsUserPolicy, ListenAddr};
use crate::decision::{BindingRules, Subject};
use crate::validate::ValidatorConfig;

/// The readable summary of `config`.
pub(crate) fn summary(config: &Config) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: String| {
        let _ = writeln!(out, "{:<18}{value}", format!("{label}:"));
    };
    line("listen", listeners(config));
    line("unix peers", peers(config));
    line("tcp", tcp(config));
    line("redis", redis(config));
    line(
        "cache",
        format!(
            "{} verdicts in process; tokens up to {} bytes",
            config.l1_capacity, config.max_token_len
        ),
    );
    let limits = &config.limits;
    line(
        "limits",
        format!(
            "{} connections, {} requests in flight each, idle {} s",
            limits.max_connections,
            limits.max_in_flight,
            limits.idle_timeout.as_secs(),
        ),
    );
    line(
        "handshakes",
        format!(
            "{} at once, {} per source, {} s each",
            limits.max_handshakes,
            limits.max_handshakes_per_ip,
            limits.handshake_timeout.as_secs()
        ),
    );
    line(
        "providers",
        format!(
            "answers up to {} bytes; plain http:// {}",
            config.provider.max_response_bytes,
            match config.provider.insecure_http {
                true => "allowed off loopback (insecure_provider_http)",
                false => "on loopback only",
            }
        ),
    );
    let endpoint = |addr: &Option<String>, limits: &crate::endpoint::EndpointLimits| match addr {
        Some(addr) => format!(
            "{addr}, at most {} connections, header/idle/request timeouts {}/{}/{} s",
            limits.max_connections,
            limits.header_timeout.as_secs(),
            limits.idle_timeout.as_secs(),
            limits.request_timeout.as_secs()
        ),
        None => "off".into(),
    };
    line(
        "metrics",
        endpoint(&config.metrics_listen, &config.metrics_limits),
    );
    line(
        "admin",
        match &config.admin_secret {
            Some(_) => format!(
                "{} (bearer secret set)",
                endpoint(&config.admin_listen, &config.admin_limits)
            ),
            None => endpoint(&config.admin_listen, &config.admin_limits),
        },
    );
    line("http front", http_front(config));
    line(
        "on revoke",
        match &config.kick {
            Some(kick) => format!("kick the user's sessions: {}", kick.describe()),
            None => "revoke only (open sessions stay open; see on_revoke.kick)".into(),
        },
    );
    line(
        "log",
        format!(
            "{}, {}",
            config.log_level,
            if config.log_json { "json" } else { "text" }
        ),
    );
    line(
        "run as",
        match &config.run_as {
            Some((user, Some(group))) => format!("{user}:{group} after binding"),
            Some((user, None)) => format!("{user} after binding"),
            None => "the starting user".into(),
        },
    );
    for (name, domain) in &config.domains {
        out.push_str(&describe_domain(&format!("[domain {name}]"), domain));
    }
    if let Some(any) = &config.any_domain {
        out.push_str(&describe_domain("[any domain]", any));
    }
    for warning in warnings(config) {
        let _ = writeln!(out, "warning: {warning}");
    }
    out
}

/// The HTTP check front: address, transport, caller authentication, allow list, limits.
fn http_front(config: &Config) -> String {
    let Some(front) = &config.http else {
        return "off".into();
    };
    let transport = match (&front.tls, front.mtls) {
        (Some(_), true) => "TLS, callers by client certificate (mTLS)",
        (Some(_), false) => "TLS",
        (None, _) => "plaintext",
    };
    let secret = if front.secret.is_some() {
        ", caller secret set"
    } else {
        ""
    };
    let allow = match front.allow.is_empty() {
        true => "any peer".to_owned(),
        false => front
            .allow
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    };
    let limits = &front.limits;
    format!(
        "{}, {transport}{secret}; allowed: {allow}; at most {} connections, header/idle/request timeouts {}/{}/{} s",
        front.listen,
        limits.max_connections,
        limits.header_timeout.as_secs(),
        limits.idle_timeout.as_secs(),
        limits.request_timeout.as_secs()
    )
}

/// Settings that work but are probably not what was meant (also logged at start-up).
pub(crate) fn warnings(config: &Config) -> Vec<String> {
    let mut warnings = Vec::new();
    let domains: Vec<_> = config.domains.iter().collect();
    for (i, (a, da)) in domains.iter().enumerate() {
        for (b, db) in &domains[i + 1..] {
            let unbound = |d: &DomainConfig| {
                d.binding.domain_claim.is_none() && !matches!(d.binding.subject, Subject::Jid(_))
            };
            if da.validator.endpoint() == db.validator.endpoint() && unbound(da) && unbound(db) {
                warnings.push(format!(
                    "domains {a} and {b} share a provider ({}) and bind no domain: a token for \
                     alice logs in alice@{a} and alice@{b}; set domain_claim or jid_claim if \
                     they are different people",
                    da.validator.endpoint()
                ));
            }
        }
    }
    if let Some(kick) = &config.kick {
        let answer_within = config.admin_limits.request_timeout;
        if config.admin_secret.is_some() && kick.timeout() >= answer_within {
            warnings.push(format!(
                "on_revoke.kick.timeout ({} s) is not under the admin endpoint's request timeout \
                 ({} s): a slow kick turns POST /revoke's answer into a 503 that cannot say \
                 whether the sessions were ended (the revocation itself is done first)",
                kick.timeout().as_secs_f64(),
                answer_within.as_secs()
            ));
        }
    }
    warnings
}

fn listeners(config: &Config) -> String {
    let listen: Vec<String> = config
        .listen
        .iter()
        .map(|l| match l {
            ListenAddr::Unix(path) => {
                format!("unix:{} (mode {:04o})", path.display(), config.socket_mode)
            }
            ListenAddr::Tcp(addr) if config.tcp.tls.is_some() => format!("tls:{addr}"),
            ListenAddr::Tcp(addr) => format!("tcp:{addr}"),
        })
        .collect();
    match listen.is_empty() {
        true => "sockets passed by systemd".into(),
        false => listen.join(", "),
    }
}

fn peers(config: &Config) -> String {
    let p = &config.peers;
    if p.uids.is_empty() && p.gids.is_empty() {
        return "root, the broker's own user, and members of the socket's group".into();
    }
    format!("uids {:?}, gids {:?}", p.uids, p.gids)
}

fn tcp(config: &Config) -> String {
    match (&config.tcp.tls, config.tcp.insecure) {
        (Some(_), _) => "TLS (certificate set; mTLS when --client-ca is given)".into(),
        (None, true) => "plaintext allowed off loopback (--insecure-tcp)".into(),
        (None, false) => "plaintext on loopback only (every local user may connect)".into(),
    }
}

fn redis(config: &Config) -> String {
    match &config.redis {
        Some(r) => {
            let urls: Vec<String> = r.urls.iter().map(ToString::to_string).collect();
            let mode = format!("{:?}", r.mode).to_lowercase();
            format!("{mode} {} (cache secret set)", urls.join(","))
        }
        None => "none: verdicts stay in this process".into(),
    }
}

fn describe_domain(title: &str, d: &DomainConfig) -> String {
    let mut out = format!("{title}\n");
    let mut line = |label: &str, value: String| {
        let _ = writeln!(out, "  {:<16}{value}", format!("{label}:"));
    };
    line("validator", d.validator.describe());
    line("binding", describe_binding(&d.binding));
    let stale = match d.stale_if_error.as_secs() {
        0 => "off".to_owned(),
        s => format!("{s} s"),
    };
    line(
        "lifetimes",
        format!(
            "max_ttl {} s, negative_ttl {} s, stale_if_error {stale}",
            d.max_ttl.as_secs(),
            d.negative_ttl.as_secs()
        ),
    );
    line(
        "isuser",
        match d.isuser {
            IsUserPolicy::Seen => format!("seen within {} s", d.seen_ttl.as_secs()),
            IsUserPolicy::Directory => match &d.directory {
                Some(dir) => format!("directory {}, else seen", dir.url),
                None => "directory (none configured!)".into(),
            },
            IsUserPolicy::Always => "always 1".into(),
            IsUserPolicy::Never => "always 0".into(),
        },
    );
    if !matches!(d.validator, ValidatorConfig::Jwt(_)) {
        line(
            "breaker",
            format!(
                "open after {} failures, probe after {} s",
                d.breaker.threshold, d.breaker.cooldown
            ),
        );
        line(
            "provider calls",
            format!(
                "at most {} at once, the rest waiting in turn by user",
                d.provider_concurrency
            ),
        );
    }
    out
}

fn describe_binding(b: &BindingRules) -> String {
    let subject = match &b.subject {
        Subject::Localpart(names) => {
            let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
            format!("claim {} names the user", quoted.join(", else "))
        }
        Subject::Jid(name) => format!("claim \"{name}\" holds user@domain"),
    };
    let domain = match &b.domain_claim {
        Some(name) => format!(", claim \"{name}\" must name the domain"),
        None => String::new(),
    };
    format!("{subject}, claim_folding {}{domain}", b.folding.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RunArgs;

    fn config(toml_text: &str) -> Config {
        let file: RunArgs = toml::from_str(toml_text).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("client.secret");
        std::fs::write(&secret, "PASSWORD123\n").unwrap();
        let cache_secret = dir.path().join("cache.key");
        std::fs::write(&cache_secret, "PASSWORD123".repeat(4)).unwrap();
        RunArgs {
            listen: vec!["unix:/run/x.sock".into()],
            introspection_url: Some("https://u:PASSWORD123@idp/i".into()),
            client_id: Some("broker".into()),
            client_secret_file: Some(secret),
            store: crate::config::RedisArgs {
                redis: Some("redis://:PASSWORD123@127.0.0.1:1/0".into()),
                cache_secret_file: Some(cache_secret),
                ..Default::default()
            },
            ..file
        }
        .into_config()
        .unwrap()
    }

    #[test]
    fn the_summary_is_readable_and_holds_no_secret() {
        let shown = summary(&config("socket_mode = \"0640\"\n"));
        assert!(shown.contains("unix:/run/x.sock (mode 0640)"), "{shown}");
        assert!(shown.contains("redis://:***@127.0.0.1:1/0"), "{shown}");
        assert!(shown.contains("https://u:***@idp/i"), "{shown}");
        assert!(!shown.contains("PASSWORD123"), "{shown}");
        assert!(shown.contains("claim_folding exact"), "{shown}");
    }

    #[test]
    fn the_kick_hook_is_shown_without_its_credentials() {
        let shown = summary(&config(
            "[on_revoke]\nkick = { kind = \"http_api\", url = \"http://admin:PASSWORD123@127.0.0.1:5281/api/kick_user\", timeout = 3 }\n",
        ));
        assert!(
            shown.contains("on revoke:        kick the user's sessions: POST http://admin:***@127.0.0.1:5281/api/kick_user (mod_http_api, basic from the URL), timeout 3 s"),
            "{shown}"
        );
        assert!(!shown.contains("PASSWORD123"), "{shown}");
        assert!(summary(&config("")).contains("on revoke:        revoke only"));
    }

    #[test]
    fn the_http_front_is_shown_with_its_rules_and_never_its_secret() {
        assert!(summary(&config("")).contains("http front:       off"));
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("http.secret");
        std::fs::write(&secret, "PASSWORD123\n").unwrap();
        let shown = summary(&config(&format!(
            "http_listen = \"127.0.0.1:9102\"\nhttp_secret_file = {:?}\nhttp_allow = [\"10.0.0.0/8\", \"::1\"]\n",
            secret.display().to_string()
        )));
        assert!(
            shown.contains("http front:       127.0.0.1:9102, plaintext, caller secret set; allowed: 10.0.0.0/8, ::1/128; at most 256 connections"),
            "{shown}"
        );
        assert!(!shown.contains("PASSWORD123"), "{shown}");
    }

    #[test]
    fn the_http_front_needs_a_caller_credential_and_tls_files() {
        let args = |extra: &str| {
            let file: RunArgs = toml::from_str(extra).unwrap();
            RunArgs {
                listen: vec!["unix:/run/x.sock".into()],
                introspection_url: Some("https://idp/i".into()),
                client_id: Some("broker".into()),
                ..file
            }
        };
        let no_secret = args("http_listen = \"127.0.0.1:9102\"\n").into_config();
        let message = format!("{:#}", no_secret.expect_err("refused"));
        assert!(message.contains("--http-secret-file"), "{message}");
        let no_tls = args("http_listen = \"127.0.0.1:9102\"\nhttp_tls = true\n").into_config();
        let message = format!("{:#}", no_tls.expect_err("refused"));
        assert!(message.contains("--http-tls needs --tls-cert"), "{message}");
    }

    #[test]
    fn domains_sharing_a_provider_without_domain_binding_are_warned_about() {
        let shared = config("[domains.\"a.example\"]\n[domains.\"b.example\"]\n");
        assert_eq!(warnings(&shared).len(), 1, "{:?}", warnings(&shared));
        let bound = config(
            "[domains.\"a.example\"]\ndomain_claim = \"tenant\"\n[domains.\"b.example\"]\ndomain_claim = \"tenant\"\n",
        );
        assert!(warnings(&bound).is_empty());
    }
}
