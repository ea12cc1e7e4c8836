//! What a session program is: the file, arguments and clean environment the
//! session's init starts it with (see `init`), for a shell, a command or sftp.
//! The init does the rest: session id, terminal, the session user, umask 077,
//! `no_new_privs`, the home as working directory.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::Sandbox;
use super::init::wire::Spawn;

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

/// The spawn request for `program` (its id is set by the init's handle); `tty`
/// makes stdin the controlling terminal.
pub fn spawn(
    sandbox: &Sandbox,
    program: &Program,
    env: &[(String, String)],
    tty: bool,
    sftp_server: &Path,
) -> Spawn {
    let user = &sandbox.user;
    let shell = user.shell.as_os_str().as_bytes().to_vec();
    let (path, argv) = match program {
        Program::Shell => {
            let base = user
                .shell
                .file_name()
                .map_or_else(|| b"sh".to_vec(), |n| n.as_bytes().to_vec());
            (shell, vec![[b"-".as_slice(), &base].concat()])
        }
        Program::Exec(line) => (
            shell.clone(),
            vec![shell, b"-c".to_vec(), line.as_bytes().to_vec()],
        ),
        Program::Sftp => {
            let path = sftp_server.as_os_str().as_bytes().to_vec();
            (path.clone(), vec![path])
        }
    };
    let var = |k: &str, v: &[u8]| [k.as_bytes(), b"=", v].concat();
    let mut vars = vec![
        var("HOME", user.home.as_os_str().as_bytes()),
        var("USER", user.name.as_bytes()),
        var("LOGNAME", user.name.as_bytes()),
        var("SHELL", user.shell.as_os_str().as_bytes()),
        var("PATH", b"/usr/local/bin:/usr/bin:/bin"),
    ];
    vars.extend(
        env.iter()
            .filter(|(k, _)| env_allowed(k))
            .map(|(k, v)| var(k, v.as_bytes())),
    );
    Spawn {
        id: 0,
        path,
        argv,
        env: vars,
        tty,
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
