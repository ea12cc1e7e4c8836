//! A session's init: one process per session, started when its slot is
//! prepared, inside the session's cgroup and in new pid, ipc, mount and uts
//! namespaces (and network, where the node gives sessions their own).
//! It is pid 1 of the session, and forks every program of the session on the
//! node's request ([`SessionInit::spawn`]), so each is born inside the cgroup
//! (its process limit holds for every spawn) and the namespaces, and ending the
//! init ends everything the session started.
//!
//! This side is the node's: it starts the init ([`SessionInit::start`]) and
//! talks to it over a `SOCK_SEQPACKET` socket pair ([`wire`]); the init itself
//! is [`program`], run as `jusy-node session-init <config>`.

pub mod program;
pub mod wire;

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, recv, sendmsg, socketpair,
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;
use tokio_util::task::AbortOnDropHandle;

use super::cgroup::join_in_child;
use wire::{MAX_MESSAGE, Reply, Request, Spawn};

/// The first argument that makes `jusy-node` run as a session init.
pub const INIT_ARG: &str = "session-init";

/// Runs as a session init, and never returns, when the process was started
/// as one (`<binary> session-init <config>`). Any binary that starts sessions
/// (`jusy-node`, and `jusy-broker` for its devnet) calls this first thing in
/// `main`, since a session's init is the node's own executable.
pub fn run_if_asked() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() == Some(std::ffi::OsStr::new(INIT_ARG)) {
        let config = args.next().unwrap_or_default();
        program::main(&config.to_string_lossy());
    }
}

/// How long the init may take to set up its namespaces and mounts.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// What the init needs to know, passed as JSON in its second argument (no
/// secrets: it is on the init's command line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitConfig {
    /// False in development mode: no namespaces, no mounts. (Programs run as
    /// `uid` whenever the init is not already running as it.)
    pub isolate: bool,
    /// The session has a network namespace of its own.
    pub net_namespace: bool,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    /// The session's host name (its uts namespace's).
    pub hostname: String,
    /// Private directories (source) bound over the host's world-writable ones
    /// (target).
    pub binds: Vec<(PathBuf, PathBuf)>,
    /// A file bound over `/etc/resolv.conf`.
    pub resolv_conf: Option<PathBuf>,
}

