//! End-to-end: what the daemon reports — status, events, lost events — and how its control socket
//! treats clients, against the real kernel.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream, process::CommandExt as _},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use portguard_tests::{
    Daemon, EPERM, Peers, RunningProbe, TestCgroup, errno, port, portguard_bin, privileged, probe,
};
use serde_json::Value;

fn scope<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["scopes"]
        .as_array()
        .expect("scopes")
        .iter()
        .find(|scope| scope["name"] == name)
        .unwrap_or_else(|| panic!("no scope {name} in {status}"))
}

fn two_scopes(cgroup: &TestCgroup, web: &str, other: &str) -> String {
    format!(
        "mode = \"enforce\"\n[[scope]]\nname = \"web\"\ncgroup = \"{}\"\nephemeral = \"{web}\"\n\
         [[scope]]\nname = \"other\"\ncgroup = \"{}\"\nephemeral = \"{other}\"\n",
        cgroup.rel("web"),
        cgroup.rel("other")
    )
}

#[test]
fn status_and_events_show_what_a_scoped_child_did() {
    if !privileged("status_and_events_show_what_a_scoped_child_did") {
        return;
    }
    let cgroup = TestCgroup::new("status");
    let web = cgroup.child("web");
    cgroup.child("other");
    let daemon = Daemon::start(&cgroup, &two_scopes(&cgroup, "22000-22009", "22010-22019"));
    let peers = Peers::new();
    let release = std::env::temp_dir().join(format!("{}-release", cgroup.relative));
    let release_arg = release.to_str().expect("utf-8 path");
    let mut child = RunningProbe::spawn(
        &web,
        &[
            "bind",
            "tcp",
            "0",
            "connect",
            "tcp",
            &peers.tcp_port(),
            "bind",
            "udp",
            "22015",
            "hold",
            release_arg,
        ],
    );
    let bound = child.next_result();
    let connected = child.next_result();
    let denied = child.next_result();
    child.next_result(); // holding
    assert_eq!(errno(&denied), EPERM);
    let pid = u64::from(child.pid());

    let status = daemon.status();
    assert_eq!(status["version"], 1);
    assert_eq!(status["lost_events"], 0);
    let web_status = scope(&status, "web");
    assert_eq!(web_status["range"], serde_json::json!([22000, 22009]));
    assert_eq!(web_status["in_use"], 2, "{web_status}");
    assert_eq!(web_status["steered"], 2, "{web_status}");
    assert_eq!(web_status["denied"], 1, "{web_status}");
    assert_eq!(web_status["exhausted"], 0, "{web_status}");
    assert_eq!(scope(&status, "other")["steered"], 0);

    let events: Vec<Value> = daemon
        .events()
        .into_iter()
        .filter(|event| event["tgid"] == pid)
        .collect();
    let find = |op: &str, verdict: &str| {
        events
            .iter()
            .find(|event| event["op"] == op && event["verdict"] == verdict)
            .unwrap_or_else(|| panic!("no {op} {verdict} event in {events:?}"))
    };
    let bind_event = find("bind", "steered");
    assert_eq!(bind_event["local_port"], port(&bound), "{bind_event}");
    assert_eq!(bind_event["scope"], "web");
    assert_eq!(bind_event["protocol"], "tcp");
    assert_eq!(bind_event["comm"], "pg-probe");
    let connect_event = find("connect", "steered");
    assert_eq!(
        connect_event["local_port"],
        port(&connected),
        "{connect_event}"
    );
    assert_eq!(connect_event["remote_addr"], "127.0.0.1");
    assert_eq!(
        connect_event["remote_port"],
        peers.tcp.local_addr().expect("addr").port()
    );
    let denied_event = find("bind", "denied");
    assert_eq!(denied_event["local_port"], 22015);
    assert_eq!(denied_event["protocol"], "udp");
    assert_eq!(denied_event["errno"], 1);

    // Closing the sockets brings in_use back down, with a release event for each.
    std::fs::write(&release, b"").expect("signal the probe");
    child.finish();
    let start = Instant::now();
    loop {
        let status = daemon.status();
        if scope(&status, "web")["in_use"] == 0 {
            assert_eq!(scope(&status, "web")["peak"], 2, "{status}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "in_use stuck: {status}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let releases = daemon
        .events()
        .into_iter()
        .filter(|event| event["tgid"] == pid && event["op"] == "release")
        .count();
    assert_eq!(releases, 2);
    let _ = std::fs::remove_file(release);
}

#[test]
fn follow_streams_new_events_and_scope_filters() {
    if !privileged("follow_streams_new_events_and_scope_filters") {
        return;
    }
    let cgroup = TestCgroup::new("follow");
    let web = cgroup.child("web");
    let other = cgroup.child("other");
    let daemon = Daemon::start(&cgroup, &two_scopes(&cgroup, "22100-22109", "22110-22119"));
    let mut follower = Command::new(portguard_bin())
        .args(["events", "--follow", "--json", "--scope", "web", "--socket"])
        .arg(daemon.socket())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start follower");
    // Give the follower time to subscribe; events before that are in the history anyway.
    std::thread::sleep(Duration::from_millis(200));
    let noise = probe(&other, &["bind", "udp", "0"]);
    // Twenty binds, each socket closed at once: twenty bind and twenty release events.
    let mut ops: Vec<String> = vec![];
    for i in 0..20 {
        ops.extend(["bind", "udp", "0", "close"].map(str::to_owned));
        ops.push(i.to_string());
    }
    let ops: Vec<&str> = ops.iter().map(String::as_str).collect();
    let wanted = probe(&web, &ops);
    let pid = wanted[0]["pid"].clone();
    let mut lines = BufReader::new(follower.stdout.take().expect("stdout")).lines();
    let (mut binds, mut releases) = (vec![], 0);
    while binds.len() < 20 || releases < 20 {
        let event: Value = serde_json::from_str(&lines.next().expect("an event").expect("read"))
            .expect("event JSON");
        assert_eq!(event["scope"], "web", "filtered to web: {event}");
        assert_ne!(event["pid"], noise[0]["pid"]);
        assert_eq!(event["pid"], pid, "{event}");
        match event["op"].as_str() {
            Some("bind") => binds.push(event["local_port"].as_u64().expect("port")),
            Some("release") => releases += 1,
            other => panic!("unexpected event {other:?}: {event}"),
        }
        assert!(binds.len() <= 20 && releases <= 20, "duplicate events");
    }
    let sent: Vec<u64> = wanted
        .iter()
        .step_by(2)
        .map(|r| u64::from(port(r)))
        .collect();
    assert_eq!(binds, sent, "every bind exactly once, in order");
    let _ = follower.kill();
    let _ = follower.wait();
}

#[test]
fn a_flood_that_overflows_a_small_ring_buffer_is_counted_and_the_daemon_keeps_serving() {
    if !privileged(
        "a_flood_that_overflows_a_small_ring_buffer_is_counted_and_the_daemon_keeps_serving",
    ) {
        return;
    }
    let cgroup = TestCgroup::new("flood");
    let web = cgroup.child("web");
    cgroup.child("other");
    let mut daemon = Daemon::spawn(
        &cgroup,
        &two_scopes(&cgroup, "22200-22209", "22210-22219"),
        &["--events-buffer", "4096"],
    );
    daemon.wait_for_log("ready", Duration::from_secs(30));
    let result = probe(&web, &["bind-loop", "udp", "22205", "20000"]);
    assert_eq!(result[0]["failures"], 0, "{}", result[0]);
    let status = daemon.status();
    let lost = status["lost_events"].as_u64().expect("lost_events");
    assert!(
        lost > 0,
        "a 4 KiB ring buffer cannot hold 40,000 events: {status}"
    );
    // Counters are kept in the kernel, so they stay exact whatever was lost.
    assert_eq!(scope(&status, "web")["allowed"], 20000, "{status}");
    assert_eq!(scope(&status, "web")["in_use"], 0, "{status}");
    // Still serving, and still receiving new events.
    let after = probe(&web, &["bind", "tcp", "0"]);
    let start = Instant::now();
    while !daemon
        .events()
        .iter()
        .any(|event| event["pid"] == after[0]["pid"])
    {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no events after the flood"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0));
    let logged_lost = log
        .lines()
        .find_map(|line| line.split("lost events: ").nth(1))
        .and_then(|count| count.trim().parse::<u64>().ok())
        .expect("the stop line reports lost events");
    assert!(logged_lost >= lost, "{log}");
}

#[test]
fn non_root_clients_are_refused() {
    if !privileged("non_root_clients_are_refused") {
        return;
    }
    let cgroup = TestCgroup::new("peercred");
    let mut daemon = Daemon::start(&cgroup, "mode = \"enforce\"\n");
    let as_nobody = |daemon: &Daemon| {
        Command::new(portguard_bin())
            .args(["status", "--socket"])
            .arg(daemon.socket())
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run portguard as nobody")
    };
    let mode = std::fs::metadata(daemon.socket())
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode");
    // The file mode stops them first...
    let out = as_nobody(&daemon);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot reach the portguard daemon at")
            && stderr.contains("Permission denied"),
        "{stderr}"
    );
    // ...and the daemon's peer check stops them even where the mode would not.
    std::fs::set_permissions(daemon.socket(), std::fs::Permissions::from_mode(0o666))
        .expect("chmod");
    let out = as_nobody(&daemon);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("permission denied: the portguard control socket serves root"),
        "{stderr}"
    );
    daemon.wait_for_log("refused client uid 65534", Duration::from_secs(5));
    assert_eq!(daemon.status()["version"], 1, "still serving root");
}

#[test]
fn malformed_requests_get_errors_and_the_daemon_stays_up() {
    if !privileged("malformed_requests_get_errors_and_the_daemon_stays_up") {
        return;
    }
    let cgroup = TestCgroup::new("malformed");
    let daemon = Daemon::start(&cgroup, "mode = \"enforce\"\n");
    let stream = UnixStream::connect(daemon.socket()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut ask = |request: &[u8]| -> Value {
        (&stream).write_all(request).expect("write");
        let mut line = String::new();
        reader.read_line(&mut line).expect("read response");
        serde_json::from_str(&line).expect("response JSON")
    };
    let response = ask(b"garbage\n");
    assert_eq!(response["ok"], false);
    assert!(
        response["error"]
            .as_str()
            .expect("error")
            .starts_with("malformed request"),
        "{response}"
    );
    let response = ask(b"{\"version\":2,\"command\":\"status\"}\n");
    assert_eq!(
        response["error"],
        "unsupported protocol version 2; this daemon speaks version 1"
    );
    let response = ask(b"{\"version\":1,\"command\":\"reboot\"}\n");
    assert!(
        response["error"]
            .as_str()
            .expect("error")
            .starts_with("invalid request"),
        "{response}"
    );
    // The same connection still works after bad requests.
    let response = ask(b"{\"version\":1,\"command\":\"status\"}\n");
    assert_eq!(response["ok"], true);
    assert_eq!(response["status"]["version"], 1);
    // A huge line is refused and the connection closed, without the daemon buffering it all.
    let mut huge = vec![b'x'; 1024 * 1024];
    huge.push(b'\n');
    let stream = UnixStream::connect(daemon.socket()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = (&stream).write_all(&huge); // the daemon may hang up before reading it all
    let mut answer = String::new();
    let _ = (&stream).read_to_string(&mut answer);
    let response: Value = serde_json::from_str(answer.trim()).expect("response JSON");
    assert_eq!(response["error"], "request longer than 65536 bytes");
    // And the daemon still serves everyone.
    assert_eq!(daemon.status()["version"], 1);
}
