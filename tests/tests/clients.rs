//! SSH clients nobody here wrote log in to devnet-style orders with strict
//! host-key checking: paramiko (AES-CTR only), asyncssh, Dropbear's
//! `dbclient`, PuTTY's `plink`; and `ssh-audit` finds nothing weak in what
//! the node offers. Each client gets an order of its own and must print what
//! the session ran.

// Test code: a panic is how a check fails.
#![allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use jusy_tests::process::{self, Output};
use jusy_tests::{Broker, Login, Node, Scene, e2e};

/// Debian's python, whose packages (paramiko, asyncssh) the tests use.
const PYTHON: &str = "/usr/bin/python3";
const TIMEOUT: Duration = Duration::from_secs(60);

/// A broker with one client and a node with two ready sessions.
fn network(scene: &Scene) -> anyhow::Result<(Broker, Node, String)> {
    let data = scene.subdir("broker")?;
    let client = Broker::add_client(scene, &data)?;
    let broker = Broker::start(scene, "broker", data, 0)?;
    let node = Node::start(scene, "node", &broker, &["--ready-slots", "2"])?;
    broker.wait_capacity(scene, 2)?;
    Ok((broker, node, client))
}

fn order(scene: &Scene, broker: &Broker, client: &str) -> anyhow::Result<Login> {
    let (status, body) = broker.order(scene, client)?;
    anyhow::ensure!(status == 200, "order failed with {status}: {body}");
    Login::from_order(scene, &body)
}

fn run(scene: &Scene, cmd: Command) -> anyhow::Result<Output> {
    process::run(scene, cmd, None, TIMEOUT)
}

/// The session's answer to `echo`, as a client printed it.
fn expect_echo(out: &Output, word: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        out.status == Some(0) && out.text().lines().any(|l| l.trim() == word),
        "status {:?}, stdout {:?}, stderr {}",
        out.status,
        out.text(),
        out.stderr
    );
    Ok(())
}

/// Whether a check for something the tests need passes; a missing one fails
/// the test in CI, where `.ci/run` installs it (`package`), and skips it
/// elsewhere with a message.
fn present(mut check: Command, package: &str) -> bool {
    let found = check.output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{package} is missing; .ci/run installs it"
        );
        eprintln!("skipped: {package} is not installed (apt-get install it to run this test)");
    }
    found
}

/// Whether a tool is installed.
fn have(tool: &str) -> bool {
    let mut check = Command::new("sh");
    check.args(["-c", &format!("command -v {tool}")]);
    present(check, tool)
}

/// Whether Debian's python has a module.
fn have_module(module: &str) -> bool {
    let mut check = Command::new(PYTHON);
    check.args(["-c", &format!("import {module}")]);
    present(check, &format!("python3-{module}"))
}

#[test]
fn paramiko_and_asyncssh_log_in_with_strict_host_keys() {
    if !have_module("paramiko") || !have_module("asyncssh") {
        return;
    }
    e2e("paramiko_and_asyncssh", |scene| {
        let (broker, _node, client) = network(scene)?;

        let a = order(scene, &broker, &client)?;
        // Precondition of strictness: paramiko refuses a host it does not know.
        let script = "import sys, paramiko\n\
                      host, port, user, key, known = sys.argv[1:6]\n\
                      c = paramiko.SSHClient()\n\
                      if known != '-': c.load_host_keys(known)\n\
                      c.set_missing_host_key_policy(paramiko.RejectPolicy())\n\
                      c.connect(host, port=int(port), username=user, pkey=paramiko.Ed25519Key.from_private_key_file(key), look_for_keys=False, allow_agent=False, timeout=20)\n\
                      _, out, _ = c.exec_command('echo via-' + paramiko.__name__)\n\
                      sys.stdout.write(out.read().decode())\n\
                      print('cipher', c.get_transport().remote_cipher)\n";
        let paramiko = |known: &str| {
            let mut cmd = Command::new(PYTHON);
            cmd.args(["-c", script, &a.host, &a.port.to_string(), &a.user])
                .arg(&a.key)
                .arg(known);
            cmd
        };
        let out = run(scene, paramiko("-"))?;
        anyhow::ensure!(
            out.status != Some(0) && out.stderr.contains("not found in known_hosts"),
            "paramiko without the host key: {:?} {}",
            out.status,
            out.stderr
        );
        let out = run(scene, paramiko(&a.known_hosts.display().to_string()))?;
        expect_echo(&out, "via-paramiko")?;
        scene.note(&out.text());

        let b = order(scene, &broker, &client)?;
        let script = "import sys, asyncio, asyncssh\n\
                      host, port, user, key, known = sys.argv[1:6]\n\
                      async def main():\n    \
                          async with asyncssh.connect(host, port=int(port), username=user, client_keys=[key], known_hosts=known, agent_path=None) as c:\n        \
                              r = await c.run('echo via-asyncssh', check=True)\n        \
                              print(r.stdout, end='')\n\
                      asyncio.run(main())\n";
        let mut cmd = Command::new(PYTHON);
        cmd.args(["-c", script, &b.host, &b.port.to_string(), &b.user])
            .arg(&b.key)
            .arg(&b.known_hosts);
        expect_echo(&run(scene, cmd)?, "via-asyncssh")?;
        Ok(())
    });
}

