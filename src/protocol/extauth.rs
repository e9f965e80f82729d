//! ejabberd's external authentication ("extauth") protocol: framing, command parsing and replies.
//!
//! Follows ejabberd `src/extauth.erl` and `src/ejabberd_auth_external.erl`: ejabberd opens the
//! program as an Erlang port with `{packet, 2}`, so every request is a 2-byte big-endian
//! **unsigned** length followed by exactly that many bytes (at most 65 535), and every reply is
//! exactly 4 bytes: `00 02 00 01` (true) or `00 02 00 00` (false).
//!
//! A request is `:`-separated fields. User and server never contain `:`; the password (or
//! certificate) is the last field and may contain `:`, so a request is split into at most as many
//! fields as its command has.
//!
//! std-only: the shim uses it without tokio, redis or reqwest.

use std::fmt;
use std::io::{self, Read};

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

/// Largest request ejabberd can send: the length prefix is an unsigned 16-bit number (bytes).
pub const MAX_REQUEST_LEN: usize = u16::MAX as usize;

/// The 4-byte reply for `ok`: `00 02 00 01` when true, `00 02 00 00` when false.
pub const fn reply(ok: bool) -> [u8; 4] {
    [0, 2, 0, ok as u8]
}

/// A secret (an OAuth access token, a password or a certificate) that must never be printed.
///
/// `Debug` prints `Secret(<redacted, N bytes>)`; the buffer is zeroized on drop. On the wire it
/// is serialized as a plain string.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret string.
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    /// The secret itself; callers must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<redacted, {} bytes>)", self.0.len())
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// One extauth request, with typed fields. Also the body of a wire-protocol request.
///
/// Wire compatibility (postcard encodes the variant index): only ever append variants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// `auth:User:Server:Password`: may this user log in with this password (here: a token)?
    Auth {
        /// The JID localpart, as ejabberd sends it (already nodeprep'd).
        user: String,
        /// The JID domain (the ejabberd vhost).
        server: String,
        /// The password: here, the OAuth access token (may contain `:`).
        password: Secret,
    },
    /// `isuser:User:Server`: does this account exist?
    IsUser {
        /// The JID localpart, as ejabberd sends it (already nodeprep'd).
        user: String,
        /// The JID domain (the ejabberd vhost).
        server: String,
    },
    /// `setpass:User:Server:Password`: change the password.
    SetPass {
        /// The JID localpart, as ejabberd sends it (already nodeprep'd).
        user: String,
        /// The JID domain (the ejabberd vhost).
        server: String,
        /// The password: here, the OAuth access token (may contain `:`).
        password: Secret,
    },
    /// `tryregister:User:Server:Password`: create the account.
    TryRegister {
        /// The JID localpart, as ejabberd sends it (already nodeprep'd).
        user: String,
        /// The JID domain (the ejabberd vhost).
        server: String,
        /// The password: here, the OAuth access token (may contain `:`).
        password: Secret,
    },
    /// `removeuser:User:Server`: delete the account.
    RemoveUser {
        /// The JID localpart, as ejabberd sends it (already nodeprep'd).
        user: String,
        /// The JID domain (the ejabberd vhost).
        server: String,
    },
    /// `removeuser3:User:Server:Password`: delete the account if the password matches.
    RemoveUser3 {
        /// The JID localpart, as ejabberd sends it (already nodeprep'd).
        user: String,
        /// The JID domain (the ejabberd vhost).
        server: String,
        /// The password: here, the OAuth access token (may contain `:`).
        password: Secret,
    },
    /// `certauth:User:Server:Cert`: certificate authentication (no ejabberd core caller).
    CertAuth {
        /// The JID localpart, as ejabberd sends it (already nodeprep'd).
        user: String,
        /// The JID domain (the ejabberd vhost).
        server: String,
        /// The client certificate, as ejabberd sends it.
        cert: Secret,
    },
}

impl Command {
    /// The command's name as ejabberd spells it (`auth`, `isuser`, ...), for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Auth { .. } => "auth",
            Command::IsUser { .. } => "isuser",
            Command::SetPass { .. } => "setpass",
            Command::TryRegister { .. } => "tryregister",
            Command::RemoveUser { .. } => "removeuser",
            Command::RemoveUser3 { .. } => "removeuser3",
            Command::CertAuth { .. } => "certauth",
        }
    }

    /// The `(user, server)` pair every command carries.
    pub fn jid_parts(&self) -> (&str, &str) {
        match self {
            Command::Auth { user, server, .. }
            | Command::IsUser { user, server }
            | Command::SetPass { user, server, .. }
            | Command::TryRegister { user, server, .. }
            | Command::RemoveUser { user, server }
            | Command::RemoveUser3 { user, server, .. }
            | Command::CertAuth { user, server, .. } => (user, server),
        }
    }
}

