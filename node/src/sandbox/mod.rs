//! What isolates one session from the node and from other sessions: a fresh
//! unprivileged user, a cgroup with memory and process limits that also meters
//! CPU time, a home on its own size-limited disk image, a network namespace of
//! its own behind the node's rules ([`network`]),
//! and an init ([`init`]) in namespaces of the session's own (pid, ipc, mount,
//! uts) that starts every program with a clean environment, its own
//! session id, `no_new_privs` and umask 077, with private directories over the
//! host's world-writable ones ([`shared_dirs`]).
//!
//! [`Host`] holds the node-wide parts (its cgroup parent, nftables table, data
//! directories) and makes, tears down and sweeps per-session [`Sandbox`]es.

pub mod cgroup;
pub mod cgroupfs;
pub mod disk;
pub mod dns;
mod forwarding;
pub mod init;
pub mod netfilter;
pub mod network;
pub mod process;
pub mod seccomp;
pub mod shared_dirs;
pub mod space;
pub mod uids;
pub mod user;
mod weights;

use std::path::{Path, PathBuf};

use cgroup::{CgroupLimits, Counters, NodeCgroups, SessionCgroup};
use disk::Disk;
use init::{InitConfig, SessionInit};
use network::{HostNet, NetConfig, SessionNet};
use uids::Uids;
use user::SessionUser;

/// Limits every session gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SandboxLimits {
    pub cgroup: CgroupLimits,
    /// Size of the home disk image in bytes; 0 keeps homes on the node's disk.
    pub disk: u64,
}

/// Preparing or removing a sandbox failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    User(#[from] user::UserError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Disk(#[from] disk::DiskError),
    #[error(transparent)]
    Net(#[from] netfilter::NetError),
    #[error(transparent)]
    Network(#[from] network::NetworkError),
    #[error(transparent)]
    Init(#[from] init::InitError),
    #[error(transparent)]
    Uid(#[from] uids::UidError),
    #[error("session uid range {0}..={1} is empty or reaches below 1000 (people's accounts)")]
    Ids(u32, u32),
}

/// One session's isolation: its user, cgroup, disk and init.
#[derive(Debug)]
pub struct Sandbox {
    pub user: SessionUser,
    /// None in development mode (not root).
    pub cgroup: Option<SessionCgroup>,
    pub disk: Option<Disk>,
    /// None only while the sandbox is being made.
    pub init: Option<SessionInit>,
    /// The session's own network once [`Host::attach_network`] made it; taken
    /// out at teardown.
    pub net: std::sync::Mutex<Option<SessionNet>>,
}

impl Sandbox {
    /// The kernel's counters for the session, zeros without a cgroup.
    pub fn counters(&self) -> Result<Counters, cgroup::CgroupError> {
        self.cgroup
            .as_ref()
            .map_or(Ok(Counters::default()), SessionCgroup::counters)
    }

    /// Bytes through the session's network link so far; None without one
    /// (development mode, or before it is attached) or when the counters
    /// could not be read.
    pub async fn traffic(&self) -> Option<network::Traffic> {
        let link = lock_net(&self.net).as_ref().map(|n| n.link().to_owned())?;
        network::link_traffic(&link)
            .await
            .inspect_err(|e| tracing::warn!(error = %e, "reading a session's traffic failed"))
            .ok()
    }

    /// How full the session's disk is; `None` without one (or unreadable).
    pub fn disk_usage(&self) -> Option<disk::DiskUsage> {
        self.disk.as_ref().and_then(Disk::usage)
    }

    /// Sets the session's memory and process limits to an order's terms
    /// (one more process than the terms: the session's init).
    pub fn apply_terms(
        &self,
        terms: &jusy_common::terms::OrderTerms,
    ) -> Result<(), cgroup::CgroupError> {
        let Some(cgroup) = &self.cgroup else {
            return Ok(());
        };
        cgroup.apply(CgroupLimits {
            memory: terms.memory_bytes(),
            pids: terms.max_processes.saturating_add(1),
        })
    }
}

fn lock_net(
    m: &std::sync::Mutex<Option<SessionNet>>,
) -> std::sync::MutexGuard<'_, Option<SessionNet>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The node's own binary, which is also every session's init.
const INIT_EXE: &str = "/proc/self/exe";

/// Where a session keeps what the node made for it inside its home: root's,
/// so the session can use but not remove it.
const STATE_DIR: &str = ".jusy";

/// Makes the session's private directories (one per world-writable host
/// directory in `covered`, on its disk so they count against it) and returns
/// what the init binds where.
fn private_dirs(home: &Path, covered: &[PathBuf]) -> Result<Vec<(PathBuf, PathBuf)>, SandboxError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let state = home.join(STATE_DIR);
    let made = |path: &Path, mode: u32| {
        let err = |source| user::UserError::Home {
            path: path.to_owned(),
            source,
        };
        std::fs::DirBuilder::new()
            .mode(mode)
            .create(path)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(err(e))
                }
            })?;
        // The mode is set again: the node's umask narrowed it at creation.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)
    };
    made(&state, 0o755)?;
    let mut binds = Vec::with_capacity(covered.len());
    for target in covered {
        let source = state.join(shared_dirs::private_name(target));
        // Like the host's: anyone (in the session, only its user) may write,
        // only the owner of a file may remove it.
        made(&source, 0o1777)?;
        binds.push((source, target.clone()));
    }
    Ok(binds)
}

