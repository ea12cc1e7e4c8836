//! The node's and broker's own files against a hostile client, and against
//! anyone reading the machine's process list: data directories, keys,
//! databases and other sessions' disk images are out of a session's reach,
//! an install with loose modes is repaired at start, the owner hash never
//! shows on a command line, and a data disk too small for every session disk
//! keeps fewer slots ready instead of being filled.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use jusy_tests::process::{self, bin};
use jusy_tests::scene::DataDir;
use jusy_tests::{Broker, Login, Node, Scene, e2e};

const STOP: Duration = Duration::from_secs(30);

fn order(scene: &Scene, broker: &Broker, client: &str) -> anyhow::Result<Login> {
    let (status, body) = broker.order(scene, client)?;
    anyhow::ensure!(status == 200, "order failed with {status}: {body}");
    Login::from_order(scene, &body)
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .map(|m| m.mode() & 0o7777)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs a command on the host as root; fails on a non-zero exit.
fn host(scene: &Scene, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let out = process::run(scene, cmd, None, Duration::from_secs(60))?;
    anyhow::ensure!(
        out.status == Some(0),
        "{program} {args:?} failed: {}",
        out.stderr
    );
    Ok(out.text())
}

/// Every directory and file under `root` on its file system, `skip` and what
/// is below it left out, with its mode.
fn tree(root: &Path, skip: &[PathBuf]) -> Vec<(PathBuf, bool, u32)> {
    let dev = std::fs::metadata(root).expect("root").dev();
    let mut found = Vec::new();
    let mut pending = vec![root.to_owned()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).expect("stat");
        if skip.contains(&path) || meta.dev() != dev || meta.file_type().is_symlink() {
            continue;
        }
        found.push((path.clone(), meta.is_dir(), meta.mode() & 0o7777));
        if meta.is_dir() {
            pending.extend(
                std::fs::read_dir(&path)
                    .expect("list")
                    .map(|e| e.expect("entry").path()),
            );
        }
    }
    found
}

/// The modes a node's data directory must have: itself and `homes/` 0711 (so
/// session users reach their own homes), every other directory 0700 and every
/// file (keys, disk images) 0600. Session homes are their sessions' own.
fn node_modes_are_private(data_dir: &Path) {
    let homes = data_dir.join("homes");
    assert_eq!(mode(data_dir), 0o711, "{}", data_dir.display());
    assert_eq!(mode(&homes), 0o711, "{}", homes.display());
    let rest = tree(data_dir, &[homes]);
    assert!(
        rest.iter().any(|(p, _, _)| p.ends_with("node.key")),
        "the node's key is among {rest:?}"
    );
    for (path, is_dir, m) in rest.into_iter().skip(1) {
        let want = if is_dir { 0o700 } else { 0o600 };
        assert_eq!(m, want, "{}: {m:o}", path.display());
    }
}

/// Every directory of the broker's data directory 0700, every file 0600.
fn broker_modes_are_private(data_dir: &Path) {
    let all = tree(data_dir, &[]);
    assert!(
        all.iter().any(|(p, _, _)| p.ends_with("digest.key")),
        "the digest key is among {all:?}"
    );
    for (path, is_dir, m) in all {
        let want = if is_dir { 0o700 } else { 0o600 };
        assert_eq!(m, want, "{}: {m:o}", path.display());
    }
}

