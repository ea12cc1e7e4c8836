//! Which uid a new session user gets: the next one of the node's range after
//! the last one handed out, skipping those `/etc/passwd` or `/etc/group` hold,
//! wrapping around at the end of the range. The position is kept in a small
//! file of the data directory, so a restarted node carries on where it was.
//!
//! A uid is never given to a new client until the whole range has gone round:
//! whatever the kernel or a file system still keys by an earlier client's uid
//! (a file it left somewhere, a keyring, a pending signal) cannot become the
//! next client's.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::user::IdRange;

/// Choosing or recording a uid failed.
#[derive(Debug, thiserror::Error)]
pub enum UidError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("saving the uid cursor {path}: {source}")]
    Save { path: PathBuf, source: io::Error },
    #[error("every uid of {0}..={1} is in use")]
    Exhausted(u32, u32),
}

/// The node's uid cursor: the next uid to try, and where it is saved.
#[derive(Debug)]
pub struct Uids {
    path: PathBuf,
    range: IdRange,
    next: Mutex<u32>,
}

impl Uids {
    /// Loads the cursor saved at `path`. A node without one, or with a corrupt
    /// one, starts at a random point: the bottom may be where the uids of the
    /// last clients are, and nodes sharing a machine (and a range) that all
    /// started at the bottom would race each other for every uid.
    pub async fn open(path: PathBuf, range: IdRange) -> Self {
        let next = match tokio::fs::read_to_string(&path).await {
            Ok(text) => match text.trim().parse::<u32>() {
                Ok(n) if in_range(range, n) => n,
                Ok(n) => {
                    tracing::info!(
                        cursor = n,
                        ?range,
                        "uid cursor outside the configured range: starting at its bottom"
                    );
                    range.0
                }
                Err(_) => {
                    let n = random_in(range);
                    tracing::warn!(path = %path.display(), start = n, "corrupt uid cursor: starting at a random uid");
                    n
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => random_in(range),
            Err(e) => {
                let n = random_in(range);
                tracing::warn!(path = %path.display(), error = %e, start = n, "unreadable uid cursor: starting at a random uid");
                n
            }
        };
        Self {
            path,
            range,
            next: Mutex::new(next),
        }
    }

    /// The uid (and gid) for a new session user. The cursor is saved before
    /// the uid is returned, so a crash right after cannot hand it out twice.
    pub async fn next(&self) -> Result<u32, UidError> {
        let mut next = self.next.lock().await;
        let passwd = read("/etc/passwd").await?;
        let group = read("/etc/group").await?;
        let taken = taken_ids(&passwd, &group);
        let uid = choose(self.range, *next, |id| taken.contains(&id))
            .ok_or(UidError::Exhausted(self.range.0, self.range.1))?;
        let after = successor(self.range, uid);
        save(&self.path, after).await?;
        *next = after;
        Ok(uid)
    }
}

async fn read(path: &str) -> Result<String, UidError> {
    tokio::fs::read_to_string(path)
        .await
        .map_err(|source| UidError::Read {
            path: path.into(),
            source,
        })
}

/// Writes the cursor to a temporary file (0600) and renames it over `path`, so
/// a crash leaves the old cursor or the new one, never half of one.
async fn save(path: &Path, next: u32) -> Result<(), UidError> {
    let err = |source| UidError::Save {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .await
        .map_err(err)?;
    file.write_all(format!("{next}\n").as_bytes())
        .await
        .map_err(err)?;
    file.sync_all().await.map_err(err)?;
    tokio::fs::rename(&tmp, path).await.map_err(err)
}

fn in_range(range: IdRange, id: u32) -> bool {
    (range.0..=range.1).contains(&id)
}

/// The uid after `id`, back to the bottom after the top.
fn successor(range: IdRange, id: u32) -> u32 {
    if id >= range.1 { range.0 } else { id + 1 }
}

/// The first id of `range` that is not `taken`, trying `start` first and going
/// up, round past the top to the bottom; None when all are taken.
fn choose(range: IdRange, start: u32, taken: impl Fn(u32) -> bool) -> Option<u32> {
    let start = if in_range(range, start) {
        start
    } else {
        range.0
    };
    (start..=range.1)
        .chain(range.0..start)
        .find(|&id| !taken(id))
}

/// Every uid of `passwd` and gid of `group`: a session user's uid is also its
/// group's gid, so both must be free.
fn taken_ids(passwd: &str, group: &str) -> HashSet<u32> {
    [passwd, group]
        .iter()
        .flat_map(|text| text.lines())
        .filter_map(|line| line.split(':').nth(2)?.parse().ok())
        .collect()
}

/// A uniformly random id of `range`, for a start that follows no pattern.
fn random_in(range: IdRange) -> u32 {
    let mut buf = [0u8; 8];
    // Without the OS random source, the bottom of the range is as good as any.
    if getrandom::fill(&mut buf).is_err() {
        return range.0;
    }
    let span = u64::from(range.1.saturating_sub(range.0)) + 1;
    let offset = u64::from_le_bytes(buf) % span;
    range
        .0
        .saturating_add(u32::try_from(offset).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    // Test code: a panic is how a check fails.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const RANGE: IdRange = (610_000, 610_004);

    #[test]
    fn choice_starts_at_the_cursor_skips_taken_and_wraps() {
        let none = |_| false;
        assert_eq!(choose(RANGE, 610_002, none), Some(610_002));
        let taken = |id| id == 610_002 || id == 610_003;
        assert_eq!(choose(RANGE, 610_002, taken), Some(610_004));
        let top_taken = |id| id >= 610_003;
        assert_eq!(choose(RANGE, 610_003, top_taken), Some(610_000));
        assert_eq!(choose(RANGE, 1, none), Some(610_000));
        assert_eq!(choose(RANGE, 610_000, |_| true), None);
    }

    #[test]
    fn successive_users_never_get_a_freed_uid_before_the_range_wraps() {
        // Each session ends (its uid is free again) before the next one starts:
        // the lowest free uid would be the same each time; the cursor is not.
        let mut next = RANGE.0;
        let mut given = Vec::new();
        for _ in 0..7 {
            let uid = choose(RANGE, next, |_| false).unwrap();
            given.push(uid);
            next = successor(RANGE, uid);
        }
        assert_eq!(
            given,
            [
                610_000, 610_001, 610_002, 610_003, 610_004, 610_000, 610_001
            ]
        );
    }

    #[test]
    fn uids_and_gids_both_count_as_taken() {
        let passwd =
            "root:x:0:0:root:/root:/bin/bash\nbad line\njsu1:x:610000:610000::/h:/bin/sh\n";
        let group = "root:x:0:\nodd:x:610001:\n";
        let taken = taken_ids(passwd, group);
        assert_eq!(taken, HashSet::from([0, 610_000, 610_001]));
    }

    #[test]
    fn random_start_stays_in_range() {
        for _ in 0..100 {
            assert!(in_range(RANGE, random_in(RANGE)));
        }
        assert_eq!(random_in((7, 7)), 7);
    }

    #[tokio::test]
    async fn cursor_survives_a_restart_and_a_corrupt_file_starts_anywhere() {
        let dir = std::env::temp_dir().join(format!("jusy-uids-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("uid-cursor");
        let range = (4_000_000_000, 4_000_000_009);
        std::fs::write(&path, "4000000000").unwrap();
        let uids = Uids::open(path.clone(), range).await;
        assert_eq!(uids.next().await.unwrap(), 4_000_000_000);
        assert_eq!(uids.next().await.unwrap(), 4_000_000_001);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let restarted = Uids::open(path.clone(), range).await;
        assert_eq!(restarted.next().await.unwrap(), 4_000_000_002);
        std::fs::write(&path, "garbage").unwrap();
        let corrupt = Uids::open(path.clone(), range).await;
        assert!(in_range(range, corrupt.next().await.unwrap()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
