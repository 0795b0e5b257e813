//! End-to-end faults of the host and of the daemon's inputs: bpffs or cgroup2 missing or
//! read-only, another tool's program in the way, a scope cgroup removed under live sockets, the
//! policy file deleted, truncated or renamed over. Each must end in a clear log line and either
//! a correct enforcement state or a clean refusal, checked with probes (ports, errnos) and with
//! what the kernel has attached.
//!
//! Ports 2270-2349 (scope ranges) and 2903-2908 (loopback peers), each test its own.

use std::time::{Duration, Instant};

use portguard_tests::{
    Daemon, EPERM, RunningProbe, TestCgroup,
    bpf_query::{BPF_CGROUP_INET4_CONNECT, portguard_programs},
    bpf_raw::{self, PinnedMap},
    checks::{assert_clean_pins, assert_steered, in_range, scope, uninstall},
    errno,
    faults::{
        LoopbackPeer, MountNamespace, NamespaceFault, StopFile, kill9, pins, reserved_any,
        spawn_daemon,
    },
    port, privileged, probe,
    reliability::record,
};

#[test]
fn without_bpffs_the_daemon_mounts_it_and_a_pin_path_elsewhere_is_refused() {
    if !privileged("without_bpffs_the_daemon_mounts_it_and_a_pin_path_elsewhere_is_refused") {
        return;
    }
    let cgroup = TestCgroup::new("nobpffs");
    let web = cgroup.child("web");
    let peer = LoopbackPeer::new(2903);
    let text = scope("web", &cgroup.rel("web"), "2270-2279");
    let ns = MountNamespace::new(NamespaceFault::NoBpffs);
    let bpffs = |ns: &MountNamespace| {
        ns.mountinfo()
            .lines()
            .filter(|l| l.contains(" /sys/fs/bpf ") && l.contains(" - bpf "))
            .count()
    };
    assert_eq!(bpffs(&ns), 0, "bpffs unmounted in the namespace");
    let mut daemon = spawn_daemon(&cgroup, &text, &[], Some(&ns));
    daemon.wait_for_log("ready", Duration::from_secs(30));
    assert!(
        daemon
            .log()
            .contains("mounted a bpf file system at /sys/fs/bpf"),
        "{}",
        daemon.log()
    );
    assert_eq!(bpffs(&ns), 1);
    assert!(
        pins(&cgroup).is_empty(),
        "the pins are in the new bpffs, not the host's"
    );
    let mut sockets = assert_steered(&web, &peer, (2270, 2279), "on a bpffs of its own");
    // Killed, then restarted: the pins in that bpffs are adopted, nothing is mounted twice.
    kill9(daemon);
    sockets += assert_steered(&web, &peer, (2270, 2279), "killed");
    let mut daemon = spawn_daemon(&cgroup, &text, &[], Some(&ns));
    daemon.wait_for_log("ready", Duration::from_secs(30));
    let log = daemon.log();
    assert!(log.contains("adopting the pinned state"), "{log}");
    assert!(!log.contains("mounted a bpf file system"), "{log}");
    assert_eq!(bpffs(&ns), 1);
    sockets += assert_steered(&web, &peer, (2270, 2279), "restarted");
    drop(daemon);
    let pin_path = cgroup.pin_path();
    let root = cgroup.root.to_str().expect("utf-8");
    let out = ns.portguard(&[
        "uninstall",
        "--pin-path",
        pin_path.to_str().expect("utf-8"),
        "--cgroup",
        root,
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        portguard_programs(&cgroup.root),
        portguard_tests::bpf_query::NONE_ATTACHED
    );
    drop(ns);

    // No bpffs, and mount(2) denied (as a service manager's syscall filter would): a refusal.
    let ns = MountNamespace::new(NamespaceFault::NoBpffs).denying_mount();
    let (code, log) =
        spawn_daemon(&cgroup, &text, &[], Some(&ns)).wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("mounting bpffs at /sys/fs/bpf: Operation not permitted"),
        "{log}"
    );
    assert_eq!(bpffs(&ns), 0, "nothing mounted");
    assert_eq!(
        portguard_programs(&cgroup.root),
        portguard_tests::bpf_query::NONE_ATTACHED
    );
    assert!(!reserved_any(2270, 2279));
    drop(ns);

    // A pin path on no bpf file system, away from /sys/fs/bpf: nothing to mount, a refusal.
    let elsewhere = std::env::temp_dir().join(format!("{}-pins", cgroup.relative));
    let daemon = spawn_daemon(
        &cgroup,
        &text,
        &["--pin-path", elsewhere.to_str().expect("utf-8")],
        None,
    );
    let (code, log) = daemon.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("is not on a bpf file system (mount one, or use a path below /sys/fs/bpf)"),
        "{log}"
    );
    assert!(!elsewhere.exists(), "nothing created");
    assert_eq!(
        portguard_programs(&cgroup.root),
        portguard_tests::bpf_query::NONE_ATTACHED
    );
    assert!(!reserved_any(2270, 2279));
    record(
        "faults-4-bpffs",
        &[format!(
            "bpffs missing: the daemon mounted it, survived kill -9 and was adopted ({sockets} sockets \
             checked in range); with mount(2) denied, and with a pin path on no bpffs, it refused \
             to start with nothing attached or reserved"
        )],
    );
}

