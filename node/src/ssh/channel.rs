//! One SSH session channel: collects pty and environment requests, starts the
//! requested program as the session user, and pumps bytes, window changes,
//! signals, EOF and the exit status between the channel and the process.

use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use russh::server::{Handle, Msg};
use russh::{Channel, ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Sig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio_util::task::AbortOnDropHandle;

use super::input::{self, Backlog};
use super::pty::{Pty, WinSize};
use crate::sandbox::Sandbox;
use crate::sandbox::init::Process;
use crate::sandbox::process::{Program, env_allowed, spawn};

/// What every channel of one order shares.
#[derive(Debug)]
pub struct ChannelCtx {
    pub sandbox: Sandbox,
    pub sftp_server: std::path::PathBuf,
    /// Client input queued for the session's programs, across all its
    /// connections and channels: it sets every connection's window.
    pub backlog: Arc<Backlog>,
    pub caps: ChannelCaps,
    /// Channels open on the session, across its connections.
    pub open: Arc<std::sync::atomic::AtomicUsize>,
}

/// How many channels a client may have open at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelCaps {
    /// On one SSH connection (OpenSSH's `MaxSessions` is 10).
    pub per_connection: usize,
    /// On one session, across its connections.
    pub per_session: usize,
}

impl ChannelCtx {
    /// Asks the session's init to start `program` with `stdio`.
    async fn start(
        &self,
        program: &Program,
        setup: &Setup,
        tty: bool,
        stdio: [&std::os::fd::OwnedFd; 3],
    ) -> std::io::Result<Process> {
        let init = self.sandbox.init.as_ref().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotConnected, "the session has no init")
        })?;
        let request = spawn(&self.sandbox, program, &setup.env, tty, &self.sftp_server);
        init.spawn(request, stdio).await
    }
}

/// Requests gathered before the program starts.
#[derive(Debug, Default)]
struct Setup {
    env: Vec<(String, String)>,
    pty: Option<(String, WinSize)>,
}

/// Runs a channel to its end.
pub async fn run(channel: Channel<Msg>, ctx: Arc<ChannelCtx>, handle: Handle) {
    let id = channel.id();
    let (mut reader, writer) = channel.split();
    let mut setup = Setup::default();
    let program = loop {
        match reader.wait().await {
            Some(ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                pix_width,
                pix_height,
                ..
            }) => {
                let size = WinSize {
                    cols: col_width,
                    rows: row_height,
                    px_width: pix_width,
                    px_height: pix_height,
                };
                setup.pty = Some((term, size));
            }
            Some(ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            }) if env_allowed(&variable_name) => setup.env.push((variable_name, variable_value)),
            Some(ChannelMsg::WindowChange {
                col_width,
                row_height,
                pix_width,
                pix_height,
            }) => {
                if let Some((_, size)) = setup.pty.as_mut() {
                    *size = WinSize {
                        cols: col_width,
                        rows: row_height,
                        px_width: pix_width,
                        px_height: pix_height,
                    };
                }
            }
            Some(ChannelMsg::RequestShell { .. }) => break Program::Shell,
            Some(ChannelMsg::Exec { command, .. }) => {
                break Program::Exec(String::from_utf8_lossy(&command).into_owned());
            }
            Some(ChannelMsg::RequestSubsystem { name, .. }) if name == "sftp" => {
                break Program::Sftp;
            }
            Some(ChannelMsg::Eof | ChannelMsg::Close) | None => return,
            Some(_) => {}
        }
    };
    let status = match setup.pty.take() {
        Some((term, size)) if program != Program::Sftp => {
            setup.env.retain(|(k, _)| k != "TERM");
            setup.env.push(("TERM".to_owned(), term));
            run_with_pty(&ctx, &program, &setup, size, &mut reader, &writer).await
        }
        _ => run_with_pipes(&ctx, &program, &setup, &mut reader, &writer).await,
    };
    finish(id, status, &writer, &handle).await;
}

