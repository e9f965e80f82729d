//! Property tests (proptest) of both codecs: ejabberd's extauth framing and parser
//! (`src/protocol/extauth.rs`) and the shim <-> broker wire codec (`src/protocol/wire.rs`).
//!
//! For each: every message round-trips; arbitrary bytes never panic; a garbage frame never
//! desynchronises the valid frame that follows it; an oversized wire length is refused without
//! reading or allocating the body. Last, the real `extauth-shim` binary, driven with generated
//! frame sequences against a live broker, answers each complete frame with exactly one 4-byte
//! reply and writes nothing else.
//!
//! The cases of the fuzz targets in `tests/fuzz/` that found something are kept here as plain
//! tests (none so far, see tests/fuzz/README.md).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{self, ErrorKind, Read};
use std::time::Duration;

use extauth_protocol::extauth::{
    parse, read_request, reply, Command, ParseError, Secret, MAX_REQUEST_LEN,
};
use extauth_protocol::wire::{
    decode, encode, read_msg, write_msg, ClientMsg, Hello, Reason, Refused, Request, Response,
    ServerMsg, Source, Welcome, MAX_FRAME, VERSION,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

// ---------------------------------------------------------------------------------------------
// Allocation tracking: the largest single allocation made by this thread, so a property can say
// "no allocation larger than the input" (a length field must never size a buffer by itself).

struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|c| c.set(c.get().max(size)));
}

// SAFETY: every call is forwarded unchanged to the system allocator; `note` only touches a
// const-initialised thread-local `Cell<usize>`, which neither allocates nor registers a destructor.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// Runs `f` and returns its result with the largest single allocation it made on this thread.
fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|c| c.set(0));
    let result = f();
    (result, LARGEST.with(Cell::get))
}

// ---------------------------------------------------------------------------------------------
// Helpers.

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

/// An extauth frame: 2-byte big-endian length, then the request.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut v = u16::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

/// A wire frame with an arbitrary body: 4-byte big-endian length, then the bytes.
fn wire_frame(body: &[u8]) -> Vec<u8> {
    let mut v = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

/// A command as ejabberd sends it (the inverse of `parse`).
fn render(command: &Command) -> String {
    match command {
        Command::Auth {
            user,
            server,
            password,
        } => format!("auth:{user}:{server}:{}", password.expose()),
        Command::IsUser { user, server } => format!("isuser:{user}:{server}"),
        Command::SetPass {
            user,
            server,
            password,
        } => format!("setpass:{user}:{server}:{}", password.expose()),
        Command::TryRegister {
            user,
            server,
            password,
        } => format!("tryregister:{user}:{server}:{}", password.expose()),
        Command::RemoveUser { user, server } => format!("removeuser:{user}:{server}"),
        Command::RemoveUser3 {
            user,
            server,
            password,
        } => format!("removeuser3:{user}:{server}:{}", password.expose()),
        Command::CertAuth { user, server, cert } => {
            format!("certauth:{user}:{server}:{}", cert.expose())
        }
    }
}

fn command_of(kind: u8, user: String, server: String, secret: String) -> Command {
    let secret = Secret::new(secret);
    match kind % 7 {
        0 => Command::Auth {
            user,
            server,
            password: secret,
        },
        1 => Command::IsUser { user, server },
        2 => Command::SetPass {
            user,
            server,
            password: secret,
        },
        3 => Command::TryRegister {
            user,
            server,
            password: secret,
        },
        4 => Command::RemoveUser { user, server },
        5 => Command::RemoveUser3 {
            user,
            server,
            password: secret,
        },
        _ => Command::CertAuth {
            user,
            server,
            cert: secret,
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies.

/// A user or server: never contains ':' (ejabberd's nodeprep/nameprep forbid it), anything else
/// goes, including unicode, control characters and the empty string.
fn field() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9._-]{0,12}",
        "[^:]{0,24}",
        "[éü€😀\u{0}\u{7f}\u{feff}]{0,6}",
    ]
}

/// A password, token or certificate: anything, with ':' made common.
fn secret() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9._~+/=-]{0,64}",
        "[a-z:]{0,32}",
        ":{0,8}",
        "(?s).{0,64}",
        "[:é€😀\u{0}\n]{0,16}",
    ]
}

fn command() -> impl Strategy<Value = Command> {
    (0..7u8, field(), field(), secret()).prop_map(|(k, u, s, p)| command_of(k, u, s, p))
}

