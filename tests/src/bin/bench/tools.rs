//! The contenders jusy is compared with, started on loopback the way their users
//! start them: stock `sshd` with its own config and host key, an `ssh -R`
//! reverse relay, `bore` and `rathole` tunnels; also the node's own SSH server
//! over plain TCP, and installing whatever is missing.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use jusy_node::sandbox::init::{InitConfig, SessionInit};
use jusy_node::sandbox::user::SessionUser;
use jusy_node::ssh::Access;
use jusy_node::ssh::channel::{ChannelCaps, ChannelCtx};
use jusy_tests::lab::in_netns;
use jusy_tests::process::Proc;
use jusy_tests::{Scene, Site};

/// Finds `name` on PATH or in Cargo's bin directory.
pub fn which(name: &str) -> Option<PathBuf> {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|d| d.join("bin"));
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain(cargo_bin)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Installs what the bench compares against when it is missing: `sshd` from
/// Debian, `bore` and `rathole` from the crates registry (minutes, once).
pub fn install_missing() -> anyhow::Result<()> {
    if which("sshd").is_none() {
        eprintln!("bench: installing openssh-server (apt-get)");
        run_ok(Command::new("apt-get").args(["install", "-y", "openssh-server"]))?;
    }
    if which("bore").is_none() {
        eprintln!("bench: cargo install --locked bore-cli (takes minutes, once)");
        run_ok(Command::new("cargo").args(["install", "--locked", "bore-cli"]))?;
    }
    if which("rathole").is_none() {
        // Not --locked: rathole 0.5's lock file pins a `time` that no longer
        // builds. Plain TCP transport only, as compared here.
        eprintln!("bench: cargo install rathole (takes minutes, once)");
        run_ok(Command::new("cargo").args([
            "install",
            "rathole",
            "--no-default-features",
            "--features",
            "server,client",
        ]))?;
    }
    Ok(())
}

fn run_ok(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("{cmd:?}"))?;
    anyhow::ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}

/// A free loopback port (bound then released: the tools below want a number).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Waits until an SSH server answers on `addr` with its version banner.
pub fn wait_banner(addr: SocketAddr) -> anyhow::Result<()> {
    use std::io::Read;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut b = [0u8; 4];
            s.read_exact(&mut b)?;
            Ok(b)
        });
        if matches!(got, Ok(b) if &b == b"SSH-") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no SSH banner on {addr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Keys and client configuration shared by every OpenSSH client the bench runs.
#[derive(Debug)]
pub struct Keys {
    pub client_key: PathBuf,
    pub client_pub: String,
    pub host_key: PathBuf,
    pub host_pub: String,
    pub authorized_keys: PathBuf,
    pub known_hosts: PathBuf,
    pub ssh_config: PathBuf,
}

impl Keys {
    pub fn make(dir: &Path) -> anyhow::Result<Self> {
        let keygen = |name: &str| -> anyhow::Result<(PathBuf, String)> {
            let path = dir.join(name);
            run_ok(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                    .arg(&path),
            )?;
            let public = std::fs::read_to_string(path.with_extension("pub"))?;
            let public = public
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ");
            Ok((path, public))
        };
        let (client_key, client_pub) = keygen("client_key")?;
        let (host_key, host_pub) = keygen("host_key")?;
        let authorized_keys = dir.join("authorized_keys");
        std::fs::write(&authorized_keys, format!("{client_pub}\n"))?;
        let known_hosts = dir.join("known_hosts");
        std::fs::write(&known_hosts, "")?;
        let ssh_config = dir.join("ssh_config");
        std::fs::write(
            &ssh_config,
            format!(
                "Host *\n  IdentityFile {}\n  IdentitiesOnly yes\n  BatchMode yes\n  \
                 StrictHostKeyChecking yes\n  UserKnownHostsFile {}\n  ConnectTimeout 20\n  \
                 LogLevel ERROR\n",
                client_key.display(),
                known_hosts.display()
            ),
        )?;
        Ok(Self {
            client_key,
            client_pub,
            host_key,
            host_pub,
            authorized_keys,
            known_hosts,
            ssh_config,
        })
    }

    /// Trusts `host_key` (`type base64`) for `127.0.0.1:port`.
    pub fn trust(&self, port: u16, host_key: &str) -> anyhow::Result<()> {
        self.trust_line(&format!("[127.0.0.1]:{port} {host_key}"))
    }

    pub fn trust_line(&self, line: &str) -> anyhow::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.known_hosts)?;
        writeln!(f, "{line}")?;
        Ok(())
    }
}

