//! The NAT lab scenarios: real brokers, nodes and OpenSSH clients on hosts made
//! of network namespaces, with nodes behind home routers that masquerade and
//! accept nothing inbound, carrier-grade NAT, and the faults of real uplinks.

// Test code: a panic is how a check fails.
#![allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use jusy_tests::client::{random_file, sha256_file};
use jusy_tests::lab::{Home, HomeOpts, Impairment, in_netns};
use jusy_tests::process::Proc;
use jusy_tests::{Broker, Lab, Login, Node, Scene, Site, e2e};

const NODE_ARGS: &[&str] = &["--ready-slots", "1", "--grace-secs", "2"];

/// A broker on the internet with one client account.
fn broker(scene: &Scene, lab: &mut Lab) -> anyhow::Result<(Broker, String)> {
    let site = lab.public_host("broker")?;
    let data = scene.subdir("broker")?;
    let client = Broker::add_client(scene, &data)?;
    let broker = Broker::start_at(scene, "broker", &site, data, 0, &[])?;
    Ok((broker, client))
}

/// A node in `home`, registered and offering its slot.
fn node(scene: &Scene, home: &Home, broker: &Broker) -> anyhow::Result<Node> {
    let node = Node::start_at(scene, "node", &home.host, broker, NODE_ARGS)?;
    broker.wait_capacity(scene, 1)?;
    Ok(node)
}

/// Orders from `from` with `curl`, as that client would.
fn order(scene: &Scene, broker: &Broker, from: &Site, client: &str) -> anyhow::Result<Login> {
    let (status, body) = broker.order_from(scene, from, client)?;
    anyhow::ensure!(status == 200, "order failed with {status}: {body}");
    Login::from_order_at(scene, from, &body)
}

/// `ssh … uname -a` through the relay answers with the node's kernel.
fn assert_uname(scene: &Scene, login: &Login) -> anyhow::Result<()> {
    let out = login.ssh(scene, "uname -a", None)?;
    assert_eq!(out.status, Some(0), "{}", out.stderr);
    assert!(
        out.text().starts_with("Linux "),
        "uname said {}",
        out.text()
    );
    Ok(())
}

/// The router's NAT table holds the node's QUIC flow to the relay, masqueraded.
fn assert_nat_flow(scene: &Scene, router: &jusy_tests::lab::Router, broker: &Broker) {
    let table = router.conntrack(scene).unwrap();
    let relay = format!("dst={} sport", broker.relay.ip());
    let port = format!("dport={}", broker.relay.port());
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("udp") && l.contains(&relay) && l.contains(&port)),
        "no QUIC flow to the relay in {}'s NAT table:\n{table}",
        router.ns
    );
}

#[test]
fn node_behind_nat_serves_a_client_on_the_internet() {
    e2e("node_behind_nat_serves_a_client_on_the_internet", |scene| {
        let mut lab = Lab::new(scene)?;
        let (broker, client) = broker(scene, &mut lab)?;
        let home = lab.home("home", HomeOpts::default())?;
        let node = node(scene, &home, &broker)?;
        let laptop = lab.public_host("client")?;

        let login = order(scene, &broker, &laptop, &client)?;
        assert_uname(scene, &login)?;
        assert_nat_flow(scene, &home.router, &broker);
        // The home LAN is a 1500-byte link: the node tries no QUIC datagram
        // larger than one IPv4 packet on it carries.
        assert_eq!(node.max_datagram, 1500 - 28);

        // A service on the node's LAN address: reachable from the LAN side...
        let listener = in_netns(home.host.netns.as_deref().unwrap(), || {
            TcpListener::bind("0.0.0.0:0")
        })??;
        let service = SocketAddr::new(home.host.ip, listener.local_addr()?.port());
        let dial = |ns: &str| {
            in_netns(ns, move || {
                TcpStream::connect_timeout(&service, Duration::from_secs(3))
            })
        };
        assert!(
            dial(&home.router.ns)?.is_ok(),
            "the LAN side must reach {service}"
        );
        // ...but not from the internet, even aimed straight at the router.
        lab.route(&laptop, Home::LAN, home.router.wan_ip)?;
        let direct = dial(laptop.netns.as_deref().unwrap())?;
        assert!(
            direct.is_err(),
            "{service} was reachable from the internet through the NAT router"
        );
        Ok(())
    })
}

#[test]
fn node_behind_carrier_grade_nat_serves_a_client() {
    e2e("node_behind_carrier_grade_nat_serves_a_client", |scene| {
        let mut lab = Lab::new(scene)?;
        let (broker, client) = broker(scene, &mut lab)?;
        let opts = HomeOpts {
            cgnat: true,
            ..HomeOpts::default()
        };
        let home = lab.home("home", opts)?;
        let _node = node(scene, &home, &broker)?;
        let laptop = lab.public_host("client")?;

        let login = order(scene, &broker, &laptop, &client)?;
        assert_uname(scene, &login)?;
        // Both NATs carry the flow: the home router's and the carrier's.
        assert_nat_flow(scene, &home.router, &broker);
        assert_nat_flow(scene, home.carrier.as_ref().unwrap(), &broker);
        Ok(())
    })
}