#[test]
fn a_missing_or_read_only_cgroup2_is_refused_or_enforced() {
    if !privileged("a_missing_or_read_only_cgroup2_is_refused_or_enforced") {
        return;
    }
    let cgroup = TestCgroup::new("cgroup2");
    let web = cgroup.child("web");
    let peer = LoopbackPeer::new(2904);
    let text = scope("web", &cgroup.rel("web"), "2280-2289");
    let refused = |daemon: Daemon, message: &str| {
        let (code, log) = daemon.wait_exit(Duration::from_secs(10));
        assert_eq!(code, Some(1), "{log}");
        assert!(log.contains(message), "{log}");
        assert!(pins(&cgroup).is_empty(), "nothing pinned: {log}");
        assert!(!cgroup.pin_path().exists());
        assert_eq!(
            portguard_programs(&cgroup.root),
            portguard_tests::bpf_query::NONE_ATTACHED
        );
        assert!(!reserved_any(2280, 2289));
    };
    // An attach point that does not exist.
    let missing = cgroup.mount().join(format!("{}-missing", cgroup.relative));
    refused(
        spawn_daemon(
            &cgroup,
            &text,
            &["--cgroup", missing.to_str().expect("utf-8")],
            None,
        ),
        &format!(
            "cannot attach at {}: No such file or directory",
            missing.display()
        ),
    );
    // No cgroup2 file system at all.
    let ns = MountNamespace::new(NamespaceFault::NoCgroup2(cgroup.mount().to_owned()));
    refused(
        spawn_daemon(&cgroup, &text, &[], Some(&ns)),
        "no cgroup2 file system in /proc/self/mountinfo (portguard needs cgroup v2)",
    );
    drop(ns);
    // cgroup2 mounted read-only: the daemon only reads it, and attaches through a descriptor.
    let ns = MountNamespace::new(NamespaceFault::ReadOnlyCgroup2(cgroup.mount().to_owned()));
    assert!(
        ns.mountinfo().lines().any(
            |l| l.contains(" - cgroup2 ") && l.split_whitespace().nth(5) == Some("ro,relatime")
        ),
        "{}",
        ns.mountinfo()
    );
    let both = text.clone() + &scope("late", &cgroup.rel("late"), "2290-2299");
    let mut daemon = spawn_daemon(&cgroup, &both, &[], Some(&ns));
    daemon.wait_for_log("ready", Duration::from_secs(30));
    assert_eq!(
        portguard_programs(&cgroup.root),
        portguard_tests::bpf_query::ALL_ATTACHED
    );
    let mut sockets = assert_steered(&web, &peer, (2280, 2289), "read-only cgroup2");
    // A cgroup made later (outside the namespace) is still followed.
    let late = cgroup.child("late");
    daemon.wait_for_log(
        &format!("scope late: cgroup {} (id", cgroup.rel("late")),
        Duration::from_secs(5),
    );
    sockets += assert_steered(&late, &peer, (2290, 2299), "a cgroup made later");
    drop(daemon);
    drop(ns);
    record(
        "faults-5-cgroup2",
        &[format!(
            "cgroup2: a missing attach point and a host without cgroup2 were refused with nothing \
             pinned, attached or reserved; on a read-only cgroup2 mount the daemon enforced \
             ({sockets} sockets checked in range)"
        )],
    );
}

