//! A stranger who found an order port (ports are easy to scan) against the
//! client who bought it: idle TCP connections held on the port must neither
//! lock the client out nor count as the client's connection, so the order is
//! refunded as never connected when only such connections came.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use jusy_tests::{Broker, Login, Node, Scene, e2e};
use serde_json::Value;

/// The node's login grace time in these tests (`--login-grace-secs`).
const LOGIN_GRACE: Duration = Duration::from_secs(6);

/// Connections an order port keeps that have not logged in (the broker's
/// `relay::splice::MAX_UNAUTHENTICATED`).
const MAX_UNAUTHENTICATED: usize = 8;

/// A broker (with `broker_args`) selling a session grace of `grace_secs`,
/// with one client, and a node with one ready session, a short login grace
/// time and that grace.
fn network(
    scene: &Scene,
    broker_args: &[&str],
    grace_secs: &str,
) -> anyhow::Result<(Broker, Node, String)> {
    let data = scene.subdir("broker")?;
    let client = Broker::add_client(scene, &data)?;
    // The broker sells the session grace; the node offers at most as much.
    let mut args = vec!["--grace-secs", grace_secs];
    args.extend_from_slice(broker_args);
    let broker = Broker::start_with(scene, "broker", data, 0, &args)?;
    let grace = LOGIN_GRACE.as_secs().to_string();
    let node = Node::start(
        scene,
        "node",
        &broker,
        &[
            "--ready-slots",
            "1",
            "--grace-secs",
            grace_secs,
            "--login-grace-secs",
            &grace,
        ],
    )?;
    broker.wait_capacity(scene, 1)?;
    Ok((broker, node, client))
}

fn order(scene: &Scene, broker: &Broker, client: &str) -> anyhow::Result<(Login, Value)> {
    let (status, body) = broker.order(scene, client)?;
    anyhow::ensure!(status == 200, "order failed with {status}: {body}");
    Ok((Login::from_order(scene, &body)?, body))
}

