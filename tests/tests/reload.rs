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
    let child = {
        let web = web.clone();
        std::thread::spawn(move || probe(&web, &["bind0-loop", "udp", "100000", "24100", "24109"]))
    };
    let mut rounds = 0;
    while !child.is_finished() || rounds % 2 == 1 {
        daemon.write_policy(if rounds % 2 == 0 { &second } else { &first });
        let out = daemon.cli(&["reload"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("reloaded policy"));
        rounds += 1;
    }
    assert!(rounds >= 4, "only {rounds} reloads overlapped the probe");
    let result = child.join().expect("probe thread");
    assert_eq!(
        result[0]["outside"], 0,
        "sockets escaped during reloads: {}",
        result[0]
    );
    assert_eq!(result[0]["failures"], 0, "{}", result[0]);

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
        web_status["steered"], 100000,
        "web kept its counters: {web_status}"
    );
    // A port of the dropped scope is free for anyone again.
    let r = probe(&cgroup.root, &["bind", "tcp", "24115"]);
    assert_eq!(r[0]["errno"], 0, "dropped scope's range released: {}", r[0]);
}
