//! System calls a hostile client must not make from its session, through a
//! real SSH session: new user namespaces (the way into kernel code that only
//! "root" of a namespace reaches), perf events, io_uring, keyrings,
//! userfaultfd, bpf and mounts; and the ordinary work that must still run
//! under the session's seccomp filter (a C compiler, threads, Python, git,
//! rsync). Each refusal is first shown to be one the kernel itself would have
//! allowed: the same call succeeds on the host, unfiltered, as root or as the
//! session's own uid.

use std::process::Command;

use jusy_tests::client::COMMAND;
use jusy_tests::{Broker, Login, Node, Scene, e2e, process};

/// A broker with one client and a node with one ready session, and the
/// client's login to it.
fn session(scene: &Scene) -> anyhow::Result<(Broker, Node, Login)> {
    let data = scene.subdir("broker")?;
    let client = Broker::add_client(scene, &data)?;
    let broker = Broker::start(scene, "broker", data, 0)?;
    let node = Node::start(scene, "node", &broker, &["--ready-slots", "1"])?;
    broker.wait_capacity(scene, 1)?;
    let (status, body) = broker.order(scene, &client)?;
    anyhow::ensure!(status == 200, "order failed with {status}: {body}");
    let login = Login::from_order(scene, &body)?;
    Ok((broker, node, login))
}

/// Runs `remote` in the session; returns its exit code and output (stdout and
/// stderr together, and then anything ssh itself said).
fn in_session(scene: &Scene, login: &Login, remote: &str) -> anyhow::Result<(i32, String)> {
    let out = login.ssh(scene, &format!("{{ {remote}\n}} 2>&1"), None)?;
    Ok((
        out.status.unwrap_or(-1),
        format!("{}{}", out.text(), out.stderr),
    ))
}

/// Runs `program args…` on the host, unfiltered, with the session's `PATH`,
/// as root, or as the session user's uid and gid when given; returns its exit
/// code and output.
fn on_host(
    scene: &Scene,
    user: Option<(u32, u32)>,
    program: &str,
    args: &[&str],
) -> anyhow::Result<(i32, String)> {
    let mut cmd = match user {
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.args([format!("--reuid={uid}"), format!("--regid={gid}")])
                .args(["--clear-groups", "--", program]);
            c
        }
        None => Command::new(program),
    };
    cmd.args(args)
        .current_dir("/")
        .env("PATH", "/usr/local/bin:/usr/bin:/bin");
    let out = process::run(scene, cmd, None, COMMAND)?;
    Ok((
        out.status.unwrap_or(-1),
        format!("{}{}", out.text(), out.stderr),
    ))
}

/// The session user's uid and gid, asked from inside.
fn session_ids(scene: &Scene, login: &Login) -> anyhow::Result<(u32, u32)> {
    let (code, out) = in_session(scene, login, "echo $(id -u) $(id -g)")?;
    anyhow::ensure!(code == 0, "id: {out}");
    let (uid, gid) = out.trim().split_once(' ').unwrap_or_default();
    Ok((uid.parse()?, gid.parse()?))
}

/// A Python script that makes each call of `probes` (name, number, arguments)
/// in a forked child and prints `name result`: 0 for success, else the errno
/// (negative: the signal that killed the child).
fn probe_script(probes: &[(&str, libc::c_long, &[i64])]) -> String {
    let list: Vec<String> = probes
        .iter()
        .map(|(name, nr, args)| format!("({name:?}, {nr}, {args:?})"))
        .collect();
    format!(
        "import ctypes, os\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         L = ctypes.c_long\n\
         for name, nr, args in [{}]:\n\
         \x20   pid = os.fork()\n\
         \x20   if pid == 0:\n\
         \x20       r = libc.syscall(L(nr), *[L(a) for a in args])\n\
         \x20       os._exit(0 if r >= 0 else ctypes.get_errno())\n\
         \x20   print(name, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n",
        list.join(", ")
    )
}

fn parse_probes(out: &str) -> Vec<(String, i32)> {
    out.lines()
        .filter_map(|l| {
            let (name, code) = l.split_once(' ')?;
            Some((name.to_owned(), code.trim().parse().ok()?))
        })
        .collect()
}

