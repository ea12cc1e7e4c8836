//! The documented client flow against real binaries on loopback: `curl` an order,
//! log in with the stock OpenSSH tools, move data, and watch the session end;
//! and README's one-command devnet.

// Test code: a panic is how a check fails.
#![allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use jusy_tests::client::{COMMAND, random_file, sha256_file};
use jusy_tests::jusy::user_exists;
use jusy_tests::mux::Master;
use jusy_tests::terminal::Terminal;
use jusy_tests::{Broker, Login, Node, Scene, e2e};

/// A broker with one client and a node with `slots` ready sessions.
fn network(scene: &Scene, slots: u32) -> anyhow::Result<(Broker, Node, String)> {
    let data = scene.subdir("broker")?;
    let client = Broker::add_client(scene, &data)?;
    let broker = Broker::start_with(scene, "broker", data, 0, &["--grace-secs", "2"])?;
    let node = Node::start(
        scene,
        "node",
        &broker,
        &["--ready-slots", &slots.to_string(), "--grace-secs", "2"],
    )?;
    broker.wait_capacity(scene, slots.into())?;
    Ok((broker, node, client))
}

/// Runs `ssh` and checks that it failed (exit 255) saying `want`.
fn refused(
    scene: &Scene,
    ssh: std::process::Command,
    input: Option<&[u8]>,
    want: &str,
) -> anyhow::Result<()> {
    let out = jusy_tests::process::run(scene, ssh, input, Duration::from_secs(60))?;
    anyhow::ensure!(
        out.status == Some(255) && out.stderr.contains(want),
        "wanted ssh to fail with {want:?}, got {:?}: {}",
        out.status,
        out.stderr
    );
    Ok(())
}

fn order(scene: &Scene, broker: &Broker, client: &str) -> anyhow::Result<Login> {
    let (status, body) = broker.order(scene, client)?;
    anyhow::ensure!(status == 200, "order failed with {status}: {body}");
    Login::from_order(scene, &body)
}

