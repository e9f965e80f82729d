//! Command-line and environment options of the shim (std only, no argument-parser crate, to keep
//! the binary small and its start-up in the millisecond range).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use extauth_protocol::tls;

/// Printed with `--help` and after a usage error (on stderr: stdout carries replies only).
pub(crate) const USAGE: &str = "\
usage: extauth-shim --broker ADDR[,ADDR...] [--timeout SECONDS] [--connect-timeout SECONDS] [--node NAME]
                    [--ca FILE [--cert FILE --key FILE]] [--protocol ejabberd|generic]

  --broker ADDR[,...]      brokers to try in order: unix:/path, tcp:HOST:PORT or tls:HOST:PORT
                           (env EXTAUTH_BROKER)
  --ca FILE                CA certificate(s) (PEM) that sign the brokers' certificates, for tls: (env EXTAUTH_CA)
  --cert FILE, --key FILE  client certificate chain and key (PEM), for brokers requiring mTLS
                           (env EXTAUTH_CERT, EXTAUTH_KEY)
  --timeout SECONDS        answer 0 when no broker has answered within this (default 10; env EXTAUTH_TIMEOUT)
  --connect-timeout SECONDS  give up connecting after this, within --timeout (default 2; env EXTAUTH_CONNECT_TIMEOUT)
  --node NAME              name sent to the broker for its logs (default: host name; env EXTAUTH_NODE)
  --protocol PROTOCOL      ejabberd (default: 2-byte length frames, 4-byte replies) or generic
                           (Prosody mod_auth_external: one request per line, replies 1 or 0 and a
                           newline) (env EXTAUTH_PROTOCOL)

Speaks the protocol on stdin/stdout (a terminal is switched to raw mode first); logs to stderr.";

/// One broker address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Addr {
    /// `unix:/path`: a Unix stream socket.
    Unix(String),
    /// `tcp:HOST:PORT`: a TCP address.
    Tcp(String),
    /// `tls:HOST:PORT`: TCP with TLS; HOST is also the name checked in the certificate.
    Tls(String),
}

/// The protocol spoken on stdin/stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// ejabberd's extauth (`src/extauth.erl`): `{packet, 2}` frames, 4-byte replies.
    Ejabberd,
    /// Prosody `mod_auth_external`'s generic protocol: `auth:USER:HOST:PASS\n`, replies `1\n` or
    /// `0\n`.
    Generic,
}

/// The shim's settings.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// The protocol spoken on stdin/stdout.
    pub protocol: Protocol,
    /// Brokers in order of preference; every new connection starts from the first.
    pub brokers: Vec<Addr>,
    /// Per-request budget: a request not answered within it gets 0.
    pub timeout: Duration,
    /// Budget for (re)connecting within a request, including backoff between attempts.
    pub connect_timeout: Duration,
    /// Name sent in the handshake.
    pub node: String,
    /// TLS client settings, when a `tls:` broker is listed.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Options {
    /// Reads `EXTAUTH_*` variables, then the arguments (which win).
    ///
    /// Returns `Ok(None)` after printing `--help` or `--version`.
    ///
    /// # Errors
    /// A message for an unknown flag, a missing value, a bad address or a bad number.
    pub(crate) fn from_env_and_args() -> Result<Option<Options>, String> {
        let env = |name: &str| std::env::var(name).ok();
        let mut brokers = env("EXTAUTH_BROKER");
        let mut timeout = env("EXTAUTH_TIMEOUT");
        let mut connect_timeout = env("EXTAUTH_CONNECT_TIMEOUT");
        let mut node = env("EXTAUTH_NODE");
        let mut protocol = env("EXTAUTH_PROTOCOL");
        let (mut ca, mut cert, mut key) =
            (env("EXTAUTH_CA"), env("EXTAUTH_CERT"), env("EXTAUTH_KEY"));
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
                None => (arg, None),
            };
            let slot = match flag.as_str() {
                "--broker" => &mut brokers,
                "--timeout" => &mut timeout,
                "--connect-timeout" => &mut connect_timeout,
                "--node" => &mut node,
                "--protocol" => &mut protocol,
                "--ca" => &mut ca,
                "--cert" => &mut cert,
                "--key" => &mut key,
                "-h" | "--help" => {
                    eprintln!("{USAGE}");
                    return Ok(None);
                }
                "-V" | "--version" => {
                    eprintln!("extauth-shim {}", env!("CARGO_PKG_VERSION"));
                    return Ok(None);
                }
                _ => return Err(format!("unknown argument {flag:?}")),
            };
            *slot = Some(
                inline
                    .or_else(|| args.next())
                    .ok_or(format!("{flag} needs a value"))?,
            );
        }
        let brokers = brokers.ok_or("--broker (or EXTAUTH_BROKER) is required")?;
        let brokers: Vec<Addr> = brokers
            .split(',')
            .map(parse_addr)
            .collect::<Result<_, _>>()?;
        let wants_tls = brokers.iter().any(|b| matches!(b, Addr::Tls(_)));
        Ok(Some(Options {
            protocol: match protocol.as_deref().unwrap_or("ejabberd") {
                "ejabberd" => Protocol::Ejabberd,
                "generic" => Protocol::Generic,
                other => return Err(format!("--protocol {other:?}: want ejabberd or generic")),
            },
            tls: tls_config(wants_tls, ca, cert, key)?,
            brokers,
            timeout: parse_seconds("--timeout", timeout.as_deref().unwrap_or("10"))?,
            connect_timeout: parse_seconds(
                "--connect-timeout",
                connect_timeout.as_deref().unwrap_or("2"),
            )?,
            node: node.unwrap_or_else(host_name),
        }))
    }
}

