//! The host's world-writable directories (`/tmp`, `/var/tmp`, `/dev/shm`,
//! `/run/lock`, and whatever else the machine has), found once when the node
//! starts. Every session gets a private directory on its own disk bound over
//! each of them, so nothing one session leaves there reaches the host's disk,
//! the next session or the owner.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Directories always covered when they exist, wherever the scan stops.
const KNOWN: [&str; 5] = ["/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock"];

/// How deep below `/` the scan looks (`/var/lib/php/sessions` is 4).
const DEPTH: usize = 4;

/// Trees never scanned: kernel views, and `/dev/mqueue`, which each session
/// gets a fresh instance of instead.
const SKIP: [&str; 4] = ["/proc", "/sys", "/dev/mqueue", "/dev/pts"];

/// Every world-writable directory of the host within [`DEPTH`] of `/`, outside
/// `data_dir`, without the ones inside another (covering the outer one hides
/// them already), parents first.
pub fn find(data_dir: &Path) -> Vec<PathBuf> {
    let mut found = BTreeSet::new();
    for known in KNOWN {
        if let Ok(real) = std::fs::canonicalize(known)
            && real.is_dir()
        {
            found.insert(real);
        }
    }
    scan(Path::new("/"), DEPTH, data_dir, &mut found);
    outermost(found, data_dir)
}

fn scan(dir: &Path, depth: usize, data_dir: &Path, found: &mut BTreeSet<PathBuf>) {
    if depth == 0 || dir.starts_with(data_dir) || SKIP.iter().any(|s| dir == Path::new(s)) {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        // symlink_metadata: a link is not followed (it is covered where it points).
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        if !meta.is_dir() {
            continue;
        }
        let path = entry.path();
        if meta.permissions().mode() & 0o002 != 0 {
            found.insert(path);
        } else {
            scan(&path, depth - 1, data_dir, found);
        }
    }
}

/// Drops directories inside another one of the set and the data directory's.
fn outermost(found: BTreeSet<PathBuf>, data_dir: &Path) -> Vec<PathBuf> {
    let mut kept: Vec<PathBuf> = Vec::new();
    // Sorted order puts a parent right before its children.
    for dir in found {
        if dir.starts_with(data_dir) || kept.iter().any(|k| dir.starts_with(k)) {
            continue;
        }
        kept.push(dir);
    }
    kept
}

/// The name of a session's private directory for `target`: its path with
/// `/` turned into `_` (`/var/tmp` → `var_tmp`).
pub fn private_name(target: &Path) -> String {
    target
        .to_string_lossy()
        .trim_start_matches('/')
        .replace('/', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_and_data_dirs_are_dropped() {
        let set: BTreeSet<PathBuf> = [
            "/tmp",
            "/tmp/.X11-unix",
            "/var/tmp",
            "/srv/node/w",
            "/dev/shm",
        ]
        .into_iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(
            outermost(set, Path::new("/srv/node")),
            ["/dev/shm", "/tmp", "/var/tmp"].map(PathBuf::from)
        );
    }

    #[test]
    fn names_are_flat() {
        assert_eq!(private_name(Path::new("/var/tmp")), "var_tmp");
        assert_eq!(private_name(Path::new("/tmp")), "tmp");
    }

    #[test]
    fn this_host_has_tmp() {
        let found = find(Path::new("/nonexistent-data-dir"));
        assert!(found.iter().any(|p| p == Path::new("/tmp")), "{found:?}");
        assert!(!found.iter().any(|p| p.starts_with("/proc")), "{found:?}");
    }
}
