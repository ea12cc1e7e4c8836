//! What `deploy/` ships: the systemd units pass `systemd-analyze verify`
//! with the binaries where they name them, and their command lines are ones
//! the binaries accept.

// Test code: a panic is how a check fails.
#![allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use jusy_tests::process::bin;

const UNITS: [(&str, &str); 2] = [
    ("jusy-node.service", "jusy-node"),
    ("jusy-broker.service", "jusy-broker"),
];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd")
}

/// The unit with its binary's install path replaced by the built one.
fn unit_for_test(unit: &str, binary: &str) -> String {
    let text = std::fs::read_to_string(deploy_dir().join(unit)).expect("unit");
    let built = bin(binary).expect("built binary");
    text.replace(
        &format!("/usr/local/bin/{binary}"),
        &built.display().to_string(),
    )
}

/// `systemd-analyze verify` on `units` in a fresh directory: whether it
/// passed, and what it said.
fn verify(units: &[(&str, String)]) -> (bool, String) {
    let dir = tempdir();
    let mut cmd = Command::new("systemd-analyze");
    cmd.arg("verify");
    for (name, text) in units {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write unit");
        cmd.arg(&path);
    }
    let out = cmd.output().expect("systemd-analyze runs");
    let _ = std::fs::remove_dir_all(&dir);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "jusy-units-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn have_systemd_analyze(test: &str) -> bool {
    let ok = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        jusy_tests::skip(test, "needs systemd-analyze (Debian's systemd package)");
    }
    ok
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    if !have_systemd_analyze("the_units_pass_systemd_analyze_verify") {
        return;
    }
    // The check can fail: a unit with an unknown option and a missing
    // binary does.
    let (ok, said) = verify(&[(
        "broken.service",
        "[Service]\nExecStart=/nonexistent/jusy\nNoSuchOption=1\n".to_owned(),
    )]);
    assert!(!ok && said.contains("NoSuchOption"), "{said}");

    let units: Vec<(&str, String)> = UNITS
        .iter()
        .map(|(unit, binary)| (*unit, unit_for_test(unit, binary)))
        .collect();
    let (ok, said) = verify(&units);
    assert!(ok, "systemd-analyze verify failed: {said}");
    assert!(said.trim().is_empty(), "warnings: {said}");
}

#[test]
fn the_units_command_lines_are_accepted_by_the_binaries() {
    for (unit, binary) in UNITS {
        let text = unit_for_test(unit, binary);
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("ExecStart");
        let mut words = exec.split_whitespace();
        let program = words.next().expect("program");
        let args: Vec<String> = words
            .map(|w| w.replace("${CREDENTIALS_DIRECTORY}", "/run/credentials/x"))
            .collect();
        // Every flag is known: clap refuses an unknown one before it gets to
        // `--help`.
        let out = Command::new(program)
            .args(&args)
            .arg("--help")
            .output()
            .expect("binary runs");
        assert!(
            out.status.success(),
            "{unit}: {exec} is refused: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let refused = Command::new(program)
            .args(&args)
            .arg("--no-such-flag")
            .arg("--help")
            .output()
            .expect("binary runs");
        assert!(!refused.status.success(), "{unit}: unknown flags pass");
    }
    // The node's state and the configuration are private.
    let node = std::fs::read_to_string(deploy_dir().join("jusy-node.service")).expect("unit");
    for line in ["Delegate=yes", "StateDirectoryMode=0700", "UMask=0077"] {
        assert!(
            node.lines().any(|l| l == line),
            "the node's unit lacks {line}"
        );
    }
}

/// Every line of a log file is a JSON object with a level and fields.
fn json_lines(path: &Path) -> anyhow::Result<usize> {
    let text = std::fs::read_to_string(path)?;
    let mut n = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{}: not JSON ({e}): {line}", path.display()))?;
        anyhow::ensure!(
            v["level"].is_string() && v["fields"].is_object() && v["timestamp"].is_string(),
            "{}: not a log object: {line}",
            path.display()
        );
        n += 1;
    }
    Ok(n)
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    if !jusy_tests::require_root("log_format_json_writes_one_object_per_line") {
        return;
    }
    jusy_tests::e2e("log_format_json", |scene| {
        let data = scene.subdir("broker")?;
        let broker =
            jusy_tests::Broker::start_with(scene, "broker", data, 0, &["--log-format", "json"])?;
        let _node = jusy_tests::Node::start(
            scene,
            "node",
            &broker,
            &["--ready-slots", "1", "--log-format", "json"],
        )?;
        broker.wait_capacity(scene, 1)?;
        for name in ["broker", "node"] {
            let lines = json_lines(&scene.dir().join(format!("{name}.err")))?;
            anyhow::ensure!(lines > 0, "{name} logged nothing");
        }
        Ok(())
    });
}

