//! Session disks: a sparse ext4 image per slot, mounted over a loop device as the
//! session's home, so the kernel enforces the disk limit (ENOSPC) and teardown is
//! an unmount and a file deletion. Swept by path after a crash.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

/// A disk could not be made, mounted or removed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("running {cmd}: {source}")]
    Spawn {
        cmd: &'static str,
        source: io::Error,
    },
    #[error("{cmd} {path} failed: {stderr}")]
    Failed {
        cmd: &'static str,
        path: PathBuf,
        stderr: String,
    },
}

/// A session's home disk: its image file and where it is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub image: PathBuf,
    pub mount: PathBuf,
}

impl Disk {
    /// Makes a sparse ext4 image of `size` bytes and mounts it on `mount` (created
    /// here), owned by `uid:gid` with mode 0700.
    pub async fn create(
        image: PathBuf,
        mount: PathBuf,
        size: u64,
        uid: u32,
        gid: u32,
    ) -> Result<Self, DiskError> {
        let disk = Self { image, mount };
        if let Err(e) = disk.make(size, uid, gid).await {
            let _ = disk.remove().await;
            return Err(e);
        }
        Ok(disk)
    }

    async fn make(&self, size: u64, uid: u32, gid: u32) -> Result<(), DiskError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| DiskError::Io { path, source }
        };
        // The image holds the session's files: readable by the node only,
        // whatever the umask (debugfs reads any file of a readable image).
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(crate::state::FILE)
            .open(&self.image)
            .await
            .map_err(io(&self.image))?;
        // Sparse: blocks are only allocated as the session writes.
        file.set_len(size).await.map_err(io(&self.image))?;
        drop(file);
        // No blocks reserved for root: the session may use all of it. Lazy
        // initialisation keeps mkfs fast on a large sparse image.
        run(
            "mkfs.ext4",
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0", "-E"])
                .arg("lazy_itable_init=1,lazy_journal_init=1,nodiscard")
                .arg(&self.image),
            &self.image,
        )
        .await?;
        tokio::fs::create_dir_all(&self.mount)
            .await
            .map_err(io(&self.mount))?;
        // `loop` with autoclear: unmounting also frees the loop device.
        run(
            "mount",
            Command::new("mount")
                .args(["-t", "ext4", "-o", "loop,nodev,nosuid,noatime"])
                .arg(&self.image)
                .arg(&self.mount),
            &self.mount,
        )
        .await?;
        let lost = self.mount.join("lost+found");
        let _ = tokio::fs::remove_dir(&lost).await;
        std::os::unix::fs::chown(&self.mount, Some(uid), Some(gid)).map_err(io(&self.mount))?;
        use std::os::unix::fs::PermissionsExt;
        tokio::fs::set_permissions(&self.mount, std::fs::Permissions::from_mode(0o700))
            .await
            .map_err(io(&self.mount))
    }

    /// How full the session's disk is: whether it has (almost) no space or
    /// inodes left (it hit the disk limit), and the bytes in use. Reads the
    /// file system's own counters (statvfs); `None` when it cannot.
    pub fn usage(&self) -> Option<DiskUsage> {
        let st = nix::sys::statvfs::statvfs(&self.mount).ok()?;
        let avail = st.blocks_available().saturating_mul(st.fragment_size());
        let used = st
            .blocks()
            .saturating_sub(st.blocks_free())
            .saturating_mul(st.fragment_size());
        Some(DiskUsage {
            // ext4 keeps a little room for its own metadata; a session that
            // has less than 1 MiB (or no inode) left has run into the limit.
            full: avail < 1 << 20 || st.files_available() == 0,
            used,
        })
    }

    /// Unmounts (freeing the loop device) and deletes the image and mount point.
    pub async fn remove(&self) -> Result<(), DiskError> {
        if is_mounted(&self.mount) {
            unmount(&self.mount).await?;
        }
        for (path, res) in [
            (&self.image, tokio::fs::remove_file(&self.image).await),
            (&self.mount, tokio::fs::remove_dir(&self.mount).await),
        ] {
            if let Err(source) = res
                && source.kind() != io::ErrorKind::NotFound
            {
                return Err(DiskError::Io {
                    path: path.clone(),
                    source,
                });
            }
        }
        Ok(())
    }
}

/// How full a session's disk is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskUsage {
    pub full: bool,
    /// Bytes in use, the file system's own included.
    pub used: u64,
}

/// Unmounts everything mounted under `homes`, detaches loop devices backed by
/// files in `images`, and deletes those images: leftovers of a crash. Returns
/// how many images were removed.
pub async fn sweep(homes: &Path, images: &Path) -> usize {
    for mount in mounts_under(homes) {
        if let Err(e) = unmount(&mount).await {
            tracing::warn!(mount = %mount.display(), error = %e, "sweep could not unmount");
        }
    }
    for dev in loops_backed_in(images) {
        let _ = run("losetup", Command::new("losetup").arg("-d").arg(&dev), &dev).await;
    }
    let mut removed = 0;
    if let Ok(mut dir) = tokio::fs::read_dir(images).await {
        while let Ok(Some(e)) = dir.next_entry().await {
            if tokio::fs::remove_file(e.path()).await.is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

async fn unmount(mount: &Path) -> Result<(), DiskError> {
    let plain = run("umount", Command::new("umount").arg(mount), mount).await;
    if plain.is_ok() {
        return Ok(());
    }
    // Something outside the session still holds a file open: detach now; the
    // kernel frees the loop device when the last reference goes.
    run("umount", Command::new("umount").arg("-l").arg(mount), mount).await
}

fn is_mounted(path: &Path) -> bool {
    mounts_under(path).iter().any(|m| m == path)
}

/// Mount points at or below `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = mount_points(&text)
        .into_iter()
        .filter(|m| m.starts_with(dir))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found
}

fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape(m)))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let mut bytes = field.bytes();
    while let Some(b) = bytes.next() {
        if b == b'\\' {
            let digits: Vec<u8> = bytes.clone().take(3).collect();
            if let Ok(s) = std::str::from_utf8(&digits)
                && let Ok(v) = u8::from_str_radix(s, 8)
                && digits.len() == 3
            {
                out.push(v);
                bytes.nth(2);
                continue;
            }
        }
        out.push(b);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `/dev/loopN` devices whose backing file is in `images`.
fn loops_backed_in(images: &Path) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            let backing = Path::new(backing.trim().trim_end_matches(" (deleted)"));
            backing
                .starts_with(images)
                .then(|| Path::new("/dev").join(name))
        })
        .collect()
}

async fn run(cmd: &'static str, command: &mut Command, path: &Path) -> Result<(), DiskError> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| DiskError::Spawn { cmd, source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(DiskError::Failed {
            cmd,
            path: path.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_unescaped() {
        let info = "40 30 7:0 / /var/lib/jusy\\040node/homes/jsu1 rw - ext4 /dev/loop0 rw\n";
        assert_eq!(
            mount_points(info),
            vec![PathBuf::from("/var/lib/jusy node/homes/jsu1")]
        );
        assert_eq!(unescape("a\\134b\\04"), "a\\b\\04");
    }
}
