//! Session users: created ahead of orders, removed with their home and processes
//! when the session ends, and swept by name prefix after a crash.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

/// Every session user's login name starts with this.
pub const USER_PREFIX: &str = "jsu";
/// Session users get uids and gids from this range by default, far from
/// people's accounts.
pub const DEFAULT_IDS: IdRange = (610_000, 619_999);

/// The lowest and highest uid (and gid) of session users.
pub type IdRange = (u32, u32);

/// Creating or removing a session user failed.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("running {cmd}: {source}")]
    Spawn {
        cmd: &'static str,
        source: io::Error,
    },
    #[error("{cmd} {user} failed: {stderr}")]
    Failed {
        cmd: &'static str,
        user: String,
        stderr: String,
    },
    #[error("user {0} was created but is missing from /etc/passwd")]
    Missing(String),
    #[error("uid {0} was taken by someone else before useradd could use it")]
    UidTaken(u32),
    #[error("preparing home {path}: {source}")]
    Home { path: PathBuf, source: io::Error },
}

/// A Linux user that runs one session's processes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: PathBuf,
    /// Development mode: the node is not root, so this is the node's own user and
    /// nothing is isolated. Never offered by a production node.
    pub shared_dev_user: bool,
}

impl SessionUser {
    /// Creates a fresh unprivileged user (no password, no supplementary groups)
    /// with uid `uid` and a group of its own with the same gid (from
    /// [`super::uids::Uids`]), and a private home (mode 0700) when
    /// `create_home`; otherwise the home is the caller's to make (a mounted disk).
    pub async fn create(homes: &Path, create_home: bool, uid: u32) -> Result<Self, UserError> {
        let name = format!("{USER_PREFIX}{}", random_hex(4));
        let home = homes.join(&name);
        let shell = login_shell();
        let output = Command::new("useradd")
            .arg(if create_home {
                "--create-home"
            } else {
                "--no-create-home"
            })
            .args(["--user-group", "--no-log-init", "--home-dir"])
            .arg(&home)
            .arg("--shell")
            .arg(&shell)
            .args(["--uid", &uid.to_string()])
            // The user's group gets the same number: useradd prefers the uid
            // as gid, and a one-id range leaves it no other choice. The uid
            // range only spares a warning about a uid outside it.
            .args(["-K", &format!("UID_MIN={uid}")])
            .args(["-K", &format!("UID_MAX={uid}")])
            .args(["-K", &format!("GID_MIN={uid}")])
            .args(["-K", &format!("GID_MAX={uid}")])
            .args(["-K", "UMASK=077", "--comment", "jusy session"])
            .arg(&name)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|source| UserError::Spawn {
                cmd: "useradd",
                source,
            })?;
        // Exit code 4: another node on this machine took the uid meanwhile.
        if output.status.code() == Some(4) {
            return Err(UserError::UidTaken(uid));
        }
        if !output.status.success() {
            return Err(UserError::Failed {
                cmd: "useradd",
                user: name,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        let passwd = tokio::fs::read_to_string("/etc/passwd")
            .await
            .unwrap_or_default();
        let (uid, gid) =
            passwd_ids(&passwd, &name).ok_or_else(|| UserError::Missing(name.clone()))?;
        Ok(Self {
            name,
            uid,
            gid,
            home,
            shell,
            shared_dev_user: false,
        })
    }

    /// Development mode: a fresh home directory for the node's own user.
    pub async fn create_dev(homes: &Path) -> Result<Self, UserError> {
        let home = homes.join(format!("dev{}", random_hex(4)));
        create_private_dir(&home).await?;
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let passwd = tokio::fs::read_to_string("/etc/passwd")
            .await
            .unwrap_or_default();
        let name = passwd_name(&passwd, uid)
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| uid.to_string());
        Ok(Self {
            name,
            uid,
            gid,
            home,
            shell: login_shell(),
            shared_dev_user: true,
        })
    }

    /// Kills every process of the user, then deletes the user and its home.
    pub async fn remove(&self) -> Result<(), UserError> {
        if self.shared_dev_user {
            return remove_dir(&self.home).await;
        }
        kill_all_of(self.uid).await;
        // userdel counts zombies as users of the account; a killed session's
        // orphans stay zombies until init reaps them, which some inits do only
        // every second or two. Exit code 8 (user busy) is worth a few retries.
        let mut tries = 0;
        let output = loop {
            let output = Command::new("userdel")
                .args(["--remove", &self.name])
                .stdin(Stdio::null())
                .output()
                .await
                .map_err(|source| UserError::Spawn {
                    cmd: "userdel",
                    source,
                })?;
            if output.status.code() != Some(8) || tries >= 50 {
                break output;
            }
            tries += 1;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        // Exit code 6 means the user is already gone, 12 that the home could not be
        // removed (removed below); both leave no user behind.
        if !output.status.success() && !matches!(output.status.code(), Some(6 | 12)) {
            return Err(UserError::Failed {
                cmd: "userdel",
                user: self.name.clone(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        remove_dir(&self.home).await
    }
}

/// Removes session users left behind by a crash of the node that owns `homes`;
/// returns how many. Users of other nodes on the same machine (other homes) are
/// left alone.
pub async fn sweep(homes: &Path, ids: IdRange) -> usize {
    let passwd = tokio::fs::read_to_string("/etc/passwd")
        .await
        .unwrap_or_default();
    let mut removed = 0;
    for (name, uid, gid) in session_users(&passwd, homes, ids) {
        let user = SessionUser {
            home: homes.join(&name),
            name,
            uid,
            gid,
            shell: login_shell(),
            shared_dev_user: false,
        };
        match user.remove().await {
            Ok(()) => removed += 1,
            Err(e) => {
                tracing::warn!(user = %user.name, error = %e, "sweep could not remove a stale session user")
            }
        }
    }
    removed
}

/// Creates `dir` (and parents) readable only by its owner.
pub async fn create_private_dir(dir: &Path) -> Result<(), UserError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| UserError::Home {
        path: dir.to_owned(),
        source,
    };
    tokio::fs::create_dir_all(dir).await.map_err(err)?;
    tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .await
        .map_err(err)
}

async fn remove_dir(dir: &Path) -> Result<(), UserError> {
    match tokio::fs::remove_dir_all(dir).await {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(UserError::Home {
            path: dir.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// SIGKILLs every process whose real uid is `uid`, until none is left (a process
/// may fork while we scan, so scan again).
async fn kill_all_of(uid: u32) {
    for _ in 0..50 {
        let pids = pids_of(uid);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            // SAFETY: kill has no memory effects; a stale pid only yields ESRCH.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tracing::warn!(uid, "processes of a session user survived repeated SIGKILL");
}

fn pids_of(uid: u32) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            (e.metadata().ok()?.uid() == uid && !is_zombie(pid)).then_some(pid)
        })
        .collect()
}

/// A zombie is dead already; only its parent (often init) can make it go away.
fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, after_comm) = stat.rsplit_once(')')?;
            after_comm.trim_start().chars().next()
        })
        == Some('Z')
}

fn login_shell() -> PathBuf {
    ["/bin/bash", "/bin/sh"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("/bin/sh"))
}

/// Random lowercase hex of `bytes` bytes from the OS.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // The OS random source failing is not recoverable in any useful way; fall back
    // to the clock so names stay unique enough for a retry by useradd's own check.
    if getrandom::fill(&mut buf).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        buf.iter_mut()
            .zip(nanos.to_le_bytes().iter().cycle())
            .for_each(|(b, n)| *b = *n);
    }
    hex::encode(buf)
}

fn passwd_ids(passwd: &str, name: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|line| {
        let mut f = line.split(':');
        (f.next()? == name).then_some(())?;
        let _pw = f.next()?;
        Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
    })
}

