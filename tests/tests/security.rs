//! The daemon's security: it drops every capability once enforcement is live (and still
//! follows cgroups, reloads and writes the reserved-ports sysctl), its control socket refuses
//! other users unless they are in the configured group, limits request size, request rate and
//! clients, and a symlink or unsafe directory where the socket goes refuses the start before
//! anything is loaded.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::{
        fd::AsRawFd as _,
        unix::{
            fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
            net::UnixStream,
            process::CommandExt as _,
        },
    },
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use portguard_tests::{
    Daemon, Peers, TestCgroup, bad_policy::run_bounded, bpf_query::portguard_programs, port,
    portguard_bin, privileged, probe, reliability, wait_until,
};
use serde_json::Value;

const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The pid of the process serving `socket` (SO_PEERCRED).
fn daemon_pid(socket: &Path) -> u32 {
    let stream = UnixStream::connect(socket).expect("connect to the control socket");
    let mut credentials = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: a valid socket and a ucred-sized buffer.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut credentials).cast(),
            &mut len,
        )
    };
    assert_eq!(ret, 0, "SO_PEERCRED: {}", std::io::Error::last_os_error());
    credentials.pid as u32
}

/// `Name:\tvalue` lines of /proc/PID/task/TID/status for every thread of `pid`.
fn thread_status(pid: u32) -> Vec<Vec<(String, String)>> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).expect("daemon threads");
    tasks
        .map(|task| {
            let status = fs::read_to_string(task.expect("task").path().join("status"))
                .expect("read thread status");
            status
                .lines()
                .filter_map(|line| line.split_once(':'))
                .map(|(key, value)| (key.to_owned(), value.trim().to_owned()))
                .collect()
        })
        .collect()
}

fn assert_no_capabilities(pid: u32, when: &str) {
    for status in thread_status(pid) {
        let field = |name: &str| {
            status
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.as_str())
                .unwrap_or_else(|| panic!("no {name} in the daemon's status"))
        };
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(
                field(set),
                "0000000000000000",
                "{when}: thread {} still has {set}",
                field("Pid")
            );
        }
        assert_eq!(field("NoNewPrivs"), "1", "{when}: no_new_privs not set");
        assert_eq!(field("Uid").split_whitespace().next(), Some("0"));
    }
}

/// Whether `port` is in `net.ipv4.ip_local_reserved_ports` ("1,10300-10399,...").
fn reserved(port: u16) -> bool {
    let text = fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports").expect("sysctl");
    text.trim()
        .split(',')
        .filter(|s| !s.is_empty())
        .any(|item| {
            let (lo, hi) = item.split_once('-').unwrap_or((item, item));
            let (lo, hi): (u16, u16) = (lo.parse().expect("port"), hi.parse().expect("port"));
            (lo..=hi).contains(&port)
        })
}

#[test]
fn daemon_drops_every_capability_and_still_follows_cgroups_and_reloads() {
    if !privileged("daemon_drops_every_capability_and_still_follows_cgroups_and_reloads") {
        return;
    }
    let cgroup = TestCgroup::new("caps");
    cgroup.child("pods");
    // reserve = true (the default): the daemon must still write the sysctl without capabilities.
    let policy = |web: &str| {
        format!(
            "[[scope]]\nname = \"web\"\ncgroup = \"{}\"\nephemeral = \"{web}\"\n\
             [[scope]]\nname = \"pods\"\ncgroup = \"{}/*\"\npool = \"10400-10599\"\nblock = 100\n",
            cgroup.rel("web"),
            cgroup.rel("pods")
        )
    };
    let daemon = Daemon::start(&cgroup, &policy("10300-10399"));
    let pid = daemon_pid(daemon.socket());
    assert_no_capabilities(pid, "after ready");
    assert!(
        daemon.log().contains(
            "dropped every capability (effective, permitted, inheritable, ambient, bounding); no_new_privs set"
        ),
        "{}",
        daemon.log()
    );
    assert!(
        reserved(10300) && reserved(10599),
        "ranges reserved at start"
    );

    // A scope cgroup and a pool cgroup created now: map entries, a pool block, counters reset
    // through the pinned maps, all without capabilities.
    let peers = Peers::new();
    let web = cgroup.child("web");
    let pod = cgroup.child("pods/a");
    let active = |name: &str| {
        daemon.status()["scopes"]
            .as_array()
            .expect("scopes")
            .iter()
            .any(|scope| scope["name"] == name && scope["active"] == true)
    };
    wait_until("web to be followed", || active("web"));
    wait_until("the pod to get a block", || active("pods"));
    let got = port(&probe(&web, &["connect", "tcp", &peers.tcp_port()])[0]);
    assert!((10300..=10399).contains(&got), "web connect got {got}");
    let got = port(&probe(&pod, &["connect", "tcp", &peers.tcp_port()])[0]);
    assert!((10400..=10599).contains(&got), "pod connect got {got}");

    // A reload moves web's range: maps and the sysctl are rewritten.
    daemon.write_policy(&policy("10600-10699"));
    let out = daemon.cli(&["reload"]);
    assert!(out.status.success(), "reload: {}", text(&out.stderr));
    let got = port(&probe(&web, &["connect", "tcp", &peers.tcp_port()])[0]);
    assert!(
        (10600..=10699).contains(&got),
        "web connect after reload got {got}"
    );
    assert!(
        reserved(10600) && reserved(10699) && !reserved(10300),
        "the sysctl follows the reload"
    );
    assert_no_capabilities(pid, "after following cgroups and a reload");

    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains(" ERROR "), "{log}");
    reliability::record(
        "security-capabilities",
        &[
            "capabilities: after `ready` every thread of the daemon has empty CapInh, CapPrm, \
           CapEff, CapBnd and CapAmb and NoNewPrivs 1 (read from /proc); it then followed a new \
           scope cgroup and a new pool cgroup, reloaded and rewrote ip_local_reserved_ports \
           with none"
                .to_owned(),
        ],
    );
}

