//! See the suite's top (`adversary.rs`). Where a session may connect.
//!
//! [`session_networks_from_the_module`] drives the node's session networking
//! (`HostNet`) directly, on a node inside a lab namespace and two "sessions"
//! that are bare network namespaces; the others run the real binaries and need
//! sessions that live in a network namespace of their own (the session init).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use jusy_node::sandbox::netfilter::Policy;
use jusy_node::sandbox::network::{HostNet, NetConfig};
use jusy_tests::lab::{HomeOpts, Lab, in_netns};
use jusy_tests::{Broker, Login, Node, Scene, e2e, leftovers};

const WAIT: Duration = Duration::from_secs(5);

/// A process alone in a fresh network namespace, killed when dropped.
struct BareNs(Child);

impl BareNs {
    fn new() -> anyhow::Result<Self> {
        let child = Command::new("unshare")
            .args(["--net", "sleep", "infinity"])
            .stdin(Stdio::null())
            .spawn()?;
        let me = Self(child);
        // unshare execs sleep once the namespace exists: wait for that.
        let mine = std::fs::read_link("/proc/self/ns/net")?;
        for _ in 0..1000 {
            let exe = std::fs::read_link(format!("/proc/{}/exe", me.pid()));
            let ns = std::fs::read_link(format!("/proc/{}/ns/net", me.pid()));
            if exe.is_ok_and(|e| e.ends_with("sleep")) && ns.is_ok_and(|n| n != mine) {
                return Ok(me);
            }
            std::thread::yield_now();
        }
        anyhow::bail!("unshare did not start")
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Runs `f` on a thread inside this namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = std::fs::File::open(format!("/proc/{}/ns/net", self.pid())).unwrap();
        std::thread::spawn(move || {
            // SAFETY: setns on a valid namespace fd affects only this thread.
            assert_eq!(
                unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for BareNs {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A DNS question for `name`, type A, with id 0x4a59.
fn dns_question(name: &str) -> Vec<u8> {
    let mut q = vec![0x4a, 0x59, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(u8::try_from(label.len()).unwrap());
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// (response code, answer count) of a DNS answer to [`dns_question`].
fn dns_answer(bytes: &[u8]) -> (u8, u16) {
    assert!(bytes.len() >= 12 && bytes[..2] == [0x4a, 0x59], "{bytes:?}");
    (bytes[3] & 0x0f, u16::from_be_bytes([bytes[6], bytes[7]]))
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(&addr, WAIT)
}

fn refused(r: std::io::Result<TcpStream>) -> bool {
    matches!(r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

#[test]
fn session_networks_from_the_module() {
    e2e("session_networks_from_the_module", |scene| {
        let mut lab = Lab::new(scene)?;
        let node = lab.public_host("node")?;
        let world = lab.public_host("world")?;
        let (node_ns, world_ns) = (node.netns.clone().unwrap(), world.netns.clone().unwrap());
        let IpAddr::V4(node_ip) = node.ip else {
            anyhow::bail!("v4 lab")
        };
        // The world: SSH and a web server, and a UDP service.
        let (ssh, web, udp) = in_netns(&world_ns, || {
            (
                TcpListener::bind("0.0.0.0:22").unwrap(),
                TcpListener::bind("0.0.0.0:80").unwrap(),
                UdpSocket::bind("0.0.0.0:5353").unwrap(),
            )
        })?;
        udp.set_read_timeout(Some(Duration::from_millis(500)))?;
        // The node's own SSH port, which sessions must not reach.
        let node_ssh = in_netns(&node_ns, || TcpListener::bind("0.0.0.0:22").unwrap())?;
        // Preconditions: the world and the node reach each other on every port.
        let wip = world.ip;
        in_netns(&node_ns, move || {
            connect(SocketAddr::new(wip, 80)).unwrap();
            UdpSocket::bind("0.0.0.0:0")
                .unwrap()
                .send_to(b"x", (wip, 5353))
                .unwrap();
        })?;
        let mut buf = [0u8; 64];
        assert_eq!(udp.recv(&mut buf)?, 1, "the node's UDP reaches the world");
        in_netns(&world_ns, move || {
            connect(SocketAddr::new(IpAddr::V4(node_ip), 22)).unwrap();
        })?;
        let _ = (node_ssh.accept()?, web.accept()?);

        let forwarding = || {
            in_netns(&node_ns, || {
                std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap()
            })
            .unwrap()
        };
        // A namespace copies the machine's setting when made: start from off.
        in_netns(&node_ns, || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "0").unwrap()
        })?;
        assert_eq!(forwarding(), "0\n");
        let (a, b) = (BareNs::new()?, BareNs::new()?);
        let (pid_a, pid_b) = (a.pid(), b.pid());
        let cfg = NetConfig {
            v4: "172.30.0.0/16".parse()?,
            v6: "fd6a:7573:7900::/48".parse()?,
            policy: Policy {
                allow_private: false,
                allow: vec!["198.18.0.0/15".parse()?],
            },
        };
        // The node side runs on a thread inside the node's namespace; checks
        // run on threads inside the sessions' namespaces.
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let node_thread = std::thread::spawn({
            let node_ns = node_ns.clone();
            move || {
                in_netns(&node_ns, move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(async move {
                        let net = HostNet::start("nettest1", &cfg).await.unwrap();
                        let sa = net.attach(pid_a).await.unwrap();
                        let sb = net.attach(pid_b).await.unwrap();
                        let link = sa.link().to_owned();
                        tx.send((sa.addrs(), sb.addrs(), sa.resolv_conf(), link))
                            .unwrap();
                        // Serve DNS until the checks are done, then tear down.
                        let _ = done_rx.await;
                        let traffic = net.detach(sa).await.unwrap();
                        net.detach(sb).await.unwrap();
                        net.stop().await;
                        traffic
                    })
                })
                .unwrap()
            }
        });
        let (addr_a, addr_b, resolv_conf, link_a) = rx.recv_timeout(Duration::from_secs(60))?;
        assert_eq!(resolv_conf, format!("nameserver {}\n", addr_a.gateway4));
        let gw_a = IpAddr::V4(addr_a.gateway4);

        // Loopback is the session's own: v4 and v6 work inside.
        let a_local = a.run(|| {
            let l4 = TcpListener::bind("127.0.0.1:0").unwrap();
            let l6 = TcpListener::bind("[::1]:0").unwrap();
            connect(l4.local_addr().unwrap()).unwrap();
            connect(l6.local_addr().unwrap()).unwrap();
            l4
        });
        let port = a_local.local_addr()?.port();
        assert!(
            b.run(move || refused(connect(SocketAddr::from(([127, 0, 0, 1], port))))),
            "another session's loopback answered"
        );

        // Names resolve at the gateway, over UDP and TCP.
        let q = dns_question("localhost");
        let (rcode, answers) = a.run({
            let q = q.clone();
            move || {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_read_timeout(Some(WAIT)).unwrap();
                s.send_to(&q, (gw_a, 53)).unwrap();
                let mut buf = [0u8; 512];
                let n = s.recv(&mut buf).unwrap();
                dns_answer(&buf[..n])
            }
        });
        assert_eq!((rcode, answers > 0), (0, true), "UDP DNS for localhost");
        let tcp_answer = a.run({
            let q = q.clone();
            move || {
                let mut s = connect(SocketAddr::new(gw_a, 53)).unwrap();
                s.write_all(&u16::try_from(q.len()).unwrap().to_be_bytes())
                    .unwrap();
                s.write_all(&q).unwrap();
                let mut len = [0u8; 2];
                s.read_exact(&mut len).unwrap();
                let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
                s.read_exact(&mut buf).unwrap();
                dns_answer(&buf)
            }
        });
        assert_eq!(tcp_answer.0, 0, "TCP DNS");
        // Another session's gateway does not answer this one.
        assert!(
            b.run(move || refused(connect(SocketAddr::new(gw_a, 53)))),
            "a session used another's DNS"
        );

        // TCP 22 out works, masqueraded behind the node.
        let wip = world.ip;
        a.run(move || connect(SocketAddr::new(wip, 22)).unwrap());
        let (_, peer) = ssh.accept()?;
        assert_eq!(peer.ip(), IpAddr::V4(node_ip), "masqueraded");
        // Any other port is refused at once although the world listens there.
        assert!(a.run(move || refused(connect(SocketAddr::new(wip, 80)))));
        // UDP anywhere but the gateway is refused and never arrives.
        let udp_err = a.run(move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect((wip, 5353)).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            s.send(b"leak").unwrap();
            let mut buf = [0u8; 8];
            s.recv(&mut buf).map(drop)
        });
        assert!(
            udp_err
                .as_ref()
                .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut),
            "UDP was not visibly refused: {udp_err:?}"
        );
        assert!(udp.recv(&mut buf).is_err(), "a session's UDP got out");
        // The node's own address and the other session are out of reach.
        let b4 = addr_b.session4;
        let b_ssh = b.run(|| {
            let l = TcpListener::bind("0.0.0.0:22").unwrap();
            l.set_nonblocking(false).unwrap();
            l
        });
        in_netns(&node_ns, move || {
            connect(SocketAddr::from((b4, 22))).unwrap()
        })?;
        let _ = b_ssh.accept()?;
        assert!(a.run(move || refused(connect(SocketAddr::from((node_ip, 22))))));
        assert!(a.run(move || refused(connect(SocketAddr::from((b4, 22))))));
        assert!(a.run(move || refused(connect(SocketAddr::new(gw_a, 22)))));

        // Teardown: counters, then nothing of the node's is left.
        let links = || {
            in_netns(&node_ns, || {
                let out = Command::new("ip").args(["-o", "link"]).output().unwrap();
                String::from_utf8_lossy(&out.stdout).into_owned()
            })
            .unwrap()
        };
        assert!(links().contains(&link_a), "{}", links());
        assert_eq!(forwarding(), "1\n");
        let _ = done_tx.send(());
        let traffic = node_thread.join().unwrap();
        assert!(traffic.sent > 0 && traffic.received > 0, "{traffic:?}");
        assert!(!links().contains("jynettest1"), "{}", links());
        let tables = in_netns(&node_ns, || {
            let out = Command::new("nft")
                .args(["list", "tables"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        })?;
        assert!(!tables.contains("jusy_nettest1"), "{tables}");
        assert_eq!(
            forwarding(),
            "0\n",
            "the last node turns forwarding off again"
        );
        Ok(())
    });
}

// ---- On the real binaries: these need sessions in their own namespaces. ----

/// A broker with one client and a node with `slots` ready sessions.
fn node(scene: &Scene, slots: u32) -> anyhow::Result<(Broker, Node, String)> {
    let data = scene.subdir("broker")?;
    let client = Broker::add_client(scene, &data)?;
    let broker = Broker::start(scene, "broker", data, 0)?;
    let slots_arg = slots.to_string();
    let node = Node::start(
        scene,
        "node",
        &broker,
        &["--ready-slots", &slots_arg, "--grace-secs", "1"],
    )?;
    broker.wait_capacity(scene, slots.into())?;
    Ok((broker, node, client))
}

fn order(scene: &Scene, broker: &Broker, client: &str) -> anyhow::Result<Login> {
    let (status, body) = broker.order(scene, client)?;
    anyhow::ensure!(status == 200, "order failed with {status}: {body}");
    Login::from_order(scene, &body)
}

/// A shell function `try host port` printing `host:port open|closed`.
const TRY: &str = "try() { if timeout 5 bash -c \"exec 3<>/dev/tcp/$1/$2\" 2>/dev/null; \
                   then echo \"$1:$2 open\"; else echo \"$1:$2 closed\"; fi; }; ";

#[test]
fn session_loopback_is_its_own() {
    e2e("session_loopback_is_its_own", |scene| {
        let (broker, _node, client) = node(scene, 2)?;
        let a = order(scene, &broker, &client)?;
        let b = order(scene, &broker, &client)?;
        // A serves on 127.0.0.1 and ::1 (one port) and reaches both itself; its
        // connection stays open so the session lives on during the checks.
        let serve = "python3 -c 'import socket,time\n\
                     s=socket.create_server((\"127.0.0.1\",0))\n\
                     p=s.getsockname()[1]\n\
                     t=socket.create_server((\"::1\",p),family=socket.AF_INET6)\n\
                     socket.create_connection((\"127.0.0.1\",p)).close()\n\
                     socket.create_connection((\"::1\",p)).close()\n\
                     print(p,flush=True)\ntime.sleep(600)'";
        let mut cmd = a.ssh_command(&a.key, &[]);
        cmd.arg(serve).stdin(Stdio::null()).stdout(Stdio::piped());
        let mut server = cmd.stderr(Stdio::null()).spawn()?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(server.stdout.take().expect("piped")),
            &mut line,
        )?;
        let port: u16 = line
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("A said {line:?}"))?;
        // Neither B nor the host reaches A's services.
        let out = b.ssh(
            scene,
            &format!("{TRY}try 127.0.0.1 {port}; try ::1 {port}"),
            None,
        )?;
        let host = [
            connect(SocketAddr::from(([127, 0, 0, 1], port))),
            connect(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))),
        ];
        let _ = server.kill();
        let _ = server.wait();
        assert_eq!(
            out.text(),
            format!("127.0.0.1:{port} closed\n::1:{port} closed\n"),
            "{}",
            out.stderr
        );
        for r in host {
            assert!(r.is_err(), "the host reached a session's loopback service");
        }
        Ok(())
    });
}

#[test]
fn session_sees_no_host_sockets() {
    e2e("session_sees_no_host_sockets", |scene| {
        // The host listens on loopback and on an abstract Unix socket.
        let tcp = TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        let name = format!("jusy-test-{}", std::process::id());
        let script = format!(
            "import socket,sys\ns=socket.socket(socket.AF_UNIX)\n\
             s.connect(b'\\0{name}')\nprint('abstract open')"
        );
        let abstract_sock = std::os::unix::net::UnixListener::bind_addr(
            &std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?,
        )?;
        // Precondition: the host reaches both.
        connect(SocketAddr::from(([127, 0, 0, 1], port)))?;
        let out = Command::new("python3").args(["-c", &script]).output()?;
        assert_eq!(String::from_utf8_lossy(&out.stdout), "abstract open\n");
        let _ = abstract_sock.accept()?;

        let (broker, _node, client) = node(scene, 1)?;
        let login = order(scene, &broker, &client)?;
        let remote = format!(
            "{TRY}try 127.0.0.1 {port}; python3 -c \"{}\" 2>/dev/null || echo abstract closed; \
             grep -ci ':{port:04X} ' /proc/net/tcp; grep -c {name} /proc/net/unix",
            script.replace('\n', ";").replace('"', "\\\"")
        );
        let out = login.ssh(scene, &remote, None)?;
        assert_eq!(
            out.text(),
            format!("127.0.0.1:{port} closed\nabstract closed\n0\n0\n"),
            "{}",
            out.stderr
        );
        Ok(())
    });
}

/// Asks the resolver of the session's `/etc/resolv.conf` for the A record of
/// `argv[1]` with a raw UDP question (no files, no cache) and prints
/// `<nameserver> rcode <n> answers <n> <last 4 bytes as an address>`.
const DNS_PY: &str = r"import socket,struct,sys
ns=[l.split()[1] for l in open('/etc/resolv.conf') if l.startswith('nameserver')][0]
q=struct.pack('>6H',0x4a59,0x100,1,0,0,0)
q+=b''.join(bytes([len(p)])+p.encode() for p in sys.argv[1].split('.'))+b'\0\0\1\0\1'
s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(3);s.sendto(q,(ns,53))
r=s.recv(512)
print(ns,'rcode',r[3]&15,'answers',r[7],'.'.join(map(str,r[-4:])))
";

/// Sends a UDP datagram to each `host:port` argument and prints `host open`
/// when anything but a refusal comes back, else `host closed`.
const UDP_PY: &str = r"import socket,sys
for a in sys.argv[1:]:
    h,p=a.rsplit(':',1)
    u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);u.settimeout(3);u.connect((h,int(p)))
    try:
        u.send(b'x');u.recv(8);print(h,'open')
    except OSError:
        print(h,'closed')
";

#[test]
fn names_resolve_and_other_udp_fails() {
    e2e("names_resolve_and_other_udp_fails", |scene| {
        let outside = UdpSocket::bind("127.0.0.1:0")?;
        outside.set_read_timeout(Some(Duration::from_millis(500)))?;
        let port = outside.local_addr()?.port();
        let (broker, _node, client) = node(scene, 1)?;
        let login = order(scene, &broker, &client)?;
        // The node answers (localhost comes from its hosts file).
        let out = login.ssh(scene, "python3 - localhost", Some(DNS_PY.as_bytes()))?;
        let text = out.text();
        let ns = text.split(' ').next().unwrap_or_default().to_owned();
        assert!(ns.starts_with("172.30."), "{text} {}", out.stderr);
        assert_eq!(text, format!("{ns} rcode 0 answers 1 127.0.0.1\n"));
        // UDP anywhere else is refused and never arrives, even to the resolver's
        // address on another port.
        let out = login.ssh(
            scene,
            &format!("python3 - 127.0.0.1:{port} 1.1.1.1:53 {ns}:{port}"),
            Some(UDP_PY.as_bytes()),
        )?;
        assert_eq!(
            out.text(),
            format!("127.0.0.1 closed\n1.1.1.1 closed\n{ns} closed\n"),
            "{}",
            out.stderr
        );
        let mut buf = [0u8; 8];
        assert!(
            outside.recv(&mut buf).is_err(),
            "a session's UDP reached the host"
        );
        Ok(())
    });
}

/// A file of `/etc/netns/<ns>/`, which `ip netns exec` shows at `/etc/` to the
/// programs it runs in `ns`; removed when dropped.
struct NetnsEtc(std::path::PathBuf);

impl NetnsEtc {
    fn write(ns: &str, name: &str, text: &str) -> anyhow::Result<Self> {
        let dir = std::path::Path::new("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir)?;
        let me = Self(dir);
        std::fs::write(me.0.join(name), text)?;
        Ok(me)
    }
}

impl Drop for NetnsEtc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn ssh_to_a_lab_host_by_name_across_nat() {
    e2e("ssh_to_a_lab_host_by_name_across_nat", |scene| {
        let mut lab = Lab::new(scene)?;
        let site = lab.public_host("broker")?;
        let data = scene.subdir("broker")?;
        let client = Broker::add_client(scene, &data)?;
        let broker = Broker::start_at(scene, "broker", &site, data, 0, &[])?;
        let git = lab.public_host("git")?;
        let laptop = lab.public_host("client")?;
        let home = lab.home("home", HomeOpts::default())?;
        let home_ns = home.host.netns.clone().unwrap();
        // The node knows the git host by name (its hosts file); nothing else does.
        let _hosts = NetnsEtc::write(
            &home_ns,
            "hosts",
            &format!("127.0.0.1 localhost\n{} git.lab\n", git.ip),
        )?;
        let git_ns = git.netns.clone().unwrap();
        let sshd = in_netns(&git_ns, || TcpListener::bind("0.0.0.0:22").unwrap())?;
        let (banner_tx, banner) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut s, peer) = sshd.accept().unwrap();
            s.write_all(b"SSH-2.0-lab\r\n").unwrap();
            let _ = banner_tx.send(peer.ip());
        });
        let _node = Node::start_at(
            scene,
            "node",
            &home.host,
            &broker,
            &["--ready-slots", "1", "--net-allow", "198.18.0.0/15"],
        )?;
        broker.wait_capacity(scene, 1)?;
        let (status, body) = broker.order_from(scene, &laptop, &client)?;
        anyhow::ensure!(status == 200, "order failed with {status}: {body}");
        let login = Login::from_order_at(scene, &laptop, &body)?;
        let out = login.ssh(scene, "python3 - git.lab", Some(DNS_PY.as_bytes()))?;
        assert!(
            out.text()
                .ends_with(&format!("rcode 0 answers 1 {}\n", git.ip)),
            "{} {}",
            out.text(),
            out.stderr
        );
        let out = login.ssh(
            scene,
            "timeout 10 ssh -o BatchMode=yes -o StrictHostKeyChecking=no git@git.lab 2>&1; \
             true",
            None,
        )?;
        // The lab's "sshd" only says hello: OpenSSH got that far by name.
        let peer = banner.recv_timeout(Duration::from_secs(10));
        assert_eq!(peer, Ok(IpAddr::V4(home.router.wan_ip)), "{}", out.text());
        assert!(!out.text().contains("Could not resolve"), "{}", out.text());
        Ok(())
    });
}

