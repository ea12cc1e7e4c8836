//! One cgroup per session, on cgroup v2 or v1 (detected at start): memory and
//! process limits enforced by the kernel, the kernel's own counters for CPU time,
//! peak memory, OOM kills and refused forks, and a teardown that kills everything
//! inside and removes the cgroup.
//!
//! Session cgroups live under a parent named for this node (`jusy-<tag>`), so two
//! nodes on one machine never touch each other's sessions and a restarted node
//! can sweep exactly its own leftovers.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::weights;

/// The cgroup parts of a session's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLimits {
    /// Memory the session's processes may use, in bytes; swap is not allowed.
    pub memory: u64,
    /// Processes and threads the session may have at once.
    pub pids: u32,
}

/// Setting up, reading or removing a cgroup failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no usable cgroup hierarchy: need cgroup v2 with memory and pids, or v1 memory, pids, cpuacct and freezer"
    )]
    NoHierarchy,
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: unexpected content")]
    Parse { path: PathBuf },
    #[error("processes of cgroup {0} survived being killed")]
    Unkillable(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where the controllers a session needs are mounted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// The unified hierarchy with the memory and pids controllers.
    V2 { root: PathBuf },
    /// Legacy per-controller hierarchies. `unified` is the v2 hierarchy mounted
    /// beside them without controllers (hybrid systems): used only for its
    /// `cgroup.kill`. `cpu` and `blkio` only weigh sessions down against the
    /// machine's other processes, and are left out where they cannot.
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpuacct: PathBuf,
        freezer: PathBuf,
        cpu: Option<PathBuf>,
        blkio: Option<PathBuf>,
        unified: Option<PathBuf>,
    },
}

impl Layout {
    /// Finds the hierarchies from this process's mount table.
    pub fn detect() -> Result<Self, CgroupError> {
        let path = Path::new("/proc/self/mountinfo");
        let text = fs::read_to_string(path).map_err(io_err(path))?;
        let layout = Self::from_mountinfo(&text, |root| {
            fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default()
        });
        layout.ok_or(CgroupError::NoHierarchy)
    }

    /// Chooses pure v2 when its controllers include memory and pids, else the v1
    /// controllers. `controllers` reads a v2 root's `cgroup.controllers`.
    fn from_mountinfo(mountinfo: &str, controllers: impl Fn(&Path) -> String) -> Option<Self> {
        let mut unified = None;
        let (mut memory, mut pids, mut cpuacct, mut freezer) = (None, None, None, None);
        let (mut cpu, mut blkio) = (None, None);
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mount_point) = left.split(' ').nth(4) else {
                continue;
            };
            let mut right = right.split(' ');
            let (Some(fstype), Some(_source), Some(opts)) =
                (right.next(), right.next(), right.next())
            else {
                continue;
            };
            let at = PathBuf::from(mount_point);
            match fstype {
                "cgroup2" => unified = Some(at),
                "cgroup" => {
                    for opt in opts.split(',') {
                        let slot = match opt {
                            "memory" => &mut memory,
                            "pids" => &mut pids,
                            "cpuacct" => &mut cpuacct,
                            "freezer" => &mut freezer,
                            "cpu" => &mut cpu,
                            "blkio" => &mut blkio,
                            _ => continue,
                        };
                        slot.get_or_insert_with(|| at.clone());
                    }
                }
                _ => {}
            }
        }
        if let Some(root) = &unified {
            let have = controllers(root);
            let mut have = have.split_whitespace();
            if have.clone().any(|c| c == "memory") && have.any(|c| c == "pids") {
                return Some(Self::V2 { root: root.clone() });
            }
        }
        Some(Self::V1 {
            memory: memory?,
            pids: pids?,
            cpuacct: cpuacct?,
            freezer: freezer?,
            cpu,
            blkio,
            unified,
        })
    }

    /// Every hierarchy root this layout uses.
    fn roots(&self) -> Vec<&Path> {
        match self {
            Self::V2 { root } => vec![root],
            Self::V1 {
                memory,
                pids,
                cpuacct,
                freezer,
                cpu,
                blkio,
                unified,
            } => {
                let mut roots = vec![memory.as_path(), pids, cpuacct, freezer];
                roots.extend(cpu.as_deref());
                roots.extend(blkio.as_deref());
                roots.extend(unified.as_deref());
                // Controllers mounted together share a directory.
                roots.sort();
                roots.dedup();
                roots
            }
        }
    }

    /// The same layout with every root replaced by `root/sub`.
    fn join(&self, sub: &str) -> Self {
        match self {
            Self::V2 { root } => Self::V2 {
                root: root.join(sub),
            },
            Self::V1 {
                memory,
                pids,
                cpuacct,
                freezer,
                cpu,
                blkio,
                unified,
            } => Self::V1 {
                memory: memory.join(sub),
                pids: pids.join(sub),
                cpuacct: cpuacct.join(sub),
                freezer: freezer.join(sub),
                cpu: cpu.as_ref().map(|c| c.join(sub)),
                blkio: blkio.as_ref().map(|b| b.join(sub)),
                unified: unified.as_ref().map(|u| u.join(sub)),
            },
        }
    }
}