/// A command whose request is (close to) `target` bytes long, up to the 65 535-byte maximum:
/// the secret is a generated chunk (unicode, colons) repeated, cut on a character boundary.
fn sized_command() -> impl Strategy<Value = Command> {
    (
        prop_oneof![0..=MAX_REQUEST_LEN, Just(MAX_REQUEST_LEN), 0..64usize],
        0..7u8,
        field(),
        field(),
        "(?s)[:é€😀a-z]{1,8}|(?s).{1,8}",
    )
        .prop_map(|(target, kind, user, server, chunk)| {
            let head = render(&command_of(
                kind,
                user.clone(),
                server.clone(),
                String::new(),
            ));
            let room = target.saturating_sub(head.len());
            let mut secret = chunk.repeat(room / chunk.len() + 1);
            let mut cut = room.min(secret.len());
            while !secret.is_char_boundary(cut) {
                cut -= 1;
            }
            secret.truncate(cut);
            command_of(kind, user, server, secret)
        })
}

fn reason() -> impl Strategy<Value = Reason> {
    prop::sample::select(Reason::ALL.to_vec())
}

fn source() -> impl Strategy<Value = Source> {
    prop::sample::select(vec![
        Source::Local,
        Source::L1,
        Source::Redis,
        Source::Provider,
    ])
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9@./-]{0,24}", "(?s).{0,64}"]
}

fn client_msg() -> impl Strategy<Value = ClientMsg> {
    prop_oneof![
        (any::<u16>(), text(), any::<u32>())
            .prop_map(|(version, node, pid)| ClientMsg::Hello(Hello { version, node, pid })),
        (any::<u64>(), any::<u32>(), command()).prop_map(|(id, deadline_ms, command)| {
            ClientMsg::Request(Request {
                id,
                deadline_ms,
                command,
            })
        }),
    ]
}

fn server_msg() -> impl Strategy<Value = ServerMsg> {
    prop_oneof![
        (any::<u16>(), text())
            .prop_map(|(version, server)| ServerMsg::Welcome(Welcome { version, server })),
        (any::<u16>(), text())
            .prop_map(|(version, reason)| ServerMsg::Refused(Refused { version, reason })),
        (any::<u64>(), any::<bool>(), reason(), source()).prop_map(|(id, ok, reason, source)| {
            ServerMsg::Response(Response {
                id,
                ok,
                reason,
                source,
            })
        }),
    ]
}

/// Arbitrary bytes, mostly short, sometimes up to `max` long. The long ones come from a seeded
/// xorshift generator: a 64 KiB vector of individually shrinkable bytes is slow to generate in a
/// debug build, and their length is what matters (it shrinks).
fn bytes_up_to(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => prop::collection::vec(any::<u8>(), 0..64),
        2 => prop::collection::vec(any::<u8>(), 0..1024),
        1 => (0..=max, any::<u64>()).prop_map(|(len, seed)| {
            let mut x = seed | 1;
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        }),
    ]
}

// ---------------------------------------------------------------------------------------------
// extauth

/// The extauth framing as the protocol describes it: complete frames, in order, and nothing
/// from an incomplete last frame.
fn model_frames(mut data: &[u8]) -> Vec<&[u8]> {
    let mut frames = Vec::new();
    while data.len() >= 2 {
        let len = u16::from_be_bytes([data[0], data[1]]) as usize;
        if data.len() < 2 + len {
            break;
        }
        frames.push(&data[2..2 + len]);
        data = &data[2 + len..];
    }
    frames
}

