//! Harness for portguard's end-to-end tests: a private cgroup subtree, the real daemon attached
//! there, and probe processes placed in scope cgroups. Every guard cleans up on drop.

pub mod bad_policy;
pub mod bpf_query;
pub mod bpf_raw;
pub mod checks;
pub mod faults;
pub mod loopback;
pub mod reliability;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// Whether a privileged test may run. Without root it fails, unless PORTGUARD_SKIP_PRIVILEGED=1,
/// and then it says so on stdout and in the test name's output.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("PORTGUARD_SKIP_PRIVILEGED").as_deref() == Ok("1") {
        // Straight to the process's stderr: the test harness hides what a passing test prints.
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIPPED {test}: needs root (PORTGUARD_SKIP_PRIVILEGED=1)"
        );
        return false;
    }
    panic!(
        "{test} needs root to load eBPF programs and create cgroups; run as root, \
         or set PORTGUARD_SKIP_PRIVILEGED=1 to skip it on purpose"
    );
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_root() -> PathBuf {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    mountinfo
        .lines()
        .find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            if fs.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            mount.split_whitespace().nth(4).map(PathBuf::from)
        })
        .expect("a cgroup2 mount")
}

/// A private cgroup subtree under the cgroup2 root, removed (children first) on drop.
pub struct TestCgroup {
    pub root: PathBuf,
    /// Path of `root` relative to the cgroup2 mount, as policies name it.
    pub relative: String,
    mount: PathBuf,
}

impl TestCgroup {
    pub fn new(test: &str) -> Self {
        static SEQUENCE: AtomicU32 = AtomicU32::new(0);
        let mount = cgroup2_root();
        let relative = format!(
            "portguard-test-{}-{}-{test}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        );
        let root = mount.join(&relative);
        fs::create_dir(&root).expect("create test cgroup");
        Self {
            root,
            relative,
            mount,
        }
    }

    /// Creates `name` (may be nested: "a/b") and returns its directory.
    pub fn child(&self, name: &str) -> PathBuf {
        let dir = self.root.join(name);
        fs::create_dir_all(&dir).expect("create child cgroup");
        dir
    }

    /// A child's path relative to the cgroup2 root.
    pub fn rel(&self, name: &str) -> String {
        format!("{}/{name}", self.relative)
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }
}

impl TestCgroup {
    /// The bpffs directory for this test's daemons.
    pub fn pin_path(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(&self.relative)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Daemons keep enforcement pinned after they stop: remove it with the test's cgroups.
        if self.pin_path().exists() {
            let _ = Command::new(portguard_bin())
                .arg("uninstall")
                .arg("--pin-path")
                .arg(self.pin_path())
                .output();
        }
        remove_cgroup_tree(&self.root);
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    // Probes exit before this runs; a cgroup emptied a moment ago may still be busy briefly.
    for _ in 0..50 {
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    eprintln!("warning: could not remove test cgroup {}", dir.display());
}

/// The portguard binary under test: $PORTGUARD_BIN, else target/debug/portguard.
pub fn portguard_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("PORTGUARD_BIN") {
        return PathBuf::from(path);
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/portguard");
    assert!(
        path.exists(),
        "{} does not exist: build it first (cargo xtask test does), or set PORTGUARD_BIN",
        path.display()
    );
    path
}

/// A running `portguard daemon`, stopped with SIGTERM on drop.
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
    socket: PathBuf,
    policy: PathBuf,
}

impl Daemon {
    /// Starts the daemon on `policy` attached at `cgroup`, and waits for `ready`.
    pub fn start(cgroup: &TestCgroup, policy: &str) -> Self {
        let mut daemon = Self::spawn(cgroup, policy, &[]);
        daemon.wait_for_log("ready", Duration::from_secs(30));
        daemon
    }

    /// Starts the daemon without waiting; for tests of refusals.
    pub fn spawn(cgroup: &TestCgroup, policy: &str, extra: &[&str]) -> Self {
        Self::spawn_with_env(cgroup, policy, extra, &[])
    }

    /// Like [`Daemon::spawn`], with extra environment variables.
    pub fn spawn_with_env(
        cgroup: &TestCgroup,
        policy: &str,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> Self {
        let policy_path = cgroup_temp_file(cgroup, "policy.toml");
        fs::write(&policy_path, policy).expect("write policy");
        let log = cgroup_temp_file(cgroup, "daemon.log");
        let log_file = fs::File::create(&log).expect("create daemon log");
        let socket = cgroup_temp_file(cgroup, "control.sock");
        let child = Command::new(portguard_bin())
            .arg("daemon")
            .arg("--policy")
            .arg(&policy_path)
            .arg("--cgroup")
            .arg(&cgroup.root)
            .arg("--socket")
            .arg(&socket)
            .arg("--pin-path")
            .arg(cgroup.pin_path())
            .args(extra)
            .env("RUST_LOG", "debug,aya=warn,aya_obj=warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn portguard daemon");
        Self {
            child: Some(child),
            log,
            socket,
            policy: policy_path,
        }
    }

    /// Replaces the daemon's policy file (the daemon reads it on reload).
    pub fn write_policy(&self, text: &str) {
        fs::write(&self.policy, text).expect("write policy");
    }

    pub fn policy_path(&self) -> &Path {
        &self.policy
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: i32) {
        let pid = self.child.as_ref().expect("daemon running").id();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid as i32, signal) };
    }