#[test]
fn sessions_cannot_read_the_nodes_or_the_brokers_state() {
    e2e("adversary_state_private", |scene| {
        // Under /var/lib as on a real machine: sessions see the paths (their
        // failures below are refusals, not absence).
        let root = DataDir::new(scene)?;
        let data = root.path().join("broker");
        std::fs::create_dir_all(&data)?;
        let client = Broker::add_client(scene, &data)?;
        let broker = Broker::start_with(scene, "broker", data.clone(), 0, &["--disk-mib", "64"])?;
        let args = [
            "--ready-slots",
            "2",
            "--disk-mib",
            "64",
            "--grace-secs",
            "1",
        ];
        let node = Node::start_in(scene, "node", root.path().join("node"), &broker, &args)?;
        broker.wait_capacity(scene, 2)?;
        let victim = order(scene, &broker, &client)?;
        let attacker = order(scene, &broker, &client)?;
        let secret = format!("victim-secret-{}", victim.order_id);
        let out = victim.ssh(scene, &format!("echo {secret} > ~/secret && sync"), None)?;
        anyhow::ensure!(out.status == Some(0), "victim's write: {}", out.stderr);

        // Precondition: whoever can read the victim's image finds the secret
        // in it (freezing the file system checkpoints its journal, where a
        // fresh file may otherwise only be).
        let image = node
            .data_dir
            .join("disks")
            .join(format!("{}.img", victim.user));
        let home = node.data_dir.join("homes").join(&victim.user);
        let home_str = home.display().to_string();
        host(scene, "fsfreeze", &["-f", &home_str])?;
        host(scene, "fsfreeze", &["-u", &home_str])?;
        let image_str = image.display().to_string();
        let found = host(scene, "debugfs", &["-R", "cat /secret", &image_str])?;
        assert!(found.contains(&secret), "root reads the image: {found}");

        // The modes while the node and broker run.
        node_modes_are_private(&node.data_dir);
        broker_modes_are_private(&data);

        // The attack: the other session lists the directories, reads every
        // file of the node (keys, images) and the broker (keys, database),
        // and points debugfs at the victim's image.
        let node_files = tree(&node.data_dir, &[node.data_dir.join("homes")]);
        let broker_files = tree(&data, &[]);
        let files: Vec<String> = node_files
            .iter()
            .chain(&broker_files)
            .filter(|(_, is_dir, _)| !is_dir)
            .map(|(p, _, _)| format!("'{}'", p.display()))
            .collect();
        assert!(files.iter().any(|f| f.contains(".img")), "{files:?}");
        let dirs = [
            node.data_dir.clone(),
            node.data_dir.join("homes"),
            node.data_dir.join("disks"),
            data.clone(),
            data.join("db"),
        ];
        let quoted = |ds: &[PathBuf]| -> String {
            ds.iter()
                .map(|d| format!("'{}'", d.display()))
                .collect::<Vec<_>>()
                .join(" ")
        };
        // Those the session can reach the name of (the broker's `db` is
        // behind its 0700 directory).
        let visible = &dirs[..4];
        let script = format!(
            "for d in {dirs}; do ls \"$d\" >/dev/null 2>&1 && echo \"LISTED $d\"; done\n\
             for f in {files}; do head -c 64 \"$f\" >/dev/null 2>&1 && echo \"READ $f\"; done\n\
             /usr/sbin/debugfs -R 'cat /secret' '{image}' 2>&1\n\
             stat -c 'MODE %a %n' {visible}\n\
             echo mine > ~/mine && cat ~/mine\n",
            dirs = quoted(&dirs),
            visible = quoted(visible),
            files = files.join(" "),
            image = image.display(),
        );
        let out = attacker.ssh(scene, &script, None)?;
        let said = out.text();
        scene.note(&format!("attacker saw:\n{said}\n{}", out.stderr));
        // The session sees the paths (its failures are refusals, not absence)
        // and still has its own home.
        for (dir, want) in visible.iter().zip(["711", "711", "700", "700"]) {
            let line = format!("MODE {want} {}", dir.display());
            assert!(said.contains(&line), "{line} in:\n{said}");
        }
        assert!(said.lines().any(|l| l == "mine"), "own home: {said}");
        assert!(!said.contains("LISTED"), "{said}");
        assert!(!said.contains("READ "), "{said}");
        assert!(!said.contains(&secret), "{said}");
        Ok(())
    });
}

/// Sets every directory under `root` to 0755 and every file to 0644 (as a
/// careless copy or restore would), on `root`'s file system; returns how
/// many paths changed.
fn loosen(root: &Path) -> usize {
    let mut changed = 0;
    for (path, is_dir, m) in tree(root, &[]) {
        let loose = if is_dir { 0o755 } else { 0o644 };
        if m != loose {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(loose)).expect("chmod");
            changed += 1;
        }
    }
    changed
}

