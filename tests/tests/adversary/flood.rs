//! A stranger floods the broker's HTTP API: thousands of connections that
//! never finish their headers, a connection that stalls its body, tens of
//! thousands of requests with 60 KB hashes, forged forwarding headers, and
//! connections while the broker is out of file descriptors. The API keeps
//! answering everyone else, orders and logins still work, the broker's memory,
//! CPU and log stay within stated bounds, and limits fall on the flooding
//! address only.

use std::io::{BufRead, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use jusy_tests::http::{client, connect_from, exchange, get};
use jusy_tests::{Broker, Login, Node, Scene, e2e};

/// Slow connections held at once: 20k exhausted the file descriptors of a
/// broker before it capped its connections; this test holds 10,048 (157
/// addresses at the 64 it allows each), within 20,000 open files (the broker
/// keeps a quarter of its own, at least 4096, for everything but the API).
const SLOW_ADDRESSES: u8 = 157;
const PER_ADDRESS: usize = 64;

/// How much the broker's log may grow while it is flooded.
const LOG_BOUND: u64 = 64 << 10;

/// Requests with 60 KB hashes, as many as the issue asks (its devnet took 21k
/// to add 1 GB for good): 3 GB sent, in about 20 s on loopback.
const HUGE_REQUESTS: usize = 50_000;
const HUGE_HASH: usize = 60_000;

/// How much the broker's resident memory may grow under them (it grew by
/// 36 kB in 20k requests; the old limiter kept every hash, 60 KB each).
const RSS_BOUND_KB: u64 = 32 << 10;

/// Whether the broker has closed `conn`, waiting at most `within` to see
/// (anything it sent first is read and dropped).
fn closed_within(conn: &mut TcpStream, within: Duration) -> anyhow::Result<bool> {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        conn.set_read_timeout(Some(left))?;
        match conn.read(&mut buf) {
            Ok(0) => return Ok(true),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(true),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

pub(crate) fn vm_rss_kb(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

fn sockets_of(pid: u32) -> anyhow::Result<usize> {
    let mut n = 0;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let link = std::fs::read_link(fd?.path()).unwrap_or_default();
        n += usize::from(link.to_string_lossy().starts_with("socket:"));
    }
    Ok(n)
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// A broker started with the configuration `toml` (on top of the test
/// support's flags).
fn broker_with(scene: &Scene, toml: &str, data: std::path::PathBuf) -> anyhow::Result<Broker> {
    let config = scene.dir().join("broker.toml");
    std::fs::write(&config, toml)?;
    let config = config.display().to_string();
    Broker::start_with(scene, "broker", data, 0, &["--config", &config])
}

/// Raises this process's open-file limit to its hard limit, for thousands of
/// connections; the broker started after it inherits the same.
fn raise_open_files() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or write one rlimit through a
    // pointer valid for it.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim), 0);
        lim.rlim_cur = lim.rlim_max.min(1 << 20);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim), 0);
    }
    lim.rlim_cur
}

