//! Money through the real binaries: charges, refunds, 402s, deposits through the
//! operator API, clients' own SSH keys, a broker killed at random moments
//! that loses no money, concurrent orders that never overdraw, a quick close
//! that pays only the CPU time proven, and the broker's own connect window.

// Test code: a panic is how a check fails.
#![allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jusy_tests::jusy::api_request;
use jusy_tests::process::{self, bin};
use jusy_tests::{Broker, Login, Node, Scene, e2e};
use serde_json::Value;

const PRICE: u64 = 20_000;
const TOKEN: &str = "operator-token-for-tests-0123456789";

/// Waits until the broker has settled an order.
fn wait_settled(
    scene: &Scene,
    broker: &Broker,
    client: &str,
    order_id: &str,
) -> anyhow::Result<Value> {
    wait_order(scene, broker, client, order_id, |body| {
        body["finished"] == true
    })
}

/// Polls the order's status until `done` holds for it.
fn wait_order(
    scene: &Scene,
    broker: &Broker,
    client: &str,
    order_id: &str,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = broker.get(scene, &format!("/order/{client}/{order_id}"))?;
        anyhow::ensure!(status == 200, "order status {status}: {body}");
        if done(&body) {
            return Ok(body);
        }
        anyhow::ensure!(Instant::now() < deadline, "order never got there: {body}");
        // Slower than the broker's per-hash rate limit refills.
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn keygen(
    dir: &std::path::Path,
    name: &str,
    args: &[&str],
) -> anyhow::Result<(std::path::PathBuf, String)> {
    let path = dir.join(name);
    let ok = std::process::Command::new("ssh-keygen")
        .args(["-q", "-N", "", "-f"])
        .arg(&path)
        .args(args)
        .status()?
        .success();
    anyhow::ensure!(ok, "ssh-keygen failed");
    let public = std::fs::read_to_string(path.with_extension("pub"))?;
    Ok((path, public))
}

#[test]
fn orders_are_charged_refunded_and_paid_for() {
    e2e("orders_are_charged_refunded_and_paid_for", |scene| {
        let data = scene.subdir("broker")?;
        let owner = Broker::add_account(scene, &data, "owner", 0)?;
        let client = Broker::add_account(scene, &data, "client", 2 * PRICE)?;
        let broker = Broker::start_with(scene, "broker", data, 0, &["--operator-token", TOKEN])?;
        let mut node = Node::start_owned(
            scene,
            "node",
            &broker,
            &owner,
            &["--ready-slots", "2", "--grace-secs", "1"],
        )?;
        broker.wait_capacity(scene, 2)?;

        // An order closed within 20 s of connecting is cancelled: it pays the
        // CPU time proven, here less than a satoshi's worth, so all comes back.
        let (status, body) = broker.order(scene, &client)?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["price_sat"], PRICE);
        let login = Login::from_order(scene, &body)?;
        let (_, account) = broker.get(scene, &format!("/account/{client}"))?;
        assert_eq!(account["balance_sat"], PRICE, "{account}");
        assert_eq!(login.ssh(scene, "echo hi", None)?.text(), "hi\n");
        node.wait_session_end(&login.order_id, Duration::from_secs(30))?;
        let settled = wait_settled(scene, &broker, &client, &login.order_id)?;
        assert_eq!(settled["cancelled"], true, "{settled}");
        assert_eq!(settled["settlement"]["refund"], PRICE, "{settled}");
        let (_, account) = broker.get(scene, &format!("/account/{client}"))?;
        assert_eq!(account["balance_sat"], 2 * PRICE, "{account}");
        assert_eq!(account["orders"][0]["order_id"], login.order_id.as_str());

        // Two orders spend the balance; the third is refused with 402.
        broker.wait_capacity(scene, 2)?;
        for _ in 0..2 {
            let (status, body) = broker.order(scene, &client)?;
            assert_eq!(status, 200, "{body}");
        }
        let (status, body) = broker.order(scene, &client)?;
        assert_eq!(status, 402, "{body}");
        assert_eq!(body["status"], "ERROR");
        assert!(
            body["error"]
                .as_str()
                .unwrap_or_default()
                .contains("insufficient"),
            "{body}"
        );

        // The owner sees their node.
        let (status, body) = broker.get(scene, &format!("/owner/{owner}"))?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["nodes"].as_array().map(Vec::len), Some(1), "{body}");
        assert!(
            body["nodes"][0]["speed_test_ms"].is_u64(),
            "the speed test it passed: {body}"
        );
        let (status, _) = broker.get(scene, &format!("/owner/{client}"))?;
        assert_eq!(status, 401, "a client hash is not an owner hash");

        // Operator endpoints need the token; deposits are validated.
        let auth = format!("Authorization: Bearer {TOKEN}");
        let json = "Content-Type: application/json";
        let (status, body) = broker.get(scene, "/admin/audit")?;
        assert_eq!((status, &body["status"]), (401, &"ERROR".into()));
        let (status, body) = broker.request(
            scene,
            "GET",
            "/admin/audit",
            &["Authorization: Bearer wrong"],
            None,
        )?;
        assert_eq!(status, 401, "{body}");
        let (status, body) = broker.request(scene, "GET", "/admin/audit", &[&auth], None)?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["audit"]["ok"], true, "{body}");
        let account_id = account["account_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let deposit = |body: &str| {
            broker.request(
                scene,
                "POST",
                "/admin/deposits",
                &[&auth, json],
                Some(body.as_bytes()),
            )
        };
        let (status, body) = deposit(&format!(
            r#"{{"account_id":"{account_id}","role":"client","amount_sat":{PRICE}}}"#
        ))?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["balance_sat"], PRICE);
        let (status, body) = deposit("{not json")?;
        assert!((400..500).contains(&status), "{body}");
        assert_eq!(body["status"], "ERROR");
        let (status, _) = deposit(&format!(
            r#"{{"account_id":"{account_id}","role":"client","amount_sat":0}}"#
        ))?;
        assert_eq!(status, 400);
        let (status, _) = deposit(&format!(
            r#"{{"account_id":"{}","role":"client","amount_sat":5}}"#,
            "ab".repeat(32)
        ))?;
        assert_eq!(status, 404);

        // Malformed hashes on every client and owner endpoint, and another
        // client's order, which answers like a missing one.
        for path in ["/order/xyz", "/order/xyz/abc", "/account/xyz", "/owner/xyz"] {
            let (status, body) = broker.get(scene, path)?;
            assert_eq!(
                (status, &body["status"]),
                (400, &"ERROR".into()),
                "{path}: {body}"
            );
        }
        let (status, _) = broker.request(scene, "PUT", "/account/xyz/keys", &[], Some(b""))?;
        assert_eq!(status, 400);
        let (status, other) = broker.request(scene, "POST", "/admin/clients", &[&auth], None)?;
        assert_eq!(status, 201, "{other}");
        let other = other["client_hash"].as_str().unwrap_or_default().to_owned();
        let (status, body) = broker.get(scene, &format!("/order/{other}/{}", login.order_id))?;
        assert_eq!(status, 404, "another client's order: {body}");
        let (status, body) = broker.order(scene, &other)?;
        assert_eq!(status, 402, "a new client has no funds: {body}");

        // The client's own key: validated, then accepted for the next order.
        let (own, own_pub) = keygen(&login.dir, "own", &["-t", "ed25519"])?;
        let (_, weak_pub) = keygen(&login.dir, "weak", &["-t", "rsa", "-b", "1024"])?;
        let keys = format!("/account/{client}/keys");
        let (status, body) = broker.request(scene, "PUT", &keys, &[], Some(b"ssh-ed25519 junk"))?;
        assert_eq!((status, &body["status"]), (400, &"ERROR".into()), "{body}");
        let (status, body) = broker.request(scene, "PUT", &keys, &[], Some(weak_pub.as_bytes()))?;
        assert_eq!(status, 400, "{body}");
        let huge = vec![b'a'; 200 * 1024];
        let (status, body) = broker.request(scene, "PUT", &keys, &[], Some(&huge))?;
        assert_eq!((status, &body["status"]), (413, &"ERROR".into()), "{body}");
        let (status, body) = broker.request(scene, "PUT", &keys, &[], Some(own_pub.as_bytes()))?;
        assert_eq!(status, 200, "{body}");
        broker.wait_capacity(scene, 1)?;
        let (status, body) = broker.order(scene, &client)?;
        assert_eq!(status, 200, "{body}");
        let mine = Login::from_order(scene, &body)?;
        let mut cmd = mine.ssh_command(&own, &[]);
        cmd.arg("echo own key");
        let out = process::run(scene, cmd, None, Duration::from_secs(60))?;
        assert_eq!(out.text(), "own key\n", "{}", out.stderr);
        Ok(())
    });
}

