//! The shim <-> broker wire protocol (documented in `docs/protocol.md`).
//!
//! Every message is a frame: a 4-byte big-endian unsigned length, then that many bytes of a
//! [postcard](https://docs.rs/postcard) 1.x encoding of [`ClientMsg`] or [`ServerMsg`]. The first
//! client frame is a [`Hello`]; the broker answers [`ServerMsg::Welcome`] or
//! [`ServerMsg::Refused`] and closes. After that the client sends [`Request`]s, each with an id,
//! and the broker answers each with a [`Response`] carrying the same id, in any order, so a
//! connection can pipeline.
//!
//! Compatibility rules (postcard is not self-describing): only ever append enum variants, never
//! reorder or remove fields; a change that breaks them bumps [`VERSION`].
//!
//! std-only (the shim uses it); the broker frames with tokio-util's `LengthDelimitedCodec`, whose
//! default is the same 4-byte big-endian length.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::extauth::Command;

/// Protocol version sent in [`Hello`] and [`Welcome`].
pub const VERSION: u16 = 1;

/// Default largest frame body either side accepts (bytes): a 65 535-byte extauth request plus
/// the envelope fits.
pub const MAX_FRAME: usize = 64 * 1024 + 256;

/// A message from the shim (client) to the broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// First message on every connection.
    Hello(Hello),
    /// One extauth request.
    Request(Request),
}

/// The client's handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The client's [`VERSION`].
    pub version: u16,
    /// The ejabberd node (or host) the shim serves, for logs.
    pub node: String,
    /// The shim's process id, for logs.
    pub pid: u32,
}

/// One extauth request relayed by the shim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the client, echoed in the [`Response`].
    pub id: u64,
    /// Time the client will still wait for the answer (ms); the broker should not start work it
    /// cannot finish within it.
    pub deadline_ms: u32,
    /// The parsed extauth command.
    pub command: Command,
}

/// A message from the broker to the shim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// The handshake was accepted.
    Welcome(Welcome),
    /// The handshake was refused; the broker closes the connection after sending it.
    Refused(Refused),
    /// The answer to a [`Request`].
    Response(Response),
}

/// The broker's handshake answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The broker's [`VERSION`].
    pub version: u16,
    /// The broker's name and version (`extauth-broker/0.1.0`), for logs.
    pub server: String,
}

/// Why the broker refused a handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// The broker's [`VERSION`].
    pub version: u16,
    /// A human-readable reason (never contains a secret).
    pub reason: String,
}

/// The broker's verdict on one [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The request's id.
    pub id: u64,
    /// What ejabberd gets: `true` -> `00 02 00 01`.
    pub ok: bool,
    /// Why, for logs and metrics.
    pub reason: Reason,
    /// Where the verdict came from.
    pub source: Source,
}

/// Why a verdict is what it is. Only ever append variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Reason {
    /// The token is valid for this user.
    Accepted,
    /// The provider says the token is not active (unknown, revoked, expired at the provider).
    Inactive,
    /// The token's `exp` is in the past.
    Expired,
    /// The token belongs to another user (or carries no subject).
    WrongUser,
    /// The request is malformed: empty token, bad user/server, oversized field.
    Malformed,
    /// The command is not supported (`setpass`, `tryregister`, `removeuser*`, `certauth`).
    Unsupported,
    /// The provider could not be asked (transport error, timeout, 5xx, garbage).
    UpstreamUnavailable,
    /// `isuser`: the user is known (authenticated recently).
    UserKnown,
    /// `isuser`: the user is not known.
    UserUnknown,
    /// The request's deadline passed before an answer was found.
    DeadlineExceeded,
    /// The broker is shutting down or overloaded.
    Unavailable,
    /// The request's domain is not configured on this broker.
    UnknownDomain,
    /// The token lacks a scope the domain requires.
    InsufficientScope,
    /// The token's `aud` does not name the expected audience.
    WrongAudience,
    /// The token's `iss` is not the expected issuer.
    WrongIssuer,
    /// The token's `nbf` is in the future.
    NotYetValid,
    /// The token is not a well-formed, correctly signed token (JWT).
    BadToken,
    /// The token or its user was revoked at this broker (`extauth-broker revoke`).
    Revoked,
    /// The token's subject claim is not in the canonical form of a localpart (upper case,
    /// look-alike or removed characters, ...) under the domain's `claim_folding`.
    NonCanonicalClaim,
    /// The token names no user: a machine (client-credentials) token, or no subject claim, or
    /// a subject claim that is not a string.
    NoUser,
    /// The token is not an access token for this service (an ID token, a wrong `typ`).
    WrongTokenType,
    /// The token is bound to another XMPP domain (`domain_claim`, `jid_claim`).
    WrongDomain,
}