#[test]
fn client_behind_its_own_nat_reaches_a_node_behind_nat() {
    e2e(
        "client_behind_its_own_nat_reaches_a_node_behind_nat",
        |scene| {
            let mut lab = Lab::new(scene)?;
            let (broker, client) = broker(scene, &mut lab)?;
            let home = lab.home("home", HomeOpts::default())?;
            let _node = node(scene, &home, &broker)?;
            let office = lab.home("office", HomeOpts::default())?;

            let login = order(scene, &broker, &office.host, &client)?;
            assert_uname(scene, &login)?;
            Ok(())
        },
    )
}

/// 50 ms each way and 1 % loss each way on the node's uplink: with netem on
/// the router's WAN link, or where the kernel has none, with `jusy-impair` on
/// the router between the node and the relay.
#[test]
fn bulk_scp_over_a_slow_lossy_uplink() {
    e2e("bulk_scp_over_a_slow_lossy_uplink", |scene| {
        let mut lab = Lab::new(scene)?;
        let (broker, client) = broker(scene, &mut lab)?;
        let home = lab.home("home", HomeOpts::default())?;
        let impairment = Impairment {
            delay_ms: 50,
            loss_pct: 1.0,
            seed: 7,
        };
        let mut uplink = home.router.impair_uplink(scene, broker.relay, impairment)?;
        scene.note(&format!("uplink impaired with {}", uplink.how));
        let _node = Node::start_via(scene, "node", &home.host, &broker, uplink.relay, NODE_ARGS)?;
        broker.wait_capacity(scene, 1)?;
        let laptop = lab.public_host("client")?;
        let login = order(scene, &broker, &laptop, &client)?;

        let src = login.dir.join("data.bin");
        random_file(&src, 32 << 20, 0x1a6)?;
        let want = sha256_file(&src)?;
        let started = Instant::now();
        // Loss-based congestion control (quinn's Cubic) is capped near 150 KB/s
        // at 100 ms round trip and 1 % random loss, so a slow run takes about
        // four minutes; some runs escape the cap and take seconds.
        let out = login.scp_within(
            scene,
            &src.display().to_string(),
            ":data.bin",
            Duration::from_secs(330),
        )?;
        assert_eq!(out.status, Some(0), "scp: {}", out.stderr);
        scene.note(&format!("32 MiB scp took {:?}", started.elapsed()));
        let out = login.ssh(scene, "sha256sum data.bin", None)?;
        assert!(out.text().starts_with(&want), "remote: {}", out.text());
        scene.note(&uplink.check_lossy(scene)?);
        Ok(())
    })
}

#[test]
fn node_is_orderable_again_soon_after_broker_restart() {
    e2e(
        "node_is_orderable_again_soon_after_broker_restart",
        |scene| {
            let mut lab = Lab::new(scene)?;
            let (mut broker, client) = broker(scene, &mut lab)?;
            let home = lab.home("home", HomeOpts::default())?;
            let mut node = node(scene, &home, &broker)?;
            let laptop = lab.public_host("client")?;

            // The restarted broker must come back on the same address: nodes are
            // configured with it.
            let (site, data, port) = (
                broker.site.clone(),
                broker.data_dir.clone(),
                broker.relay.port(),
            );
            broker.proc.kill()?;
            drop(broker);
            let broker = Broker::start_at(scene, "broker-restarted", &site, data, port, &[])?;
            let restarted = Instant::now();
            node.proc
                .wait_event("registered", Duration::from_secs(10))?;
            let login = loop {
                let (status, body) = broker.order_from(scene, &laptop, &client)?;
                if status == 200 {
                    break Login::from_order_at(scene, &laptop, &body)?;
                }
                assert!(
                    restarted.elapsed() < Duration::from_secs(10),
                    "not orderable 10 s after the restart: {status} {body}"
                );
                std::thread::sleep(Duration::from_millis(100));
            };
            let took = restarted.elapsed();
            assert!(
                took < Duration::from_secs(10),
                "orderable only after {took:?}"
            );
            scene.note(&format!("orderable {took:?} after the broker restarted"));
            assert_uname(scene, &login)?;
            Ok(())
        },
    )
}

/// A client connection that stays open: the remote command prints a
/// `started` event, waits for a file named `go`, then prints `survived`.
fn live_session(scene: &Scene, login: &Login) -> anyhow::Result<Proc> {
    let mut cmd = login.ssh_command(&login.key, &[]);
    cmd.arg(
        "echo '{\"event\":\"started\"}'; \
         while [ ! -e go ]; do sleep 0.1; done; echo '{\"event\":\"survived\"}'",
    );
    let mut ssh = Proc::start(scene, "ssh-live", cmd)?;
    ssh.wait_event("started", Duration::from_secs(60))?;
    Ok(ssh)
}

