//! Listening sockets and who may come in: Unix sockets with a peer-credential check
//! (SO_PEERCRED, unix(7)), TCP in plaintext only on loopback, TLS (rustls) with optional client
//! certificates elsewhere.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::unistd::{Gid, Group, Uid, User};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::admission::{Origin, WARNING_WINDOW};
use crate::config::{ListenAddr, PeerPolicy, TcpSecurity};
use crate::metrics::{self, HandshakeFailure};
use crate::systemd::Inherited;
use crate::throttle::Throttle;

/// Refused peers and failed TLS handshakes come as fast as a hostile peer can connect: the first
/// of each kind in a window is a warning, the rest debug lines (all are counted).
static PEER_WARNING: Throttle = Throttle::new(WARNING_WINDOW);
static TLS_WARNING: Throttle = Throttle::new(WARNING_WINDOW);

/// Why a listening socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ListenError {
    /// bind(2) failed.
    #[error("binding {address}")]
    Bind {
        /// `tcp:HOST:PORT` or `unix:/path`.
        address: String,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The mode of a new Unix socket could not be set.
    #[error("setting mode {mode:o} on {}", path.display())]
    Mode {
        /// The mode (`--socket-mode`).
        mode: u32,
        /// The socket's path.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// A process answers on the Unix socket's path.
    #[error("{} is in use by a running process (another broker?)", path.display())]
    InUse {
        /// The socket's path.
        path: PathBuf,
    },
    /// A stale socket left at the path could not be removed.
    #[error("removing stale socket {}", path.display())]
    RemoveStale {
        /// The socket's path.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// Plain TCP on an address that is not loopback, without `--insecure-tcp`.
    #[error(
        "tcp:{local} is not a loopback address: tokens would cross the network in clear. Give \
         --tls-cert and --tls-key (shims then use tls:HOST:PORT), or --insecure-tcp"
    )]
    NotLoopback {
        /// The listening address.
        local: SocketAddr,
    },
    /// A socket could not be read or registered with the runtime.
    #[error(transparent)]
    Socket(#[from] io::Error),
}

/// The two halves of an accepted, checked stream.
pub(crate) type Halves = (
    Box<dyn AsyncRead + Send + Unpin>,
    Box<dyn AsyncWrite + Send + Unpin>,
);

/// A listening socket.
pub(crate) enum Listener {
    /// A Unix stream socket; `bound` is its path when this process created it (removed on
    /// shutdown; a socket inherited from systemd is left alone).
    Unix {
        /// The socket.
        listener: UnixListener,
        /// Its path, when it has one.
        path: Option<Arc<Path>>,
        /// True when this process bound it (and so removes it on shutdown).
        bound: bool,
    },
    /// A TCP socket, with TLS when configured.
    Tcp {
        /// The socket.
        listener: TcpListener,
        /// TLS settings, when configured.
        tls: Option<TlsAcceptor>,
    },
}

/// An accepted connection, not yet checked.
pub(crate) enum Incoming {
    /// A Unix peer; `path` locates the socket whose group the default policy uses.
    Unix {
        /// The connection.
        stream: UnixStream,
        /// The listening socket's path, for its group.
        path: Option<Arc<Path>>,
    },
    /// A TCP peer (loopback, or allowed by `--insecure-tcp`).
    Tcp(TcpStream),
    /// A TCP peer that must complete a TLS handshake first.
    Tls(TcpStream, TlsAcceptor),
}

impl Listener {
    /// Binds `addr`. A Unix socket path left over by a previous run is replaced, but only if no
    /// process answers on it; the socket gets `mode`. A TCP address that is not loopback needs
    /// TLS or `--insecure-tcp`.
    ///
    /// # Errors
    /// Bind failures, a live socket already at the path, an unprotected non-loopback address.
    pub(crate) async fn bind(
        addr: &ListenAddr,
        mode: u32,
        security: &TcpSecurity,
    ) -> Result<Listener, ListenError> {
        match addr {
            ListenAddr::Tcp(hostport) => {
                let listener =
                    TcpListener::bind(hostport)
                        .await
                        .map_err(|source| ListenError::Bind {
                            address: format!("tcp:{hostport}"),
                            source,
                        })?;
                Listener::tcp(listener, security)
            }
            ListenAddr::Unix(path) => {
                remove_stale_socket(path).await?;
                let listener = UnixListener::bind(path).map_err(|source| ListenError::Bind {
                    address: format!("unix:{}", path.display()),
                    source,
                })?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(
                    |source| ListenError::Mode {
                        mode,
                        path: path.clone(),
                        source,
                    },
                )?;
                Ok(Listener::Unix {
                    listener,
                    path: Some(Arc::from(path.as_path())),
                    bound: true,
                })
            }
        }
    }

    /// Wraps a socket passed by systemd (socket activation), under the same TCP rules.
    ///
    /// # Errors
    /// A socket that cannot be registered with the runtime, or an unprotected non-loopback one.
    pub(crate) fn inherited(
        socket: Inherited,
        security: &TcpSecurity,
    ) -> Result<Listener, ListenError> {
        match socket {
            Inherited::Unix(l) => {
                l.set_nonblocking(true)?;
                let path = l
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(Arc::from));
                Ok(Listener::Unix {
                    listener: UnixListener::from_std(l)?,
                    path,
                    bound: false,
                })
            }
            Inherited::Tcp(l) => {
                l.set_nonblocking(true)?;
                Listener::tcp(TcpListener::from_std(l)?, security)
            }
        }
    }

    fn tcp(listener: TcpListener, security: &TcpSecurity) -> Result<Listener, ListenError> {
        let local: SocketAddr = listener.local_addr()?;
        if security.tls.is_none() && !security.insecure && !local.ip().is_loopback() {
            return Err(ListenError::NotLoopback { local });
        }
        Ok(Listener::Tcp {
            listener,
            tls: security.tls.clone().map(TlsAcceptor::from),
        })
    }

    /// The path of a Unix socket this process bound, if it is one.
    pub(crate) fn bound_path(&self) -> Option<&Path> {
        match self {
            Listener::Unix {
                path, bound: true, ..
            } => path.as_deref(),
            _ => None,
        }
    }

    /// The address for logs (`unix:/path`, `tcp:127.0.0.1:7000`, `tls:...`).
    pub(crate) fn describe(&self) -> String {
        match self {
            Listener::Unix { path, .. } => path
                .as_ref()
                .map_or_else(|| "unix:?".into(), |p| format!("unix:{}", p.display())),
            Listener::Tcp { listener, tls } => {
                let scheme = if tls.is_some() { "tls" } else { "tcp" };
                listener
                    .local_addr()
                    .map_or_else(|_| format!("{scheme}:?"), |a| format!("{scheme}:{a}"))
            }
        }
    }

    /// Waits for the next connection.
    ///
    /// # Errors
    /// accept(2) errors (EMFILE, ...).
    pub(crate) async fn accept(&self) -> io::Result<Incoming> {
        match self {
            Listener::Unix { listener, path, .. } => Ok(Incoming::Unix {
                stream: listener.accept().await?.0,
                path: path.clone(),
            }),
            Listener::Tcp { listener, tls } => {
                let (stream, _) = listener.accept().await?;
                stream.set_nodelay(true)?;
                Ok(match tls {
                    Some(acceptor) => Incoming::Tls(stream, acceptor.clone()),
                    None => Incoming::Tcp(stream),
                })
            }
        }
    }
}