/// Whether the peer has closed `conn` (end of stream or reset) within `wait`.
fn closed_within(conn: &mut TcpStream, wait: Duration) -> anyhow::Result<bool> {
    conn.set_read_timeout(Some(wait))?;
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + wait;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return Ok(true),
            // More of the node's key exchange: still open.
            Ok(_) if Instant::now() < deadline => continue,
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(true),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Opens a TCP connection to the order port that reaches the node (it gets
/// the node's SSH banner) and then says nothing; checks it is held open.
fn idle(login: &Login) -> anyhow::Result<TcpStream> {
    let mut conn = TcpStream::connect((login.host.as_str(), login.port))?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = Vec::new();
    let mut byte = [0u8];
    while line.last() != Some(&b'\n') {
        anyhow::ensure!(
            conn.read(&mut byte)? == 1,
            "closed before the banner: {:?}",
            String::from_utf8_lossy(&line)
        );
        line.push(byte[0]);
    }
    anyhow::ensure!(
        line.starts_with(b"SSH-2.0-"),
        "not the node's banner: {:?}",
        String::from_utf8_lossy(&line)
    );
    anyhow::ensure!(
        !closed_within(&mut conn, Duration::from_millis(200))?,
        "the connection is not held open"
    );
    Ok(conn)
}

/// Watches `conn` in a thread: when it was closed, if within `wait`.
fn watch(mut conn: TcpStream, wait: Duration) -> std::thread::JoinHandle<Option<Instant>> {
    std::thread::spawn(move || {
        closed_within(&mut conn, wait)
            .ok()
            .and_then(|closed| closed.then(Instant::now))
    })
}

#[test]
fn idle_connections_lock_no_client_out_and_are_closed_after_the_login_grace() {
    e2e(
        "idle_connections_lock_no_client_out_and_are_closed_after_the_login_grace",
        |scene| {
            // The session outlives the first login until the second.
            let (broker, _node, client) = network(scene, &[], "300")?;
            let (login, _) = order(scene, &broker, &client)?;

            // As many idle connections as the port keeps without a login, all
            // held open, then the client logs in.
            let mut first = (0..MAX_UNAUTHENTICATED)
                .map(|_| idle(&login))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let held = first
                .iter_mut()
                .map(|c| closed_within(c, Duration::from_millis(10)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            anyhow::ensure!(held.iter().all(|c| !c), "idle ones closed early: {held:?}");
            let out = login.ssh(scene, "echo in", None)?;
            anyhow::ensure!(
                out.status == Some(0) && out.text() == "in\n",
                "the client was locked out: {:?} {}",
                out.status,
                out.stderr
            );

            // As many again: the newer idle ones push the older ones out, and
            // the client still gets in.
            let mut second = Vec::new();
            for _ in 0..MAX_UNAUTHENTICATED {
                second.push((Instant::now(), idle(&login)?));
            }
            for (i, c) in first.iter_mut().enumerate() {
                anyhow::ensure!(
                    closed_within(c, Duration::from_secs(30))?,
                    "older idle connection {i} is still open"
                );
            }
            let out = login.ssh(scene, "echo again", None)?;
            anyhow::ensure!(
                out.status == Some(0) && out.text() == "again\n",
                "the client was locked out: {:?} {}",
                out.status,
                out.stderr
            );

            // The idle ones left are closed by the node's login grace time,
            // none before it.
            let watched: Vec<_> = second
                .into_iter()
                .map(|(opened, c)| (opened, watch(c, LOGIN_GRACE + Duration::from_secs(60))))
                .collect();
            let mut by_grace = 0;
            for (i, (opened, w)) in watched.into_iter().enumerate() {
                let closed = w.join().map_err(|_| anyhow::anyhow!("watcher panicked"))?;
                let Some(closed) = closed else {
                    anyhow::bail!("idle connection {i} outlived the login grace time");
                };
                if closed.duration_since(opened) >= LOGIN_GRACE {
                    by_grace += 1;
                }
            }
            // The client's second login pushed out only the oldest one.
            anyhow::ensure!(
                by_grace >= MAX_UNAUTHENTICATED - 1,
                "only {by_grace} lived out their login grace time"
            );
            Ok(())
        },
    )
}

#[test]
fn an_order_only_strangers_connect_to_is_refunded_as_never_connected() {
    e2e(
        "an_order_only_strangers_connect_to_is_refunded_as_never_connected",
        |scene| {
            let (broker, _node, client) = network(scene, &["--connect-window-secs", "20"], "1")?;
            let balance = |broker: &Broker| -> anyhow::Result<u64> {
                let (status, account) = broker.get(scene, &format!("/account/{client}"))?;
                anyhow::ensure!(status == 200, "{account}");
                account["balance_sat"]
                    .as_u64()
                    .ok_or_else(|| anyhow::anyhow!("no balance: {account}"))
            };
            let before = balance(&broker)?;
            let (login, body) = order(scene, &broker, &client)?;
            let price = body["price_sat"].as_u64().unwrap_or_default();
            anyhow::ensure!(price > 0, "{body}");
            anyhow::ensure!(balance(&broker)? == before - price, "the order is charged");

            // Connections that reach the node but never log in: silent, then
            // sending garbage, or an SSH version and no more.
            let mut strangers = [idle(&login)?, idle(&login)?, idle(&login)?];
            strangers[1].write_all(b"GET / HTTP/1.0\r\n\r\n\x00\xff\x13garbage")?;
            strangers[2].write_all(b"SSH-2.0-OpenSSH_9.6\r\n")?;
            // An ssh with a key that is not the order's, and with the order's
            // key as another user: both talk to the node and are refused.
            let dir = scene.subdir("stranger")?;
            let key = dir.join("key");
            let made = std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&key)
                .status()?
                .success();
            anyhow::ensure!(made, "ssh-keygen failed");
            let mut wrong_key = login.ssh_command(&key, &[]);
            wrong_key.arg("true");
            let mut wrong_user = login.ssh_command_as(&login.key, "root", &[]);
            wrong_user.arg("true");
            for ssh in [wrong_key, wrong_user] {
                let out = jusy_tests::process::run(scene, ssh, None, Duration::from_secs(60))?;
                anyhow::ensure!(
                    out.status == Some(255) && out.stderr.contains("Permission denied"),
                    "a stranger's ssh was not refused by the node: {:?} {}",
                    out.status,
                    out.stderr
                );
            }
            let (_, status) = broker.get(scene, &format!("/order/{client}/{}", login.order_id))?;
            anyhow::ensure!(
                status["state"] == "RESERVED",
                "strangers' connections counted: {status}"
            );

            // The order ends as never connected, with everything back.
            let deadline = Instant::now() + Duration::from_secs(120);
            let settled = loop {
                let (code, body) =
                    broker.get(scene, &format!("/order/{client}/{}", login.order_id))?;
                anyhow::ensure!(code == 200, "{body}");
                if body["finished"] == true {
                    break body;
                }
                anyhow::ensure!(Instant::now() < deadline, "never settled: {body}");
                std::thread::sleep(Duration::from_millis(500));
            };
            anyhow::ensure!(
                settled["state"] == "NEVER_CONNECTED"
                    && settled["cancelled"] == true
                    && settled["settlement"]["refund"] == price,
                "not refunded as never connected: {settled}"
            );
            anyhow::ensure!(balance(&broker)? == before, "the refund is on the account");
            // All were closed long before (by the login grace, or at once for
            // the garbage).
            for (i, c) in strangers.iter_mut().enumerate() {
                anyhow::ensure!(
                    closed_within(c, Duration::from_secs(5))?,
                    "stranger {i} is still open"
                );
            }
            Ok(())
        },
    )
}
