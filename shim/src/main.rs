//! extauth-shim: the program ejabberd starts as `extauth_program`, one per pool slot.
//!
//! Reads extauth requests on stdin (ejabberd `src/extauth.erl`, `{packet, 2}` framing; or with
//! `--protocol generic` Prosody's line protocol), relays each to extauth-broker over one
//! persistent connection, and writes exactly one reply per request to stdout. Fails closed: a
//! malformed request, an unreachable broker or a missed deadline gets "no" (`00 02 00 00`, or
//! `0\n`). Exits 0 on end of input. Logs go to stderr only. A terminal on stdin/stdout (Prosody
//! runs auth programs under a pty) is switched to raw mode first.

mod line;
mod options;
mod relay;
mod sniff;
mod stream;
mod tty;

use std::io::{self, BufRead, Write};
use std::process::ExitCode;
use std::time::Instant;

use extauth_protocol::extauth::{self, reply, MAX_REQUEST_LEN};

use crate::line::Line;
use crate::options::{Options, Protocol};
use crate::relay::Relay;

fn main() -> ExitCode {
    let options = match Options::from_env_and_args() {
        Ok(Some(options)) => options,
        Ok(None) => return ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("extauth-shim: {message}\n{}", options::USAGE);
            return ExitCode::from(2);
        }
    };
    for fd in [0, 1] {
        if let Err(e) = tty::make_raw_if_terminal(fd) {
            eprintln!("extauth-shim: cannot switch the terminal on fd {fd} to raw mode: {e}");
            return ExitCode::FAILURE;
        }
    }
    match serve(&options, io::stdin().lock(), io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        // The server closed our stdout: it is gone, and so are we.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        // The other protocol on stdin: a configuration error, said once; restarting cannot help.
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            eprintln!("extauth-shim: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("extauth-shim: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Answers requests until end of input, in the configured protocol. Every request gets exactly
/// one reply, in one write.
fn serve(options: &Options, mut input: impl BufRead, mut output: impl Write) -> io::Result<()> {
    if let Some(problem) = sniff::mismatch(options.protocol, input.fill_buf()?) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, problem));
    }
    let mut relay = Relay::new(options);
    let mut ask = |request: &[u8]| -> bool {
        let deadline = Instant::now() + options.timeout;
        match extauth::parse(request) {
            Ok(command) => relay.call(command, deadline),
            Err(e) => {
                eprintln!(
                    "extauth-shim: refusing request of {} bytes: {e}",
                    request.len()
                );
                false
            }
        }
    };
    let mut request = Vec::new();
    match options.protocol {
        Protocol::Ejabberd => {
            while extauth::read_request(&mut input, &mut request)? {
                write_reply(&mut output, &reply(ask(&request)))?;
            }
        }
        Protocol::Generic => loop {
            let ok = match line::read_line(&mut input, &mut request)? {
                Line::End => break,
                Line::Request => ask(&request),
                Line::TooLong => {
                    eprintln!("extauth-shim: refusing a line over {MAX_REQUEST_LEN} bytes");
                    false
                }
            };
            write_reply(&mut output, line::reply(ok))?;
        },
    }
    Ok(())
}

/// One reply in one write, flushed at once (anything else on stdout desynchronises the reader).
fn write_reply(output: &mut impl Write, reply: &[u8]) -> io::Result<()> {
    output.write_all(reply)?;
    output.flush()
}