#[test]
fn broker_killed_at_random_moments_loses_no_money() {
    e2e("broker_killed_at_random_moments_loses_no_money", |scene| {
        const KILLS: usize = 50;
        let data = scene.subdir("broker")?;
        let owner = Broker::add_account(scene, &data, "owner", 0)?;
        let client = Broker::add_account(scene, &data, "client", 1_000 * PRICE)?;
        let flags = ["--rate-limit-per-sec", "1000", "--rate-limit-burst", "1000"];
        let mut broker = Broker::start_with(scene, "broker-0", data.clone(), 0, &flags)?;
        let relay_port = broker.relay.port();
        let _node = Node::start_owned(
            scene,
            "node",
            &broker,
            &owner,
            &["--ready-slots", "3", "--grace-secs", "1"],
        )?;
        let api = Arc::new(Mutex::new(broker.api));
        let delivered = Mutex::new(HashSet::new());
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| -> anyhow::Result<()> {
            // A client that orders and logs in as fast as it can, remembering
            // every order whose credentials reached it.
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let addr = *api.lock().unwrap();
                    let Ok((200, body)) = api_request(
                        scene,
                        &jusy_tests::Site::local(),
                        addr,
                        "GET",
                        &format!("/order/{client}"),
                        &[],
                        None,
                    ) else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    delivered
                        .lock()
                        .unwrap()
                        .insert(body["order_id"].as_str().unwrap_or_default().to_owned());
                    if let Ok(login) = Login::from_order(scene, &body) {
                        let _ = login.ssh(scene, "echo hi", None);
                    }
                }
            });
            let mut seed = 0x2545_f491_4f6c_dd1d_u64;
            for round in 1..=KILLS {
                broker.wait_capacity(scene, 1)?;
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                // Chaos timing, not a wait for readiness: kill at a random moment.
                std::thread::sleep(Duration::from_millis(seed % 1_200));
                broker.proc.kill()?;
                broker = Broker::start_with(
                    scene,
                    &format!("broker-{round}"),
                    data.clone(),
                    relay_port,
                    &flags,
                )?;
                *api.lock().unwrap() = broker.api;
            }
            stop.store(true, Ordering::Relaxed);
            Ok(())
        })?;
        broker.wait_capacity(scene, 1)?;
        assert!(
            broker.proc.stop(Duration::from_secs(20))?,
            "broker did not stop cleanly"
        );

        let mut audit_cmd = std::process::Command::new(bin("jusy-broker")?);
        audit_cmd.arg("audit").arg("--data-dir").arg(&data);
        let out = process::run(scene, audit_cmd, None, Duration::from_secs(60))?;
        let audit: Value = serde_json::from_slice(&out.stdout)?;
        assert_eq!(out.status, Some(0), "audit failed: {audit}");
        assert_eq!(audit["ok"], true, "{audit}");

        let mut orders_cmd = std::process::Command::new(bin("jusy-broker")?);
        orders_cmd.arg("orders").arg("--data-dir").arg(&data);
        let out = process::run(scene, orders_cmd, None, Duration::from_secs(60))?;
        let orders: HashMap<String, Value> = out
            .text()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l)
                    .map(|v| (v["order_id"].as_str().unwrap_or_default().to_owned(), v))
            })
            .collect::<Result<_, _>>()?;
        let delivered = delivered.into_inner().unwrap();
        assert!(
            delivered.len() >= KILLS / 2,
            "only {} orders were delivered",
            delivered.len()
        );
        for (id, order) in &orders {
            assert_eq!(
                order["finished"], true,
                "order {id} left unsettled: {order}"
            );
            if !delivered.contains(id) {
                assert_eq!(
                    order["settlement"]["refund"], PRICE,
                    "undelivered order {id} kept money: {order}"
                );
            }
        }
        for id in &delivered {
            assert!(
                orders.contains_key(id),
                "delivered order {id} has no record"
            );
        }
        for o in audit["orders"].as_array().into_iter().flatten() {
            assert_eq!(o["charges"], 1, "{o}");
        }
        Ok(())
    });
}

