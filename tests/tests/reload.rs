//! End-to-end: reloading the policy (SIGHUP and `portguard reload`) against the real kernel.

use std::time::{Duration, Instant};

use portguard_tests::{Daemon, TestCgroup, port, privileged, probe};
use serde_json::Value;

fn policy(cgroup: &TestCgroup, scopes: &[(&str, &str)]) -> String {
    let mut text = String::from("mode = \"enforce\"\n");
    for (name, range) in scopes {
        text += &format!(
            "[[scope]]\nname = \"{name}\"\ncgroup = \"{}\"\nephemeral = \"{range}\"\n",
            cgroup.rel(name)
        );
    }
    text
}

fn wait_for_reload(daemon: &Daemon, ok: bool) -> Value {
    let start = Instant::now();
    loop {
        let status = daemon.status();
        if status["last_reload"]["ok"] == ok {
            return status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no reload seen: {status}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_broken_policy_is_refused_and_the_running_one_stays_in_force() {
    if !privileged("a_broken_policy_is_refused_and_the_running_one_stays_in_force") {
        return;
    }
    let cgroup = TestCgroup::new("badreload");
    let web = cgroup.child("web");
    let daemon = Daemon::start(&cgroup, &policy(&cgroup, &[("web", "24000-24009")]));
    daemon.write_policy(
        "mode = \"enforce\"\n[[scope]]\nname = \"web\"\ncgroup = \"x\"\nephemeral = \"9-1\"\n",
    );
    daemon.signal(libc::SIGHUP);
    let status = wait_for_reload(&daemon, false);
    let error = status["last_reload"]["error"].as_str().expect("error text");
    let file = daemon.policy_path().display().to_string();
    assert!(
        error.contains(&format!("{file}:5:13: `ephemeral`: range 9-1 is inverted")),
        "located error in status: {error}"
    );
    let r = probe(&web, &["bind", "tcp", "0"]);
    assert!(
        (24000..=24009).contains(&port(&r[0])),
        "old policy still enforced: {}",
        r[0]
    );
    // The same through `portguard reload`: exit 1 with the located error.
    let out = daemon.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(":5:13: `ephemeral`: range 9-1 is inverted"),
        "{stderr}"
    );
}

#[test]
fn a_good_policy_is_applied_and_kept_scopes_are_never_unscoped_during_the_swap() {
    if !privileged("a_good_policy_is_applied_and_kept_scopes_are_never_unscoped_during_the_swap") {
        return;
    }
    let cgroup = TestCgroup::new("reload");
    let web = cgroup.child("web");
    let batch = cgroup.child("batch");
    let first = policy(&cgroup, &[("web", "24100-24109"), ("old", "24110-24119")]);
    let second = policy(&cgroup, &[("batch", "24120-24129"), ("web", "24100-24109")]);
    let daemon = Daemon::start(&cgroup, &first);

    // While a scoped child binds port 0 over and over, swap the policy back and forth: `web`
    // exists in both, so none of its sockets may ever land outside its range.
    let stop = std::env::temp_dir().join(format!("{}-stop", cgroup.relative));
    // Stops the probe even if an assertion below fails.
    struct StopOnDrop(std::path::PathBuf);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::write(&self.0, b"");
        }
    }
    let _stop_guard = StopOnDrop(stop.clone());
    let child = {
        let (web, stop) = (web.clone(), stop.clone());
        std::thread::spawn(move || {
            let stop = stop.to_str().expect("utf-8 path").to_owned();
            probe(&web, &["bind0-until", &stop, "udp", "24100", "24109"])
        })
    };
    // Wait until the probe is binding, then reload while it keeps going.
    let start = Instant::now();
    while daemon.status()["scopes"][0]["steered"] == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the probe never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for round in 0..10 {
        daemon.write_policy(if round % 2 == 0 { &second } else { &first });
        let out = daemon.cli(&["reload"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("reloaded policy"));
    }
    eprintln!("reloads done after {:?}", start.elapsed());
    std::fs::write(&stop, b"").expect("stop the probe");
    let result = child.join().expect("probe thread");
    assert_eq!(
        result[0]["outside"], 0,
        "sockets escaped during reloads: {}",
        result[0]
    );
    assert_eq!(result[0]["failures"], 0, "{}", result[0]);
    let binds = result[0]["count"].as_u64().expect("count");
    let _ = std::fs::remove_file(&stop);

    // The last reload applied `first`; now apply `second` and check its new scope works.
    daemon.write_policy(&second);
    let out = daemon.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(0));
    let r = probe(&batch, &["bind", "tcp", "0"]);
    assert!(
        (24120..=24129).contains(&port(&r[0])),
        "new scope enforced: {}",
        r[0]
    );
    let status = wait_for_reload(&daemon, true);
    let names: Vec<&str> = status["scopes"]
        .as_array()
        .expect("scopes")
        .iter()
        .map(|s| s["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["batch", "web"]);
    let web_status = &status["scopes"][1];
    assert_eq!(
        web_status["steered"], binds,
        "web kept its counters: {web_status}"
    );
    // A port of the dropped scope is free for anyone again.
    let r = probe(&cgroup.root, &["bind", "tcp", "24115"]);
    assert_eq!(r[0]["errno"], 0, "dropped scope's range released: {}", r[0]);
}

#[test]
fn a_socket_held_across_a_reload_that_moves_its_range_is_released_from_its_own_scope() {
    if !privileged(
        "a_socket_held_across_a_reload_that_moves_its_range_is_released_from_its_own_scope",
    ) {
        return;
    }
    let cgroup = TestCgroup::new("moved");
    let web = cgroup.child("web");
    let daemon = Daemon::start(&cgroup, &policy(&cgroup, &[("web", "24200-24209")]));
    let release = std::env::temp_dir().join(format!("{}-release", cgroup.relative));
    let mut child = portguard_tests::RunningProbe::spawn(
        &web,
        &[
            "bind",
            "tcp",
            "0",
            "hold",
            release.to_str().expect("utf-8 path"),
        ],
    );
    let held = child.next_result();
    child.next_result();
    assert!((24200..=24209).contains(&port(&held)), "{held}");
    assert_eq!(daemon.status()["scopes"][0]["in_use"], 1);
    daemon.write_policy(&policy(&cgroup, &[("web", "24210-24219")]));
    assert_eq!(daemon.cli(&["reload"]).status.code(), Some(0));
    std::fs::write(&release, b"").expect("release");
    child.finish();
    let start = Instant::now();
    loop {
        let status = daemon.status();
        if status["scopes"][0]["in_use"] == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "in_use stuck: {status}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Released from the scope it was counted in, and the new range is in force.
    let r = probe(&web, &["bind", "tcp", "0", "bind", "tcp", "0"]);
    assert!(
        r.iter().all(|r| (24210..=24219).contains(&port(r))),
        "{r:?}"
    );
    let status = daemon.status();
    assert_eq!(status["scopes"][0]["in_use"], 0, "{status}");
    let _ = std::fs::remove_file(release);
}

#[test]
fn the_service_manager_hears_ready_reloading_and_stopping() {
    if !privileged("the_service_manager_hears_ready_reloading_and_stopping") {
        return;
    }
    let cgroup = TestCgroup::new("notify");
    let socket_path = std::env::temp_dir().join(format!("{}-notify.sock", cgroup.relative));
    let _ = std::fs::remove_file(&socket_path);
    let notify = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut daemon = Daemon::spawn_with_env(
        &cgroup,
        &policy(&cgroup, &[("web", "24300-24309")]),
        &[],
        &[("NOTIFY_SOCKET", &socket_path)],
    );
    let next = || {
        let mut buffer = [0u8; 4096];
        let n = notify.recv(&mut buffer).expect("a notification");
        String::from_utf8_lossy(&buffer[..n]).into_owned()
    };
    let ready = next();
    assert!(ready.starts_with("READY=1\nSTATUS=enforcing"), "{ready}");
    daemon.wait_for_log("ready", Duration::from_secs(5));
    assert_eq!(daemon.cli(&["reload"]).status.code(), Some(0));
    let reloading = next();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert!(next().starts_with("READY=1\nSTATUS=reloaded policy"));
    daemon.signal(libc::SIGTERM);
    assert_eq!(next(), "STOPPING=1\n");
    let _ = std::fs::remove_file(&socket_path);
}