#[test]
fn loosened_permissions_are_repaired_at_start() {
    e2e("adversary_state_repair", |scene| {
        let data = scene.subdir("broker")?;
        let mut broker = Broker::start(scene, "broker", data.clone(), 0)?;
        let args = ["--ready-slots", "1", "--disk-mib", "64"];
        let mut node = Node::start(scene, "node", &broker, &args)?;
        broker.wait_capacity(scene, 1)?;
        let node_dir = node.data_dir.clone();
        anyhow::ensure!(node.proc.stop(STOP)?, "the node did not stop cleanly");
        anyhow::ensure!(broker.proc.stop(STOP)?, "the broker did not stop cleanly");

        // Precondition: the stopped install's modes are loose.
        let node_loosened = loosen(&node_dir);
        let broker_loosened = loosen(&data);
        assert_eq!(mode(&node_dir.join("node.key")), 0o644);
        assert_eq!(mode(&node_dir.join("disks")), 0o755);
        assert_eq!(mode(&data.join("digest.key")), 0o644);
        assert!(node_loosened >= 5 && broker_loosened >= 3);

        let broker = Broker::start(scene, "broker-again", data.clone(), 0)?;
        let node = Node::start_in(scene, "node-again", node_dir.clone(), &broker, &args)?;
        broker.wait_capacity(scene, 1)?;
        for (name, loosened) in [
            ("broker-again", broker_loosened),
            ("node-again", node_loosened),
        ] {
            let log = std::fs::read_to_string(scene.dir().join(format!("{name}.err")))?;
            let said: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("repaired permissions"))
                .collect();
            assert_eq!(said.len(), 1, "{name} says it once: {said:?}");
            assert!(
                said[0].contains(&format!("paths={loosened}")),
                "{name} counts the {loosened} paths: {said:?}"
            );
        }
        node_modes_are_private(&node.data_dir);
        broker_modes_are_private(&data);
        Ok(())
    });
}

#[test]
fn the_owner_hash_never_appears_on_a_command_line() {
    e2e("adversary_state_owner", |scene| {
        // Refused on the command line, with where to put it instead.
        let refused = "ab".repeat(32);
        let mut cmd = Command::new(bin("jusy-node")?);
        cmd.args(["--broker", "127.0.0.1:9", "--broker-key", &"0".repeat(64)])
            .args(["--owner", &refused, "--data-dir"])
            .arg(scene.subdir("refused")?);
        let out = process::run(scene, cmd, None, Duration::from_secs(30))?;
        assert_ne!(out.status, Some(0), "--owner must be refused");
        for hint in [
            "--owner is refused",
            "owner = ",
            "--owner-file",
            "JUSY_OWNER",
        ] {
            assert!(out.stderr.contains(hint), "{hint} in: {}", out.stderr);
        }

        // Two nodes earning for one owner: the hash in the environment, and
        // in a file only root reads.
        let data = scene.subdir("broker")?;
        let owner = Broker::add_account(scene, &data, "owner", 0)?;
        let client = Broker::add_client(scene, &data)?;
        let broker = Broker::start_with(scene, "broker", data, 0, &["--disk-mib", "64"])?;
        let args = ["--ready-slots", "1", "--disk-mib", "64"];
        let by_env = Node::start_owned(scene, "node-env", &broker, &owner, &args)?;
        let file = scene.dir().join("owner");
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)
            .and_then(|mut f| std::io::Write::write_all(&mut f, owner.as_bytes()))?;
        let file_arg = file.display().to_string();
        let mut by_file_args = args.to_vec();
        by_file_args.extend(["--owner-file", file_arg.as_str()]);
        let by_file = Node::start(scene, "node-file", &broker, &by_file_args)?;

        // Precondition: the broker credits both nodes to that owner, so the
        // hash is in use.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = broker.get(scene, &format!("/owner/{owner}"))?;
            anyhow::ensure!(status == 200, "{status}: {body}");
            let ids: Vec<&str> = body["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| n["node_id"].as_str())
                .collect();
            if ids.contains(&by_env.node_id.as_str()) && ids.contains(&by_file.node_id.as_str()) {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "owner's nodes: {body}");
            std::thread::sleep(Duration::from_millis(100));
        }

        // A session on each node (one slot each) finds it neither in its environment nor in
        // any process's it can see.
        broker.wait_capacity(scene, 2)?;
        for _ in [&by_env, &by_file] {
            let login = order(scene, &broker, &client)?;
            let look = "env; cat /proc/*/environ /proc/*/cmdline 2>/dev/null | tr '\\0' '\\n'";
            let out = login.ssh(scene, look, None)?;
            let said = out.text();
            assert!(
                said.contains("HOME="),
                "the session read its environment: {said}"
            );
            assert!(
                !said.contains(&owner),
                "a session sees the owner hash: {said}"
            );
        }

        // No process's command line on the machine carries it.
        let mut seen = Vec::new();
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            // A process that exited meanwhile has nothing to show.
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            assert!(
                !text.contains(&owner),
                "pid {pid} shows the owner hash: {text}"
            );
            // Only the node it was given to holds it in its environment: the
            // programs the nodes start do not inherit it.
            if pid != by_env.proc.pid() {
                let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
                let environ = String::from_utf8_lossy(&environ);
                assert!(
                    !environ.contains(&owner),
                    "pid {pid} inherited the owner hash: {text}"
                );
            }
            seen.push(pid);
        }
        for node in [&by_env, &by_file] {
            assert!(
                seen.contains(&node.proc.pid()),
                "the node's command line was read"
            );
        }
        Ok(())
    });
}

