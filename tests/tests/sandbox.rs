//! The session sandbox through real SSH sessions: kernel-enforced limits end a
//! session with its code (PROC, RAM, DISK, DONE, WALL) and spare the others, the
//! host's loopback is out of reach, CPU time is metered from the cgroup and
//! signed in receipts that verify as a chain, and nothing is left behind, not
//! even after the node is killed with SIGKILL.

// Test code: a panic is how a check fails.
#![allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use std::net::{TcpListener, UdpSocket};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use jusy_common::identity::PeerId;
use jusy_common::receipt::{Accepted, ChainVerifier, SignedReceipt};
use jusy_common::wire::OrderId;
use jusy_tests::{Broker, Login, Node, Scene, e2e, leftovers, require_root};

const END: Duration = Duration::from_secs(90);

/// Flags that set an order's terms: the broker sells them. The node gets the
/// disk size too, for its images.
const TERMS: [&str; 3] = ["--cpu-budget-secs", "--wall-secs", "--disk-mib"];

/// A broker with one client and a node with `slots` ready sessions; `args`
/// are flag and value pairs, the terms' for the broker, the rest the node's.
fn network(scene: &Scene, slots: u32, args: &[&str]) -> anyhow::Result<(Broker, Node, String)> {
    let data = scene.subdir("broker")?;
    let client = Broker::add_client(scene, &data)?;
    let mut terms = Vec::new();
    let mut all = vec!["--ready-slots".to_owned(), slots.to_string()];
    all.extend(["--grace-secs", "1"].map(str::to_owned));
    for pair in args.chunks(2) {
        let is_term = pair.first().is_some_and(|flag| TERMS.contains(flag));
        if is_term {
            terms.extend_from_slice(pair);
        }
        if !is_term || pair.first() == Some(&"--disk-mib") {
            all.extend(pair.iter().map(|s| (*s).to_owned()));
        }
    }
    let broker = Broker::start_with(scene, "broker", data, 0, &terms)?;
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let node = Node::start(scene, "node", &broker, &all)?;
    broker.wait_capacity(scene, slots.into())?;
    Ok((broker, node, client))
}

fn order(scene: &Scene, broker: &Broker, client: &str) -> anyhow::Result<Login> {
    let (status, body) = broker.order(scene, client)?;
    anyhow::ensure!(status == 200, "order failed with {status}: {body}");
    Login::from_order(scene, &body)
}

/// Starts `remote` over ssh without waiting for it.
fn spawn_ssh(login: &Login, remote: &str) -> anyhow::Result<Child> {
    let mut cmd = login.ssh_command(&login.key, &[]);
    cmd.arg(remote)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Ok(cmd.spawn()?)
}

/// Waits for the end of `login`'s session, then stops its ssh client.
fn ends_with(node: &mut Node, login: &Login, mut ssh: Child) -> anyhow::Result<String> {
    let reason = node.wait_session_end(&login.order_id, END);
    let _ = ssh.kill();
    let _ = ssh.wait();
    reason
}

/// Collects an order's receipts up to the final one, checks them as a chain and
/// returns the final receipt's CPU time in seconds.
fn final_cpu_secs(node: &mut Node, login: &Login) -> anyhow::Result<f64> {
    Ok(final_receipt(node, login)?.0 as f64 / 1e6)
}

/// Like [`final_cpu_secs`]: the final receipt's CPU µs and the chain's length.
fn final_receipt(node: &mut Node, login: &Login) -> anyhow::Result<(u64, usize)> {
    let order_id: OrderId = login.order_id.parse()?;
    let node_id: PeerId = node.node_id.parse()?;
    let mut verifier = ChainVerifier::new(order_id, node_id);
    let mut chain = Vec::new();
    loop {
        let ev = node
            .proc
            .wait_event_where("receipt", END, |v| v["order_id"] == login.order_id.as_str())?;
        let bytes = hex::decode(ev["bytes"].as_str().unwrap_or_default())?;
        let signed = SignedReceipt::decode(&bytes)?;
        assert_eq!(verifier.accept(&signed)?, Accepted::New, "{ev}");
        chain.push(signed);
        if !ev["finish"].is_null() {
            break;
        }
    }
    // Replays and reordering are refused; an exact resend is harmless.
    if let [first, .., last] = chain.as_slice() {
        assert_eq!(verifier.accept(last)?, Accepted::Duplicate);
        let mut tampered = *last.bytes();
        tampered[60] ^= 1;
        assert!(SignedReceipt::decode(&tampered).is_err());
        let mut fresh = ChainVerifier::new(order_id, node_id);
        assert!(fresh.accept(last).is_err(), "a chain must start at seq 0");
        assert!(fresh.accept(first).is_ok());
    }
    let last = chain.last().map(|r| *r.receipt()).expect("a final receipt");
    Ok((last.cpu_us, chain.len()))
}

