//! Mounting the cgroup hierarchies for a node whose mount namespace has none,
//! such as one started with `ip netns exec` (which mounts a fresh `/sys`). The
//! kernel's hierarchies are the same ones the rest of the machine sees; only
//! this namespace gains mount points for them, under the node's data directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

use super::cgroup::{CgroupError, Layout};

/// The controllers sessions use: the four they need, and the two that weigh
/// them down against the machine's other processes.
const NEEDED: [&str; 6] = ["memory", "pids", "cpuacct", "freezer", "cpu", "blkio"];

/// The layout from the mount table, mounting the hierarchies under `dir` first
/// when the table has none.
pub async fn layout(dir: &Path) -> Result<Layout, CgroupError> {
    if let Ok(layout) = Layout::detect() {
        return Ok(layout);
    }
    let cgroups = std::fs::read_to_string("/proc/cgroups").map_err(|source| CgroupError::Io {
        path: "/proc/cgroups".into(),
        source,
    })?;
    for (at, fstype, options) in mounts(&cgroups, dir) {
        std::fs::create_dir_all(&at).map_err(|source| CgroupError::Io {
            path: at.clone(),
            source,
        })?;
        let mut cmd = Command::new("mount");
        cmd.args(["-t", fstype]);
        if let Some(o) = &options {
            cmd.args(["-o", o]);
        }
        let out = cmd
            .arg("cgroup")
            .arg(&at)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|source| CgroupError::Io {
                path: at.clone(),
                source,
            })?;
        if !out.status.success() {
            tracing::warn!(at = %at.display(), stderr = %String::from_utf8_lossy(&out.stderr).trim(), "cannot mount a cgroup hierarchy");
        }
    }
    tracing::info!(dir = %dir.display(), "mounted the cgroup hierarchies this namespace lacked");
    Layout::detect()
}

/// What to mount: the unified hierarchy, and each legacy hierarchy that holds a
/// needed controller, with all the controllers bound to it (the kernel refuses
/// a mount that names only some of them).
fn mounts(proc_cgroups: &str, dir: &Path) -> Vec<(PathBuf, &'static str, Option<String>)> {
    let mut by_hierarchy: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    for line in proc_cgroups.lines().filter(|l| !l.starts_with('#')) {
        let mut f = line.split_whitespace();
        let (Some(name), Some(Ok(hierarchy))) = (f.next(), f.next().map(str::parse::<u32>)) else {
            continue;
        };
        if hierarchy != 0 {
            by_hierarchy.entry(hierarchy).or_default().push(name);
        }
    }
    let mut out = vec![(dir.join("unified"), "cgroup2", None)];
    for names in by_hierarchy.values() {
        if names.iter().any(|n| NEEDED.contains(n)) {
            let options = names.join(",");
            out.push((dir.join(&options), "cgroup", Some(options)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_hierarchies_are_mounted_with_all_their_controllers() {
        let cgroups = "#subsys_name\thierarchy\tnum_cgroups\tenabled\n\
            cpu\t1\t1\t1\ncpuacct\t1\t1\t1\nmemory\t4\t30\t1\n\
            hugetlb\t0\t1\t1\npids\t8\t1\t1\nfreezer\t6\t1\t1\ndevices\t5\t1\t1\n";
        let dir = Path::new("/d");
        let want: Vec<(PathBuf, &str, Option<String>)> = vec![
            ("/d/unified".into(), "cgroup2", None),
            (
                "/d/cpu,cpuacct".into(),
                "cgroup",
                Some("cpu,cpuacct".into()),
            ),
            ("/d/memory".into(), "cgroup", Some("memory".into())),
            ("/d/freezer".into(), "cgroup", Some("freezer".into())),
            ("/d/pids".into(), "cgroup", Some("pids".into())),
        ];
        assert_eq!(mounts(cgroups, dir), want);
    }

    #[test]
    fn pure_v2_mounts_only_the_unified_hierarchy() {
        let cgroups =
            "#subsys_name\thierarchy\tnum_cgroups\tenabled\nmemory\t0\t30\t1\npids\t0\t1\t1\n";
        assert_eq!(mounts(cgroups, Path::new("/d")).len(), 1);
    }
}