#[test]
fn a_cgroup_another_program_holds_exclusively_is_refused_with_nothing_left_attached() {
    if !privileged(
        "a_cgroup_another_program_holds_exclusively_is_refused_with_nothing_left_attached",
    ) {
        return;
    }
    let cgroup = TestCgroup::new("exclusive");
    let web = cgroup.child("web");
    let peer = LoopbackPeer::new(2905);
    let text = scope("web", &cgroup.rel("web"), "2300-2309");
    // Another tool's connect4 program, attached the old way without BPF_F_ALLOW_MULTI: the
    // kernel then refuses every other program on that hook of the cgroup. portguard attaches
    // connect4 last, so four of its five programs would go in first.
    let foreign = bpf_raw::prog_load(
        bpf_raw::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        BPF_CGROUP_INET4_CONNECT,
        "foreign_conn",
        &[bpf_raw::Insn::mov(0, 1), bpf_raw::Insn::exit()],
    );
    bpf_raw::prog_attach(&foreign, &cgroup.root, BPF_CGROUP_INET4_CONNECT, 0)
        .expect("exclusive attach");
    let (code, log) = spawn_daemon(&cgroup, &text, &[], None).wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "not starting: attaching to cgroup {} (is another program attached there without \
             BPF_F_ALLOW_MULTI?); no program of this daemon stays attached: program pg_connect4",
            cgroup.root.display()
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "removed the {} map(s) this daemon pinned",
            portguard_tests::bpf_query::PORTGUARD_MAP_COUNT
        )),
        "{log}"
    );
    // Only the foreign program is attached, nothing is pinned or reserved, and the scope's
    // sockets are as they would be without portguard.
    assert_eq!(
        portguard_programs(&cgroup.root),
        portguard_tests::bpf_query::attached_except(
            0,
            portguard_tests::bpf_query::BPF_CGROUP_INET4_CONNECT,
            1
        )
    );
    assert_eq!(
        bpf_raw::attached_ids(&cgroup.root, BPF_CGROUP_INET4_CONNECT),
        [bpf_raw::prog_id(&foreign)]
    );
    assert!(
        !cgroup.pin_path().exists(),
        "pins left: {:?}",
        pins(&cgroup)
    );
    assert!(!reserved_any(2300, 2309));
    let r = probe(&web, &["bind", "udp", "0", "connect", "udp", &peer.arg()]);
    assert!(
        r.iter()
            .all(|r| errno(r) == 0 && !in_range(port(r), (2300, 2309))),
        "no half policy steering some calls: {r:?}"
    );
    // Once the other program is gone, the daemon starts as if nothing had happened.
    bpf_raw::prog_detach(&foreign, &cgroup.root, BPF_CGROUP_INET4_CONNECT).expect("detach");
    let daemon = Daemon::start(&cgroup, &text);
    assert!(!daemon.log().contains("adopting"), "{}", daemon.log());
    let sockets = assert_steered(&web, &peer, (2300, 2309), "after the refusal");
    record(
        "faults-6-attach-refused",
        &[format!(
            "a cgroup another program holds exclusively: start refused, 0 of {} programs left \
             attached, 0 pins, 0 ports reserved; {} sockets checked",
            portguard_tests::bpf_query::PORTGUARD_LINK_COUNT,
            sockets + r.len()
        )],
    );
}

