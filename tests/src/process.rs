//! A real binary started by a test: stdout and stderr go to log files, JSON event
//! lines on stdout (`{"event": …}`) can be waited for, and the process is stopped
//! (SIGTERM, then SIGKILL) when dropped.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::scene::Scene;

/// Path of a workspace binary, next to the test executable's `deps` directory.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("JUSY_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe()?;
            let deps = exe.parent().context("test executable has no directory")?;
            deps.parent()
                .context("test executable is not in a target directory")?
                .to_owned()
        }
    };
    let path = dir.join(name);
    anyhow::ensure!(
        path.exists(),
        "{} is missing: build the binaries first (cargo build --workspace --bins)",
        path.display()
    );
    Ok(path)
}

/// A started process.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    events: mpsc::Receiver<Value>,
    /// Events seen while waiting for another one, kept for later waits.
    seen: Vec<Value>,
}

impl Proc {
    /// Starts `cmd`, logging to `<scene>/<name>.out` and `<name>.err`.
    pub fn start(scene: &Scene, name: &str, mut cmd: Command) -> anyhow::Result<Self> {
        let out_path = scene.dir().join(format!("{name}.out"));
        let err_path = scene.dir().join(format!("{name}.err"));
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&err_path)?;
        scene.add_log(out_path.clone());
        scene.add_log(err_path);
        scene.note(&format!("start {name}: {cmd:?}"));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err));
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let (tx, events) = mpsc::channel();
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out_path)?;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(log, "{line}");
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v.get("event").is_some()
                {
                    let _ = tx.send(v);
                }
            }
        });
        Ok(Self {
            name: name.to_owned(),
            child,
            events,
            seen: Vec::new(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the first event named `event` that satisfies `pred`, and
    /// consumes it.
    pub fn wait_event_where(
        &mut self,
        event: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let matches = |v: &Value| v["event"] == event && pred(v);
        if let Some(i) = self.seen.iter().position(matches) {
            return Ok(self.seen.remove(i));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) if matches(&v) => return Ok(v),
                Ok(v) => self.seen.push(v),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("{}: no '{event}' event within {timeout:?}", self.name)
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.try_wait().ok().flatten();
                    bail!(
                        "{}: exited ({status:?}) before a '{event}' event",
                        self.name
                    )
                }
            }
        }
    }

    pub fn wait_event(&mut self, event: &str, timeout: Duration) -> anyhow::Result<Value> {
        self.wait_event_where(event, timeout, |_| true)
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Asks the process to stop (SIGTERM) and waits up to `grace` before
    /// killing it. Returns whether it exited by itself, successfully.
    pub fn stop(&mut self, grace: Duration) -> anyhow::Result<bool> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status.success());
        }
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: signalling our own child; no memory effects.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.success());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill()?;
        Ok(false)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.stop(Duration::from_secs(20));
    }
}

/// Output of a finished command.
#[derive(Debug)]
pub struct Output {
    pub status: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Output {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Runs a command to its end, killing it after `timeout`; records the command
/// and its result in the scene log.
pub fn run(
    scene: &Scene,
    mut cmd: Command,
    input: Option<&[u8]>,
    timeout: Duration,
) -> anyhow::Result<Output> {
    let desc = format!("{cmd:?}");
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {desc}"))?;
    let writer = child
        .stdin
        .take()
        .zip(input.map(<[u8]>::to_vec))
        .map(|(mut stdin, data)| {
            std::thread::spawn(move || {
                let _ = stdin.write_all(&data);
            })
        });
    let mut stdout = child.stdout.take().context("no stdout")?;
    let mut stderr = child.stderr.take().context("no stderr")?;
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            scene.note(&format!("TIMEOUT after {timeout:?}: {desc}"));
            bail!("timed out after {timeout:?}: {desc}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let output = Output {
        status: status.code(),
        stdout: out.join().unwrap_or_default(),
        stderr: String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned(),
    };
    let shown = if output.stdout.len() > 2000 {
        format!("<{} bytes>", output.stdout.len())
    } else {
        output.text()
    };
    scene.note(&format!(
        "run {desc}\n  -> status {:?}\n  stdout: {}\n  stderr: {}",
        output.status,
        shown.trim_end(),
        output.stderr.trim_end()
    ));
    Ok(output)
}