/// Runs `portguard ARGS --socket SOCKET` as `uid` with primary group `gid` and supplementary
/// `groups`.
fn portguard_as(
    uid: u32,
    gid: u32,
    groups: &[u32],
    args: &[&str],
    socket: &Path,
) -> (i32, String, String) {
    let groups: Vec<libc::gid_t> = groups.to_vec();
    let mut command = Command::new(portguard_bin());
    command.args(args).arg("--socket").arg(socket);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = run_bounded(&mut command, Duration::from_secs(20));
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

#[test]
fn control_socket_refuses_other_users_unless_in_the_group() {
    if !privileged("control_socket_refuses_other_users_unless_in_the_group") {
        return;
    }
    let cgroup = TestCgroup::new("peers");
    let policy = "reserve = false\n";
    let daemon = Daemon::start(&cgroup, policy);
    let metadata = fs::metadata(daemon.socket()).expect("socket");
    assert!(metadata.file_type().is_socket());
    assert_eq!(
        (metadata.uid(), metadata.permissions().mode() & 0o777),
        (0, 0o600)
    );
    let (code, _, stderr) = portguard_as(NOBODY, NOGROUP, &[], &["status"], daemon.socket());
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");

    let grouped = TestCgroup::new("peers-group");
    let mut daemon = Daemon::spawn(&grouped, policy, &["--socket-group", "nogroup"]);
    daemon.wait_for_log("ready", Duration::from_secs(30));
    let metadata = fs::metadata(daemon.socket()).expect("socket");
    assert_eq!(
        (
            metadata.uid(),
            metadata.gid(),
            metadata.permissions().mode() & 0o777
        ),
        (0, NOGROUP, 0o660)
    );
    // The group, as primary group: served, but not allowed to reload.
    let (code, stdout, stderr) =
        portguard_as(NOBODY, NOGROUP, &[], &["status", "--json"], daemon.socket());
    assert_eq!(code, 0, "{stderr}");
    let status: Value = serde_json::from_str(&stdout).expect("status JSON");
    assert_eq!(status["version"], 1);
    let (code, _, stderr) = portguard_as(NOBODY, NOGROUP, &[], &["reload"], daemon.socket());
    assert_eq!(code, 1);
    assert!(
        stderr.contains("permission denied: only root may reload the policy"),
        "{stderr}"
    );
    // In the group only as a supplementary group: the file mode lets it connect, the daemon's
    // SO_PEERCRED check refuses it.
    let (code, _, stderr) = portguard_as(NOBODY, 12345, &[NOGROUP], &["status"], daemon.socket());
    assert_eq!(code, 1);
    assert!(
        stderr.contains(
            "permission denied: the portguard control socket serves root and its configured group only"
        ),
        "{stderr}"
    );
    daemon.wait_for_log("refused client uid 65534 gid 12345", Duration::from_secs(5));
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");
    reliability::record(
        "security-peers",
        &[
            "control socket peers: uid 65534 cannot connect to the 0600 socket; with \
           `--socket-group nogroup` it is served status as its primary group but refused reload, \
           and refused outright (SO_PEERCRED) with nogroup only as a supplementary group"
                .to_owned(),
        ],
    );
}

/// Sends `bytes` on a new connection and returns every response line until the daemon hangs
/// up (or `until` lines arrived).
fn exchange(socket: &Path, bytes: &[u8], until: usize) -> Vec<Value> {
    let mut stream = UnixStream::connect(socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream.write_all(bytes).expect("send");
    let mut lines = vec![];
    let mut reader = BufReader::new(stream);
    while lines.len() < until {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            // A hang-up with part of our request unread reaches us as a reset.
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(error) => panic!("reading a response: {error}"),
        }
        lines.push(serde_json::from_str(&line).expect("response JSON"));
    }
    lines
}

#[test]
fn control_socket_limits_request_size_rate_and_clients() {
    if !privileged("control_socket_limits_request_size_rate_and_clients") {
        return;
    }
    let cgroup = TestCgroup::new("limits");
    let mut daemon = Daemon::start(&cgroup, "reserve = false\n");
    let socket = daemon.socket().to_owned();
    const MAX: usize = 64 * 1024;
    const STATUS: &str = "{\"version\":1,\"command\":\"status\"}";

    // Just under the limit (JSON may start with blanks): served.
    let mut line = " ".repeat(MAX - STATUS.len() - 1).into_bytes();
    line.extend_from_slice(STATUS.as_bytes());
    line.push(b'\n');
    assert_eq!(line.len(), MAX);
    let answer = exchange(&socket, &line, 1);
    assert_eq!(answer[0]["ok"], true, "{}", answer[0]);
    // One byte over: one error, then the daemon hangs up.
    let mut line = " ".repeat(MAX - STATUS.len()).into_bytes();
    line.extend_from_slice(STATUS.as_bytes());
    line.push(b'\n');
    let answer = exchange(&socket, &line, usize::MAX);
    assert_eq!(answer.len(), 1, "{answer:?}");
    assert_eq!(answer[0]["ok"], false);
    assert_eq!(answer[0]["error"], "request longer than 65536 bytes");

    // 300 requests at once on one connection: the burst is served, then one error and a
    // hang-up.
    let flood = format!("{STATUS}\n").repeat(300);
    let answer = exchange(&socket, flood.as_bytes(), usize::MAX);
    let served = answer.iter().take_while(|r| r["ok"] == true).count();
    assert!(
        (100..=110).contains(&served),
        "{served} requests served before the rate limit (burst 100, 50/s)"
    );
    assert_eq!(
        answer.len(),
        served + 1,
        "one error after the burst, then a hang-up"
    );
    let error = answer[served]["error"].as_str().expect("an error");
    assert!(
        error.starts_with("rate limit: at most 100 requests at once and 50 a second"),
        "{error}"
    );
    daemon.wait_for_log("control socket: hung up on uid 0", Duration::from_secs(5));

    // 64 clients at once are served; the 65th is told so.
    let held: Vec<UnixStream> = (0..64)
        .map(|_| UnixStream::connect(&socket).expect("connect"))
        .collect();
    // Each held client is served: ask one of them.
    let mut first = held[0].try_clone().expect("clone");
    first
        .write_all(format!("{STATUS}\n").as_bytes())
        .expect("send");
    let mut reply = String::new();
    BufReader::new(&held[0])
        .read_line(&mut reply)
        .expect("reply");
    assert!(reply.contains("\"ok\":true"), "{reply}");
    let answer = exchange(&socket, format!("{STATUS}\n").as_bytes(), usize::MAX);
    assert_eq!(answer.len(), 1, "{answer:?}");
    assert_eq!(
        answer[0]["error"],
        "too many clients: the daemon serves 64 at once; try again later"
    );
    drop(first);
    drop(held);
    wait_until("a client slot to come free", || {
        exchange(&socket, format!("{STATUS}\n").as_bytes(), 1)
            .first()
            .is_some_and(|r| r["ok"] == true)
    });
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");
    assert!(
        log.contains("refused a client: 64 clients are connected already"),
        "{log}"
    );
    reliability::record(
        "security-limits",
        &[format!(
            "control socket limits: a {MAX}-byte request served and a {}-byte one refused with \
             a hang-up; of 300 pipelined requests on one connection {served} were served before \
             the rate-limit error; 64 clients served at once and the 65th refused; the daemon \
             served every request after each",
            MAX + 1
        )],
    );
}

/// Starts a daemon that must refuse to start because of its `--socket`, and checks that it
/// left nothing: no pin directory, no program attached.
fn refused_start(cgroup: &TestCgroup, socket: &Path, expect: &str) {
    let policy = std::env::temp_dir().join(format!("{}-policy.toml", cgroup.relative));
    fs::write(&policy, "reserve = false\n").expect("policy");
    let out = run_bounded(
        Command::new(portguard_bin())
            .arg("daemon")
            .arg("--policy")
            .arg(&policy)
            .arg("--cgroup")
            .arg(&cgroup.root)
            .arg("--pin-path")
            .arg(cgroup.pin_path())
            .arg("--socket")
            .arg(socket),
        Duration::from_secs(20),
    );
    let _ = fs::remove_file(&policy);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(expect),
        "`{expect}` missing from:\n{stderr}"
    );
    // The pin directory is prepared and locked first; nothing is pinned in it.
    let pinned: Vec<_> = fs::read_dir(cgroup.pin_path())
        .map(|entries| entries.flatten().map(|entry| entry.file_name()).collect())
        .unwrap_or_default();
    assert!(
        pinned.is_empty(),
        "pinned {pinned:?} before refusing: {stderr}"
    );
    assert_eq!(
        portguard_programs(&cgroup.root),
        portguard_tests::bpf_query::NONE_ATTACHED,
        "attached before refusing"
    );
}

