//! Harness for the fault tests: daemons started inside a private mount namespace (where bpffs
//! or cgroup2 can be missing or read-only without touching the host), daemons killed at chosen
//! moments, and a stop file that ends a looping probe even when an assertion fails first.

use std::{
    fs::File,
    io,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
};

use crate::{Daemon, TestCgroup, cgroup_temp_file, portguard_bin};

/// What a [`MountNamespace`] changes in its private copy of the host's mounts.
#[derive(Clone, Debug)]
pub enum NamespaceFault {
    /// /sys/fs/bpf unmounted: the daemon must mount bpffs itself.
    NoBpffs,
    /// The cgroup2 file system unmounted: no cgroup v2 to attach to.
    NoCgroup2(PathBuf),
    /// The cgroup2 mount made read-only (a read-only bind remount of it).
    ReadOnlyCgroup2(PathBuf),
}

/// A private mount namespace kept alive by a sleeping child, which daemons and commands join.
/// Its mounts, and the pins in a bpffs mounted there, vanish with it on drop.
pub struct MountNamespace {
    holder: Child,
    ns: File,
    /// Whether processes entering it are denied mount(2), as a service manager's syscall filter
    /// would deny it.
    deny_mount: bool,
}

impl MountNamespace {
    pub fn new(fault: NamespaceFault) -> Self {
        let mut command = Command::new("sleep");
        command.arg("600");
        // SAFETY: between fork and exec only async-signal-safe calls (unshare, mount, umount2)
        // on data prepared before the fork.
        unsafe {
            let target = match &fault {
                NamespaceFault::NoBpffs => c_path(Path::new("/sys/fs/bpf")),
                NamespaceFault::NoCgroup2(p) | NamespaceFault::ReadOnlyCgroup2(p) => c_path(p),
            };
            command.pre_exec(move || {
                check(libc::unshare(libc::CLONE_NEWNS))?;
                // Nothing done here may reach the host's mounts.
                check(libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                match &fault {
                    NamespaceFault::NoBpffs | NamespaceFault::NoCgroup2(_) => {
                        check(libc::umount2(target.as_ptr(), libc::MNT_DETACH))
                    }
                    NamespaceFault::ReadOnlyCgroup2(_) => check(libc::mount(
                        std::ptr::null(),
                        target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                        std::ptr::null(),
                    )),
                }
            });
        }
        let holder = command
            .stdin(Stdio::null())
            .spawn()
            .expect("start the namespace holder");
        let path = format!("/proc/{}/ns/mnt", holder.id());
        // The child unshares before exec: wait until its namespace differs from ours.
        let ours = std::fs::read_link("/proc/self/ns/mnt").expect("own mount namespace");
        let start = std::time::Instant::now();
        while std::fs::read_link(&path).ok().as_ref() == Some(&ours)
            || std::fs::read_link(&path).is_err()
        {
            assert!(
                start.elapsed().as_secs() < 5,
                "the namespace holder never unshared"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // Wait for exec too, so the mounts are all done.
        while std::fs::read_to_string(format!("/proc/{}/comm", holder.id()))
            .is_ok_and(|comm| comm.trim() != "sleep")
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let ns = File::open(&path).expect("open the mount namespace");
        Self {
            holder,
            ns,
            deny_mount: false,
        }
    }

    /// Makes mount(2) fail with EPERM for every process that enters the namespace from now on.
    pub fn denying_mount(mut self) -> Self {
        self.deny_mount = true;
        self
    }

    /// The namespace's mount table.
    pub fn mountinfo(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/mountinfo", self.holder.id()))
            .expect("read the namespace's mountinfo")
    }

    /// Makes `command` run inside this namespace.
    pub fn enter(&self, command: &mut Command) {
        let fd = self.ns.as_raw_fd();
        let deny_mount = self.deny_mount;
        // SAFETY: setns and prctl are async-signal-safe; the fd stays open in the child until
        // exec, and the filter is built before the fork.
        unsafe {
            let filter = deny_mount_filter();
            command.pre_exec(move || {
                check(libc::setns(fd, libc::CLONE_NEWNS))?;
                if deny_mount {
                    let program = libc::sock_fprog {
                        len: filter.len() as u16,
                        filter: filter.as_ptr().cast_mut(),
                    };
                    check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
                    check(libc::prctl(
                        libc::PR_SET_SECCOMP,
                        libc::SECCOMP_MODE_FILTER,
                        &raw const program,
                    ))?;
                }
                Ok(())
            });
        }
    }

    /// Runs `portguard ARGS` inside the namespace.
    pub fn portguard(&self, args: &[&str]) -> Output {
        let mut command = Command::new(portguard_bin());
        command.args(args);
        self.enter(&mut command);
        command.output().expect("run portguard in the namespace")
    }
}

impl Drop for MountNamespace {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// A seccomp filter (classic BPF over `struct seccomp_data`) that fails mount(2) with EPERM and
/// allows everything else.
fn deny_mount_filter() -> Vec<libc::sock_filter> {
    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xc000_003e;
    #[cfg(target_arch = "aarch64")]
    const AUDIT_ARCH: u32 = 0xc000_00b7;
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    const LOAD_WORD: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JUMP_IF_EQUAL: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RETURN: u16 = 0x06; // BPF_RET | BPF_K
    vec![
        op(LOAD_WORD, 0, 0, 4), // seccomp_data.arch
        op(JUMP_IF_EQUAL, 0, 3, AUDIT_ARCH),
        op(LOAD_WORD, 0, 0, 0), // seccomp_data.nr
        op(JUMP_IF_EQUAL, 0, 1, libc::SYS_mount as u32),
        op(RETURN, 0, 0, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        op(RETURN, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
}

fn c_path(path: &Path) -> std::ffi::CString {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path without NUL")
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Starts `portguard daemon` like [`Daemon::spawn`], inside `ns` when given, without waiting.
pub fn spawn_daemon(
    cgroup: &TestCgroup,
    policy: &str,
    extra: &[&str],
    ns: Option<&MountNamespace>,
) -> Daemon {
    spawn_daemon_logging(cgroup, policy, extra, ns, "debug,aya=warn,aya_obj=warn")
}

/// [`spawn_daemon`] with `RUST_LOG=rust_log`: at `info` the daemon logs no allowed or steered
/// event, as in production, which keeps a debug build of it from spending a load test logging.
pub fn spawn_daemon_logging(
    cgroup: &TestCgroup,
    policy: &str,
    extra: &[&str],
    ns: Option<&MountNamespace>,
    rust_log: &str,
) -> Daemon {
    let policy_path = cgroup_temp_file(cgroup, "policy.toml");
    std::fs::write(&policy_path, policy).expect("write policy");
    let log = cgroup_temp_file(cgroup, "daemon.log");
    let log_file = File::create(&log).expect("create daemon log");
    let socket = cgroup_temp_file(cgroup, "control.sock");
    let mut command = Command::new(portguard_bin());
    command
        .arg("daemon")
        .arg("--policy")
        .arg(&policy_path)
        .arg("--socket")
        .arg(&socket);
    // A test may name its own attach point and pin directory.
    if !extra.contains(&"--cgroup") {
        command.arg("--cgroup").arg(&cgroup.root);
    }
    if !extra.contains(&"--pin-path") {
        command.arg("--pin-path").arg(cgroup.pin_path());
    }
    command
        .args(extra)
        .env("RUST_LOG", rust_log)
        .stdout(Stdio::null())
        .stderr(log_file);
    if let Some(ns) = ns {
        ns.enter(&mut command);
    }
    let child = command.spawn().expect("spawn portguard daemon");
    Daemon {
        child: Some(child),
        log,
        socket,
        policy: policy_path,
    }
}

/// The daemon's process id.
pub fn pid(daemon: &Daemon) -> u32 {
    daemon.child.as_ref().expect("daemon running").id()
}

/// Whether the daemon process has exited (and reaps it).
pub fn exited(daemon: &mut Daemon) -> bool {
    daemon
        .child
        .as_mut()
        .is_some_and(|child| child.try_wait().ok().flatten().is_some())
}

/// Kills the daemon with SIGKILL and reaps it; returns its log so far.
pub fn kill9(daemon: Daemon) -> String {
    daemon.signal(libc::SIGKILL);
    let (_, log) = daemon.wait_exit(std::time::Duration::from_secs(10));
    log
}

/// A file whose existence stops `*-until` probes; created on drop, so a failing assertion never
/// leaves a probe looping.
pub struct StopFile(pub PathBuf);

impl StopFile {
    pub fn new(cgroup: &TestCgroup, name: &str) -> Self {
        let path = cgroup_temp_file(cgroup, name);
        let _ = std::fs::remove_file(&path);
        Self(path)
    }
    pub fn arg(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }
    pub fn stop(&self) {
        std::fs::write(&self.0, b"").expect("create stop file");
    }
}

impl Drop for StopFile {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, b"");
        // Probes poll for it; give them a moment before the file goes.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The names in the pin directory (empty when it does not exist).
pub fn pins(cgroup: &TestCgroup) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cgroup.pin_path())
        .map(|dir| {
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Whether net.ipv4.ip_local_reserved_ports holds any port of `lo..=hi`.
pub fn reserved_any(lo: u16, hi: u16) -> bool {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports")
        .expect("read ip_local_reserved_ports");
    text.trim()
        .split(',')
        .filter(|part| !part.is_empty())
        .any(|part| {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let (a, b): (u16, u16) = (a.parse().expect("port"), b.parse().expect("port"));
            a <= hi && lo <= b
        })
}

/// A TCP listener and a UDP socket on 127.0.0.1:`port`, in the test process (outside every test
/// cgroup), for probes to connect to. The listener accepts and drops connections in the
/// background, so any number of connects can be made.
pub struct LoopbackPeer {
    pub port: u16,
    _udp: std::net::UdpSocket,
}

impl LoopbackPeer {
    pub fn new(port: u16) -> Self {
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("listen on 127.0.0.1:{port}: {e}"));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("bind udp 127.0.0.1:{port}: {e}"));
        // Lives as long as the test process: accepted connections are closed at once.
        std::thread::spawn(move || {
            for stream in tcp.incoming() {
                drop(stream);
            }
        });
        Self { port, _udp: udp }
    }

    pub fn arg(&self) -> String {
        self.port.to_string()
    }
}
