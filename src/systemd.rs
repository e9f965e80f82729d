//! systemd integration: socket activation (sd_listen_fds(3)) and service notifications
//! (sd_notify(3): READY, STATUS, RELOADING, STOPPING, WATCHDOG).
//!
//! Under socket activation systemd owns the listening sockets: it keeps accepting (queueing)
//! connections while the broker restarts, so a restart refuses no shim. The broker therefore never
//! unlinks an inherited socket's path.

use std::os::fd::{FromRawFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{getsockname, AddressFamily, SockaddrLike, SockaddrStorage};
use sd_notify::NotifyState;
use tracing::{debug, warn};

/// What an inherited socket is for, from its `FileDescriptorName=` in the `.socket` unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Shim connections (the name `shim`, or an unnamed socket).
    Shim,
    /// `/metrics`, `/healthz`, `/readyz`.
    Metrics,
    /// `POST /revoke`.
    Admin,
}

/// A listening socket passed by systemd.
#[derive(Debug)]
pub enum Inherited {
    /// A Unix stream socket.
    Unix(std::os::unix::net::UnixListener),
    /// A TCP socket.
    Tcp(std::net::TcpListener),
}

/// Why the sockets systemd passed cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    /// `LISTEN_PID`, `LISTEN_FDS` or `LISTEN_FDNAMES` is malformed.
    #[error(transparent)]
    Environment(#[from] std::io::Error),
    /// A socket's `FileDescriptorName=` is not one the broker knows.
    #[error("socket name {name:?} (FileDescriptorName=) is not one of shim, metrics, admin")]
    UnknownName {
        /// The name given in the `.socket` unit.
        name: String,
    },
    /// The address of an inherited fd could not be read (getsockname(2)).
    #[error(transparent)]
    Socket(#[from] nix::Error),
    /// An inherited fd is neither a Unix nor a TCP socket.
    #[error("inherited fd {fd} is a {family:?} socket, not Unix or TCP")]
    Family {
        /// The file descriptor.
        fd: RawFd,
        /// Its address family, when it has one.
        family: Option<AddressFamily>,
    },
}

/// Takes the sockets systemd passed (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`) and clears
/// those variables, so children do not inherit them.
///
/// # Safety
/// Changes the environment: call it before any other thread exists (before the tokio runtime).
///
/// # Errors
/// Malformed variables, an unknown socket name, or a socket that is neither Unix nor TCP.
pub unsafe fn take_listeners() -> Result<Vec<(Role, Inherited)>, SystemdError> {
    let fds: Vec<(RawFd, String)> =
        unsafe { sd_notify::listen_fds_with_names_and_unset_env()? }.collect();
    fds.into_iter()
        .map(|(fd, name)| Ok((role(&name)?, unsafe { inherit(fd) }?)))
        .collect()
}

fn role(name: &str) -> Result<Role, SystemdError> {
    match name {
        "shim" | "unknown" | "" => Ok(Role::Shim),
        "metrics" => Ok(Role::Metrics),
        "admin" => Ok(Role::Admin),
        other => Err(SystemdError::UnknownName {
            name: other.to_owned(),
        }),
    }
}

/// Wraps an inherited listening fd, by its address family.
///
/// # Safety
/// `fd` must be an open listening socket this process owns and uses nowhere else.
unsafe fn inherit(fd: RawFd) -> Result<Inherited, SystemdError> {
    let family = getsockname::<SockaddrStorage>(fd)?.family();
    let inherited = match family {
        Some(AddressFamily::Unix) => {
            Inherited::Unix(unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) })
        }
        Some(AddressFamily::Inet | AddressFamily::Inet6) => {
            Inherited::Tcp(unsafe { std::net::TcpListener::from_raw_fd(fd) })
        }
        family => return Err(SystemdError::Family { fd, family }),
    };
    debug!(fd, ?family, "inherited a listening socket from systemd");
    Ok(inherited)
}

/// Sends notifications to systemd when `NOTIFY_SOCKET` is set (a no-op otherwise). Failures are
/// logged, never fatal: the broker works without systemd.
pub(crate) fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!("sd_notify failed: {e}");
    }
}

/// How often to send WATCHDOG=1: half the configured `WatchdogSec=`, if any.
pub(crate) fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_roles() {
        assert_eq!(role("shim").unwrap(), Role::Shim);
        assert_eq!(role("unknown").unwrap(), Role::Shim);
        assert_eq!(role("metrics").unwrap(), Role::Metrics);
        assert_eq!(role("admin").unwrap(), Role::Admin);
        assert!(role("http").is_err());
    }
}