impl Reason {
    /// Every reason, in wire order.
    pub const ALL: [Reason; 22] = [
        Reason::Accepted,
        Reason::Inactive,
        Reason::Expired,
        Reason::WrongUser,
        Reason::Malformed,
        Reason::Unsupported,
        Reason::UpstreamUnavailable,
        Reason::UserKnown,
        Reason::UserUnknown,
        Reason::DeadlineExceeded,
        Reason::Unavailable,
        Reason::UnknownDomain,
        Reason::InsufficientScope,
        Reason::WrongAudience,
        Reason::WrongIssuer,
        Reason::NotYetValid,
        Reason::BadToken,
        Reason::Revoked,
        Reason::NonCanonicalClaim,
        Reason::NoUser,
        Reason::WrongTokenType,
        Reason::WrongDomain,
    ];

    /// The reason named `name` (the inverse of [`Reason::as_str`]).
    pub fn from_name(name: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// The reason's stable snake_case name, for logs, metrics and Redis values.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Accepted => "accepted",
            Reason::Inactive => "inactive",
            Reason::Expired => "expired",
            Reason::WrongUser => "wrong_user",
            Reason::Malformed => "malformed",
            Reason::Unsupported => "unsupported",
            Reason::UpstreamUnavailable => "upstream_unavailable",
            Reason::UserKnown => "user_known",
            Reason::UserUnknown => "user_unknown",
            Reason::DeadlineExceeded => "deadline_exceeded",
            Reason::Unavailable => "unavailable",
            Reason::UnknownDomain => "unknown_domain",
            Reason::InsufficientScope => "insufficient_scope",
            Reason::WrongAudience => "wrong_audience",
            Reason::WrongIssuer => "wrong_issuer",
            Reason::NotYetValid => "not_yet_valid",
            Reason::BadToken => "bad_token",
            Reason::Revoked => "revoked",
            Reason::NonCanonicalClaim => "non_canonical_claim",
            Reason::NoUser => "no_user",
            Reason::WrongTokenType => "wrong_token_type",
            Reason::WrongDomain => "wrong_domain",
        }
    }
}

/// Where a verdict came from. Only ever append variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Source {
    /// Decided without a cache or provider (input checks, unsupported commands).
    Local,
    /// The in-process cache.
    L1,
    /// The shared Redis cache.
    Redis,
    /// A provider call (this request's, or a concurrent one it waited on).
    Provider,
}

impl Source {
    /// The source's stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Local => "local",
            Source::L1 => "l1",
            Source::Redis => "redis",
            Source::Provider => "provider",
        }
    }
}

/// Encodes `msg` as one frame (length prefix included).
///
/// # Errors
/// `InvalidInput` when the body would exceed [`MAX_FRAME`] bytes.
pub fn encode<T: Serialize>(msg: &T) -> io::Result<Vec<u8>> {
    let mut frame = postcard::to_extend(msg, vec![0u8; 4]).map_err(invalid)?;
    let len = frame.len() - 4;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "wire frame too large",
        ));
    }
    frame[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(frame)
}

/// Decodes a frame body (without its length prefix).
///
/// # Errors
/// `InvalidData` when the bytes are not a valid encoding of `T`, or hold more than one message
/// (a frame is exactly one message: extra bytes mean a peer that disagrees about the format).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> io::Result<T> {
    let (msg, rest) = postcard::take_from_bytes(body).map_err(invalid)?;
    if !rest.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} bytes after the message in a frame", rest.len()),
        ));
    }
    Ok(msg)
}

/// Writes `msg` as one frame in a single `write_all`, then flushes.
///
/// # Errors
/// I/O errors, or `InvalidInput` for an oversized message.
pub fn write_msg<W: Write, T: Serialize>(writer: &mut W, msg: &T) -> io::Result<()> {
    writer.write_all(&encode(msg)?)?;
    writer.flush()
}