async fn run_with_pipes(
    ctx: &ChannelCtx,
    program: &Program,
    setup: &Setup,
    reader: &mut ChannelReadHalf,
    writer: &ChannelWriteHalf<Msg>,
) -> Option<ExitStatus> {
    let pipes =
        (|| Ok::<_, std::io::Error>((std::io::pipe()?, std::io::pipe()?, std::io::pipe()?)))();
    let ((in_r, in_w), (out_r, out_w), (err_r, err_w)) = match pipes {
        Ok(p) => p,
        Err(e) => return spawn_failed(writer, e).await,
    };
    let (in_r, out_w, err_w) = (
        OwnedFd::from(in_r),
        OwnedFd::from(out_w),
        OwnedFd::from(err_w),
    );
    let mut child = match ctx
        .start(program, setup, false, [&in_r, &out_w, &err_w])
        .await
    {
        Ok(c) => c,
        Err(e) => return spawn_failed(writer, e).await,
    };
    // Only the program holds its ends now, so reading ends when it (and what
    // it started) let go of them.
    drop((in_r, out_w, err_w));
    let ends = (|| {
        Ok::<_, std::io::Error>((
            pipe::Sender::from_owned_fd(OwnedFd::from(in_w))?,
            pipe::Receiver::from_owned_fd(OwnedFd::from(out_r))?,
            pipe::Receiver::from_owned_fd(OwnedFd::from(err_r))?,
        ))
    })();
    let Ok((stdin, stdout, stderr)) = ends else {
        child.signal(libc::SIGKILL).await;
        return child.wait().await;
    };
    // Output is pumped by its own task: writing a large input to the program
    // below may wait until the program's output has been drained.
    let out = pump(stdout, writer.make_writer());
    let err = pump(stderr, writer.make_writer_ext(Some(1)));
    let mut output_done = AbortOnDropHandle::new(tokio::spawn(async move {
        tokio::join!(out, err);
    }));
    // Input is fed by its own task too, so that this loop never waits: as long
    // as it takes the channel's messages, russh keeps reading the connection,
    // and the client's window adjustments on it (see `input`).
    let (input, feed) = input::queue(ctx.backlog.clone());
    let _feeder = AbortOnDropHandle::new(tokio::spawn(feed.write_to(stdin)));
    loop {
        tokio::select! {
            _ = &mut output_done => break,
            msg = reader.wait() => match msg {
                Some(ChannelMsg::Data { data }) => input.push(&data),
                // The feeder closes stdin once it has written what is queued.
                Some(ChannelMsg::Eof) => input.end(),
                Some(ChannelMsg::Signal { signal }) => send_signal(&child, &signal).await,
                Some(ChannelMsg::Close) | None => {
                    // The client is gone: stop the program like sshd does.
                    child.signal(libc::SIGKILL).await;
                    break;
                }
                Some(_) => {}
            }
        }
    }
    // The channel is not read any more: the program's input ends with what
    // is queued.
    input.end();
    child.wait().await
}

async fn run_with_pty(
    ctx: &ChannelCtx,
    program: &Program,
    setup: &Setup,
    size: WinSize,
    reader: &mut ChannelReadHalf,
    writer: &ChannelWriteHalf<Msg>,
) -> Option<ExitStatus> {
    let pty = match Pty::open(size) {
        Ok(p) => p,
        Err(e) => return spawn_failed(writer, e).await,
    };
    let slave = &pty.slave;
    let mut child = match ctx.start(program, setup, true, [slave, slave, slave]).await {
        Ok(c) => c,
        Err(e) => return spawn_failed(writer, e).await,
    };
    // Only the program may hold the slave now, so reading the master ends (EIO)
    // when it and everything it started have let go of the terminal.
    drop(pty.slave);
    let master = pty.master;
    // Output and input have their own tasks, so that this loop never waits
    // (see `run_with_pipes`).
    let mut output =
        AbortOnDropHandle::new(tokio::spawn(pump(master.clone(), writer.make_writer())));
    let (input, feed) = input::queue(ctx.backlog.clone());
    let _feeder = AbortOnDropHandle::new(tokio::spawn(feed.write_to(master.clone())));
    let mut status = None;
    let mut exited = false;
    loop {
        tokio::select! {
            _ = &mut output => break,
            st = child.wait(), if !exited => {
                exited = true;
                status = st;
                // Programs left in the background may keep the terminal open; like
                // sshd, stop waiting for them shortly after the main process exits.
                let _ = tokio::time::timeout(Duration::from_millis(200), &mut output).await;
                break;
            }
            msg = reader.wait() => match msg {
                Some(ChannelMsg::Data { data }) => input.push(&data),
                Some(ChannelMsg::WindowChange { col_width, row_height, pix_width, pix_height }) => {
                    let _ = master.resize(WinSize { cols: col_width, rows: row_height, px_width: pix_width, px_height: pix_height });
                }
                Some(ChannelMsg::Signal { signal }) => send_signal(&child, &signal).await,
                Some(ChannelMsg::Close) | None => {
                    child.signal(libc::SIGKILL).await;
                    break;
                }
                Some(_) => {}
            }
        }
    }
    if exited { status } else { child.wait().await }
}

