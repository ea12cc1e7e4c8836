//! The seccomp filter every session program runs under: everything is allowed
//! except the system calls that reach kernel code a session has no business
//! with, the kernel's usual way in for a local privilege escalation.
//!
//! A session user is already unprivileged; most of what is refused here would
//! fail for lack of a capability anyway. The filter is for the calls an
//! unprivileged process *may* make and that open a large attack surface, and a
//! second wall behind the capability checks for the rest. It follows Docker's
//! default profile, without its capability-dependent exceptions.
//!
//! Refused with `EPERM`:
//! * **New namespaces**: `unshare` and `clone` with any `CLONE_NEW*` flag (a
//!   user namespace would hand the session "root" over fresh mount, network and
//!   other namespaces, the source of many kernel exploits), and `setns`.
//! * **Mounts**: `mount`, `umount2`, `pivot_root`, and the new mount API
//!   (`open_tree`, `move_mount`, `fsopen`, `fsconfig`, `fsmount`, `fspick`,
//!   `mount_setattr`).
//! * **Kernel programming and introspection**: `bpf`, `perf_event_open`,
//!   `userfaultfd` (lets an exploit stall the kernel at a chosen page fault),
//!   `io_uring_setup`/`_enter`/`_register` (a second syscall interface with a
//!   long record of privilege escalations), `lookup_dcookie`, `syslog` (the
//!   kernel log reveals the host).
//! * **Keyrings**: `keyctl`, `add_key`, `request_key`; keyrings are not
//!   namespaced and are keyed by uid.
//! * **File handles**: `name_to_handle_at`, `open_by_handle_at` (open any file
//!   of a file system by inode, bypassing the directories above it).
//! * **The machine itself**: `kexec_load`, `kexec_file_load`, `init_module`,
//!   `finit_module`, `delete_module`, `reboot`, `swapon`, `swapoff`, `acct`,
//!   `quotactl`, `quotactl_fd`, `iopl`, `ioperm`, `uselib`, `_sysctl`, and
//!   setting the clock: `settimeofday`, `clock_settime`, `clock_adjtime`,
//!   `adjtimex`.
//!
//! `clone3` fails with `ENOSYS`: its flags live in memory, where a filter
//! cannot look, so it is made to look absent and the C library falls back to
//! `clone`, whose flags the filter checks (as container runtimes do).
//!
//! Calls from another ABI (32-bit `int 0x80`, x32) would bypass the rules,
//! which name x86_64's numbers: they **kill the process**.
//!
//! Deliberately allowed: `ptrace`, `process_vm_readv`/`writev`, `kcmp` and
//! `pidfd_getfd` (debuggers must work; the session's own pid namespace and uid
//! confine them), `personality` (gdb turns address randomisation off with it),
//! the NUMA calls, `seccomp` and `landlock_*` (a program may sandbox itself).

use std::collections::BTreeMap;
use std::io;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("the session seccomp filter knows the system calls of x86_64 and aarch64 only");

/// Building the filter failed (a bug in the rules, not a runtime condition).
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("compiling the session seccomp filter: {0}")]
    Compile(#[from] seccompiler::BackendError),
}

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

/// `AUDIT_ARCH_*` of the native ABI (linux/audit.h): the machine number with
/// the 64-bit and little-endian flags.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 62 | 0x8000_0000 | 0x4000_0000;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 183 | 0x8000_0000 | 0x4000_0000;

/// Every namespace flag `clone` takes (`CLONE_NEWTIME` shares its bit with the
/// exit signal there, so only `unshare` gets it).
const CLONE_NAMESPACES: [libc::c_int; 7] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWCGROUP,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
];

/// System calls refused whatever their arguments.
const REFUSED: &[libc::c_long] = &[
    libc::SYS_setns,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_lookup_dcookie,
    libc::SYS_syslog,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_name_to_handle_at,
    libc::SYS_open_by_handle_at,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_quotactl_fd,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_iopl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_ioperm,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_uselib,
    #[cfg(target_arch = "x86_64")]
    libc::SYS__sysctl,
];

/// Builds the session filter; done once at node start, applied in each
/// session program with [`apply`].
pub fn session_filter() -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        REFUSED.iter().map(|&nr| (nr, Vec::new())).collect();
    // A rule matches when all its conditions do, a syscall when any rule does:
    // one rule per flag gives "any namespace flag set".
    let any_flag = |flags: &[libc::c_int]| {
        flags
            .iter()
            .map(|&flag| {
                let flag = u64::from(flag.unsigned_abs());
                let set = SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::MaskedEq(flag),
                    flag,
                )?;
                SeccompRule::new(vec![set])
            })
            .collect::<Result<Vec<_>, _>>()
    };
    rules.insert(libc::SYS_clone, any_flag(&CLONE_NAMESPACES)?);
    let mut unshare = CLONE_NAMESPACES.to_vec();
    unshare.push(libc::CLONE_NEWTIME);
    rules.insert(libc::SYS_unshare, any_flag(&unshare)?);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM.unsigned_abs()),
        ARCH,
    )?;
    let main = BpfProgram::try_from(filter)?;
    let mut program = prologue();
    program.extend(main);
    Ok(program)
}

