//! The shim's two protocols as servers start it: ejabberd's frames on pipes, Prosody's line
//! protocol (`--protocol generic`) on pipes and under a real pseudo-terminal (Prosody runs its
//! auth programs under a pty), every byte value in passwords, and a shim started with the wrong
//! protocol saying so instead of hanging.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use extauth_testkit::services::{frame, shim_bin, token, wait_until, Broker, BrokerSpec, Provider};
use nix::sys::termios::{tcgetattr, LocalFlags};
use serde_json::json;

/// A shim whose stdin and stdout are the slave side of a fresh pty; the test holds the master.
struct PtyShim {
    child: Child,
    master: File,
}

impl PtyShim {
    fn spawn(broker: &Broker, protocol: &str) -> PtyShim {
        let pty = nix::pty::openpty(None, None).unwrap();
        let slave: OwnedFd = pty.slave;
        let child = Command::new(shim_bin())
            .args([
                "--broker",
                &broker.addr(),
                "--timeout",
                "5",
                "--protocol",
                protocol,
            ])
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Bytes written before the shim switches the terminal to raw mode would meet the
        // default line discipline: wait until it has (our copy of the slave shows the change).
        wait_until(Duration::from_secs(10), "raw mode on the pty", || {
            tcgetattr(slave.as_fd()).is_ok_and(|t| !t.local_flags.contains(LocalFlags::ICANON))
        });
        PtyShim {
            child,
            master: File::from(pty.master),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).unwrap();
    }

    fn read(&mut self, n: usize) -> Vec<u8> {
        let mut got = vec![0u8; n];
        self.master.read_exact(&mut got).unwrap();
        got
    }
}

impl Drop for PtyShim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every byte a line can carry (all but `\n`), then every UTF-8 lead and continuation byte
/// (U+0080..U+00FF, and 3- and 4-byte sequences up to U+10FFFF): a token a provider could issue.
fn every_byte_token(line: bool) -> String {
    let mut t: String = (0u8..=0x7f)
        .filter(|b| !line || *b != b'\n')
        .map(char::from)
        .collect();
    t.extend((0x80u32..=0xff).filter_map(char::from_u32));
    t.extend(['\u{800}', '\u{ffff}', '\u{10000}', '\u{10ffff}']);
    // A trailing `\r` is the line end's (Prosody strips `\r?\n`): keep one inside only.
    t.push('z');
    t
}

fn world() -> (Provider, Broker) {
    let provider = Provider::start();
    let broker = Broker::start(&BrokerSpec::new(&provider));
    (provider, broker)
}

#[test]
fn the_generic_protocol_answers_each_line_with_one_line() {
    let (provider, broker) = world();
    let alice = token("alice");
    let colons = format!("{}:with:colons", token("colons"));
    provider.insert(&alice, json!({"username": "alice"}));
    provider.insert(&colons, json!({"username": "alice"}));
    let mut child = Command::new(shim_bin())
        .args([
            "--broker",
            &broker.addr(),
            "--timeout",
            "5",
            "--protocol",
            "generic",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = format!(
        "auth:alice:example.com:{alice}\nauth:bob:example.com:{alice}\r\nauth:alice:example.com:{colons}\n\
         isuser:alice:example.com\nsetpass:alice:example.com:x\nnonsense\n\nauth:alice:example.com\n\
         auth:alice:example.com:{alice}"
    );
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    drop(child.stdin.take());
    let mut out = String::new();
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(
        out, "1\n0\n1\n1\n0\n0\n0\n0\n1\n",
        "one line per request; a last line without a newline is answered too"
    );
    assert!(child.wait().unwrap().success(), "end of input: exit 0");
}

#[test]
fn under_a_pty_every_byte_of_a_password_arrives_in_both_protocols() {
    let (provider, broker) = world();
    let in_line = every_byte_token(true);
    provider.insert(&in_line, json!({"username": "alice"}));
    let mut generic = PtyShim::spawn(&broker, "generic");
    generic.send(format!("auth:alice:example.com:{in_line}\n").as_bytes());
    assert_eq!(
        generic.read(2),
        b"1\n",
        "no byte eaten, changed or signalled"
    );
    generic.send(b"auth:alice:example.com:\xff\xfe\x03\x04\n");
    assert_eq!(generic.read(2), b"0\n", "not UTF-8: refused");
    generic.send(format!("auth:bob:example.com:{in_line}\r\n").as_bytes());
    assert_eq!(
        generic.read(2),
        b"0\n",
        "another user, the stream still in step"
    );

    // ejabberd's frames: the token carries every byte, and the frames' lengths carry the
    // bytes a cooked terminal acts on (^C ^D \n \r ^Q ^S ^Z ^\ DEL).
    let mut framed = PtyShim::spawn(&broker, "ejabberd");
    let full = every_byte_token(false);
    provider.insert(&full, json!({"username": "alice"}));
    let mut request = format!("auth:alice:example.com:{full}").into_bytes();
    framed.send(&frame(&request));
    assert_eq!(framed.read(4), [0, 2, 0, 1]);
    for length in [0x0304usize, 0x0a0d, 0x1113, 0x1a1c, 0x1c7f] {
        let padded = format!(
            "{full}{}",
            "p".repeat(length - "auth:alice:example.com:".len() - full.len())
        );
        provider.insert(&padded, json!({"username": "alice"}));
        request = format!("auth:alice:example.com:{padded}").into_bytes();
        assert_eq!(request.len(), length);
        framed.send(&frame(&request));
        assert_eq!(
            framed.read(4),
            [0, 2, 0, 1],
            "a frame of {length:#06x} bytes"
        );
    }
}

/// Reads the child's stderr and exit status, within `limit`.
fn finish(mut child: Child, limit: Duration) -> (String, std::process::ExitStatus) {
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < limit,
            "the shim hangs on the other protocol"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    child
        .stderr
        .as_mut()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (err, status)
}

#[test]
fn the_other_protocol_on_stdin_is_refused_with_a_clear_line() {
    let (_provider, broker) = world();
    for (protocol, input, advice) in [
        (
            "ejabberd",
            b"auth:alice:example.com:tok\n".to_vec(),
            "--protocol generic",
        ),
        (
            "generic",
            frame(b"auth:alice:example.com:tok"),
            "without --protocol generic",
        ),
    ] {
        let mut child = Command::new(shim_bin())
            .args(["--broker", &broker.addr(), "--protocol", protocol])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.as_mut().unwrap().write_all(&input).unwrap();
        let mut out = child.stdout.take().unwrap();
        let (err, status) = finish(child, Duration::from_secs(5));
        let mut written = Vec::new();
        out.read_to_end(&mut written).unwrap();
        assert_eq!(status.code(), Some(2), "{protocol}: {err}");
        assert!(err.contains(advice), "{protocol}: {err}");
        assert!(
            written.is_empty(),
            "{protocol}: nothing on stdout: {written:?}"
        );
    }
}
