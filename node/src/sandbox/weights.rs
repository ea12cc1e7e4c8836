//! How much of a busy machine's CPU and disk time the sessions get: the
//! node's parent cgroup weighs a fifth of the default, so that the owner's own
//! programs, at the default weight, stay responsive while sessions compute.
//! An idle machine still gives sessions all of it: weights only divide time
//! that several cgroups want at once.
//!
//! cgroup v2: `cpu.weight` 20 of 100; `io.bfq.weight` 20 of 100 (disks with
//! the BFQ scheduler) and `io.weight` 20 of 100 (iocost). cgroup v1:
//! `cpu.shares` 205 of 1024; `blkio.bfq.weight` 20 of 100 or `blkio.weight`
//! 100 of 500 (CFQ). A controller with none of its files is skipped with one
//! log line: the kernel or the disk's scheduler cannot weigh sessions there.

use std::fs;
use std::path::{Path, PathBuf};

use super::cgroup::Layout;

/// A controller's weight files, each with the value that is a fifth of its
/// default.
type Files = &'static [(&'static str, &'static str)];

const V2_CPU: Files = &[("cpu.weight", "20")];
const V2_IO: Files = &[("io.bfq.weight", "20"), ("io.weight", "default 20")];
const V1_CPU: Files = &[("cpu.shares", "205")];
const V1_BLKIO: Files = &[("blkio.bfq.weight", "20"), ("blkio.weight", "100")];

/// One file to write.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Setting {
    path: PathBuf,
    value: &'static str,
}

/// Each controller of `layout` that can weigh: its name, directory and files.
fn controllers(layout: &Layout) -> Vec<(&'static str, &Path, Files)> {
    match layout {
        Layout::V2 { root } => vec![("cpu", root.as_path(), V2_CPU), ("io", root, V2_IO)],
        Layout::V1 { cpu, blkio, .. } => {
            let mut out = Vec::new();
            if let Some(dir) = cpu {
                out.push(("cpu", dir.as_path(), V1_CPU));
            }
            if let Some(dir) = blkio {
                out.push(("blkio", dir.as_path(), V1_BLKIO));
            }
            out
        }
    }
}

/// The files of `controller` in `dir` that `present` says exist.
fn settings(dir: &Path, files: Files, present: &impl Fn(&Path) -> bool) -> Vec<Setting> {
    files
        .iter()
        .map(|(name, value)| Setting {
            path: dir.join(name),
            value,
        })
        .filter(|s| present(&s.path))
        .collect()
}

/// Leaves out of a v1 layout the weight controllers that have no weight file
/// (every cgroup of a v1 hierarchy has the same files as its root), so that no
/// session cgroup is made where it would weigh nothing.
pub fn keep_usable(top: &mut Layout) {
    if let Layout::V1 { cpu, blkio, .. } = top {
        for (name, slot, files) in [("cpu", cpu, V1_CPU), ("blkio", blkio, V1_BLKIO)] {
            match slot {
                None => tracing::info!(
                    controller = name,
                    "cgroup v1 controller not mounted: sessions are not weighted down there"
                ),
                Some(dir) if settings(dir, files, &|p| p.exists()).is_empty() => {
                    tracing::info!(
                        controller = name,
                        "cgroup v1 controller has no weight file (no BFQ or CFQ disk scheduler): sessions are not weighted down there"
                    );
                    *slot = None;
                }
                Some(_) => {}
            }
        }
    }
}

/// On v2, enables the weight controllers the kernel offers for the cgroups
/// under the root (`top_root`), so the node's parent cgroup gets weight files.
pub fn enable_v2(top_root: &Path) {
    let offered = fs::read_to_string(top_root.join("cgroup.controllers")).unwrap_or_default();
    for controller in ["cpu", "io"] {
        // One not offered is reported by `lower`, which then finds no file.
        if !offered.split_whitespace().any(|c| c == controller) {
            continue;
        }
        let path = top_root.join("cgroup.subtree_control");
        // The cpu controller refuses while a realtime process sits in a child
        // cgroup on some kernels; sessions then merely keep the default weight.
        if let Err(e) = fs::write(&path, format!("+{controller}")) {
            tracing::warn!(controller, error = %e, "cannot enable a cgroup v2 controller: sessions are not weighted down there");
        }
    }
}

/// Writes the low weights into the node's parent cgroup `parent`.
pub fn lower(parent: &Layout) {
    for (name, dir, files) in controllers(parent) {
        let todo = settings(dir, files, &|p| p.exists());
        if todo.is_empty() {
            tracing::info!(
                controller = name,
                "cgroup controller absent or without a weight file: sessions are not weighted down there"
            );
        }
        for s in todo {
            if let Err(e) = fs::write(&s.path, s.value) {
                tracing::warn!(path = %s.path.display(), error = %e, "cannot lower the sessions' weight");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(layout: &Layout, present: &[&str]) -> Vec<(PathBuf, &'static str)> {
        let present = |p: &Path| present.iter().any(|f| p == Path::new(f));
        controllers(layout)
            .into_iter()
            .flat_map(|(_, dir, files)| settings(dir, files, &present))
            .map(|s| (s.path, s.value))
            .collect()
    }

    #[test]
    fn v2_weighs_cpu_and_whichever_io_files_exist() {
        let layout = Layout::V2 {
            root: "/cg/jusy-x".into(),
        };
        let present = ["/cg/jusy-x/cpu.weight", "/cg/jusy-x/io.bfq.weight"];
        assert_eq!(
            plan(&layout, &present),
            [
                ("/cg/jusy-x/cpu.weight".into(), "20"),
                ("/cg/jusy-x/io.bfq.weight".into(), "20"),
            ]
        );
        assert_eq!(plan(&layout, &[]), []);
    }

    #[test]
    fn v1_weighs_the_cpu_and_blkio_hierarchies_it_has() {
        let layout = Layout::V1 {
            memory: "/m/j".into(),
            pids: "/p/j".into(),
            cpuacct: "/c/j".into(),
            freezer: "/f/j".into(),
            cpu: Some("/c/j".into()),
            blkio: Some("/b/j".into()),
            unified: None,
        };
        let present = ["/c/j/cpu.shares", "/b/j/blkio.weight"];
        assert_eq!(
            plan(&layout, &present),
            [
                ("/c/j/cpu.shares".into(), "205"),
                ("/b/j/blkio.weight".into(), "100"),
            ]
        );
    }
}
