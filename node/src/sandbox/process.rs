//! Starting a session's processes: inside the session's cgroup from before any
//! user code runs, as the session user, in the user's home, with a clean
//! environment, a new session id, `no_new_privs` and umask 077.

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
    if !user.shared_dev_user {
        cmd.uid(user.uid).gid(user.gid);
    }
    let join = sandbox
        .cgroup
        .as_ref()
        .map(|cg| cg.join_fds())
        .unwrap_or_default();
    // SAFETY: only async-signal-safe calls between fork and exec. The cgroup
    // descriptors stay open while the sandbox lives, which outlasts this spawn.
    unsafe {
        cmd.pre_exec(move || {
            // First, so that everything the process does is limited and metered.
            join_in_child(&join)?;
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
