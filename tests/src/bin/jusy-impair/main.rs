//! `jusy-impair`: a UDP relay that makes a link slow and lossy in userspace, for
//! the NAT lab on kernels without `tc netem`. It relays datagrams between a
//! listen address and an upstream address, delays every datagram by the same
//! time in each direction, drops a seeded fraction, and keeps one upstream
//! socket per client so that replies reach the right client.
//!
//! ```text
//! jusy-impair --listen 192.168.1.1:0 --upstream 198.18.0.2:7443 \
//!             --delay-ms 50 --loss-pct 1 --seed 7
//! ```
//!
//! Once bound it prints `{"event":"ready","listen":"<address>",…}` on stdout
//! (with the real port when asked for port 0), and `{"event":"lost",
//! "direction":"Up"}` (or `"Down"`) when it first drops a datagram that way.
//! Bad flags or an address it
//! cannot bind end it with a message and exit code 2. It runs until killed:
//! its threads only block on sockets and on the delay line, and hold nothing
//! that needs flushing, so a signal is its shutdown.
//!
//! Threads: one reads clients on the listen socket, one per client reads its
//! upstream socket, and one sends what the delay line releases.

mod impairment;

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use impairment::{DelayLine, Full, Loss};

const USAGE: &str = "usage: jusy-impair --listen <ip:port> --upstream <ip:port> \
[--delay-ms <ms, default 0>] [--loss-pct <0-100, default 0>] [--seed <u64, default 0>] \
[--limit <datagrams in flight, default 1000>]";

/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;
/// How often the counters are logged while datagrams flow.
const STATS_EVERY: Duration = Duration::from_secs(5);

/// The command line.
#[derive(Debug, Clone, PartialEq)]
struct Args {
    listen: SocketAddr,
    upstream: SocketAddr,
    delay: Duration,
    loss_pct: f64,
    seed: u64,
    /// Datagrams held at once (both directions) before new ones are dropped;
    /// netem's default `limit`.
    limit: usize,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    fn value<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T, String>
    where
        T::Err: std::fmt::Display,
    {
        let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
        v.parse().map_err(|e| format!("{flag} {v:?}: {e}"))
    }
    let (mut listen, mut upstream) = (None, None);
    let mut parsed = Args {
        listen: SocketAddr::from(([0, 0, 0, 0], 0)),
        upstream: SocketAddr::from(([0, 0, 0, 0], 0)),
        delay: Duration::ZERO,
        loss_pct: 0.0,
        seed: 0,
        limit: 1000,
    };
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (arg, None),
        };
        let v = inline.or_else(|| args.next());
        match flag.as_str() {
            "--listen" => listen = Some(value(&flag, v)?),
            "--upstream" => upstream = Some(value(&flag, v)?),
            "--delay-ms" => parsed.delay = Duration::from_millis(value(&flag, v)?),
            "--loss-pct" => parsed.loss_pct = value(&flag, v)?,
            "--seed" => parsed.seed = value(&flag, v)?,
            "--limit" => parsed.limit = value(&flag, v)?,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if !(0.0..=100.0).contains(&parsed.loss_pct) {
        return Err(format!(
            "--loss-pct {} is not between 0 and 100",
            parsed.loss_pct
        ));
    }
    if parsed.limit == 0 {
        return Err("--limit must be at least 1".into());
    }
    parsed.listen = listen.ok_or("--listen is required")?;
    parsed.upstream = upstream.ok_or("--upstream is required")?;
    Ok(parsed)
}

/// The two directions, each with its own loss sequence and counters.
#[derive(Debug, Clone, Copy)]
enum Direction {
    /// Client to upstream.
    Up = 0,
    /// Upstream to client.
    Down = 1,
}

/// Where a released datagram goes.
#[derive(Debug)]
enum Hop {
    /// Upstream, from this client's own socket.
    Up(Arc<UdpSocket>),
    /// Back to this client, from the listen socket.
    Down(SocketAddr),
}

#[derive(Debug)]
struct Datagram {
    hop: Hop,
    payload: Vec<u8>,
}

/// Counters per direction, logged on stderr.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Counts {
    sent: u64,
    lost: u64,
    overflow: u64,
}

/// The state the threads share: the delay line, both loss sequences and the
/// counters, under one lock so that queueing order is arrival order.
#[derive(Debug)]
struct Line {
    delay: DelayLine<Datagram>,
    loss: [Loss; 2],
    counts: [Counts; 2],
}

