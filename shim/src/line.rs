//! Prosody's generic line protocol (`mod_auth_external`, `external_auth_protocol = "generic"`):
//! one request per line, `auth:USER:HOST:PASSWORD`, `isuser:USER:HOST`; each answered `1\n` or
//! `0\n` in one write. The fields are those of ejabberd's protocol (`extauth::parse`): the
//! password is the rest of the line, `:` included; it cannot hold a newline (the line's end),
//! and one `\r` before the newline is dropped (Prosody strips `\r?\n`). Unknown commands get 0.

use std::io::{self, BufRead};

use extauth_protocol::extauth::MAX_REQUEST_LEN;
use zeroize::Zeroize;

/// The answers, as Prosody reads them.
pub(crate) fn reply(ok: bool) -> &'static [u8] {
    if ok {
        b"1\n"
    } else {
        b"0\n"
    }
}

/// What [`read_line`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Line {
    /// A request, in the buffer.
    Request,
    /// A line over [`MAX_REQUEST_LEN`] bytes, read to its end: refused, the stream in step.
    TooLong,
    /// End of input.
    End,
}

/// Reads one line into `buf` (without its `\r?\n`; the previous content, a token, is
/// zeroized). A last line without a newline is still a request.
///
/// # Errors
/// I/O errors other than end of input.
pub(crate) fn read_line(input: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<Line> {
    buf.zeroize();
    buf.clear();
    let mut too_long = false;
    let line = |too_long| {
        if too_long {
            Line::TooLong
        } else {
            Line::Request
        }
    };
    loop {
        let available = input.fill_buf()?;
        if available.is_empty() {
            return Ok(if buf.is_empty() && !too_long {
                Line::End
            } else {
                line(too_long)
            });
        }
        let (chunk, found) = match available.iter().position(|b| *b == b'\n') {
            Some(i) => (&available[..i], Some(i + 1)),
            None => (available, None),
        };
        if buf.len() + chunk.len() > MAX_REQUEST_LEN {
            too_long = true;
            buf.zeroize();
            buf.clear();
        } else if !too_long {
            buf.extend_from_slice(chunk);
        }
        let used = found.unwrap_or(available.len());
        input.consume(used);
        if found.is_some() {
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(line(too_long));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8]) -> Vec<Option<Vec<u8>>> {
        let mut reader = io::BufReader::with_capacity(7, input);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        loop {
            match read_line(&mut reader, &mut buf).unwrap() {
                Line::Request => out.push(Some(buf.clone())),
                Line::TooLong => out.push(None),
                Line::End => return out,
            }
        }
    }

    #[test]
    fn lines_keep_every_byte_but_their_end() {
        let got = lines(b"auth:a:b:p:w:d\nisuser:a:b\r\n\x01\x03\x04\x7f\xc3\xa9\rx\nlast");
        assert_eq!(
            got,
            vec![
                Some(b"auth:a:b:p:w:d".to_vec()),
                Some(b"isuser:a:b".to_vec()),
                Some(b"\x01\x03\x04\x7f\xc3\xa9\rx".to_vec()),
                Some(b"last".to_vec()),
            ]
        );
    }

    #[test]
    fn an_overlong_line_is_refused_without_losing_the_next() {
        let mut input = vec![b'x'; MAX_REQUEST_LEN + 10];
        input.extend_from_slice(b"\nisuser:a:b\n");
        assert_eq!(lines(&input), vec![None, Some(b"isuser:a:b".to_vec())]);
    }
}