// Classic BPF opcodes (linux/bpf_common.h): load a word at an absolute
// offset, jump if equal / greater or equal to a constant, return a constant.
const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x05 | 0x10;
const JGE_K: u16 = 0x05 | 0x30;
const RET_K: u16 = 0x06;
/// Offsets in `struct seccomp_data`.
const NR: u32 = 0;
const ARCH_OFFSET: u32 = 4;

fn insn(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// What seccompiler cannot say, as a few instructions run before its program
/// (which starts over, so jumping to it is safe): `clone3` returns `ENOSYS`,
/// and an x32 call (native arch, number with bit 30 set) kills. Another arch
/// jumps straight to seccompiler's program, whose arch check kills; so does a
/// negative number, which no rule matches and the kernel answers with ENOSYS.
fn prologue() -> Vec<sock_filter> {
    let enosys = libc::SECCOMP_RET_ERRNO | libc::ENOSYS.unsigned_abs();
    let kill = libc::SECCOMP_RET_KILL_PROCESS;
    // A jump goes to the instruction after it plus its offset; the comments
    // number the instructions, and 8 is the start of seccompiler's program.
    vec![
        /* 0 */ insn(LD_W_ABS, ARCH_OFFSET, 0, 0),
        /* 1 */ insn(JEQ_K, AUDIT_ARCH, 0, 6),
        /* 2 */ insn(LD_W_ABS, NR, 0, 0),
        /* 3 */ insn(JGE_K, NEGATIVE, 4, 0),
        /* 4 */ insn(JGE_K, X32_SYSCALL_BIT, 2, 0),
        /* 5 */ insn(JEQ_K, CLONE3, 0, 2),
        /* 6 */ insn(RET_K, enosys, 0, 0),
        /* 7 */ insn(RET_K, kill, 0, 0),
    ]
}

/// x86_64's mark of an x32 system call number; aarch64 has no such ABI and no
/// number this high, so the check never fires there.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// The sign bit of the (32-bit) system call number.
const NEGATIVE: u32 = 0x8000_0000;
/// System call numbers are small and positive; the cast only changes the type.
const CLONE3: u32 = libc::SYS_clone3 as u32;

/// Applies `program` to the calling thread, for good. Meant for a freshly
/// forked child before exec: it sets `no_new_privs` (which an unprivileged
/// process needs for seccomp) and allocates nothing, so it is async-signal-safe.
pub fn apply(program: &[sock_filter]) -> io::Result<()> {
    seccompiler::apply_filter(program).map_err(|e| match e {
        seccompiler::Error::Prctl(e) | seccompiler::Error::Seccomp(e) => e,
        // The only other outcome for a built program is an empty one.
        _ => io::Error::from_raw_os_error(libc::EINVAL),
    })
}

#[cfg(test)]
mod tests {
    // Test code: a panic is how a check fails.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use std::os::unix::process::CommandExt;
    use std::process::{Command, Output};

    use super::*;

    /// Runs `program args…`, under the session filter when `filtered`.
    fn run(filtered: bool, program: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(program);
        cmd.args(args);
        if filtered {
            let filter = session_filter().expect("the filter builds");
            // SAFETY: apply makes two system calls on memory allocated before
            // the fork.
            unsafe { cmd.pre_exec(move || apply(&filter)) };
        }
        cmd.output()
            .unwrap_or_else(|e| panic!("running {program}: {e}"))
    }

    fn show(out: &Output) -> String {
        format!(
            "{}; stdout: {}; stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn root() -> bool {
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            eprintln!("SKIPPED: the unfiltered half of this test needs root");
        }
        root
    }

    #[test]
    fn filter_fits_the_kernel_limit() {
        let program = session_filter().unwrap();
        assert!(program.len() < 4096, "{} instructions", program.len());
    }

    #[test]
    fn unshare_of_a_user_namespace_is_refused() {
        for args in [&["-U", "true"][..], &["-Urn", "true"]] {
            let free = run(false, "unshare", args);
            assert!(free.status.success(), "precondition: {}", show(&free));
            let out = run(true, "unshare", args);
            assert!(!out.status.success(), "unshare {args:?}: {}", show(&out));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("Operation not permitted"), "{stderr}");
        }
    }

    /// A Python script that makes each system call of `probes` (name, number,
    /// arguments) in a forked child and prints the name and how the child
    /// ended: 0 for success, the errno, or minus the signal that killed it.
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

    fn probe(filtered: bool, probes: &[(&str, libc::c_long, &[i64])]) -> Vec<(String, i32)> {
        let out = run(filtered, "python3", &["-c", &probe_script(probes)]);
        assert!(out.status.success(), "{}", show(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                let (name, code) = l.split_once(' ').unwrap();
                (name.to_owned(), code.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn refused_calls_get_eperm_and_clone3_enosys() {
        if !root() {
            return;
        }
        let newuser = i64::from(libc::CLONE_NEWUSER);
        let sigchld = i64::from(libc::SIGCHLD);
        // Arguments that make each call fail harmlessly or succeed without
        // lasting effect (a forked child does them) when nothing refuses it.
        let probes: &[(&str, libc::c_long, &[i64])] = &[
            ("getpid", libc::SYS_getpid, &[]),
            ("unshare", libc::SYS_unshare, &[newuser]),
            ("clone", libc::SYS_clone, &[newuser | sigchld, 0, 0, 0, 0]),
            ("clone3", libc::SYS_clone3, &[0, 0]),
            ("setns", libc::SYS_setns, &[-1, 0]),
            ("mount", libc::SYS_mount, &[0, 0, 0, 0, 0]),
            ("bpf", libc::SYS_bpf, &[5, 0, 0]),
            (
                "perf_event_open",
                libc::SYS_perf_event_open,
                &[0, 0, -1, -1, 0],
            ),
            ("userfaultfd", libc::SYS_userfaultfd, &[0]),
            ("io_uring_setup", libc::SYS_io_uring_setup, &[0, 0]),
            ("keyctl", libc::SYS_keyctl, &[0, -3, 0]),
            (
                "open_by_handle_at",
                libc::SYS_open_by_handle_at,
                &[-1, 0, 0],
            ),
            ("syslog", libc::SYS_syslog, &[10, 0, 0]),
        ];
        let free = probe(false, probes);
        assert_eq!(free.len(), probes.len(), "{free:?}");
        for (name, code) in &free {
            let expected_free = *code != libc::EPERM && *code >= 0;
            assert!(expected_free, "precondition: unfiltered {name} gave {code}");
        }
        for (name, code) in probe(true, probes) {
            let want = match name.as_str() {
                "getpid" => 0,
                "clone3" => libc::ENOSYS,
                _ => libc::EPERM,
            };
            assert_eq!(code, want, "{name}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn other_abis_are_killed() {
        // x32's getpid: the native arch with bit 30 set in the number.
        let x32 = X32_SYSCALL_BIT as libc::c_long | libc::SYS_getpid;
        let probes: &[(&str, libc::c_long, &[i64])] = &[("x32_getpid", x32, &[])];
        let free = probe(false, probes);
        assert!(free[0].1 >= 0, "precondition: {free:?}");
        assert_eq!(probe(true, probes)[0].1, -libc::SIGSYS);
        // A negative number is no x32 call: the kernel's ENOSYS, not a kill.
        let negative: &[(&str, libc::c_long, &[i64])] = &[("minus_one", -1, &[])];
        assert_eq!(probe(true, negative)[0].1, libc::ENOSYS);
    }

    #[test]
    fn ordinary_work_runs() {
        let out = run(true, "sh", &["-c", "echo ok"]);
        assert_eq!(out.stdout, b"ok\n", "{}", show(&out));
        // Threads go through clone3 first in glibc, then fall back to clone.
        let script = "import threading, os, subprocess\n\
                      ts = [threading.Thread(target=os.getpid) for _ in range(4)]\n\
                      [t.start() for t in ts]\n\
                      [t.join() for t in ts]\n\
                      pid = os.fork()\n\
                      pid or os._exit(7)\n\
                      assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7\n\
                      print(subprocess.run(['echo', 'ok'], capture_output=True).stdout.decode(), end='')\n";
        let out = run(true, "python3", &["-c", script]);
        assert_eq!(out.stdout, b"ok\n", "{}", show(&out));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_c_compiler_works_and_int_0x80_is_killed() {
        if Command::new("cc").arg("--version").output().is_err() {
            eprintln!("SKIPPED: no cc");
            return;
        }
        let dir = std::env::temp_dir().join(format!("jusy-seccomp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("int80.c");
        // getpid (20) through the 32-bit entry point.
        std::fs::write(
            &src,
            "int main(void) { long r; __asm__ volatile(\"int $0x80\" : \"=a\"(r) : \"a\"(20L)); \
             return r > 0 ? 0 : 1; }\n",
        )
        .unwrap();
        let bin = dir.join("int80");
        let (src, bin) = (src.to_str().unwrap(), bin.to_str().unwrap());
        let out = run(true, "cc", &["-o", bin, src]);
        assert!(out.status.success(), "cc: {}", show(&out));
        let free = run(false, bin, &[]);
        let killed = run(true, bin, &[]);
        let _ = std::fs::remove_dir_all(&dir);
        use std::os::unix::process::ExitStatusExt;
        // The kernel may lack the 32-bit ABI; then the call fails but nothing dies.
        assert_eq!(free.status.signal(), None, "precondition: {}", show(&free));
        assert_eq!(
            killed.status.signal(),
            Some(libc::SIGSYS),
            "{}",
            show(&killed)
        );
    }
}