#[derive(Debug)]
struct Shared {
    line: Mutex<Line>,
    /// Signalled when the delay line stops being empty.
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Line> {
        self.line.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A datagram arrived: lose it, or queue it to leave after the delay.
    fn admit(&self, dir: Direction, datagram: Datagram) {
        let mut line = self.lock();
        let line = &mut *line;
        let (Some(loss), Some(counts)) = (
            line.loss.get_mut(dir as usize),
            line.counts.get_mut(dir as usize),
        ) else {
            return;
        };
        if loss.drops_next() {
            counts.lost += 1;
            if counts.lost == 1 {
                // Proof for a test that the link is lossy in fact: once per
                // direction, so it costs nothing later.
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, r#"{{"event":"lost","direction":"{dir:?}"}}"#)
                    .and_then(|()| out.flush());
            }
            return;
        }
        let was_empty = line.delay.next_due().is_none();
        match line.delay.push(Instant::now(), datagram) {
            // The sender already waits for an earlier datagram otherwise.
            Ok(()) if was_empty => self.wake.notify_one(),
            Ok(()) => {}
            Err(Full(_)) => counts.overflow += 1,
        }
    }
}

/// Sends each datagram when the delay line releases it; sleeps until the
/// next one is due, or until one arrives when the line is empty.
fn send_loop(shared: &Shared, listen: &UdpSocket) -> ! {
    let mut logged = ([Counts::default(); 2], Instant::now());
    let mut due = Vec::new();
    let mut line = shared.lock();
    loop {
        let now = Instant::now();
        while let Some(d) = line.delay.pop_due(now) {
            let dir = match d.hop {
                Hop::Up(_) => Direction::Up,
                Hop::Down(_) => Direction::Down,
            };
            if let Some(c) = line.counts.get_mut(dir as usize) {
                c.sent += 1;
            }
            due.push(d);
        }
        if !due.is_empty() {
            drop(line);
            for d in due.drain(..) {
                let sent = match &d.hop {
                    Hop::Up(socket) => socket.send(&d.payload),
                    Hop::Down(client) => listen.send_to(&d.payload, client),
                };
                if let Err(e) = sent {
                    eprintln!("jusy-impair: sending {:?}: {e}", d.hop);
                }
            }
            line = shared.lock();
            if line.counts != logged.0 && logged.1.elapsed() >= STATS_EVERY {
                let [up, down] = line.counts;
                eprintln!("jusy-impair: up {up:?}, down {down:?}");
                logged = (line.counts, Instant::now());
            }
            continue;
        }
        line = match line.delay.next_due() {
            Some(at) => {
                let wait = at.saturating_duration_since(now);
                shared
                    .wake
                    .wait_timeout(line, wait)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
            None => shared
                .wake
                .wait(line)
                .unwrap_or_else(PoisonError::into_inner),
        };
    }
}

/// Reads clients' datagrams and queues them upstream, each client through
/// its own upstream socket (made on its first datagram).
fn client_loop(shared: &Arc<Shared>, listen: &UdpSocket, upstream: SocketAddr) -> ! {
    let mut flows: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, client) = match listen.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) => {
                eprintln!("jusy-impair: receiving from clients: {e}");
                continue;
            }
        };
        let socket = match flows.get(&client) {
            Some(s) => Arc::clone(s),
            None => match open_flow(shared, upstream, client) {
                Ok(s) => {
                    eprintln!("jusy-impair: new client {client}");
                    flows.insert(client, Arc::clone(&s));
                    s
                }
                Err(e) => {
                    eprintln!("jusy-impair: no upstream socket for {client}: {e}");
                    continue;
                }
            },
        };
        let payload = buf.get(..n).unwrap_or_default().to_vec();
        shared.admit(
            Direction::Up,
            Datagram {
                hop: Hop::Up(socket),
                payload,
            },
        );
    }
}