/// Waits until the broker has finished `login`'s order and checks that it
/// verified every receipt of the chain and the CPU time they prove.
fn broker_proved(
    scene: &Scene,
    broker: &Broker,
    client: &str,
    login: &Login,
    (cpu_us, receipts): (u64, usize),
) -> anyhow::Result<()> {
    let deadline = Instant::now() + END;
    let path = format!("/order/{client}/{}", login.order_id);
    loop {
        let (status, body) = broker.get(scene, &path)?;
        anyhow::ensure!(status == 200, "{status}: {body}");
        let got = body["receipts"].as_array().map_or(0, Vec::len);
        if body["finished"] == true && got == receipts {
            assert_eq!(body["proven_cpu_us"].as_u64(), Some(cpu_us), "{body}");
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "broker holds {got} of {receipts} receipts: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the broker settled `login`'s order and checks that it upheld
/// the node's end `reason` on its evidence, and whose fault it was.
fn broker_upheld(
    scene: &Scene,
    broker: &Broker,
    client: &str,
    login: &Login,
    reason: &str,
    fault: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + END;
    let path = format!("/order/{client}/{}", login.order_id);
    loop {
        let (status, body) = broker.get(scene, &path)?;
        anyhow::ensure!(status == 200, "{status}: {body}");
        if body["finished"] == true {
            assert_eq!(body["reason"], reason, "{body}");
            assert_eq!(body["verdict"]["upheld"], true, "{body}");
            assert_eq!(body["verdict"]["fault"], fault, "{body}");
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "never settled: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Burns `secs` of CPU in one process, measured by the process itself.
fn burn(secs: u32) -> String {
    format!("perl -e 'my ($u, $s) = times; ($u, $s) = times while $u + $s < {secs}'")
}

#[test]
fn limits_end_sessions_with_proc_ram_and_disk_and_spare_others() {
    if !require_root("limits_end_sessions_with_proc_ram_and_disk_and_spare_others") {
        return;
    }
    e2e("limits_end_sessions", |scene| {
        // A 64 MiB disk keeps the disk test cheap; memory and processes are the
        // production defaults (2 GiB, 50).
        let (broker, mut node, client) = network(scene, 4, &["--disk-mib", "64"])?;
        let bystander = order(scene, &broker, &client)?;
        let out = bystander.ssh(scene, "echo alive; df -P ~ | tail -1", None)?;
        assert!(out.text().starts_with("alive\n"), "{}", out.stderr);
        // An open connection keeps the bystander's session going meanwhile.
        let mut keep = spawn_ssh(&bystander, "sleep 600")?;

        // The kernel holds a session at 50 processes and its init: its own
        // cgroup says so (asked from the bystander, whose open connection
        // keeps it going).
        let pids_max = "p=$(grep -E ':pids:|^0::' /proc/self/cgroup | head -1 | cut -d: -f3); \
             cat /sys/fs/cgroup/pids$p/pids.max 2>/dev/null || cat /sys/fs/cgroup$p/pids.max";
        let out = bystander.ssh(scene, pids_max, None)?;
        assert_eq!(out.text(), "51\n", "{}", out.stderr);
        let bomb = order(scene, &broker, &client)?;
        let ssh = spawn_ssh(&bomb, "b() { b | b & }; b; sleep 60")?;
        assert_eq!(ends_with(&mut node, &bomb, ssh)?, "PROC");
        // The final receipts carry the limits' evidence: the broker upholds
        // each end as the client's.
        broker_upheld(scene, &broker, &client, &bomb, "PROC", "Client")?;

        let ram = order(scene, &broker, &client)?;
        let ssh = spawn_ssh(&ram, "head -c 3G /dev/zero | tail; sleep 60")?;
        assert_eq!(ends_with(&mut node, &ram, ssh)?, "RAM");
        broker_upheld(scene, &broker, &client, &ram, "RAM", "Client")?;

        let disk = order(scene, &broker, &client)?;
        let ssh = spawn_ssh(&disk, "head -c 100M /dev/zero > big; sleep 60")?;
        assert_eq!(ends_with(&mut node, &disk, ssh)?, "DISK");
        broker_upheld(scene, &broker, &client, &disk, "DISK", "Client")?;

        let out = bystander.ssh(scene, "echo still alive", None)?;
        assert_eq!(out.text(), "still alive\n", "{}", out.stderr);
        keep.kill()?;
        keep.wait()?;
        Ok(())
    });
}

/// Binds `addr`; when something else already listens there (an sshd on all
/// addresses), that listener serves the test just as well.
fn listen(addr: &str) -> anyhow::Result<Option<TcpListener>> {
    match TcpListener::bind(addr) {
        Ok(l) => Ok(Some(l)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Ok(None),
        Err(e) => Err(anyhow::anyhow!("binding {addr}: {e}")),
    }
}

#[test]
fn a_client_that_breaks_limits_is_refused_orders() {
    if !require_root("a_client_that_breaks_limits_is_refused_orders") {
        return;
    }
    e2e("a_client_that_breaks_limits", |scene| {
        // One session that breaks a limit takes a new client from 90 to 81 %:
        // under 85 % it may not order.
        let data = scene.subdir("broker")?;
        let client = Broker::add_client(scene, &data)?;
        let flags = ["--min-client-rating", "85"];
        let mut broker = Broker::start_with(scene, "broker", data.clone(), 0, &flags)?;
        let relay_port = broker.relay.port();
        let mut node = Node::start(
            scene,
            "node",
            &broker,
            &["--ready-slots", "2", "--grace-secs", "1"],
        )?;
        broker.wait_capacity(scene, 2)?;
        let account = format!("/account/{client}");
        let (status, body) = broker.get(scene, &account)?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["rating_percent"], 90, "a new client: {body}");

        let bomb = order(scene, &broker, &client)?;
        let ssh = spawn_ssh(&bomb, "b() { b | b & }; b; sleep 60")?;
        assert_eq!(ends_with(&mut node, &bomb, ssh)?, "PROC");
        // The final receipts carry the limits' evidence: the broker upholds
        // each end as the client's.
        broker_upheld(scene, &broker, &client, &bomb, "PROC", "Client")?;
        // The broker counts the end once it has settled the order.
        let deadline = Instant::now() + END;
        let body = loop {
            let (status, body) = broker.get(scene, &account)?;
            assert_eq!(status, 200, "{body}");
            if body["sessions_broke_limits"] == 1 {
                break body;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the end was never counted: {body}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(body["rating_percent"], 81, "{body}");
        assert_eq!(body["sessions_clean"], 0, "{body}");
        let balance = body["balance_sat"].clone();

        let refused = |broker: &Broker| -> anyhow::Result<()> {
            let (status, body) = broker.order(scene, &client)?;
            anyhow::ensure!(status == 403, "{status}: {body}");
            anyhow::ensure!(body["status"] == "ERROR", "{body}");
            let error = body["error"].as_str().unwrap_or_default();
            anyhow::ensure!(error.contains("rating 81 %"), "{body}");
            // Nothing was charged.
            let (_, account) = broker.get(scene, &format!("/account/{client}"))?;
            anyhow::ensure!(account["balance_sat"] == balance, "{account}");
            Ok(())
        };
        refused(&broker)?;
        // A free slot does not change that, and neither does a restart: the
        // rating is read back from the orders.
        broker.wait_capacity(scene, 2)?;
        broker.proc.kill()?;
        drop(broker);
        let broker = Broker::start_with(scene, "broker-restarted", data, relay_port, &flags)?;
        node.proc.wait_event("registered", END)?;
        broker.wait_capacity(scene, 2)?;
        refused(&broker)?;
        Ok(())
    })
}

#[test]
fn the_hosts_loopback_services_are_out_of_reach() {
    if !require_root("the_hosts_loopback_services_are_out_of_reach") {
        return;
    }
    e2e("hosts_loopback_out_of_reach", |scene| {
        // The host's own services on loopback, port 22 among them, even where
        // the owner exempts the address: a session's loopback is its own
        // (its network namespace), so none of them is there. Where sessions
        // may connect is the adversarial suite's `network` room.
        let _ssh = listen("127.0.0.2:22")?;
        let _web = listen("127.0.0.2:80")?;
        let service = TcpListener::bind("127.0.0.1:0")?;
        let service_port = service.local_addr()?.port();
        let udp = UdpSocket::bind("127.0.0.2:0")?;
        udp.set_read_timeout(Some(Duration::from_secs(2)))?;
        let udp_port = udp.local_addr()?.port();
        // The listeners work: root on the host reaches them.
        std::net::TcpStream::connect("127.0.0.2:22")?;
        std::net::TcpStream::connect("127.0.0.2:80")?;
        std::net::TcpStream::connect(("127.0.0.1", service_port))?;

        let (broker, _node, client) = network(scene, 1, &["--net-allow", "127.0.0.2/32"])?;
        let login = order(scene, &broker, &client)?;
        let script = format!(
            "try() {{ if timeout 5 bash -c \"exec 3<>/dev/tcp/$1/$2\" 2>/dev/null; \
               then echo \"$1:$2 open\"; else echo \"$1:$2 closed\"; fi; }}; \
             try 127.0.0.2 22; try 127.0.0.2 80; try 127.0.0.1 {service_port}; try ::1 22; \
             echo x > /dev/udp/127.0.0.2/{udp_port}"
        );
        let out = login.ssh(scene, &script, None)?;
        assert_eq!(
            out.text(),
            format!(
                "127.0.0.2:22 closed\n127.0.0.2:80 closed\n\
                 127.0.0.1:{service_port} closed\n::1:22 closed\n"
            ),
            "{}",
            out.stderr
        );
        let mut buf = [0u8; 16];
        assert!(
            udp.recv(&mut buf).is_err(),
            "a UDP datagram reached the host"
        );
        Ok(())
    });
}

#[test]
fn cpu_is_metered_from_the_cgroup_and_receipts_chain() {
    if !require_root("cpu_is_metered_from_the_cgroup_and_receipts_chain") {
        return;
    }
    e2e("cpu_is_metered", |scene| {
        let (broker, mut node, client) = network(scene, 2, &["--receipt-secs", "1"])?;
        let one = order(scene, &broker, &client)?;
        let two = order(scene, &broker, &client)?;
        let first = spawn_ssh(&one, &burn(5))?;
        // Both burners exit a good while before the session ends: exited
        // processes must still count.
        let second = spawn_ssh(&two, &format!("{b} & {b} & wait; sleep 3", b = burn(5)))?;
        for (login, mut ssh, expected) in [(&one, first, 5.0), (&two, second, 10.0)] {
            assert!(ssh.wait()?.success());
            let last = final_receipt(&mut node, login)?;
            let cpu = last.0 as f64 / 1e6;
            scene.note(&format!("burnt {expected} s, metered {cpu} s"));
            assert!(
                (cpu - expected).abs() <= expected * 0.02,
                "metered {cpu} s, burnt {expected} s"
            );
            assert_eq!(
                node.wait_session_end(&login.order_id, END)?,
                "CLIENT_CLOSED"
            );
            broker_proved(scene, &broker, &client, login, last)?;
        }
        Ok(())
    });
}

#[test]
fn cpu_budget_ends_with_done() {
    if !require_root("cpu_budget_ends_with_done") {
        return;
    }
    e2e("cpu_budget_ends_with_done", |scene| {
        let (broker, mut node, client) = network(scene, 1, &["--cpu-budget-secs", "20"])?;
        let login = order(scene, &broker, &client)?;
        let ssh = spawn_ssh(&login, "perl -e 'fork; fork; 1 while 1'")?;
        let cpu = final_cpu_secs(&mut node, &login)?;
        assert_eq!(ends_with(&mut node, &login, ssh)?, "DONE");
        broker_upheld(scene, &broker, &client, &login, "DONE", "Nobody")?;
        assert!((19.0..=21.0).contains(&cpu), "ended at {cpu} s of CPU");
        Ok(())
    });
}

#[test]
fn idle_session_ends_at_wall_limit() {
    if !require_root("idle_session_ends_at_wall_limit") {
        return;
    }
    e2e("idle_session_ends_at_wall_limit", |scene| {
        let (broker, mut node, client) = network(scene, 1, &["--wall-secs", "30"])?;
        let login = order(scene, &broker, &client)?;
        let started = Instant::now();
        let ssh = spawn_ssh(&login, "sleep 600")?;
        assert_eq!(ends_with(&mut node, &login, ssh)?, "WALL");
        broker_upheld(scene, &broker, &client, &login, "WALL", "Nobody")?;
        assert!(started.elapsed() >= Duration::from_secs(29));
        Ok(())
    });
}

#[test]
fn nothing_is_left_after_many_sessions_and_a_crash() {
    if !require_root("nothing_is_left_after_many_sessions_and_a_crash") {
        return;
    }
    e2e("nothing_is_left", |scene| {
        let args = ["--disk-mib", "64"];
        let (broker, mut node, client) = network(scene, 3, &args)?;
        let node_id = node.node_id.clone();
        let data_dir = node.data_dir.clone();
        // 12 rounds of these 4 and the 2 below: 50 sessions.
        let kinds: [(&str, &str); 4] = [
            ("echo hi", "CLIENT_CLOSED"),
            ("echo up; sleep 600 & sleep 600", "CLIENT_CLOSED"),
            ("b() { b | b & }; b; sleep 60", "PROC"),
            ("head -c 100M /dev/zero > big; sleep 60", "DISK"),
        ];
        for _ in 0..12 {
            for (remote, expected) in kinds {
                let login = order(scene, &broker, &client)?;
                let mut ssh = login.ssh_command(&login.key, &[]);
                ssh.arg(remote).stdin(Stdio::null()).stdout(Stdio::piped());
                let mut ssh = ssh.stderr(Stdio::null()).spawn()?;
                if remote.starts_with("echo up") {
                    // The client goes away while its processes run.
                    let mut line = String::new();
                    std::io::BufRead::read_line(
                        &mut std::io::BufReader::new(ssh.stdout.take().expect("piped")),
                        &mut line,
                    )?;
                    assert_eq!(line, "up\n");
                    ssh.kill()?;
                }
                assert_eq!(ends_with(&mut node, &login, ssh)?, expected, "{remote}");
            }
        }
        // Sessions with running processes when the node dies.
        let mut clients = Vec::new();
        for _ in 0..2 {
            let login = order(scene, &broker, &client)?;
            let out = login.ssh(
                scene,
                "sh -c 'sleep 600 </dev/null >/dev/null 2>&1 & echo started'",
                None,
            )?;
            assert_eq!(out.text(), "started\n", "{}", out.stderr);
            clients.push(spawn_ssh(&login, "sleep 600")?);
        }
        node.proc.kill()?;
        let left = leftovers::of_node(&node_id, &data_dir);
        assert!(left.iter().any(|l| l.starts_with("user")), "{left:?}");
        drop(node);

        let mut node = Node::start(scene, "node", &broker, &["--ready-slots", "3"])?;
        assert_eq!(node.node_id, node_id);
        node.proc.wait_event("slot_ready", END)?;
        assert!(node.proc.stop(Duration::from_secs(30))?, "clean shutdown");
        for mut c in clients {
            let _ = c.kill();
            let _ = c.wait();
        }
        let left = leftovers::of_node(&node_id, &data_dir);
        assert!(left.is_empty(), "left behind: {left:#?}");
        Ok(())
    });
}

#[test]
fn tmp_is_private_and_on_the_session_disk() {
    if !require_root("tmp_is_private_and_on_the_session_disk") {
        return;
    }
    e2e("tmp_is_private", |scene| {
        // Homes under /tmp (the scene's directory) would keep the shared /tmp,
        // so this node keeps its data where a real node does, outside /tmp.
        let data = std::path::PathBuf::from(format!(
            "/var/lib/jusy-e2e-{}",
            scene
                .dir()
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("x")
        ));
        let broker_data = scene.subdir("broker")?;
        let client = Broker::add_client(scene, &broker_data)?;
        let broker = Broker::start_with(scene, "broker", broker_data, 0, &["--disk-mib", "64"])?;
        let args = ["--ready-slots", "2", "--disk-mib", "64"];
        let mut node = Node::start_in(scene, "node", data.clone(), &broker, &args)?;
        broker.wait_capacity(scene, 2)?;
        let one = order(scene, &broker, &client)?;
        let two = order(scene, &broker, &client)?;
        let marker = format!("jusy-marker-{}", one.order_id);
        let out = one.ssh(
            scene,
            &format!(
                "touch /tmp/{marker} /dev/shm/{marker} && \
                 [ \"$(df -P /tmp | tail -1 | cut -d' ' -f1)\" = \"$(df -P ~ | tail -1 | cut -d' ' -f1)\" ] && \
                 ls /tmp"
            ),
            None,
        )?;
        assert_eq!(out.text(), format!("{marker}\n"), "{}", out.stderr);
        let out = two.ssh(scene, &format!("ls /tmp /dev/shm | grep -c {marker}"), None)?;
        assert_eq!(out.text(), "0\n", "{}", out.stderr);
        assert!(!std::path::Path::new("/tmp").join(&marker).exists());
        assert!(node.proc.stop(Duration::from_secs(30))?);
        assert!(leftovers::of_node(&node.node_id, &data).is_empty());
        std::fs::remove_dir_all(&data)?;
        Ok(())
    });
}
