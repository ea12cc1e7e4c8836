//! What a node's sessions may leave on the machine — users, mounts, loop devices,
//! cgroups, nftables tables, session links, and whatever their users still
//! own: processes, SysV IPC objects, POSIX message queues, files in the shared
//! world-writable directories — listed from the kernel's and the system's own
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

/// The machine's world-writable directories every user shares.
pub const SHARED_DIRS: [&str; 5] = ["/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock"];

/// The SysV IPC tables, one per kind of object.
const SYSV_TABLES: [&str; 3] = [
    "/proc/sysvipc/shm",
    "/proc/sysvipc/msg",
    "/proc/sysvipc/sem",
];

/// A process on the machine, as /proc shows it to root.
#[derive(Debug, Clone)]
pub struct HostProcess {
    pub pid: u32,
    pub uid: u32,
    /// Its arguments joined by spaces.
    pub args: String,
    /// Its `/proc/<pid>/cgroup`.
    pub cgroup: String,
}

/// Every process on the machine (those that exit meanwhile are skipped).
pub fn processes() -> Vec<HostProcess> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let dir = entry.path();
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue;
        };
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse().ok());
        let Some(uid) = uid else { continue };
        let args = std::fs::read(dir.join("cmdline")).unwrap_or_default();
        let args = String::from_utf8_lossy(&args)
            .split('\0')
            .filter(|a| !a.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        let cgroup = std::fs::read_to_string(dir.join("cgroup")).unwrap_or_default();
        found.push(HostProcess {
            pid,
            uid,
            args,
            cgroup,
        });
    }
    found
}

/// The `pids.current` file of the pids cgroup a `/proc/<pid>/cgroup` names:
/// the v1 pids controller's hierarchy, or the unified one on a pure v2 host.
pub fn pids_current_file(proc_cgroup: &str) -> Option<std::path::PathBuf> {
    let line = |f: &dyn Fn(&str) -> bool| {
        proc_cgroup
            .lines()
            .find_map(|l| l.splitn(3, ':').nth(2).filter(|_| f(l)))
    };
    let root = Path::new("/sys/fs/cgroup");
    if let Some(path) = line(&|l| l.split(':').nth(1) == Some("pids")) {
        return Some(
            root.join("pids")
                .join(path.trim_start_matches('/'))
                .join("pids.current"),
        );
    }
    line(&|l| l.starts_with("0::"))
        .map(|path| root.join(path.trim_start_matches('/')).join("pids.current"))
}

/// The lines of `/proc/sysvipc/*` tables (one, or several one after another,
/// each under its header) whose owner or creator is one of `uids`.
pub fn sysv_ipc_of(tables: &str, uids: &[u32]) -> Vec<String> {
    let mut cols: Vec<usize> = Vec::new();
    let mut found = Vec::new();
    for line in tables.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.first() == Some(&"key") {
            cols = fields
                .iter()
                .enumerate()
                .filter(|(_, h)| **h == "uid" || **h == "cuid")
                .map(|(i, _)| i)
                .collect();
            continue;
        }
        let owned = cols.iter().any(|&i| {
            fields
                .get(i)
                .and_then(|f| f.parse().ok())
                .is_some_and(|u: u32| uids.contains(&u))
        });
        if owned {
            found.push(line.trim().to_owned());
        }
    }
    found
}

/// Everything users `uids` of the node tagged `node_id` still own on the
/// machine, one line per item: processes, SysV IPC objects, POSIX message
/// queues and files in [`SHARED_DIRS`]; empty when clean. With `remove`, it is
/// also removed (processes are left to the node), so that a failing test does
/// not leave its victims' leftovers to the next.
///
/// Another node's session may get a uid this node used before; its processes
/// are in that node's cgroup and are not counted.
pub fn of_uids(node_id: &str, uids: &[u32], remove: bool) -> Vec<String> {
    let mut found = Vec::new();
    let tag = format!("jusy-{}", node_id.chars().take(12).collect::<String>());
    for p in processes() {
        let other_node = p.cgroup.contains("/jusy-") && !p.cgroup.contains(&tag);
        if uids.contains(&p.uid) && !other_node {
            found.push(format!("process {} uid {}: {}", p.pid, p.uid, p.args));
        }
    }
    for (table, flag) in SYSV_TABLES.iter().zip(["-m", "-q", "-s"]) {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in sysv_ipc_of(&text, uids) {
            if remove && let Some(id) = line.split_whitespace().nth(1) {
                let _ = Command::new("ipcrm").args([flag, id]).output();
            }
            found.push(format!("{table}: {line}"));
        }
    }
    for (name, uid) in posix_queues(uids, remove) {
        found.push(format!("POSIX message queue /{name} of uid {uid}"));
    }
    // Nodes of other tests keep their sessions' homes in the scenes' directory.
    let scenes = std::env::temp_dir().join("jusy-e2e");
    for dir in SHARED_DIRS {
        files_of(Path::new(dir), &scenes, None, uids, remove, &mut found);
    }
    found.sort();
    found.dedup();
    found
}