/// `price × proven / 1 CPU-hour`, and the owner's 80 % of it, as the broker
/// rounds them.
fn worth(price: u64, proven_us: u64) -> (u64, u64) {
    let used = (u128::from(price) * u128::from(proven_us) / 3_600_000_000) as u64;
    (used, (u128::from(used) * 800_000 / 1_000_000) as u64)
}

#[test]
fn a_quick_close_pays_the_proven_cpu_and_refunds_the_rest() {
    e2e("a_quick_close_pays_the_proven_cpu", |scene| {
        // One satoshi per CPU-microsecond makes every proven microsecond count.
        const HOUR_PRICE: u64 = 3_600_000_000;
        let data = scene.subdir("broker")?;
        let owner = Broker::add_account(scene, &data, "owner", 0)?;
        let client = Broker::add_account(scene, &data, "client", HOUR_PRICE)?;
        let price = HOUR_PRICE.to_string();
        let broker = Broker::start_with(scene, "broker", data, 0, &["--price-sat", &price])?;
        let node_args = [
            "--ready-slots",
            "1",
            "--grace-secs",
            "1",
            "--receipt-secs",
            "2",
        ];
        let mut node = Node::start_owned(scene, "node", &broker, &owner, &node_args)?;
        broker.wait_capacity(scene, 1)?;

        // Every core busy for 15 s, then the client leaves: within 20 s of
        // its login.
        let (status, body) = broker.order(scene, &client)?;
        assert_eq!(status, 200, "{body}");
        let login = Login::from_order(scene, &body)?;
        let busy = "for i in $(seq $(nproc)); do \
                      perl -e '$t = time + 15; 1 while time < $t' & \
                    done; wait";
        let out = login.ssh(scene, busy, None)?;
        assert_eq!(out.status, Some(0), "{}", out.stderr);
        assert_eq!(
            node.wait_session_end(&login.order_id, Duration::from_secs(30))?,
            "CLIENT_CLOSED"
        );
        let settled = wait_settled(scene, &broker, &client, &login.order_id)?;
        assert_eq!(settled["cancelled"], true, "{settled}");
        assert_eq!(settled["verdict"]["quick_close"], true, "{settled}");
        assert_eq!(settled["verdict"]["upheld"], true, "{settled}");
        assert_eq!(settled["implausible_receipts"], 0, "{settled}");
        let proven = settled["proven_cpu_us"].as_u64().unwrap_or_default();
        // The loops got some CPU time (however busy the machine), and no
        // more than the cores could give in the time since the login.
        let cores = settled["cores"].as_u64().unwrap_or_default();
        assert!(proven >= 1_000_000, "{settled}");
        assert!(proven <= cores * 20_000_000, "{settled}");
        assert_eq!(
            settled["claimed_cpu_us"].as_u64(),
            Some(proven),
            "{settled}"
        );
        let (used, owner_share) = worth(HOUR_PRICE, proven);
        assert_eq!(
            settled["settlement"]["refund"],
            HOUR_PRICE - used,
            "{settled}"
        );
        assert_eq!(settled["settlement"]["owner"], owner_share, "{settled}");
        let (_, account) = broker.get(scene, &format!("/account/{client}"))?;
        assert_eq!(account["balance_sat"], HOUR_PRICE - used, "{account}");
        // Earnings are held for the hold period (a day by default) first.
        let (_, earnings) = broker.get(scene, &format!("/owner/{owner}"))?;
        assert_eq!(earnings["held_sat"], owner_share, "{earnings}");
        assert_eq!(earnings["earnings_sat"], 0, "{earnings}");
        Ok(())
    });
}

