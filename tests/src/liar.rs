//! `jusy-liar`, the node that lies (`tests/src/bin/jusy-liar/`), started
//! against a broker as `jusy-node` is, and a client's plain TCP "login" to an
//! order port it serves (it runs no SSH: a `LOGIN` line is the login).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::Context;

use crate::jusy::{Broker, READY};
use crate::process::{Proc, bin};
use crate::scene::Scene;

/// A running liar.
#[derive(Debug)]
pub struct Liar {
    pub proc: Proc,
    /// Its identity (hex), from its `registered` event.
    pub node_id: String,
}

impl Liar {
    /// Starts `jusy-liar --lie <lie>` against `broker`, earning for the owner
    /// whose hash is `owner` (in the environment, as for `jusy-node`), and
    /// waits until the relay welcomed it; `extra` are more flags.
    pub fn start(
        scene: &Scene,
        name: &str,
        broker: &Broker,
        lie: &str,
        owner: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut cmd = broker.site.command(bin("jusy-liar")?);
        cmd.arg("--broker")
            .arg(broker.relay.to_string())
            .args(["--broker-key", &broker.key, "--lie", lie])
            .arg("--data-dir")
            .arg(scene.subdir(name)?)
            .args(extra)
            .env("JUSY_OWNER", owner);
        let mut proc = Proc::start(scene, name, cmd)?;
        let registered = proc.wait_event("registered", READY)?;
        let node_id = registered["node_id"]
            .as_str()
            .context("no node_id in the registered event")?
            .to_owned();
        Ok(Self { proc, node_id })
    }
}

/// A client's TCP connection to an order port that a liar serves.
#[derive(Debug)]
pub struct LiarConnection {
    reader: BufReader<TcpStream>,
}

impl LiarConnection {
    /// Connects to the order port at `host:port` and reads the liar's
    /// banner, which shows the connection reached it.
    pub fn open(host: &str, port: u16) -> anyhow::Result<Self> {
        let conn = TcpStream::connect((host, port))?;
        conn.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut c = Self {
            reader: BufReader::new(conn),
        };
        let banner = c.line()?;
        anyhow::ensure!(banner == "jusy-liar", "not the liar's banner: {banner:?}");
        Ok(c)
    }

    /// Connects and logs in: the liar reports a login on this connection.
    pub fn log_in(host: &str, port: u16) -> anyhow::Result<Self> {
        let mut c = Self::open(host, port)?;
        c.reader.get_mut().write_all(b"LOGIN\n")?;
        let answer = c.line()?;
        anyhow::ensure!(answer == "logged-in", "the liar answered {answer:?}");
        Ok(c)
    }

    fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        Ok(line.trim_end().to_owned())
    }

    /// Whether the broker (or the liar) closed the connection within `wait`.
    pub fn closed_within(&mut self, wait: Duration) -> anyhow::Result<bool> {
        self.reader.get_ref().set_read_timeout(Some(wait))?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Ok(true),
            Ok(_) => Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(true),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }
}