/// Reads one frame and decodes it (blocking).
///
/// # Errors
/// `UnexpectedEof` when the peer closed, `InvalidData` for a frame over `max` bytes or one that
/// does not decode, and any other I/O error (including timeouts set on the stream).
pub fn read_msg<R: Read, T: DeserializeOwned>(reader: &mut R, max: usize) -> io::Result<T> {
    let mut len = [0u8; 4];
    reader.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "wire frame too large",
        ));
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    let msg = decode(&body);
    zeroize::Zeroize::zeroize(&mut body);
    msg
}

fn invalid(e: postcard::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extauth::{parse, Secret};

    #[test]
    fn messages_round_trip_through_frames() {
        let msgs = [
            ClientMsg::Hello(Hello {
                version: VERSION,
                node: "ejabberd1@localhost".into(),
                pid: 42,
            }),
            ClientMsg::Request(Request {
                id: u64::MAX,
                deadline_ms: 10_000,
                command: parse(b"auth:alice:example.com:a:b:c").unwrap(),
            }),
        ];
        let mut stream = Vec::new();
        for m in &msgs {
            write_msg(&mut stream, m).unwrap();
        }
        let mut reader = &stream[..];
        for m in &msgs {
            assert_eq!(
                &read_msg::<_, ClientMsg>(&mut reader, MAX_FRAME).unwrap(),
                m
            );
        }
        assert_eq!(
            read_msg::<_, ClientMsg>(&mut reader, MAX_FRAME)
                .unwrap_err()
                .kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn largest_extauth_request_fits_in_a_frame() {
        // An extauth request is at most 65 535 bytes in all, whatever the split between fields.
        let (user, server) = ("u".repeat(1023), "d".repeat(1023));
        let password = "p".repeat(crate::extauth::MAX_REQUEST_LEN - "auth:::".len() - 2046);
        let cmd = Command::Auth {
            user,
            server,
            password: Secret::new(password),
        };
        let frame = encode(&ClientMsg::Request(Request {
            id: 1,
            deadline_ms: 1,
            command: cmd,
        }))
        .unwrap();
        assert!(frame.len() - 4 <= MAX_FRAME);
    }

    #[test]
    fn a_frame_holds_exactly_one_message() {
        let hello = ClientMsg::Hello(Hello {
            version: VERSION,
            node: "n".into(),
            pid: 1,
        });
        let mut body = encode(&hello).unwrap()[4..].to_vec();
        assert_eq!(decode::<ClientMsg>(&body).unwrap(), hello);
        body.push(0);
        let err = decode::<ClientMsg>(&body).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("1 bytes after"), "{err}");
    }

    #[test]
    fn oversized_and_garbage_frames_are_errors() {
        let mut big = (MAX_FRAME as u32 + 1).to_be_bytes().to_vec();
        big.resize(MAX_FRAME + 5, 0);
        let err = read_msg::<_, ServerMsg>(&mut &big[..], MAX_FRAME).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let garbage = [0, 0, 0, 2, 0xff, 0xff];
        let err = read_msg::<_, ServerMsg>(&mut &garbage[..], MAX_FRAME).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn hello_encoding_matches_the_example_in_docs_protocol_md() {
        let hello = ClientMsg::Hello(Hello {
            version: 1,
            node: "n1".into(),
            pid: 300,
        });
        assert_eq!(
            encode(&hello).unwrap(),
            [0, 0, 0, 7, 0, 1, 2, b'n', b'1', 0xac, 0x02]
        );
    }

    #[test]
    fn reasons_are_listed_in_wire_order_with_unique_names() {
        for (i, r) in Reason::ALL.into_iter().enumerate() {
            assert_eq!(
                postcard::to_allocvec(&r).unwrap(),
                [i as u8],
                "{r:?} is variant {i}"
            );
            assert_eq!(Reason::from_name(r.as_str()), Some(r));
        }
    }

    #[test]
    fn responses_round_trip() {
        let r = ServerMsg::Response(Response {
            id: 7,
            ok: true,
            reason: Reason::Accepted,
            source: Source::Redis,
        });
        let frame = encode(&r).unwrap();
        assert_eq!(decode::<ServerMsg>(&frame[4..]).unwrap(), r);
    }
}