#[test]
fn the_broker_cancels_an_order_nobody_logged_in_to_even_if_its_node_is_silent() {
    e2e("the_brokers_connect_window", |scene| {
        let data = scene.subdir("broker")?;
        let client = Broker::add_account(scene, &data, "client", PRICE)?;
        let flags = ["--connect-window-secs", "3"];
        let broker = Broker::start_with(scene, "broker", data, 0, &flags)?;
        let mut node = Node::start(scene, "node", &broker, &["--ready-slots", "1"])?;
        broker.wait_capacity(scene, 1)?;
        let (status, body) = broker.order(scene, &client)?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["terms"]["connect_window_secs"], 3, "{body}");
        let order_id = body["order_id"].as_str().unwrap_or_default().to_owned();
        // The node is frozen before its own window ends: it never says
        // NEVER_CONNECTED, and its connection outlives the broker's window
        // (an idle timeout of 8 s).
        let signal = |sig: &str| {
            std::process::Command::new("kill")
                .args([sig, &node.proc.pid().to_string()])
                .status()
        };
        anyhow::ensure!(signal("-STOP")?.success(), "could not stop the node");
        let settled = wait_settled(scene, &broker, &client, &order_id);
        anyhow::ensure!(signal("-CONT")?.success(), "could not continue the node");
        let settled = settled?;
        assert_eq!(settled["state"], "NEVER_CONNECTED", "{settled}");
        assert_eq!(settled["cancelled"], true, "{settled}");
        assert_eq!(settled["verdict"]["by"], "Broker", "{settled}");
        assert_eq!(settled["settlement"]["refund"], PRICE, "{settled}");
        let (_, account) = broker.get(scene, &format!("/account/{client}"))?;
        assert_eq!(account["balance_sat"], PRICE, "{account}");
        // Woken, the node is told to end the session, or ends it itself.
        let reason = node.wait_session_end(&order_id, Duration::from_secs(30))?;
        assert!(
            reason == "CANCELLED" || reason == "NEVER_CONNECTED",
            "{reason}"
        );
        Ok(())
    });
}