/// Starting or talking to a session init failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("session init configuration: {0}")]
    Config(serde_json::Error),
    #[error("{call}: {source}")]
    Sys { call: &'static str, source: Errno },
    #[error("mounting {target}: {source}")]
    Mount { target: PathBuf, source: Errno },
    #[error("session seccomp filter: {0}")]
    Seccomp(crate::sandbox::seccomp::SeccompError),
    #[error("session init message: {0}")]
    Wire(wire::WireError),
    #[error("session init protocol: {0}")]
    Protocol(&'static str),
    #[error("starting the session init: {0}")]
    Start(io::Error),
    #[error("the session init did not get ready: {0}")]
    NotReady(String),
}

/// Replies awaited for one spawn.
#[derive(Debug, Default)]
struct Pending {
    started: Option<oneshot::Sender<Result<i32, Errno>>>,
    exited: Option<oneshot::Sender<i32>>,
}

/// What the node's side of one init shares between its spawns and its reader.
#[derive(Debug)]
struct Link {
    sock: AsyncFd<OwnedFd>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Link {
    async fn send(&self, msg: &Request, fds: &[RawFd]) -> io::Result<()> {
        let bytes = wire::encode(msg).map_err(io::Error::other)?;
        loop {
            let mut guard = self.sock.writable().await?;
            let sent = guard.try_io(|s| {
                let iov = [IoSlice::new(&bytes)];
                let rights = [ControlMessage::ScmRights(fds)];
                let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
                sendmsg::<()>(s.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(io::Error::from)
            });
            match sent {
                Ok(r) => return r.map(drop),
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads the init's replies until it closes, handing each to its spawn.
    async fn read_replies(self: Arc<Self>) {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let Ok(mut guard) = self.sock.readable().await else {
                break;
            };
            let n = match guard.try_io(|s| {
                recv(s.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)
            }) {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => n,
                Err(_would_block) => continue,
            };
            let Some(reply) = buf.get(..n).and_then(|b| wire::decode::<Reply>(b).ok()) else {
                tracing::error!("malformed message from a session init");
                break;
            };
            let mut pending = lock(&self.pending);
            match reply {
                Reply::Ready => {}
                Reply::Spawned { id, pid } => {
                    if let Some(tx) = pending.get_mut(&id).and_then(|p| p.started.take()) {
                        let _ = tx.send(Ok(pid));
                    }
                }
                Reply::Failed { id, errno } => {
                    if let Some(tx) = pending.remove(&id).and_then(|p| p.started) {
                        let _ = tx.send(Err(Errno::from_raw(errno)));
                    }
                }
                Reply::Exited { id, status } => {
                    if let Some(tx) = pending.remove(&id).and_then(|p| p.exited) {
                        let _ = tx.send(status);
                    }
                }
            }
        }
        // Every waiting spawn learns the init is gone (its senders drop).
        lock(&self.pending).clear();
    }
}

/// The node's handle on one session's init.
#[derive(Debug)]
pub struct SessionInit {
    child: tokio::sync::Mutex<tokio::process::Child>,
    pid: u32,
    link: Arc<Link>,
    _reader: AbortOnDropHandle<()>,
}

/// One program the init started.
#[derive(Debug)]
pub struct Process {
    id: u64,
    link: Arc<Link>,
    exited: oneshot::Receiver<i32>,
}

impl Process {
    /// Sends `signal` to the program's process group.
    pub async fn signal(&self, signal: i32) {
        let _ = self
            .link
            .send(
                &Request::Signal {
                    id: self.id,
                    signal,
                },
                &[],
            )
            .await;
    }

    /// Waits for the program to end; `None` when the init went away first
    /// (the session is being torn down, and everything in it killed).
    pub async fn wait(&mut self) -> Option<ExitStatus> {
        (&mut self.exited).await.ok().map(ExitStatus::from_raw)
    }
}

impl SessionInit {
    /// Starts a session's init: `exe` is a `jusy-node` binary (the node's own,
    /// `/proc/self/exe`, which works even after the file was replaced by an
    /// upgrade); `cgroup` holds the descriptors of the session's `cgroup.procs`
    /// files (none in development mode).
    pub async fn start(
        exe: &std::path::Path,
        config: &InitConfig,
        cgroup: Vec<RawFd>,
    ) -> Result<Self, InitError> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .map_err(|source| InitError::Sys {
            call: "socketpair",
            source,
        })?;
        // The init's end blocks: it is a plain synchronous program.
        let flags = nix::fcntl::OFlag::empty();
        nix::fcntl::fcntl(&theirs, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(|source| {
            InitError::Sys {
                call: "fcntl",
                source,
            }
        })?;
        let json = serde_json::to_string(config).map_err(InitError::Config)?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg(INIT_ARG)
            .arg(json)
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // No cgroup namespace: programs that size themselves by their cgroup's
        // limits (the JVM, Go) find them through /proc/self/cgroup under the
        // host's /sys/fs/cgroup, which a namespace would point at its root.
        let mut namespaces =
            CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
        if config.net_namespace {
            namespaces |= CloneFlags::CLONE_NEWNET;
        }
        let isolate = config.isolate;
        // SAFETY: between fork and exec only write(2) to open descriptors and
        // unshare(2), both async-signal-safe; the cgroup descriptors stay open
        // while the sandbox lives, which outlasts this spawn.
        unsafe {
            cmd.pre_exec(move || {
                join_in_child(&cgroup)?;
                if isolate {
                    nix::sched::unshare(namespaces)?;
                }
                Ok(())
            });
        }
        let child = spawn_in_new_pid_namespace(cmd, isolate).await?;
        let pid = child
            .id()
            .ok_or(InitError::NotReady("exited at once".into()))?;
        let link = Arc::new(Link {
            // SAFETY: an OwnedFd keeps its descriptor open and unchanged for as
            // long as it lives, and the AsyncFd owns it.
            sock: unsafe { AsyncFd::register(ours) }
                .map_err(|e| InitError::Start(e.into_parts().1))?,
            pending: Mutex::default(),
            next_id: AtomicU64::new(1),
        });
        // The first message is Ready (or the init's end, if setting up failed).
        let ready = tokio::time::timeout(READY_TIMEOUT, async {
            loop {
                let mut guard = link.sock.readable().await?;
                let mut buf = [0u8; 64];
                match guard.try_io(|s| {
                    recv(s.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)
                }) {
                    Ok(Ok(n)) => {
                        return Ok::<_, io::Error>(
                            buf.get(..n).and_then(|b| wire::decode::<Reply>(b).ok()),
                        );
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(_would_block) => continue,
                }
            }
        })
        .await;
        match ready {
            Ok(Ok(Some(Reply::Ready))) => {}
            Ok(Ok(other)) => return Err(InitError::NotReady(format!("{other:?}"))),
            Ok(Err(e)) => return Err(InitError::NotReady(e.to_string())),
            Err(_) => return Err(InitError::NotReady("timed out".into())),
        }
        let reader = AbortOnDropHandle::new(tokio::spawn(link.clone().read_replies()));
        Ok(Self {
            child: tokio::sync::Mutex::new(child),
            pid,
            link,
            _reader: reader,
        })
    }

    /// The init's pid as the node sees it; `/proc/<pid>/ns/*` are the
    /// session's namespaces.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Starts a program with `stdio` as its stdin, stdout and stderr.
    pub async fn spawn(&self, mut spawn: Spawn, stdio: [&OwnedFd; 3]) -> io::Result<Process> {
        let id = self.link.next_id.fetch_add(1, Ordering::Relaxed);
        spawn.id = id;
        let (started_tx, started) = oneshot::channel();
        let (exited_tx, exited) = oneshot::channel();
        lock(&self.link.pending).insert(
            id,
            Pending {
                started: Some(started_tx),
                exited: Some(exited_tx),
            },
        );
        let fds = stdio.map(AsRawFd::as_raw_fd);
        if let Err(e) = self.link.send(&Request::Spawn(spawn), &fds).await {
            lock(&self.link.pending).remove(&id);
            return Err(e);
        }
        match started.await {
            Ok(Ok(_pid)) => Ok(Process {
                id,
                link: self.link.clone(),
                exited,
            }),
            Ok(Err(errno)) => Err(io::Error::from(errno)),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the session has ended",
            )),
        }
    }

    /// Kills the init, and with it (its pid namespace) every process of the
    /// session, and reaps it.
    pub async fn kill(&self) {
        let mut child = self.child.lock().await;
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

/// Spawns `cmd` so that it is pid 1 of a new pid namespace (when `isolate`).
/// `unshare(CLONE_NEWPID)` puts the calling thread's later children there, so
/// it runs on a thread of its own that ends right after: no other spawn of the
/// node ever lands in a session's namespace.
async fn spawn_in_new_pid_namespace(
    mut cmd: tokio::process::Command,
    isolate: bool,
) -> Result<tokio::process::Child, InitError> {
    let runtime = tokio::runtime::Handle::current();
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("session-init".into())
        .spawn(move || {
            let _entered = runtime.enter();
            let result = (|| {
                if isolate {
                    nix::sched::unshare(CloneFlags::CLONE_NEWPID).map_err(io::Error::from)?;
                }
                cmd.spawn()
            })();
            let _ = tx.send(result);
        })
        .map_err(InitError::Start)?;
    rx.await
        .map_err(|_| InitError::Start(io::Error::other("spawning thread died")))?
        .map_err(InitError::Start)
}
