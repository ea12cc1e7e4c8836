//! A node owner who lies to the broker, played by `jusy-liar`: an early
//! `DONE`, a receipt of impossible CPU time, limits without their evidence, a
//! session never ended, terms other than the order's, the end of another
//! node's order. Each test shows the lie was sent (the liar says so, the
//! broker saw it) and then that it was caught: the client gets back what is
//! not proven, the owner earns only its share of what was plausible, the
//! node's rating drops and the books balance.

use std::time::{Duration, Instant};

use jusy_common::plausible::cpu_bound_us;
use jusy_tests::liar::{Liar, LiarConnection};
use jusy_tests::{Broker, Login, Node, Scene, e2e};
use serde_json::Value;

/// One satoshi per CPU-microsecond: every proven microsecond shows.
const HOUR_PRICE: u64 = 3_600_000_000;

/// The owners' share of proven CPU time (the broker's default, 80 %).
const OWNER_SHARE_PPM: u64 = 800_000;

/// What the liar's receipts claim besides impossible ones: one CPU-second.
const CPU_SECOND_US: u64 = 1_000_000;

/// A new node's rating (90 %) after one session held against it: 9 of 11.
const ONE_FAULT_PERCENT: u64 = 81;

const TOKEN: &str = "operator-token-for-tests-0123456789";

/// A broker selling at [`HOUR_PRICE`], with an owner for the liars and a
/// client with funds for `orders` orders.
#[derive(Debug)]
struct Market {
    broker: Broker,
    owner: String,
    client: String,
    deposit: u64,
}

impl Market {
    fn open(scene: &Scene, orders: u64, broker_args: &[&str]) -> anyhow::Result<Self> {
        let data = scene.subdir("broker")?;
        let owner = Broker::add_account(scene, &data, "owner", 0)?;
        let deposit = orders * HOUR_PRICE;
        let client = Broker::add_account(scene, &data, "client", deposit)?;
        let price = HOUR_PRICE.to_string();
        let args = [
            &["--price-sat", &price, "--operator-token", TOKEN][..],
            broker_args,
        ]
        .concat();
        let broker = Broker::start_with(scene, "broker", data, 0, &args)?;
        Ok(Self {
            broker,
            owner,
            client,
            deposit,
        })
    }

    /// Starts a liar telling `lie` for the market's owner, and waits until
    /// the broker offers its slot.
    fn liar(&self, scene: &Scene, name: &str, lie: &str, extra: &[&str]) -> anyhow::Result<Liar> {
        let liar = Liar::start(scene, name, &self.broker, lie, &self.owner, extra)?;
        self.broker.wait_capacity(scene, 1)?;
        Ok(liar)
    }

    /// `GET /order/<client hash>`: the HTTP status and the body.
    fn order(&self, scene: &Scene) -> anyhow::Result<(u16, Value)> {
        self.broker.order(scene, &self.client)
    }

    /// An order that must succeed: its id, host and port.
    fn ordered(&self, scene: &Scene) -> anyhow::Result<(String, String, u16)> {
        let (status, body) = self.order(scene)?;
        anyhow::ensure!(status == 200, "order failed with {status}: {body}");
        let id = body["order_id"].as_str().unwrap_or_default().to_owned();
        let host = body["host"].as_str().unwrap_or_default().to_owned();
        let port = body["port"].as_u64().and_then(|p| u16::try_from(p).ok());
        Ok((id, host, port.unwrap_or_default()))
    }

    fn status(&self, scene: &Scene, order_id: &str) -> anyhow::Result<Value> {
        let (code, body) = self
            .broker
            .get(scene, &format!("/order/{}/{order_id}", self.client))?;
        anyhow::ensure!(code == 200, "order status {code}: {body}");
        Ok(body)
    }

