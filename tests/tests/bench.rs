//! The benchmark command runs end to end on tiny sizes. It checks that the
//! bench works, never how fast anything is (numbers are for BENCHMARKS.md).

use std::process::Command;

#[test]
fn bench_runs_on_a_tiny_size() {
    if !jusy_tests::require_root("bench_runs_on_a_tiny_size") {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--quick", "--no-install", "--no-out"])
        .output()
        .expect("starting the bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("| `ssh … true`, ms |"), "{stdout}");
    assert!(stdout.contains("| SSH download `ssh"), "{stdout}");
    assert!(
        stdout.contains("## Relay with 4 active sessions"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| API orders under slowloris |"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| bulk from session to lab sshd |"),
        "{stdout}"
    );
}