fn passwd_name(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let mut f = line.split(':');
        let name = f.next()?;
        let _pw = f.next()?;
        (f.next()?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
    })
}

/// Session users (by prefix and uid range) whose home is directly under `homes`.
fn session_users(passwd: &str, homes: &Path, ids: IdRange) -> Vec<(String, u32, u32)> {
    passwd
        .lines()
        .filter_map(|line| {
            let mut f = line.split(':');
            let name = f.next()?;
            let _pw = f.next()?;
            let uid: u32 = f.next()?.parse().ok()?;
            let gid: u32 = f.next()?.parse().ok()?;
            let _gecos = f.next()?;
            let home = Path::new(f.next()?);
            let ours = name.starts_with(USER_PREFIX)
                && (ids.0..=ids.1).contains(&uid)
                && home == homes.join(name);
            ours.then(|| (name.to_owned(), uid, gid))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        jsuab12cd34:x:610001:610001:jusy session:/h/jsuab12cd34:/bin/bash\n\
        jsuother1:x:610002:610002:jusy session:/elsewhere/jsuother1:/bin/bash\n\
        jsuimpostor:x:1000:1000::/h/jsuimpostor:/bin/sh\n";

    #[test]
    fn passwd_lookups() {
        assert_eq!(passwd_ids(PASSWD, "jsuab12cd34"), Some((610_001, 610_001)));
        assert_eq!(passwd_ids(PASSWD, "nobody"), None);
        assert_eq!(passwd_name(PASSWD, 0).as_deref(), Some("root"));
    }

    #[test]
    fn sweep_only_takes_our_users_in_our_range_and_homes() {
        let users = session_users(PASSWD, Path::new("/h"), DEFAULT_IDS);
        assert_eq!(users, vec![("jsuab12cd34".to_owned(), 610_001, 610_001)]);
    }
}
