//! What a node's sessions may leave on the machine — users, mounts, loop devices,
//! cgroups, nftables tables, session links — listed from the kernel's and the system's own
//! tables, so tests can check that teardown and the crash sweep leave nothing.

use std::path::Path;
use std::process::Command;

/// Everything of the node with `node_id` and `data_dir` still on the machine,
/// one line per item; empty when clean.
pub fn of_node(node_id: &str, data_dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let homes = data_dir.join("homes");
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for line in passwd.lines() {
        if line
            .split(':')
            .nth(5)
            .is_some_and(|home| Path::new(home).starts_with(&homes))
        {
            found.push(format!("user {line}"));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mounts.lines() {
        if line
            .split(' ')
            .nth(4)
            .is_some_and(|m| Path::new(m).starts_with(data_dir))
        {
            found.push(format!("mount {line}"));
        }
    }
    for entry in std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        let backing = std::fs::read_to_string(entry.path().join("loop/backing_file"));
        if let Ok(b) = backing
            && Path::new(b.trim()).starts_with(data_dir)
        {
            found.push(format!("loop {:?} {}", entry.file_name(), b.trim()));
        }
    }
    let tag: String = node_id.chars().take(12).collect();
    // Pure v2 has the node's parent at the top; v1 in each controller's hierarchy.
    let top = Path::new("/sys/fs/cgroup");
    let hierarchies = std::fs::read_dir(top).into_iter().flatten().flatten();
    for dir in std::iter::once(top.to_owned()).chain(hierarchies.map(|e| e.path())) {
        let parent = dir.join(format!("jusy-{tag}"));
        if parent.exists() {
            found.push(format!("cgroup {}", parent.display()));
        }
    }
    let tables = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if tables.contains(&format!("jusy_{tag}")) {
        found.push(format!("nft table jusy_{tag}"));
    }
    // Session links and the claim bridge: `jy` and the tag's first 8 characters.
    let links = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let prefix = format!(
        "jy{}",
        tag.chars()
            .filter(char::is_ascii_alphanumeric)
            .take(8)
            .collect::<String>()
    );
    for line in links.lines() {
        if let Some(name) = line.split(": ").nth(1)
            && name.starts_with(&prefix)
        {
            found.push(format!("link {name}"));
        }
    }
    found.dedup();
    found
}
