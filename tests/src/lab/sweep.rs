//! Cleanup of lab objects. A lab's namespaces carry its test process's pid in
//! their names (`jlab<pid>x<seq>-<role>`); dropping the lab kills what runs in
//! them and deletes them, which also removes their veths and nftables tables.
//! A test that was killed never drops its lab, so every new lab first sweeps
//! the namespaces of dead pids, and the session users that nodes of dead tests
//! left behind (their homes are under a dead test's scene directory).

use std::path::Path;
use std::process::Command;

/// Every lab namespace name starts with this.
const PREFIX: &str = "jlab";
/// Every session user's name starts with this (see `node/src/sandbox/user.rs`).
const USER_PREFIX: &str = "jsu";

/// The name prefix of this process's lab number `seq`.
pub(crate) fn prefix(seq: u32) -> String {
    format!("{PREFIX}{}x{seq}", std::process::id())
}

fn alive(pid: &str) -> bool {
    Path::new("/proc").join(pid).exists()
}

/// Kills every process in `ns` and deletes it. Best effort: cleanup must go on
/// past one failure.
pub(crate) fn remove_netns(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<libc::pid_t>() {
                // SAFETY: kill has no memory effects; these are processes the
                // lab started inside its own namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _ = Command::new("ip").args(["netns", "del", ns]).status();
}

/// Removes what labs of dead test processes left behind.
pub(crate) fn stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|r| r.split('x').next()) else {
            continue;
        };
        if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) && !alive(pid) {
            remove_netns(&name);
        }
    }
    stale_users();
}

/// Deletes session users whose home lies in the scene directory of a dead test
/// (`<tmp>/jusy-e2e/<test>-<pid>-<random>/…`), after killing their processes.
fn stale_users() {
    let root = std::env::temp_dir().join("jusy-e2e");
    let Ok(passwd) = std::fs::read_to_string("/etc/passwd") else {
        return;
    };
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        let (Some(name), Some(uid), Some(home)) = (fields.first(), fields.get(2), fields.get(5))
        else {
            continue;
        };
        let Ok(rest) = Path::new(home).strip_prefix(&root) else {
            continue;
        };
        let scene = rest
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .unwrap_or_default();
        let owner = scene.rsplit('-').nth(1).unwrap_or_default();
        if !name.starts_with(USER_PREFIX)
            || owner.is_empty()
            || !owner.bytes().all(|b| b.is_ascii_digit())
            || alive(owner)
        {
            continue;
        }
        kill_uid(uid);
        let _ = Command::new("userdel")
            .args(["--force", "--remove", name])
            .status();
    }
}

/// Kills every process running as `uid` (a dead test's session user).
fn kill_uid(uid: &str) {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<libc::pid_t>() else {
            continue;
        };
        let status = std::fs::read_to_string(p.path().join("status")).unwrap_or_default();
        let owned = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            == Some(uid);
        if owned {
            // SAFETY: kill has no memory effects; the process belongs to a
            // session user of a test that no longer exists.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}
