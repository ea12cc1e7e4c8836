//! One test's scene: a fresh directory for its state and logs, and a report of
//! every log when the test fails.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Directory and log registry of one test (see [`e2e`]).
#[derive(Debug)]
pub struct Scene {
    name: String,
    dir: PathBuf,
    logs: Arc<Mutex<Vec<PathBuf>>>,
}

impl Scene {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let mut r = [0u8; 4];
        getrandom::fill(&mut r)?;
        let dir = std::env::temp_dir().join("jusy-e2e").join(format!(
            "{name}-{}-{}",
            std::process::id(),
            hex::encode(r)
        ));
        std::fs::create_dir_all(&dir)?;
        let scene = Self {
            name: name.to_owned(),
            dir,
            logs: Arc::default(),
        };
        scene.note(&format!("scene {name} in {}", scene.dir.display()));
        Ok(scene)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A fresh subdirectory.
    pub fn subdir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let d = self.dir.join(name);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    /// Registers a log file to print if the test fails.
    pub fn add_log(&self, path: PathBuf) {
        self.logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(path);
    }

    /// Appends a line to the scene's own log (commands run and their results).
    pub fn note(&self, line: &str) {
        use std::io::Write;
        let path = self.dir.join("scene.log");
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            let _ = writeln!(f, "{line}");
        }
        let mut logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        if !logs.contains(&path) {
            logs.insert(0, path);
        }
    }
}

impl Scene {
    /// Prints every registered log to stderr.
    pub fn report(&self) {
        let logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        eprintln!(
            "\n===== {} failed; logs kept in {} =====",
            self.name,
            self.dir.display()
        );
        for path in logs.iter() {
            let text =
                std::fs::read_to_string(path).unwrap_or_else(|e| format!("(unreadable: {e})"));
            eprintln!("----- {} -----\n{text}", path.display());
        }
        eprintln!("===== end of logs of {} =====", self.name);
    }
}

/// Runs one end-to-end test in a fresh scene. Processes started inside `test`
/// are stopped when it returns or panics; then, if it failed, every log is
/// printed and the test fails; if it passed, its directory is removed.
pub fn e2e(name: &str, test: impl FnOnce(&Scene) -> anyhow::Result<()>) {
    if !crate::require_root(name) {
        return;
    }
    let scene = match Scene::new(name) {
        Ok(s) => s,
        Err(e) => panic!("{name}: cannot make a scene: {e:#}"),
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| test(&scene)));
    match outcome {
        Ok(Ok(())) => {
            if std::env::var_os("JUSY_E2E_LOGS").is_some() {
                scene.report();
            }
            let _ = std::fs::remove_dir_all(&scene.dir);
        }
        Ok(Err(e)) => {
            scene.report();
            panic!("{name} failed: {e:?}");
        }
        Err(panic) => {
            scene.report();
            std::panic::resume_unwind(panic);
        }
    }
}

/// A test's data directory under /var/lib, where a real node keeps its data:
/// sessions get private copies of the world-writable directories (/tmp among
/// them), so a data directory under the scene's /tmp directory would hide
/// homes from their own sessions' view of the paths. Removed when dropped,
/// unless something is still mounted in it. Not made here: the node or the
/// test makes it.
#[derive(Debug)]
pub struct DataDir(PathBuf);

impl DataDir {
    pub fn new(scene: &Scene) -> anyhow::Result<Self> {
        let name = scene.dir().file_name().and_then(|n| n.to_str());
        Ok(Self(PathBuf::from(format!(
            "/var/lib/jusy-e2e-{}",
            name.unwrap_or("scene")
        ))))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let busy = mounts.lines().any(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|m| Path::new(m).starts_with(&self.0))
        });
        if busy {
            eprintln!("{} kept: still mounted in", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
