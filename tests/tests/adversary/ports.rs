//! A stranger against the broker's UDP ports: QUIC handshakes by the hundred
//! that never become nodes (completed and silent, or left half-open), made-up
//! node keys asking for speed tests (about a second of the relay's CPU each),
//! and half-open handshakes on the mesh port. Real nodes still attach and
//! serve orders, the strangers' connections are closed, and the broker's
//! work stays within its stated bounds, counted in its log.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use jusy_tests::stranger::{self, Answer, HalfOpenFlood};
use jusy_tests::{Broker, Login, Node, Scene, e2e};

/// The relay's hello timeout in these tests (`relay_hello_timeout_secs`).
const HELLO_TIMEOUT: Duration = Duration::from_secs(3);

/// The relay's caps in the handshake flood test.
const PER_ADDRESS: usize = 6;
const MAX_HANDSHAKES: usize = 18;

/// Application close code of a connection that did not become a node
/// (`relay::admission::UNIDENTIFIED`).
const UNIDENTIFIED: u32 = 3;

/// First speed tests one address may cause at once
/// (`relay::speed_tests::PER_ADDRESS`).
const TESTS_PER_ADDRESS: usize = 8;

/// Handshakes one address may have under way on the mesh port
/// (`mesh::limits::Pending::PRODUCTION`).
const MESH_PER_ADDRESS: usize = 8;

fn stranger_ip(a: u8, b: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, a, b, 1))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// A broker with one client, started with the configuration `toml`.
fn broker_with(scene: &Scene, toml: &str, extra: &[&str]) -> anyhow::Result<(Broker, String)> {
    let data = scene.subdir("broker")?;
    let client = Broker::add_client(scene, &data)?;
    let config = scene.dir().join("broker.toml");
    std::fs::write(&config, toml)?;
    let config = config.display().to_string();
    let flags = [&["--config", config.as_str()][..], extra].concat();
    Ok((
        Broker::start_with(scene, "broker", data, 0, &flags)?,
        client,
    ))
}

/// Orders a session and runs a command in it.
fn order_and_login(scene: &Scene, broker: &Broker, client: &str) -> anyhow::Result<()> {
    let (status, body) = broker.order(scene, client)?;
    anyhow::ensure!(status == 200, "order failed with {status}: {body}");
    let login = Login::from_order(scene, &body)?;
    let out = login.ssh(scene, "echo in", None)?;
    anyhow::ensure!(
        out.status == Some(0) && out.text() == "in\n",
        "the client could not log in: {:?} {}",
        out.status,
        out.stderr
    );
    Ok(())
}

fn log_of(scene: &Scene, name: &str) -> PathBuf {
    scene.dir().join(format!("{name}.err"))
}

/// Lines of a process's log that contain `what`.
fn count_in_log(path: &std::path::Path, what: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(what))
        .count()
}