    /// The daemon's control socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Runs `portguard ARGS --socket <this daemon's socket>` and returns its output.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(portguard_bin())
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .expect("run portguard")
    }

    /// `portguard status --json`, parsed.
    pub fn status(&self) -> Value {
        let output = self.cli(&["status", "--json"]);
        assert!(
            output.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("status JSON")
    }

    /// `portguard events --json`, parsed.
    pub fn events(&self) -> Vec<Value> {
        let output = self.cli(&["events", "--json"]);
        assert!(
            output.status.success(),
            "events failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| serde_json::from_str(line).expect("event JSON"))
            .collect()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until a log line contains `needle`, and returns that line.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(line) = self.log().lines().find(|line| line.contains(needle)) {
                return line.to_owned();
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "daemon exited ({status}) before logging `{needle}`:\n{}",
                    self.log()
                );
            }
            assert!(
                start.elapsed() < timeout,
                "daemon log has no `{needle}` after {timeout:?}:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM, waits, and returns the exit code and the whole log.
    pub fn stop(mut self) -> (Option<i32>, String) {
        let code = self.terminate();
        (code, self.log())
    }

    /// Waits for a daemon expected to exit on its own.
    pub fn wait_exit(mut self, timeout: Duration) -> (Option<i32>, String) {
        let child = self.child.as_mut().expect("daemon running");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait daemon") {
                self.child = None;
                return (status.code(), self.log());
            }
            assert!(
                start.elapsed() < timeout,
                "daemon did not exit:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait daemon") {
                return status.code();
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("daemon ignored SIGTERM for 10 s:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
    }
}

fn cgroup_temp_file(cgroup: &TestCgroup, name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{}-{name}", cgroup.relative))
}

/// The pg-probe binary, built beside the test binaries (target/<profile>/pg-probe).
fn probe_bin() -> PathBuf {
    test_bin("pg-probe")
}

/// A binary of this package, next to the test binaries' directory.
fn test_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary in target/<profile>/deps");
    dir.join(name)
}

/// Runs `pg-connect` (sockets of either family, shared-port connections) in cgroup `dir` and
/// returns its JSON result.
pub fn pg_connect(dir: &Path, args: &[&str]) -> Value {
    let output = Command::new(test_bin("pg-connect"))
        .arg(dir)
        .args(args)
        .output()
        .expect("run pg-connect");
    assert!(
        output.status.success(),
        "pg-connect {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("pg-connect JSON")
}

/// Polls `done` until it holds; fails the test after five seconds, naming `what`.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "timed out waiting for {what}"
        );
        thread::sleep(Duration::from_millis(2));
    }
}

/// A probe running in the background, for tests that look at the daemon while sockets are held.
pub struct RunningProbe {
    child: Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl RunningProbe {
    pub fn spawn(dir: &Path, ops: &[&str]) -> Self {
        let mut child = Command::new(probe_bin())
            .arg(dir)
            .args(ops)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn pg-probe");
        let stdout = std::io::BufReader::new(child.stdout.take().expect("probe stdout"));
        Self { child, stdout }
    }

    /// The next result line (blocks until the probe prints it).
    pub fn next_result(&mut self) -> Value {
        use std::io::BufRead as _;
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read probe output");
        assert!(!line.is_empty(), "probe ended early");
        serde_json::from_str(&line).expect("probe JSON")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the probe to exit.
    pub fn finish(mut self) {
        let status = self.child.wait().expect("wait probe");
        assert!(status.success(), "probe failed: {status}");
    }
}

/// Runs the probe in cgroup `dir` with `ops` and returns its JSON result lines.
pub fn probe(dir: &Path, ops: &[&str]) -> Vec<Value> {
    let output = Command::new(probe_bin())
        .arg(dir)
        .args(ops)
        .output()
        .expect("run pg-probe");
    assert!(
        output.status.success(),
        "pg-probe {ops:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("utf-8 output")
        .lines()
        .map(|line| serde_json::from_str(line).expect("probe JSON"))
        .collect()
}

/// A loopback TCP listener and UDP socket in the test process (outside every test cgroup, so
/// portguard never sees them) for probes to connect to.
pub struct Peers {
    pub tcp: std::net::TcpListener,
    pub udp: std::net::UdpSocket,
}

impl Peers {
    pub fn new() -> Self {
        Self {
            tcp: std::net::TcpListener::bind("127.0.0.1:0").expect("tcp listener"),
            udp: std::net::UdpSocket::bind("127.0.0.1:0").expect("udp socket"),
        }
    }
    pub fn tcp_port(&self) -> String {
        self.tcp.local_addr().expect("addr").port().to_string()
    }
    pub fn udp_port(&self) -> String {
        self.udp.local_addr().expect("addr").port().to_string()
    }
}

impl Default for Peers {
    fn default() -> Self {
        Self::new()
    }
}

pub const EPERM: i64 = libc::EPERM as i64;
pub const EADDRNOTAVAIL: i64 = libc::EADDRNOTAVAIL as i64;

/// The `port` field of a probe result.
pub fn port(result: &Value) -> u16 {
    result["port"].as_u64().expect("port field") as u16
}

pub fn errno(result: &Value) -> i64 {
    result["errno"].as_i64().expect("errno field")
}