/// Files under `dir` owned by `uids`, on `dir`'s own file system (find -xdev),
/// except under `skip`.
fn files_of(
    dir: &Path,
    skip: &Path,
    dev: Option<u64>,
    uids: &[u32],
    remove: bool,
    found: &mut Vec<String>,
) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(dir) else {
        return;
    };
    let dev = dev.unwrap_or(meta.dev());
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev || path == skip {
            continue;
        }
        if meta.is_dir() {
            files_of(&path, skip, Some(dev), uids, remove, found);
        }
        if uids.contains(&meta.uid()) {
            found.push(format!("file {} of uid {}", path.display(), meta.uid()));
            if remove {
                let _ = if meta.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
            }
        }
    }
}

/// The machine's POSIX message queues owned by `uids` (names without the
/// leading slash), read from an mqueue file system mounted for the purpose,
/// and removed with `remove`.
fn posix_queues(uids: &[u32], remove: bool) -> Vec<(String, u32)> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let mut r = [0u8; 6];
    let _ = getrandom::fill(&mut r);
    let dir = std::env::temp_dir().join(format!("jusy-mqueue-{}", hex::encode(r)));
    if std::fs::create_dir(&dir).is_err() {
        return Vec::new();
    }
    let Ok(target) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    // SAFETY: NUL-terminated strings that outlive the calls.
    let mounted = unsafe {
        libc::mount(
            c"mqueue".as_ptr(),
            target.as_ptr(),
            c"mqueue".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    } == 0;
    if mounted {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if uids.contains(&meta.uid()) {
                found.push((entry.file_name().to_string_lossy().into_owned(), meta.uid()));
                if remove {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        // SAFETY: as above.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
    let _ = std::fs::remove_dir(&dir);
    found
}

/// The kinds of namespace a process has, as named in `/proc/<pid>/ns`.
pub const NAMESPACES: [&str; 6] = ["net", "ipc", "pid", "mnt", "uts", "cgroup"];

/// This process's own namespaces, as `readlink /proc/self/ns/<kind>` says
/// them (`net:[4026531840]`).
pub fn own_namespaces() -> Vec<String> {
    NAMESPACES
        .iter()
        .filter_map(|kind| std::fs::read_link(format!("/proc/self/ns/{kind}")).ok())
        .map(|l| l.display().to_string())
        .collect()
}

/// Processes of the node tagged `node_id` still in one of `namespaces` (each
/// as `net:[4026531840]`): in its cgroups, of its session users `uids`, or a
/// `session-init` (one that left its cgroup). A namespace's
/// number is reused once it is gone, so processes of anything else found in a
/// number (another test's network, another node's sessions) are not counted.
/// Bind mounts of namespaces in the node's data directory are mounts
/// [`of_node`] lists.
pub fn in_namespaces(node_id: &str, uids: &[u32], namespaces: &[String]) -> Vec<String> {
    let tag = format!("jusy-{}", node_id.chars().take(12).collect::<String>());
    let mut found = Vec::new();
    for p in processes() {
        let other_node = p.cgroup.contains("/jusy-") && !p.cgroup.contains(&tag);
        let ours =
            p.cgroup.contains(&tag) || uids.contains(&p.uid) || p.args.contains("session-init");
        if other_node || !ours {
            continue;
        }
        for kind in NAMESPACES {
            let Ok(link) = std::fs::read_link(format!("/proc/{}/ns/{kind}", p.pid)) else {
                continue;
            };
            let link = link.display().to_string();
            if namespaces.contains(&link) {
                found.push(format!("process {} in {link}: {}", p.pid, p.args));
            }
        }
    }
    found
}
