//! extauth-shim: the program ejabberd starts as `extauth_program`, one per pool slot.
//!
//! Reads extauth requests on stdin (ejabberd `src/extauth.erl`, `{packet, 2}` framing), relays
//! each to extauth-broker over one persistent connection, and writes exactly one 4-byte reply per
//! request to stdout. Fails closed: a malformed request, an unreachable broker or a missed
//! deadline gets `00 02 00 00`. Exits 0 on end of input. Logs go to stderr only.

mod options;
mod relay;
mod stream;

use std::io::{self, Read, Write};
use std::process::ExitCode;
use std::time::Instant;

use extauth_broker::extauth::{self, reply};

use crate::options::Options;
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
    match serve(&options, io::stdin().lock(), io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        // ejabberd closed our stdout: it is gone, and so are we.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("extauth-shim: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Answers requests until end of input. Every request gets exactly one reply, in one write.
fn serve(options: &Options, mut input: impl Read, mut output: impl Write) -> io::Result<()> {
    let mut relay = Relay::new(options);
    let mut request = Vec::new();
    while extauth::read_request(&mut input, &mut request)? {
        let deadline = Instant::now() + options.timeout;
        let ok = match extauth::parse(&request) {
            Ok(command) => relay.call(command, deadline),
            Err(e) => {
                eprintln!(
                    "extauth-shim: refusing request of {} bytes: {e}",
                    request.len()
                );
                false
            }
        };
        output.write_all(&reply(ok))?;
        output.flush()?;
    }
    Ok(())
}