/// This node's parent cgroup in every hierarchy.
#[derive(Clone, Debug)]
pub struct NodeCgroups {
    /// The hierarchy roots (for enabling controllers on v2).
    top: Layout,
    /// `jusy-<tag>` under each root.
    parent: Layout,
}

impl NodeCgroups {
    /// Creates (if needed) this node's parent cgroups, with a low CPU and disk
    /// weight for the sessions inside; `tag` names the node.
    pub fn new(mut top: Layout, tag: &str) -> Result<Self, CgroupError> {
        weights::keep_usable(&mut top);
        let parent = top.join(&format!("jusy-{tag}"));
        for dir in parent.roots() {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
            // Sessions pass through to their own cgroup but cannot list the
            // others (the node's umask would leave it 0700).
            fs::set_permissions(dir, Permissions::from_mode(crate::state::TRAVERSE))
                .map_err(io_err(dir))?;
        }
        if let (Layout::V2 { root: top_root }, Layout::V2 { root }) = (&top, &parent) {
            // Controllers must be enabled on every level above a session's cgroup.
            // The root cgroup may hold processes and still delegate controllers.
            for dir in [top_root, root] {
                write(&dir.join("cgroup.subtree_control"), "+memory +pids")?;
            }
            weights::enable_v2(top_root);
        }
        weights::lower(&parent);
        Ok(Self { top, parent })
    }

    pub fn layout(&self) -> &Layout {
        &self.top
    }

    /// Removes this node's (empty) parent cgroups at shutdown.
    pub fn remove(&self) {
        for dir in self.parent.roots() {
            if let Err(e) = fs::remove_dir(dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the node's cgroup");
            }
        }
    }

    /// Creates a session's cgroup `name` with `limits`, ready for processes to join.
    pub fn create(&self, name: &str, limits: CgroupLimits) -> Result<SessionCgroup, CgroupError> {
        let dirs = self.parent.join(name);
        for dir in dirs.roots() {
            fs::create_dir(dir).map_err(io_err(dir))?;
        }
        let cg = SessionCgroup::open(dirs)?;
        cg.apply(limits)?;
        Ok(cg)
    }

    /// Kills and removes every session cgroup left by an earlier run of this
    /// node; returns how many.
    pub async fn sweep(&self) -> usize {
        let mut names: Vec<String> = self
            .parent
            .roots()
            .iter()
            .flat_map(|dir| fs::read_dir(dir).into_iter().flatten().flatten())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        names.dedup();
        let mut removed = 0;
        for name in names {
            let dirs = self.parent.join(&name);
            match SessionCgroup::open(dirs) {
                Ok(cg) => match cg.destroy().await {
                    Ok(()) => removed += 1,
                    Err(e) => {
                        tracing::warn!(cgroup = %name, error = %e, "sweep could not remove a stale cgroup")
                    }
                },
                // Missing in one hierarchy (a crash during creation): remove what is there.
                Err(_) => {
                    for dir in self.parent.join(&name).roots() {
                        let _ = kill_loop(dir, None).await;
                        let _ = fs::remove_dir(dir);
                    }
                    removed += 1;
                }
            }
        }
        removed
    }
}

/// What the kernel counted for one session's cgroup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// CPU time of every process that ever ran in the cgroup, exited ones too.
    pub cpu_us: u64,
    /// Highest memory charged to the cgroup, in bytes.
    pub peak_mem: u64,
    /// Processes the kernel OOM-killed because the cgroup hit its memory limit.
    pub oom_kills: u64,
    /// Forks refused because the cgroup hit its process limit.
    pub forks_refused: u64,
    /// Most processes the cgroup had at once: the kernel's `pids.peak`
    /// where it keeps one, else how many there are now.
    pub peak_procs: u32,
}

