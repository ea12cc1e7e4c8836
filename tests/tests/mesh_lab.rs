//! The NAT lab with several brokers in one mesh: an API broker that sells,
//! relays on the internet that nodes behind home routers dial, and a client
//! that orders from the API broker only.

// Test code: a panic is how a check fails.
#![allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use jusy_tests::lab::HomeOpts;
use jusy_tests::{Broker, Lab, Login, Node, Scene, Site, e2e};
use serde_json::Value;

const NODE_ARGS: &[&str] = &["--ready-slots", "2", "--grace-secs", "1"];

/// An API broker and relays, each trusting all the others.
struct Mesh {
    api: Broker,
    relays: Vec<Broker>,
    client: String,
}

/// The API broker's operator token.
const TOKEN: &str = "mesh-lab-operator";

fn mesh(scene: &Scene, lab: &mut Lab, relays: usize) -> anyhow::Result<Mesh> {
    mesh_with(scene, lab, relays, &[])
}

/// The same, with more `serve` flags for the relays.
fn mesh_with(
    scene: &Scene,
    lab: &mut Lab,
    relays: usize,
    relay_flags: &[&str],
) -> anyhow::Result<Mesh> {
    let api_dir = scene.subdir("api")?;
    let client = Broker::add_client(scene, &api_dir)?;
    let api_key = Broker::identity(scene, &api_dir)?;
    let relay_dirs = (0..relays)
        .map(|i| scene.subdir(&format!("relay{i}")))
        .collect::<anyhow::Result<Vec<PathBuf>>>()?;
    let keys = relay_dirs
        .iter()
        .map(|d| Broker::identity(scene, d))
        .collect::<anyhow::Result<Vec<String>>>()?;

    let site = lab.public_host("api")?;
    let listen = format!("{}:0", site.ip);
    // Tests order until the vanished node is no longer offered, logging in
    // to none of those orders: the cap on them is not what they test.
    let mut flags = vec![
        "--mesh-listen",
        &listen,
        "--operator-token",
        TOKEN,
        "--max-unconnected-orders",
        "1000",
    ];
    for k in &keys {
        flags.extend(["--trust", k]);
    }
    let api = Broker::start_at(scene, "api", &site, api_dir, 0, &flags)?;
    let join = api
        .mesh
        .clone()
        .context("the API broker prints its mesh address")?;

    let mut started = Vec::new();
    for (i, dir) in relay_dirs.into_iter().enumerate() {
        let name = format!("relay{i}");
        let site = lab.public_host(&name)?;
        let listen = format!("{}:0", site.ip);
        let mut flags = vec![
            "--mesh-listen",
            &listen,
            "--join",
            &join,
            "--trust",
            &api_key,
        ];
        for (j, k) in keys.iter().enumerate() {
            if j != i {
                flags.extend(["--trust", k]);
            }
        }
        flags.extend(relay_flags);
        started.push(Broker::start_at(scene, &name, &site, dir, 0, &flags)?);
    }
    Ok(Mesh {
        api,
        relays: started,
        client,
    })
}

