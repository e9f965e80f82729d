//! Telling the two protocols apart by their first bytes, so a shim started with the wrong
//! `--protocol` says so at once instead of waiting for bytes that never come (an ejabberd shim
//! reading `au` as a frame length of 24 949) or answering garbage.
//!
//! Unambiguous: an ejabberd frame's body starts with a command name, so its bytes 2.. do; a
//! line starts with the command name at byte 0. A frame cannot start with `auth:` at byte 0:
//! its body would then start with `th:`, which is no command (likewise for every command).

use crate::options::Protocol;

/// The command names both protocols start a request with, with their `:`.
const COMMANDS: [&[u8]; 7] = [
    b"auth:",
    b"isuser:",
    b"setpass:",
    b"tryregister:",
    b"removeuser:",
    b"removeuser3:",
    b"certauth:",
];

fn starts_with_command(bytes: &[u8]) -> bool {
    COMMANDS
        .iter()
        .any(|c| bytes.len() >= c.len() && bytes.starts_with(c))
}

/// Why the first bytes of input (`head`, as much as has arrived) belong to the other protocol.
pub(crate) fn mismatch(protocol: Protocol, head: &[u8]) -> Option<&'static str> {
    match protocol {
        Protocol::Ejabberd if starts_with_command(head) => Some(
            "stdin carries text lines (\"auth:USER:HOST:PASS\"), Prosody's generic protocol, not \
             ejabberd's length-prefixed frames: start the shim with --protocol generic",
        ),
        Protocol::Generic if !starts_with_command(head) && starts_with_command(head.get(2..)?) => {
            Some(
                "stdin carries ejabberd's length-prefixed frames, not text lines: start the shim \
                 without --protocol generic (or with --protocol ejabberd)",
            )
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_protocol_recognises_the_other() {
        let frame = b"\x00\x1aauth:alice:example.com:tok";
        let line = b"auth:alice:example.com:tok\n";
        assert!(mismatch(Protocol::Ejabberd, line).is_some());
        assert!(mismatch(Protocol::Ejabberd, frame).is_none());
        assert!(mismatch(Protocol::Generic, frame).is_some());
        assert!(mismatch(Protocol::Generic, line).is_none());
        for command in COMMANDS {
            let mut framed = vec![0x61, command[0]];
            framed.extend_from_slice(&command[1..]);
            assert!(
                mismatch(Protocol::Ejabberd, &framed).is_none(),
                "a frame whose length bytes spell a letter is still a frame"
            );
        }
        assert!(mismatch(Protocol::Generic, b"").is_none());
        assert!(
            mismatch(Protocol::Ejabberd, b"au").is_none(),
            "too little to tell"
        );
    }
}