/// Quotes `s` for a POSIX shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[test]
fn user_namespaces_cannot_be_made() {
    e2e("user_namespaces_cannot_be_made", |scene| {
        // Precondition: the kernel lets unprivileged users make user namespaces.
        let max = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")?;
        anyhow::ensure!(max.trim().parse::<u64>()? > 0, "user namespaces are off");
        let (_broker, _node, login) = session(scene)?;
        let ids = session_ids(scene, &login)?;
        let newuser = i64::from(libc::CLONE_NEWUSER);
        let sigchld = i64::from(libc::SIGCHLD);
        let probes: &[(&str, libc::c_long, &[i64])] = &[
            ("unshare", libc::SYS_unshare, &[newuser]),
            ("clone", libc::SYS_clone, &[newuser | sigchld, 0, 0, 0, 0]),
        ];
        let script = probe_script(probes);
        for args in [&["-U", "true"][..], &["-Urn", "true"]] {
            let free = on_host(scene, Some(ids), "unshare", args)?;
            assert_eq!(
                free.0, 0,
                "precondition: unshare {args:?} as {ids:?}: {}",
                free.1
            );
            let (code, out) = in_session(scene, &login, &format!("unshare {}", args.join(" ")))?;
            assert_ne!(code, 0, "unshare {args:?} in the session: {out}");
            assert!(out.contains("Operation not permitted"), "{out}");
        }
        let free = on_host(scene, Some(ids), "python3", &["-c", &script])?;
        let free = parse_probes(&free.1);
        assert_eq!(
            free,
            [("unshare".into(), 0), ("clone".into(), 0)],
            "precondition"
        );
        let (_, out) = in_session(scene, &login, &format!("python3 -c {}", sh_quote(&script)))?;
        let got = parse_probes(&out);
        assert_eq!(
            got,
            [
                ("unshare".into(), libc::EPERM),
                ("clone".into(), libc::EPERM)
            ],
            "{out}"
        );
        // Python's own os.unshare (3.12 on): the same refusal, as an exception.
        // An older Python lacks it; the ctypes call above is what it wraps.
        let py = "import os, errno\n\
                  try:\n    os.unshare(os.CLONE_NEWUSER)\n    print('made')\n\
                  except AttributeError:\n    print('absent')\n\
                  except OSError as e:\n    print(errno.errorcode[e.errno])\n";
        let (_, free) = on_host(scene, Some(ids), "python3", &["-c", py])?;
        let (_, out) = in_session(scene, &login, &format!("python3 -c {}", sh_quote(py)))?;
        match free.trim() {
            "made" => assert_eq!(out.trim(), "EPERM", "{out}"),
            "absent" => assert_eq!(out.trim(), "absent", "{out}"),
            other => panic!("precondition: os.unshare on the host said {other}"),
        }
        Ok(())
    });
}