/// Orders from `from`; while the relays' first records are still on their
/// way (503), asks again, for at most 30 s.
fn order(scene: &Scene, api: &Broker, from: &Site, client: &str) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = api.order_from(scene, from, client)?;
        if status == 200 {
            return Ok(body);
        }
        anyhow::ensure!(
            status == 503 && Instant::now() < deadline,
            "order failed with {status}: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The order's state on the API broker, once it is `want` (within 15 s).
fn wait_state(
    scene: &Scene,
    api: &Broker,
    client: &str,
    order_id: &str,
    want: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, body) = api.get(scene, &format!("/order/{client}/{order_id}"))?;
        if body["state"] == want {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "order {order_id} never became {want}: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn orders_from_one_api_broker_land_on_nodes_of_two_relays() {
    e2e(
        "orders_from_one_api_broker_land_on_nodes_of_two_relays",
        |scene| {
            let mut lab = Lab::new(scene)?;
            let m = mesh(scene, &mut lab, 2)?;
            let mut nodes: HashMap<String, Node> = HashMap::new();
            for (r, relay) in m.relays.iter().enumerate() {
                for n in 0..2 {
                    let role = format!("home{r}{n}");
                    let home = lab.home(&role, HomeOpts::default())?;
                    let node = Node::start_at(
                        scene,
                        &format!("node{r}{n}"),
                        &home.host,
                        relay,
                        NODE_ARGS,
                    )?;
                    nodes.insert(node.node_id.clone(), node);
                }
            }
            let laptop = lab.public_host("client")?;

            let mut per_relay: HashMap<String, usize> = HashMap::new();
            let mut last = String::new();
            for _ in 0..24 {
                let body = order(scene, &m.api, &laptop, &m.client)?;
                let login = Login::from_order_at(scene, &laptop, &body)?;
                let out = login.ssh(scene, "uname -a", None)?;
                assert_eq!(out.status, Some(0), "{}", out.stderr);
                assert!(
                    out.text().starts_with("Linux "),
                    "uname said {}",
                    out.text()
                );
                *per_relay.entry(login.host.clone()).or_default() += 1;
                let node_id = body["node_id"].as_str().context("node_id")?;
                let node = nodes
                    .get_mut(node_id)
                    .context("an order on an unknown node")?;
                // The session is over (its user gone) before the next order, so
                // every order finds a ready slot somewhere.
                node.wait_session_end(&login.order_id, Duration::from_secs(30))?;
                last = login.order_id;
            }
            for relay in &m.relays {
                let host = relay.relay.ip().to_string();
                assert!(
                    per_relay.get(&host).copied().unwrap_or(0) > 0,
                    "no order landed on relay {host}: {per_relay:?}"
                );
            }
            // The relays forwarded the sessions' ends to the API broker's ledger.
            wait_state(scene, &m.api, &m.client, &last, "CLIENT_CLOSED")?;
            Ok(())
        },
    )
}

#[test]
fn nodes_of_a_killed_relay_move_to_the_other_and_its_sessions_go_on() {
    e2e("nodes_of_a_killed_relay_move_to_the_other", |scene| {
        let mut lab = Lab::new(scene)?;
        let mut m = mesh(scene, &mut lab, 2)?;
        let mut nodes = Vec::new();
        for (r, relay) in m.relays.iter().enumerate() {
            let home = lab.home(&format!("home{r}"), HomeOpts::default())?;
            let mut node =
                Node::start_at(scene, &format!("node{r}"), &home.host, relay, NODE_ARGS)?;
            // Each node learns the other relay from its own.
            node.proc.wait_event("relays", Duration::from_secs(30))?;
            nodes.push(node);
        }
        let laptop = lab.public_host("client")?;

        // A session that must go on: on whichever relay the order lands.
        let body = order(scene, &m.api, &laptop, &m.client)?;
        let login = Login::from_order_at(scene, &laptop, &body)?;
        let survivor = m
            .relays
            .iter()
            .position(|r| r.relay.ip().to_string() == login.host)
            .context("the order names a relay")?;
        let victim = 1 - survivor;
        let mut long = login.ssh_command(&login.key, &[]);
        long.arg("sleep 20; echo alive")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let long = long.spawn()?;
        wait_state(scene, &m.api, &m.client, &login.order_id, "CONNECTED")?;

        m.relays[victim].proc.kill()?;
        let killed = Instant::now();
        // The node moves to another relay it learned of: the surviving one,
        // or the API broker's own.
        let victim_addr = m.relays[victim].relay.to_string();
        nodes[victim]
            .proc
            .wait_event_where("registered", Duration::from_secs(15), |v| {
                v["broker"] != victim_addr.as_str()
            })?;
        scene.note(&format!("node moved after {:?}", killed.elapsed()));

        // Orders land on the moved node through its new relay.
        let moved = nodes[victim].node_id.clone();
        let mut landed = None;
        for _ in 0..10 {
            let body = order(scene, &m.api, &laptop, &m.client)?;
            let l = Login::from_order_at(scene, &laptop, &body)?;
            assert_ne!(
                l.host,
                m.relays[victim].relay.ip().to_string(),
                "no order goes through the killed relay"
            );
            let out = l.ssh(scene, "uname -a", None)?;
            assert_eq!(out.status, Some(0), "{}", out.stderr);
            let on = body["node_id"].as_str().unwrap_or_default().to_owned();
            let node = nodes
                .iter_mut()
                .find(|n| n.node_id == on)
                .context("known node")?;
            node.wait_session_end(&l.order_id, Duration::from_secs(30))?;
            if on == moved {
                landed = Some(killed.elapsed());
                break;
            }
        }
        let landed = landed.context("no order landed on the moved node in 10 orders")?;
        scene.note(&format!(
            "first order on the moved node {landed:?} after the kill"
        ));

        let out = long.wait_with_output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "alive");
        Ok(())
    })
}