#[test]
fn nothing_of_the_network_is_left_after_teardown_and_a_crash() {
    e2e("nothing_of_the_network_is_left", |scene| {
        let (broker, mut node, client) = node(scene, 2)?;
        let (node_id, data_dir) = (node.node_id.clone(), node.data_dir.clone());
        let tag8: String = node_id
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(8)
            .collect();
        let links = || {
            let out = Command::new("ip").args(["-o", "link"]).output().unwrap();
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains(&format!("jy{tag8}")))
                .count()
        };
        for _ in 0..2 {
            node.proc
                .wait_event("slot_ready", Duration::from_secs(60))?;
        }
        // Precondition: the ready slots have their links (and the claim bridge).
        assert_eq!(links(), 3);
        let login = order(scene, &broker, &client)?;
        let out = login.ssh(scene, "echo hi", None)?;
        assert_eq!(out.text(), "hi\n");
        node.wait_session_end(&login.order_id, Duration::from_secs(60))?;
        node.proc
            .wait_event("slot_ready", Duration::from_secs(60))?;
        assert_eq!(links(), 3, "a session's link outlived it");
        node.proc.kill()?;
        drop(node);
        let mut node = Node::start(scene, "node", &broker, &["--ready-slots", "0"])?;
        assert_eq!(links(), 1, "only the new claim is there after the sweep");
        assert!(node.proc.stop(Duration::from_secs(30))?, "clean shutdown");
        assert_eq!(links(), 0);
        let left = leftovers::of_node(&node_id, &data_dir);
        assert!(left.is_empty(), "left behind: {left:#?}");
        Ok(())
    });
}