/// Why a request could not be parsed. None of these carries request bytes (they may hold a token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// The request is not valid UTF-8.
    NotUtf8,
    /// The first field is not a known command.
    UnknownCommand,
    /// Fewer fields than the command needs.
    MissingField,
    /// More fields than a command without a trailing secret accepts (e.g. `isuser:a:b:c`).
    TrailingField,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ParseError::NotUtf8 => "request is not valid UTF-8",
            ParseError::UnknownCommand => "unknown command",
            ParseError::MissingField => "missing field",
            ParseError::TrailingField => "unexpected extra field",
        })
    }
}

impl std::error::Error for ParseError {}

/// Parses one request (the bytes after the length prefix) into a [`Command`].
///
/// The last field of a command that carries a secret keeps every `:` it contains. An empty
/// field is accepted here (ejabberd never sends one, but the decision belongs to the broker,
/// which answers 0).
///
/// # Errors
/// [`ParseError`] for invalid UTF-8, an unknown command, or a wrong number of fields.
pub fn parse(request: &[u8]) -> Result<Command, ParseError> {
    let text = std::str::from_utf8(request).map_err(|_| ParseError::NotUtf8)?;
    let (name, rest) = text.split_once(':').ok_or(ParseError::UnknownCommand)?;
    let with_secret = matches!(
        name,
        "auth" | "setpass" | "tryregister" | "removeuser3" | "certauth"
    );
    let without_secret = matches!(name, "isuser" | "removeuser");
    if !with_secret && !without_secret {
        return Err(ParseError::UnknownCommand);
    }
    let mut fields = rest.splitn(if with_secret { 3 } else { 2 }, ':');
    let user = fields.next().ok_or(ParseError::MissingField)?.to_owned();
    let server = fields.next().ok_or(ParseError::MissingField)?;
    if without_secret {
        if server.contains(':') {
            return Err(ParseError::TrailingField);
        }
        let server = server.to_owned();
        return Ok(match name {
            "isuser" => Command::IsUser { user, server },
            _ => Command::RemoveUser { user, server },
        });
    }
    let server = server.to_owned();
    let secret = Secret::new(fields.next().ok_or(ParseError::MissingField)?.to_owned());
    Ok(match name {
        "auth" => Command::Auth {
            user,
            server,
            password: secret,
        },
        "setpass" => Command::SetPass {
            user,
            server,
            password: secret,
        },
        "tryregister" => Command::TryRegister {
            user,
            server,
            password: secret,
        },
        "removeuser3" => Command::RemoveUser3 {
            user,
            server,
            password: secret,
        },
        _ => Command::CertAuth {
            user,
            server,
            cert: secret,
        },
    })
}

/// Reads one request frame into `buf` (replacing its contents), looping until the whole frame
/// has arrived, however many pieces it comes in.
///
/// Returns `Ok(false)` on end of input, whether it comes before a frame or in the middle of one
/// (ejabberd closed the port: the caller should exit). `buf` is zeroized before reuse because the
/// previous frame held a token.
///
/// # Errors
/// Any I/O error other than end of input.
pub fn read_request<R: Read>(reader: &mut R, buf: &mut Vec<u8>) -> io::Result<bool> {
    let mut len = [0u8; 2];
    if !read_full(reader, &mut len)? {
        return Ok(false);
    }
    buf.zeroize();
    buf.resize(u16::from_be_bytes(len) as usize, 0);
    read_full(reader, buf)
}