#[test]
fn slow_headers_hold_no_one_else_out() {
    if !jusy_tests::require_root("slow_headers_hold_no_one_else_out") {
        return;
    }
    e2e("slow_headers_hold_no_one_else_out", |scene| {
        let open_files = raise_open_files();
        let slow_count = usize::from(SLOW_ADDRESSES) * PER_ADDRESS;
        anyhow::ensure!(
            open_files * 3 / 4 >= slow_count as u64 + 1000,
            "{open_files} open files are too few for {slow_count} connections"
        );
        let data = scene.subdir("broker")?;
        let client = Broker::add_client(scene, &data)?;
        // A header timeout longer than the test, so that only the connection
        // caps stand between the slow connections and everyone else.
        let broker = broker_with(
            scene,
            &format!(
                "http_header_timeout_secs = 600\nhttp_max_connections = 100000\n\
                 http_max_connections_per_address = {PER_ADDRESS}\n"
            ),
            data,
        )?;
        let _node = Node::start(
            scene,
            "node",
            &broker,
            &["--ready-slots", "1", "--grace-secs", "2"],
        )?;
        broker.wait_capacity(scene, 1)?;
        let log = scene.dir().join("broker.err");
        let log_before = file_len(&log);

        // Thousands of connections that each send half a request head.
        let started = Instant::now();
        let mut slow = Vec::with_capacity(slow_count);
        for a in 1..=SLOW_ADDRESSES {
            let from = Ipv4Addr::new(127, 0, 1, a);
            for _ in 0..PER_ADDRESS {
                let mut conn = connect_from(from, broker.api)?;
                conn.write_all(b"GET /health HTTP/1.1\r\nHost: slow\r\n")?;
                slow.push(conn);
            }
        }
        // One more address opens more than it may: those over the cap are
        // closed at once.
        let greedy = Ipv4Addr::new(127, 0, 2, 1);
        let mut kept = Vec::new();
        for _ in 0..PER_ADDRESS {
            kept.push(connect_from(greedy, broker.api)?);
        }
        let mut over = Vec::new();
        for _ in 0..100 {
            over.push(connect_from(greedy, broker.api)?);
        }
        for conn in &mut over {
            anyhow::ensure!(
                closed_within(conn, Duration::from_secs(5))?,
                "a connection over the per-address cap stayed open"
            );
        }
        scene.note(&format!(
            "{} slow connections opened in {:?}",
            slow.len(),
            started.elapsed()
        ));
        // The precondition: the slow connections are all open at the broker.
        let sockets = sockets_of(broker.proc.pid())?;
        anyhow::ensure!(
            sockets >= slow_count + PER_ADDRESS,
            "the broker holds only {sockets} sockets"
        );
        for conn in slow.iter_mut().chain(&mut kept) {
            conn.set_nonblocking(true)?;
            anyhow::ensure!(
                !closed_within(conn, Duration::from_millis(1))?,
                "a slow connection was closed"
            );
            conn.set_nonblocking(false)?;
        }

        // Everyone else is served: health, an order, its login.
        let (status, body) = broker.get(scene, "/health")?;
        anyhow::ensure!(status == 200 && body["status"] == "OK", "{status} {body}");
        let (status, body) = broker.order(scene, &client)?;
        anyhow::ensure!(status == 200, "order failed with {status}: {body}");
        let login = Login::from_order(scene, &body)?;
        let out = login.ssh(scene, "echo logged-in", None)?;
        anyhow::ensure!(
            out.status == Some(0) && out.text().trim() == "logged-in",
            "ssh failed ({:?}): {}",
            out.status,
            out.stderr
        );

        // Still held to the end, and the log stayed small.
        let sockets = sockets_of(broker.proc.pid())?;
        anyhow::ensure!(sockets >= slow_count, "only {sockets} sockets left");
        let grown = file_len(&log) - log_before;
        scene.note(&format!("the broker's log grew by {grown} bytes"));
        anyhow::ensure!(grown < LOG_BOUND, "the log grew by {grown} bytes");
        Ok(())
    });
}

#[test]
fn huge_hashes_cost_no_memory_and_limit_only_their_sender() {
    e2e(
        "huge_hashes_cost_no_memory_and_limit_only_their_sender",
        |scene| {
            let broker = broker_with(scene, "", scene.subdir("broker")?)?;
            let pid = broker.proc.pid();
            let flooder = Ipv4Addr::LOCALHOST;
            let mut pool = vec![0u8; HUGE_HASH / 2];
            getrandom::fill(&mut pool)?;
            let pool = hex::encode(pool);
            // Each request's hash is random: a random prefix on a rotation of a
            // random pool.
            let request = |i: usize| {
                let mut prefix = [0u8; 16];
                getrandom::fill(&mut prefix).expect("random");
                let at = (i * 7919) % pool.len();
                let hash = format!("{}{}{}", hex::encode(prefix), &pool[at..], &pool[..at]);
                get(&format!("/order/{}", &hash[..HUGE_HASH]), "")
            };
            // Four kept-alive connections from the flooding address: how many
            // were refused as malformed (400) and how many limited (429).
            let flood = |count: usize| -> anyhow::Result<(usize, usize)> {
                std::thread::scope(|s| {
                    let threads: Vec<_> = (0..4)
                        .map(|t| {
                            let (api, request) = (broker.api, &request);
                            s.spawn(move || -> anyhow::Result<(usize, usize)> {
                                let mut conn = client(flooder, api)?;
                                let (mut bad, mut many) = (0, 0);
                                for i in 0..count / 4 {
                                    let answer = exchange(&mut conn, &request(t * count + i))?;
                                    let (status, body) = (answer.status, answer.body);
                                    match status {
                                        400 if body.contains("64 hex characters") => bad += 1,
                                        429 if body.contains("\"ERROR\"") => many += 1,
                                        _ => anyhow::bail!("{status} {body}"),
                                    }
                                }
                                Ok((bad, many))
                            })
                        })
                        .collect();
                    let (mut refused, mut limited) = (0, 0);
                    for t in threads {
                        let (bad, many) = t.join().expect("flooding thread")?;
                        refused += bad;
                        limited += many;
                    }
                    Ok((refused, limited))
                })
            };
            // Warm up the broker's allocator, then measure. The first requests
            // of a fresh address pass the limiter and meet validation.
            let (warm_refused, _) = flood(400)?;
            anyhow::ensure!(warm_refused > 0, "no request reached validation");
            let before = vm_rss_kb(pid)?;
            let started = Instant::now();
            let (refused, limited) = flood(HUGE_REQUESTS)?;
            let after = vm_rss_kb(pid)?;
            scene.note(&format!(
            "{HUGE_REQUESTS} requests in {:?}: {refused} refused (400), {limited} limited (429); \
             VmRSS {before} kB before, {after} kB after",
            started.elapsed()
        ));
            // The precondition: every request reached the API with its hash and
            // was answered, most of them by the rate limit.
            anyhow::ensure!(refused + limited == HUGE_REQUESTS);
            anyhow::ensure!(limited > HUGE_REQUESTS / 2);
            anyhow::ensure!(
                after < before + RSS_BOUND_KB,
                "VmRSS grew from {before} kB to {after} kB"
            );
            // The flooding address is still limited; another one is not.
            let unknown = format!("/order/{}", "0".repeat(64));
            // (Its bucket refills meanwhile, so it is asked more often than
            // a refilled bucket allows, however slow this machine is.)
            let mut conn = client(flooder, broker.api)?;
            let mut statuses = Vec::new();
            for _ in 0..200 {
                statuses.push(exchange(&mut conn, &get(&unknown, ""))?.status);
                if statuses.last() == Some(&429) {
                    break;
                }
            }
            anyhow::ensure!(
                statuses.last() == Some(&429),
                "the flooder was never limited again: {statuses:?}"
            );
            let answer = exchange(
                &mut client(Ipv4Addr::new(127, 0, 0, 2), broker.api)?,
                &get(&unknown, ""),
            )?;
            let (status, body) = (answer.status, answer.body);
            anyhow::ensure!(status == 401, "another address got {status}: {body}");
            Ok(())
        },
    );
}