/// A new session user with the next uid. Another node on the machine with an
/// overlapping range may take a uid between our choice and useradd; the next
/// free one is then as good.
async fn create_user(
    homes: &Path,
    create_home: bool,
    uids: &Uids,
) -> Result<SessionUser, SandboxError> {
    let mut tries = 0;
    loop {
        match SessionUser::create(homes, create_home, uids.next().await?).await {
            Err(user::UserError::UidTaken(uid)) if tries < 20 => {
                tracing::info!(uid, "uid taken meanwhile, trying the next");
                tries += 1;
            }
            made => return Ok(made?),
        }
    }
}

/// The node-wide parts of the sandbox.
#[derive(Debug)]
pub struct Host {
    homes: PathBuf,
    images: PathBuf,
    limits: SandboxLimits,
    /// The host's world-writable directories, private in every session.
    covered: Vec<PathBuf>,
    /// The uid each new session user gets; None in development mode.
    uids: Option<Uids>,
    /// None in development mode: the node is not root and isolates nothing.
    isolation: Option<(NodeCgroups, HostNet)>,
}

impl Host {
    /// Sets up this node's cgroup parent and nftables table after sweeping what
    /// an earlier run left behind. `tag` names this node (unique per machine).
    pub async fn start(
        homes: PathBuf,
        images: PathBuf,
        tag: &str,
        limits: SandboxLimits,
        ids: user::IdRange,
        net: &NetConfig,
    ) -> Result<Self, SandboxError> {
        if ids.0 > ids.1 || ids.0 < 1000 {
            return Err(SandboxError::Ids(ids.0, ids.1));
        }
        let mount_dir = images.with_file_name("cgroup");
        let cgroups = NodeCgroups::new(cgroupfs::layout(&mount_dir).await?, tag)?;
        tracing::info!(layout = ?cgroups.layout(), "cgroups");
        // Order matters: processes die with their cgroups first, so that disks
        // can be unmounted and users deleted.
        let cgs = cgroups.sweep().await;
        let images_swept = disk::sweep(&homes, &images).await;
        let users = user::sweep(&homes, ids).await;
        if cgs + images_swept + users > 0 {
            tracing::info!(
                cgroups = cgs,
                disks = images_swept,
                users,
                "removed sessions left by an earlier run"
            );
        }
        let net = async {
            // Images hold the sessions' files: only the node may list or read them.
            tokio::fs::DirBuilder::new()
                .recursive(true)
                .mode(crate::state::DIR)
                .create(&images)
                .await
                .map_err(|source| disk::DiskError::Io {
                    path: images.clone(),
                    source,
                })?;
            Ok::<_, SandboxError>(HostNet::start(tag, net).await?)
        }
        .await;
        // A node that cannot start leaves no cgroup of its own behind.
        let net = net.inspect_err(|_| cgroups.remove())?;
        let data_dir = homes.parent().unwrap_or(&homes).to_owned();
        let covered = tokio::task::spawn_blocking(move || shared_dirs::find(&data_dir))
            .await
            .unwrap_or_default();
        tracing::info!(dirs = ?covered, "world-writable directories private to each session");
        // Beside the homes, in the node's data directory.
        let uids = Uids::open(homes.with_file_name("uid-cursor"), ids).await;
        Ok(Self {
            homes,
            images,
            limits,
            covered,
            uids: Some(uids),
            isolation: Some((cgroups, net)),
        })
    }

    /// Development mode: fresh homes for the node's own user, nothing isolated.
    pub fn dev(homes: PathBuf) -> Self {
        Self {
            images: homes.clone(),
            homes,
            limits: SandboxLimits {
                cgroup: CgroupLimits { memory: 0, pids: 0 },
                disk: 0,
            },
            covered: Vec::new(),
            uids: None,
            isolation: None,
        }
    }

    /// Room on the data file system for more session disks, keeping `reserve`
    /// bytes free; `None` when sessions have no disk of their own.
    pub fn disk_room(&self, reserve: u64) -> Option<Result<space::Room, space::SpaceError>> {
        (self.isolation.is_some() && self.limits.disk > 0)
            .then(|| space::measure(&self.images, self.limits.disk, reserve))
    }