/// `read_exact` that reports a clean or mid-buffer end of input as `Ok(false)`.
fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    match reader.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out at most `chunk` bytes per `read`, like a pipe under load.
    struct Trickle<'a> {
        data: &'a [u8],
        chunk: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.chunk.min(out.len()).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut v = (body.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    fn auth(user: &str, server: &str, password: &str) -> Command {
        Command::Auth {
            user: user.into(),
            server: server.into(),
            password: Secret::new(password.into()),
        }
    }

    #[test]
    fn frames_split_across_reads_are_reassembled() {
        let mut data = frame(b"auth:alice:example.com:tok");
        data.extend(frame(b"isuser:bob:example.com"));
        let mut reader = Trickle {
            data: &data,
            chunk: 1,
        };
        let mut buf = Vec::new();
        assert!(read_request(&mut reader, &mut buf).unwrap());
        assert_eq!(buf, b"auth:alice:example.com:tok");
        assert!(read_request(&mut reader, &mut buf).unwrap());
        assert_eq!(buf, b"isuser:bob:example.com");
        assert!(!read_request(&mut reader, &mut buf).unwrap());
    }

    #[test]
    fn largest_frame_uses_an_unsigned_length() {
        let mut body = b"auth:alice:example.com:".to_vec();
        body.resize(MAX_REQUEST_LEN, b'x');
        let data = frame(&body);
        assert_eq!(&data[..2], &[0xff, 0xff]);
        let mut reader = Trickle {
            data: &data,
            chunk: 4096,
        };
        let mut buf = Vec::new();
        assert!(read_request(&mut reader, &mut buf).unwrap());
        assert_eq!(buf.len(), 65_535);
        match parse(&buf).unwrap() {
            Command::Auth { password, .. } => assert_eq!(password.expose().len(), 65_535 - 23),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn end_of_input_inside_a_frame_is_end_of_input() {
        let data = frame(b"auth:alice:example.com:tok");
        let mut reader = Trickle {
            data: &data[..10],
            chunk: 3,
        };
        assert!(!read_request(&mut reader, &mut Vec::new()).unwrap());
        let mut half_prefix = Trickle {
            data: &[0],
            chunk: 1,
        };
        assert!(!read_request(&mut half_prefix, &mut Vec::new()).unwrap());
    }

    #[test]
    fn zero_length_frame_is_read_and_rejected() {
        let data = frame(b"");
        let mut buf = vec![1, 2, 3];
        assert!(read_request(
            &mut Trickle {
                data: &data,
                chunk: 2
            },
            &mut buf
        )
        .unwrap());
        assert!(buf.is_empty());
        assert_eq!(parse(&buf), Err(ParseError::UnknownCommand));
    }

    #[test]
    fn password_keeps_its_colons() {
        assert_eq!(
            parse(b"auth:alice:example.com:a:b::c:").unwrap(),
            auth("alice", "example.com", "a:b::c:")
        );
    }

    #[test]
    fn empty_password_parses_for_the_broker_to_refuse() {
        assert_eq!(
            parse(b"auth:alice:example.com:").unwrap(),
            auth("alice", "example.com", "")
        );
    }

    #[test]
    fn missing_fields_are_errors() {
        for bad in [
            &b"auth:alice:example.com"[..],
            b"auth:alice",
            b"auth:",
            b"isuser:bob",
            b"setpass:a:b",
        ] {
            assert_eq!(
                parse(bad),
                Err(ParseError::MissingField),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse(b"isuser:bob:example.com:extra"),
            Err(ParseError::TrailingField)
        );
    }

    #[test]
    fn unknown_commands_and_bad_bytes_are_errors() {
        assert_eq!(parse(b"login:a:b:c"), Err(ParseError::UnknownCommand));
        assert_eq!(parse(b"auth"), Err(ParseError::UnknownCommand));
        assert_eq!(parse(b"AUTH:a:b:c"), Err(ParseError::UnknownCommand));
        assert_eq!(parse(b"auth:a:b:\xff"), Err(ParseError::NotUtf8));
    }

    #[test]
    fn every_command_parses() {
        let s = |v: &str| Secret::new(v.into());
        let (u, d) = (String::from("u"), String::from("d"));
        let cases = [
            (
                &b"auth:u:d:p"[..],
                Command::Auth {
                    user: u.clone(),
                    server: d.clone(),
                    password: s("p"),
                },
            ),
            (
                b"isuser:u:d",
                Command::IsUser {
                    user: u.clone(),
                    server: d.clone(),
                },
            ),
            (
                b"setpass:u:d:p",
                Command::SetPass {
                    user: u.clone(),
                    server: d.clone(),
                    password: s("p"),
                },
            ),
            (
                b"tryregister:u:d:p",
                Command::TryRegister {
                    user: u.clone(),
                    server: d.clone(),
                    password: s("p"),
                },
            ),
            (
                b"removeuser:u:d",
                Command::RemoveUser {
                    user: u.clone(),
                    server: d.clone(),
                },
            ),
            (
                b"removeuser3:u:d:p",
                Command::RemoveUser3 {
                    user: u.clone(),
                    server: d.clone(),
                    password: s("p"),
                },
            ),
            (
                b"certauth:u:d:c:e:r:t",
                Command::CertAuth {
                    user: u.clone(),
                    server: d.clone(),
                    cert: s("c:e:r:t"),
                },
            ),
        ];
        for (bytes, want) in cases {
            let got = parse(bytes).unwrap();
            assert_eq!(
                got.name(),
                std::str::from_utf8(bytes)
                    .unwrap()
                    .split(':')
                    .next()
                    .unwrap()
            );
            assert_eq!(got.jid_parts(), ("u", "d"));
            assert_eq!(got, want);
        }
    }

    #[test]
    fn replies_are_four_bytes() {
        assert_eq!(reply(true), [0, 2, 0, 1]);
        assert_eq!(reply(false), [0, 2, 0, 0]);
    }

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let shown = format!("{:?}", auth("alice", "example.com", "tok-SECRET-123"));
        assert!(!shown.contains("tok-SECRET-123"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }
}
