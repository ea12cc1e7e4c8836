//! Private state on disk, for the node and the broker alike: everything they
//! create is readable by their own user only (umask 077), and an install made
//! with looser modes is repaired when it starts.
//!
//! Sessions run as other users on the same machine. A key, a database or
//! another session's disk image that they could read would give them the
//! node's identity, the broker's books or another client's files.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of a private directory.
pub const DIR: u32 = 0o700;
/// Mode of a private file: keys, databases, disk images.
pub const FILE: u32 = 0o600;
/// Mode of a directory others may pass through to reach what is theirs below
/// it, but not list: the node's data directory and its `homes/`, above each
/// session's home.
pub const TRAVERSE: u32 = 0o711;

/// A mode could not be read or repaired.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct RepairError {
    pub path: PathBuf,
    pub source: io::Error,
}

/// Makes every file and directory this process creates from now on private to
/// its user, whatever the umask it was started with. Call first in `main`,
/// before any thread starts (the umask is process-wide).
pub fn private_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// Creates `dir` and any missing parents with mode [`TRAVERSE`], whatever the
/// umask: session users must pass through each of them to reach their homes
/// below. Existing directories keep their modes.
pub fn create_traversable(dir: &Path) -> io::Result<()> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    for d in missing.into_iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => std::fs::set_permissions(d, std::fs::Permissions::from_mode(TRAVERSE))?,
            // Made meanwhile by someone else: theirs to keep as they made it.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The modes one data directory should have.
#[derive(Clone, Copy, Debug)]
pub struct Tree<'a> {
    pub root: &'a Path,
    /// Directories that get [`TRAVERSE`] instead of [`DIR`].
    pub traverse: &'a [&'a Path],
    /// Directories whose entries are not this process's to judge (session
    /// homes, each owned and kept by its session): their own mode is
    /// repaired, their contents are left alone.
    pub opaque: &'a [&'a Path],
}

impl Tree<'_> {
    /// Gives every directory under the root [`DIR`] (or [`TRAVERSE`]) and
    /// every regular file [`FILE`], and returns how many paths it changed.
    /// Symbolic links are not followed, and other file systems mounted inside
    /// (session disks, cgroup hierarchies) are not entered. A root that does
    /// not exist yet needs no repair.
    pub fn repair(&self) -> Result<usize, RepairError> {
        let err = |path: &Path| {
            let path = path.to_owned();
            move |source| RepairError { path, source }
        };
        let root = match std::fs::symlink_metadata(self.root) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(err(self.root)(e)),
        };
        let mut repaired = 0;
        let mut pending = vec![(self.root.to_owned(), root.clone())];
        while let Some((path, meta)) = pending.pop() {
            let want = if meta.is_dir() {
                if self.traverse.contains(&path.as_path()) {
                    TRAVERSE
                } else {
                    DIR
                }
            } else if meta.is_file() {
                FILE
            } else {
                // Symbolic links have no mode of their own; sockets and
                // pipes are made with theirs by whoever binds them.
                continue;
            };
            if meta.mode() & 0o7777 != want {
                match std::fs::set_permissions(&path, std::fs::Permissions::from_mode(want)) {
                    Ok(()) => repaired += 1,
                    // Removed meanwhile (a session ending): nothing to repair.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(err(&path)(e)),
                }
            }
            if !meta.is_dir() || self.opaque.contains(&path.as_path()) {
                continue;
            }
            let entries = match std::fs::read_dir(&path) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(err(&path)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(err(&path))?;
                let child = entry.path();
                let meta = match std::fs::symlink_metadata(&child) {
                    Ok(m) => m,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(err(&child)(e)),
                };
                if meta.dev() == root.dev() {
                    pending.push((child, meta));
                }
            }
        }
        Ok(repaired)
    }
}

/// Repairs `tree` and logs one line when anything was changed.
pub fn repair_logged(tree: Tree<'_>) -> Result<usize, RepairError> {
    let repaired = tree.repair()?;
    if repaired > 0 {
        tracing::info!(
            paths = repaired,
            dir = %tree.root.display(),
            "repaired permissions that let others in: files are now 0600, directories 0700 \
             (0711 where sessions pass through to their homes)"
        );
    }
    Ok(repaired)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).expect("stat").mode() & 0o7777
    }

    #[test]
    fn loose_modes_are_repaired_and_session_homes_left_alone() {
        let root = std::env::temp_dir().join(format!("jusy-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let homes = root.join("homes");
        let home = homes.join("jsu1");
        let disks = root.join("disks");
        for d in [&home, &disks] {
            std::fs::create_dir_all(d).expect("dirs");
        }
        let set = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod");
        };
        let key = root.join("node.key");
        let image = disks.join("jsu1.img");
        let own = home.join("notes");
        for f in [&key, &image, &own] {
            std::fs::write(f, b"x").expect("file");
            set(f, 0o644);
        }
        std::os::unix::fs::symlink(&key, root.join("link")).expect("symlink");
        for d in [&root, &homes, &disks] {
            set(d, 0o755);
        }
        set(&home, 0o755);
        let tree = Tree {
            root: &root,
            traverse: &[&root, &homes],
            opaque: &[&homes],
        };
        // root, homes, disks, key, image: the home's contents are the session's.
        assert_eq!(tree.repair().expect("repair"), 5);
        assert_eq!(mode(&root), TRAVERSE);
        assert_eq!(mode(&homes), TRAVERSE);
        assert_eq!(mode(&disks), DIR);
        assert_eq!(mode(&key), FILE);
        assert_eq!(mode(&image), FILE);
        assert_eq!(mode(&home), 0o755);
        assert_eq!(mode(&own), 0o644);
        assert_eq!(tree.repair().expect("again"), 0, "nothing left to repair");
        let deep = root.join("a/b");
        create_traversable(&deep).expect("create");
        assert_eq!(mode(&root.join("a")), TRAVERSE);
        assert_eq!(mode(&deep), TRAVERSE);
        assert_eq!(
            mode(&root),
            TRAVERSE,
            "existing directories keep their mode"
        );
        let missing = root.join("missing");
        let none = Tree {
            root: &missing,
            traverse: &[],
            opaque: &[],
        };
        assert_eq!(none.repair().expect("no root"), 0);
        let _ = std::fs::remove_dir_all(&root);
    }
}
