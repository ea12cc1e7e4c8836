//! Cleanup of lab objects. A lab's namespaces carry its test process's pid in
//! their names (`jlab<pid>x<seq>-<role>`); dropping the lab kills what runs in
//! them and deletes them, which also removes their veths and nftables tables.
//! A test that was killed never drops its lab, so every new lab first sweeps
//! the namespaces of dead pids (with every process in them), and the session
//! users that nodes of dead lab tests left behind.

use std::path::Path;
use std::process::Command;

/// Every lab namespace name starts with this.
const PREFIX: &str = "jlab";
/// Every session user's name starts with this (see `node/src/sandbox/user.rs`).
const USER_PREFIX: &str = "jsu";
/// A file in a scene directory that says a lab ran there.
pub(crate) const MARKER: &str = "lab-prefix";

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

/// Removes every lab namespace of this process (and what runs in them).
pub(crate) fn own() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    let mine = format!("{PREFIX}{}x", std::process::id());
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&mine) {
            remove_netns(&name);
        }
    }
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

/// Deletes session users whose home lies in the scene directory of a dead lab
/// test (`<tmp>/jusy-e2e/<test>-<pid>-<random>/`, marked by [`MARKER`]). Their
/// processes ran in the lab's namespaces and are already gone with them; other
/// tests' users are left to their own sweeps.
fn stale_users() {
    let root = std::env::temp_dir().join("jusy-e2e");
    let Ok(passwd) = std::fs::read_to_string("/etc/passwd") else {
        return;
    };
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        let (Some(name), Some(home)) = (fields.first(), fields.get(5)) else {
            continue;
        };
        let Ok(rest) = Path::new(home).strip_prefix(&root) else {
            continue;
        };
        let Some(scene) = rest.components().next() else {
            continue;
        };
        let scene = scene.as_os_str().to_string_lossy().into_owned();
        let owner = scene.rsplit('-').nth(1).unwrap_or_default();
        if name.starts_with(USER_PREFIX)
            && root.join(&scene).join(MARKER).exists()
            && !owner.is_empty()
            && owner.bytes().all(|b| b.is_ascii_digit())
            && !alive(owner)
        {
            let _ = Command::new("userdel")
                .args(["--force", "--remove", name])
                .status();
        }
    }
}