#[test]
fn a_broker_not_on_the_list_cannot_offer_its_nodes() {
    e2e("a_broker_not_on_the_list_cannot_offer_its_nodes", |scene| {
        let mut lab = Lab::new(scene)?;
        // relay0 is trusted by the API broker.
        let m = mesh(scene, &mut lab, 1)?;
        // A rogue relay joins the API broker, which does not list it.
        let site = lab.public_host("rogue")?;
        let listen = format!("{}:0", site.ip);
        let join = m.api.mesh.clone().context("mesh address")?;
        let rogue = Broker::start_at(
            scene,
            "rogue",
            &site,
            scene.subdir("rogue")?,
            0,
            &["--mesh-listen", &listen, "--join", &join],
        )?;
        let home = lab.home("home-rogue", HomeOpts::default())?;
        let rogue_node = Node::start_at(scene, "rogue-node", &home.host, &rogue, NODE_ARGS)?;
        let home = lab.home("home0", HomeOpts::default())?;
        let mut node = Node::start_at(scene, "node0", &home.host, &m.relays[0], NODE_ARGS)?;
        let laptop = lab.public_host("client")?;

        // The trusted relay's node is offered; the rogue's never is.
        for _ in 0..6 {
            let body = order(scene, &m.api, &laptop, &m.client)?;
            assert_eq!(
                body["node_id"].as_str(),
                Some(node.node_id.as_str()),
                "an order landed on {} (the rogue's node is {})",
                body["node_id"],
                rogue_node.node_id
            );
            let login = Login::from_order_at(scene, &laptop, &body)?;
            let out = login.ssh(scene, "true", None)?;
            assert_eq!(out.status, Some(0), "{}", out.stderr);
            node.wait_session_end(&login.order_id, Duration::from_secs(30))?;
        }
        // Its records and requests never got through: the API broker
        // refused its connections.
        let log = std::fs::read_to_string(scene.dir().join("api.err"))?;
        assert!(
            log.contains("mesh connection refused"),
            "the API broker did not refuse the rogue"
        );
        Ok(())
    })
}

