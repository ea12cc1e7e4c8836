//! The session init itself: the program `jusy-node session-init` runs as pid 1
//! of a session's pid namespace. It sets up the session's mounts, then forks
//! every program of the session on the node's request and reports how each
//! ended. It runs single-threaded and synchronously (no runtime), so forking
//! from it is safe, and every child it forks is born inside the session's
//! cgroup, where `pids.max` holds for it.
//!
//! When it exits, for whatever reason (the node closed its socket, the node
//! killed it), the kernel kills every process of its pid namespace.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{MsFlags, mount};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, send};
use nix::unistd::{ForkResult, Gid, Pid, Uid};

use super::wire::{self, MAX_MESSAGE, Reply, Request, Spawn};
use super::{InitConfig, InitError};

/// Runs the init on the socket at fd 0 with `config` (JSON), and exits.
pub fn main(config: &str) -> ! {
    let code = match serde_json::from_str::<InitConfig>(config)
        .map_err(InitError::Config)
        .and_then(|cfg| run(&cfg))
    {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("jusy-node session-init: {e}");
            1
        }
    };
    std::process::exit(code)
}

fn run(cfg: &InitConfig) -> Result<(), InitError> {
    // The node's umask (077) would make the directories the init creates for
    // a home under a covered directory unreachable; programs get 077 again.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    // SAFETY: the node starts the init with its end of the socket pair as
    // stdin, and nothing else in this process owns fd 0.
    let sock = unsafe { OwnedFd::from_raw_fd(0) };
    let mut children = SigSet::empty();
    children.add(Signal::SIGCHLD);
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&children), None).map_err(sys("sigprocmask"))?;
    let sigfd = SignalFd::with_flags(&children, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(sys("signalfd"))?;
    // Built once; every program of an isolated session runs under it.
    let filter = if cfg.isolate {
        setup(cfg)?;
        Some(crate::sandbox::seccomp::session_filter().map_err(InitError::Seccomp)?)
    } else {
        None
    };
    reply(sock.as_fd(), &Reply::Ready)?;
    let mut running: HashMap<i32, u64> = HashMap::new();
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let mut fds = [
            PollFd::new(sock.as_fd(), PollFlags::POLLIN),
            PollFd::new(sigfd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(sys("poll")(e)),
            Ok(_) => {}
        }
        let [sock_ev, sig_ev] = fds.map(|f| f.revents().unwrap_or(PollFlags::empty()));
        if !sig_ev.is_empty() {
            while let Ok(Some(_)) = sigfd.read_signal() {}
            reap(sock.as_fd(), &mut running)?;
        }
        if sock_ev.is_empty() {
            continue;
        }
        let (len, fds) = match receive(sock.as_raw_fd(), &mut buf) {
            Ok(Some(got)) => got,
            // The node is gone or let go of the session: so does everything in it.
            Ok(None) => return Ok(()),
            Err(Errno::EINTR | Errno::EAGAIN) => continue,
            Err(e) => return Err(sys("recvmsg")(e)),
        };
        let request = buf
            .get(..len)
            .ok_or(InitError::Protocol("message length"))
            .and_then(|b| wire::decode::<Request>(b).map_err(InitError::Wire))?;
        match request {
            Request::Spawn(spawn) => {
                let answer = match start(cfg, filter.as_deref(), &spawn, fds) {
                    Ok(pid) => {
                        running.insert(pid.as_raw(), spawn.id);
                        Reply::Spawned {
                            id: spawn.id,
                            pid: pid.as_raw(),
                        }
                    }
                    Err(errno) => Reply::Failed {
                        id: spawn.id,
                        errno: errno as i32,
                    },
                };
                reply(sock.as_fd(), &answer)?;
            }
            Request::Signal { id, signal } => {
                let target = running
                    .iter()
                    .find_map(|(&pid, &i)| (i == id).then_some(pid));
                if let (Some(pid), Ok(sig)) = (target, Signal::try_from(signal)) {
                    // Its process group, as a terminal's signals reach the whole
                    // job; the group leader may be gone while the group lives on,
                    // so fall back to the process itself only for an error.
                    if nix::sys::signal::killpg(Pid::from_raw(pid), sig).is_err() {
                        let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
                    }
                }
            }
        }
    }
}

