//! Micro-benchmarks of the protocol codecs on the request path: ejabberd's extauth framing and
//! parsing (in the shim), and the wire protocol's encoding and decoding (shim and broker).
//!
//! `cargo bench --bench codecs`. Token sizes: 40 bytes (an opaque token) and 1 KiB (a JWT).

use divan::{black_box, Bencher};
use extauth_protocol::extauth::{self, Command, Secret};
use extauth_protocol::wire::{self, ClientMsg, Reason, Request, Response, ServerMsg, Source};

fn main() {
    divan::main();
}

const TOKEN_LENS: [usize; 2] = [40, 1024];

fn auth_line(token_len: usize) -> Vec<u8> {
    format!("auth:alice:example.com:{}", "t".repeat(token_len)).into_bytes()
}

fn request(token_len: usize) -> ClientMsg {
    let command = Command::Auth {
        user: "alice".into(),
        server: "example.com".into(),
        password: Secret::new("t".repeat(token_len)),
    };
    ClientMsg::Request(Request {
        id: 42,
        deadline_ms: 10_000,
        command,
    })
}

/// Reads one `{packet, 2}` frame and parses it, as the shim does for every request.
#[divan::bench(args = TOKEN_LENS)]
fn extauth_read_and_parse(bencher: Bencher, token_len: usize) {
    let line = auth_line(token_len);
    let mut frame = (line.len() as u16).to_be_bytes().to_vec();
    frame.extend_from_slice(&line);
    let mut buf = Vec::new();
    bencher.bench_local(|| {
        let mut input = black_box(&frame[..]);
        extauth::read_request(&mut input, &mut buf).unwrap();
        extauth::parse(&buf).unwrap()
    });
}

#[divan::bench(args = TOKEN_LENS)]
fn wire_encode_request(bencher: Bencher, token_len: usize) {
    let msg = request(token_len);
    bencher.bench_local(|| wire::encode(black_box(&msg)).unwrap());
}

#[divan::bench(args = TOKEN_LENS)]
fn wire_decode_request(bencher: Bencher, token_len: usize) {
    let frame = wire::encode(&request(token_len)).unwrap();
    bencher.bench_local(|| wire::decode::<ClientMsg>(black_box(&frame[4..])).unwrap());
}

#[divan::bench]
fn wire_response_round_trip(bencher: Bencher) {
    let msg = ServerMsg::Response(Response {
        id: 42,
        ok: true,
        reason: Reason::Accepted,
        source: Source::L1,
    });
    bencher.bench_local(|| {
        let frame = wire::encode(black_box(&msg)).unwrap();
        wire::decode::<ServerMsg>(&frame[4..]).unwrap()
    });
}