#[test]
fn uplink_outage_loses_the_session_and_the_node_comes_back() {
    e2e(
        "uplink_outage_loses_the_session_and_the_node_comes_back",
        |scene| {
            let mut lab = Lab::new(scene)?;
            let (broker, client) = broker(scene, &mut lab)?;
            let home = lab.home("home", HomeOpts::default())?;
            let mut node = node(scene, &home, &broker)?;
            let laptop = lab.public_host("client")?;
            let login = order(scene, &broker, &laptop, &client)?;
            let _ssh = live_session(scene, &login)?;

            home.router.set_uplink(scene, false)?;
            let down = Instant::now();
            let path = format!("/order/{client}/{}", login.order_id);
            let ended = loop {
                let (status, body) = broker.get_from(scene, &laptop, &path)?;
                assert_eq!(status, 200, "{body}");
                if body["finished"] == true {
                    break body;
                }
                assert!(
                    down.elapsed() < Duration::from_secs(30),
                    "order still not finished 30 s into the outage: {body}"
                );
                std::thread::sleep(Duration::from_millis(200));
            };
            assert_eq!(ended["state"], "NODE_LOST", "{ended}");
            scene.note(&format!("NODE_LOST {:?} into the outage", down.elapsed()));

            // The outage lasts 60 s, long enough for the node's backoff to
            // reach its ceiling; then the node must find its way back alone.
            std::thread::sleep(Duration::from_secs(60).saturating_sub(down.elapsed()));
            home.router.set_uplink(scene, true)?;
            node.proc
                .wait_event("registered", Duration::from_secs(60))?;
            broker.wait_capacity(scene, 1)?;
            let login = order(scene, &broker, &laptop, &client)?;
            assert_uname(scene, &login)?;
            Ok(())
        },
    )
}

#[test]
fn session_survives_a_new_nat_mapping() {
    e2e("session_survives_a_new_nat_mapping", |scene| {
        let mut lab = Lab::new(scene)?;
        let (broker, client) = broker(scene, &mut lab)?;
        let mut home = lab.home("home", HomeOpts::default())?;
        let mut node = node(scene, &home, &broker)?;
        let laptop = lab.public_host("client")?;
        let login = order(scene, &broker, &laptop, &client)?;
        let mut ssh = live_session(scene, &login)?;

        // The ISP hands out a new address and the old mappings are gone: the
        // node's packets now reach the relay from a new address and port.
        let old = home.router.wan_ip;
        let new = lab.public_ip()?;
        home.router.renumber(scene, new)?;
        home.router.flush_conntrack(scene)?;

        // A new connection through the relay, and the old one still open.
        let out = login.ssh(scene, "touch go", None)?;
        assert_eq!(out.status, Some(0), "{}", out.stderr);
        ssh.wait_event("survived", Duration::from_secs(60))?;
        let (_, body) = broker.get_from(
            scene,
            &laptop,
            &format!("/order/{client}/{}", login.order_id),
        )?;
        assert_eq!(
            (&body["state"], &body["finished"]),
            (&"CONNECTED".into(), &false.into()),
            "{body}"
        );

        // What happened: the node never re-registered, and the router now
        // maps its flow to the new address, so the relay followed the QUIC
        // connection to its new path (connection migration).
        let again = node.proc.wait_event("registered", Duration::ZERO);
        assert!(again.is_err(), "the node reconnected instead of migrating");
        let table = home.router.conntrack(scene)?;
        let flow = table
            .lines()
            .find(|l| l.starts_with("udp") && l.contains(&format!("dport={}", broker.relay.port())))
            .unwrap_or_default();
        assert!(
            flow.contains(&format!("dst={new} ")) && !flow.contains(&format!("dst={old} ")),
            "the flow is not on the new address {new}: {table}"
        );
        // And the relay says so in its log.
        let log = std::fs::read_to_string(scene.dir().join("broker.err"))?;
        assert!(
            log.lines()
                .any(|l| l.contains("migrated to a new address") && l.contains(&new.to_string())),
            "the relay did not report the migration"
        );
        scene.note(&format!("QUIC migrated from {old} to {new}"));
        Ok(())
    })
}

#[test]
fn node_says_when_its_router_drops_udp() {
    e2e("node_says_when_its_router_drops_udp", |scene| {
        let mut lab = Lab::new(scene)?;
        let (broker, _) = broker(scene, &mut lab)?;
        let opts = HomeOpts {
            block_udp: true,
            ..HomeOpts::default()
        };
        let home = lab.home("home", opts)?;
        let mut node = Node::spawn_at(scene, "node", &home.host, &broker, NODE_ARGS)?;

        let ev = node
            .proc
            .wait_event("uplink_blocked", Duration::from_secs(60))?;
        assert_eq!(ev["transport"], "QUIC/UDP", "{ev}");
        assert_eq!(ev["broker"], broker.relay.to_string(), "{ev}");
        assert!(
            ev["hint"].as_str().unwrap_or_default().contains("UDP"),
            "{ev}"
        );
        assert!(
            home.router.dropped_udp(scene)? > 0,
            "the router's UDP drop rule never matched"
        );
        let log = std::fs::read_to_string(scene.dir().join("node.err"))?;
        assert!(
            log.lines()
                .any(|l| l.contains("ERROR") && l.contains("drops outgoing UDP")),
            "no error line for people in the node's log"
        );
        Ok(())
    })
}