/// Makes the session's mounts and names, once, before any program runs.
fn setup(cfg: &InitConfig) -> Result<(), InitError> {
    let none: Option<&str> = None;
    // Mounts the node makes later (or removes: the session disk at teardown)
    // still reach this namespace; nothing made here reaches the node's.
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_SLAVE, none)
        .map_err(mnt(Path::new("/")))?;
    // The home may live under a directory that is about to be covered (a node
    // whose data directory is under /tmp): hold on to it first.
    let home = nix::fcntl::open(
        &cfg.home,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(mnt(&cfg.home))?;
    let private = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    for (source, target) in &cfg.binds {
        match mount(
            Some(source.as_path()),
            target.as_path(),
            none,
            MsFlags::MS_BIND,
            none,
        ) {
            // A directory that went away since the node looked has nothing to hide.
            Err(Errno::ENOENT) => continue,
            other => other.map_err(mnt(target))?,
        }
        mount(
            none,
            target.as_path(),
            none,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | private,
            none,
        )
        .map_err(mnt(target))?;
    }
    if !same_dir(&cfg.home, home.as_fd()) {
        rebind_home(&cfg.home, home.as_fd())?;
    }
    drop(home);
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        private | MsFlags::MS_NOEXEC,
        none,
    )
    .map_err(mnt(Path::new("/proc")))?;
    if Path::new("/dev/mqueue").is_dir() {
        mount(
            Some("mqueue"),
            "/dev/mqueue",
            Some("mqueue"),
            private | MsFlags::MS_NOEXEC,
            none,
        )
        .map_err(mnt(Path::new("/dev/mqueue")))?;
    }
    if let Some(resolv) = &cfg.resolv_conf {
        match mount(
            Some(resolv.as_path()),
            "/etc/resolv.conf",
            none,
            MsFlags::MS_BIND,
            none,
        ) {
            Err(Errno::ENOENT) => {}
            other => other.map_err(mnt(Path::new("/etc/resolv.conf")))?,
        }
    }
    nix::unistd::sethostname(&cfg.hostname).map_err(sys("sethostname"))?;
    if cfg.net_namespace {
        loopback_up()?;
    }
    Ok(())
}

