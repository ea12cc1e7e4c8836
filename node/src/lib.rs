//! The jusy node daemon: dials its relay over QUIC and serves SSH sessions to
//! paying clients as fresh unprivileged users.
//!
//! # Layout
//! * [`config`] — the TOML configuration and its defaults.
//! * [`keys`] — the persistent identity and SSH host keys.
//! * [`uplink`] — the QUIC connection to the relay: control stream, client
//!   streams, reconnects.
//! * [`relays`] — the relays the node knows and which one to dial next.
//! * [`sessions`] — ready slots and running sessions (claim, drive, tear down).
//! * [`ssh`] — the embedded SSH server (auth, channels, ptys).
//! * [`receipts`] — signing each session's usage receipts.
//! * [`sandbox`] — what isolates a session: user, cgroup, disk, network rules,
//!   and how its processes are started.
//! * [`state`] — private modes for what the node and the broker keep on disk.

pub mod check;
pub mod cli;
pub mod config;
pub mod keys;
pub mod logging;
pub mod metrics;
pub mod receipts;
pub mod relays;
pub mod sandbox;
pub mod sessions;
pub mod ssh;
pub mod state;
pub mod update;
pub mod uplink;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jusy_common::identity::PeerId;
use tokio_util::sync::CancellationToken;

use config::Config;
use jusy_common::wire::RelayAddr;
use sandbox::{Host, SandboxError};
use sessions::{Sessions, Settings};
use uplink::Uplink;

/// The node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("serving metrics on loopback: {0}")]
    Metrics(std::io::Error),
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("session sandbox: {0}")]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Key(#[from] keys::KeyFileError),
    #[error("host key: {0}")]
    HostKey(String),
    #[error("relay {0:?}: {1}")]
    Relay(String, jusy_common::wire::BadRelayAddr),
    #[error("repairing the data directory's permissions: {0}")]
    Repair(#[from] state::RepairError),
}

/// Prints one machine-readable event line on stdout (`{"event": …}`), so that
/// supervisors and tests can wait for readiness instead of guessing.
pub fn announce(event: &str, fields: serde_json::Value) {
    use std::io::Write;
    let mut line = serde_json::Map::new();
    line.insert("event".into(), event.into());
    if let serde_json::Value::Object(fields) = fields {
        line.extend(fields);
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", serde_json::Value::Object(line));
    let _ = out.flush();
}

/// QUIC transport settings for relay connections: keep-alives and a short idle
/// timeout so a dead relay is noticed within seconds, windows large enough
/// for bulk copies over a home uplink, and datagrams up to `max_mtu` bytes
/// where the path carries them.
pub fn transport_config(max_mtu: u16) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    t.max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_secs(8)).ok());
    t.max_concurrent_bidi_streams(1024u32.into());
    t.stream_receive_window((8u32 * 1024 * 1024).into());
    t.receive_window((32u32 * 1024 * 1024).into());
    t.send_window(32 * 1024 * 1024);
    t.mtu_discovery_config(Some(mtu_discovery(max_mtu)));
    t
}

/// Path MTU discovery up to `max_mtu` (held to [`QUIC_MTU_RANGE`]).
pub fn mtu_discovery(max_mtu: u16) -> quinn::MtuDiscoveryConfig {
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(held_mtu(max_mtu));
    mtu
}

/// Largest QUIC datagram tried. Path MTU discovery probes up to it and keeps
/// what the path carries: about 1472 bytes across the internet, all of it on
/// loopback or a jumbo-frame LAN, where fewer, larger packets cost far less
/// CPU per byte. quinn hands the kernel up to 10 datagrams in one GSO send,
/// which must fit in 64 KiB: a larger size would have whole batches refused,
/// read as a black hole, and the path dropped to the minimum. The default of
/// `quic_max_mtu` on node and broker.
///
/// A connection driven by quinn (the node's) keeps a transmit buffer with the
/// pages its largest datagram touched, and lost probes cost a path's time, so
/// a connection tries no more than its route carries ([`mtu_towards`]): nodes
/// across the internet pay nothing for this default. The relay builds every
/// connection's packets in one shared buffer (`jusy_broker::relay::quic`).
pub const QUIC_MTU: u16 = 6500;

/// What `quic_max_mtu` may be: QUIC's minimum datagram up to [`QUIC_MTU`].
pub const QUIC_MTU_RANGE: std::ops::RangeInclusive<u16> = 1200..=QUIC_MTU;

/// Endpoint settings both sides share: datagrams up to `max_mtu` are accepted
/// (quinn's default stops at 1472, which caps what the peer's discovery may
/// reach).
pub fn tune_endpoint(e: &mut quinn::EndpointConfig, max_mtu: u16) {
    // Held to QUIC_MTU_RANGE, which starts at quinn's minimum: cannot fail.
    let _ = e.max_udp_payload_size(held_mtu(max_mtu));
}

