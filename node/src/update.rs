//! `jusy-node update`: replaces this node's binary with a release, only when
//! the release's signature verifies against the operator's release key
//! pinned in the configuration (`release_key`). There is no other way to
//! update: without a pinned key every update is refused.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use jusy_common::release::{self, ReleaseError};

/// Why a release was not installed.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(
        "no release_key in the configuration: updates are refused (pin the operator's release \
         key, `release_key = \"<64 hex>\"`, to install signed releases)"
    )]
    NoKey,
    #[error("release_key: {0}")]
    Key(ReleaseError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Refused(ReleaseError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> UpdateError + '_ {
    move |source| UpdateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Checks the release `binary` against `signature` with `release_key` and,
/// when it verifies, puts it in place of `target` in one rename (a crash
/// leaves the old binary or the new one, never a part). Returns the
/// release's SHA-256 in hex.
pub fn install(
    release_key: Option<&str>,
    binary: &Path,
    signature: &Path,
    target: &Path,
) -> Result<String, UpdateError> {
    let key =
        release::parse_key(release_key.ok_or(UpdateError::NoKey)?).map_err(UpdateError::Key)?;
    let bytes = std::fs::read(binary).map_err(io(binary))?;
    let sig = std::fs::read_to_string(signature).map_err(io(signature))?;
    release::verify(&key, &bytes, &sig).map_err(UpdateError::Refused)?;
    let dir = target.parent().unwrap_or(Path::new("/"));
    let staged = dir.join(format!(".jusy-node.update-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&staged)?;
        f.write_all(&bytes)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o755))?;
        f.sync_all()?;
        std::fs::rename(&staged, target)?;
        std::fs::File::open(dir)?.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&staged);
        return Err(io(target)(e));
    }
    use sha2::Digest;
    Ok(hex::encode(sha2::Sha256::digest(&bytes)))
}