/// Whether `path` still leads to the directory `fd` was opened on.
fn same_dir(path: &Path, fd: BorrowedFd<'_>) -> bool {
    match (nix::sys::stat::stat(path), nix::sys::stat::fstat(fd)) {
        (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
        _ => false,
    }
}

/// Makes the home reachable at its path again inside a private directory that
/// now covers it: the path's directories are made (root's, traversable only)
/// and the home bound there from the descriptor held before.
fn rebind_home(home: &Path, fd: BorrowedFd<'_>) -> Result<(), InitError> {
    use std::os::unix::fs::DirBuilderExt;
    let err = |source| InitError::Mount {
        target: home.to_owned(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(home)
        .map_err(|e| err(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
    let from = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    let none: Option<&str> = None;
    mount(
        Some(from.as_path()),
        home,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .map_err(err)
}

/// Brings up the namespace's own loopback interface.
fn loopback_up() -> Result<(), InitError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let s = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(sys("socket"))?;
    // SAFETY: an all-zero ifreq is valid; the name fits with its NUL.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: ioctls on our own socket with a properly sized ifreq; the union
    // field written is the flags one these requests use.
    unsafe {
        if libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(sys("SIOCGIFFLAGS")(Errno::last()));
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(sys("SIOCSIFFLAGS")(Errno::last()));
        }
    }
    Ok(())
}

/// Receives one datagram and the descriptors beside it; `None` at EOF.
fn receive(sock: RawFd, buf: &mut [u8]) -> nix::Result<Option<(usize, Vec<OwnedFd>)>> {
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these descriptors for us.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if msg.bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some((msg.bytes, fds)))
}

fn reply(sock: BorrowedFd<'_>, msg: &Reply) -> Result<(), InitError> {
    let bytes = wire::encode(msg).map_err(InitError::Wire)?;
    loop {
        match send(sock.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL) {
            Err(Errno::EINTR) => continue,
            other => return other.map(drop).map_err(sys("send")),
        }
    }
}

/// Reports every ended program the node started; other processes (orphans
/// re-parented to pid 1) are only reaped.
fn reap(sock: BorrowedFd<'_>, running: &mut HashMap<i32, u64>) -> Result<(), InitError> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid writes the status into our local int.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return Ok(());
        }
        if let Some(id) = running.remove(&pid) {
            reply(sock, &Reply::Exited { id, status })?;
        }
    }
}

/// Everything a child needs, made before the fork so the child only makes
/// system calls.
struct Exec {
    path: CString,
    argv: Vec<CString>,
    env: Vec<CString>,
    home: CString,
}

fn cstrings(list: &[Vec<u8>]) -> Result<Vec<CString>, Errno> {
    list.iter()
        .map(|s| CString::new(s.clone()).map_err(|_| Errno::EINVAL))
        .collect()
}

/// Forks and execs one program; returns its pid once the exec succeeded.
fn start(
    cfg: &InitConfig,
    filter: Option<&[seccompiler::sock_filter]>,
    spawn: &Spawn,
    fds: Vec<OwnedFd>,
) -> Result<Pid, Errno> {
    let [stdin, stdout, stderr]: [OwnedFd; 3] = fds.try_into().map_err(|_| Errno::EBADF)?;
    let exec = Exec {
        path: CString::new(spawn.path.clone()).map_err(|_| Errno::EINVAL)?,
        argv: cstrings(&spawn.argv)?,
        env: cstrings(&spawn.env)?,
        home: CString::new(cfg.home.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?,
    };
    let (errors_r, errors_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    // SAFETY: this process is single-threaded, so the child may run any code;
    // it still only makes system calls and exits without unwinding.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Child => {
            let errno = become_program(cfg, filter, spawn.tty, [&stdin, &stdout, &stderr], &exec);
            let code = (errno as i32).to_ne_bytes();
            let _ = nix::unistd::write(&errors_w, &code);
            // SAFETY: _exit ends the child at once, without running the
            // parent's atexit handlers or destructors.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => {
            drop(errors_w);
            let mut code = [0u8; 4];
            // EOF: the exec closed the pipe, the program runs.
            let n = loop {
                match nix::unistd::read(&errors_r, &mut code) {
                    Err(Errno::EINTR) => continue,
                    other => break other,
                }
            };
            if n.unwrap_or(0) == code.len() {
                let _ = nix::sys::wait::waitpid(child, None);
                return Err(Errno::from_raw(i32::from_ne_bytes(code)));
            }
            Ok(child)
        }
    }
}

/// In the forked child: stdio, session, user, limits, filter, exec. Returns
/// only on failure, with the reason.
fn become_program(
    cfg: &InitConfig,
    filter: Option<&[seccompiler::sock_filter]>,
    tty: bool,
    stdio: [&OwnedFd; 3],
    exec: &Exec,
) -> Errno {
    let attempt = || -> nix::Result<std::convert::Infallible> {
        sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
        // Rust ignores SIGPIPE in its own processes; programs expect the default.
        // SAFETY: restoring a default disposition installs no handler.
        unsafe { nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl) }?;
        for (target, fd) in stdio.iter().enumerate() {
            let target = i32::try_from(target).map_err(|_| Errno::EINVAL)?;
            // SAFETY: dup2 onto 0..=2; the old descriptors there are the init's
            // own, which the child no longer needs.
            if unsafe { libc::dup2(fd.as_raw_fd(), target) } < 0 {
                return Err(Errno::last());
            }
        }
        // Nothing else of the init (its socket, the other sessions' nothing)
        // reaches the program; the error pipe closes on exec too.
        // SAFETY: marks descriptors close-on-exec; no memory effects.
        if unsafe {
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            )
        } < 0
        {
            return Err(Errno::last());
        }
        nix::unistd::setsid()?;
        if tty {
            // SAFETY: TIOCSCTTY on our stdin, a terminal the node opened.
            if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
                return Err(Errno::last());
            }
        }
        if nix::unistd::getuid() != Uid::from_raw(cfg.uid) {
            nix::unistd::setgroups(&[])?;
            nix::unistd::setgid(Gid::from_raw(cfg.gid))?;
            nix::unistd::setuid(Uid::from_raw(cfg.uid))?;
        }
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        if nix::unistd::chdir(exec.home.as_c_str()).is_err() {
            nix::unistd::chdir("/")?;
        }
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
            return Err(Errno::last());
        }
        // Last: the filter refuses calls made above (setgroups is fine, but
        // nothing of the init's own work should depend on what it allows).
        if let Some(program) = filter {
            crate::sandbox::seccomp::apply(program)
                .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EPERM)))?;
        }
        nix::unistd::execve(&exec.path, &exec.argv, &exec.env)
    };
    match attempt() {
        Err(e) => e,
        Ok(never) => match never {},
    }
}

fn mnt(target: &Path) -> impl Fn(Errno) -> InitError + '_ {
    move |source| InitError::Mount {
        target: target.to_owned(),
        source,
    }
}

fn sys(call: &'static str) -> impl Fn(Errno) -> InitError {
    move |source| InitError::Sys { call, source }
}