#[test]
fn forwarded_addresses_count_only_from_trusted_proxies() {
    e2e(
        "forwarded_addresses_count_only_from_trusted_proxies",
        |scene| {
            let proxy = Ipv4Addr::new(127, 0, 0, 9);
            let broker = broker_with(
                scene,
                "trusted_proxies = [\"127.0.0.9\"]\n",
                scene.subdir("broker")?,
            )?;
            let statuses = |from: Ipv4Addr, n: usize, xff: &dyn Fn(usize) -> String| {
                let mut conn = client(from, broker.api)?;
                (0..n)
                    .map(|i| {
                        let extra = format!("X-Forwarded-For: {}\r\n", xff(i));
                        Ok(exchange(&mut conn, &get("/order/nothex", &extra))?.status)
                    })
                    .collect::<anyhow::Result<Vec<u16>>>()
            };
            // One client behind the proxy floods and is limited (burst 30).
            let flooder = statuses(proxy, 60, &|_| "198.51.100.1".into())?;
            anyhow::ensure!(flooder.contains(&429), "{flooder:?}");
            // Another client behind the same proxy is not.
            let other = statuses(proxy, 10, &|_| "203.0.113.5, 198.51.100.2".into())?;
            anyhow::ensure!(other.iter().all(|s| *s == 400), "{other:?}");
            // An untrusted peer cannot pose as many clients.
            let forger = statuses(Ipv4Addr::new(127, 0, 0, 3), 60, &|i| {
                format!("198.51.100.{}", 10 + i)
            })?;
            anyhow::ensure!(forger.contains(&429), "{forger:?}");
            Ok(())
        },
    );
}