#[test]
fn dropbear_and_putty_log_in_with_strict_host_keys() {
    if !have("dbclient") || !have("plink") || !have("puttygen") {
        return;
    }
    e2e("dropbear_and_putty", |scene| {
        let (broker, _node, client) = network(scene)?;

        // Dropbear: its own key format, and known_hosts in $HOME/.ssh.
        let a = order(scene, &broker, &client)?;
        let home = scene.subdir("dropbear-home")?;
        std::fs::create_dir_all(home.join(".ssh"))?;
        let db_key = a.dir.join("key.dropbear");
        let mut convert = Command::new("dropbearconvert");
        convert
            .args(["openssh", "dropbear"])
            .arg(&a.key)
            .arg(&db_key);
        let out = run(scene, convert)?;
        anyhow::ensure!(out.status == Some(0), "dropbearconvert: {}", out.stderr);
        let dbclient = |home: &std::path::Path, answer: &'static [u8]| {
            // Without a terminal (setsid) dbclient asks on its input.
            let mut cmd = Command::new("setsid");
            cmd.env("HOME", home)
                .args(["-w", "dbclient", "-i"])
                .arg(&db_key)
                .args(["-p", &a.port.to_string(), "-l", &a.user, &a.host])
                .arg("echo via-dropbear");
            (cmd, answer)
        };
        let run_db =
            |(cmd, answer): (Command, &[u8])| process::run(scene, cmd, Some(answer), TIMEOUT);
        // Precondition of strictness: asked about an unknown host key and
        // told no, dbclient refuses.
        let out = run_db(dbclient(&home, b"n\n"))?;
        anyhow::ensure!(
            out.status != Some(0) && out.stderr.contains("Didn't validate host key"),
            "dbclient and an unknown host: {:?} {}",
            out.status,
            out.stderr
        );
        // Dropbear's known_hosts names hosts without ports.
        let line = std::fs::read_to_string(&a.known_hosts)?;
        let (_, key) = line
            .split_once(' ')
            .ok_or_else(|| anyhow::anyhow!("known_hosts line {line:?}"))?;
        std::fs::write(home.join(".ssh/known_hosts"), format!("{} {key}", a.host))?;
        expect_echo(&run_db(dbclient(&home, b""))?, "via-dropbear")?;

        // PuTTY: a .ppk key and the host key's fingerprint pinned.
        let b = order(scene, &broker, &client)?;
        let ppk = b.dir.join("key.ppk");
        let mut keygen = Command::new("puttygen");
        keygen.arg(&b.key).args(["-O", "private", "-o"]).arg(&ppk);
        let out = run(scene, keygen)?;
        anyhow::ensure!(out.status == Some(0), "puttygen: {}", out.stderr);
        let mut fp = Command::new("ssh-keygen");
        fp.arg("-lf").arg(&b.known_hosts);
        let out = run(scene, fp)?;
        let fingerprint = out
            .text()
            .split_whitespace()
            .nth(1)
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("no fingerprint in {:?}", out.text()))?;
        let plink = |hostkey: &str| {
            let mut cmd = Command::new("plink");
            cmd.args(["-batch", "-ssh", "-noagent", "-hostkey", hostkey, "-i"])
                .arg(&ppk)
                .args(["-P", &b.port.to_string(), "-l", &b.user, &b.host])
                .arg("echo via-putty");
            cmd
        };
        let wrong = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        let out = run(scene, plink(wrong))?;
        anyhow::ensure!(out.status != Some(0), "plink trusted a wrong host key");
        expect_echo(&run(scene, plink(&fingerprint))?, "via-putty")?;
        Ok(())
    });
}

#[test]
fn ssh_audit_finds_nothing_weak() {
    if !have("ssh-audit") {
        return;
    }
    e2e("ssh_audit", |scene| {
        let (broker, _node, client) = network(scene)?;
        let a = order(scene, &broker, &client)?;
        let mut cmd = Command::new("ssh-audit");
        cmd.args(["-n", "-p", &a.port.to_string(), &a.host]);
        let out = run(scene, cmd)?;
        let text = out.text();
        scene.note(&text);
        // Precondition: the audit reached the node and read its offer.
        anyhow::ensure!(
            text.contains("aes128-gcm@openssh.com") && text.contains("chacha20-poly1305"),
            "ssh-audit did not read the offer: {text}\n{}",
            out.stderr
        );
        // ssh-audit 2.5 (Debian 12) has never heard of the hybrid
        // post-quantum exchange and strict key exchange, both newer than it:
        // "unknown algorithm" is its gap, not a weakness.
        let weak: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("[fail]") || l.contains("[warn]"))
            .filter(|l| !l.contains("unknown algorithm"))
            .collect();
        anyhow::ensure!(weak.is_empty(), "ssh-audit warns:\n{}", weak.join("\n"));
        Ok(())
    });
}
