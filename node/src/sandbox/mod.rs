//! What isolates one session from the node and from other sessions: a fresh
//! unprivileged user, a cgroup with memory and process limits that also meters
//! CPU time, a home on its own size-limited disk image, outbound network rules,
//! and processes started with a clean environment, their own session id,
//! `no_new_privs` and umask 077.
//!
//! [`Host`] holds the node-wide parts (its cgroup parent, nftables table, data
//! directories) and makes, tears down and sweeps per-session [`Sandbox`]es.

pub mod cgroup;
pub mod cgroupfs;
pub mod disk;
pub mod netfilter;
pub mod process;
pub mod space;
pub mod user;

use std::path::PathBuf;

use cgroup::{CgroupLimits, Counters, NodeCgroups, SessionCgroup};
use disk::Disk;
use netfilter::{Netfilter, Policy};
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
    #[error("session uid range {0}..={1} is empty or reaches below 1000 (people's accounts)")]
    Ids(u32, u32),
}

/// One session's isolation: its user, cgroup and disk.
#[derive(Debug)]
pub struct Sandbox {
    pub user: SessionUser,
    /// None in development mode (not root).
    pub cgroup: Option<SessionCgroup>,
    pub disk: Option<Disk>,
}

impl Sandbox {
    /// The kernel's counters for the session, zeros without a cgroup.
    pub fn counters(&self) -> Result<Counters, cgroup::CgroupError> {
        self.cgroup
            .as_ref()
            .map_or(Ok(Counters::default()), SessionCgroup::counters)
    }

    /// Whether the session filled its disk.
    pub fn disk_full(&self) -> bool {
        self.disk.as_ref().is_some_and(Disk::full)
    }
}

/// Makes the session's private `/tmp` and `/dev/shm` directories in its home,
/// so they count against its disk.
async fn private_dirs(user: &SessionUser) -> Result<(), SandboxError> {
    for (dir, _) in process::PRIVATE_DIRS {
        let path = user.home.join(dir);
        user::create_private_dir(&path).await?;
        std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid))
            .map_err(|source| user::UserError::Home { path, source })?;
    }
    Ok(())
}

/// The node-wide parts of the sandbox.
#[derive(Debug)]
pub struct Host {
    homes: PathBuf,
    images: PathBuf,
    limits: SandboxLimits,
    ids: user::IdRange,
    /// None in development mode: the node is not root and isolates nothing.
    isolation: Option<(NodeCgroups, Netfilter)>,
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
        policy: Policy,
    ) -> Result<Self, SandboxError> {
        if ids.0 > ids.1 || ids.0 < 1000 {
            return Err(SandboxError::Ids(ids.0, ids.1));
        }
        let mount_dir = images.with_file_name("cgroup");
        let cgroups = NodeCgroups::new(cgroupfs::layout(&mount_dir).await?, tag)?;
        tracing::info!(layout = ?cgroups.layout(), "cgroups");
        let net = Netfilter::new(tag, policy);
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
        net.install().await?;
        Ok(Self {
            homes,
            images,
            limits,
            ids,
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
            ids: user::DEFAULT_IDS,
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
        let Some((cgroups, net)) = &self.isolation else {
            let user = SessionUser::create_dev(&self.homes).await?;
            return Ok(Sandbox {
                user,
                cgroup: None,
                disk: None,
            });
        };
        let with_disk = self.limits.disk > 0;
        let user = SessionUser::create(&self.homes, !with_disk, self.ids).await?;
        let mut sandbox = Sandbox {
            user,
            cgroup: None,
            disk: None,
        };
        let made = async {
            // Kept at once, so that a failure below still removes it.
            let cgroup = sandbox
                .cgroup
                .insert(cgroups.create(&sandbox.user.name, self.limits.cgroup)?);
            cgroup.readable_by(sandbox.user.gid)?;
            if with_disk {
                let u = &sandbox.user;
                let image = self.images.join(format!("{}.img", u.name));
                sandbox.disk = Some(
                    Disk::create(image, u.home.clone(), self.limits.disk, u.uid, u.gid).await?,
                );
            }
            private_dirs(&sandbox.user).await?;
            net.add_user(sandbox.user.uid).await?;
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

    /// Kills everything of a session and removes its cgroup, disk, user and
    /// rules. Logs what fails and carries on, so one stuck part does not keep the
    /// others behind.
    pub async fn teardown(&self, sandbox: &Sandbox) {
        if let Some(cg) = &sandbox.cgroup
            && let Err(e) = cg.destroy().await
        {
            tracing::error!(error = %e, "removing a session cgroup failed");
        }
        if let Some(disk) = &sandbox.disk
            && let Err(e) = disk.remove().await
        {
            tracing::error!(error = %e, "removing a session disk failed");
        }
        if let Err(e) = sandbox.user.remove().await {
            tracing::error!(error = %e, "removing a session user failed");
        }
        if let Some((_, net)) = &self.isolation
            && !sandbox.user.shared_dev_user
            && let Err(e) = net.remove_user(sandbox.user.uid).await
        {
            tracing::error!(error = %e, "removing a session's network rules failed");
        }
    }

    /// Removes the node-wide parts (after every sandbox was torn down).
    pub async fn stop(&self) {
        if let Some((cgroups, net)) = &self.isolation {
            cgroups.remove();
            if let Err(e) = net.remove().await {
                tracing::error!(error = %e, "removing the nftables table failed");
            }
        }
    }
}