#[test]
fn slow_heads_idle_connections_and_stalled_bodies_are_closed() {
    e2e(
        "slow_heads_idle_connections_and_stalled_bodies_are_closed",
        |scene| {
            let broker = broker_with(
                scene,
                "http_header_timeout_secs = 1\nhttp_idle_timeout_secs = 2\n",
                scene.subdir("broker")?,
            )?;
            let from = Ipv4Addr::LOCALHOST;
            // A request sent whole is answered, and the connection stays
            // while the next one is in time.
            let mut conn = client(from, broker.api)?;
            for _ in 0..3 {
                let status = exchange(&mut conn, &get("/health", ""))?.status;
                anyhow::ensure!(status == 200);
            }
            // Idle after its answer, it is closed after the header timeout.
            let idle = Instant::now();
            anyhow::ensure!(
                closed_within(conn.get_mut(), Duration::from_secs(5))?,
                "an idle connection stayed open"
            );
            scene.note(&format!(
                "idle connection closed after {:?}",
                idle.elapsed()
            ));

            // A head trickling in, a byte every 100 ms, is cut at the header
            // timeout although bytes keep coming.
            let mut slow = connect_from(from, broker.api)?;
            let started = Instant::now();
            slow.write_all(b"GET /health HTTP/1.1\r\nX-Slow: ")?;
            slow.set_read_timeout(Some(Duration::from_millis(100)))?;
            let cut = loop {
                anyhow::ensure!(
                    started.elapsed() < Duration::from_secs(10),
                    "a slow head was never cut"
                );
                if slow.write_all(b"a").is_err() {
                    break started.elapsed();
                }
                let mut buf = [0u8; 512];
                match slow.read(&mut buf) {
                    Ok(_) => break started.elapsed(),
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(_) => break started.elapsed(),
                }
            };
            scene.note(&format!("slow head cut after {cut:?}"));
            anyhow::ensure!(
                cut >= Duration::from_millis(900) && cut < Duration::from_secs(5),
                "cut after {cut:?}"
            );

            // A body that stops is cut after two idle timeouts.
            let mut stalled = connect_from(from, broker.api)?;
            let started = Instant::now();
            stalled.write_all(
                format!(
                    "PUT /account/{}/keys HTTP/1.1\r\nHost: b\r\nContent-Length: 1000\r\n\r\nssh-",
                    "0".repeat(64)
                )
                .as_bytes(),
            )?;
            anyhow::ensure!(
                closed_within(&mut stalled, Duration::from_secs(10))?,
                "a stalled body kept its connection"
            );
            let cut = started.elapsed();
            scene.note(&format!("stalled body cut after {cut:?}"));
            anyhow::ensure!(cut >= Duration::from_millis(3500), "cut after {cut:?}");
            Ok(())
        },
    );
}

/// CPU time the process `pid` has used, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised name; utime and stime are the 14th
    // and 15th of the whole line.
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// Sets the soft open-file limit of the process `pid` (its hard limit
/// stays, so the soft one may go up again).
fn limit_open_files(pid: u32, n: u64) -> anyhow::Result<()> {
    let pid = libc::pid_t::try_from(pid)?;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit reads the new limit (none: null) and writes the old
    // one through pointers valid for one rlimit each.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &raw mut lim) };
    anyhow::ensure!(rc == 0, "prlimit: {}", std::io::Error::last_os_error());
    lim.rlim_cur = n.min(lim.rlim_max);
    // SAFETY: as above, with the new limit and no old one.
    let rc = unsafe {
        libc::prlimit(
            pid,
            libc::RLIMIT_NOFILE,
            &raw const lim,
            std::ptr::null_mut(),
        )
    };
    anyhow::ensure!(rc == 0, "prlimit: {}", std::io::Error::last_os_error());
    Ok(())
}

#[test]
fn out_of_file_descriptors_the_listener_pauses_and_logs_rarely() {
    e2e(
        "out_of_file_descriptors_the_listener_pauses_and_logs_rarely",
        |scene| {
            let broker = broker_with(scene, "", scene.subdir("broker")?)?;
            let pid = broker.proc.pid();
            let log = scene.dir().join("broker.err");
            let open = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
            // Room for a few connections only, far below the connection cap
            // the broker set itself at start.
            limit_open_files(pid, open + 4)?;
            let mut conns = Vec::new();
            for _ in 0..40 {
                let mut conn = client(Ipv4Addr::LOCALHOST, broker.api)?;
                conn.get_mut().write_all(&get("/health", ""))?;
                conns.push(conn);
            }
            // The precondition: accepting fails, and the broker says so.
            let deadline = Instant::now() + Duration::from_secs(10);
            let failures = || {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .matches("cannot accept API connections")
                    .count()
            };
            while failures() == 0 {
                anyhow::ensure!(Instant::now() < deadline, "accepting never failed");
                std::thread::sleep(Duration::from_millis(20));
            }
            // Over a few seconds of failing accepts: no spinning, few lines.
            let (lines, ticks, started) = (failures(), cpu_ticks(pid)?, Instant::now());
            std::thread::sleep(Duration::from_secs(3));
            let used = cpu_ticks(pid)? - ticks;
            let logged = failures() - lines;
            let secs = started.elapsed().as_secs();
            scene.note(&format!(
                "failing accepts for {secs} s: {used} ticks of CPU, {logged} log lines"
            ));
            anyhow::ensure!(used < 30, "the broker spun: {used} ticks of CPU");
            anyhow::ensure!(logged as u64 <= secs + 1, "{logged} lines in {secs} s");
            // With descriptors back, every waiting connection is answered.
            limit_open_files(pid, 4096)?;
            for conn in &mut conns {
                conn.get_mut()
                    .set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut line = String::new();
                conn.read_line(&mut line)?;
                anyhow::ensure!(line.starts_with("HTTP/1.1 200"), "{line:?}");
            }
            Ok(())
        },
    );
}
