//! Starting a session's processes: inside the session's cgroup from before any
//! user code runs, with a private `/tmp`, `/var/tmp` and `/dev/shm` (directories
//! on the session's own disk, bound over the shared ones in a mount namespace),
//! as the session user, in the user's home, with a clean environment, a new
//! session id, `no_new_privs` and umask 077.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;

use std::path::Path;

use tokio::process::Command;

use super::Sandbox;
use super::cgroup::join_in_child;

/// What a channel asked to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Program {
    /// An interactive login shell.
    Shell,
    /// `$SHELL -c <command>`.
    Exec(String),
    /// The OpenSSH `sftp-server` at the given path.
    Sftp,
}

/// Environment variables a client may set (OpenSSH's usual `SendEnv LANG LC_*`, and TERM).
pub fn env_allowed(name: &str) -> bool {
    name == "LANG" || name == "TERM" || name.starts_with("LC_")
}

/// Builds the command for `program`; `with_tty` makes the child take its stdin as
/// controlling terminal.
pub fn command(
    sandbox: &Sandbox,
    program: &Program,
    env: &[(String, String)],
    with_tty: bool,
    sftp_server: &Path,
) -> Command {
    let user = &sandbox.user;
    let mut cmd = match program {
        Program::Shell => {
            let mut c = Command::new(&user.shell);
            let base = user
                .shell
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "sh".to_owned());
            c.arg0(format!("-{base}"));
            c
        }
        Program::Exec(line) => {
            let mut c = Command::new(&user.shell);
            c.arg("-c").arg(line);
            c
        }
        Program::Sftp => Command::new(sftp_server),
    };
    cmd.env_clear()
        .env("HOME", &user.home)
        .env("USER", &user.name)
        .env("LOGNAME", &user.name)
        .env("SHELL", &user.shell)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .current_dir(&user.home);
    for (k, v) in env.iter().filter(|(k, _)| env_allowed(k)) {
        cmd.env(k, v);
    }
    let join = sandbox
        .cgroup
        .as_ref()
        .map(|cg| cg.join_fds())
        .unwrap_or_default();
    // The node's own user in development mode: no namespace, no uid change.
    let private = (!user.shared_dev_user).then(|| Private {
        binds: PRIVATE_DIRS
            .iter()
            // Binding over a directory that holds the home would hide the home
            // (a node whose data directory is under /tmp, as in tests).
            .filter(|(_, target)| !user.home.starts_with(target))
            .filter_map(|(dir, target)| {
                let source = CString::new(user.home.join(dir).as_os_str().as_bytes()).ok()?;
                Some((source, CString::new(*target).ok()?))
            })
            .collect(),
        uid: user.uid,
        gid: user.gid,
    });
    // SAFETY: only async-signal-safe calls between fork and exec; every path was
    // made before the fork. The cgroup descriptors stay open while the sandbox
    // lives, which outlasts this spawn.
    unsafe {
        cmd.pre_exec(move || {
            // First, so that everything the process does is limited and metered.
            join_in_child(&join)?;
            if let Some(p) = &private {
                p.enter()?;
            }
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if with_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::umask(0o077);
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// A session's private directories (in its home) and what they replace.
pub const PRIVATE_DIRS: [(&str, &str); 3] =
    [(".tmp", "/tmp"), (".tmp", "/var/tmp"), (".shm", "/dev/shm")];

/// What a session process does as root before it becomes the session user.
struct Private {
    binds: Vec<(CString, CString)>,
    uid: u32,
    gid: u32,
}

impl Private {
    /// Runs in the forked child: own mount namespace with the private
    /// directories bound in, then the session user's ids and no other groups.
    fn enter(&self) -> io::Result<()> {
        let check = |rc: libc::c_int| {
            if rc < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: raw syscalls with NUL-terminated strings made before the fork.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Slave: the node's unmounts (teardown) still reach this namespace,
            // but these binds never reach the node's.
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ))?;
            for (source, target) in &self.binds {
                let rc = libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                );
                // A machine without /dev/shm or /var/tmp simply has none to hide.
                if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT) {
                    return Err(io::Error::last_os_error());
                }
            }
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setgid(self.gid))?;
            check(libc::setuid(self.uid))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_locale_and_term_pass() {
        assert!(env_allowed("LANG"));
        assert!(env_allowed("LC_ALL"));
        assert!(env_allowed("TERM"));
        assert!(!env_allowed("LD_PRELOAD"));
        assert!(!env_allowed("PATH"));
    }
}