#[test]
fn documented_flow_with_strict_host_key_checking() {
    e2e("documented_flow_with_strict_host_key_checking", |scene| {
        let (broker, _node, client) = network(scene, 1)?;

        let (status, body) = broker.order(scene, &client)?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "OK");
        for field in [
            "username",
            "order_id",
            "host",
            "privkey",
            "host_key",
            "known_hosts",
        ] {
            assert!(body[field].is_string(), "missing {field}: {body}");
        }
        assert!(body["port"].is_u64(), "{body}");
        let order_id = body["order_id"].as_str().unwrap_or_default();
        assert_eq!(order_id.len(), 24, "{body}");
        assert!(order_id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(
            body["privkey"]
                .as_str()
                .unwrap_or_default()
                .starts_with("-----BEGIN OPENSSH PRIVATE KEY-----")
        );
        let login = Login::from_order(scene, &body)?;

        let out = login.ssh(scene, "echo hi", None)?;
        assert_eq!(
            (out.status, out.text().as_str()),
            (Some(0), "hi\n"),
            "{}",
            out.stderr
        );

        let out = login.ssh(scene, "id -un; echo $HOME; pwd", None)?;
        let text = out.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.first().copied(), Some(login.user.as_str()), "{text}");
        assert_eq!(lines.get(1), lines.get(2), "starts in its home: {text}");
        let out = login.ssh(scene, "id -u", None)?;
        assert_ne!(out.text().trim(), "0", "session must not run as root");

        // A real terminal, and exit codes as OpenSSH's sshd reports them.
        let mut tty = login.ssh_command(&login.key, &["-tt"]);
        tty.arg("tty");
        let out = jusy_tests::process::run(scene, tty, None, Duration::from_secs(60))?;
        assert!(
            out.text().trim().starts_with("/dev/pts/"),
            "tty said: {}",
            out.text()
        );
        let out = login.ssh(scene, "exit 3", None)?;
        assert_eq!(out.status, Some(3));
        // A program killed by a signal is reported as exit-signal, which
        // OpenSSH's client turns into 255, as with sshd.
        let out = login.ssh(scene, "echo before; kill -TERM $$; echo after", None)?;
        assert_eq!(
            (out.status, out.text().as_str()),
            (Some(255), "before\n"),
            "{}",
            out.stderr
        );

        // Only LANG, LC_* and TERM pass from the client.
        let mut env = login.ssh_command(
            &login.key,
            &[
                "-o",
                "SetEnv=LC_TEST=yes EVIL=no",
                "-o",
                "SendEnv=LC_TEST EVIL",
            ],
        );
        env.arg("echo \"${LC_TEST:-unset} ${EVIL:-unset}\"");
        let out = jusy_tests::process::run(scene, env, None, Duration::from_secs(60))?;
        assert_eq!(out.text(), "yes unset\n", "{}", out.stderr);

        // The transport cipher OpenSSH ends up with, run as it is told to
        // (the answer's `ssh_ciphers`): AES-GCM where the CPU has AES
        // instructions, ChaCha20-Poly1305 elsewhere.
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")?;
        let has = |flag: &str| {
            cpuinfo
                .lines()
                .filter(|l| l.starts_with("flags") || l.starts_with("Features"))
                .any(|l| l.split_whitespace().any(|f| f == flag))
        };
        let aes = has("aes") && (has("pclmulqdq") || has("pmull"));
        assert_eq!(login.ciphers.is_some(), aes, "{body}");
        let mut verbose = login.ssh_command(&login.key, &["-v"]);
        verbose.arg("true");
        let out = jusy_tests::process::run(scene, verbose, None, Duration::from_secs(60))?;
        let want = if aes {
            "server->client cipher: aes128-gcm@openssh.com"
        } else {
            "server->client cipher: chacha20-poly1305@openssh.com"
        };
        assert!(out.stderr.contains(want), "wanted {want:?}: {}", out.stderr);
        // A client that asks for something else is not refused for it.
        let mut plain = login.clone();
        plain.ciphers = None;
        for cipher in ["chacha20-poly1305@openssh.com", "aes256-ctr"] {
            let mut ssh = plain.ssh_command(&plain.key, &["-v", "-c", cipher]);
            ssh.arg("true");
            let out = jusy_tests::process::run(scene, ssh, None, Duration::from_secs(60))?;
            let want = format!("server->client cipher: {cipher}");
            assert!(
                out.status == Some(0) && out.stderr.contains(&want),
                "wanted {want:?}: {}",
                out.stderr
            );
        }
        Ok(())
    })
}

#[test]
fn terminal_size_follows_the_client_window() {
    e2e("terminal_size_follows_the_client_window", |scene| {
        let (broker, _node, client) = network(scene, 1)?;
        let login = order(scene, &broker, &client)?;
        let mut ssh = login.ssh_command(&login.key, &["-tt"]);
        // Prints its terminal's size, then again once it has changed.
        ssh.arg("stty size; while [ \"$(stty size)\" = '30 100' ]; do sleep 0.05; done; stty size");
        let mut term = Terminal::spawn(ssh, 30, 100)?;
        term.expect("30 100", COMMAND)?;
        term.resize(40, 120)?;
        term.expect("40 120", COMMAND)?;
        assert_eq!(term.wait(COMMAND)?, Some(0), "{}", term.text());
        Ok(())
    })
}