async fn remove_stale_socket(path: &Path) -> Result<(), ListenError> {
    if !path.exists() {
        return Ok(());
    }
    if UnixStream::connect(path).await.is_ok() {
        return Err(ListenError::InUse {
            path: path.to_owned(),
        });
    }
    std::fs::remove_file(path).map_err(|source| ListenError::RemoveStale {
        path: path.to_owned(),
        source,
    })
}

impl Incoming {
    /// Where the connection comes from, for the handshake budget.
    pub(crate) fn origin(&self) -> Origin {
        let stream = match self {
            // A peer whose credentials cannot be read is refused by the peer check at once.
            Incoming::Unix { stream, .. } => {
                return Origin::Unix(stream.peer_cred().map_or(u32::MAX, |c| c.uid()))
            }
            Incoming::Tcp(stream) | Incoming::Tls(stream, _) => stream,
        };
        // A peer already gone has no address; it counts with the unspecified one and its
        // handshake fails at once anyway.
        Origin::tcp(
            stream
                .peer_addr()
                .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |a| a.ip()),
        )
    }

    /// Checks a Unix peer against `peers` and completes a TLS handshake; the halves to serve,
    /// or `None` when the peer is refused (logged and counted) or the handshake fails.
    pub(crate) async fn open(self, peers: &PeerPolicy) -> Option<Halves> {
        match self {
            Incoming::Unix { stream, path } => {
                let cred = stream.peer_cred().ok()?;
                let socket_gid = path
                    .and_then(|p| std::fs::metadata(&*p).ok())
                    .map(|m| m.gid());
                if !allowed(peers, cred.uid(), cred.gid(), socket_gid) {
                    let (uid, gid, pid) = (cred.uid(), cred.gid(), cred.pid());
                    match PEER_WARNING.ready() {
                        Some(suppressed) => warn!(
                            uid,
                            gid,
                            pid,
                            suppressed,
                            "refused a Unix socket peer (see --allow-uid, --allow-gid)"
                        ),
                        None => debug!(uid, gid, pid, "refused a Unix socket peer"),
                    }
                    metrics::peer_refused();
                    metrics::handshake_failed(HandshakeFailure::Peer);
                    return None;
                }
                let (r, w) = stream.into_split();
                Some((Box::new(r), Box::new(w)))
            }
            Incoming::Tcp(stream) => {
                let (r, w) = stream.into_split();
                Some((Box::new(r), Box::new(w)))
            }
            Incoming::Tls(stream, acceptor) => match acceptor.accept(stream).await {
                Ok(tls) => {
                    let (r, w) = tokio::io::split(tls);
                    Some((Box::new(r), Box::new(w)))
                }
                Err(e) => {
                    match TLS_WARNING.ready() {
                        Some(suppressed) => warn!(suppressed, "TLS handshake failed: {e}"),
                        None => debug!("TLS handshake failed: {e}"),
                    }
                    metrics::peer_refused();
                    metrics::handshake_failed(HandshakeFailure::Tls);
                    None
                }
            },
        }
    }
}

