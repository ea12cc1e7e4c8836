//! Room on the data file system for session disks. Images are sparse: each
//! takes blocks only as its session writes, and may grow to its full size at
//! any time. A slot is prepared only when the file system can hold every
//! image at its full size, the new one too, and still keep the owner's
//! reserve free; otherwise a session writing its home would fill the owner's
//! disk, or find its own limit somewhere below the size it was sold.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What the data file system holds and may still be asked for, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Room {
    /// Free space unprivileged writers may use (`f_bavail`).
    pub free: u64,
    /// What the existing images may still grow by, together.
    pub growth: u64,
    /// What the owner keeps free for the machine (`disk_reserve_mib`).
    pub reserve: u64,
    /// Full size of one session disk (`disk_mib`), more than zero.
    pub image: u64,
}

impl Room {
    /// How many more images of full size fit.
    pub fn images(&self) -> u64 {
        self.free
            .saturating_sub(self.growth)
            .saturating_sub(self.reserve)
            .checked_div(self.image)
            .unwrap_or(0)
    }

    /// How many ready slots the disk allows when `ready` are prepared and
    /// `wanted` are asked for: never more than `wanted`.
    pub fn slots(&self, ready: usize, wanted: usize) -> usize {
        let more = usize::try_from(self.images()).unwrap_or(usize::MAX);
        ready.saturating_add(more).min(wanted)
    }
}

/// Measuring the file system failed.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct SpaceError {
    pub path: PathBuf,
    pub source: io::Error,
}

/// Measures the file system holding `images`: its free space, and what each
/// image there (`*.img`) may still grow by up to `image` bytes.
pub fn measure(images: &Path, image: u64, reserve: u64) -> Result<Room, SpaceError> {
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| SpaceError { path, source }
    };
    let st = nix::sys::statvfs::statvfs(images).map_err(|e| err(images)(e.into()))?;
    let free = st.blocks_available().saturating_mul(st.fragment_size());
    let mut growth = 0u64;
    for entry in std::fs::read_dir(images).map_err(err(images))? {
        let path = entry.map_err(err(images))?.path();
        if path.extension().is_none_or(|e| e != "img") {
            continue;
        }
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            // Removed by a session's teardown meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(err(&path)(e)),
        };
        // st_blocks counts 512-byte units, whatever the block size.
        let used = meta.blocks().saturating_mul(512);
        growth = growth.saturating_add(image.saturating_sub(used));
    }
    Ok(Room {
        free,
        growth,
        reserve,
        image,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn images_fit_in_what_is_free_after_growth_and_reserve() {
        let room = |free, growth| Room {
            free: free * MIB,
            growth: growth * MIB,
            reserve: 1024 * MIB,
            image: 5120 * MIB,
        };
        // 20 GiB free, nothing to grow: three 5 GiB images beside 1 GiB reserve.
        assert_eq!(room(20 * 1024, 0).images(), 3);
        // Two images written to 1 GiB each may still take 8 GiB more.
        assert_eq!(room(20 * 1024, 8 * 1024).images(), 2);
        // Exactly enough for one, and a byte short of it.
        assert_eq!(room(6 * 1024, 0).images(), 1);
        let short = Room {
            free: 6 * 1024 * MIB - 1,
            ..room(0, 0)
        };
        assert_eq!(short.images(), 0);
        // Growth and reserve beyond what is free: none, no underflow.
        assert_eq!(room(100, 5000).images(), 0);
        let nothing = Room {
            image: 0,
            ..room(100, 0)
        };
        assert_eq!(nothing.images(), 0, "a zero size is not a disk");
    }

    #[test]
    fn slots_count_the_ready_ones_and_stop_at_what_is_asked() {
        let room = Room {
            free: 12 * MIB,
            growth: 2 * MIB,
            reserve: MIB,
            image: 3 * MIB,
        };
        assert_eq!(room.images(), 3);
        assert_eq!(room.slots(0, 8), 3);
        assert_eq!(room.slots(2, 8), 5);
        assert_eq!(room.slots(2, 4), 4);
        assert_eq!(room.slots(usize::MAX, usize::MAX), usize::MAX);
    }

    #[test]
    fn a_sparse_image_counts_what_it_may_still_grow_by() {
        let dir = std::env::temp_dir().join(format!("jusy-space-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let image = 64 * MIB;
        let f = std::fs::File::create(dir.join("a.img")).expect("image");
        f.set_len(image).expect("sparse");
        std::fs::write(dir.join("b.img"), vec![1u8; 1 << 20]).expect("written image");
        std::fs::write(dir.join("notes"), b"not an image").expect("other file");
        let room = measure(&dir, image, 0).expect("measure");
        assert!(room.free > 0);
        // The sparse one may grow by all of it, the written one by 63 MiB or
        // a little less (its blocks may round up).
        assert!(
            room.growth <= 127 * MIB && room.growth > 126 * MIB,
            "{room:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