#[test]
fn owners_are_paid_what_receipts_prove() {
    e2e("owners_are_paid_what_receipts_prove", |scene| {
        // One satoshi per CPU-microsecond makes every proven microsecond count.
        const HOUR_PRICE: u64 = 3_600_000_000;
        let data = scene.subdir("broker")?;
        let owner = Broker::add_account(scene, &data, "owner", 0)?;
        let client = Broker::add_account(scene, &data, "client", 2 * HOUR_PRICE)?;
        let price = HOUR_PRICE.to_string();
        // A test-sized CPU budget, which the node below is willing to sell;
        // long enough for the second session below to be killed before it
        // uses it up.
        let flags = ["--price-sat", &price, "--cpu-budget-secs", "8"];
        let broker = Broker::start_with(scene, "broker", data, 0, &flags)?;
        let node_args = ["--ready-slots", "1", "--grace-secs", "1"];
        let mut node = Node::start_owned(
            scene,
            "node",
            &broker,
            &owner,
            &[
                &node_args[..],
                &["--receipt-secs", "1", "--cpu-budget-secs", "8"],
            ]
            .concat(),
        )?;
        broker.wait_capacity(scene, 1)?;

        // A session that uses its (test-sized) CPU budget ends with DONE: no
        // refund, and the owner earns their share of exactly what was proven.
        let (status, body) = broker.order(scene, &client)?;
        assert_eq!(status, 200, "{body}");
        let login = Login::from_order(scene, &body)?;
        let burn = "perl -e 'my ($u, $s) = times; ($u, $s) = times while $u + $s < 30'";
        let _ = login.ssh(scene, burn, None)?;
        assert_eq!(
            node.wait_session_end(&login.order_id, Duration::from_secs(60))?,
            "DONE"
        );
        let settled = wait_settled(scene, &broker, &client, &login.order_id)?;
        let proven = settled["proven_cpu_us"].as_u64().unwrap_or_default();
        assert!(proven >= 1_900_000, "{settled}");
        let (_, owner_share) = worth(HOUR_PRICE, proven);
        assert_eq!(settled["settlement"]["refund"], 0, "{settled}");
        assert_eq!(settled["settlement"]["owner"], owner_share, "{settled}");
        assert_eq!(
            settled["settlement"]["operator"],
            HOUR_PRICE - owner_share,
            "{settled}"
        );
        // Earnings are held for the hold period (a day by default) first.
        let (_, earnings) = broker.get(scene, &format!("/owner/{owner}"))?;
        assert_eq!(earnings["held_sat"], owner_share, "{earnings}");
        assert_eq!(earnings["earnings_sat"], 0, "{earnings}");
        drop(node);

        // A node that dies mid-session: the client gets back what receipts do
        // not prove, the owner still earns their share of what they do.
        let mut node = Node::start(
            scene,
            "node-2",
            &broker,
            &[&node_args[..], &["--receipt-secs", "1"]].concat(),
        )?;
        broker.wait_capacity(scene, 1)?;
        let (status, body) = broker.order(scene, &client)?;
        assert_eq!(status, 200, "{body}");
        let login = Login::from_order(scene, &body)?;
        let mut burner = login.ssh_command(&login.key, &[]);
        burner
            .arg(burn)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut burner = burner.spawn()?;
        node.proc
            .wait_event_where("receipt", Duration::from_secs(30), |v| {
                v["order_id"] == login.order_id.as_str() && v["cpu_us"].as_u64() > Some(500_000)
            })?;
        // The node prints a receipt as it sends it: kill it only once the
        // broker has verified one, so that there is something proven to pay.
        wait_order(scene, &broker, &client, &login.order_id, |body| {
            body["proven_cpu_us"].as_u64() > Some(0)
        })?;
        node.proc.kill()?;
        let settled = wait_settled(scene, &broker, &client, &login.order_id)?;
        let _ = burner.kill();
        let _ = burner.wait();
        assert_eq!(settled["reason"], "NODE_LOST", "{settled}");
        // What reached the broker before the node died.
        let proven = settled["proven_cpu_us"].as_u64().unwrap_or_default();
        assert!(proven > 0, "{settled}");
        let (used, owner_share) = worth(HOUR_PRICE, proven);
        assert_eq!(
            settled["settlement"]["refund"],
            HOUR_PRICE - used,
            "{settled}"
        );
        assert_eq!(settled["settlement"]["owner"], owner_share, "{settled}");

        // The killed node's restart sweeps what it left behind.
        let (data_dir, node_id) = (node.data_dir.clone(), node.node_id.clone());
        drop(node);
        let node = Node::start_owned_in(
            scene,
            "node-2-restarted",
            data_dir.clone(),
            &broker,
            &owner,
            &node_args,
        )?;
        // The session it dropped counts against it: rated down from a new
        // node's 90 % to 9 of 11.
        broker.wait_capacity(scene, 1)?;
        let (_, owned) = broker.get(scene, &format!("/owner/{owner}"))?;
        let rated = owned["nodes"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["node_id"] == node_id.as_str()))
            .cloned()
            .unwrap_or_default();
        assert_eq!(rated["sessions_dropped"], 1, "{owned}");
        assert_eq!(rated["rating_percent"], 81, "{owned}");
        drop(node);
        let left = jusy_tests::leftovers::of_node(&node_id, &data_dir);
        assert!(left.is_empty(), "left behind: {left:?}");
        Ok(())
    });
}

#[test]
fn concurrent_orders_over_http_never_overdraw() {
    e2e("concurrent_orders_over_http_never_overdraw", |scene| {
        const CLIENTS: usize = 20;
        const AFFORD: usize = 5;
        let data = scene.subdir("broker")?;
        let clients = (0..CLIENTS)
            .map(|_| Broker::add_account(scene, &data, "client", AFFORD as u64 * PRICE))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let flags = [
            "--rate-limit-per-sec",
            "1000",
            "--rate-limit-burst",
            "1000",
            "--operator-token",
            TOKEN,
            // Money is what this test runs out of, not the cap on orders
            // nobody has logged in to.
            "--max-unconnected-orders",
            "100",
            // Sold without disks of their own, as the node below keeps them.
            "--disk-mib",
            "0",
        ];
        let broker = Broker::start_with(scene, "broker", data, 0, &flags)?;
        // More ready slots than the clients can pay for, so that money, not
        // capacity, is what runs out. No disk images: they are not what is
        // tested here, and 100 of them would only slow the test.
        let ready = (CLIENTS * AFFORD).to_string();
        let _node = Node::start(
            scene,
            "node",
            &broker,
            &["--ready-slots", &ready, "--disk-mib", "0"],
        )?;
        broker.wait_capacity(scene, (CLIENTS * AFFORD) as u64)?;

        // Every client sends twice what it can pay for, all at once.
        let answers = std::thread::scope(|s| {
            let asks: Vec<_> = clients
                .iter()
                .flat_map(|c| std::iter::repeat_n(c, 2 * AFFORD))
                .map(|client| {
                    let api = broker.api;
                    s.spawn(move || {
                        let path = format!("/order/{client}");
                        let site = jusy_tests::Site::local();
                        (
                            client,
                            api_request(scene, &site, api, "GET", &path, &[], None),
                        )
                    })
                })
                .collect();
            asks.into_iter()
                .map(|h| h.join().expect("order thread"))
                .collect::<Vec<_>>()
        });
        let mut won: HashMap<&String, usize> = HashMap::new();
        for (client, answer) in answers {
            let (status, body) = answer?;
            match status {
                200 => *won.entry(client).or_default() += 1,
                402 => assert_eq!(body["status"], "ERROR", "{body}"),
                other => panic!("order answered {other}: {body}"),
            }
        }
        assert_eq!(won.values().sum::<usize>(), CLIENTS * AFFORD, "{won:?}");
        for client in &clients {
            assert_eq!(won.get(client), Some(&AFFORD), "{won:?}");
            let (status, account) = broker.get(scene, &format!("/account/{client}"))?;
            assert_eq!(status, 200, "{account}");
            assert_eq!(account["balance_sat"], 0, "{account}");
        }
        let (status, audit) = broker.request(
            scene,
            "GET",
            "/admin/audit",
            &[&format!("Authorization: Bearer {TOKEN}")],
            None,
        )?;
        assert_eq!(status, 200, "{audit}");
        let books = &audit["audit"];
        assert_eq!(books["ok"], true, "problems: {}", books["problems"]);
        let held = (CLIENTS * AFFORD) as u64 * PRICE;
        assert_eq!(books["held"], held, "escrow: {}", books["held"]);
        Ok(())
    });
}