/// Copies `from` into a channel writer until EOF or error.
async fn pump(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let Some(chunk) = buf.get(..n) else { break };
                if to.write_all(chunk).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.flush().await;
}

async fn spawn_failed(writer: &ChannelWriteHalf<Msg>, e: std::io::Error) -> Option<ExitStatus> {
    tracing::warn!(error = %e, "could not start a session program");
    let mut w = writer.make_writer_ext(Some(1));
    let _ = w
        .write_all(format!("jusy: cannot start program: {e}\r\n").as_bytes())
        .await;
    let _ = w.flush().await;
    Some(ExitStatus::from_raw(127 << 8))
}

async fn send_signal(child: &Process, signal: &Sig) {
    let number = match signal {
        Sig::ABRT => libc::SIGABRT,
        Sig::ALRM => libc::SIGALRM,
        Sig::FPE => libc::SIGFPE,
        Sig::HUP => libc::SIGHUP,
        Sig::ILL => libc::SIGILL,
        Sig::INT => libc::SIGINT,
        Sig::KILL => libc::SIGKILL,
        Sig::PIPE => libc::SIGPIPE,
        Sig::QUIT => libc::SIGQUIT,
        Sig::SEGV => libc::SIGSEGV,
        Sig::TERM => libc::SIGTERM,
        Sig::USR1 => libc::SIGUSR1,
        Sig::Custom(_) => return,
    };
    child.signal(number).await;
}

fn sig_of(number: i32) -> Sig {
    match number {
        libc::SIGABRT => Sig::ABRT,
        libc::SIGALRM => Sig::ALRM,
        libc::SIGFPE => Sig::FPE,
        libc::SIGHUP => Sig::HUP,
        libc::SIGILL => Sig::ILL,
        libc::SIGINT => Sig::INT,
        libc::SIGKILL => Sig::KILL,
        libc::SIGPIPE => Sig::PIPE,
        libc::SIGQUIT => Sig::QUIT,
        libc::SIGSEGV => Sig::SEGV,
        libc::SIGTERM => Sig::TERM,
        libc::SIGUSR1 => Sig::USR1,
        n => Sig::Custom(format!("SIG{n}")),
    }
}

/// Reports how the program ended, then EOF and close, as OpenSSH's sshd does.
async fn finish(
    id: ChannelId,
    status: Option<ExitStatus>,
    writer: &ChannelWriteHalf<Msg>,
    handle: &Handle,
) {
    if let Some(status) = status {
        if let Some(code) = status.code() {
            let _ = writer.exit_status(u32::try_from(code).unwrap_or(255)).await;
        } else if let Some(sig) = status.signal() {
            let _ = handle
                .exit_signal_request(
                    id,
                    sig_of(sig),
                    status.core_dumped(),
                    String::new(),
                    String::new(),
                )
                .await;
        }
    }
    let _ = writer.eof().await;
    let _ = writer.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_round_trip() {
        assert!(matches!(sig_of(libc::SIGTERM), Sig::TERM));
        assert!(matches!(sig_of(libc::SIGKILL), Sig::KILL));
        assert!(matches!(sig_of(64), Sig::Custom(_)));
    }
}