/// `max_mtu` held to [`QUIC_MTU_RANGE`].
pub fn held_mtu(max_mtu: u16) -> u16 {
    max_mtu.clamp(*QUIC_MTU_RANGE.start(), *QUIC_MTU_RANGE.end())
}

/// The largest datagram path MTU discovery tries towards `peer`: `max_mtu`,
/// lowered to what the kernel's route to `peer` carries in one packet (as TCP
/// takes its segment size from the interface). Across the internet that is an
/// Ethernet or Wi-Fi link of 1500 bytes: one probe of 1472 (IPv4) or 1452
/// (IPv6) settles it, where probing up to `max_mtu` would lose probe after
/// probe, and each probe's size stays in the connection's transmit buffer
/// for its life. On loopback or a jumbo-frame LAN all of `max_mtu` is tried.
pub fn mtu_towards(peer: std::net::SocketAddr, max_mtu: u16) -> u16 {
    let held = held_mtu(max_mtu);
    match route_payload(peer) {
        Some(route) => held.min(route.max(*QUIC_MTU_RANGE.start())),
        None => held,
    }
}

/// The UDP payload one packet on the route to `peer` carries: the route's
/// MTU (the outgoing interface's, or a path MTU the kernel learnt) less the
/// IP and UDP headers. `None` where the kernel cannot say.
pub fn route_payload(peer: std::net::SocketAddr) -> Option<u16> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    use std::os::fd::AsRawFd;
    // A v4-mapped peer of a dual-stack socket is reached over IPv4.
    let peer = match peer {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => peer,
        },
        v4 => v4,
    };
    let (bind, level, option, headers): (IpAddr, _, _, libc::c_int) = match peer {
        SocketAddr::V4(_) => (
            Ipv4Addr::UNSPECIFIED.into(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            20 + 8,
        ),
        SocketAddr::V6(_) => (
            Ipv6Addr::UNSPECIFIED.into(),
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU,
            40 + 8,
        ),
    };
    // Connecting a UDP socket only looks the route up: nothing is sent.
    let socket = std::net::UdpSocket::bind(SocketAddr::new(bind, 0)).ok()?;
    socket.connect(peer).ok()?;
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the fd is open for the call, and the kernel writes at most `len`
    // bytes into the c_int it points to.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (&raw mut mtu).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    Some(u16::try_from(mtu.saturating_sub(headers).max(0)).unwrap_or(u16::MAX))
}

/// A client-only QUIC endpoint on `bind`: a [`quic_socket`], and datagrams
/// accepted up to `max_mtu`.
pub fn client_endpoint(
    bind: std::net::SocketAddr,
    max_mtu: u16,
) -> std::io::Result<quinn::Endpoint> {
    let socket = quic_socket(bind)?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime"))?;
    let mut config = quinn::EndpointConfig::default();
    tune_endpoint(&mut config, max_mtu);
    quinn::Endpoint::new(config, None, socket, runtime)
}

/// Kernel buffer asked for on each side of a QUIC socket. The default (about
/// 200 KiB) holds a few milliseconds of a fast stream: a burst beyond it is
/// dropped, and the sender reads the drop as congestion.
pub const UDP_BUFFER: usize = 8 << 20;

/// A UDP socket for a QUIC endpoint, bound to `addr`, with [`UDP_BUFFER`]
/// bytes of kernel buffer each way: forced past `net.core.[rw]mem_max` where
/// the process may (root), else as much as that limit allows.
pub fn quic_socket(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use std::os::fd::AsRawFd;
    let socket = std::net::UdpSocket::bind(addr)?;
    let size = libc::c_int::try_from(UDP_BUFFER).unwrap_or(libc::c_int::MAX);
    for (forced, capped) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        let set = |opt| {
            // SAFETY: the fd is open for the call, and the value is a c_int of
            // the length passed.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&raw const size).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        // Without the privilege the forced option fails, and the plain one is
        // capped by the sysctl: a smaller buffer still works.
        if set(forced) != 0 {
            set(capped);
        }
    }
    Ok(socket)
}

