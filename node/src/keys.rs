//! The node's persistent keys: its ed25519 identity (QUIC handshakes) and its SSH
//! host key, created on first start and kept in the data directory (mode 0600).

use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use russh::keys::PrivateKey;
use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;

/// Loading or creating a key file failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a valid key file")]
    Invalid { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KeyFileError + '_ {
    move |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    }
}

fn fresh_seed(path: &Path) -> Result<[u8; 32], KeyFileError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| KeyFileError::Io {
        path: path.to_owned(),
        source: io::Error::other(e.to_string()),
    })?;
    Ok(seed)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyFileError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// The ed25519 identity: 32 raw seed bytes in `node.key`.
pub fn load_or_create_identity(dir: &Path) -> Result<SigningKey, KeyFileError> {
    let path = dir.join("node.key");
    match std::fs::read(&path) {
        Ok(bytes) => jusy_common::identity::signing_key_from_seed(&bytes)
            .ok_or(KeyFileError::Invalid { path }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let seed = fresh_seed(&path)?;
            write_private(&path, &seed)?;
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// The SSH host key, in OpenSSH format in `ssh_host_ed25519_key`.
pub fn load_or_create_host_key(dir: &Path) -> Result<PrivateKey, KeyFileError> {
    let path = dir.join("ssh_host_ed25519_key");
    match std::fs::read_to_string(&path) {
        Ok(text) => PrivateKey::from_openssh(text).map_err(|_| KeyFileError::Invalid { path }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let seed = fresh_seed(&path)?;
            let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
            let text = key
                .to_openssh(LineEnding::LF)
                .map_err(|_| KeyFileError::Invalid { path: path.clone() })?;
            write_private(&path, text.as_bytes())?;
            Ok(key)
        }
        Err(e) => Err(io_err(&path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_persist_across_loads() {
        let dir = std::env::temp_dir().join(format!("jusy-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let a = load_or_create_identity(&dir).expect("create");
        let b = load_or_create_identity(&dir).expect("load");
        assert_eq!(a.to_bytes(), b.to_bytes());
        let h1 = load_or_create_host_key(&dir).expect("create host key");
        let h2 = load_or_create_host_key(&dir).expect("load host key");
        assert_eq!(h1.public_key(), h2.public_key());
        std::fs::write(dir.join("node.key"), b"short").expect("write");
        assert!(matches!(
            load_or_create_identity(&dir),
            Err(KeyFileError::Invalid { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
