//! End-to-end: scopes that select cgroups by glob, systemd unit and container id, followed as
//! cgroups come and go, against the real kernel.

use std::time::Instant;

use portguard_tests::{Daemon, TestCgroup, port, privileged, probe, wait_until};
use serde_json::Value;

fn scope_cgroups(daemon: &Daemon, name: &str) -> Vec<String> {
    let status = daemon.status();
    let scope = status["scopes"]
        .as_array()
        .expect("scopes")
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no scope {name}: {status}"))
        .clone();
    scope["cgroups"]
        .as_array()
        .expect("cgroups")
        .iter()
        .map(|c| c.as_str().expect("path").to_owned())
        .collect()
}

#[test]
fn unit_and_container_selectors_find_their_cgroups_anywhere() {
    if !privileged("unit_and_container_selectors_find_their_cgroups_anywhere") {
        return;
    }
    let cgroup = TestCgroup::new("selectors");
    let unit = format!("pgtest-{}.service", std::process::id());
    let id = format!("{:0>64}", format!("c0de{}", std::process::id()));
    let service = cgroup.child(&format!("system.slice/{unit}"));
    let container = cgroup.child(&format!(
        "kubepods.slice/pod-x.slice/cri-containerd-{id}.scope"
    ));
    let policy = format!(
        "[[scope]]\nname = \"svc\"\nunit = \"{unit}\"\nephemeral = \"25000-25009\"\n\
         [[scope]]\nname = \"ctr\"\ncontainer = \"{}\"\nephemeral = \"25010-25019\"\n",
        &id[..12]
    );
    let daemon = Daemon::start(&cgroup, &policy);
    let r = probe(&service, &["bind", "tcp", "0"]);
    assert!(
        (25000..=25009).contains(&port(&r[0])),
        "unit selector: {}",
        r[0]
    );
    let r = probe(&container, &["bind", "tcp", "0"]);
    assert!(
        (25010..=25019).contains(&port(&r[0])),
        "container selector: {}",
        r[0]
    );
    assert_eq!(
        scope_cgroups(&daemon, "ctr"),
        [format!(
            "{}/kubepods.slice/pod-x.slice/cri-containerd-{id}.scope",
            cgroup.relative
        )]
    );
}

#[test]
fn glob_scopes_follow_cgroups_created_and_removed_after_start() {
    if !privileged("glob_scopes_follow_cgroups_created_and_removed_after_start") {
        return;
    }
    let cgroup = TestCgroup::new("glob");
    cgroup.child("pods");
    let policy = format!(
        "[[scope]]\nname = \"pods\"\ncgroup = \"{}/pods/*/ctr-*\"\nephemeral = \"25100-25109\"\n",
        cgroup.relative
    );
    let daemon = Daemon::start(&cgroup, &policy);
    assert_eq!(scope_cgroups(&daemon, "pods"), Vec::<String>::new());
    // Created after start, two levels below anything that existed: inotify must follow.
    let started = Instant::now();
    let first = cgroup.child("pods/pod-a/ctr-1");
    let second = cgroup.child("pods/pod-b/ctr-2");
    let other = cgroup.child("pods/pod-b/sidecar");
    wait_until("both containers scoped", || {
        scope_cgroups(&daemon, "pods").len() == 2
    });
    println!(
        "two new cgroups were scoped {:?} after mkdir",
        started.elapsed()
    );
    for dir in [&first, &second] {
        let r = probe(dir, &["bind", "udp", "0"]);
        assert!(
            (25100..=25109).contains(&port(&r[0])),
            "{}: {}",
            dir.display(),
            r[0]
        );
    }
    let r: Vec<Value> = probe(&other, &["bind", "udp", "0"]);
    assert!(
        !(25100..=25109).contains(&port(&r[0])),
        "not selected: {}",
        r[0]
    );
    // A removed cgroup leaves the map with it.
    std::fs::remove_dir(&first).expect("rmdir");
    wait_until("the removed cgroup dropped", || {
        scope_cgroups(&daemon, "pods") == [cgroup.rel("pods/pod-b/ctr-2")]
    });
    let (_, log) = daemon.stop();
    assert!(
        log.contains("ctr-1 (id") && log.contains("no longer scoped"),
        "{log}"
    );
}
