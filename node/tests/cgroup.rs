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
        unified: Some(_),
    } = detected
    {
        all.push(Layout::V1 {
            memory,
            pids,
            cpuacct,
            freezer,
            unified: None,
        });
    }
    all
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
