//! A blocking connection to a broker: Unix socket, TCP, or TCP with TLS (rustls), each with
//! read and write timeouts that end at the request's deadline.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use crate::options::Addr;

/// A connected stream.
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Stream {
    /// Connects to `addr` before `deadline`; `tls` is required for `tls:` addresses. The TLS
    /// handshake happens with the first write.
    pub(crate) fn open(
        addr: &Addr,
        deadline: Instant,
        tls: Option<&Arc<ClientConfig>>,
    ) -> io::Result<Stream> {
        match addr {
            Addr::Unix(path) => UnixStream::connect(path).map(Stream::Unix),
            Addr::Tcp(hostport) => tcp(hostport, deadline).map(Stream::Tcp),
            Addr::Tls(hostport) => {
                let config = tls.ok_or_else(|| io::Error::other("tls: broker without --ca"))?;
                let host = hostport
                    .rsplit_once(':')
                    .map_or(hostport.as_str(), |(h, _)| h);
                let name = ServerName::try_from(
                    host.trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned(),
                )
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let session =
                    ClientConnection::new(config.clone(), name).map_err(io::Error::other)?;
                Ok(Stream::Tls(Box::new(StreamOwned::new(
                    session,
                    tcp(hostport, deadline)?,
                ))))
            }
        }
    }

    /// Makes every blocking read and write fail once `deadline` has passed.
    pub(crate) fn set_deadline(&self, deadline: Instant) -> io::Result<()> {
        let left = Some(time_left(deadline)?);
        let tcp = match self {
            Stream::Unix(s) => {
                return s
                    .set_read_timeout(left)
                    .and_then(|()| s.set_write_timeout(left))
            }
            Stream::Tcp(s) => s,
            Stream::Tls(s) => &s.sock,
        };
        tcp.set_read_timeout(left)
            .and_then(|()| tcp.set_write_timeout(left))
    }
}

fn tcp(hostport: &str, deadline: Instant) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for sa in hostport.to_socket_addrs()? {
        match TcpStream::connect_timeout(&sa, time_left(deadline)?) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn time_left(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
    }
    Ok(left)
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}
