//! What `deploy/` ships: the systemd units pass `systemd-analyze verify`
//! with the binaries where they name them, and their command lines are ones
//! the binaries accept.

// Test code: a panic is how a check fails.
#![allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use jusy_tests::process::bin;

const UNITS: [(&str, &str); 2] = [
    ("jusy-node.service", "jusy-node"),
    ("jusy-broker.service", "jusy-broker"),
];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd")
}

/// The unit with its binary's install path replaced by the built one.
fn unit_for_test(unit: &str, binary: &str) -> String {
    let text = std::fs::read_to_string(deploy_dir().join(unit)).expect("unit");
    let built = bin(binary).expect("built binary");
    text.replace(
        &format!("/usr/local/bin/{binary}"),
        &built.display().to_string(),
    )
}

/// `systemd-analyze verify` on `units` in a fresh directory: whether it
/// passed, and what it said.
fn verify(units: &[(&str, String)]) -> (bool, String) {
    let dir = tempdir();
    let mut cmd = Command::new("systemd-analyze");
    cmd.arg("verify");
    for (name, text) in units {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write unit");
        cmd.arg(&path);
    }
    let out = cmd.output().expect("systemd-analyze runs");
    let _ = std::fs::remove_dir_all(&dir);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "jusy-units-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn have_systemd_analyze(test: &str) -> bool {
    let ok = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        jusy_tests::skip(test, "needs systemd-analyze (Debian's systemd package)");
    }
    ok
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    if !have_systemd_analyze("the_units_pass_systemd_analyze_verify") {
        return;
    }
    // The check can fail: a unit with an unknown option and a missing
    // binary does.
    let (ok, said) = verify(&[(
        "broken.service",
        "[Service]\nExecStart=/nonexistent/jusy\nNoSuchOption=1\n".to_owned(),
    )]);
    assert!(!ok && said.contains("NoSuchOption"), "{said}");

    let units: Vec<(&str, String)> = UNITS
        .iter()
        .map(|(unit, binary)| (*unit, unit_for_test(unit, binary)))
        .collect();
    let (ok, said) = verify(&units);
    assert!(ok, "systemd-analyze verify failed: {said}");
    assert!(said.trim().is_empty(), "warnings: {said}");
}

#[test]
fn the_units_command_lines_are_accepted_by_the_binaries() {
    for (unit, binary) in UNITS {
        let text = unit_for_test(unit, binary);
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("ExecStart");
        let mut words = exec.split_whitespace();
        let program = words.next().expect("program");
        let args: Vec<String> = words
            .map(|w| w.replace("${CREDENTIALS_DIRECTORY}", "/run/credentials/x"))
            .collect();
        // Every flag is known: clap refuses an unknown one before it gets to
        // `--help`.
        let out = Command::new(program)
            .args(&args)
            .arg("--help")
            .output()
            .expect("binary runs");
        assert!(
            out.status.success(),
            "{unit}: {exec} is refused: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let refused = Command::new(program)
            .args(&args)
            .arg("--no-such-flag")
            .arg("--help")
            .output()
            .expect("binary runs");
        assert!(!refused.status.success(), "{unit}: unknown flags pass");
    }
    // The node's state and the configuration are private.
    let node = std::fs::read_to_string(deploy_dir().join("jusy-node.service")).expect("unit");
    for line in ["Delegate=yes", "StateDirectoryMode=0700", "UMask=0077"] {
        assert!(
            node.lines().any(|l| l == line),
            "the node's unit lacks {line}"
        );
    }
}

/// Every line of a log file is a JSON object with a level and fields.
fn json_lines(path: &Path) -> anyhow::Result<usize> {
    let text = std::fs::read_to_string(path)?;
    let mut n = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{}: not JSON ({e}): {line}", path.display()))?;
        anyhow::ensure!(
            v["level"].is_string() && v["fields"].is_object() && v["timestamp"].is_string(),
            "{}: not a log object: {line}",
            path.display()
        );
        n += 1;
    }
    Ok(n)
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    if !jusy_tests::require_root("log_format_json_writes_one_object_per_line") {
        return;
    }
    jusy_tests::e2e("log_format_json", |scene| {
        let data = scene.subdir("broker")?;
        let broker =
            jusy_tests::Broker::start_with(scene, "broker", data, 0, &["--log-format", "json"])?;
        let _node = jusy_tests::Node::start(
            scene,
            "node",
            &broker,
            &["--ready-slots", "1", "--log-format", "json"],
        )?;
        broker.wait_capacity(scene, 1)?;
        for name in ["broker", "node"] {
            let lines = json_lines(&scene.dir().join(format!("{name}.err")))?;
            anyhow::ensure!(lines > 0, "{name} logged nothing");
        }
        Ok(())
    });
}