/// A socket connected to `upstream` for one client, and the thread that
/// queues its replies back to that client.
fn open_flow(
    shared: &Arc<Shared>,
    upstream: SocketAddr,
    client: SocketAddr,
) -> std::io::Result<Arc<UdpSocket>> {
    let any = match upstream.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let socket = UdpSocket::bind(SocketAddr::new(any, 0))?;
    socket.connect(upstream)?;
    let socket = Arc::new(socket);
    let (reader, shared) = (Arc::clone(&socket), Arc::clone(shared));
    std::thread::Builder::new()
        .name(format!("from-upstream-{client}"))
        .spawn(move || {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                match reader.recv(&mut buf) {
                    Ok(n) => shared.admit(
                        Direction::Down,
                        Datagram {
                            hop: Hop::Down(client),
                            payload: buf.get(..n).unwrap_or_default().to_vec(),
                        },
                    ),
                    // An ICMP error for an earlier datagram (the upstream
                    // restarting, say); later ones may well get through.
                    Err(e) => eprintln!("jusy-impair: receiving for {client}: {e}"),
                }
            }
        })?;
    Ok(socket)
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("jusy-impair: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("jusy-impair: {e}");
            ExitCode::from(2)
        }
    }
}

/// Binds, says it is ready, and relays until the process is killed.
fn run(args: &Args) -> Result<std::convert::Infallible, String> {
    let listen = UdpSocket::bind(args.listen)
        .map_err(|e| format!("binding --listen {}: {e}", args.listen))?;
    let local = listen
        .local_addr()
        .map_err(|e| format!("reading the listen address: {e}"))?;
    let sender = listen
        .try_clone()
        .map_err(|e| format!("cloning the listen socket: {e}"))?;
    let shared = Arc::new(Shared {
        line: Mutex::new(Line {
            delay: DelayLine::new(args.delay, args.limit),
            loss: [
                Loss::new(args.seed, Direction::Up as u64, args.loss_pct),
                Loss::new(args.seed, Direction::Down as u64, args.loss_pct),
            ],
            counts: [Counts::default(); 2],
        }),
        wake: Condvar::new(),
    });
    let send_shared = Arc::clone(&shared);
    std::thread::Builder::new()
        .name("send".into())
        .spawn(move || send_loop(&send_shared, &sender))
        .map_err(|e| format!("starting the send thread: {e}"))?;

    let ready = format!(
        r#"{{"event":"ready","listen":"{local}","upstream":"{}","delay_ms":{},"loss_pct":{},"seed":{}}}"#,
        args.upstream,
        args.delay.as_millis(),
        args.loss_pct,
        args.seed
    );
    let mut out = std::io::stdout().lock();
    writeln!(out, "{ready}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("writing the ready line: {e}"))?;
    drop(out);

    client_loop(&shared, &listen, args.upstream)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::*;

    fn parse(line: &str) -> Result<Args, String> {
        parse_args(line.split_whitespace().map(str::to_owned))
    }

    #[test]
    fn flags_parse_with_spaces_or_equals() {
        let a = parse(
            "--listen 10.0.0.1:7000 --upstream=198.18.0.2:7443 --delay-ms 50 \
             --loss-pct=1 --seed 7",
        )
        .unwrap();
        assert_eq!(a.listen, "10.0.0.1:7000".parse().unwrap());
        assert_eq!(a.upstream, "198.18.0.2:7443".parse().unwrap());
        assert_eq!(a.delay, Duration::from_millis(50));
        assert_eq!((a.loss_pct, a.seed, a.limit), (1.0, 7, 1000));
    }

    #[test]
    fn bad_flags_are_errors_not_panics() {
        for (line, says) in [
            ("--upstream 1.2.3.4:5", "--listen is required"),
            ("--listen 1.2.3.4:5", "--upstream is required"),
            (
                "--listen nowhere --upstream 1.2.3.4:5",
                "--listen \"nowhere\"",
            ),
            (
                "--listen 1.2.3.4:5 --upstream 1.2.3.4:5 --loss-pct 101",
                "between 0 and 100",
            ),
            (
                "--listen 1.2.3.4:5 --upstream 1.2.3.4:5 --loss-pct NaN",
                "between 0 and 100",
            ),
            (
                "--listen 1.2.3.4:5 --upstream 1.2.3.4:5 --delay-ms -1",
                "--delay-ms",
            ),
            (
                "--listen 1.2.3.4:5 --upstream 1.2.3.4:5 --seed",
                "--seed needs a value",
            ),
            (
                "--listen 1.2.3.4:5 --upstream 1.2.3.4:5 --limit 0",
                "at least 1",
            ),
            (
                "--listen 1.2.3.4:5 --upstream 1.2.3.4:5 --jitter 3",
                "unknown argument",
            ),
        ] {
            let err = parse(line).unwrap_err();
            assert!(err.contains(says), "{line}: {err}");
        }
    }
}