    /// Polls the order until `done` holds for it, for up to `within`.
    fn wait_order(
        &self,
        scene: &Scene,
        order_id: &str,
        within: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + within;
        loop {
            let body = self.status(scene, order_id)?;
            if done(&body) {
                return Ok(body);
            }
            anyhow::ensure!(Instant::now() < deadline, "order never got there: {body}");
            // Slower than the broker's per-hash rate limit refills.
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_settled(&self, scene: &Scene, order_id: &str) -> anyhow::Result<Value> {
        self.wait_order(scene, order_id, Duration::from_secs(60), |o| {
            o["finished"] == true
        })
    }

    fn balance(&self, scene: &Scene) -> anyhow::Result<u64> {
        let (_, account) = self
            .broker
            .get(scene, &format!("/account/{}", self.client))?;
        account["balance_sat"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("no balance: {account}"))
    }

    /// What the owner earned: released, and still held.
    fn earnings(&self, scene: &Scene) -> anyhow::Result<u64> {
        let (_, owned) = self.broker.get(scene, &format!("/owner/{}", self.owner))?;
        let amount = |field: &str| {
            owned[field]
                .as_u64()
                .ok_or_else(|| anyhow::anyhow!("no {field}: {owned}"))
        };
        Ok(amount("earnings_sat")? + amount("held_sat")? + amount("disputed_sat")?)
    }

    /// The liar as its owner sees it: sessions kept, dropped, rating.
    fn rated(&self, scene: &Scene, liar: &Liar) -> anyhow::Result<Value> {
        let (_, owned) = self.broker.get(scene, &format!("/owner/{}", self.owner))?;
        owned["nodes"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["node_id"] == liar.node_id.as_str()))
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("the liar is not on its owner's page: {owned}"))
    }

    /// Checks that the liar's rating took exactly one fault.
    fn rated_down(&self, scene: &Scene, liar: &Liar) -> anyhow::Result<()> {
        let rated = self.rated(scene, liar)?;
        anyhow::ensure!(
            rated["sessions_dropped"] == 1
                && rated["sessions_kept"] == 0
                && rated["rating_percent"]
                    .as_u64()
                    .is_some_and(|p| p <= ONE_FAULT_PERCENT),
            "the lie did not cost the node its rating: {rated}"
        );
        Ok(())
    }

    /// Checks that the client's own rating is a new client's: the node's
    /// lie is not held against it.
    fn client_untouched(&self, scene: &Scene) -> anyhow::Result<()> {
        let (_, account) = self
            .broker
            .get(scene, &format!("/account/{}", self.client))?;
        anyhow::ensure!(
            account["rating_percent"] == 90 && account["sessions_broke_limits"] == 0,
            "the node's lie counted against the client: {account}"
        );
        Ok(())
    }

    /// `GET /admin/audit`: the books balance.
    fn audit(&self, scene: &Scene) -> anyhow::Result<()> {
        let auth = format!("Authorization: Bearer {TOKEN}");
        let (status, body) = self
            .broker
            .request(scene, "GET", "/admin/audit", &[&auth], None)?;
        anyhow::ensure!(
            status == 200 && body["audit"]["ok"] == true,
            "the books do not balance: {body}"
        );
        Ok(())
    }

    /// Checks an order paid the client back all but `proven` CPU
    /// microseconds and the owner its share of them, and that the balance
    /// and earnings show it (the client's other orders having cost
    /// `spent_before`, the owner having earned `earned_before`).
    fn paid_proven(
        &self,
        scene: &Scene,
        settled: &Value,
        proven: u64,
        (spent_before, earned_before): (u64, u64),
    ) -> anyhow::Result<()> {
        let owner = proven * OWNER_SHARE_PPM / 1_000_000;
        let s = &settled["settlement"];
        anyhow::ensure!(
            s["refund"] == HOUR_PRICE - proven
                && s["owner"] == owner
                && s["operator"] == proven - owner,
            "not paid on the proven CPU time only: {settled}"
        );
        let balance = self.balance(scene)?;
        anyhow::ensure!(
            balance == self.deposit - spent_before - proven,
            "the client's balance is {balance}: {settled}"
        );
        let earned = self.earnings(scene)?;
        anyhow::ensure!(
            earned == earned_before + owner,
            "the owner earned {earned}: {settled}"
        );
        Ok(())
    }
}

