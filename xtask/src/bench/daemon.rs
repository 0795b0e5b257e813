//! The release daemon as the benchmark runs it: attached at a private cgroup, with its own pin
//! directory and control socket, stopped and uninstalled afterwards; and the private cgroups.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// A daemon's log lines, each with the moment it was read.
pub type LogLines = mpsc::Receiver<(Instant, String)>;

/// A running daemon. Dropping it sends SIGTERM; `stop` also removes what it left pinned.
pub struct Daemon {
    child: Child,
    stopped: bool,
    pub socket: PathBuf,
    policy_file: PathBuf,
    pins: PathBuf,
    portguard: PathBuf,
}

impl Daemon {
    /// Starts the release daemon attached at `attach` with `policy`, named `name` (its pin
    /// directory, socket and policy file), and waits for `ready`. Returns it and its log lines as
    /// they arrive.
    pub fn start(
        bins: &Path,
        attach: &Path,
        name: &str,
        policy: &str,
    ) -> anyhow::Result<(Self, LogLines)> {
        let socket = std::env::temp_dir().join(format!("{name}.sock"));
        let policy_file = std::env::temp_dir().join(format!("{name}.toml"));
        let pins = PathBuf::from("/sys/fs/bpf").join(name);
        fs::write(&policy_file, policy)?;
        let mut child = Command::new(bins.join("portguard"))
            .arg("daemon")
            .arg("--policy")
            .arg(&policy_file)
            .arg("--cgroup")
            .arg(attach)
            .arg("--socket")
            .arg(&socket)
            .arg("--pin-path")
            .arg(&pins)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the daemon")?;
        let stderr = child.stderr.take().context("daemon stderr")?;
        let daemon = Self {
            child,
            stopped: false,
            socket,
            policy_file,
            pins,
            portguard: bins.join("portguard"),
        };
        let (lines_tx, lines) = mpsc::channel();
        // Drains the log so the daemon never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if lines_tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        loop {
            let (_, line) = lines
                .recv_timeout(Duration::from_secs(30))
                .context("the daemon did not get `ready`")?;
            if line.ends_with("] ready") {
                return Ok((daemon, lines));
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `portguard status --json`.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        let status = Command::new(&self.portguard)
            .args(["status", "--json", "--socket"])
            .arg(&self.socket)
            .output()
            .context("asking the daemon for its status")?;
        if !status.status.success() {
            bail!("status failed: {}", String::from_utf8_lossy(&status.stderr));
        }
        Ok(serde_json::from_slice(&status.stdout)?)
    }

    /// Stops the daemon and removes the enforcement it leaves pinned.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stopped = true;
        self.terminate();
        let uninstall = Command::new(&self.portguard)
            .arg("uninstall")
            .arg("--pin-path")
            .arg(&self.pins)
            .output()
            .context("running portguard uninstall")?;
        if !uninstall.status.success() {
            bail!(
                "uninstall failed: {}",
                String::from_utf8_lossy(&uninstall.stderr)
            );
        }
        Ok(())
    }

    fn terminate(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.policy_file);
        let _ = fs::remove_file(&self.socket);
    }
}

impl Drop for Daemon {
    /// A daemon that did not get to `stop` (an error on the way) leaves no pins behind either.
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        self.terminate();
        let _ = Command::new(&self.portguard)
            .arg("uninstall")
            .arg("--pin-path")
            .arg(&self.pins)
            .output();
    }
}

/// A private cgroup under the cgroup2 root, removed with everything below it on drop.
pub struct BenchCgroup {
    pub path: PathBuf,
    /// Relative to the cgroup2 mount, as policies name it; also names the daemon's files.
    pub relative: String,
}

impl BenchCgroup {
    pub fn new(label: &str) -> anyhow::Result<Self> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
        let mount = mountinfo
            .lines()
            .find_map(|line| {
                let (mount, fs) = line.split_once(" - ")?;
                if fs.split_whitespace().next()? != "cgroup2" {
                    return None;
                }
                mount.split_whitespace().nth(4).map(PathBuf::from)
            })
            .context("no cgroup2 mount")?;
        let relative = format!("portguard-bench-{}-{label}", std::process::id());
        let path = mount.join(&relative);
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path, relative })
    }

    /// Creates the cgroup `child` (a relative path) below this one.
    pub fn child(&self, child: &str) -> anyhow::Result<PathBuf> {
        let path = self.path.join(child);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        remove_tree(&self.path);
    }
}

/// Removes a cgroup and its descendants, deepest first. Processes that just exited may linger
/// for a moment, so each removal is retried briefly.
fn remove_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    for _ in 0..50 {
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("xtask: could not remove {}", dir.display());
}

pub fn proc_status(pid: u32, key: &str) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}
