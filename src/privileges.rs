//! Dropping root privileges after binding: `--user` and `--group` (names or numbers).
//!
//! Order matters (setgroups(2), setgid(2), setuid(2)): supplementary groups and the group first,
//! while still root, then the user; afterwards the process cannot regain root.

use std::path::Path;

use anyhow::{bail, Context, Result};
use nix::unistd::{chown, setgid, setgroups, setuid, Gid, Group, Uid, User};
use tracing::{info, warn};

/// Becomes `user` (and `group`, default: the user's primary group) when running as root, after
/// giving the Unix sockets this process bound to that user and group, so clients in the group
/// can connect (mode `--socket-mode`). Not root: logs that the flags are ignored.
///
/// # Errors
/// An unknown user or group, or a failing system call.
pub fn drop_to(user: &str, group: Option<&str>, sockets: &[&Path]) -> Result<()> {
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
        chown(*path, Some(account.uid), Some(gid))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    setgroups(&[gid]).context("setgroups")?;
    setgid(gid).context("setgid")?;
    setuid(account.uid).context("setuid")?;
    if setuid(Uid::from_raw(0)).is_ok() {
        bail!("still able to regain root after dropping privileges");
    }
    info!(
        user,
        uid = account.uid.as_raw(),
        gid = gid.as_raw(),
        "dropped root privileges"
    );
    Ok(())
}

fn lookup_user(name: &str) -> Result<User> {
    let found = match name.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid))?,
        Err(_) => User::from_name(name)?,
    };
    found.with_context(|| format!("--user {name}: no such user"))
}

fn lookup_group(name: &str) -> Result<Gid> {
    let found = match name.parse::<u32>() {
        Ok(gid) => Group::from_gid(Gid::from_raw(gid))?,
        Err(_) => Group::from_name(name)?,
    };
    Ok(found
        .with_context(|| format!("--group {name}: no such group"))?
        .gid)
}