/// A small ext4 file system loop-mounted in the scene, unmounted (with
/// whatever a node left mounted inside it) when dropped.
struct SmallDisk {
    mount: PathBuf,
}

impl SmallDisk {
    fn new(scene: &Scene, mib: u64) -> anyhow::Result<Self> {
        let image = scene.dir().join("small.img");
        std::fs::File::create(&image)?.set_len(mib << 20)?;
        let image = image.display().to_string();
        host(scene, "mkfs.ext4", &["-q", "-F", "-m", "0", &image])?;
        let mount = scene.subdir("small")?;
        let at = mount.display().to_string();
        host(scene, "mount", &["-o", "loop", &image, &at])?;
        Ok(Self { mount })
    }

    /// Bytes free for unprivileged writers (`f_bavail` × `f_frsize`).
    fn available(&self, scene: &Scene) -> anyhow::Result<u64> {
        let at = self.mount.display().to_string();
        let out = host(scene, "stat", &["-f", "-c", "%a %S", &at])?;
        let mut fields = out.split_whitespace().map(str::parse::<u64>);
        match (fields.next(), fields.next()) {
            (Some(Ok(blocks)), Some(Ok(size))) => Ok(blocks * size),
            _ => anyhow::bail!("stat -f said {out}"),
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let at = self.mount.display().to_string();
        let clean = Command::new("umount").args(["-R", &at]).status();
        if !clean.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").args(["-R", "-l", &at]).status();
        }
    }
}

#[test]
fn a_small_data_disk_keeps_fewer_slots_ready_and_says_so() {
    e2e("adversary_state_small_disk", |scene| {
        const MIB: u64 = 1 << 20;
        let disk = SmallDisk::new(scene, 400)?;
        let data_dir = disk.mount.join("node");
        std::fs::create_dir(&data_dir)?;
        // Room for two and a half session disks beside the reserve: two fit,
        // with half a disk of slack for the node's keys and the images'
        // bookkeeping on the outer file system.
        let disk_mib = 100;
        let available = disk.available(scene)? / MIB;
        let reserve = available.saturating_sub(disk_mib * 5 / 2);
        let (asked, fit) = (4u64, 2u64);
        // Precondition: what is asked for does not fit.
        assert!(
            reserve > 0 && asked * disk_mib + reserve > available,
            "{available} MiB free"
        );

        let data = scene.subdir("broker")?;
        let broker = Broker::start(scene, "broker", data, 0)?;
        let (asked_s, disk_s, reserve_s) =
            (asked.to_string(), disk_mib.to_string(), reserve.to_string());
        let args = [
            "--ready-slots",
            &asked_s,
            "--disk-mib",
            &disk_s,
            "--disk-reserve-mib",
            &reserve_s,
        ];
        let mut node = Node::start_in(scene, "node", data_dir, &broker, &args)?;
        let short = node
            .proc
            .wait_event("disk_short", Duration::from_secs(30))?;
        assert_eq!(short["slots"].as_u64(), Some(fit), "{short}");
        assert_eq!(short["ready_slots"].as_u64(), Some(asked), "{short}");
        assert_eq!(short["reserve_mib"].as_u64(), Some(reserve), "{short}");
        assert_eq!(short["disk_mib"].as_u64(), Some(disk_mib), "{short}");
        broker.wait_capacity(scene, fit)?;
        // Stopped, the node has said everything it prepared: exactly the two.
        anyhow::ensure!(node.proc.stop(STOP)?, "the node did not stop cleanly");
        let out = std::fs::read_to_string(scene.dir().join("node.out"))?;
        let prepared = out.lines().filter(|l| l.contains("\"slot_ready\"")).count();
        assert_eq!(prepared as u64, fit, "{out}");
        let log = std::fs::read_to_string(scene.dir().join("node.err"))?;
        assert!(log.contains("fewer session disks"), "a warning says so");
        Ok(())
    });
}
