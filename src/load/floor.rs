//! Floors: the same paths with no decision at the end, to measure what the architecture itself
//! costs. `extauth-load echo` is a trivial extauth program (stdio only); `extauth-load
//! floor-broker` speaks the wire protocol and accepts every request at once, so shim + socket +
//! wire protocol is all that is left.

use std::io::{self, BufWriter, Write};

use std::path::Path;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::extauth::{read_request, reply};
use crate::wire::{self, ClientMsg, Reason, Response, ServerMsg, Source, Welcome};

/// A trivial extauth program: answers every request on stdin "yes" until end of input.
///
/// # Errors
/// I/O errors other than end of input.
pub fn echo() -> io::Result<()> {
    let (mut input, mut output) = (io::stdin().lock(), BufWriter::new(io::stdout().lock()));
    let mut request = Vec::new();
    while read_request(&mut input, &mut request)? {
        output.write_all(&reply(true))?;
        output.flush()?;
    }
    Ok(())
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