#[test]
fn every_endpoint_refuses_malformed_input_with_json() {
    e2e(
        "every_endpoint_refuses_malformed_input_with_json",
        |scene| {
            let data = scene.subdir("broker")?;
            let client = Broker::add_client(scene, &data)?;
            let flags = [
                "--operator-token",
                TOKEN,
                "--rate-limit-per-sec",
                "1000",
                "--rate-limit-burst",
                "1000",
            ];
            let broker = Broker::start_with(scene, "broker", data, 0, &flags)?;
            let auth = format!("Authorization: Bearer {TOKEN}");
            let json = "Content-Type: application/json";
            let unknown = "0".repeat(64);
            // curl sends the huge body only after `100 Continue`, which never
            // comes; the large one it sends at once, and the broker reads it
            // before refusing, so curl sees the 413 rather than a reset.
            let huge = vec![b'x'; 2 << 20];
            let large = vec![b'x'; 200 << 10];
            // Every refusal is `{"status":"ERROR","error":…}` (`request` fails on
            // anything that is not JSON) with the status it should have.
            let refused =
                |method: &str, path: &str, headers: &[&str], body: Option<&[u8]>, want: u16| {
                    let (status, reply) = broker.request(scene, method, path, headers, body)?;
                    anyhow::ensure!(
                        status == want,
                        "{method} {path}: {status} {reply}, not {want}"
                    );
                    anyhow::ensure!(reply["status"] == "ERROR", "{method} {path}: {reply}");
                    anyhow::ensure!(reply["error"].is_string(), "{method} {path}: {reply}");
                    Ok(())
                };
            // Hashes: malformed, unknown.
            for path in [
                "/order/nothex",
                "/account/nothex",
                "/owner/nothex",
                "/order/nothex/abc",
            ] {
                refused("GET", path, &[], None, 400)?;
            }
            refused("GET", &format!("/order/{unknown}"), &[], None, 401)?;
            refused("GET", &format!("/account/{unknown}"), &[], None, 401)?;
            refused("DELETE", "/account/nothex/keys", &[], None, 400)?;
            refused(
                "DELETE",
                &format!("/account/{unknown}/keys"),
                &[],
                None,
                401,
            )?;
            refused(
                "PUT",
                &format!("/account/{unknown}/keys"),
                &[],
                Some(b"ssh-ed25519 AAAA"),
                401,
            )?;
            // Order ids: malformed, and one that is no order of this client.
            refused("GET", &format!("/order/{client}/not-an-id"), &[], None, 400)?;
            refused(
                "GET",
                &format!("/order/{client}/{}", "ab".repeat(12)),
                &[],
                None,
                404,
            )?;
            // Bodies: too large, or not what the endpoint takes.
            refused(
                "PUT",
                &format!("/account/{client}/keys"),
                &[],
                Some(&huge),
                413,
            )?;
            refused("POST", "/admin/deposits", &[&auth, json], Some(&huge), 413)?;
            refused("POST", "/admin/deposits", &[&auth, json], Some(&large), 413)?;
            refused("POST", "/login", &[], Some(&large), 413)?;
            // The same without a declared length: the broker reads a chunked
            // body up to its limit, and a small one still reaches the handler.
            let chunked = "Transfer-Encoding: chunked";
            refused(
                "POST",
                "/admin/deposits",
                &[&auth, json, chunked],
                Some(&large),
                413,
            )?;
            refused("POST", "/login", &[chunked], Some(&large), 413)?;
            refused(
                "POST",
                "/admin/deposits",
                &[&auth, json, chunked],
                Some(b"[1,2]"),
                422,
            )?;
            refused(
                "POST",
                "/admin/deposits",
                &[&auth, json],
                Some(b"[1,2]"),
                422,
            )?;
            // Operator endpoints without the token.
            for (method, path) in [
                ("POST", "/admin/clients"),
                ("POST", "/admin/owners"),
                ("POST", "/admin/deposits"),
                ("GET", "/admin/orders"),
                ("GET", "/admin/audit"),
                ("GET", "/admin/mesh"),
                ("POST", "/admin/mesh/trust"),
            ] {
                refused(method, path, &[], None, 401)?;
                refused(
                    method,
                    path,
                    &["Authorization: Bearer not-the-token"],
                    None,
                    401,
                )?;
            }
            // A broker outside a mesh says so.
            let peer = br#"{"peer":"not a key"}"#;
            let (status, reply) = broker.request(
                scene,
                "POST",
                "/admin/mesh/trust",
                &[&auth, json],
                Some(peer),
            )?;
            assert!((400..500).contains(&status), "{status} {reply}");
            assert_eq!(reply["status"], "ERROR", "{reply}");

            // And the same endpoints work when asked properly.
            let (status, made) = broker.request(scene, "POST", "/admin/clients", &[&auth], None)?;
            assert_eq!(status, 201, "{made}");
            let made_hash = made["client_hash"].as_str().unwrap_or_default();
            let (status, _) = broker.get(scene, &format!("/account/{made_hash}"))?;
            assert_eq!(status, 200);
            let (status, made) = broker.request(scene, "POST", "/admin/owners", &[&auth], None)?;
            assert_eq!(status, 201, "{made}");
            let (status, orders) = broker.request(scene, "GET", "/admin/orders", &[&auth], None)?;
            assert_eq!(status, 200, "{orders}");
            let (status, removed) = broker.request(
                scene,
                "DELETE",
                &format!("/account/{client}/keys"),
                &[],
                None,
            )?;
            assert_eq!(status, 200, "{removed}");
            Ok(())
        },
    );
}

