//! `--detach`, `--uid`, `--gid` and `--umask`, as `celery worker` and `celery beat` do them
//! (`celery/platforms.py`: `maybe_drop_privileges`, `detached`, `DaemonContext`).
//!
//! Runs first thing in `main`, while the process has no threads, because detaching forks.

use std::ffi::CString;
use std::path::Path;

use nix::unistd::{self, Gid, Group, Uid, User};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("--uid {0}: no such user")]
    NoSuchUser(String),
    #[error("--gid {0}: no such group")]
    NoSuchGroup(String),
    #[error("--umask {0:?} is not an octal mask such as 022")]
    BadUmask(String),
    #[error("cannot drop privileges: {0}")]
    Drop(nix::Error),
    #[error("dropped privileges but could still become root again: refusing to run")]
    CanRegainRoot,
    #[error("cannot open the log file {0}: {1}")]
    Logfile(String, std::io::Error),
    #[error("{0}")]
    Pidfile(#[from] super::pidfile::PidfileError),
    #[error("cannot detach: {0}")]
    Fork(nix::Error),
}

/// What the daemonization flags asked for.
pub struct DaemonOptions<'a> {
    pub detach: bool,
    pub uid: Option<&'a str>,
    pub gid: Option<&'a str>,
    pub umask: Option<&'a str>,
    pub logfile: Option<&'a Path>,
    pub pidfile: Option<&'a Path>,
}

/// Drop privileges, set the umask and detach, in stock's order. Returns in the detached
/// process (the one that goes on to run the worker); the launching process exits 0.
pub fn apply(options: &DaemonOptions<'_>) -> Result<(), DaemonError> {
    drop_privileges(options.uid, options.gid)?;
    if let Some(mask) = options.umask {
        let mask = u32::from_str_radix(mask, 8).map_err(|_| DaemonError::BadUmask(mask.to_owned()))?;
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask as libc::mode_t));
    }
    if !options.detach {
        return Ok(());
    }
    // Once stderr is /dev/null nobody would see these errors: check before detaching.
    if let Some(path) = options.logfile {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| DaemonError::Logfile(path.display().to_string(), e))?;
    }
    if let Some(path) = options.pidfile {
        super::pidfile::Pidfile::check(path)?;
    }
    detach()
}

/// `maybe_drop_privileges`: the group first (with the user's supplementary groups), then the
/// user; and make sure root cannot be regained.
fn drop_privileges(uid: Option<&str>, gid: Option<&str>) -> Result<(), DaemonError> {
    let user = uid.map(resolve_user).transpose()?;
    let group = match gid {
        Some(g) => Some(resolve_group(g)?),
        None => user.as_ref().map(|u| u.gid),
    };
    if let Some(gid) = group {
        unistd::setgid(gid).map_err(DaemonError::Drop)?;
    }
    let Some(user) = user else { return Ok(()) };
    let name = CString::new(user.name.clone()).map_err(|_| DaemonError::NoSuchUser(user.name.clone()))?;
    unistd::initgroups(&name, group.unwrap_or(user.gid)).map_err(DaemonError::Drop)?;
    unistd::setuid(user.uid).map_err(DaemonError::Drop)?;
    if !user.uid.is_root() && unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(DaemonError::CanRegainRoot);
    }
    Ok(())
}

fn resolve_user(spec: &str) -> Result<User, DaemonError> {
    let found = match spec.parse::<u32>() {
        Ok(n) => User::from_uid(Uid::from_raw(n)),
        Err(_) => User::from_name(spec),
    };
    found.ok().flatten().ok_or_else(|| DaemonError::NoSuchUser(spec.to_owned()))
}

fn resolve_group(spec: &str) -> Result<Gid, DaemonError> {
    let found = match spec.parse::<u32>() {
        Ok(n) => Group::from_gid(Gid::from_raw(n)),
        Err(_) => Group::from_name(spec),
    };
    found.ok().flatten().map(|g| g.gid).ok_or_else(|| DaemonError::NoSuchGroup(spec.to_owned()))
}

/// The classic double fork: the launching process exits 0, the grandchild leads no session
/// and has no terminal; its standard streams go to /dev/null (logs go to `--logfile`).
fn detach() -> Result<(), DaemonError> {
    // SAFETY: called from `main` before any thread exists; the parents only `_exit`.
    match unsafe { unistd::fork() }.map_err(DaemonError::Fork)? {
        unistd::ForkResult::Parent { .. } => unsafe { libc::_exit(0) },
        unistd::ForkResult::Child => {}
    }
    unistd::setsid().map_err(DaemonError::Fork)?;
    // SAFETY: as above; still single-threaded.
    match unsafe { unistd::fork() }.map_err(DaemonError::Fork)? {
        unistd::ForkResult::Parent { .. } => unsafe { libc::_exit(0) },
        unistd::ForkResult::Child => {}
    }
    if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        for fd in 0..=2 {
            // SAFETY: dup2 onto the standard descriptors, which this process owns.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
    Ok(())
}

/// The arguments to re-execute with after a SIGHUP restart: the same, less `--detach` (the
/// process is already detached, and keeps its pid across the restart, as stock's does).
pub fn restart_args(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    args.filter(|a| a != "--detach" && a != "-D").collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_drops_detach_only() {
        let args = ["-A", "core", "worker", "-D", "--detach", "-l", "info"].map(std::ffi::OsString::from);
        let out = restart_args(args.into_iter());
        assert_eq!(out, ["-A", "core", "worker", "-l", "info"].map(std::ffi::OsString::from).to_vec());
    }

    #[test]
    fn names_and_numbers_resolve() {
        assert!(resolve_user("0").is_ok_and(|u| u.uid.is_root()));
        assert!(resolve_user("root").is_ok());
        assert!(resolve_group("0").is_ok());
        assert!(matches!(resolve_user("no-such-user-here"), Err(DaemonError::NoSuchUser(_))));
    }
}
