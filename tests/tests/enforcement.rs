//! End-to-end: the real daemon and programs in the real kernel, attached at a private cgroup
//! subtree, with probe processes in scope cgroups. Every test uses its own port ranges (ports are
//! host-wide and tests run in parallel), outside the kernel's default ephemeral range.

use std::time::{Duration, Instant};

use portguard_tests::{
    Daemon, EADDRNOTAVAIL, EPERM, Peers, TestCgroup,
    bpf_query::{PORTGUARD_ATTACH_TYPES, portguard_programs},
    errno, port, privileged, probe,
};

fn policy(mode: &str, scopes: &[(&str, &str, &str, &str)]) -> String {
    let mut text = format!("mode = \"{mode}\"\n");
    for (name, cgroup, ephemeral, extra) in scopes {
        text += &format!(
            "[[scope]]\nname = \"{name}\"\ncgroup = \"{cgroup}\"\nephemeral = \"{ephemeral}\"\n{extra}\n"
        );
    }
    text
}

fn in_range(port: u16, lo: u16, hi: u16) -> bool {
    (lo..=hi).contains(&port)
}

#[test]
fn port_zero_binds_and_connects_land_in_the_scope_range() {
    if !privileged("port_zero_binds_and_connects_land_in_the_scope_range") {
        return;
    }
    let cgroup = TestCgroup::new("range");
    let web = cgroup.child("web");
    let _daemon = Daemon::start(
        &cgroup,
        &policy("enforce", &[("web", &cgroup.rel("web"), "21000-21049", "")]),
    );
    let peers = Peers::new();
    let results = probe(
        &web,
        &[
            "bind",
            "tcp",
            "0",
            "bind",
            "udp",
            "0",
            "connect",
            "tcp",
            &peers.tcp_port(),
            "connect",
            "udp",
            &peers.udp_port(),
        ],
    );
    for result in &results {
        assert_eq!(errno(result), 0, "{result}");
        assert!(
            in_range(port(result), 21000, 21049),
            "port outside range: {result}"
        );
    }
}

#[test]
fn explicit_binds_follow_rules_three_and_four() {
    if !privileged("explicit_binds_follow_rules_three_and_four") {
        return;
    }
    let cgroup = TestCgroup::new("rules");
    let listed = cgroup.child("listed");
    let open = cgroup.child("open");
    let outside = cgroup.child("outside");
    let _daemon = Daemon::start(
        &cgroup,
        &policy(
            "enforce",
            &[
                (
                    "listed",
                    &cgroup.rel("listed"),
                    "21100-21109",
                    "bind = [\"21150\"]",
                ),
                ("open", &cgroup.rel("open"), "21110-21119", ""),
            ],
        ),
    );
    // Rule 3 with a bind list: own range and list only.
    let r = probe(
        &listed,
        &[
            "bind", "tcp", "21105", "bind", "udp", "21150", "bind", "tcp", "21151",
        ],
    );
    assert_eq!(
        (errno(&r[0]), port(&r[0])),
        (0, 21105),
        "own range: {}",
        r[0]
    );
    assert_eq!(
        (errno(&r[1]), port(&r[1])),
        (0, 21150),
        "listed port: {}",
        r[1]
    );
    assert_eq!(errno(&r[2]), EPERM, "unlisted port: {}", r[2]);
    // Rule 3 without a list: anything but another scope's range.
    let r = probe(
        &open,
        &[
            "bind", "tcp", "21152", "bind", "tcp", "21101", "bind", "udp", "21112",
        ],
    );
    assert_eq!(
        (errno(&r[0]), port(&r[0])),
        (0, 21152),
        "free port: {}",
        r[0]
    );
    assert_eq!(errno(&r[1]), EPERM, "other scope's range: {}", r[1]);
    assert_eq!(errno(&r[2]), 0, "own range: {}", r[2]);
    // Rule 4: under the attach point but in no scope.
    let r = probe(
        &outside,
        &[
            "bind", "tcp", "21103", "bind", "udp", "21115", "bind", "tcp", "21153",
        ],
    );
    assert_eq!(errno(&r[0]), EPERM, "unscoped into a range: {}", r[0]);
    assert_eq!(errno(&r[1]), EPERM, "unscoped into a range: {}", r[1]);
    assert_eq!(errno(&r[2]), 0, "unscoped outside ranges: {}", r[2]);
}

