//! ejabberd extauth framing and parsing on arbitrary bytes (src/protocol/extauth.rs).
//!
//! The input is used twice: as one request body for `parse`, and as a byte stream of
//! `{packet, 2}` frames for `read_request` (each frame's body is parsed too). Invariants:
//! - nothing panics; reading from a byte slice never returns an I/O error;
//! - `read_request` yields exactly the frames an independent model of the framing finds, each at
//!   most 65 535 bytes, and stops (`Ok(false)`) only on a missing or incomplete frame;
//! - `parse` agrees with an independent model of the grammar (`model_parse` below), and a parsed
//!   command, rendered back to text, gives the request bytes exactly (so an Auth's password is
//!   the request's tail, every `:` kept, and user/server never contain `:`).
#![no_main]

use extauth_protocol::extauth::{parse, read_request, Command, ParseError, MAX_REQUEST_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check_request(data);

    let mut reader = data;
    let mut buf = Vec::new();
    let mut offset = 0;
    while read_request(&mut reader, &mut buf).expect("reading a slice cannot fail") {
        assert!(offset + 2 <= data.len(), "a frame out of nothing");
        let len = u16::from_be_bytes([data[offset], data[offset + 1]]) as usize;
        assert!(len <= MAX_REQUEST_LEN);
        assert_eq!(buf.len(), len, "frame length");
        assert_eq!(&buf[..], &data[offset + 2..offset + 2 + len], "frame body");
        offset += 2 + len;
        check_request(&buf);
    }
    // Stopped: what is left must be less than one complete frame.
    let rest = &data[offset..];
    assert!(
        rest.len() < 2 || rest.len() - 2 < u16::from_be_bytes([rest[0], rest[1]]) as usize,
        "read_request stopped before a complete frame ({} bytes left)",
        rest.len()
    );
});

fn check_request(body: &[u8]) {
    let got = parse(body);
    assert_eq!(got, model_parse(body), "parse disagrees with the model");
    if let Ok(command) = got {
        assert_eq!(render(&command).as_bytes(), body, "render(parse(x)) != x");
        let (user, server) = command.jid_parts();
        assert!(!user.contains(':') && !server.contains(':'));
        if let Command::Auth { password, .. } = &command {
            let prefix = format!("auth:{user}:{server}:");
            assert!(body.starts_with(prefix.as_bytes()));
            assert_eq!(&body[prefix.len()..], password.expose().as_bytes());
        }
    }
}

/// The grammar of docs/protocol.md, written independently of `parse`: split on every `:`; a
/// command with a trailing secret needs at least 4 fields and the secret is everything after the
/// third `:`; one without needs exactly 3.
fn model_parse(body: &[u8]) -> Result<Command, ParseError> {
    let text = std::str::from_utf8(body).map_err(|_| ParseError::NotUtf8)?;
    let fields: Vec<&str> = text.split(':').collect();
    if fields.len() < 2 {
        return Err(ParseError::UnknownCommand);
    }
    let name = fields[0];
    let secret_commands = ["auth", "setpass", "tryregister", "removeuser3", "certauth"];
    let plain_commands = ["isuser", "removeuser"];
    let (user, server) = (fields[1].to_owned(), fields.get(2).map(|s| s.to_string()));
    if plain_commands.contains(&name) {
        let server = server.ok_or(ParseError::MissingField)?;
        if fields.len() > 3 {
            return Err(ParseError::TrailingField);
        }
        return Ok(if name == "isuser" {
            Command::IsUser { user, server }
        } else {
            Command::RemoveUser { user, server }
        });
    }
    if !secret_commands.contains(&name) {
        return Err(ParseError::UnknownCommand);
    }
    let server = server.ok_or(ParseError::MissingField)?;
    if fields.len() < 4 {
        return Err(ParseError::MissingField);
    }
    let secret = extauth_protocol::extauth::Secret::new(fields[3..].join(":"));
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

/// A command as ejabberd would have sent it.
fn render(command: &Command) -> String {
    match command {
        Command::Auth {
            user,
            server,
            password,
        } => {
            format!("auth:{user}:{server}:{}", password.expose())
        }
        Command::IsUser { user, server } => format!("isuser:{user}:{server}"),
        Command::SetPass {
            user,
            server,
            password,
        } => {
            format!("setpass:{user}:{server}:{}", password.expose())
        }
        Command::TryRegister {
            user,
            server,
            password,
        } => {
            format!("tryregister:{user}:{server}:{}", password.expose())
        }
        Command::RemoveUser { user, server } => format!("removeuser:{user}:{server}"),
        Command::RemoveUser3 {
            user,
            server,
            password,
        } => {
            format!("removeuser3:{user}:{server}:{}", password.expose())
        }
        Command::CertAuth { user, server, cert } => {
            format!("certauth:{user}:{server}:{}", cert.expose())
        }
    }
}