#[test]
fn bad_input_is_refused_clearly() {
    e2e("bad_input_is_refused_clearly", |scene| {
        let (broker, _node, client) = network(scene, 1)?;

        let (status, body) = broker.order(scene, &"ab".repeat(32))?;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["status"], "ERROR");
        assert!(body["error"].is_string());
        let (status, body) = broker.order(scene, "not-a-hash")?;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["status"], "ERROR");
        let (status, body) = broker.get(scene, &format!("/order/{client}/{}", "00".repeat(12)))?;
        assert_eq!((status, &body["status"]), (404, &"ERROR".into()), "{body}");
        let (status, body) = broker.get(scene, "/no/such/thing")?;
        assert_eq!((status, &body["status"]), (404, &"ERROR".into()));

        // A key that is not the order's is refused, and so is the right key for
        // another user name.
        let login = order(scene, &broker, &client)?;
        let stranger = login.dir.join("stranger");
        let keygen = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&stranger)
            .status()?;
        assert!(keygen.success());
        let mut cmd = login.ssh_command(&stranger, &[]);
        cmd.arg("true");
        let out = jusy_tests::process::run(scene, cmd, None, Duration::from_secs(60))?;
        assert_eq!(out.status, Some(255), "a wrong key must not log in");
        assert!(out.stderr.contains("Permission denied"), "{}", out.stderr);
        let mut cmd = login.ssh_command_as(&login.key, "root", &[]);
        cmd.arg("true");
        let out = jusy_tests::process::run(scene, cmd, None, Duration::from_secs(60))?;
        assert_eq!(out.status, Some(255), "root must not log in");

        // Password and keyboard-interactive are not even offered.
        let mut cmd = std::process::Command::new("ssh");
        cmd.args(login.options(&stranger))
            .args([
                "-o",
                "BatchMode=no",
                "-o",
                "PreferredAuthentications=password,keyboard-interactive",
            ])
            .args([
                "-o",
                "NumberOfPasswordPrompts=0",
                "-p",
                &login.port.to_string(),
            ])
            .args(["-l", &login.user, &login.host, "true"]);
        // Only publickey is offered.
        refused(scene, cmd, None, "(publickey)")?;

        // Port forwarding is refused by the server, both ways: a channel to
        // an address from the node (what `-L` and `-W` open) and a listener
        // on the node (`-R`).
        let cmd = login.ssh_command(&login.key, &["-W", "127.0.0.1:22"]);
        refused(scene, cmd, Some(b""), "open failed")?;
        let mut cmd = login.ssh_command(
            &login.key,
            &["-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:22"],
        );
        cmd.arg("true");
        refused(scene, cmd, None, "remote port forwarding failed")?;
        Ok(())
    })
}

#[test]
fn bulk_data_scp_sftp_and_rsync_keep_checksums() {
    e2e("bulk_data_scp_sftp_and_rsync_keep_checksums", |scene| {
        let (broker, _node, client) = network(scene, 1)?;
        let login = order(scene, &broker, &client)?;

        let src = login.dir.join("data.bin");
        random_file(&src, 64 << 20, 0x5eed)?;
        let want = sha256_file(&src)?;
        let data = std::fs::read(&src)?;

        let out = login.ssh(scene, "cat", Some(&data))?;
        assert_eq!(out.status, Some(0), "{}", out.stderr);
        assert_eq!(out.stdout.len(), data.len());
        assert!(out.stdout == data, "64 MiB through cat came back different");
        let out = login.ssh(scene, "sha256sum", Some(&data))?;
        assert!(
            out.text().starts_with(&want),
            "remote checksum: {}",
            out.text()
        );

        let src_arg = src.display().to_string();
        let back = |name: &str| login.dir.join(name);
        let out = login.scp(scene, &src_arg, ":up.scp")?;
        assert_eq!(out.status, Some(0), "scp up: {}", out.stderr);
        let out = login.scp(scene, ":up.scp", &back("down.scp").display().to_string())?;
        assert_eq!(out.status, Some(0), "scp down: {}", out.stderr);
        assert_eq!(sha256_file(&back("down.scp"))?, want);

        let out = login.sftp(
            scene,
            &format!(
                "put {src_arg} up.sftp\nget up.sftp {}\n",
                back("down.sftp").display()
            ),
        )?;
        assert_eq!(out.status, Some(0), "sftp: {}", out.stderr);
        assert_eq!(sha256_file(&back("down.sftp"))?, want);

        let out = login.rsync(scene, &src_arg, ":up.rsync")?;
        assert_eq!(out.status, Some(0), "rsync up: {}", out.stderr);
        let out = login.rsync(
            scene,
            ":up.rsync",
            &back("down.rsync").display().to_string(),
        )?;
        assert_eq!(out.status, Some(0), "rsync down: {}", out.stderr);
        assert_eq!(sha256_file(&back("down.rsync"))?, want);

        let out = login.ssh(scene, "sha256sum up.scp up.sftp up.rsync", None)?;
        assert_eq!(out.text().matches(&want).count(), 3, "{}", out.text());
        Ok(())
    })
}

