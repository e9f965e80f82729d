//! Raw mode for a terminal on stdin/stdout.
//!
//! Prosody starts auth programs under a pseudo-terminal (its `mod_auth_external` uses lpty). With
//! the default termios a terminal's line discipline edits the byte stream: it waits for a newline
//! before handing input over, turns `\r` into `\n`, treats `^C`, `^Z`, `^\` as signals and `^D` as
//! end of input, echoes what it receives, and turns `\n` into `\r\n` on output. Any of that breaks
//! ejabberd's binary framing, and a password holding such a byte in the line protocol. Raw mode
//! (cfmakeraw(3)) passes every byte through untouched, in both directions.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::RawFd;

/// Switches `fd` to raw mode if it is a terminal; returns whether it was one.
///
/// # Errors
/// tcgetattr(3) or tcsetattr(3) failed on a terminal.
pub(crate) fn make_raw_if_terminal(fd: RawFd) -> io::Result<bool> {
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(fd) } != 1 {
        return Ok(false);
    }
    let mut termios = MaybeUninit::<libc::termios>::uninit();
    // SAFETY: tcgetattr fills the struct on success, which is checked before it is read.
    if unsafe { libc::tcgetattr(fd, termios.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: initialised by the successful tcgetattr above.
    let mut termios = unsafe { termios.assume_init() };
    // SAFETY: cfmakeraw only edits the struct it is given.
    unsafe { libc::cfmakeraw(&mut termios) };
    // SAFETY: a valid termios for a descriptor that is a terminal.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &termios) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}
