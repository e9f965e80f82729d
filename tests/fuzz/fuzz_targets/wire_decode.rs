//! The shim <-> broker wire codec on arbitrary bytes (src/protocol/wire.rs).
//!
//! The input is used as a frame body for `decode::<ClientMsg>` and `decode::<ServerMsg>`, and as
//! a byte stream of length-prefixed frames for `read_msg` (with the default `MAX_FRAME` and with
//! a small limit taken from the input). Invariants:
//! - nothing panics; reading from a byte slice never fails but with `UnexpectedEof` (the input
//!   ran out) or `InvalidData` (an oversized or undecodable frame);
//! - what decodes re-encodes (within `MAX_FRAME`, never longer than the bytes it came from) and
//!   decodes to the same message;
//! - `read_msg` gives, frame by frame, what `decode` gives for that frame's body, skips an
//!   undecodable frame without losing sync, and refuses a length over the limit without reading
//!   (or allocating) the body.
//!
//! Run with `-malloc_limit_mb=8` (see README.md) so a length-driven huge allocation is a crash.
#![no_main]

use std::fmt::Debug;
use std::io::ErrorKind;

use extauth_protocol::wire::{decode, encode, read_msg, ClientMsg, ServerMsg, MAX_FRAME};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

fuzz_target!(|data: &[u8]| {
    round_trip::<ClientMsg>(data);
    round_trip::<ServerMsg>(data);
    stream::<ClientMsg>(data, MAX_FRAME);
    stream::<ServerMsg>(data, MAX_FRAME);
    // A small limit, so "over the limit" is reached with short inputs too.
    let small = data.first().map_or(0, |&b| b as usize);
    stream::<ClientMsg>(data.get(1..).unwrap_or_default(), small);
    stream::<ServerMsg>(data.get(1..).unwrap_or_default(), small);
});

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(body: &[u8]) {
    let Ok(msg) = decode::<T>(body) else {
        return;
    };
    let frame = encode(&msg).expect("a decoded message re-encodes");
    let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
    assert_eq!(len, frame.len() - 4, "length prefix");
    assert!(len <= MAX_FRAME);
    assert!(
        len <= body.len(),
        "re-encoding is longer than the input ({len} > {})",
        body.len()
    );
    let again: T = decode(&frame[4..]).expect("a re-encoded message decodes");
    assert_eq!(again, msg, "decode(encode(decode(x))) != decode(x)");
}

fn stream<T: DeserializeOwned + PartialEq + Debug>(data: &[u8], max: usize) {
    let mut reader = data;
    let mut offset = 0;
    loop {
        let got = read_msg::<_, T>(&mut reader, max);
        let left = &data[offset..];
        if left.len() < 4 {
            let e = got.expect_err("a message out of a partial length prefix");
            assert_eq!(e.kind(), ErrorKind::UnexpectedEof);
            return;
        }
        let len = u32::from_be_bytes(left[..4].try_into().unwrap()) as usize;
        if len > max {
            let e = got.expect_err("an oversized frame was accepted");
            assert_eq!(e.kind(), ErrorKind::InvalidData);
            assert_eq!(
                reader.len(),
                left.len() - 4,
                "read past the length of an oversized frame"
            );
            return;
        }
        if left.len() - 4 < len {
            let e = got.expect_err("a message out of a partial frame");
            assert_eq!(e.kind(), ErrorKind::UnexpectedEof);
            return;
        }
        let body = &left[4..4 + len];
        match (got, decode::<T>(body)) {
            (Ok(a), Ok(b)) => assert_eq!(a, b),
            (Err(e), Err(_)) => assert_eq!(e.kind(), ErrorKind::InvalidData),
            (a, b) => panic!("read_msg {a:?} but decode {b:?}"),
        }
        offset += 4 + len;
        assert_eq!(
            reader.len(),
            data.len() - offset,
            "out of sync after a frame"
        );
    }
}