/// A program busy writing while its input piles up unread, with and without a
/// terminal: its output still gets out. Input may wait (as with sshd), but the
/// client's window adjustments behind it must not, or the output stops for
/// good; and once the program reads, all of the input comes.
#[test]
fn output_flows_while_unread_input_piles_up() {
    e2e("output_flows_while_unread_input_piles_up", |scene| {
        let (broker, _node, client) = network(scene, 1)?;
        let login = order(scene, &broker, &client)?;
        let input = vec![0u8; 64 << 20];

        let out = login.ssh(scene, "head -c 64M /dev/zero; wc -c", Some(&input))?;
        assert_eq!(out.status, Some(0), "{}", out.stderr);
        let (zeros, count) = out.stdout.split_at(out.stdout.len().min(64 << 20));
        assert!(zeros.len() == 64 << 20 && zeros.iter().all(|&b| b == 0));
        assert_eq!(
            String::from_utf8_lossy(count).trim(),
            (64 << 20).to_string()
        );

        // Zeros are no control characters; the terminal echoes what arrives
        // before `stty`, so there may be a little more output.
        let mut tty = login.ssh_command(&login.key, &["-tt", "-e", "none"]);
        tty.arg("stty raw -echo; head -c 64M /dev/zero");
        let out = jusy_tests::process::run(scene, tty, Some(&input), COMMAND)?;
        assert_eq!(out.status, Some(0), "{}", out.stderr);
        assert!(out.stdout.len() >= 64 << 20, "{} bytes", out.stdout.len());
        Ok(())
    })
}

#[test]
fn master_connection_and_parallel_connections() {
    e2e("master_connection_and_parallel_connections", |scene| {
        let (broker, _node, client) = network(scene, 1)?;
        let login = order(scene, &broker, &client)?;

        // Unix socket paths are short (108 bytes): keep it out of the scene dir.
        let socket = std::env::temp_dir().join(format!("jusy-cm-{}", login.order_id));
        let control = format!("ControlPath={}", socket.display());
        let mut master = login.ssh_command(
            &login.key,
            &["-o", "ControlMaster=yes", "-o", &control, "-N", "-f"],
        );
        master.arg("true");
        let out = jusy_tests::process::run(scene, master, None, Duration::from_secs(60))?;
        assert_eq!(out.status, Some(0), "master: {}", out.stderr);

        let mut check = login.ssh_command(&login.key, &["-o", &control, "-O", "check"]);
        check.arg("true");
        let out = jusy_tests::process::run(scene, check, None, Duration::from_secs(30))?;
        assert_eq!(out.status, Some(0), "master not running: {}", out.stderr);

        // Five commands at once through the one master connection. They
        // carry no usable key, so a command that opened a connection of its
        // own instead of a channel on the master's would be refused.
        let no_key = scene.dir().join("no-such-key");
        let children: Vec<_> = (0..5)
            .map(|i| {
                let mut cmd =
                    login.ssh_command(&no_key, &["-o", "ControlMaster=no", "-o", &control]);
                cmd.arg(format!("echo channel-{i}; exit {i}"));
                cmd.stdout(std::process::Stdio::piped()).spawn()
            })
            .collect::<Result<_, _>>()?;
        for (i, child) in children.into_iter().enumerate() {
            let out = child.wait_with_output()?;
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                format!("channel-{i}\n")
            );
            assert_eq!(out.status.code(), Some(i32::try_from(i)?), "channel-{i}");
        }

        // Three separate TCP connections to the same order, open at the same time.
        let children: Vec<_> = (0..3)
            .map(|i| {
                let mut cmd = login.ssh_command(&login.key, &[]);
                cmd.arg(format!("sleep 1; echo conn-{i}"));
                cmd.stdout(std::process::Stdio::piped()).spawn()
            })
            .collect::<Result<_, _>>()?;
        for (i, child) in children.into_iter().enumerate() {
            let out = child.wait_with_output()?;
            assert_eq!(String::from_utf8_lossy(&out.stdout), format!("conn-{i}\n"));
        }

        let mut exit = login.ssh_command(&login.key, &["-o", &control, "-O", "exit"]);
        exit.arg("true");
        jusy_tests::process::run(scene, exit, None, Duration::from_secs(30))?;
        Ok(())
    })
}