fn parse_addr(text: &str) -> Result<Addr, String> {
    let text = text.trim();
    match text.split_once(':') {
        Some(("unix", path)) if !path.is_empty() => Ok(Addr::Unix(path.to_owned())),
        Some(("tcp", hostport)) if host_port_ok(hostport) => Ok(Addr::Tcp(hostport.to_owned())),
        Some(("tls", hostport)) if host_port_ok(hostport) => Ok(Addr::Tls(hostport.to_owned())),
        _ => Err(format!(
            "bad broker address {text:?} (want unix:/path, tcp:HOST:PORT or tls:HOST:PORT)"
        )),
    }
}

fn host_port_ok(hostport: &str) -> bool {
    hostport
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
}

fn tls_config(
    wanted: bool,
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    if !wanted {
        return Ok(None);
    }
    let ca = ca.ok_or("a tls: broker needs --ca (the CA that signs the broker's certificate)")?;
    let client = match (&cert, &key) {
        (Some(c), Some(k)) => Some((Path::new(c), Path::new(k))),
        (None, None) => None,
        _ => return Err("--cert and --key go together".into()),
    };
    tls::client_config(Path::new(&ca), client)
        .map(Some)
        .map_err(|e| e.to_string())
}

fn parse_seconds(flag: &str, text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s <= 3600.0)
        .map(Duration::from_secs_f64)
        .ok_or(format!("{flag}: want seconds in (0, 3600], got {text:?}"))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            parse_addr("unix:/run/x.sock"),
            Ok(Addr::Unix("/run/x.sock".into()))
        );
        assert_eq!(
            parse_addr("tcp:127.0.0.1:7000"),
            Ok(Addr::Tcp("127.0.0.1:7000".into()))
        );
        assert_eq!(
            parse_addr("tls:broker.example:7100"),
            Ok(Addr::Tls("broker.example:7100".into()))
        );
        assert_eq!(
            parse_addr("tcp:[::1]:7000"),
            Ok(Addr::Tcp("[::1]:7000".into()))
        );
        for bad in [
            "/run/x.sock",
            "unix:",
            "tcp:host",
            "tcp::70",
            "tcp:h:99999",
            "udp:h:1",
        ] {
            assert!(parse_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn seconds_parse() {
        assert_eq!(parse_seconds("t", "0.25"), Ok(Duration::from_millis(250)));
        for bad in ["0", "-1", "nan", "inf", "x", "4000"] {
            assert!(parse_seconds("t", bad).is_err(), "{bad}");
        }
    }
}