/// Sums what `/owner/<hash>` reports: released, held, disputed.
fn owner_money(scene: &Scene, broker: &Broker, owner: &str) -> anyhow::Result<(u64, u64, u64)> {
    let (status, body) = broker.get(scene, &format!("/owner/{owner}"))?;
    anyhow::ensure!(status == 200, "{status} {body}");
    let field = |f: &str| body[f].as_u64().unwrap_or(u64::MAX);
    Ok((
        field("earnings_sat"),
        field("held_sat"),
        field("disputed_sat"),
    ))
}

#[test]
fn disputes_refund_out_of_held_earnings_and_undisputed_ones_are_released() {
    e2e("disputes_through_the_api", |scene| {
        // One satoshi per CPU-microsecond: a few seconds of CPU earn plenty.
        const HOUR_PRICE: u64 = 3_600_000_000;
        const HOLD_SECS: u64 = 8;
        let data = scene.subdir("broker")?;
        let owner = Broker::add_account(scene, &data, "owner", 0)?;
        let client = Broker::add_account(scene, &data, "client", 2 * HOUR_PRICE)?;
        let stranger = Broker::add_account(scene, &data, "client", HOUR_PRICE)?;
        let price = HOUR_PRICE.to_string();
        let hold = HOLD_SECS.to_string();
        let broker = Broker::start_with(
            scene,
            "broker",
            data,
            0,
            &[
                "--price-sat",
                &price,
                "--hold-secs",
                &hold,
                "--operator-token",
                TOKEN,
            ],
        )?;
        let node_args = [
            "--ready-slots",
            "2",
            "--grace-secs",
            "1",
            "--receipt-secs",
            "1",
        ];
        let mut node = Node::start_owned(scene, "node", &broker, &owner, &node_args)?;
        broker.wait_capacity(scene, 2)?;
        let auth = format!("Authorization: Bearer {TOKEN}");
        let json = "Content-Type: application/json";

        // Two orders, each with two seconds of CPU proven, then closed:
        // quick closes that pay their owner the proven CPU.
        let mut orders = Vec::new();
        for _ in 0..2 {
            let (status, body) = broker.order(scene, &client)?;
            assert_eq!(status, 200, "{body}");
            orders.push(Login::from_order(scene, &body)?);
        }
        let busy = "perl -e 'my ($u, $s) = times; ($u, $s) = times while $u + $s < 2'";
        for login in &orders {
            let out = login.ssh(scene, busy, None)?;
            assert_eq!(out.status, Some(0), "{}", out.stderr);
        }
        let mut earned = Vec::new();
        for login in &orders {
            node.wait_session_end(&login.order_id, Duration::from_secs(30))?;
            let settled = wait_settled(scene, &broker, &client, &login.order_id)?;
            let owner_part = settled["settlement"]["owner"].as_u64().unwrap_or(0);
            assert!(owner_part > 0, "{settled}");
            assert_eq!(settled["hold"]["state"], "held", "{settled}");
            assert_eq!(settled["hold"]["disputable"], true, "{settled}");
            earned.push(owner_part);
        }
        let (disputed, kept) = (&orders[0].order_id, &orders[1].order_id);
        // The precondition of what follows: the earnings exist, held.
        assert_eq!(
            owner_money(scene, &broker, &owner)?,
            (0, earned[0] + earned[1], 0)
        );

        // A stranger cannot dispute (or even see) another client's order.
        let reason = br#"{"reason":"the session never gave me a shell"}"#;
        let path = |hash: &str, id: &str| format!("/order/{hash}/{id}/dispute");
        let (status, body) = broker.request(
            scene,
            "POST",
            &path(&stranger, disputed),
            &[json],
            Some(reason),
        )?;
        assert_eq!(status, 404, "{body}");
        // Bad disputes are refused and change nothing.
        for bad in [&br#"{"reason":"   "}"#[..], b"{}", b"not json"] {
            let (status, body) =
                broker.request(scene, "POST", &path(&client, disputed), &[json], Some(bad))?;
            assert!((400..500).contains(&status), "{status} {body}");
            assert_eq!(body["status"], "ERROR", "{body}");
        }
        let (status, body) = broker.request(
            scene,
            "POST",
            &path(&client, "000000000000000000000000"),
            &[json],
            Some(reason),
        )?;
        assert_eq!(status, 404, "{body}");
        assert_eq!(
            owner_money(scene, &broker, &owner)?,
            (0, earned[0] + earned[1], 0)
        );

        // The client disputes one order; twice is refused.
        let (status, body) = broker.request(
            scene,
            "POST",
            &path(&client, disputed),
            &[json],
            Some(reason),
        )?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["hold"]["state"], "disputed", "{body}");
        let (status, body) = broker.request(
            scene,
            "POST",
            &path(&client, disputed),
            &[json],
            Some(reason),
        )?;
        assert_eq!(status, 409, "{body}");
        assert_eq!(
            owner_money(scene, &broker, &owner)?,
            (0, earned[1], earned[0])
        );

        // The hold ends: the undisputed earnings are the owner's, the
        // disputed ones wait; a dispute now comes too late.
        let deadline = Instant::now() + Duration::from_secs(HOLD_SECS + 20);
        while owner_money(scene, &broker, &owner)?.0 == 0 {
            anyhow::ensure!(Instant::now() < deadline, "the hold never ended");
            std::thread::sleep(Duration::from_millis(500));
        }
        assert_eq!(
            owner_money(scene, &broker, &owner)?,
            (earned[1], 0, earned[0])
        );
        let (status, body) =
            broker.request(scene, "POST", &path(&client, kept), &[json], Some(reason))?;
        assert_eq!(status, 409, "{body}");

        // The operator sees the dispute and refunds a third of it.
        let (status, body) = broker.request(scene, "GET", "/admin/disputes", &[], None)?;
        assert_eq!(status, 401, "{body}");
        let (status, body) = broker.request(scene, "GET", "/admin/disputes", &[&auth], None)?;
        assert_eq!(status, 200, "{body}");
        let listed = body["disputes"].as_array().cloned().unwrap_or_default();
        assert_eq!(listed.len(), 1, "{body}");
        assert_eq!(listed[0]["order_id"], disputed.as_str(), "{body}");
        assert_eq!(
            listed[0]["hold"]["dispute"]["reason"], "the session never gave me a shell",
            "{body}"
        );
        let decide = format!("/admin/disputes/{disputed}");
        let too_much = format!(r#"{{"action":"refund","amount_sat":{}}}"#, earned[0] + 1);
        let (status, body) = broker.request(
            scene,
            "POST",
            &decide,
            &[&auth, json],
            Some(too_much.as_bytes()),
        )?;
        assert_eq!(status, 400, "{body}");
        let (_, account) = broker.get(scene, &format!("/account/{client}"))?;
        let before = account["balance_sat"].as_u64().unwrap_or(0);
        let rating = |scene: &Scene| -> anyhow::Result<u64> {
            let (_, owned) = broker.get(scene, &format!("/owner/{owner}"))?;
            owned["nodes"][0]["rating_percent"]
                .as_u64()
                .ok_or_else(|| anyhow::anyhow!("no rating: {owned}"))
        };
        let rated = rating(scene)?;
        let refund = earned[0] / 3;
        let body_text = format!(r#"{{"action":"refund","amount_sat":{refund}}}"#);
        let (status, body) = broker.request(
            scene,
            "POST",
            &decide,
            &[&auth, json],
            Some(body_text.as_bytes()),
        )?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["hold"]["dispute"]["refunded_sat"], refund, "{body}");
        let (_, account) = broker.get(scene, &format!("/account/{client}"))?;
        assert_eq!(account["balance_sat"], before + refund, "{account}");
        assert_eq!(
            owner_money(scene, &broker, &owner)?,
            (earned[1] + earned[0] - refund, 0, 0)
        );
        // An upheld complaint counts against the node.
        assert!(rating(scene)? < rated, "the rating stayed at {rated}");
        // Decided once: a second decision is refused.
        let (status, body) = broker.request(
            scene,
            "POST",
            &decide,
            &[&auth, json],
            Some(br#"{"action":"reject"}"#),
        )?;
        assert_eq!(status, 409, "{body}");

        // Every step is in the journal, and the books balance.
        let (_, audit) = broker.request(scene, "GET", "/admin/audit", &[&auth], None)?;
        assert_eq!(audit["audit"]["ok"], true, "{audit}");
        let row = audit["audit"]["orders"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|o| o["order_id"] == disputed.as_str())
            .cloned()
            .unwrap_or_default();
        assert_eq!(row["dispute_refunded"], refund, "{audit}");
        assert_eq!(row["released"], earned[0] - refund, "{audit}");
        Ok(())
    });
}