#[test]
fn a_sessions_traffic_is_counted_in_its_order() {
    e2e("session_traffic_counted", |scene| {
        let (broker, mut node, client) = node(scene, 1)?;
        let login = order(scene, &broker, &client)?;
        let path = format!("/order/{client}/{}", login.order_id);
        let (status, before) = broker.get(scene, &path)?;
        anyhow::ensure!(status == 200, "order status: {before}");
        assert_eq!(before["net_sent_bytes"], 0, "{before}");
        // 1000 datagrams of 1000 bytes to a refused address: the node drops
        // them, but they crossed the session's link.
        let send = "python3 -c 'import socket\n\
                    s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
                    n=0\n\
                    for _ in range(1000):\n    \
                        try:\n        s.sendto(b\"x\"*1000,(\"192.0.2.1\",9)); n+=1\n    \
                        except OSError: pass\n\
                    print(\"sent\",n)'";
        let out = login.ssh(scene, send, None)?;
        assert_eq!(out.text().trim(), "sent 1000", "{}", out.stderr);
        node.wait_session_end(&login.order_id, Duration::from_secs(60))?;
        // The node reports its last count before the end, on the same stream.
        let deadline = Instant::now() + Duration::from_secs(30);
        let after = loop {
            let (_, v) = broker.get(scene, &path)?;
            if v["finished"] == true || Instant::now() > deadline {
                break v;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        scene.note(&format!("order after: {after}"));
        let sent = after["net_sent_bytes"].as_u64().unwrap_or(0);
        // Each datagram is 1000 bytes of payload, 28 of headers and 14 of
        // Ethernet; a little more for the session's own DNS and neighbour
        // discovery.
        assert!(
            (1_042_000..1_300_000).contains(&sent),
            "sent {sent}: {after}"
        );
        assert!(after["net_received_bytes"].is_u64(), "{after}");
        Ok(())
    });
}