#[test]
fn exhaustion_fails_with_eaddrnotavail_and_recovers_when_a_socket_closes() {
    if !privileged("exhaustion_fails_with_eaddrnotavail_and_recovers_when_a_socket_closes") {
        return;
    }
    let cgroup = TestCgroup::new("exhaust");
    let small = cgroup.child("small");
    let daemon = Daemon::start(
        &cgroup,
        &policy(
            "enforce",
            &[("small", &cgroup.rel("small"), "21200-21207", "")],
        ),
    );
    let peers = Peers::new();
    let tcp = peers.tcp_port();
    // TCP: eight bind(0)s fill the range; bind(0) and connect() then fail like the kernel's own
    // allocator does. A closed bound-only socket frees its port at once (a closed *connected*
    // one lingers in TIME_WAIT; see the README's limits).
    let mut ops: Vec<&str> = [["bind", "tcp", "0"]; 9].concat();
    ops.extend(["connect", "tcp", &tcp, "close", "3", "connect", "tcp", &tcp]);
    let r = probe(&small, &ops);
    let mut bound: Vec<u16> = r[..8].iter().map(port).collect();
    assert!(r[..8].iter().all(|r| errno(r) == 0), "{r:?}");
    let freed = bound[3];
    bound.sort_unstable();
    assert_eq!(
        bound,
        (21200..=21207).collect::<Vec<u16>>(),
        "every port used once"
    );
    assert_eq!(
        errno(&r[8]),
        EADDRNOTAVAIL,
        "bind(0) on a full range: {}",
        r[8]
    );
    assert_eq!(
        errno(&r[9]),
        EADDRNOTAVAIL,
        "connect on a full range: {}",
        r[9]
    );
    assert_eq!(
        (errno(&r[11]), port(&r[11])),
        (0, freed),
        "the freed port is found: {}",
        r[11]
    );

    // UDP has its own ports: the same range is free again for it.
    let udp = peers.udp_port();
    let r = probe(
        &small,
        &[
            "connect-until-fail",
            "udp",
            &udp,
            "20",
            "bind",
            "udp",
            "0",
            "close",
            "3",
            "connect",
            "udp",
            &udp,
        ],
    );
    let ports: Vec<u64> = r[0]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| p.as_u64().expect("port"))
        .collect();
    assert_eq!(
        ports.len(),
        8,
        "all 8 ports of the range, then failure: {}",
        r[0]
    );
    assert_eq!(
        errno(&r[0]),
        EADDRNOTAVAIL,
        "UDP connect exhaustion: {}",
        r[0]
    );
    assert_eq!(
        errno(&r[1]),
        EADDRNOTAVAIL,
        "UDP bind(0) exhaustion: {}",
        r[1]
    );
    assert_eq!(
        (errno(&r[3]), u64::from(port(&r[3]))),
        (0, ports[3]),
        "{}",
        r[3]
    );

    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");
    assert!(
        log.contains("scope small: steered 18, denied 0, exhausted 4,"),
        "{log}"
    );
}

#[test]
fn nested_cgroups_inherit_their_ancestors_scope() {
    if !privileged("nested_cgroups_inherit_their_ancestors_scope") {
        return;
    }
    let cgroup = TestCgroup::new("nested");
    let deep = cgroup.child("svc/worker/thread");
    let inner = cgroup.child("svc/inner");
    let _daemon = Daemon::start(
        &cgroup,
        &policy(
            "enforce",
            &[
                ("svc", &cgroup.rel("svc"), "21300-21309", ""),
                ("inner", &cgroup.rel("svc/inner"), "21310-21319", ""),
            ],
        ),
    );
    let r = probe(&deep, &["bind", "tcp", "0"]);
    assert!(
        in_range(port(&r[0]), 21300, 21309),
        "deep child of svc: {}",
        r[0]
    );
    // The nearest scope wins.
    let r = probe(&inner, &["bind", "tcp", "0"]);
    assert!(
        in_range(port(&r[0]), 21310, 21319),
        "nearest scope: {}",
        r[0]
    );
}