#[test]
fn kernel_interfaces_are_refused() {
    e2e("kernel_interfaces_are_refused", |scene| {
        let (_broker, _node, login) = session(scene)?;
        let ids = session_ids(scene, &login)?;
        // Arguments with which each call fails harmlessly, or succeeds without
        // lasting effect in a forked child, when nothing refuses it. The first
        // four are open to any user: shown on the host as the session's uid.
        let as_user: &[(&str, libc::c_long, &[i64])] = &[
            (
                "perf_event_open",
                libc::SYS_perf_event_open,
                &[0, 0, -1, -1, 0],
            ),
            ("io_uring_setup", libc::SYS_io_uring_setup, &[0, 0]),
            // UFFD_USER_MODE_ONLY: allowed to unprivileged users on any setting.
            ("userfaultfd", libc::SYS_userfaultfd, &[1]),
            // KEYCTL_GET_KEYRING_ID of the session keyring, not creating it.
            ("keyctl", libc::SYS_keyctl, &[0, -3, 0]),
        ];
        // These need privileges the session lacks anyway; the filter is a
        // second wall. Shown on the host as root.
        let as_root: &[(&str, libc::c_long, &[i64])] = &[
            ("bpf", libc::SYS_bpf, &[5, 0, 0]),
            ("mount", libc::SYS_mount, &[0, 0, 0, 0, 0]),
            ("setns", libc::SYS_setns, &[-1, 0]),
        ];
        for (who, probes) in [(Some(ids), as_user), (None, as_root)] {
            let (_, out) = on_host(scene, who, "python3", &["-c", &probe_script(probes)])?;
            let free = parse_probes(&out);
            assert_eq!(free.len(), probes.len(), "precondition: {out}");
            for (name, code) in free {
                assert!(
                    code >= 0 && code != libc::EPERM,
                    "precondition: unfiltered {name} as {who:?} gave {code}"
                );
            }
        }
        let all: Vec<_> = as_user.iter().chain(as_root).cloned().collect();
        let script = probe_script(&all);
        let (_, out) = in_session(scene, &login, &format!("python3 -c {}", sh_quote(&script)))?;
        let got = parse_probes(&out);
        assert_eq!(got.len(), all.len(), "{out}");
        for (name, code) in got {
            assert_eq!(code, libc::EPERM, "{name} in the session: {out}");
        }
        // keyutils' own tool, where installed.
        if on_host(scene, None, "keyctl", &["--version"]).is_ok_and(|(c, _)| c == 0) {
            let free = on_host(scene, Some(ids), "keyctl", &["show"])?;
            assert_eq!(free.0, 0, "precondition: keyctl show: {}", free.1);
            let (code, out) = in_session(scene, &login, "keyctl show")?;
            assert_ne!(code, 0, "keyctl show in the session: {out}");
            assert!(out.contains("Operation not permitted"), "{out}");
        }
        Ok(())
    });
}

#[test]
fn ordinary_work_runs_under_the_filter() {
    e2e("ordinary_work_runs_under_the_filter", |scene| {
        for tool in ["cc", "python3", "git", "rsync"] {
            let (code, out) = on_host(scene, None, "sh", &["-c", &format!("command -v {tool}")])?;
            anyhow::ensure!(code == 0, "this test needs {tool} on the host: {out}");
        }
        let (_broker, _node, login) = session(scene)?;
        // Threads: glibc tries clone3 first and falls back to clone.
        let c = r#"#include <pthread.h>
#include <stdio.h>
static void *run(void *arg) { return arg; }
int main(void) {
    pthread_t t[4];
    for (int i = 0; i < 4; i++) if (pthread_create(&t[i], 0, run, 0)) return 1;
    for (int i = 0; i < 4; i++) pthread_join(t[i], 0);
    puts("threads ok");
    return 0;
}
"#;
        let (code, out) = in_session(
            scene,
            &login,
            &format!(
                "printf %s {} > t.c && cc -pthread -o t t.c && ./t",
                sh_quote(c)
            ),
        )?;
        assert_eq!((code, out.as_str()), (0, "threads ok\n"));

        let py = "import threading, subprocess, os\n\
                  ts = [threading.Thread(target=os.getpid) for _ in range(4)]\n\
                  [t.start() for t in ts]\n\
                  [t.join() for t in ts]\n\
                  print(subprocess.run(['echo', 'python ok'], capture_output=True, text=True).stdout, end='')\n";
        let (code, out) = in_session(scene, &login, &format!("python3 -c {}", sh_quote(py)))?;
        assert_eq!((code, out.as_str()), (0, "python ok\n"));

        let git = "mkdir repo && cd repo && git init -q && echo hi > f && git add f && \
                   git -c user.name=t -c user.email=t@example.invalid commit -qm first && \
                   git log --format=%s";
        let (code, out) = in_session(scene, &login, git)?;
        assert_eq!((code, out.as_str()), (0, "first\n"));

        let rsync = "mkdir -p a/b && echo x > a/b/c && rsync -a a/ copy/ && cat copy/b/c";
        let (code, out) = in_session(scene, &login, rsync)?;
        assert_eq!((code, out.as_str()), (0, "x\n"));
        Ok(())
    });
}