/// Waits (bounded) until `done` holds.
fn wait_until(what: &str, within: Duration, done: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !done() {
        anyhow::ensure!(Instant::now() < deadline, "{what} within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A stranger's connection the relay took, watched until the relay ends it.
struct Held {
    started: Instant,
    conn: quinn::Connection,
}

/// How the relay ended a stranger's connection, and when.
#[derive(Debug)]
struct Ended {
    after: Duration,
    code: Option<u64>,
    reason: String,
}

/// `n` connections at once from `from`, none of which says hello: those the
/// relay took, and how many it refused.
async fn silent_connections(
    from: IpAddr,
    relay: SocketAddr,
    broker_key: &str,
    n: usize,
) -> anyhow::Result<(Vec<Held>, usize)> {
    let endpoint = stranger::endpoint(from)?;
    let attempts = (0..n).map(|_| {
        let (endpoint, broker_key) = (endpoint.clone(), broker_key.to_owned());
        async move {
            let started = Instant::now();
            (
                started,
                stranger::connect(&endpoint, relay, &broker_key).await,
            )
        }
    });
    let mut held = Vec::new();
    let mut refused = 0;
    for (started, result) in futures_lite(attempts).await {
        match result {
            Ok(conn) => held.push(Held { started, conn }),
            Err(e) if stranger::refused(&e) => refused += 1,
            Err(e) => anyhow::bail!("a stranger's connection failed otherwise: {e}"),
        }
    }
    Ok((held, refused))
}

/// Runs the futures at once and collects their outputs in order.
async fn futures_lite<F: std::future::Future + Send + 'static>(
    all: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let tasks: Vec<_> = all.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for t in tasks {
        if let Ok(o) = t.await {
            out.push(o);
        }
    }
    out
}

/// Waits (at most `within`) for the relay to end `held`.
async fn ended(held: &Held, within: Duration) -> anyhow::Result<Ended> {
    let e = tokio::time::timeout(within, held.conn.closed())
        .await
        .context("a stranger's connection was never closed")?;
    let (code, reason) = match e {
        quinn::ConnectionError::ApplicationClosed(c) => (
            Some(c.error_code.into_inner()),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => (None, other.to_string()),
    };
    Ok(Ended {
        after: held.started.elapsed(),
        code,
        reason,
    })
}

#[test]
fn a_handshake_flood_keeps_no_node_out_and_strangers_are_closed_without_a_hello() {
    e2e(
        "a_handshake_flood_keeps_no_node_out_and_strangers_are_closed_without_a_hello",
        |scene| {
            let toml = format!(
                "relay_hello_timeout_secs = {}\n\
                 relay_max_handshakes = {MAX_HANDSHAKES}\n\
                 relay_max_handshakes_per_address = {PER_ADDRESS}\n\
                 relay_handshakes_per_sec_per_address = 1000\n",
                HELLO_TIMEOUT.as_secs()
            );
            let (broker, client) = broker_with(scene, &toml, &[])?;
            let (relay, key) = (broker.relay, broker.key.clone());
            let rt = runtime()?;

            // The relay finishes a stranger's handshake: anyone may make up a
            // node key.
            let first = stranger_ip(1, 0);
            let (mut one, refused) = rt.block_on(silent_connections(first, relay, &key, 1))?;
            anyhow::ensure!(
                one.len() == 1 && refused == 0,
                "a stranger's first handshake was not taken"
            );

            // From the same address, three times its share at once: the share
            // is held, the rest refused before any handshake work.
            let (more, refused) =
                rt.block_on(silent_connections(first, relay, &key, 3 * PER_ADDRESS))?;
            anyhow::ensure!(
                one.len() + more.len() == PER_ADDRESS
                    && refused == 3 * PER_ADDRESS + 1 - PER_ADDRESS,
                "one address held {} handshakes ({refused} refused); its share is {PER_ADDRESS}",
                one.len() + more.len()
            );
            one.extend(more);

            // From three more addresses, each within its share, the cap in
            // all is passed: the oldest (the first address's) are pushed out,
            // and none of the newer ones is refused.
            let mut newer = Vec::new();
            for b in 1..=3 {
                let (held, refused) = rt.block_on(silent_connections(
                    stranger_ip(2, b),
                    relay,
                    &key,
                    PER_ADDRESS,
                ))?;
                anyhow::ensure!(
                    held.len() == PER_ADDRESS && refused == 0,
                    "address {b}: {} held, {refused} refused",
                    held.len()
                );
                newer.extend(held);
            }
            for h in &one {
                let e = rt.block_on(ended(h, Duration::from_secs(10)))?;
                anyhow::ensure!(
                    e.code == Some(UNIDENTIFIED.into()) && e.reason.contains("pushed out"),
                    "an older stranger was not pushed out: {e:?}"
                );
            }

            // A real node dials into the full table and attaches; a client
            // orders and logs in.
            let _node = Node::start(scene, "node", &broker, &["--ready-slots", "1"])?;
            broker.wait_capacity(scene, 1)?;
            order_and_login(scene, &broker, &client)?;

            // Every stranger left is closed: pushed out by the node, or when
            // its hello timeout ran out, never before.
            let mut timed_out = 0;
            for h in &newer {
                let e = rt.block_on(ended(h, HELLO_TIMEOUT + Duration::from_secs(10)))?;
                anyhow::ensure!(
                    e.code == Some(UNIDENTIFIED.into()),
                    "a stranger was closed otherwise: {e:?}"
                );
                if e.reason.contains("no hello in time") {
                    anyhow::ensure!(
                        e.after >= HELLO_TIMEOUT,
                        "closed {:?} after it started, before the hello timeout",
                        e.after
                    );
                    timed_out += 1;
                }
            }
            anyhow::ensure!(
                timed_out >= newer.len() - 1,
                "only {timed_out} of {} lived out their hello timeout",
                newer.len()
            );
            let (status, health) = broker.get(scene, "/health")?;
            anyhow::ensure!(
                status == 200 && health["nodes"] == 1,
                "the node is not attached: {health}"
            );
            Ok(())
        },
    )
}

#[test]
fn half_open_handshakes_are_asked_to_prove_their_address_and_hold_one_place() {
    e2e(
        "half_open_handshakes_are_asked_to_prove_their_address_and_hold_one_place",
        |scene| {
            let toml = format!("relay_hello_timeout_secs = {}\n", HELLO_TIMEOUT.as_secs());
            let (broker, client) = broker_with(scene, &toml, &[])?;
            let tls = stranger::node_tls(&broker.key)?;

            // A first Initial gets the relay's half of the handshake.
            let mut flood = HalfOpenFlood::new(stranger_ip(3, 0), broker.relay, tls)?;
            flood.send(1)?;
            flood.watch(Duration::from_secs(1))?;
            anyhow::ensure!(
                flood.tally().held == 1,
                "the first Initial was not answered: {:?}",
                flood.tally()
            );

            // 500 more from the same address, as forged ones would come: each
            // gets a Retry, which costs the relay no state; none is held.
            flood.send(500)?;
            flood.watch(Duration::from_secs(2))?;
            let t = flood.tally();
            anyhow::ensure!(
                t.held == 1 && t.retry == 500 && t.silent == 0,
                "half-open handshakes held places: {t:?}"
            );

            // The held one is dropped once its hello timeout runs out, and the
            // relay serves a real node meanwhile.
            let log = log_of(scene, "broker");
            let _node = Node::start(scene, "node", &broker, &["--ready-slots", "1"])?;
            broker.wait_capacity(scene, 1)?;
            order_and_login(scene, &broker, &client)?;
            wait_until(
                "the half-open handshake closed",
                HELLO_TIMEOUT + Duration::from_secs(10),
                || count_in_log(&log, "node handshake not finished in time") == 1,
            )?;
            Ok(())
        },
    )
}

#[test]
fn speed_tests_are_bounded_per_address_and_run_one_at_a_time() {
    e2e(
        "speed_tests_are_bounded_per_address_and_run_one_at_a_time",
        |scene| {
            // Handshakes out of the way: made-up nodes say hello in bursts.
            let toml = "speed_test_concurrency = 1\n\
                        relay_max_handshakes_per_address = 64\n\
                        relay_handshakes_per_sec_per_address = 1000\n";
            let (broker, client) = broker_with(scene, toml, &[])?;
            let (relay, key) = (broker.relay, broker.key.clone());
            let log = log_of(scene, "broker");
            let rt = runtime()?;
            // Made-up nodes from `from`, all saying hello at once: what the
            // relay answered each.
            let hellos = |from: IpAddr, n: usize| -> anyhow::Result<Vec<Answer>> {
                rt.block_on(async {
                    let endpoint = stranger::endpoint(from)?;
                    let mut conns = Vec::new();
                    for _ in 0..n {
                        conns.push(stranger::connect(&endpoint, relay, &key).await?);
                    }
                    let answers = futures_lite(conns.into_iter().map(|conn| async move {
                        stranger::hello(&conn, Duration::from_secs(60)).await
                    }))
                    .await;
                    answers.into_iter().collect::<anyhow::Result<Vec<_>>>()
                })
            };

            // A made-up node gets a speed test: a second of the relay's CPU,
            // for a hello.
            let strangers = stranger_ip(1, 0);
            let first = hellos(strangers, 1)?;
            anyhow::ensure!(first == [Answer::SpeedTest], "{first:?}");

            // Twice its share more from the same address: its share is tested,
            // the rest told to come back later, saying when.
            let burst = hellos(strangers, 2 * TESTS_PER_ADDRESS)?;
            let tested = burst.iter().filter(|a| **a == Answer::SpeedTest).count();
            anyhow::ensure!(
                tested + 1 == TESTS_PER_ADDRESS,
                "{} tests for one address: {burst:?}",
                tested + 1
            );
            for a in burst.iter().filter(|a| **a != Answer::SpeedTest) {
                let Answer::TryLater { reason, after_secs } = a else {
                    anyhow::bail!("not a refusal: {a:?}");
                };
                anyhow::ensure!(
                    reason.contains("too many speed tests from this address")
                        && (1..=10).contains(after_secs),
                    "{a:?}"
                );
            }
            // Another address has its own share.
            let other = hellos(stranger_ip(2, 0), 1)?;
            anyhow::ensure!(other == [Answer::SpeedTest], "{other:?}");

            // A real node attaches meanwhile and serves an order.
            let _node = Node::start(scene, "node", &broker, &["--ready-slots", "1"])?;
            broker.wait_capacity(scene, 1)?;
            order_and_login(scene, &broker, &client)?;

            // The nodes' address (loopback) used up by made-up nodes, until
            // its next test is a few seconds away, a second real node is told
            // to come back later, and does.
            let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
            let mut local_tested = 0;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                anyhow::ensure!(Instant::now() < deadline, "loopback's share never ran out");
                match hellos(local, 1)?.pop() {
                    Some(Answer::SpeedTest) => local_tested += 1,
                    Some(Answer::TryLater { after_secs, .. }) if after_secs >= 5 => break,
                    Some(Answer::TryLater { .. }) => {}
                    other => anyhow::bail!("{other:?}"),
                }
            }
            let mut second = Node::start(scene, "node2", &broker, &["--ready-slots", "1"])?;
            let later = second.proc.wait_event("later", Duration::from_secs(60))?;
            let reason = later["reason"].as_str().unwrap_or_default();
            anyhow::ensure!(
                reason.contains("too many speed tests from this address"),
                "{later}"
            );
            second.wait_registered()?;
            wait_until("the second node attached", Duration::from_secs(60), || {
                broker
                    .get(scene, "/health")
                    .is_ok_and(|(_, h)| h["nodes"] == 2)
            })?;

            // The relay computed as many digests as it sent tests (strangers',
            // and the two nodes'), one at a time.
            let sent = 1 + tested + 1 + local_tested + 2;
            wait_until("every digest computed", Duration::from_secs(60), || {
                count_in_log(&log, "speed test's digest computed") == sent
            })?;
            anyhow::ensure!(
                count_in_log(&log, "speed test started") == sent,
                "more tests started than sent"
            );
            let text = std::fs::read_to_string(&log)?;
            let mut running = 0i32;
            for line in text.lines() {
                if line.contains("speed test started") {
                    running += 1;
                    anyhow::ensure!(running <= 1, "two digests computed at once");
                } else if line.contains("speed test's digest computed") {
                    running -= 1;
                }
            }
            Ok(())
        },
    )
}

#[test]
fn a_mesh_port_flood_holds_a_few_handshakes_and_brokers_still_join() {
    e2e(
        "a_mesh_port_flood_holds_a_few_handshakes_and_brokers_still_join",
        |scene| {
            const TOKEN: &str = "ports-test-operator-token";
            let b_dir = scene.subdir("b")?;
            let b_key = Broker::identity(scene, &b_dir)?;
            // A broker let in that never starts: B learns of it from A.
            let (c_key, c_peer) = Broker::keys(scene, &scene.subdir("c")?)?;
            let a_dir = scene.subdir("a")?;
            let a = Broker::start_with(
                scene,
                "a",
                a_dir,
                0,
                &[
                    "--mesh-listen",
                    "127.0.0.1:0",
                    "--trust",
                    &b_key,
                    "--trust",
                    &c_key,
                ],
            )?;
            let mesh_addr = a.mesh.clone().context("a's mesh address")?;
            let port: u16 = mesh_addr.split('/').nth(4).context("mesh port")?.parse()?;
            let mesh = SocketAddr::from(([127, 0, 0, 1], port));

            // A stranger's Initial gets A's half of the handshake.
            let started = Instant::now();
            let mut flood = HalfOpenFlood::new(stranger_ip(3, 0), mesh, stranger::libp2p_tls()?)?;
            flood.send(1)?;
            flood.watch(Duration::from_millis(500))?;
            anyhow::ensure!(
                flood.tally().held == 1,
                "the mesh port did not answer: {:?}",
                flood.tally()
            );

            // 200 more from the same address: at most its share is held (for
            // the handshake timeout, 4 s), the rest closed at once.
            // (Watched until every one was answered: a loaded machine may
            // take longer than a quiet one.)
            flood.send(200)?;
            let answered_by = Instant::now() + Duration::from_secs(20);
            flood.watch(Duration::from_millis(1500))?;
            while flood.tally().silent > 0 && Instant::now() < answered_by {
                flood.watch(Duration::from_millis(250))?;
            }
            let t = flood.tally();
            anyhow::ensure!(
                t.held <= MESH_PER_ADDRESS && t.held + t.closed == 201 && t.silent == 0,
                "the mesh held more than one address's share: {t:?}"
            );

            // A trusted broker joins through A meanwhile, and learns from it
            // whom the mesh lets in.
            let b = Broker::start_with(
                scene,
                "b",
                b_dir,
                0,
                &[
                    "--mesh-listen",
                    "127.0.0.1:0",
                    "--join",
                    &mesh_addr,
                    "--operator-token",
                    TOKEN,
                ],
            )?;
            let auth = format!("Authorization: Bearer {TOKEN}");
            wait_until(
                "B learned the mesh's list from A",
                Duration::from_secs(60),
                || {
                    b.request(scene, "GET", "/admin/mesh", &[&auth], None)
                        .is_ok_and(|(_, body)| body["trusted"].to_string().contains(&c_peer))
                },
            )?;

            // The refusals took a few lines of A's log, not one each.
            let lines = count_in_log(&log_of(scene, "a"), "mesh connection refused");
            let bound = started.elapsed().as_secs() as usize + 2;
            anyhow::ensure!(
                (1..=bound).contains(&lines),
                "{lines} log lines of refusals in {:?}",
                started.elapsed()
            );
            Ok(())
        },
    )
}
