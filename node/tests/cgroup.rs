//! The session cgroup against the real kernel (root only): processes join it in
//! `pre_exec`, its counters see exited processes and refused forks, and
//! teardown kills everything inside. Run on both kill paths this machine
//! offers: the layout as detected, and on v1 systems also without the unified
//! hierarchy (the freezer path of pure-v1 hosts).

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::process::CommandExt;
use std::process::Command;

use jusy_node::sandbox::cgroup::{CgroupLimits, Layout, NodeCgroups, join_in_child};

fn layouts() -> Vec<Layout> {
    let detected = Layout::detect().expect("a cgroup hierarchy");
    let mut all = vec![detected.clone()];
    if let Layout::V1 {
        memory,
        pids,
        cpuacct,
        freezer,
        cpu,
        blkio,
        unified: Some(_),
    } = detected
    {
        all.push(Layout::V1 {
            memory,
            pids,
            cpuacct,
            freezer,
            cpu,
            blkio,
            unified: None,
        });
    }
    all
}

/// The node's parent cgroup got the low CPU weight (and disk weight where the
/// hierarchy has the file), and a session process sits below it.
fn weighed_down(layout: &Layout, tag: &str, pid: u32) {
    let parent = format!("jusy-{tag}");
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    match layout {
        Layout::V1 { cpu, blkio, .. } => {
            let cpu = cpu
                .as_ref()
                .expect("this test expects the v1 cpu controller");
            let shares = std::fs::read_to_string(cpu.join(&parent).join("cpu.shares")).unwrap();
            assert_eq!(shares.trim(), "205");
            let line = cgroups.lines().find(|l| {
                l.split(':')
                    .nth(1)
                    .is_some_and(|c| c.split(',').any(|c| c == "cpu"))
            });
            assert!(
                line.is_some_and(|l| l.ends_with(&format!("/{parent}/s"))),
                "{cgroups}"
            );
            for (file, value) in [("blkio.bfq.weight", "20"), ("blkio.weight", "100")] {
                if let Some(path) = blkio
                    .as_ref()
                    .map(|b| b.join(&parent).join(file))
                    .filter(|p| p.exists())
                {
                    assert_eq!(std::fs::read_to_string(path).unwrap().trim(), value);
                }
            }
        }
        Layout::V2 { root } => {
            let weight = root.join(&parent).join("cpu.weight");
            if weight.exists() {
                assert_eq!(std::fs::read_to_string(weight).unwrap().trim(), "20");
            } else {
                eprintln!("no cpu controller on cgroup v2 here: CPU weight not checked");
            }
            assert!(cgroups.contains(&format!("/{parent}/s")), "{cgroups}");
        }
    }
}

#[tokio::test]
async fn processes_join_are_counted_and_killed() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: needs root to create cgroups");
        return;
    }
    for (i, layout) in layouts().into_iter().enumerate() {
        let tag = format!("test{}x{i}", std::process::id());
        let node = NodeCgroups::new(layout.clone(), &tag).unwrap();
        let cg = node
            .create(
                "s",
                CgroupLimits {
                    memory: 256 << 20,
                    pids: 10,
                },
            )
            .unwrap();
        let fds = cg.join_fds();
        // Burns a little CPU in a process that exits, tries to start 20 sleepers
        // (10 are allowed), and stays.
        let script = "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; \
                      for n in $(seq 20); do sleep 600 & done 2>/dev/null; exec sleep 600";
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        // SAFETY: join_in_child only calls write(2).
        unsafe {
            cmd.pre_exec(move || join_in_child(&fds));
        }
        let mut child = cmd.spawn().unwrap();
        weighed_down(&layout, &tag, child.id());
        let counters = loop {
            let c = cg.counters().unwrap();
            if c.forks_refused > 0 {
                break c;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert!(counters.cpu_us > 10_000, "{layout:?}: {counters:?}");
        cg.destroy().await.unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success(), "{layout:?}: killed, not exited");
        node.remove();
    }
}