/// Runs a node until `stop` is cancelled, then ends every session with
/// NODE_SHUTDOWN, removes all session users, and tells the relay.
pub async fn run(
    cfg: Config,
    broker_key: PeerId,
    stop: CancellationToken,
) -> Result<(), NodeError> {
    // SAFETY: geteuid cannot fail.
    let dev_mode = unsafe { libc::geteuid() } != 0;
    if dev_mode {
        tracing::warn!("==================================================================");
        tracing::warn!("NOT ROOT: DEVELOPMENT MODE. Sessions run as YOUR user with access to");
        tracing::warn!("everything you can touch. Never offer this node to real clients.");
        tracing::warn!("==================================================================");
    }
    let homes = cfg.data_dir.join("homes");
    // Keys, disk images and everything else inside are the node's alone
    // (0600, 0700). Session users must still reach their own home (itself
    // 0700, or a mounted disk), so the two directories above it are 0711:
    // passing through, but no listing of the other sessions' names.
    state::repair_logged(state::Tree {
        root: &cfg.data_dir,
        traverse: &[&cfg.data_dir, &homes],
        opaque: &[&homes],
    })?;
    for dir in [&cfg.data_dir, &homes] {
        let io = |source| NodeError::DataDir {
            path: dir.clone(),
            source,
        };
        state::create_traversable(dir).map_err(io)?;
        use std::os::unix::fs::PermissionsExt;
        tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(state::TRAVERSE))
            .await
            .map_err(io)?;
    }
    let identity = keys::load_or_create_identity(&cfg.data_dir)?;
    let node_id = PeerId::from_signing_key(&identity);
    let host = if dev_mode {
        Host::dev(homes)
    } else {
        // Names this node's cgroups and nftables table, so that two nodes on one
        // machine (each with its own data directory and key) never collide.
        let tag = node_id.to_string().chars().take(12).collect::<String>();
        Host::start(
            homes,
            cfg.data_dir.join("disks"),
            &tag,
            cfg.sandbox_limits(),
            (cfg.uid_min, cfg.uid_max),
            &cfg.net_config(),
        )
        .await?
    };
    let host_key = keys::load_or_create_host_key(&cfg.data_dir)?;
    let host_key_line = host_key
        .public_key()
        .to_openssh()
        .map_err(|e| NodeError::HostKey(e.to_string()))?;
    tracing::info!(%node_id, "node identity");
    if cfg.owner.is_none() {
        tracing::warn!(
            "no owner hash configured (owner in the config, --owner-file or JUSY_OWNER): \
             this node's sessions earn nothing"
        );
    }

    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let settings = Settings {
        ready_slots: cfg.ready_slots(),
        disk_reserve: cfg.disk_reserve_mib.saturating_mul(1 << 20),
        offer: cfg.offer(),
        login_grace: Duration::from_secs(cfg.login_grace_secs.max(1)),
        receipt_every: Duration::from_secs(cfg.receipt_secs.max(1)),
        sftp_server: cfg.sftp_server(),
        channel_caps: ssh::channel::ChannelCaps {
            per_connection: cfg.max_channels.max(1),
            per_session: cfg.max_session_channels.max(1),
        },
    };
    let sessions = Sessions::new(
        settings,
        host,
        Arc::new(identity.clone()),
        ssh::config(host_key),
        events_tx,
    );
    let filler = tokio::spawn(sessions.clone().keep_slots_ready());
    let metrics_stop = CancellationToken::new();
    let metrics = match cfg.metrics_port {
        Some(port) => {
            let (addr, task) = metrics::serve(port, metrics_stop.clone())
                .await
                .map_err(NodeError::Metrics)?;
            tracing::info!(%addr, "metrics served");
            announce("metrics", serde_json::json!({"addr": addr.to_string()}));
            Some(task)
        }
        None => None,
    };
    let uplink_stop = CancellationToken::new();
    let mut relays = vec![RelayAddr {
        addr: cfg.broker.clone(),
        key: broker_key,
    }];
    for r in &cfg.relays {
        relays.push(r.parse().map_err(|e| NodeError::Relay(r.clone(), e))?);
    }
    let uplink = Uplink {
        relays,
        identity,
        host_key: host_key_line,
        owner: cfg.owner.clone(),
        sessions: sessions.clone(),
        max_mtu: cfg.quic_max_mtu,
    };
    let uplink = tokio::spawn(uplink.run(events_rx, uplink_stop.clone()));

    stop.cancelled().await;
    tracing::info!("shutting down: ending sessions with NODE_SHUTDOWN");
    // No new slot may appear once teardown has started, so the filler (which
    // finishes the slot it is preparing) is awaited first.
    sessions.stop_preparing();
    let _ = filler.await;
    sessions.shutdown().await;
    uplink_stop.cancel();
    let _ = uplink.await;
    metrics_stop.cancel();
    if let Some(task) = metrics {
        let _ = task.await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_carries_the_largest_datagram_and_config_still_caps_it() {
        let lo: std::net::SocketAddr = "127.0.0.1:9".parse().expect("addr");
        // Loopback's MTU is 65536 unless someone lowered it.
        let route = route_payload(lo).expect("the kernel knows the route to loopback");
        assert!(route > QUIC_MTU, "loopback carries {route} bytes");
        assert_eq!(mtu_towards(lo, QUIC_MTU), QUIC_MTU);
        assert_eq!(mtu_towards(lo, 1452), 1452);
        assert_eq!(mtu_towards(lo, 60000), QUIC_MTU, "held to the range");
        let mapped: std::net::SocketAddr = "[::ffff:127.0.0.1]:9".parse().expect("addr");
        assert_eq!(
            route_payload(mapped),
            Some(route),
            "a v4-mapped peer is an IPv4 route"
        );
    }
}
