//! `jusy`: the client's convenience CLI. It does what the documented flow does
//! by hand — `curl` the order, save the key and the `known_hosts` line, run
//! `ssh` with strict host-key checking — and checks an order's receipts
//! itself, so a client need not trust the broker's word for the CPU it used.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use jusy_common::identity::PeerId;
use jusy_common::receipt::{ChainVerifier, SignedReceipt};
use jusy_common::wire::OrderId;
use serde_json::Value;

/// Order jusy SSH sessions and check their receipts.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Order a session (charges one CPU-hour), save its key, and print the ssh
    /// command — or run it with `--ssh`.
    Order {
        /// Broker URL, e.g. https://broker.example or http://127.0.0.1:8080.
        broker: String,
        /// Your client hash.
        hash: String,
        /// Where to keep each order's key and known_hosts.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Log in right away; arguments after `--` go to ssh.
        #[arg(long)]
        ssh: bool,
        #[arg(last = true)]
        ssh_args: Vec<String>,
    },
    /// Show an order's state and verify its receipts.
    Status {
        broker: String,
        hash: String,
        order_id: String,
    },
}

/// GET through the system's `curl`: the JSON body, or the broker's error.
fn get(url: &str) -> anyhow::Result<Value> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "-w", "\n%{http_code}", url])
        .output()
        .context("running curl (is it installed?)")?;
    if !out.status.success() {
        bail!("curl: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text
        .rsplit_once('\n')
        .context("no answer from the broker")?;
    let json: Value = serde_json::from_str(body)
        .with_context(|| format!("broker answered HTTP {code}, not JSON"))?;
    if json.get("status").and_then(Value::as_str) != Some("OK") {
        let error = json
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("unknown error");
        bail!("broker refused (HTTP {}): {error}", code.trim());
    }
    Ok(json)
}

fn field<'a>(v: &'a Value, k: &str) -> anyhow::Result<&'a str> {
    v.get(k)
        .and_then(Value::as_str)
        .with_context(|| format!("answer has no {k}"))
}

fn default_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map_or_else(|| PathBuf::from("."), PathBuf::from)
        .join(".jusy/orders")
}

fn save(dir: &Path, order: &Value) -> anyhow::Result<(PathBuf, PathBuf)> {
    let order_id: OrderId = field(order, "order_id")?.parse()?;
    let dir = dir.join(order_id.to_string());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = dir.join("key");
    std::fs::write(&key, field(order, "privkey")?)?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    let known_hosts = dir.join("known_hosts");
    std::fs::write(&known_hosts, format!("{}\n", field(order, "known_hosts")?))?;
    std::fs::write(dir.join("order.json"), serde_json::to_vec_pretty(order)?)?;
    Ok((key, known_hosts))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Order {
            broker,
            hash,
            dir,
            ssh,
            ssh_args,
        } => {
            let order = get(&format!("{}/order/{hash}", broker.trim_end_matches('/')))?;
            let (key, known_hosts) = save(&dir.unwrap_or_else(default_dir), &order)?;
            let port = order
                .get("port")
                .and_then(Value::as_u64)
                .context("answer has no port")?
                .to_string();
            let mut args = vec![
                "-i".to_owned(),
                key.display().to_string(),
                "-o".to_owned(),
                format!("UserKnownHostsFile={}", known_hosts.display()),
                "-o".to_owned(),
                "StrictHostKeyChecking=yes".to_owned(),
                "-l".to_owned(),
                field(&order, "username")?.to_owned(),
                "-p".to_owned(),
                port,
                field(&order, "host")?.to_owned(),
            ];
            // Where the node has AES instructions, the broker names the
            // ciphers to prefer: put them before the host.
            if let Some(ciphers) = order.get("ssh_ciphers").and_then(Value::as_str) {
                let at = args.len() - 1;
                args.insert(at, "-c".to_owned());
                args.insert(at + 1, ciphers.to_owned());
            }
            eprintln!(
                "order {} on node {}",
                field(&order, "order_id")?,
                field(&order, "node_id")?
            );
            if ssh {
                let err = Command::new("ssh").args(&args).args(&ssh_args).exec();
                bail!("running ssh: {err}");
            }
            println!("ssh {}", args.join(" "));
            Ok(())
        }
        Cmd::Status {
            broker,
            hash,
            order_id,
        } => {
            let status = get(&format!(
                "{}/order/{hash}/{order_id}",
                broker.trim_end_matches('/')
            ))?;
            let id: OrderId = order_id.parse()?;
            let node: PeerId = field(&status, "node_id")?.parse()?;
            let mut chain = ChainVerifier::new(id, node);
            let receipts = status
                .get("receipts")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for (i, r) in receipts.iter().enumerate() {
                let bytes = hex::decode(r.as_str().unwrap_or_default())
                    .with_context(|| format!("receipt {i} is not hex"))?;
                let signed =
                    SignedReceipt::decode(&bytes).with_context(|| format!("receipt {i}"))?;
                chain
                    .accept(&signed)
                    .with_context(|| format!("receipt {i}"))?;
            }
            println!("{}", serde_json::to_string_pretty(&status)?);
            match chain.last() {
                Some(r) => eprintln!(
                    "{} receipts verified against node {}: {:.3} CPU-seconds, peak memory {} bytes{}",
                    receipts.len(),
                    node.short(),
                    r.cpu_us as f64 / 1e6,
                    r.peak_mem,
                    r.finish
                        .map(|f| format!(", ended {}", f.code()))
                        .unwrap_or_default()
                ),
                None => eprintln!("no receipts yet"),
            }
            Ok(())
        }
    }
}