/// Waits for the liar's `lie` event about `order_id`.
fn lie_told(liar: &mut Liar, order_id: &str) -> anyhow::Result<Value> {
    liar.proc
        .wait_event_where("lie", Duration::from_secs(30), |v| {
            v["order_id"] == order_id
        })
}

/// Checks how the broker judged an end the node claimed and its evidence
/// does not support.
fn judged_a_fault_of_the_node(settled: &Value, state: &str) -> anyhow::Result<()> {
    let v = &settled["verdict"];
    anyhow::ensure!(
        settled["state"] == state
            && v["by"] == "Node"
            && v["upheld"] == false
            && v["fault"] == "Node"
            && v["payout"] == "Proven",
        "the end was not judged the node's fault: {settled}"
    );
    Ok(())
}

#[test]
fn a_done_one_second_after_login_pays_only_the_proven_second() {
    e2e("liar_early_done", |scene| {
        let market = Market::open(scene, 1, &[])?;
        let mut liar = market.liar(scene, "liar", "early-done", &[])?;
        let (order_id, host, port) = market.ordered(scene)?;
        let mut client = LiarConnection::log_in(&host, port)?;

        // The lie: DONE one second in, on a final receipt of one CPU-second,
        // and the broker has it.
        let told = lie_told(&mut liar, &order_id)?;
        anyhow::ensure!(
            told["what"]["finish"] == "DONE" && told["what"]["cpu_us"] == CPU_SECOND_US,
            "{told}"
        );
        let settled = market.wait_settled(scene, &order_id)?;
        anyhow::ensure!(
            settled["reason"] == "DONE" && settled["claimed_cpu_us"] == CPU_SECOND_US,
            "the broker did not get the lie: {settled}"
        );

        // Caught: the budget was not used, so the client gets back all but
        // the proven second, and the node is rated down, not the client.
        judged_a_fault_of_the_node(&settled, "DONE")?;
        anyhow::ensure!(settled["proven_cpu_us"] == CPU_SECOND_US, "{settled}");
        market.paid_proven(scene, &settled, CPU_SECOND_US, (0, 0))?;
        market.rated_down(scene, &liar)?;
        market.client_untouched(scene)?;
        anyhow::ensure!(
            client.closed_within(Duration::from_secs(10))?,
            "the ended order's port still carries the client"
        );
        market.audit(scene)
    })
}

#[test]
fn a_receipt_of_a_cpu_hour_after_one_second_proves_only_what_the_cores_could_do() {
    e2e("liar_impossible_receipt", |scene| {
        let market = Market::open(scene, 1, &[])?;
        let mut liar = market.liar(scene, "liar", "impossible-receipt", &[])?;
        let (order_id, host, port) = market.ordered(scene)?;
        let logged_in = Instant::now();
        let client = LiarConnection::log_in(&host, port)?;

        // The lie: receipt 0 claims 3600 CPU-seconds one second in. The
        // broker takes only what one core could give since the login.
        let told = lie_told(&mut liar, &order_id)?;
        anyhow::ensure!(
            told["what"]["cpu_us"] == 3600 * CPU_SECOND_US && told["what"]["finish"].is_null(),
            "{told}"
        );
        let seen = market.wait_order(scene, &order_id, Duration::from_secs(30), |o| {
            o["implausible_receipts"].as_u64() >= Some(1)
        })?;
        anyhow::ensure!(
            seen["state"] == "CONNECTED"
                && seen["claimed_cpu_us"] == 3600 * CPU_SECOND_US
                && seen["cores"] == 1,
            "the broker did not get the lie: {seen}"
        );
        let proven = seen["proven_cpu_us"].as_u64().unwrap_or_default();
        let bound = cpu_bound_us(1, elapsed_ms(logged_in));
        anyhow::ensure!(
            (CPU_SECOND_US..=bound).contains(&proven),
            "proven {proven} µs, the bound {bound} µs: {seen}"
        );

        // The client leaves within 20 s: a quick close, paying the CPU time
        // proven within the bound (the final receipt repeats the claim), the
        // rest back; the lie counts against the node.
        drop(client);
        let settled = market.wait_settled(scene, &order_id)?;
        let bound = cpu_bound_us(1, elapsed_ms(logged_in));
        let proven = settled["proven_cpu_us"].as_u64().unwrap_or_default();
        let v = &settled["verdict"];
        anyhow::ensure!(
            settled["state"] == "CLIENT_CLOSED"
                && settled["cancelled"] == true
                && v["quick_close"] == true
                && v["lied"] == true
                && settled["implausible_receipts"] == 2
                && proven <= bound,
            "the impossible receipt was not caught (bound {bound} µs): {settled}"
        );
        market.paid_proven(scene, &settled, proven, (0, 0))?;
        market.rated_down(scene, &liar)?;
        market.client_untouched(scene)?;
        market.audit(scene)
    })
}