/// The logged-in client connections an order port carries at once (the
/// broker's `relay::splice::MAX_CONNECTIONS`). Connections that have not
/// logged in are capped apart (see the adversarial suite's `traffic`).
const MAX_CONNECTIONS: usize = 8;

#[test]
fn an_order_port_carries_a_bounded_number_of_logins() {
    e2e(
        "an_order_port_carries_a_bounded_number_of_logins",
        |scene| {
            let (broker, _node, client) = network(scene, 1)?;
            let login = order(scene, &broker, &client)?;
            // Master connections stay logged in, each on its own TCP connection.
            let mut masters = Vec::new();
            for i in 0..MAX_CONNECTIONS {
                masters.push(Master::open(scene, &login, &format!("master-{i}"))?);
            }
            let out = masters[0].run(scene, "echo up")?;
            anyhow::ensure!(out.text() == "up\n", "the masters work: {}", out.stderr);
            let out = login.ssh(scene, "true", None)?;
            anyhow::ensure!(
                out.status == Some(255),
                "one login too many got in: {:?} {}",
                out.status,
                out.stderr
            );

            // A login that ends makes room for another, once the relay has seen
            // its connection close.
            drop(masters.pop());
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let out = login.ssh(scene, "echo in", None)?;
                if out.status == Some(0) {
                    assert_eq!(out.text(), "in\n");
                    break;
                }
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "no room after a login ended: {}",
                    out.stderr
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(())
        },
    )
}

#[test]
fn concurrent_orders_get_users_that_cannot_read_each_other() {
    e2e(
        "concurrent_orders_get_users_that_cannot_read_each_other",
        |scene| {
            let (broker, _node, client) = network(scene, 2)?;
            let a = order(scene, &broker, &client)?;
            let b = order(scene, &broker, &client)?;
            assert_ne!(a.user, b.user);
            assert_ne!(a.port, b.port);

            let out = a.ssh(
                scene,
                "echo secret > mine && chmod 644 mine && echo $HOME",
                None,
            )?;
            assert_eq!(out.status, Some(0), "{}", out.stderr);
            let a_home = out.text().trim().to_owned();
            let out = b.ssh(scene, &format!("cat {a_home}/mine"), None)?;
            assert_ne!(out.status, Some(0), "B read A's file: {}", out.text());
            // Refused, or not even there: B's mount namespace may not show the
            // directory A's home is in (a node data directory under /tmp).
            assert!(
                out.stderr.contains("Permission denied")
                    || out.stderr.contains("No such file or directory"),
                "{}",
                out.stderr
            );
            let out = b.ssh(scene, &format!("ls {a_home}"), None)?;
            assert_ne!(out.status, Some(0), "B listed A's home");
            // Each order's key opens only its own order.
            let mut cross = b.ssh_command(&a.key, &[]);
            cross.arg("true");
            let out = jusy_tests::process::run(scene, cross, None, Duration::from_secs(60))?;
            assert_eq!(out.status, Some(255), "A's key opened B's order");
            Ok(())
        },
    )
}