/// One session's cgroup (a directory per hierarchy) and the open
/// `cgroup.procs` files its processes use to join it.
#[derive(Debug)]
pub struct SessionCgroup {
    dirs: Layout,
    procs: Vec<File>,
}

impl SessionCgroup {
    /// Lets the members of group `gid` (the session's own) read the
    /// cgroup's limits and counters, and no other session.
    pub fn readable_by(&self, gid: u32) -> Result<(), CgroupError> {
        for dir in self.dirs.roots() {
            std::os::unix::fs::chown(dir, None, Some(gid)).map_err(io_err(dir))?;
            fs::set_permissions(dir, Permissions::from_mode(0o750)).map_err(io_err(dir))?;
        }
        Ok(())
    }

    fn open(dirs: Layout) -> Result<Self, CgroupError> {
        let procs = dirs
            .roots()
            .into_iter()
            .map(|dir| {
                let path = dir.join("cgroup.procs");
                // Opened by root now: the kernel checks the opener's credentials
                // when a process that has already dropped to the session user
                // writes to it in pre_exec.
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(&path)
                    .map_err(io_err(&path))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { dirs, procs })
    }

    /// Sets the memory and process limits (an order's terms, before any of
    /// its programs runs).
    pub fn apply(&self, limits: CgroupLimits) -> Result<(), CgroupError> {
        let mem = limits.memory.to_string();
        let pids = limits.pids.to_string();
        match &self.dirs {
            Layout::V2 { root } => {
                write(&root.join("memory.max"), &mem)?;
                write_if_present(&root.join("memory.swap.max"), "0")?;
                // One OOM kill takes the whole session down, so the limit is not
                // a game of which process survives.
                write_if_present(&root.join("memory.oom.group"), "1")?;
                write(&root.join("pids.max"), &pids)?;
            }
            Layout::V1 {
                memory, pids: p, ..
            } => {
                write(&memory.join("memory.limit_in_bytes"), &mem)?;
                // memsw (memory + swap) exists only with swap accounting; without
                // it, swappiness 0 keeps the session out of swap.
                write_if_present(&memory.join("memory.memsw.limit_in_bytes"), &mem)?;
                write_if_present(&memory.join("memory.swappiness"), "0")?;
                write(&p.join("pids.max"), &pids)?;
            }
        }
        Ok(())
    }

    /// File descriptors a new process writes `0` (itself) to, one per hierarchy,
    /// to join the session's cgroup before it runs any user code.
    pub fn join_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// Reads the kernel's counters.
    pub fn counters(&self) -> Result<Counters, CgroupError> {
        match &self.dirs {
            Layout::V2 { root } => {
                let events = read(&root.join("memory.events"))?;
                Ok(Counters {
                    cpu_us: keyed(&root.join("cpu.stat"), "usage_usec")?,
                    peak_mem: read_u64(&root.join("memory.peak")).unwrap_or(0),
                    oom_kills: field(&events, "oom_kill").unwrap_or(0),
                    forks_refused: keyed(&root.join("pids.events"), "max")?,
                    peak_procs: procs(root)?,
                })
            }
            Layout::V1 {
                memory,
                pids,
                cpuacct,
                ..
            } => {
                let oom = read(&memory.join("memory.oom_control"))?;
                Ok(Counters {
                    cpu_us: read_u64(&cpuacct.join("cpuacct.usage"))? / 1000,
                    peak_mem: read_u64(&memory.join("memory.max_usage_in_bytes"))?,
                    oom_kills: field(&oom, "oom_kill").unwrap_or(0),
                    forks_refused: keyed(&pids.join("pids.events"), "max")?,
                    peak_procs: procs(pids)?,
                })
            }
        }
    }

    /// Kills every process in the cgroup (frozen first where the kernel needs it)
    /// and waits until none is left.
    pub async fn kill(&self) -> Result<(), CgroupError> {
        match &self.dirs {
            Layout::V2 { root } => kill_loop(root, None).await?,
            Layout::V1 {
                freezer, unified, ..
            } => match unified {
                Some(u) if u.join("cgroup.kill").exists() => kill_loop(u, None).await?,
                _ => kill_loop(freezer, Some(freezer)).await?,
            },
        }
        Ok(())
    }

    /// Kills everything inside, then removes the cgroup.
    pub async fn destroy(&self) -> Result<(), CgroupError> {
        self.kill().await?;
        for dir in self.dirs.roots() {
            // Killed processes leave the cgroup once the kernel has finished them
            // off; until then rmdir says EBUSY.
            let mut tries = 0;
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(_) if tries < 100 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => return Err(io_err(dir)(e)),
                }
            }
        }
        Ok(())
    }
}