#[test]
fn audit_mode_denies_nothing_but_counts() {
    if !privileged("audit_mode_denies_nothing_but_counts") {
        return;
    }
    let cgroup = TestCgroup::new("audit");
    let a = cgroup.child("a");
    let daemon = Daemon::start(
        &cgroup,
        &policy(
            "audit",
            &[
                ("a", &cgroup.rel("a"), "21400-21409", ""),
                ("b", &cgroup.rel("b"), "21410-21419", ""),
            ],
        ),
    );
    let r = probe(&a, &["bind", "tcp", "21415", "bind", "tcp", "0"]);
    assert_eq!(
        (errno(&r[0]), port(&r[0])),
        (0, 21415),
        "audit allows: {}",
        r[0]
    );
    assert_eq!(errno(&r[1]), 0);
    assert!(
        !in_range(port(&r[1]), 21400, 21409),
        "audit does not steer: {}",
        r[1]
    );
    let (_, log) = daemon.stop();
    assert!(
        log.contains("audit-would-deny tcp bind") && log.contains("local port 21415"),
        "{log}"
    );
    assert!(
        log.contains("scope a: steered 0, denied 0, exhausted 0, allowed 1, audit-would-deny 1,"),
        "{log}"
    );
}

#[test]
fn stopping_keeps_enforcement_and_uninstall_removes_everything() {
    if !privileged("stopping_keeps_enforcement_and_uninstall_removes_everything") {
        return;
    }
    let cgroup = TestCgroup::new("detach");
    let web = cgroup.child("web");
    let daemon = Daemon::start(
        &cgroup,
        &policy("enforce", &[("web", &cgroup.rel("web"), "21500-21509", "")]),
    );
    assert_eq!(
        portguard_programs(&cgroup.root),
        [1; PORTGUARD_ATTACH_TYPES.len()],
        "attached while running"
    );
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");
    assert!(
        log.contains("enforcement continues through the links pinned in"),
        "{log}"
    );
    // Through upgrades and restarts the kernel keeps enforcing with no daemon at all.
    assert_eq!(
        portguard_programs(&cgroup.root),
        [1; PORTGUARD_ATTACH_TYPES.len()],
        "still attached"
    );
    assert_eq!(
        errno(&probe(&cgroup.root, &["bind", "tcp", "21505"])[0]),
        EPERM
    );
    let r = probe(&web, &["bind", "tcp", "0"]);
    assert!(
        in_range(port(&r[0]), 21500, 21509),
        "still steered: {}",
        r[0]
    );

    let out = std::process::Command::new(portguard_tests::portguard_bin())
        .arg("uninstall")
        .arg("--pin-path")
        .arg(cgroup.pin_path())
        .arg("--cgroup")
        .arg(&cgroup.root)
        .output()
        .expect("run uninstall");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "removed {} link(s) and 19 map(s)",
            PORTGUARD_ATTACH_TYPES.len()
        )),
        "{stdout}"
    );
    assert!(!cgroup.pin_path().exists(), "no pins left");
    assert_eq!(
        portguard_programs(&cgroup.root),
        [0; PORTGUARD_ATTACH_TYPES.len()],
        "nothing left attached"
    );
    assert_eq!(errno(&probe(&cgroup.root, &["bind", "tcp", "21505"])[0]), 0);
    let r = probe(&web, &["bind", "tcp", "0"]);
    assert!(
        !in_range(port(&r[0]), 21500, 21509),
        "no longer steered: {}",
        r[0]
    );
}

