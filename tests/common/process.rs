//! The `sensorgate` binary run as a child process on a config file, as a service manager
//! runs it, for tests of what only a process shows: signals, readiness, power cuts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::BIN;

/// Writes `dir/config.toml`: listening on `127.0.0.1:0`, data in `dir/data`, then `rest`,
/// which may go on with the `[storage]` table. Returns its path.
pub fn write_config(dir: &Path, rest: &str) -> PathBuf {
    let path = dir.join("config.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\ndata_dir = {:?}\n{rest}",
        dir.join("data").display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A running `sensorgate --config FILE`, its log in a file; killed if it still runs when
/// dropped.
pub struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts the daemon on `config` with `env` added, logging at `info` into `log`.
    pub fn start(config: &Path, log: &Path, env: &[(&str, &std::ffi::OsStr)]) -> Process {
        let child = Command::new(BIN)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        Process {
            child,
            log: log.to_owned(),
        }
    }

    /// Sends the signal `name` (`TERM`, `HUP`, `KILL`...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the daemon to exit, 15 s at the most.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ends the daemon at once, as a power cut does, and reaps it.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (10 s at the most) until the log has a line containing `text`.
    pub fn wait_for_log(&self, text: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.log().contains(text) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The address the daemon logs once it listens, waiting for it as for
    /// [`Process::wait_for_log`].
    pub fn address(&self) -> Option<String> {
        self.wait_for_log("listening on http://");
        self.log()
            .lines()
            .find_map(|l| l.split("listening on http://").nth(1))
            .map(|a| a.trim_end_matches('/').to_owned())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