/// Kills everything in `dir` until it is empty: with `cgroup.kill` where the
/// kernel has it (v2), else with SIGKILL to each listed process while the v1
/// `freezer` (when given) holds them all still, so none can fork meanwhile.
async fn kill_loop(dir: &Path, freezer: Option<&Path>) -> Result<(), CgroupError> {
    let procs = dir.join("cgroup.procs");
    let kill_file = dir.join("cgroup.kill");
    for _ in 0..250 {
        let pids = read(&procs)?;
        if pids.trim().is_empty() {
            if let Some(f) = freezer {
                write(&f.join("freezer.state"), "THAWED")?;
            }
            return Ok(());
        }
        if kill_file.exists() {
            write(&kill_file, "1")?;
        } else {
            if let Some(f) = freezer {
                write(&f.join("freezer.state"), "FROZEN")?;
            }
            for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: kill has no memory effects; a stale pid only yields ESRCH.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            // A frozen process dies only once thawed.
            if let Some(f) = freezer {
                write(&f.join("freezer.state"), "THAWED")?;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(CgroupError::Unkillable(dir.to_owned()))
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(io_err(path))
}

fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    read(path)?.trim().parse().map_err(|_| CgroupError::Parse {
        path: path.to_owned(),
    })
}

/// Most processes the pids controller at `dir` counted at once: its
/// `pids.peak` where the kernel keeps one, else the count now; at least the
/// limit once it refused a fork, which it does only at the limit.
fn procs(dir: &Path) -> Result<u32, CgroupError> {
    let peak = match read_u64(&dir.join("pids.peak")) {
        Ok(peak) => peak,
        Err(_) => read_u64(&dir.join("pids.current"))?,
    };
    let at_limit = if keyed(&dir.join("pids.events"), "max")? > 0 {
        read_u64(&dir.join("pids.max")).unwrap_or(0)
    } else {
        0
    };
    Ok(u32::try_from(peak.max(at_limit)).unwrap_or(u32::MAX))
}

/// The value of `key` in a flat-keyed file (`key value` lines).
fn keyed(path: &Path, key: &str) -> Result<u64, CgroupError> {
    field(&read(path)?, key).ok_or_else(|| CgroupError::Parse {
        path: path.to_owned(),
    })
}

fn field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_err(path))
}

fn write_if_present(path: &Path, value: &str) -> Result<(), CgroupError> {
    if path.exists() {
        write(path, value)?;
    }
    Ok(())
}

/// Joins the cgroups behind `fds` by writing `0` (the calling process) to each.
/// Runs between fork and exec, so only async-signal-safe calls.
pub fn join_in_child(fds: &[RawFd]) -> io::Result<()> {
    for &fd in fds {
        // SAFETY: write(2) on an open descriptor from a static buffer.
        if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
33 30 0:29 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
34 30 0:30 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer
35 30 0:31 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_uses_v1_controllers_and_unified_for_kill() {
        let layout = Layout::from_mountinfo(HYBRID, |_| String::new());
        assert_eq!(
            layout,
            Some(Layout::V1 {
                memory: "/sys/fs/cgroup/memory".into(),
                pids: "/sys/fs/cgroup/pids".into(),
                cpuacct: "/sys/fs/cgroup/cpu,cpuacct".into(),
                freezer: "/sys/fs/cgroup/freezer".into(),
                cpu: Some("/sys/fs/cgroup/cpu,cpuacct".into()),
                blkio: None,
                unified: Some("/sys/fs/cgroup/unified".into()),
            })
        );
    }

    #[test]
    fn pure_v2_needs_memory_and_pids() {
        let info = "35 30 0:31 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            Layout::from_mountinfo(info, |_| "cpuset cpu io memory pids\n".into()),
            Some(Layout::V2 {
                root: "/sys/fs/cgroup".into()
            })
        );
        assert_eq!(Layout::from_mountinfo(info, |_| "cpu io\n".into()), None);
    }

    #[test]
    fn flat_keyed_fields() {
        let events = "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n";
        assert_eq!(field(events, "oom_kill"), Some(1));
        assert_eq!(field(events, "max"), Some(3));
        assert_eq!(field(events, "nope"), None);
        assert_eq!(field("oom_kill x\n", "oom_kill"), None);
    }
}