/// Stock `sshd` on a loopback port with its own config; the bench's client key
/// may log in as any user.
pub fn sshd(scene: &Scene, name: &str, keys: &Keys) -> anyhow::Result<(Proc, u16)> {
    let port = free_port()?;
    Ok((sshd_at(scene, name, keys, &Site::local(), port)?, port))
}

/// Stock `sshd` at `site` (a lab host, or this machine's loopback) on `port`,
/// trusted by the bench's clients; the bench's client key may log in as any
/// user.
pub fn sshd_at(
    scene: &Scene,
    name: &str,
    keys: &Keys,
    site: &Site,
    port: u16,
) -> anyhow::Result<Proc> {
    std::fs::create_dir_all("/run/sshd")?;
    let config = scene.dir().join(format!("{name}.conf"));
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress {}\nHostKey {}\nAuthorizedKeysFile {}\n\
             PidFile none\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n\
             AllowTcpForwarding yes\nX11Forwarding no\nPrintMotd no\nPrintLastLog no\n\
             Subsystem sftp internal-sftp\nLogLevel ERROR\n",
            site.ip,
            keys.host_key.display(),
            keys.authorized_keys.display()
        ),
    )?;
    let sshd = which("sshd").context("sshd is not installed")?;
    let mut cmd = site.command(sshd);
    cmd.args(["-D", "-e", "-f"]).arg(&config);
    let proc = Proc::start(scene, name, cmd)?;
    let addr = SocketAddr::new(site.ip, port);
    match &site.netns {
        Some(ns) => in_netns(ns, move || wait_banner(addr))??,
        None => wait_banner(addr)?,
    }
    let host = if port == 22 {
        site.ip.to_string()
    } else {
        format!("[{}]:{port}", site.ip)
    };
    keys.trust_line(&format!("{host} {}", keys.host_pub))?;
    Ok(proc)
}

/// The classic reverse relay: the "node" holds `ssh -N -R` to a relay sshd,
/// forwarding a relay port to each of `targets`. Returns the relay ports.
pub fn reverse_relay(
    scene: &Scene,
    keys: &Keys,
    user: &str,
    relay_port: u16,
    targets: &[SocketAddr],
) -> anyhow::Result<(Proc, Vec<u16>)> {
    let ports = targets
        .iter()
        .map(|_| free_port())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut cmd = Command::new("ssh");
    cmd.env_remove("SSH_AUTH_SOCK")
        .arg("-F")
        .arg(&keys.ssh_config)
        .args(["-N", "-o", "ExitOnForwardFailure=yes"]);
    for (port, target) in ports.iter().zip(targets) {
        cmd.arg("-R").arg(format!("127.0.0.1:{port}:{target}"));
    }
    cmd.args(["-p", &relay_port.to_string(), &format!("{user}@127.0.0.1")]);
    let proc = Proc::start(scene, "ssh-reverse", cmd)?;
    Ok((proc, ports))
}

/// `bore server` and one `bore local` per target; returns the public ports.
/// bore's control port is fixed (7835) by bore itself.
pub fn bore(scene: &Scene, targets: &[SocketAddr]) -> anyhow::Result<(Vec<Proc>, Vec<u16>)> {
    let bore = which("bore").context("bore is not installed")?;
    let mut procs = Vec::new();
    let mut server = Command::new(&bore);
    server.args(["server", "--bind-addr", "127.0.0.1"]);
    procs.push(Proc::start(scene, "bore-server", server)?);
    wait_port(local(7835))?;
    let mut ports = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        let port = free_port()?;
        let mut client = Command::new(&bore);
        client
            .args(["local", &target.port().to_string(), "--local-host"])
            .arg(target.ip().to_string())
            .args(["--to", "127.0.0.1", "--port", &port.to_string()]);
        procs.push(Proc::start(scene, &format!("bore-local{i}"), client)?);
        ports.push(port);
    }
    Ok((procs, ports))
}