proptest! {
    #![proptest_config(Config::with_cases(256))]

    #[test]
    fn extauth_commands_round_trip_through_frames(
        cmd in command(),
        chunk in 1usize..64,
    ) {
        let text = render(&cmd);
        let data = frame(text.as_bytes());
        let mut reader = Trickle { data: &data, chunk };
        let mut buf = vec![0xAA; 7];
        prop_assert!(read_request(&mut reader, &mut buf).unwrap());
        prop_assert_eq!(&buf[..], text.as_bytes());
        prop_assert_eq!(parse(&buf).unwrap(), cmd);
        prop_assert!(!read_request(&mut reader, &mut buf).unwrap(), "end of input after the frame");
    }

    #[test]
    fn parse_never_panics_and_what_parses_renders_back_to_the_same_bytes(
        body in prop_oneof![
            bytes_up_to(4096),
            // Near misses: a known command name, then arbitrary bytes.
            (prop::sample::select(vec![
                "auth", "isuser", "setpass", "tryregister", "removeuser", "removeuser3",
                "certauth", "AUTH", "",
            ]), bytes_up_to(64)).prop_map(|(name, rest)| {
                let mut v = name.as_bytes().to_vec();
                v.push(b':');
                v.extend(rest);
                v
            }),
        ],
    ) {
        match parse(&body) {
            Ok(cmd) => {
                let text = render(&cmd);
                prop_assert_eq!(text.as_bytes(), &body[..]);
                let (user, server) = cmd.jid_parts();
                prop_assert!(!user.contains(':') && !server.contains(':'));
            }
            Err(ParseError::NotUtf8) => prop_assert!(std::str::from_utf8(&body).is_err()),
            Err(_) => prop_assert!(std::str::from_utf8(&body).is_ok()),
        }
    }

    #[test]
    fn read_request_on_arbitrary_bytes_yields_exactly_the_complete_frames(
        data in bytes_up_to(8192),
        chunk in 1usize..512,
    ) {
        let want = model_frames(&data);
        let mut reader = Trickle { data: &data, chunk };
        let mut buf = Vec::new();
        let mut got = Vec::new();
        while read_request(&mut reader, &mut buf).unwrap() {
            prop_assert!(buf.len() <= MAX_REQUEST_LEN);
            let _ = parse(&buf);
            got.push(buf.clone());
            prop_assert!(got.len() <= want.len(), "more frames than the input holds");
        }
        prop_assert_eq!(got, want);
    }

    #[test]
    fn a_garbage_extauth_frame_never_desynchronises_the_next_one(
        garbage in bytes_up_to(MAX_REQUEST_LEN),
        cmd in command(),
        chunk in prop_oneof![1usize..8, 1usize..70_000],
    ) {
        let valid = render(&cmd);
        let mut data = frame(&garbage);
        data.extend(frame(valid.as_bytes()));
        let mut reader = Trickle { data: &data, chunk };
        let mut buf = Vec::new();
        prop_assert!(read_request(&mut reader, &mut buf).unwrap());
        prop_assert_eq!(&buf, &garbage);
        let _ = parse(&buf);
        prop_assert!(read_request(&mut reader, &mut buf).unwrap());
        prop_assert_eq!(&buf[..], valid.as_bytes());
        prop_assert_eq!(parse(&buf).unwrap(), cmd);
    }
}

proptest! {
    // 64 KiB requests: fewer cases.
    #![proptest_config(Config::with_cases(48))]

    #[test]
    fn requests_of_any_size_up_to_65535_bytes_round_trip(
        cmd in sized_command(),
        chunk in 1usize..70_000,
    ) {
        let text = render(&cmd);
        prop_assert!(text.len() <= MAX_REQUEST_LEN);
        let data = frame(text.as_bytes());
        let mut buf = Vec::new();
        let mut reader = Trickle { data: &data, chunk };
        prop_assert!(read_request(&mut reader, &mut buf).unwrap());
        let parsed = parse(&buf).unwrap();
        prop_assert_eq!(&parsed, &cmd);
        // Any extauth request fits in one wire frame, whatever its size.
        let msg = ClientMsg::Request(Request { id: u64::MAX, deadline_ms: u32::MAX, command: parsed });
        let wire = encode(&msg).unwrap();
        prop_assert!(wire.len() - 4 <= MAX_FRAME);
        prop_assert_eq!(decode::<ClientMsg>(&wire[4..]).unwrap(), msg);
    }
}

