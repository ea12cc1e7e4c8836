//! A program run on a pseudo-terminal of its own, as in a user's terminal
//! window: what it prints is collected, and the window can be resized (the
//! kernel then signals the program with SIGWINCH, as a terminal emulator's
//! resize does).

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

/// A started program whose controlling terminal is a pty we hold the master of.
#[derive(Debug)]
pub struct Terminal {
    master: OwnedFd,
    child: Child,
    output: Arc<(Mutex<Vec<u8>>, Condvar)>,
}

fn winsize(rows: u16, cols: u16) -> libc::winsize {
    libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

impl Terminal {
    /// Starts `cmd` in a new session on a new pty of `rows` × `cols`.
    pub fn spawn(mut cmd: Command, rows: u16, cols: u16) -> anyhow::Result<Self> {
        let (mut master, mut slave) = (-1, -1);
        let size = winsize(rows, cols);
        // SAFETY: the out-pointers are valid; no name buffer, default termios.
        let made = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &size,
            )
        };
        anyhow::ensure!(made == 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty returned two fresh descriptors that nothing else owns.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("starting the program on a pty")?;
        // The parent's copies of the slave go with the command.
        drop(cmd);
        let output = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let mut reader = std::fs::File::from(master.try_clone()?);
        let sink = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once the program and its children are gone.
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                let (text, more) = &*sink;
                text.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .extend_from_slice(&buf[..n]);
                more.notify_all();
            }
        });
        Ok(Self {
            master,
            child,
            output,
        })
    }

    /// Everything the program printed so far.
    pub fn text(&self) -> String {
        let (text, _) = &*self.output;
        String::from_utf8_lossy(
            &text
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_owned()
    }

    /// Waits until the program has printed `want`.
    pub fn expect(&self, want: &str, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        let (text, more) = &*self.output;
        let mut seen = text
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if String::from_utf8_lossy(&seen).contains(want) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            anyhow::ensure!(
                !left.is_zero(),
                "no {want:?} within {within:?}; the terminal shows: {:?}",
                String::from_utf8_lossy(&seen)
            );
            seen = more
                .wait_timeout(seen, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Resizes the window to `rows` × `cols`.
    pub fn resize(&self, rows: u16, cols: u16) -> anyhow::Result<()> {
        let size = winsize(rows, cols);
        // SAFETY: a valid descriptor and a valid winsize.
        let done = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        anyhow::ensure!(done == 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
        Ok(())
    }

    /// Waits up to `within` for the program to exit; its exit code.
    pub fn wait(&mut self, within: Duration) -> anyhow::Result<Option<i32>> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "still running after {within:?}; the terminal shows: {:?}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