fn mkdir(path: &Path, mode: u32, uid: u32) {
    fs::create_dir_all(path).expect("mkdir");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).expect("chown");
}

#[test]
fn planted_symlinks_and_unsafe_socket_directories_refuse_the_start() {
    if !privileged("planted_symlinks_and_unsafe_socket_directories_refuse_the_start") {
        return;
    }
    let cgroup = TestCgroup::new("sockpath");
    let base = std::env::temp_dir().join(format!("portguard-sec-{}", std::process::id()));
    let _ = fs::remove_dir_all(&base);
    mkdir(&base, 0o755, 0);

    // A symlink at the socket path, pointing at a file someone wants destroyed.
    let precious = base.join("precious");
    fs::write(&precious, "keep me\n").expect("target");
    let socket = base.join("control.sock");
    std::os::unix::fs::symlink(&precious, &socket).expect("plant symlink");
    refused_start(&cgroup, &socket, "it is a symlink, not a socket");
    assert_eq!(fs::read_to_string(&precious).expect("target"), "keep me\n");
    assert!(
        fs::symlink_metadata(&socket)
            .expect("link")
            .file_type()
            .is_symlink()
    );

    // The socket directory itself a symlink to somewhere else.
    let elsewhere = base.join("elsewhere");
    mkdir(&elsewhere, 0o755, 0);
    let linked = base.join("linked");
    std::os::unix::fs::symlink(&elsewhere, &linked).expect("plant symlink");
    refused_start(
        &cgroup,
        &linked.join("control.sock"),
        "it is a symlink (to ",
    );
    assert_eq!(fs::read_dir(&elsewhere).expect("list").count(), 0);

    // Pre-created by another user, or writable by everyone.
    let theirs = base.join("theirs");
    mkdir(&theirs, 0o755, NOBODY);
    refused_start(
        &cgroup,
        &theirs.join("control.sock"),
        &format!(
            "refusing the control socket directory {}: {} belongs to uid 65534, not root",
            theirs.display(),
            theirs.display()
        ),
    );
    let open = base.join("open");
    mkdir(&open, 0o777, 0);
    refused_start(
        &cgroup,
        &open.join("control.sock"),
        "is writable by other users (mode 0777) and not sticky",
    );
    // Below a directory of another user, even through root's own subdirectory.
    let nested = theirs.join("root-owned");
    mkdir(&nested, 0o755, 0);
    refused_start(
        &cgroup,
        &nested.join("control.sock"),
        "belongs to uid 65534, not root",
    );

    // A directory the daemon creates itself is used (mode 0755, socket 0600).
    let fresh: PathBuf = base.join("fresh/run");
    let socket = fresh.join("control.sock");
    let log_path = base.join("daemon.log");
    let policy = base.join("policy.toml");
    fs::write(&policy, "reserve = false\n").expect("policy");
    let mut child = Command::new(portguard_bin())
        .arg("daemon")
        .arg("--policy")
        .arg(&policy)
        .arg("--cgroup")
        .arg(&cgroup.root)
        .arg("--pin-path")
        .arg(cgroup.pin_path())
        .arg("--socket")
        .arg(&socket)
        .stderr(fs::File::create(&log_path).expect("log"))
        .spawn()
        .expect("spawn daemon");
    wait_until("the daemon to be ready", || {
        fs::read_to_string(&log_path).is_ok_and(|log| log.contains("ready"))
            || child.try_wait().ok().flatten().is_some()
    });
    let log = fs::read_to_string(&log_path).unwrap_or_default();
    let started = log.contains("ready");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait daemon");
    assert!(started && status.success(), "{log}");
    let mode = fs::metadata(&fresh)
        .expect("created dir")
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o755);
    assert!(!socket.exists(), "the socket is removed on exit");
    let _ = fs::remove_dir_all(&base);
    reliability::record(
        "security-socket-path",
        &[
            "control socket path: a symlink planted at the socket path (its target untouched), a \
           symlinked socket directory, a directory of uid 65534, a mode-0777 directory and a \
           root directory below one of uid 65534 each refused the start with nothing pinned or \
           attached; a directory the daemon created itself was used"
                .to_owned(),
        ],
    );
}