#[test]
fn the_largest_request_is_exactly_65535_bytes_and_parses() {
    let head = "auth:alice:example.com:";
    let mut text = head.to_owned();
    for c in "a:é€😀".chars().cycle() {
        if text.len() + c.len_utf8() > MAX_REQUEST_LEN {
            break;
        }
        text.push(c);
    }
    while text.len() < MAX_REQUEST_LEN {
        text.push(':');
    }
    assert_eq!(text.len(), 65_535);
    let data = frame(text.as_bytes());
    assert_eq!(&data[..2], [0xff, 0xff]);
    let mut buf = Vec::new();
    assert!(read_request(&mut &data[..], &mut buf).unwrap());
    match parse(&buf).unwrap() {
        Command::Auth { password, .. } => assert_eq!(password.expose(), &text[head.len()..]),
        other => panic!("unexpected {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// wire

/// `read_msg` as the protocol describes it, for one frame at the start of `data`: what it must
/// return, and how many bytes it may consume (`None`: the stream is over, either way).
fn model_read<T: serde::de::DeserializeOwned>(
    data: &[u8],
    max: usize,
) -> (Result<T, ErrorKind>, Option<usize>) {
    if data.len() < 4 {
        return (Err(ErrorKind::UnexpectedEof), None);
    }
    let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
    if len > max {
        return (Err(ErrorKind::InvalidData), None);
    }
    if data.len() - 4 < len {
        return (Err(ErrorKind::UnexpectedEof), None);
    }
    (
        decode::<T>(&data[4..4 + len]).map_err(|e| e.kind()),
        Some(4 + len),
    )
}

fn stream_matches_model<T>(data: &[u8], max: usize) -> Result<(), TestCaseError>
where
    T: serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut reader = data;
    let mut offset = 0;
    loop {
        let got = read_msg::<_, T>(&mut reader, max).map_err(|e| e.kind());
        let (want, used) = model_read::<T>(&data[offset..], max);
        prop_assert_eq!(&got, &want);
        let Some(used) = used else {
            return Ok(());
        };
        offset += used;
        prop_assert_eq!(reader.len(), data.len() - offset, "out of sync");
    }
}

proptest! {
    #![proptest_config(Config::with_cases(256))]

    #[test]
    fn client_messages_round_trip(msgs in prop::collection::vec(client_msg(), 1..6)) {
        let mut stream = Vec::new();
        for m in &msgs {
            let frame = encode(m).unwrap();
            prop_assert_eq!(frame.len() - 4, u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize);
            prop_assert_eq!(&decode::<ClientMsg>(&frame[4..]).unwrap(), m);
            write_msg(&mut stream, m).unwrap();
        }
        let mut reader = &stream[..];
        for m in &msgs {
            prop_assert_eq!(&read_msg::<_, ClientMsg>(&mut reader, MAX_FRAME).unwrap(), m);
        }
        prop_assert_eq!(
            read_msg::<_, ClientMsg>(&mut reader, MAX_FRAME).unwrap_err().kind(),
            ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn server_messages_round_trip(msgs in prop::collection::vec(server_msg(), 1..6)) {
        let mut stream = Vec::new();
        for m in &msgs {
            let frame = encode(m).unwrap();
            prop_assert_eq!(&decode::<ServerMsg>(&frame[4..]).unwrap(), m);
            write_msg(&mut stream, m).unwrap();
        }
        let mut reader = &stream[..];
        for m in &msgs {
            prop_assert_eq!(&read_msg::<_, ServerMsg>(&mut reader, MAX_FRAME).unwrap(), m);
        }
        prop_assert_eq!(
            read_msg::<_, ServerMsg>(&mut reader, MAX_FRAME).unwrap_err().kind(),
            ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn decode_never_panics_allocates_no_more_than_its_input_and_re_encodes(
        body in prop_oneof![
            bytes_up_to(2048),
            // Valid messages with a few bytes changed or cut: closer to the decoder's edges.
            (client_msg(), prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4), any::<prop::sample::Index>())
                .prop_map(|(m, flips, cut)| mutate(&encode(&m).unwrap()[4..], &flips, cut)),
            (server_msg(), prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4), any::<prop::sample::Index>())
                .prop_map(|(m, flips, cut)| mutate(&encode(&m).unwrap()[4..], &flips, cut)),
        ],
    ) {
        let (client, largest) = largest_allocation(|| decode::<ClientMsg>(&body));
        prop_assert!(largest <= body.len().max(1024), "decode allocated {largest} bytes for a {}-byte body", body.len());
        let (server, largest) = largest_allocation(|| decode::<ServerMsg>(&body));
        prop_assert!(largest <= body.len().max(1024), "decode allocated {largest} bytes for a {}-byte body", body.len());
        if let Ok(m) = client {
            let frame = encode(&m).unwrap();
            prop_assert!(frame.len() - 4 <= body.len(), "re-encoding is longer than its input");
            prop_assert_eq!(decode::<ClientMsg>(&frame[4..]).unwrap(), m);
        }
        if let Ok(m) = server {
            let frame = encode(&m).unwrap();
            prop_assert!(frame.len() - 4 <= body.len(), "re-encoding is longer than its input");
            prop_assert_eq!(decode::<ServerMsg>(&frame[4..]).unwrap(), m);
        }
    }

    #[test]
    fn read_msg_on_arbitrary_bytes_follows_the_framing(
        data in prop_oneof![
            bytes_up_to(4096),
            // Streams of (mostly) short garbage frames with honest lengths.
            prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..6)
                .prop_map(|frames| frames.iter().flat_map(|f| wire_frame(f)).collect()),
        ],
        max in prop_oneof![Just(MAX_FRAME), 0usize..64],
    ) {
        stream_matches_model::<ClientMsg>(&data, max)?;
        stream_matches_model::<ServerMsg>(&data, max)?;
    }

    #[test]
    fn a_garbage_wire_frame_never_desynchronises_the_next_one(
        garbage in bytes_up_to(MAX_FRAME),
        client in client_msg(),
        server in server_msg(),
        chunk in prop_oneof![1usize..8, 1usize..70_000],
    ) {
        let mut data = wire_frame(&garbage);
        data.extend(encode(&client).unwrap());
        let mut reader = Trickle { data: &data, chunk };
        match read_msg::<_, ClientMsg>(&mut reader, MAX_FRAME) {
            Ok(_) => {}
            Err(e) => prop_assert_eq!(e.kind(), ErrorKind::InvalidData),
        }
        prop_assert_eq!(read_msg::<_, ClientMsg>(&mut reader, MAX_FRAME).unwrap(), client);

        let mut data = wire_frame(&garbage);
        data.extend(encode(&server).unwrap());
        let mut reader = Trickle { data: &data, chunk };
        match read_msg::<_, ServerMsg>(&mut reader, MAX_FRAME) {
            Ok(_) => {}
            Err(e) => prop_assert_eq!(e.kind(), ErrorKind::InvalidData),
        }
        prop_assert_eq!(read_msg::<_, ServerMsg>(&mut reader, MAX_FRAME).unwrap(), server);
    }

    #[test]
    fn an_oversized_length_is_refused_without_reading_or_allocating_the_body(
        max in prop_oneof![Just(MAX_FRAME), 0usize..70_000],
        excess in prop_oneof![1u64..16, 1u64..=u64::from(u32::MAX)],
        tail in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let len = (max as u64 + excess).min(u64::from(u32::MAX));
        prop_assume!(len > max as u64);
        let mut data = (len as u32).to_be_bytes().to_vec();
        data.extend(&tail);
        let mut reader = &data[..];
        let (result, largest) = largest_allocation(|| read_msg::<_, ClientMsg>(&mut reader, max));
        prop_assert_eq!(result.unwrap_err().kind(), ErrorKind::InvalidData);
        prop_assert_eq!(reader.len(), tail.len(), "only the length prefix is consumed");
        prop_assert!(largest < 1024, "refusing an oversized frame allocated {largest} bytes");
        let mut reader = &data[..];
        prop_assert_eq!(read_msg::<_, ServerMsg>(&mut reader, max).unwrap_err().kind(), ErrorKind::InvalidData);
    }

    #[test]
    fn encode_refuses_a_message_over_max_frame(extra in 0usize..300) {
        let reason = "r".repeat(MAX_FRAME - 8 + extra);
        let msg = ServerMsg::Refused(Refused { version: VERSION, reason });
        let body_len = postcard_len(&msg);
        match encode(&msg) {
            Ok(frame) => {
                prop_assert!(body_len <= MAX_FRAME);
                prop_assert_eq!(frame.len() - 4, body_len);
            }
            Err(e) => {
                prop_assert!(body_len > MAX_FRAME);
                prop_assert_eq!(e.kind(), ErrorKind::InvalidInput);
            }
        }
    }
}

/// The body length of `msg` without the MAX_FRAME check (3-byte varint for these lengths).
fn postcard_len(msg: &ServerMsg) -> usize {
    match msg {
        // variant (1) + version varint + string length varint + bytes
        ServerMsg::Refused(r) => {
            1 + varint_len(r.version.into()) + varint_len(r.reason.len() as u64) + r.reason.len()
        }
        _ => unreachable!(),
    }
}

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn mutate(bytes: &[u8], flips: &[(prop::sample::Index, u8)], cut: prop::sample::Index) -> Vec<u8> {
    let mut v = bytes.to_vec();
    if v.is_empty() {
        return v;
    }
    for (at, byte) in flips {
        let i = at.index(v.len());
        v[i] = *byte;
    }
    v.truncate(cut.index(v.len() + 1));
    v
}

// ---------------------------------------------------------------------------------------------
// The real shim against a live broker.

/// One frame of a sequence sent to the shim.
#[derive(Debug, Clone)]
enum Piece {
    /// `auth` with the token the provider knows for alice: 1.
    Good,
    /// `auth` for alice with a token the provider does not know (may contain ':'): 0.
    WrongToken(String),
    /// A command the broker never grants (`setpass`, `removeuser`, ...): 0.
    Unsupported(u8),
    /// Arbitrary bytes: 0 unless they happen to parse.
    Garbage(Vec<u8>),
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        2 => Just(Piece::Good),
        2 => "[A-Za-z0-9:._-]{0,40}".prop_map(Piece::WrongToken),
        1 => (2..7u8).prop_map(Piece::Unsupported),
        3 => bytes_up_to(MAX_REQUEST_LEN).prop_map(Piece::Garbage),
    ]
}

/// A sequence for one shim process: complete frames, maybe an incomplete last frame (its body,
/// and where it is cut: end of input inside a frame), and how the bytes are cut into writes.
type Session = (
    Vec<Piece>,
    Option<(Vec<u8>, prop::sample::Index)>,
    Vec<usize>,
);

fn session() -> impl Strategy<Value = Session> {
    (
        prop::collection::vec(piece(), 0..8),
        prop::option::weighted(0.3, (bytes_up_to(256), any::<prop::sample::Index>())),
        prop::collection::vec(1usize..4096, 1..8),
    )
}

#[test]
fn the_real_shim_answers_every_complete_frame_with_exactly_one_reply() {
    use extauth_testkit::services::{shim_bin, token, Broker, BrokerSpec, Provider, Shim};

    // Build the shim first (`cargo build -p extauth-shim`), outside the timed cases.
    shim_bin();
    let provider = Provider::start();
    let good = token("props");
    provider.insert(&good, serde_json::json!({"username": "alice"}));
    let broker = Broker::start(&BrokerSpec::new(&provider));
    let addr = broker.addr();

    // 256 sequences of 0-7 frames (about 900 frames): a case costs 5-30 ms (a shim process, its
    // broker connection, its requests); all of them 3-6 s on the loaded 2-core machine.
    let mut runner = TestRunner::new(Config {
        cases: 256,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&session(), |(pieces, tail, cuts)| {
            let mut bytes = Vec::new();
            let mut expected = Vec::new();
            for p in &pieces {
                let (body, want) = match p {
                    Piece::Good => (
                        format!("auth:alice:example.com:{good}").into_bytes(),
                        Some(true),
                    ),
                    Piece::WrongToken(t) => (
                        format!("auth:alice:example.com:nope-{t}").into_bytes(),
                        Some(false),
                    ),
                    Piece::Unsupported(k) => {
                        let cmd =
                            command_of(*k, "alice".into(), "example.com".into(), good.clone());
                        (render(&cmd).into_bytes(), Some(false))
                    }
                    Piece::Garbage(g) => (g.clone(), parse(g).is_err().then_some(false)),
                };
                bytes.extend(frame(&body));
                expected.push(want);
            }
            if let Some((body, cut)) = &tail {
                // 0..len-1 bytes of a frame: never the whole of it.
                let f = frame(body);
                bytes.extend_from_slice(&f[..cut.index(f.len())]);
            }
            let mut shim = Shim::spawn(&addr, 10.0, &[]);
            let mut rest = &bytes[..];
            for n in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let n = (*n).min(rest.len());
                shim.send_raw(&rest[..n]);
                rest = &rest[n..];
            }
            let (out, status) = shim.finish(Duration::from_secs(15));
            prop_assert!(status.success(), "shim exit status {status:?}");
            prop_assert_eq!(
                out.len(),
                4 * pieces.len(),
                "one 4-byte reply per complete frame, nothing else: {:?}",
                out
            );
            for (i, (answer, want)) in out.chunks(4).zip(&expected).enumerate() {
                let ok = if answer == reply(true) {
                    true
                } else if answer == reply(false) {
                    false
                } else {
                    return Err(TestCaseError::fail(format!(
                        "reply {i} is not an extauth reply: {answer:?}"
                    )));
                };
                if let Some(want) = want {
                    prop_assert_eq!(ok, *want, "reply {} to {:?}", i, &pieces[i]);
                }
            }
            Ok(())
        })
        .unwrap();
}