    /// Prepares one session's sandbox; on failure removes what was made.
    pub async fn prepare(&self) -> Result<Sandbox, SandboxError> {
        let (Some((cgroups, net)), Some(uids)) = (&self.isolation, &self.uids) else {
            let user = SessionUser::create_dev(&self.homes).await?;
            let mut sandbox = Sandbox {
                user,
                cgroup: None,
                disk: None,
                init: None,
                net: std::sync::Mutex::new(None),
            };
            return match SessionInit::start(
                Path::new(INIT_EXE),
                &self.init_config(&sandbox.user, false, Vec::new()),
                Vec::new(),
            )
            .await
            {
                Ok(init) => {
                    sandbox.init = Some(init);
                    Ok(sandbox)
                }
                Err(e) => {
                    self.teardown(&sandbox).await;
                    Err(e.into())
                }
            };
        };
        let with_disk = self.limits.disk > 0;
        let user = create_user(&self.homes, !with_disk, uids).await?;
        let mut sandbox = Sandbox {
            user,
            cgroup: None,
            disk: None,
            init: None,
            net: std::sync::Mutex::new(None),
        };
        let made = async {
            // One more process than the session's limit: its init. Kept at
            // once, so that a failure below still removes it.
            let mut limits = self.limits.cgroup;
            limits.pids = limits.pids.saturating_add(1);
            let cgroup = sandbox
                .cgroup
                .insert(cgroups.create(&sandbox.user.name, limits)?);
            cgroup.readable_by(sandbox.user.gid)?;
            if with_disk {
                let u = &sandbox.user;
                let image = self.images.join(format!("{}.img", u.name));
                sandbox.disk = Some(
                    Disk::create(image, u.home.clone(), self.limits.disk, u.uid, u.gid).await?,
                );
            }
            let binds = private_dirs(&sandbox.user.home, &self.covered)?;
            // Bound over /etc/resolv.conf by the init; filled in (the same
            // file, so the bind shows it) once the network is attached.
            let resolv = sandbox.user.home.join(STATE_DIR).join("resolv.conf");
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::write(&resolv, b"")
                    .and_then(|()| {
                        std::fs::set_permissions(&resolv, std::fs::Permissions::from_mode(0o644))
                    })
                    .map_err(|source| user::UserError::Home {
                        path: resolv.clone(),
                        source,
                    })?;
            }
            let join = sandbox
                .cgroup
                .as_ref()
                .map(SessionCgroup::join_fds)
                .unwrap_or_default();
            sandbox.init = Some(
                SessionInit::start(
                    Path::new(INIT_EXE),
                    &InitConfig {
                        resolv_conf: Some(resolv.clone()),
                        net_namespace: true,
                        ..self.init_config(&sandbox.user, true, binds)
                    },
                    join,
                )
                .await?,
            );
            let pid = sandbox
                .init
                .as_ref()
                .map(SessionInit::pid)
                .unwrap_or_default();
            let session = net.attach(pid).await?;
            let text = session.resolv_conf();
            *lock_net(&sandbox.net) = Some(session);
            std::fs::write(&resolv, text).map_err(|source| user::UserError::Home {
                path: resolv.clone(),
                source,
            })?;
            Ok::<_, SandboxError>(())
        }
        .await;
        match made {
            Ok(()) => Ok(sandbox),
            Err(e) => {
                self.teardown(&sandbox).await;
                Err(e)
            }
        }
    }

    fn init_config(
        &self,
        user: &SessionUser,
        isolate: bool,
        binds: Vec<(PathBuf, PathBuf)>,
    ) -> InitConfig {
        InitConfig {
            isolate,
            net_namespace: false,
            uid: user.uid,
            gid: user.gid,
            home: user.home.clone(),
            hostname: user.name.clone(),
            binds,
            resolv_conf: None,
        }
    }

    /// Kills everything of a session and removes its cgroup, network, disk
    /// and user. Logs what fails and carries on, so one stuck part does not keep the
    /// others behind.
    pub async fn teardown(&self, sandbox: &Sandbox) {
        if let Some(init) = &sandbox.init {
            init.kill().await;
        }
        if let Some(cg) = &sandbox.cgroup
            && let Err(e) = cg.destroy().await
        {
            tracing::error!(error = %e, "removing a session cgroup failed");
        }
        let session_net = lock_net(&sandbox.net).take();
        if let (Some((_, net)), Some(session_net)) = (&self.isolation, session_net)
            && let Err(e) = net.detach(session_net).await
        {
            tracing::error!(error = %e, "removing a session's network failed");
        }
        if let Some(disk) = &sandbox.disk
            && let Err(e) = disk.remove().await
        {
            tracing::error!(error = %e, "removing a session disk failed");
        }
        if let Err(e) = sandbox.user.remove().await {
            tracing::error!(error = %e, "removing a session user failed");
        }
    }

    /// The node's session networking; None in development mode.
    pub fn network(&self) -> Option<&HostNet> {
        self.isolation.as_ref().map(|(_, net)| net)
    }

    /// Removes the node-wide parts (after every sandbox was torn down).
    pub async fn stop(&self) {
        if let Some((cgroups, net)) = &self.isolation {
            cgroups.remove();
            net.stop().await;
        }
    }
}