/// Milliseconds since `t`, rounded up: the most wall time the broker can
/// have seen since a login made after `t`.
fn elapsed_ms(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

#[test]
fn limits_claimed_without_their_evidence_are_the_nodes_fault() {
    e2e("liar_limits_without_evidence", |scene| {
        let lies = [
            ("ram-without-evidence", "RAM"),
            ("proc-without-evidence", "PROC"),
            ("disk-without-evidence", "DISK"),
        ];
        let market = Market::open(scene, 3, &[])?;
        let mut spent = (0, 0);
        for (lie, code) in lies {
            // One liar at a time, so that each order goes to its own.
            let mut liar = market.liar(scene, lie, lie, &[])?;
            let (order_id, host, port) = market.ordered(scene)?;
            let mut client = LiarConnection::log_in(&host, port)?;

            // The lie: the limit's end one second in, on a final receipt of
            // a quiet session (64 MiB, 3 processes, 1 MiB of disk).
            let told = lie_told(&mut liar, &order_id)?;
            anyhow::ensure!(told["what"]["finish"] == code, "{told}");
            let settled = market.wait_settled(scene, &order_id)?;
            anyhow::ensure!(
                settled["reason"] == code && settled["claimed_cpu_us"] == CPU_SECOND_US,
                "the broker did not get the lie: {settled}"
            );

            // Caught: not the client's limit, so not its loss nor its rating.
            judged_a_fault_of_the_node(&settled, code)?;
            market.paid_proven(scene, &settled, CPU_SECOND_US, spent)?;
            spent = (
                spent.0 + CPU_SECOND_US,
                spent.1 + CPU_SECOND_US * OWNER_SHARE_PPM / 1_000_000,
            );
            market.rated_down(scene, &liar)?;
            market.client_untouched(scene)?;
            anyhow::ensure!(
                client.closed_within(Duration::from_secs(10))?,
                "the ended order's port still carries the client"
            );
            // Gone before the next liar comes, so the broker offers only that one.
            liar.proc.stop(Duration::from_secs(10))?;
            wait_no_nodes(scene, &market.broker)?;
        }
        market.audit(scene)
    })
}

/// Waits until the broker has no node attached.
fn wait_no_nodes(scene: &Scene, broker: &Broker) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, health) = broker.get(scene, "/health")?;
        if health["nodes"] == 0 {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "a node stays attached: {health}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The wall limit the broker sells in the never-ends tests.
const WALL_SECS: u64 = 3;

#[test]
fn a_session_its_node_never_ends_is_ended_by_the_brokers_wall_timer() {
    e2e("liar_never_ends", |scene| {
        let wall = WALL_SECS.to_string();
        let market = Market::open(scene, 1, &["--wall-secs", &wall])?;
        let mut liar = market.liar(scene, "liar", "never-ends", &[])?;
        let (order_id, host, port) = market.ordered(scene)?;
        let logged_in = Instant::now();
        let mut client = LiarConnection::log_in(&host, port)?;

        // The liar signs a receipt of one CPU-second, then says nothing more:
        // the client is still logged in, and the session goes past its wall.
        let told = lie_told(&mut liar, &order_id)?;
        anyhow::ensure!(told["what"]["finish"].is_null(), "{told}");
        market.wait_order(scene, &order_id, Duration::from_secs(30), |o| {
            o["proven_cpu_us"] == CPU_SECOND_US
        })?;

        // The broker's own timer ends it 10 s past the wall limit, closes
        // the port and tells the node, which ignores it. The client had its
        // time and pays the price; the owner earns its share of the proven
        // second; the node is rated down.
        let settled = market.wait_settled(scene, &order_id)?;
        let waited = logged_in.elapsed();
        anyhow::ensure!(
            waited >= Duration::from_secs(WALL_SECS + 10),
            "ended after only {waited:?}: {settled}"
        );
        let v = &settled["verdict"];
        anyhow::ensure!(
            settled["state"] == "WALL"
                && v["by"] == "Broker"
                && v["fault"] == "Node"
                && v["payout"] == "Price",
            "not ended by the broker's wall timer: {settled}"
        );
        let owner = CPU_SECOND_US * OWNER_SHARE_PPM / 1_000_000;
        anyhow::ensure!(
            settled["settlement"]["refund"] == 0 && settled["settlement"]["owner"] == owner,
            "{settled}"
        );
        anyhow::ensure!(
            market.earnings(scene)? == owner,
            "the owner earned more than its share of the proven second"
        );
        let cancel = liar
            .proc
            .wait_event_where("cancel", Duration::from_secs(10), |v| {
                v["order_id"] == order_id.as_str()
            })?;
        anyhow::ensure!(cancel["ignored"] == true, "{cancel}");
        anyhow::ensure!(
            client.closed_within(Duration::from_secs(10))?,
            "the ended order's port still carries the client"
        );
        market.rated_down(scene, &liar)?;
        market.audit(scene)
    })
}

#[test]
fn a_quick_close_is_refunded_even_when_the_node_never_ends_the_session() {
    e2e("liar_never_ends_quick_close", |scene| {
        // A wall limit far off: the broker's grace timer, not its wall
        // timer, must end this one.
        let market = Market::open(scene, 1, &["--wall-secs", "600"])?;
        let mut liar = market.liar(scene, "liar", "never-ends", &[])?;
        let (order_id, host, port) = market.ordered(scene)?;
        let client = LiarConnection::log_in(&host, port)?;
        lie_told(&mut liar, &order_id)?;
        market.wait_order(scene, &order_id, Duration::from_secs(30), |o| {
            o["proven_cpu_us"] == CPU_SECOND_US
        })?;
        // The client leaves two seconds in, and the broker sees it; the node
        // never says so. The mission's rule: closed within 20 s of the first
        // login, the order is cancelled and pays only the proven CPU time.
        drop(client);
        let settled = market.wait_settled(scene, &order_id)?;
        anyhow::ensure!(
            settled["cancelled"] == true && settled["verdict"]["fault"] == "Node",
            "a quick close was charged in full: {settled}"
        );
        market.paid_proven(scene, &settled, CPU_SECOND_US, (0, 0))?;
        market.rated_down(scene, &liar)?;
        market.audit(scene)
    })
}

#[test]
fn a_node_that_signs_other_terms_gets_no_order_and_costs_the_client_nothing() {
    e2e("liar_ignores_terms", |scene| {
        let market = Market::open(scene, 1, &[])?;
        let mut liar = market.liar(scene, "liar", "ignores-terms", &[])?;

        // The lie: an acceptance of half the CPU budget and memory sold.
        let (status, body) = market.order(scene)?;
        let accepted = liar.proc.wait_event("accepted", Duration::from_secs(30))?;
        let order_id = accepted["order_id"].as_str().unwrap_or_default().to_owned();
        lie_told(&mut liar, &order_id)?;
        anyhow::ensure!(
            accepted["signed"]["cpu_budget_secs"] == 1800
                && accepted["sold"]["cpu_budget_secs"] == 3600,
            "{accepted}"
        );

        // Caught before the client got credentials: no other node, so no
        // order, and the broker says why.
        let error = body["error"].as_str().unwrap_or_default();
        anyhow::ensure!(
            status == 503 && error.contains("other terms than the order's"),
            "the broker took other terms: {status} {body}"
        );
        // The liar is told to end what it took; the charge is all back; the
        // order is on the books as the node's failure; the node is rated
        // down.
        let cancel = liar
            .proc
            .wait_event_where("cancel", Duration::from_secs(10), |v| {
                v["order_id"] == order_id.as_str()
            })?;
        anyhow::ensure!(cancel["ignored"] == false, "{cancel}");
        anyhow::ensure!(market.balance(scene)? == market.deposit, "the client paid");
        let auth = format!("Authorization: Bearer {TOKEN}");
        let (_, orders) = market
            .broker
            .request(scene, "GET", "/admin/orders", &[&auth], None)?;
        let record = orders["orders"]
            .as_array()
            .and_then(|all| all.iter().find(|o| o["order_id"] == order_id.as_str()))
            .cloned()
            .unwrap_or_default();
        anyhow::ensure!(
            record["state"] == "NODE_FAILED"
                && record["settlement"]["refund"] == HOUR_PRICE
                && record["acceptance"].is_null(),
            "not refunded as the node's failure: {orders}"
        );
        anyhow::ensure!(market.earnings(scene)? == 0, "the owner earned");
        market.rated_down(scene, &liar)?;
        market.client_untouched(scene)?;
        market.audit(scene)
    })
}

/// How long to wait for a line in the broker's log.
const LOGGED: Duration = Duration::from_secs(30);

/// Waits until the broker's log (stderr) has a line with `text`.
fn broker_logged(scene: &Scene, text: &str) -> anyhow::Result<String> {
    let path = scene.dir().join("broker.err");
    let deadline = Instant::now() + LOGGED;
    loop {
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        if let Some(line) = log.lines().find(|l| l.contains(text)) {
            return Ok(line.to_owned());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the broker never logged {text:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_node_cannot_end_or_report_on_another_nodes_order() {
    e2e("liar_ends_others", |scene| {
        let market = Market::open(scene, 1, &[])?;
        // The victim: a real node running a client's session.
        let mut node = Node::start(
            scene,
            "node",
            &market.broker,
            &["--ready-slots", "1", "--grace-secs", "1"],
        )?;
        market.broker.wait_capacity(scene, 1)?;
        let (status, body) = market.order(scene)?;
        anyhow::ensure!(status == 200, "{body}");
        let login = Login::from_order(scene, &body)?;
        let mut held = login.ssh_command(&login.key, &[]);
        held.arg("sleep 600")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut held = KillOnDrop(held.spawn()?);
        market.wait_order(scene, &login.order_id, Duration::from_secs(30), |o| {
            o["state"] == "CONNECTED"
        })?;

        // The lie: a liar attached to the same relay signs a final receipt
        // of a CPU-hour for that order and ends it.
        let mut liar = Liar::start(
            scene,
            "liar",
            &market.broker,
            "ends-others",
            &market.owner,
            &["--victim", &login.order_id],
        )?;
        lie_told(&mut liar, &login.order_id)?;
        broker_logged(scene, "receipt rejected: not an order this node runs")?;
        broker_logged(scene, "end refused: not an order this node runs")?;

        // Caught: the order runs on, the client's session works, and the
        // liar's claim is nowhere in it.
        let running = market.status(scene, &login.order_id)?;
        anyhow::ensure!(
            running["state"] == "CONNECTED"
                && running["claimed_cpu_us"].as_u64() < Some(3600 * CPU_SECOND_US),
            "another node ended or reported on the order: {running}"
        );
        let out = login.ssh(scene, "echo still", None)?;
        anyhow::ensure!(out.text() == "still\n", "{}", out.stderr);

        // It ends when its client leaves, as its own node says.
        held.0.kill()?;
        held.0.wait()?;
        let reason = node.wait_session_end(&login.order_id, Duration::from_secs(60))?;
        anyhow::ensure!(reason == "CLIENT_CLOSED", "{reason}");
        let settled = market.wait_settled(scene, &login.order_id)?;
        anyhow::ensure!(
            settled["reason"] == "CLIENT_CLOSED"
                && settled["verdict"]["upheld"] == true
                && settled["verdict"]["lied"] == false
                && settled["claimed_cpu_us"].as_u64() < Some(3600 * CPU_SECOND_US),
            "{settled}"
        );
        market.audit(scene)
    })
}

/// A child process killed when the test is done with it, however it ends.
#[derive(Debug)]
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
