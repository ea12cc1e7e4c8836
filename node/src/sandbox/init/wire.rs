//! The messages between the node and a session's init: one JSON message per
//! `SOCK_SEQPACKET` datagram, so a message is never split or merged, and the
//! file descriptors of a spawn travel beside it as `SCM_RIGHTS`.

use serde::{Deserialize, Serialize};

/// The largest message either side sends or accepts. A command line of the
/// kernel's largest single argument (128 KiB) escaped as JSON fits.
pub const MAX_MESSAGE: usize = 512 * 1024;

/// What the node asks of the init.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Fork and exec a program as the session user, with the three file
    /// descriptors sent beside this message as its stdin, stdout and stderr.
    Spawn(Spawn),
    /// Send `signal` to the process group of spawn `id` (its program called
    /// `setsid`, so the group is everything it started that stayed in it).
    Signal { id: u64, signal: i32 },
}

/// One program to start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spawn {
    /// Chosen by the node, unique per init; names the program in replies.
    pub id: u64,
    /// The file to execute.
    pub path: Vec<u8>,
    /// `argv`, with `argv[0]` (which may differ from `path`, as `-bash`).
    pub argv: Vec<Vec<u8>>,
    /// `NAME=value` entries, the program's whole environment.
    pub env: Vec<Vec<u8>>,
    /// Make stdin the controlling terminal.
    pub tty: bool,
}

/// What the init tells the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Namespaces and mounts are in place; spawns may follow.
    Ready,
    /// Spawn `id` runs as `pid` (in the session's pid namespace).
    Spawned { id: u64, pid: i32 },
    /// Spawn `id` failed before its program ran, with this `errno`.
    Failed { id: u64, errno: i32 },
    /// Spawn `id` ended; `status` is the raw `wait` status.
    Exited { id: u64, status: i32 },
}

/// A message that does not parse or is too large.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("message of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Encodes a message for one datagram.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, WireError> {
    let bytes = serde_json::to_vec(msg)?;
    if bytes.len() > MAX_MESSAGE {
        return Err(WireError::TooLarge(bytes.len()));
    }
    Ok(bytes)
}

/// Decodes one datagram.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, WireError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(WireError::TooLarge(bytes.len()));
    }
    Ok(serde_json::from_slice(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_exact_bytes() {
        let spawn = Request::Spawn(Spawn {
            id: 7,
            path: b"/bin/sh".to_vec(),
            argv: vec![b"-sh".to_vec()],
            env: vec![b"HOME=/h".to_vec()],
            tty: true,
        });
        let bytes = encode(&spawn).unwrap_or_default();
        assert_eq!(decode::<Request>(&bytes).ok(), Some(spawn));
        assert_eq!(
            encode(&Reply::Exited { id: 3, status: 9 }).unwrap_or_default(),
            br#"{"Exited":{"id":3,"status":9}}"#
        );
    }

    #[test]
    fn garbage_and_oversize_are_errors() {
        assert!(decode::<Reply>(b"\xff{").is_err());
        assert!(decode::<Reply>(br#"{"Spawned":{"id":1}}"#).is_err());
        let huge = vec![b' '; MAX_MESSAGE + 1];
        assert!(matches!(
            decode::<Reply>(&huge),
            Err(WireError::TooLarge(_))
        ));
    }
}