#[test]
fn a_killed_daemon_leaves_enforcement_in_place_and_a_new_one_adopts_it() {
    if !privileged("a_killed_daemon_leaves_enforcement_in_place_and_a_new_one_adopts_it") {
        return;
    }
    let cgroup = TestCgroup::new("kill9");
    let web = cgroup.child("web");
    let text = policy("enforce", &[("web", &cgroup.rel("web"), "21800-21809", "")]);
    let first = Daemon::start(&cgroup, &text);
    // A child keeps connecting new sockets through the kill and the restart.
    let peers = portguard_tests::Peers::new();
    let udp = peers.udp_port();
    let stop = std::env::temp_dir().join(format!("{}-stop", cgroup.relative));
    let child = {
        let (web, stop) = (web.clone(), stop.clone());
        std::thread::spawn(move || {
            let stop = stop.to_str().expect("utf-8 path").to_owned();
            probe(
                &web,
                &["connect-until", &stop, &udp, "udp", "21800", "21809"],
            )
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    first.signal(libc::SIGKILL);
    let _ = first.wait_exit(Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(200));
    let mut second = Daemon::start(&cgroup, &text);
    second.wait_for_log("adopting the pinned state", Duration::from_secs(5));
    second.wait_for_log(
        &format!("replaced {} link(s)", PORTGUARD_ATTACH_TYPES.len()),
        Duration::from_secs(5),
    );
    std::thread::sleep(Duration::from_millis(200));
    std::fs::write(&stop, b"").expect("stop the child");
    let result = child.join().expect("probe thread");
    let _ = std::fs::remove_file(&stop);
    assert!(
        result[0]["count"].as_u64().expect("count") > 100,
        "{}",
        result[0]
    );
    assert_eq!(
        result[0]["outside"], 0,
        "a socket escaped its range: {}",
        result[0]
    );
    assert_eq!(result[0]["failures"], 0, "{}", result[0]);
    // One program per hook: the earlier links were replaced, not added to.
    assert_eq!(
        portguard_programs(&cgroup.root),
        [1; PORTGUARD_ATTACH_TYPES.len()]
    );
    // The adopted counters carried over the binds made while no daemon ran.
    let steered = second.status()["scopes"][0]["steered"]
        .as_u64()
        .expect("steered");
    assert_eq!(steered, result[0]["count"].as_u64().expect("count"));
}

#[test]
fn two_daemons_with_their_own_pins_and_cgroups_run_side_by_side() {
    if !privileged("two_daemons_with_their_own_pins_and_cgroups_run_side_by_side") {
        return;
    }
    let one = TestCgroup::new("sideone");
    let two = TestCgroup::new("sidetwo");
    let (a, b) = (one.child("svc"), two.child("svc"));
    let _first = Daemon::start(
        &one,
        &policy("enforce", &[("svc", &one.rel("svc"), "21900-21909", "")]),
    );
    let _second = Daemon::start(
        &two,
        &policy("enforce", &[("svc", &two.rel("svc"), "21910-21919", "")]),
    );
    assert!(in_range(
        port(&probe(&a, &["bind", "tcp", "0"])[0]),
        21900,
        21909
    ));
    assert!(in_range(
        port(&probe(&b, &["bind", "tcp", "0"])[0]),
        21910,
        21919
    ));
    // Each daemon protects its own ranges only under its own attach point.
    assert_eq!(
        errno(&probe(&two.root, &["bind", "tcp", "21915"])[0]),
        EPERM
    );
    assert_eq!(errno(&probe(&two.root, &["bind", "tcp", "21905"])[0]), 0);
}

#[test]
fn a_scope_cgroup_created_after_start_is_enforced() {
    if !privileged("a_scope_cgroup_created_after_start_is_enforced") {
        return;
    }
    let cgroup = TestCgroup::new("late");
    let mut daemon = Daemon::start(
        &cgroup,
        &policy(
            "enforce",
            &[("late", &cgroup.rel("late"), "21600-21609", "")],
        ),
    );
    assert!(
        daemon.log().contains("selects no cgroup below"),
        "{}",
        daemon.log()
    );
    let start = Instant::now();
    let late = cgroup.child("late");
    loop {
        let r = probe(&late, &["bind", "udp", "0"]);
        if in_range(port(&r[0]), 21600, 21609) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "never steered: {}",
            r[0]
        );
    }
    // Followed through inotify (the safety-net walk runs once a minute): measured, not timed.
    println!(
        "a new scope cgroup was enforced {:?} after mkdir",
        start.elapsed()
    );
    daemon.wait_for_log("scope late: cgroup", Duration::from_secs(5));
}

#[test]
fn strict_scopes_refuse_sends_from_kernel_autobound_ports() {
    if !privileged("strict_scopes_refuse_sends_from_kernel_autobound_ports") {
        return;
    }
    let cgroup = TestCgroup::new("strict");
    let strict = cgroup.child("strict");
    let lax = cgroup.child("lax");
    let daemon = Daemon::start(
        &cgroup,
        &policy(
            "enforce",
            &[
                (
                    "strict",
                    &cgroup.rel("strict"),
                    "21700-21709",
                    "strict = true",
                ),
                ("lax", &cgroup.rel("lax"), "21710-21719", ""),
            ],
        ),
    );
    let peers = Peers::new();
    let udp = peers.udp_port();
    let r = probe(
        &strict,
        &[
            "sendto", "udp", &udp, "bind", "udp", "0", "send", "0", &udp, "bind", "udp", "21760",
            "send", "2", &udp,
        ],
    );
    assert_eq!(
        errno(&r[0]),
        EPERM,
        "strict refuses the unsteered send: {}",
        r[0]
    );
    assert_eq!(
        errno(&r[2]),
        EPERM,
        "and every later send from it: {}",
        r[2]
    );
    assert_eq!(
        errno(&r[3]),
        0,
        "explicit bind outside every range: {}",
        r[3]
    );
    assert_eq!(
        errno(&r[4]),
        0,
        "an explicitly bound socket may send: {}",
        r[4]
    );
    let r = probe(&lax, &["sendto", "udp", &udp]);
    assert_eq!(errno(&r[0]), 0, "lax allows it: {}", r[0]);
    let (_, log) = daemon.stop();
    assert!(
        log.contains("autobound udp sendmsg"),
        "counted and logged: {log}"
    );
    assert!(log.contains("scope lax: steered 0, denied 0, exhausted 0, allowed 0, audit-would-deny 0, unsteered 1"), "{log}");
    assert!(log.contains("scope strict: steered 1, denied 1,"), "{log}");
}

#[test]
fn observe_mode_logs_unscoped_sockets_and_changes_nothing() {
    if !privileged("observe_mode_logs_unscoped_sockets_and_changes_nothing") {
        return;
    }
    let cgroup = TestCgroup::new("observe");
    let any = cgroup.child("any");
    let mut daemon = Daemon::start(&cgroup, "mode = \"observe\"\n");
    let peers = Peers::new();
    let r = probe(&any, &["connect", "tcp", &peers.tcp_port()]);
    assert_eq!(errno(&r[0]), 0);
    let pid = r[0]["pid"].as_u64().expect("pid");
    let line = daemon.wait_for_log(
        &format!("observed tcp connect: pid {pid} "),
        Duration::from_secs(5),
    );
    assert!(
        line.contains(&format!("remote 127.0.0.1:{}", peers.tcp_port())),
        "{line}"
    );
}

#[test]
fn a_bad_policy_never_starts_and_attaches_nothing() {
    if !privileged("a_bad_policy_never_starts_and_attaches_nothing") {
        return;
    }
    let cgroup = TestCgroup::new("bad");
    let daemon = Daemon::spawn(
        &cgroup,
        "[[scope]]\nname = \"a\"\ncgroup = \"x\"\nephemeral = \"300-200\"\ncolour = 1\n",
        &[],
    );
    let (code, log) = daemon.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("policy.toml:4:13: `ephemeral`: range 300-200 is inverted"),
        "{log}"
    );
    assert!(
        log.contains("policy.toml:5:1: unknown key `colour` in scope"),
        "{log}"
    );
    assert!(log.contains("not starting"), "{log}");
    assert_eq!(
        portguard_programs(&cgroup.root),
        [0; PORTGUARD_ATTACH_TYPES.len()]
    );
}

#[test]
fn a_second_daemon_on_the_same_pins_is_refused_and_changes_nothing() {
    if !privileged("a_second_daemon_on_the_same_pins_is_refused_and_changes_nothing") {
        return;
    }
    let cgroup = TestCgroup::new("twice");
    let web = cgroup.child("web");
    let first = Daemon::start(
        &cgroup,
        &policy("enforce", &[("web", &cgroup.rel("web"), "21950-21959", "")]),
    );
    // Same pin path, a policy with no scopes: had it touched the maps, web would be unscoped.
    let second = Daemon::spawn(&cgroup, "mode = \"observe\"\n", &[]);
    let (code, log) = second.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("another portguard daemon (or uninstall) is using"),
        "{log}"
    );
    let r = probe(&web, &["bind", "tcp", "0"]);
    assert!(
        in_range(port(&r[0]), 21950, 21959),
        "still enforced: {}",
        r[0]
    );
    assert_eq!(first.status()["scopes"][0]["name"], "web");
    // Nor may uninstall pull the pins from under a running daemon.
    let out = std::process::Command::new(portguard_tests::portguard_bin())
        .arg("uninstall")
        .arg("--pin-path")
        .arg(cgroup.pin_path())
        .output()
        .expect("run uninstall");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stop the daemon first"));
    assert_eq!(
        portguard_programs(&cgroup.root),
        [1; PORTGUARD_ATTACH_TYPES.len()]
    );
}
