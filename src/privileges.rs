//! Dropping root privileges after binding: `--user` and `--group` (names or numbers).
//!
//! Order matters (setgroups(2), setgid(2), setuid(2)): supplementary groups and the group first,
//! while still root, then the user; afterwards the process cannot regain root.

use std::path::{Path, PathBuf};

use nix::unistd::{chown, setgid, setgroups, setuid, Gid, Group, Uid, User};
use tracing::{info, warn};

/// Why the broker could not become `--user`/`--group`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PrivilegeError {
    /// No user has this name or number.
    #[error("--user {name}: no such user")]
    NoSuchUser {
        /// The name or number given.
        name: String,
    },
    /// No group has this name or number.
    #[error("--group {name}: no such group")]
    NoSuchGroup {
        /// The name or number given.
        name: String,
    },
    /// Looking a user or group up failed (getpwnam(3), getgrnam(3), ...).
    #[error(transparent)]
    Lookup(#[from] nix::Error),
    /// A bound Unix socket could not be given to the user and group.
    #[error("chown {}", path.display())]
    Chown {
        /// The socket's path.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: nix::Error,
    },
    /// A system call changing the process's credentials failed.
    #[error("{call}")]
    Credentials {
        /// `setgroups`, `setgid` or `setuid`.
        call: &'static str,
        /// What the system said.
        #[source]
        source: nix::Error,
    },
    /// After setuid(2) the process could still become root again.
    #[error("still able to regain root after dropping privileges")]
    RootRegainable,
}

/// Becomes `user` (and `group`, default: the user's primary group) when running as root, after
/// giving the Unix sockets this process bound to that user and group, so clients in the group
/// can connect (mode `--socket-mode`). Not root: logs that the flags are ignored.
///
/// # Errors
/// An unknown user or group, or a failing system call.
pub(crate) fn drop_to(
    user: &str,
    group: Option<&str>,
    sockets: &[&Path],
) -> Result<(), PrivilegeError> {
    if !Uid::effective().is_root() {
        warn!(user, "--user/--group ignored: not running as root");
        return Ok(());
    }
    let account = lookup_user(user)?;
    let gid = match group {
        Some(g) => lookup_group(g)?,
        None => account.gid,
    };
    for path in sockets {
        chown(*path, Some(account.uid), Some(gid)).map_err(|source| PrivilegeError::Chown {
            path: path.to_path_buf(),
            source,
        })?;
    }
    let failed = |call| move |source| PrivilegeError::Credentials { call, source };
    setgroups(&[gid]).map_err(failed("setgroups"))?;
    setgid(gid).map_err(failed("setgid"))?;
    setuid(account.uid).map_err(failed("setuid"))?;
    if setuid(Uid::from_raw(0)).is_ok() {
        return Err(PrivilegeError::RootRegainable);
    }
    info!(
        user,
        uid = account.uid.as_raw(),
        gid = gid.as_raw(),
        "dropped root privileges"
    );
    Ok(())
}

fn lookup_user(name: &str) -> Result<User, PrivilegeError> {
    let found = match name.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid))?,
        Err(_) => User::from_name(name)?,
    };
    found.ok_or_else(|| PrivilegeError::NoSuchUser {
        name: name.to_owned(),
    })
}

fn lookup_group(name: &str) -> Result<Gid, PrivilegeError> {
    let found = match name.parse::<u32>() {
        Ok(gid) => Group::from_gid(Gid::from_raw(gid))?,
        Err(_) => Group::from_name(name)?,
    };
    found
        .map(|g| g.gid)
        .ok_or_else(|| PrivilegeError::NoSuchGroup {
            name: name.to_owned(),
        })
}