#[test]
fn session_ends_after_last_connection_and_leaves_nothing() {
    e2e(
        "session_ends_after_last_connection_and_leaves_nothing",
        |scene| {
            let (broker, mut node, client) = network(scene, 1)?;
            let login = order(scene, &broker, &client)?;

            // Sequential commands without a master connection live in one session.
            let out = login.ssh(scene, "echo one > f; echo $HOME", None)?;
            let home = out.text().trim().to_owned();
            let out = login.ssh(scene, "cat f", None)?;
            assert_eq!(
                out.text(),
                "one\n",
                "the second login sees the first one's file"
            );
            assert!(user_exists(&login.user));

            let reason = node.wait_session_end(&login.order_id, Duration::from_secs(30))?;
            assert_eq!(reason, "CLIENT_CLOSED");
            assert!(
                !user_exists(&login.user),
                "user {} still exists",
                login.user
            );
            assert!(
                !std::path::Path::new(&home).exists(),
                "home {home} still exists"
            );

            // The order says why it ended, and its port is closed (the broker
            // settles and closes it when the node's end arrives, a moment
            // after the node reports it).
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let (status, body) =
                    broker.get(scene, &format!("/order/{client}/{}", login.order_id))?;
                assert_eq!(status, 200, "{body}");
                if body["state"] == "CLIENT_CLOSED" {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the order never ended as CLIENT_CLOSED: {body}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            while std::net::TcpStream::connect((login.host.as_str(), login.port)).is_ok() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "port of a finished order still accepts"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        },
    )
}

#[test]
fn node_reconnects_after_broker_restart() {
    e2e("node_reconnects_after_broker_restart", |scene| {
        let (mut broker, mut node, client) = network(scene, 1)?;
        let relay_port = broker.relay.port();
        let data = broker.data_dir.clone();

        broker.proc.kill()?;
        drop(broker);
        let broker = Broker::start_with(
            scene,
            "broker-restarted",
            data,
            relay_port,
            &["--grace-secs", "2"],
        )?;
        // Loopback carries datagrams of any size: all of quic_max_mtu is tried.
        assert_eq!(node.max_datagram, u64::from(jusy_node::QUIC_MTU));
        node.proc
            .wait_event("registered", Duration::from_secs(30))?;
        broker.wait_capacity(scene, 1)?;
        let login = order(scene, &broker, &client)?;
        let out = login.ssh(scene, "echo back", None)?;
        assert_eq!(out.text(), "back\n", "{}", out.stderr);
        Ok(())
    })
}

#[test]
fn jusy_cli_orders_logs_in_and_verifies_receipts() {
    e2e("jusy_cli_orders_logs_in_and_verifies_receipts", |scene| {
        let (broker, _node, client) = network(scene, 1)?;
        let url = format!("http://{}", broker.api);
        let dir = scene.subdir("orders")?;
        let mut cmd = std::process::Command::new(jusy_tests::process::bin("jusy")?);
        cmd.args(["order", &url, &client, "--ssh", "--dir"])
            .arg(&dir)
            .args(["--", "-o", "BatchMode=yes", "echo from-cli"]);
        let out = jusy_tests::process::run(scene, cmd, None, Duration::from_secs(60))?;
        assert_eq!(out.text(), "from-cli\n", "{}", out.stderr);
        let order_id = std::fs::read_dir(&dir)?
            .next()
            .and_then(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut status = std::process::Command::new(jusy_tests::process::bin("jusy")?);
        status.args(["status", &url, &client, &order_id]);
        let out = jusy_tests::process::run(scene, status, None, Duration::from_secs(60))?;
        assert_eq!(out.status, Some(0), "{}", out.stderr);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        assert_eq!(json["order_id"], order_id.as_str());

        let mut bad = std::process::Command::new(jusy_tests::process::bin("jusy")?);
        bad.args(["order", &url, &"ab".repeat(32)]);
        let out = jusy_tests::process::run(scene, bad, None, Duration::from_secs(60))?;
        assert_ne!(out.status, Some(0));
        assert!(out.stderr.contains("unknown client hash"), "{}", out.stderr);
        Ok(())
    })
}

#[test]
fn a_node_too_slow_for_the_speed_test_is_never_offered() {
    e2e(
        "a_node_too_slow_for_the_speed_test_is_never_offered",
        |scene| {
            let data = scene.subdir("broker")?;
            let client = Broker::add_client(scene, &data)?;
            // No node answers a real workload in 0 ms.
            let flags = [
                "--speed-test-rounds",
                "200000",
                "--speed-test-limit-ms",
                "0",
            ];
            let broker = Broker::start_with(scene, "broker", data, 0, &flags)?;
            let mut node = Node::start(scene, "node", &broker, &["--ready-slots", "1"])?;
            let refused = node.proc.wait_event("refused", Duration::from_secs(30))?;
            let why = refused["error"].as_str().unwrap_or_default();
            assert!(why.contains("speed test failed: too slow"), "{refused}");
            let (_, health) = broker.get(scene, "/health")?;
            assert_eq!(
                (health["nodes"].as_u64(), health["free_slots"].as_u64()),
                (Some(0), Some(0)),
                "{health}"
            );
            let (status, body) = broker.order(scene, &client)?;
            assert_eq!(status, 503, "{body}");
            Ok(())
        },
    )
}

#[test]
fn hammering_the_api_is_answered_with_429() {
    e2e("hammering_the_api_is_answered_with_429", |scene| {
        let data = scene.subdir("broker")?;
        let flags = ["--rate-limit-per-sec", "1", "--rate-limit-burst", "3"];
        let broker = Broker::start_with(scene, "broker", data, 0, &flags)?;
        let fake = "cd".repeat(32);
        let answers: Vec<(u16, serde_json::Value)> = (0..12)
            .map(|_| broker.get(scene, &format!("/account/{fake}")))
            .collect::<Result<_, _>>()?;
        let statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
        assert_eq!(statuses.first(), Some(&401), "{statuses:?}");
        let limited = answers.iter().find(|(s, _)| *s == 429);
        assert!(
            limited.is_some_and(|(_, body)| body["status"] == "ERROR"),
            "{statuses:?}"
        );
        // Health checks are not limited.
        let (status, _) = broker.get(scene, "/health")?;
        assert_eq!(status, 200);
        Ok(())
    })
}

#[test]
fn devnet_gives_a_shell_with_one_command() {
    e2e("devnet_gives_a_shell_with_one_command", |scene| {
        // README's first command, on a free port: a broker, a node and a
        // demo client with funds.
        let data = scene.subdir("devnet")?;
        let mut cmd = std::process::Command::new(jusy_tests::process::bin("jusy-broker")?);
        cmd.args(["devnet", "--api-listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .env("RUST_LOG", "info,quinn=warn");
        let mut devnet = jusy_tests::process::Proc::start(scene, "devnet", cmd)?;
        let ready = devnet.wait_event("ready", 2 * jusy_tests::jusy::READY)?;
        let api: std::net::SocketAddr = ready["api"].as_str().unwrap_or_default().parse()?;
        let client = ready["client_hash"].as_str().unwrap_or_default();
        let (status, body) = jusy_tests::jusy::api_request(
            scene,
            &jusy_tests::Site::local(),
            api,
            "GET",
            &format!("/order/{client}"),
            &[],
            None,
        )?;
        assert_eq!(status, 200, "{body}");
        let login = Login::from_order(scene, &body)?;
        let out = login.ssh(scene, "echo hi from devnet", None)?;
        assert_eq!(out.text(), "hi from devnet\n", "{}", out.stderr);

        // Ctrl-C (here SIGTERM) ends the sessions and removes their users.
        assert!(
            devnet.stop(Duration::from_secs(30))?,
            "devnet did not stop cleanly"
        );
        let node_id = body["node_id"].as_str().unwrap_or_default();
        let left = jusy_tests::leftovers::of_node(node_id, &data.join("node"));
        assert!(left.is_empty(), "left behind: {left:?}");
        Ok(())
    });
}