/// `GET /metrics` at `addr`, checked by an independent parser (Python's
/// `prometheus_client`, Debian's python3-prometheus-client): the samples
/// as `name{labels} value` lines.
fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let out = Command::new("curl")
        .args(["-sSf", "--max-time", "10"])
        .arg(format!("http://{addr}/metrics"))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "scrape failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parse = "import sys\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse\n\
        for family in parse(sys.stdin.read()):\n\
        \x20   for s in family.samples:\n\
        \x20       labels = ','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))\n\
        \x20       print(f'{s.name}{{{labels}}} {s.value}')\n";
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", parse])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), &out.stdout)?;
    let parsed = child.wait_with_output()?;
    anyhow::ensure!(
        parsed.status.success(),
        "the metrics do not parse: {}\n{}",
        String::from_utf8_lossy(&parsed.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8(parsed.stdout)?)
}

/// The value of the sample `series` (`name{labels}`, labels sorted).
fn sample(samples: &str, series: &str) -> Option<f64> {
    samples
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn have_metrics_parser(test: &str) -> bool {
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import prometheus_client.openmetrics.parser"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        jusy_tests::skip(test, "needs python3-prometheus-client to check the format");
    }
    ok
}

#[test]
fn metrics_of_broker_and_node_follow_an_order() {
    const TEST: &str = "metrics_of_broker_and_node_follow_an_order";
    if !jusy_tests::require_root(TEST) || !have_metrics_parser(TEST) {
        return;
    }
    jusy_tests::e2e("metrics", |scene| {
        let data = scene.subdir("broker")?;
        let client = jusy_tests::Broker::add_client(scene, &data)?;
        let broker = jusy_tests::Broker::start_with(
            scene,
            "broker",
            data,
            0,
            &["--metrics-listen", "127.0.0.1:0"],
        )?;
        let mut node = jusy_tests::Node::start(
            scene,
            "node",
            &broker,
            &[
                "--ready-slots",
                "1",
                "--grace-secs",
                "1",
                "--receipt-secs",
                "1",
                "--metrics-port",
                "0",
            ],
        )?;
        broker.wait_capacity(scene, 1)?;
        let broker_metrics = broker.metrics.expect("the broker serves metrics");
        let node_metrics: std::net::SocketAddr = node
            .proc
            .wait_event("metrics", std::time::Duration::from_secs(10))?["addr"]
            .as_str()
            .expect("addr")
            .parse()?;
        anyhow::ensure!(node_metrics.ip().is_loopback(), "{node_metrics}");

        let before = scrape(broker_metrics)?;
        assert_eq!(sample(&before, "jusy_nodes{}"), Some(1.0), "{before}");
        assert_eq!(sample(&before, "jusy_free_slots{}"), Some(1.0), "{before}");
        assert_eq!(
            sample(&before, "jusy_orders_created_total{}"),
            Some(0.0),
            "{before}"
        );
        let node_before = scrape(node_metrics)?;
        assert_eq!(
            sample(&node_before, "jusy_node_sessions{}"),
            Some(0.0),
            "{node_before}"
        );
        assert_eq!(
            sample(&node_before, "jusy_node_receipts_total{}"),
            Some(0.0)
        );

        // An order, not logged in to yet: reserved, and a session on the node.
        let (status, order) = broker.order(scene, &client)?;
        anyhow::ensure!(status == 200, "{order}");
        let placed = scrape(broker_metrics)?;
        assert_eq!(
            sample(&placed, "jusy_orders_created_total{}"),
            Some(1.0),
            "{placed}"
        );
        assert_eq!(
            sample(&placed, "jusy_orders_live{state=reserved}"),
            Some(1.0),
            "{placed}"
        );
        let node_placed = scrape(node_metrics)?;
        assert_eq!(
            sample(&node_placed, "jusy_node_sessions{}"),
            Some(1.0),
            "{node_placed}"
        );

        // It runs and ends.
        let login = jusy_tests::Login::from_order(scene, &order)?;
        let burn = "perl -e 'my ($u, $s) = times; ($u, $s) = times while $u + $s < 1'";
        let out = login.ssh(scene, burn, None)?;
        anyhow::ensure!(out.status == Some(0), "{}", out.stderr);
        let reason = node.wait_session_end(&login.order_id, std::time::Duration::from_secs(30))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let after = loop {
            let now = scrape(broker_metrics)?;
            if sample(
                &now,
                &format!("jusy_orders_settled_total{{state={reason}}}"),
            ) == Some(1.0)
            {
                break now;
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "never settled: {now}");
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        assert_eq!(
            sample(&after, "jusy_orders_live{state=reserved}"),
            Some(0.0),
            "{after}"
        );
        assert_eq!(
            sample(&after, "jusy_orders_live{state=connected}"),
            Some(0.0),
            "{after}"
        );
        assert!(sample(&after, "jusy_relay_udp_bytes{direction=received}") > Some(0.0));
        assert!(
            sample(&after, "jusy_relay_rtt_seconds{stat=max}") > Some(0.0),
            "{after}"
        );
        let node_after = scrape(node_metrics)?;
        assert_eq!(
            sample(&node_after, "jusy_node_sessions{}"),
            Some(0.0),
            "{node_after}"
        );
        assert_eq!(
            sample(
                &node_after,
                &format!("jusy_node_sessions_ended_total{{reason={reason}}}")
            ),
            Some(1.0),
            "{node_after}"
        );
        assert!(sample(&node_after, "jusy_node_receipts_total{}") >= Some(1.0));
        assert!(sample(&node_after, "jusy_node_cpu_sold_seconds_total{}") >= Some(0.9));
        Ok(())
    });
}

/// Runs `jusy-node check` against `broker` with `extra` flags and `path` as
/// `PATH`: its exit status and report.
fn node_check(
    broker: &jusy_tests::Broker,
    data_dir: &Path,
    path: &std::ffi::OsStr,
    extra: &[&str],
) -> anyhow::Result<(bool, String)> {
    let out = Command::new(bin("jusy-node")?)
        .arg("check")
        .args([
            "--broker",
            &broker.relay.to_string(),
            "--broker-key",
            &broker.key,
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .env("PATH", path)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// Drops UDP to `port` on loopback while it lives.
struct UdpBlocked(&'static str);

impl UdpBlocked {
    fn port(port: u16) -> anyhow::Result<Self> {
        let table = "jusy_test_check";
        let rules = format!(
            "table inet {table} {{ chain out {{ type filter hook output priority 0; \
             udp dport {port} drop; }}; }}"
        );
        let ok = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                std::io::Write::write_all(&mut c.stdin.take().expect("stdin"), rules.as_bytes())?;
                c.wait()
            })?;
        anyhow::ensure!(ok.success(), "nft refused the test table");
        Ok(Self(table))
    }
}

impl Drop for UdpBlocked {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", self.0])
            .status();
    }
}

/// Unmounts a test mount while it lives.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn node_check_names_what_is_missing() {
    if !jusy_tests::require_root("node_check_names_what_is_missing") {
        return;
    }
    jusy_tests::e2e("node_check", |scene| {
        let broker = jusy_tests::Broker::start(scene, "broker", scene.subdir("broker")?, 0)?;
        let data = scene.subdir("node")?;
        let path = std::env::var_os("PATH").unwrap_or_default();

        // On this machine, with the relay up, every check passes: what fails
        // below fails for what the test takes away.
        let (ok, report) = node_check(&broker, &data, &path, &[])?;
        assert!(ok, "{report}");
        assert!(report.contains("QUIC handshake with"), "{report}");
        assert!(!report.contains("FAIL"), "{report}");

        // nft off the PATH: every other program is still found.
        let bin_dir = scene.subdir("path")?;
        for (tool, _) in jusy_node::check::TOOLS.iter().filter(|(t, _)| *t != "nft") {
            let found = jusy_node::check::on_path(tool).expect("the tool is installed here");
            std::os::unix::fs::symlink(found, bin_dir.join(tool))?;
        }
        let (ok, report) = node_check(&broker, &data, bin_dir.as_os_str(), &[])?;
        assert!(!ok, "{report}");
        assert!(
            report.contains("FAIL program          nft is not on PATH"),
            "{report}"
        );
        assert!(report.contains("FAIL nftables"), "{report}");
        assert_eq!(report.matches("FAIL").count(), 2, "{report}");
        assert!(report.contains("2 problem(s)"), "{report}");

        // Too little free disk: the data directory on a 32 MiB file system.
        let small = scene.subdir("small")?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=32m", "jusy-test"])
            .arg(&small)
            .status()?;
        anyhow::ensure!(mounted.success(), "mounting a tmpfs failed");
        let _unmount = Mounted(small.clone());
        let (ok, report) = node_check(&broker, &small.join("node"), &path, &[])?;
        assert!(!ok, "{report}");
        assert!(report.contains("FAIL disk"), "{report}");
        assert!(report.contains("disk_mib"), "{report}");

        // The relay's UDP blocked.
        let blocked = UdpBlocked::port(broker.relay.port())?;
        let (ok, report) = node_check(&broker, &data, &path, &[])?;
        drop(blocked);
        assert!(!ok, "{report}");
        assert!(report.contains("FAIL relay"), "{report}");
        assert!(report.contains("over UDP"), "{report}");
        Ok(())
    });
}

#[test]
fn broker_check_names_an_address_in_use() {
    let data = tempdir();
    let check = |api: &str| -> anyhow::Result<(bool, String)> {
        let out = Command::new(bin("jusy-broker")?)
            .arg("check")
            .arg("--data-dir")
            .arg(data.join("broker"))
            .args(["--api-listen", api, "--relay-listen", "127.0.0.1:0"])
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    };
    let (ok, report) = check("127.0.0.1:0").expect("check runs");
    assert!(ok, "{report}");
    assert!(
        report.ends_with("This machine can run the broker.\n"),
        "{report}"
    );
    // Someone else holds the API's address.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let (ok, report) = check(&addr).expect("check runs");
    assert!(!ok, "{report}");
    assert!(
        report.contains(&format!(
            "FAIL HTTP API         api_listen {addr} cannot be bound"
        )),
        "{report}"
    );
    let _ = std::fs::remove_dir_all(&data);
}

fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn only_a_release_signed_with_the_pinned_key_is_installed() {
    let dir = tempdir();
    let run = |program: &Path, args: &[&std::ffi::OsStr]| -> (bool, String) {
        let out = Command::new(program).args(args).output().expect("runs");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let broker = bin("jusy-broker").expect("broker");
    // The operator's release key, and a stranger's.
    let key = dir.join("release.key");
    let other = dir.join("other.key");
    let (ok, public) = run(
        &broker,
        &[
            "release".as_ref(),
            "key".as_ref(),
            "--key-file".as_ref(),
            key.as_os_str(),
        ],
    );
    assert!(ok, "{public}");
    let (ok, said) = run(
        &broker,
        &[
            "release".as_ref(),
            "key".as_ref(),
            "--key-file".as_ref(),
            other.as_os_str(),
        ],
    );
    assert!(ok, "{said}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).expect("key").permissions().mode() & 0o777,
        0o600
    );

    // An installed node, pinned to the operator's key.
    let installed = dir.join("jusy-node");
    std::fs::copy(bin("jusy-node").expect("node"), &installed).expect("install");
    let config = dir.join("node.toml");
    std::fs::write(&config, format!("release_key = \"{}\"\n", public.trim())).expect("config");
    let before = sha256_of(&installed);

    // The release: any other binary will do.
    let release = dir.join("release");
    std::fs::copy("/bin/true", &release).expect("release");
    let update = |sig: &Path, config: &Path| {
        run(
            &installed,
            &[
                "update".as_ref(),
                "--binary".as_ref(),
                release.as_os_str(),
                "--signature".as_ref(),
                sig.as_os_str(),
                "--config".as_ref(),
                config.as_os_str(),
            ],
        )
    };
    let signed = |key: &Path| -> PathBuf {
        let (ok, said) = run(
            &broker,
            &[
                "release".as_ref(),
                "sign".as_ref(),
                "--key-file".as_ref(),
                key.as_os_str(),
                "--binary".as_ref(),
                release.as_os_str(),
            ],
        );
        assert!(ok, "{said}");
        PathBuf::from(said.trim())
    };

    // Signed with the wrong key: refused, nothing replaced.
    let wrong = signed(&other);
    let (ok, said) = update(&wrong, &config);
    assert!(!ok && said.contains("does not verify"), "{said}");
    assert_eq!(sha256_of(&installed), before);
    // Without a pinned key: refused whatever the signature.
    let unpinned = dir.join("unpinned.toml");
    std::fs::write(&unpinned, "").expect("config");
    let right = signed(&key);
    let (ok, said) = update(&right, &unpinned);
    assert!(!ok && said.contains("no release_key"), "{said}");
    assert_eq!(sha256_of(&installed), before);
    // Signed with the pinned key: installed.
    let (ok, said) = update(&right, &config);
    assert!(ok, "{said}");
    assert_eq!(sha256_of(&installed), sha256_of(&release));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Stops the node `install-node.sh` started (its pid file) and waits for it
/// to end its sessions and remove what they left.
struct Started(PathBuf);

impl Drop for Started {
    fn drop(&mut self) {
        let Ok(pid) = std::fs::read_to_string(&self.0) else {
            return;
        };
        let Ok(pid) = pid.trim().parse::<libc::pid_t>() else {
            return;
        };
        // SAFETY: signalling a process by pid; no memory effects.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while Path::new(&format!("/proc/{pid}")).exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

#[test]
fn the_install_script_sets_up_a_node_behind_nat_that_serves_an_order() {
    if !jusy_tests::require_root("the_install_script_sets_up_a_node_behind_nat") {
        return;
    }
    jusy_tests::e2e("install_node", |scene| {
        let mut lab = jusy_tests::Lab::new(scene)?;
        let site = lab.public_host("broker")?;
        let data = scene.subdir("broker")?;
        let client = jusy_tests::Broker::add_client(scene, &data)?;
        let owner = jusy_tests::Broker::add_account(scene, &data, "owner", 0)?;
        let broker = jusy_tests::Broker::start_at(scene, "broker", &site, data, 0, &[])?;
        let home = lab.home("home", jusy_tests::lab::HomeOpts::default())?;

        // The owner's hash in a file of their own; the installer's paths in
        // the test's directory; systemd is not PID 1 here.
        let root = scene.subdir("root")?;
        let owner_file = root.join("owner");
        std::fs::write(&owner_file, &owner)?;
        let state = root.join("var/lib/jusy-node");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/install-node.sh");
        let mut args: Vec<std::ffi::OsString> = vec![script.into()];
        for a in [
            "--broker",
            &broker.relay.to_string(),
            "--broker-key",
            &broker.key,
            "--ready-slots",
            "1",
            "--disk-mib",
            "512",
        ] {
            args.push(a.into());
        }
        let paths = [
            ("--binary", bin("jusy-node")?),
            ("--owner-file", owner_file.clone()),
            ("--prefix", root.join("usr/local")),
            ("--config-dir", root.join("etc/jusy")),
            ("--state-dir", state.clone()),
        ];
        for (flag, path) in paths {
            args.push(flag.into());
            args.push(path.into());
        }
        let install = |extra: &[&str]| {
            let mut cmd = home.host.command("sh");
            cmd.args(&args).args(extra);
            jusy_tests::process::run(scene, cmd, None, std::time::Duration::from_secs(60))
        };
        // Without --no-systemd it says what to do and starts nothing.
        let refused = install(&[])?;
        assert_ne!(refused.status, Some(0), "{}", refused.text());
        assert!(
            refused.stderr.contains("--no-systemd"),
            "{}",
            refused.stderr
        );
        assert!(!state.join("node.pid").exists());

        let _stop = Started(state.join("node.pid"));
        let out = install(&["--no-systemd"])?;
        anyhow::ensure!(
            out.status == Some(0),
            "install failed: {}{}",
            out.text(),
            out.stderr
        );
        assert!(
            out.text().contains("This machine can serve sessions."),
            "{}",
            out.text()
        );

        // The configuration holds the secret, privately; no command line does.
        use std::os::unix::fs::PermissionsExt;
        let config = root.join("etc/jusy/node.toml");
        assert_eq!(
            std::fs::metadata(&config)?.permissions().mode() & 0o777,
            0o600
        );
        assert!(std::fs::read_to_string(&config)?.contains(&owner));
        let pid = std::fs::read_to_string(state.join("node.pid"))?;
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim()))?;
        assert!(!String::from_utf8_lossy(&cmdline).contains(&owner));

        // The node registers through the home router and serves an order.
        broker.wait_capacity(scene, 1)?;
        let laptop = lab.public_host("client")?;
        let (status, body) = broker.order_from(scene, &laptop, &client)?;
        anyhow::ensure!(status == 200, "{body}");
        let login = jusy_tests::Login::from_order_at(scene, &laptop, &body)?;
        let said = login.ssh(scene, "echo served", None)?;
        assert_eq!(said.status, Some(0), "{}", said.stderr);
        assert_eq!(said.text().trim(), "served");
        Ok(())
    });
}

#[test]
fn the_broker_image_runs_a_command_line_the_broker_accepts() {
    let text =
        std::fs::read_to_string(deploy_dir().join("../Dockerfile.broker")).expect("Dockerfile");
    let cmd = text
        .lines()
        .find_map(|l| l.strip_prefix("CMD "))
        .expect("CMD");
    let args: Vec<String> = serde_json::from_str(cmd).expect("CMD is a JSON array");
    let out = Command::new(bin("jusy-broker").expect("broker"))
        .args(&args)
        .arg("--help")
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("USER jusy"),
        "the broker does not run as root"
    );
}

#[test]
fn help_shows_defaults_and_bad_flags_are_named() {
    let help = |program: &str, args: &[&str]| {
        let out = Command::new(bin(program).expect("binary"))
            .args(args)
            .output()
            .expect("runs");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, text) = help("jusy-node", &["--help"]);
    assert!(ok && text.contains("[default: 5120]"), "{text}");
    let (ok, text) = help("jusy-node", &["check", "--help"]);
    assert!(
        ok && text.contains("[default: /var/lib/jusy-node]"),
        "{text}"
    );
    let (ok, text) = help("jusy-broker", &["serve", "--help"]);
    assert!(ok && text.contains("[default: 20000]"), "{text}");
    // A bad value names the flag; a bad configuration field names the field.
    let (ok, text) = help("jusy-broker", &["serve", "--price-sat", "many"]);
    assert!(!ok && text.contains("--price-sat"), "{text}");
    let dir = tempdir();
    let config = dir.join("broker.toml");
    std::fs::write(&config, "price_sats = 5\n").expect("config");
    let (ok, text) = help(
        "jusy-broker",
        &["check", "--config", config.to_str().expect("path")],
    );
    assert!(!ok && text.contains("price_sats"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