#[test]
fn a_fourth_broker_joins_with_one_command_and_nodes_use_it() {
    e2e("a_fourth_broker_joins", |scene| {
        let mut lab = Lab::new(scene)?;
        let m = mesh(scene, &mut lab, 2)?;
        let home = lab.home("home0", HomeOpts::default())?;
        let mut node0 = Node::start_at(scene, "node0", &home.host, &m.relays[0], NODE_ARGS)?;
        // It knows the API broker's relay and relay1 besides its own.
        node0
            .proc
            .wait_event_where("relays", Duration::from_secs(30), |v| {
                v["known"].as_u64() >= Some(2)
            })?;

        // The operator lets the new broker in, on the API broker only…
        let dir = scene.subdir("relay2")?;
        let key = Broker::identity(scene, &dir)?;
        let admit = serde_json::json!({ "peer": key }).to_string();
        let auth = format!("Authorization: Bearer {TOKEN}");
        let (status, body) = m.api.request(
            scene,
            "POST",
            "/admin/mesh/trust",
            &[&auth, "Content-Type: application/json"],
            Some(admit.as_bytes()),
        )?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["admitted"], true, "{body}");
        let (status, body) = m.api.request(
            scene,
            "POST",
            "/admin/mesh/trust",
            &[&auth, "Content-Type: application/json"],
            Some(br#"{"peer":"not a peer"}"#),
        )?;
        assert_eq!(status, 400, "{body}");

        // …and starts it with one command that names one broker of the mesh.
        let site = lab.public_host("relay2")?;
        let listen = format!("{}:0", site.ip);
        let join = m.api.mesh.clone().context("mesh address")?;
        let relay2 = Broker::start_at(
            scene,
            "relay2",
            &site,
            dir,
            0,
            &["--mesh-listen", &listen, "--join", &join],
        )?;
        let home = lab.home("home2", HomeOpts::default())?;
        let mut node2 = Node::start_at(scene, "node2", &home.host, &relay2, NODE_ARGS)?;

        // The nodes of the old relays learn of the new one…
        node0
            .proc
            .wait_event_where("relays", Duration::from_secs(30), |v| {
                v["known"].as_u64() >= Some(3)
            })?;
        // …and orders through the API broker land on the new relay's node.
        let laptop = lab.public_host("client")?;
        let mut landed = false;
        for _ in 0..16 {
            let body = order(scene, &m.api, &laptop, &m.client)?;
            let login = Login::from_order_at(scene, &laptop, &body)?;
            let out = login.ssh(scene, "true", None)?;
            assert_eq!(out.status, Some(0), "{}", out.stderr);
            let node = if body["node_id"] == node2.node_id.as_str() {
                landed = true;
                &mut node2
            } else {
                &mut node0
            };
            node.wait_session_end(&login.order_id, Duration::from_secs(30))?;
            if landed {
                assert_eq!(login.host, site.ip.to_string(), "served by the new relay");
                break;
            }
        }
        assert!(
            landed,
            "no order landed on the new relay's node in 16 orders"
        );
        // The old relays took the admission from the API broker.
        for r in ["relay0", "relay1"] {
            let log = std::fs::read_to_string(scene.dir().join(format!("{r}.err")))?;
            assert!(
                log.contains("brokers admitted to the mesh"),
                "{r} never admitted the new broker"
            );
        }
        Ok(())
    })
}