/// A `rathole` server and client with one TCP service per target; returns the
/// public ports.
pub fn rathole(scene: &Scene, targets: &[SocketAddr]) -> anyhow::Result<(Vec<Proc>, Vec<u16>)> {
    let rathole = which("rathole").context("rathole is not installed")?;
    let control = free_port()?;
    let mut server = format!("[server]\nbind_addr = \"127.0.0.1:{control}\"\n");
    let mut client = format!("[client]\nremote_addr = \"127.0.0.1:{control}\"\n");
    let mut ports = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        let port = free_port()?;
        server += &format!(
            "[server.services.s{i}]\ntoken = \"bench\"\nbind_addr = \"127.0.0.1:{port}\"\n"
        );
        client +=
            &format!("[client.services.s{i}]\ntoken = \"bench\"\nlocal_addr = \"{target}\"\n");
        ports.push(port);
    }
    let server_toml = scene.dir().join("rathole-server.toml");
    let client_toml = scene.dir().join("rathole-client.toml");
    std::fs::write(&server_toml, server)?;
    std::fs::write(&client_toml, client)?;
    let mut procs = Vec::new();
    let mut cmd = Command::new(&rathole);
    cmd.arg("-s").arg(&server_toml);
    procs.push(Proc::start(scene, "rathole-server", cmd)?);
    wait_port(local(control))?;
    let mut cmd = Command::new(&rathole);
    cmd.arg("-c").arg(&client_toml);
    procs.push(Proc::start(scene, "rathole-client", cmd)?);
    Ok((procs, ports))
}

fn wait_port(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {addr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The node's SSH server (`jusy_node::ssh`) on a plain loopback TCP port, for
/// one session user the bench created; the client key may log in as that user.
pub async fn node_ssh_direct(
    scene: &Scene,
    user: SessionUser,
    client_pub: &str,
) -> anyhow::Result<(u16, String)> {
    let host_key = jusy_node::keys::load_or_create_host_key(&scene.subdir("node-direct")?)?;
    let host_pub = host_key.public_key().to_openssh()?;
    let config = jusy_node::ssh::config(host_key);
    // Only the user and the init that starts its programs: this column
    // measures the SSH server, not the cgroup, namespaces and disk a node
    // would add.
    let init = SessionInit::start(
        &std::env::current_exe()?.with_file_name("jusy-node"),
        &InitConfig {
            isolate: false,
            net_namespace: false,
            uid: user.uid,
            gid: user.gid,
            home: user.home.clone(),
            hostname: user.name.clone(),
            binds: Vec::new(),
            resolv_conf: None,
        },
        Vec::new(),
    )
    .await?;
    let access = Arc::new(Access {
        ctx: Arc::new(ChannelCtx {
            sandbox: jusy_node::sandbox::Sandbox {
                user,
                cgroup: None,
                disk: None,
                init: Some(init),
                net: std::sync::Mutex::new(None),
            },
            sftp_server: PathBuf::from("/usr/lib/openssh/sftp-server"),
            backlog: Arc::default(),
            caps: ChannelCaps {
                per_connection: 10,
                per_session: 32,
            },
            open: Arc::default(),
        }),
        keys: vec![russh::keys::PublicKey::from_openssh(client_pub)?],
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            // The bench measures the SSH server alone: its logins count for nothing.
            let (login, _) = tokio::sync::oneshot::channel();
            tokio::spawn(jusy_node::ssh::serve(
                config.clone(),
                tcp,
                access.clone(),
                login,
            ));
        }
    });
    Ok((port, host_pub))
}