#[test]
fn a_scope_cgroup_removed_under_live_sockets_leaks_nothing() {
    if !privileged("a_scope_cgroup_removed_under_live_sockets_leaks_nothing") {
        return;
    }
    let cgroup = TestCgroup::new("rmscope");
    let web = cgroup.child("web");
    let elsewhere = cgroup.child("elsewhere");
    let peer = LoopbackPeer::new(2906);
    let daemon = Daemon::start(&cgroup, &scope("web", &cgroup.rel("web"), "2310-2319"));
    let sockets_map = || PinnedMap::open(&cgroup.pin_path().join("SOCKETS")).entries_in_use();
    let scoped_map =
        || PinnedMap::open(&cgroup.pin_path().join("SCOPE_BY_CGROUP")).entries_in_use();
    let (sockets_before, scoped_before) = (sockets_map(), scoped_map());
    assert_eq!(scoped_before, 1);
    let release = StopFile::new(&cgroup, "release");
    let elsewhere_arg = elsewhere.to_str().expect("utf-8").to_owned();
    let mut holder = RunningProbe::spawn(
        &web,
        &[
            "bind",
            "udp",
            "0",
            "connect",
            "tcp",
            &peer.arg(),
            "move",
            &elsewhere_arg,
            "hold",
            release.arg(),
            "send",
            "0",
            &peer.arg(),
            "write",
            "1",
            "close",
            "0",
            "close",
            "1",
        ],
    );
    let held: Vec<u16> = (0..2).map(|_| port(&holder.next_result())).collect();
    assert!(held.iter().all(|&p| in_range(p, (2310, 2319))), "{held:?}");
    holder.next_result();
    holder.next_result();
    // The process left; the cgroup goes while its sockets live on.
    std::fs::remove_dir(&web).expect("rmdir the scope cgroup");
    portguard_tests::wait_until("the cgroup dropped", || {
        daemon.status()["scopes"][0]["cgroups"] == serde_json::json!([])
    });
    let status = daemon.status();
    assert_eq!(
        status["scopes"][0]["in_use"], 2,
        "the live sockets still count: {status}"
    );
    assert_eq!(scoped_map(), scoped_before - 1, "its map entry is gone");
    assert_eq!(
        sockets_map(),
        sockets_before + 2,
        "both sockets still recorded"
    );
    // The sockets keep working, and their ports stay theirs.
    release.stop();
    let used: Vec<_> = (0..2).map(|_| holder.next_result()).collect();
    assert!(used.iter().all(|r| errno(r) == 0), "{used:?}");
    assert_eq!(port(&used[0]), held[0], "{used:?}");
    assert_eq!(port(&used[1]), held[1], "{used:?}");
    holder.next_result();
    holder.next_result();
    holder.finish();
    portguard_tests::wait_until("the ports released", || {
        daemon.status()["scopes"][0]["in_use"] == 0
    });
    assert_eq!(sockets_map(), sockets_before, "no socket record left");
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0));
    assert!(log.contains("no longer scoped"), "{log}");
    assert_eq!(log.matches("released ").count(), 2, "{log}");
    record(
        "faults-7-scope-cgroup-removed",
        &[
            "a scope cgroup removed under 2 live sockets: both kept working on their ports, were \
           released and accounted when closed; 0 socket records and 0 cgroup entries left"
                .to_owned(),
        ],
    );
}

