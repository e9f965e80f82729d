//! A raw wire-protocol client (what a shim sends, without the shim), for tests that need to
//! choose a request's `deadline_ms` or pipeline several requests on one connection.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use extauth_protocol::extauth;
use extauth_protocol::wire::{self, ClientMsg, Hello, Request, Response, ServerMsg};

use super::services::Broker;

/// One wire-protocol connection to a broker, as a shim opens it (handshake first). Reads time
/// out after 30 s, so a test never hangs on a broker that does not answer.
pub fn connect(broker: &Broker) -> UnixStream {
    let mut stream = UnixStream::connect(&broker.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let hello = ClientMsg::Hello(Hello {
        version: wire::VERSION,
        node: "test".into(),
        pid: std::process::id(),
    });
    wire::write_msg(&mut stream, &hello).unwrap();
    match wire::read_msg(&mut stream, wire::MAX_FRAME).unwrap() {
        ServerMsg::Welcome(_) => stream,
        other => panic!("handshake refused: {other:?}"),
    }
}

/// Sends the extauth request `text` (e.g. `auth:alice:example.com:TOKEN`) with `deadline_ms`,
/// without waiting for the answer.
pub fn send(stream: &mut UnixStream, id: u64, deadline_ms: u32, text: &str) {
    let command = extauth::parse(text.as_bytes()).unwrap();
    wire::write_msg(
        stream,
        &ClientMsg::Request(Request {
            id,
            deadline_ms,
            command,
        }),
    )
    .unwrap();
}

/// Reads the next response (any id).
pub fn receive(stream: &mut UnixStream) -> Response {
    match wire::read_msg(stream, wire::MAX_FRAME).unwrap() {
        ServerMsg::Response(r) => r,
        other => panic!("unexpected {other:?}"),
    }
}

/// Sends `text` with `deadline_ms` and waits for its response.
pub fn ask(stream: &mut UnixStream, id: u64, deadline_ms: u32, text: &str) -> Response {
    send(stream, id, deadline_ms, text);
    let response = receive(stream);
    assert_eq!(response.id, id, "one request in flight: the answer is its");
    response
}

/// `auth:USER:example.com:TOKEN` with a 10 s deadline.
pub fn auth(stream: &mut UnixStream, id: u64, user: &str, token: &str) -> Response {
    ask(
        stream,
        id,
        10_000,
        &format!("auth:{user}:example.com:{token}"),
    )
}
