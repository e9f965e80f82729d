//! Floors: the same paths with no decision at the end, to measure what the architecture itself
//! costs. `extauth-load echo` is a trivial extauth program (stdio only); `extauth-load
//! floor-broker` speaks the wire protocol and accepts every request at once, so shim + socket +
//! wire protocol is all that is left. `extauth-load echo --check-tokens` is the one floor that
//! decides: it gives the broker's verdicts for the harness's self-describing tokens, locally, so
//! a run through a real ejabberd (deploy/tsung/) can compare the two with the same answers.

use std::io::{self, BufWriter, Write};

use std::path::Path;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use extauth_broker::now_ms;
use extauth_protocol::extauth::{parse, read_request, reply, Command};
use extauth_protocol::wire::{self, ClientMsg, Reason, Response, ServerMsg, Source, Welcome};

/// A trivial extauth program: answers the requests on stdin until end of input.
///
/// Without `check_tokens` every request gets "yes". With it, the answers are the broker's for
/// the harness's self-describing tokens ([`super::scenario::token_is_valid_for`]), decided here
/// with no broker, cache or network: `auth` is accepted only for a valid, unexpired token of
/// that very user; `isuser` gets "yes" (a broker says so for a user who has logged in, and a
/// login storm asks only about those); every command that would change an account, and every
/// request that does not parse, gets "no", as the broker refuses them.
///
/// # Errors
/// I/O errors other than end of input.
pub fn echo(check_tokens: bool) -> io::Result<()> {
    let (mut input, mut output) = (io::stdin().lock(), BufWriter::new(io::stdout().lock()));
    let mut request = Vec::new();
    while read_request(&mut input, &mut request)? {
        let yes = !check_tokens || checked_verdict(&request);
        output.write_all(&reply(yes))?;
        output.flush()?;
    }
    Ok(())
}

/// The verdict of `echo --check-tokens` for one request frame.
fn checked_verdict(request: &[u8]) -> bool {
    match parse(request) {
        Ok(Command::Auth { user, password, .. }) => {
            super::scenario::token_is_valid_for(password.expose(), &user, now_ms() / 1000)
        }
        Ok(Command::IsUser { .. }) => true,
        Ok(_) | Err(_) => false,
    }
}

/// Serves the wire protocol on the Unix socket `path` until killed, accepting every request
/// without looking at it. Requests are answered in order, inline (no task per request, no cache,
/// no lock), with one flush per batch of pipelined requests.
///
/// # Errors
/// When `path` cannot be bound.
pub async fn serve_floor(path: &Path) -> Result<()> {
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = relay(stream).await;
        });
    }
}

async fn relay(stream: UnixStream) -> io::Result<()> {
    let codec = || {
        LengthDelimitedCodec::builder()
            .max_frame_length(wire::MAX_FRAME)
            .new_codec()
    };
    let (read, write) = stream.into_split();
    let (mut frames, mut sink) = (
        FramedRead::new(read, codec()),
        FramedWrite::new(write, codec()),
    );
    let mut next = frames.next().await;
    while let Some(body) = next {
        let answer = match wire::decode::<ClientMsg>(&body?)? {
            ClientMsg::Hello(_) => ServerMsg::Welcome(Welcome {
                version: wire::VERSION,
                server: "extauth-load-floor".into(),
            }),
            ClientMsg::Request(r) => ServerMsg::Response(Response {
                id: r.id,
                ok: true,
                reason: Reason::Accepted,
                source: Source::Local,
            }),
        };
        sink.feed(Bytes::from(wire::encode(&answer)?).slice(4..))
            .await?;
        // Flush only when no further request is already waiting.
        next = match frames.next().now_or_never() {
            Some(more) => more,
            None => {
                SinkExt::<Bytes>::flush(&mut sink).await?;
                frames.next().await
            }
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_tokens_answers_like_the_broker() {
        let exp = now_ms() / 1000 + 3600;
        let auth = |user: &str, token: &str| {
            checked_verdict(format!("auth:{user}:localhost:{token}").as_bytes())
        };
        assert!(auth("user7", &format!("run.7.{exp}.1")));
        assert!(
            !auth("user8", &format!("run.7.{exp}.1")),
            "another user's token"
        );
        assert!(!auth("user7", "run.x.7"), "unknown token");
        assert!(!auth("user7", "run.7.1000.1"), "expired token");
        assert!(checked_verdict(b"isuser:user7:localhost"));
        assert!(!checked_verdict(
            format!("setpass:user7:localhost:run.7.{exp}.1").as_bytes()
        ));
        assert!(!checked_verdict(b"auth:user7"), "malformed");
    }
}