#[test]
fn a_policy_file_deleted_truncated_or_renamed_over_is_refused_or_applied_whole() {
    if !privileged("a_policy_file_deleted_truncated_or_renamed_over_is_refused_or_applied_whole") {
        return;
    }
    let cgroup = TestCgroup::new("policyfile");
    let web = cgroup.child("web");
    let peer = LoopbackPeer::new(2907);
    let first = scope("web", &cgroup.rel("web"), "2320-2329");
    let second = scope("web", &cgroup.rel("web"), "2330-2339");
    let daemon = Daemon::start(&cgroup, &first);
    let path = daemon.policy_path().to_owned();
    let mut sockets = 0;
    let mut refused = |how: &str, expected: &str, by_signal: bool| {
        let message = if by_signal {
            daemon.signal(libc::SIGHUP);
            let start = Instant::now();
            loop {
                let status = daemon.status();
                // This reload's outcome, not the one before.
                let fresh = status["last_reload"]["age_s"]
                    .as_f64()
                    .is_some_and(|age| age < start.elapsed().as_secs_f64());
                if fresh && status["last_reload"]["ok"] == false {
                    break status["last_reload"]["error"]
                        .as_str()
                        .expect("error")
                        .to_owned();
                }
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "{how}: no refusal: {status}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        } else {
            let out = daemon.cli(&["reload"]);
            assert_eq!(out.status.code(), Some(1), "{how}: {out:?}");
            String::from_utf8_lossy(&out.stderr).into_owned()
        };
        assert!(message.contains(expected), "{how}: {message}");
        assert!(
            daemon.log().contains(&format!(
                "reload refused; the running policy stays in force:\n{expected}"
            )) || daemon.log().contains(expected),
            "{how}: {}",
            daemon.log()
        );
        sockets += assert_steered(&web, &peer, (2320, 2329), how);
        assert_eq!(
            portguard_programs(&cgroup.root),
            portguard_tests::bpf_query::ALL_ATTACHED,
            "{how}"
        );
    };
    let name = path.display().to_string();
    std::fs::remove_file(&path).expect("delete the policy");
    refused(
        "deleted, SIGHUP",
        &format!("{name}: cannot open the policy"),
        true,
    );
    refused(
        "deleted, reload",
        &format!("{name}: cannot open the policy"),
        false,
    );
    // Truncated, as an editor writing in place would leave it for a moment.
    std::fs::write(&path, "").expect("truncate");
    refused(
        "truncated, SIGHUP",
        &format!("{name}:1:1: the policy is empty"),
        true,
    );
    // Cut short in the middle of a scope.
    std::fs::write(&path, &second[..second.len() - 12]).expect("half written");
    refused("half written, reload", &format!("{name}:"), false);
    // Renamed over: a broken file is refused, a good one applied whole.
    let staging = path.with_extension("new");
    std::fs::write(&staging, second.replace("2330-2339", "2339-2330")).expect("write");
    std::fs::rename(&staging, &path).expect("rename over");
    refused(
        "renamed over with errors",
        "range 2339-2330 is inverted",
        false,
    );
    std::fs::write(&staging, &second).expect("write");
    std::fs::rename(&staging, &path).expect("rename over");
    let out = daemon.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    sockets += assert_steered(&web, &peer, (2330, 2339), "renamed over, good");
    let status = daemon.status();
    assert_eq!(
        status["scopes"][0]["range"],
        serde_json::json!([2330, 2339]),
        "{status}"
    );
    assert_eq!(status["last_reload"]["ok"], true);
    record(
        "faults-8-policy-file",
        &[format!(
            "policy file deleted (SIGHUP and reload), truncated, half written and renamed over with \
             errors: 5 reloads refused with the old policy in force; renamed over with a good policy: \
             applied whole; {sockets} sockets checked in range"
        )],
    );
}

#[test]
fn a_restart_refused_at_attach_leaves_the_earlier_links_enforcing_its_whole_policy() {
    if !privileged(
        "a_restart_refused_at_attach_leaves_the_earlier_links_enforcing_its_whole_policy",
    ) {
        return;
    }
    let cgroup = TestCgroup::new("refusedrestart");
    let inner = cgroup.child("inner");
    let web = cgroup.child("inner/web");
    let peer = LoopbackPeer::new(2908);
    let text = |range: &str| scope("web", &cgroup.rel("inner/web"), range);
    let mut first = spawn_daemon(&cgroup, &text("2340-2344"), &[], None);
    first.wait_for_log("ready", Duration::from_secs(30));
    let (code, _) = first.stop();
    assert_eq!(code, Some(0));
    // The restart moves the attach point down to `inner`, where another tool holds connect4
    // exclusively: the kernel refuses the new links there (the earlier ones, one level up, are
    // not touched).
    let foreign = bpf_raw::prog_load(
        bpf_raw::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        BPF_CGROUP_INET4_CONNECT,
        "foreign_conn",
        &[bpf_raw::Insn::mov(0, 1), bpf_raw::Insn::exit()],
    );
    bpf_raw::prog_attach(&foreign, &inner, BPF_CGROUP_INET4_CONNECT, 0).expect("exclusive attach");
    let at = ["--cgroup", inner.to_str().expect("utf-8")];
    let (code, log) =
        spawn_daemon(&cgroup, &text("2345-2349"), &at, None).wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("(is another program attached there without BPF_F_ALLOW_MULTI?); no program of this daemon stays attached"),
        "{log}"
    );
    assert!(
        log.contains("stay attached, enforcing the maps as this daemon left them"),
        "{log}"
    );
    // The earlier links, one per hook, enforce the refused daemon's policy, whole: its range,
    // and the old range owned by nobody.
    assert_eq!(
        portguard_programs(&inner),
        portguard_tests::bpf_query::attached_except(
            0,
            portguard_tests::bpf_query::BPF_CGROUP_INET4_CONNECT,
            1
        ),
        "only the foreign program"
    );
    assert_clean_pins(&cgroup, &cgroup.root, "after the refused restart");
    let sockets = assert_steered(&web, &peer, (2345, 2349), "after the refused restart");
    let r = probe(&inner, &["bind", "tcp", "2340", "bind", "tcp", "2345"]);
    assert_eq!(errno(&r[0]), 0, "the old range is free: {}", r[0]);
    assert_eq!(errno(&r[1]), EPERM, "the new range is owned: {}", r[1]);
    bpf_raw::prog_detach(&foreign, &inner, BPF_CGROUP_INET4_CONNECT).expect("detach");
    uninstall(&cgroup, &cgroup.root);
    record(
        "faults-9-restart-refused",
        &[format!(
            "a restart refused at attach (a new attach point another tool holds exclusively): the \
             earlier links stayed, one per hook, enforcing the new policy whole; {} calls checked",
            sockets + r.len()
        )],
    );
}