#[test]
fn a_vanished_node_stops_being_offered_within_its_record_expiry() {
    e2e("a_vanished_node_stops_being_offered", |scene| {
        const VALIDITY: Duration = Duration::from_secs(10);
        let mut lab = Lab::new(scene)?;
        let validity = VALIDITY.as_secs().to_string();
        let m = mesh_with(
            scene,
            &mut lab,
            1,
            &[
                "--capacity-validity-secs",
                &validity,
                "--capacity-refresh-secs",
                "2",
            ],
        )?;
        let home = lab.home("home0", HomeOpts::default())?;
        let mut node = Node::start_at(scene, "node0", &home.host, &m.relays[0], NODE_ARGS)?;
        let laptop = lab.public_host("client")?;
        // Offered while it is there.
        let body = order(scene, &m.api, &laptop, &m.client)?;
        assert_eq!(body["node_id"], node.node_id.as_str());
        let login = Login::from_order_at(scene, &laptop, &body)?;
        let out = login.ssh(scene, "true", None)?;
        assert_eq!(out.status, Some(0), "{}", out.stderr);
        node.wait_session_end(&login.order_id, Duration::from_secs(30))?;

        // The node vanishes without a word: its home router loses its uplink.
        home.router.set_uplink(scene, false)?;
        let gone = Instant::now();
        let deadline = gone + VALIDITY + Duration::from_secs(5);
        let refused_at = loop {
            let (status, body) = m.api.order_from(scene, &laptop, &m.client)?;
            if status == 503 {
                break gone.elapsed();
            }
            assert_eq!(status, 200, "{body}");
            anyhow::ensure!(
                Instant::now() < deadline,
                "the vanished node is still offered {:?} after it vanished",
                gone.elapsed()
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        scene.note(&format!(
            "no longer offered {refused_at:?} after it vanished"
        ));
        // And it stays so.
        for _ in 0..3 {
            let (status, body) = m.api.order_from(scene, &laptop, &m.client)?;
            assert_eq!(status, 503, "offered again while gone: {body}");
        }
        Ok(())
    })
}

/// An API broker and one relay with one node behind NAT, and a client's
/// `ssh … <command>` connected through the relay; the order's login and
/// the running `ssh` (its output piped).
fn a_session_on_a_relay(
    scene: &Scene,
    lab: &mut Lab,
    command: &str,
) -> anyhow::Result<(Mesh, Node, Login, std::process::Child)> {
    let m = mesh(scene, lab, 1)?;
    let home = lab.home("home0", HomeOpts::default())?;
    let node = Node::start_at(scene, "node0", &home.host, &m.relays[0], NODE_ARGS)?;
    let laptop = lab.public_host("client")?;
    let body = order(scene, &m.api, &laptop, &m.client)?;
    anyhow::ensure!(
        body["node_id"] == node.node_id.as_str(),
        "the order landed on {} instead of the only node",
        body["node_id"]
    );
    let login = Login::from_order_at(scene, &laptop, &body)?;
    let mut ssh = login.ssh_command(&login.key, &[]);
    ssh.arg(command)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let ssh = ssh.spawn()?;
    wait_state(scene, &m.api, &m.client, &login.order_id, "CONNECTED")?;
    Ok((m, node, login, ssh))
}

#[test]
fn orders_on_a_crashed_relay_end_as_node_lost() {
    e2e("orders_on_a_crashed_relay_end_as_node_lost", |scene| {
        let mut lab = Lab::new(scene)?;
        let (mut m, _node, login, mut long) = a_session_on_a_relay(scene, &mut lab, "sleep 300")?;

        // The relay dies with the order's port; the client's session with it.
        m.relays[0].proc.kill()?;
        let killed = Instant::now();
        let deadline = killed + Duration::from_secs(45);
        loop {
            let (_, body) = m
                .api
                .get(scene, &format!("/order/{}/{}", m.client, login.order_id))?;
            if body["state"] == "NODE_LOST" {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the order was not ended {:?} after its relay died: {body}",
                killed.elapsed()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        scene.note(&format!(
            "ended as NODE_LOST {:?} after the kill",
            killed.elapsed()
        ));
        let _ = long.kill();
        let _ = long.wait();
        Ok(())
    })
}

#[test]
fn an_api_broker_that_stops_ends_its_orders_on_other_relays() {
    e2e("an_api_broker_that_stops_ends_remote_orders", |scene| {
        let mut lab = Lab::new(scene)?;
        let (mut m, mut node, login, long) =
            a_session_on_a_relay(scene, &mut lab, "sleep 300; echo finished")?;

        // The API broker settles the order as cancelled when it stops; the
        // relay closes the port and the node ends the session.
        assert!(m.api.proc.stop(Duration::from_secs(20))?, "API broker stop");
        let reason = node.wait_session_end(&login.order_id, Duration::from_secs(20))?;
        assert_eq!(reason, "CANCELLED");
        let out = long.wait_with_output()?;
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("finished"),
            "the session ran on after its ledger cancelled it"
        );
        let log = std::fs::read_to_string(scene.dir().join("relay0.err"))?;
        assert!(log.contains("order cancelled by its ledger"), "relay log");
        Ok(())
    })
}