/// May this peer talk to the broker? With an explicit policy: its uid is listed, or its primary
/// group or a group it belongs to is. Without one: root, the broker's own user, and members of
/// the socket's group (the people the socket's mode already lets in).
fn allowed(peers: &PeerPolicy, uid: u32, gid: u32, socket_gid: Option<u32>) -> bool {
    if peers.uids.is_empty() && peers.gids.is_empty() {
        return uid == 0
            || uid == Uid::effective().as_raw()
            || socket_gid.is_some_and(|g| g == gid || member(uid, g));
    }
    peers.uids.contains(&uid) || peers.gids.iter().any(|g| *g == gid || member(uid, *g))
}

/// Is user `uid` a listed member of group `gid` (getgrgid(3))?
fn member(uid: u32, gid: u32) -> bool {
    let name = User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name);
    let group = Group::from_gid(Gid::from_raw(gid)).ok().flatten();
    matches!((name, group), (Some(n), Some(g)) if g.mem.contains(&n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_policies_list_users_and_groups() {
        let policy = PeerPolicy {
            uids: vec![1000],
            gids: vec![2000],
        };
        assert!(allowed(&policy, 1000, 5, None));
        assert!(allowed(&policy, 7, 2000, None));
        assert!(
            !allowed(&policy, 7, 8, Some(8)),
            "the socket's group no longer counts"
        );
        assert!(!allowed(&policy, 0, 0, None), "not even root");
    }

    #[test]
    fn the_default_policy_follows_the_socket_group() {
        let default = PeerPolicy::default();
        assert!(allowed(&default, 0, 0, None));
        assert!(allowed(&default, Uid::effective().as_raw(), 12345, None));
        assert!(allowed(&default, 4242, 777, Some(777)));
        assert!(!allowed(&default, 4242, 778, Some(777)));
        assert!(!allowed(&default, 4242, 777, None));
    }
}
