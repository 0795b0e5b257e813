//! End-to-end faults: the daemon killed while it loads, reloads and reads an event flood; bpffs
//! or cgroup2 missing or read-only; another tool's program in the way; a scope cgroup removed
//! under live sockets; the policy file deleted, truncated or renamed over. Each must end in a
//! clear log line and either a correct enforcement state or a clean refusal, checked with
//! probes (ports, errnos) and with what the kernel has attached.
//!
//! Ports 2100-2399 (scope ranges) and 2900-2909 (loopback peers), each test its own, so that
//! tests running side by side never meet in a port or in ip_local_reserved_ports.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use portguard_tests::{
    Daemon, EPERM, RunningProbe, TestCgroup,
    bpf_query::{BPF_CGROUP_INET4_CONNECT, portguard_programs},
    bpf_raw::{self, PinnedMap},
    errno,
    faults::{
        LoopbackPeer, MountNamespace, NamespaceFault, StopFile, kill9, pins, reserved_any,
        spawn_daemon,
    },
    port, privileged, probe,
    reliability::record,
};

fn scope(name: &str, cgroup: &str, range: &str) -> String {
    format!("[[scope]]\nname = \"{name}\"\ncgroup = \"{cgroup}\"\nephemeral = \"{range}\"\n")
}

fn in_range(port: u16, (lo, hi): (u16, u16)) -> bool {
    (lo..=hi).contains(&port)
}

/// bind(0) and connect() of TCP and UDP in `dir`: every port must lie in `range`.
fn assert_steered(dir: &Path, peer: &LoopbackPeer, range: (u16, u16), when: &str) -> usize {
    let peer = peer.arg();
    // The TCP connection is reset when the probe exits: a TIME_WAIT on a range port would make
    // a later bind(0) fail (see the README's limits).
    let r = probe(
        dir,
        &[
            "bind", "tcp", "0", "bind", "udp", "0", "connect", "tcp", &peer, "connect", "udp",
            &peer, "linger0", "2",
        ],
    );
    for result in &r {
        assert_eq!(errno(result), 0, "{when}: {result}");
        assert!(
            in_range(port(result), range),
            "{when}: a socket outside {range:?}: {result}"
        );
    }
    r.len()
}

/// No hook has a portguard program, or every hook has at least one: never some without others.
fn assert_whole_or_nothing(dir: &Path, when: &str) -> bool {
    let attached = portguard_programs(dir);
    let whole = attached.iter().all(|&n| n >= 1);
    assert!(
        whole || attached.iter().all(|&n| n == 0),
        "{when}: some hooks enforced without the others: {attached:?}"
    );
    whole
}

/// After a restart: exactly one link per hook and no staged leftovers among the pins.
fn assert_clean_pins(cgroup: &TestCgroup, when: &str) {
    assert_clean_pins_at(cgroup, &cgroup.root);
    let _ = when;
}

fn assert_clean_pins_at(cgroup: &TestCgroup, attach: &Path) {
    let when = attach.display();
    assert_eq!(portguard_programs(attach), [1, 1, 1, 1, 1], "{when}");
    let pins = pins(cgroup);
    assert_eq!(
        pins.iter().filter(|p| p.starts_with("link_")).count(),
        5,
        "{when}: {pins:?}"
    );
    assert!(
        !pins.iter().any(|p| p.contains("_staged_")),
        "{when}: {pins:?}"
    );
}

fn uninstall(cgroup: &TestCgroup) -> String {
    let out = std::process::Command::new(portguard_tests::portguard_bin())
        .arg("uninstall")
        .arg("--pin-path")
        .arg(cgroup.pin_path())
        .arg("--cgroup")
        .arg(&cgroup.root)
        .output()
        .expect("run uninstall");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn kill_9_while_loading_leaves_all_hooks_or_none_and_a_restart_is_correct() {
    if !privileged("kill_9_while_loading_leaves_all_hooks_or_none_and_a_restart_is_correct") {
        return;
    }
    let cgroup = TestCgroup::new("killload");
    let web = cgroup.child("web");
    let peer = LoopbackPeer::new(2900);
    let range = (2100, 2109);
    let text = scope("web", &cgroup.rel("web"), "2100-2109");
    // How long a start takes here, to spread the kills over it.
    let started = Instant::now();
    let daemon = Daemon::start(&cgroup, &text);
    let load = started.elapsed();
    drop(daemon);
    uninstall(&cgroup);

    const KILLS: u32 = 12;
    let (mut whole, mut none, mut sockets) = (0, 0, 0);
    for kill in 0..KILLS {
        // Even rounds start from nothing, odd ones adopt the installation the previous left.
        let fresh = kill % 2 == 0;
        let delay = load * kill / (KILLS - 2);
        let daemon = spawn_daemon(&cgroup, &text, &[], None);
        std::thread::sleep(delay);
        let log = kill9(daemon);
        let when = format!("killed {delay:?} into a start (fresh: {fresh}); log:\n{log}");
        if assert_whole_or_nothing(&cgroup.root, &when) {
            whole += 1;
            // Cgroups are mapped before anything is attached: attached means enforced.
            sockets += assert_steered(&web, &peer, range, &when);
        } else {
            none += 1;
            assert!(fresh, "{when}: the adopted installation lost its links");
        }
        let mut next = Daemon::start(&cgroup, &text);
        let line = next.wait_for_log("ready", Duration::from_secs(5));
        assert!(!line.is_empty());
        assert_clean_pins(&cgroup, &when);
        sockets += assert_steered(&web, &peer, range, &when);
        assert_eq!(next.status()["scopes"][0]["name"], "web", "{when}");
        let (code, _) = next.stop();
        assert_eq!(code, Some(0));
        if !fresh {
            let out = uninstall(&cgroup);
            assert!(out.contains("removed 5 link(s) and 12 map(s)"), "{out}");
            assert!(
                !reserved_any(2100, 2109),
                "reservation left after uninstall"
            );
        }
    }
    assert!(
        whole > 0 && none > 0,
        "kills never fell before and after the attach"
    );
    record(
        "faults-1-kill-during-load",
        &[format!(
            "kill -9 during start-up (start to `ready` takes {load:?} here): {KILLS} kills spread over it \
             left every hook attached {whole} times and none {none} times, never some; \
             {sockets} sockets from bind(0)/connect() checked in range after each kill and restart"
        )],
    );
}

#[test]
fn kill_9_during_a_reload_leaves_old_or_new_ranges_and_a_restart_applies_the_file() {
    if !privileged("kill_9_during_a_reload_leaves_old_or_new_ranges_and_a_restart_applies_the_file")
    {
        return;
    }
    let cgroup = TestCgroup::new("killreload");
    let web = cgroup.child("web");
    let db = cgroup.child("db");
    let peer = LoopbackPeer::new(2901);
    // Both scopes move to another range with every reload; ten filler scopes make the reload
    // write more.
    let policy = |second: bool| {
        let (w, d) = if second {
            ("2120-2129", "2140-2149")
        } else {
            ("2110-2119", "2130-2139")
        };
        let mut text = scope("web", &cgroup.rel("web"), w) + &scope("db", &cgroup.rel("db"), d);
        for i in 0..10u16 {
            let lo = 2150 + i * 5 + if second { 0 } else { 50 };
            text += &scope(
                &format!("filler{i}"),
                &cgroup.rel(&format!("filler{i}")),
                &format!("{lo}-{}", lo + 4),
            );
        }
        text
    };
    let ranges = |second: bool| {
        if second {
            ((2120, 2129), (2140, 2149))
        } else {
            ((2110, 2119), (2130, 2139))
        }
    };
    let mut daemon = Daemon::start(&cgroup, &policy(false));
    let (mut kills, mut sockets) = (0, 0);
    for round in 0..8u32 {
        let second = round % 2 == 0;
        daemon.write_policy(&policy(second));
        daemon.signal(libc::SIGHUP);
        // From the signal to well past the end of a reload.
        std::thread::sleep(Duration::from_micros(u64::from(round) * 1500));
        let log = kill9(daemon);
        kills += 1;
        let when = format!("round {round}, log:\n{log}");
        assert_eq!(portguard_programs(&cgroup.root), [1, 1, 1, 1, 1], "{when}");
        // Each scope is in its old range or its new one, never unscoped or elsewhere.
        let (old, new) = (ranges(!second), ranges(second));
        for (dir, old, new) in [(&web, old.0, new.0), (&db, old.1, new.1)] {
            let r = probe(
                dir,
                &[
                    "bind",
                    "udp",
                    "0",
                    "connect",
                    "tcp",
                    &peer.arg(),
                    "linger0",
                    "1",
                ],
            );
            for result in &r {
                assert_eq!(errno(result), 0, "{when}: {result}");
                assert!(
                    in_range(port(result), old) || in_range(port(result), new),
                    "{when}: outside both {old:?} and {new:?}: {result}"
                );
            }
            sockets += r.len();
        }
        // The restarted daemon applies the file as it is now: the new ranges, and nobody owns
        // the old ones any more.
        daemon = Daemon::start(&cgroup, &policy(second));
        assert_clean_pins(&cgroup, &when);
        sockets += assert_steered(&web, &peer, new.0, &when);
        sockets += assert_steered(&db, &peer, new.1, &when);
        let r = probe(
            &cgroup.root,
            &[
                "bind",
                "tcp",
                &old.0.0.to_string(),
                "bind",
                "tcp",
                &new.0.0.to_string(),
            ],
        );
        assert_eq!(errno(&r[0]), 0, "{when}: the old range is free: {}", r[0]);
        assert_eq!(
            errno(&r[1]),
            EPERM,
            "{when}: the new range is owned: {}",
            r[1]
        );
        let status = daemon.status();
        assert_eq!(
            status["scopes"].as_array().map(Vec::len),
            Some(12),
            "{status}"
        );
    }
    drop(daemon);
    record(
        "faults-2-kill-during-reload",
        &[format!(
            "kill -9 during a reload (SIGHUP, then 0-10.5 ms): {kills} kills; every scope kept its \
             old or its new range, and each restart applied the file in full; {sockets} sockets checked"
        )],
    );
}

/// Event lines the daemon logged for probe processes (RUST_LOG=debug logs every event).
fn probe_event_lines(log: &str) -> u64 {
    log.lines()
        .filter(|line| line.contains(" (pg-probe) cgroup "))
        .count() as u64
}

#[test]
fn kill_9_under_an_event_flood_keeps_enforcing_and_every_event_is_read_or_counted_lost() {
    if !privileged(
        "kill_9_under_an_event_flood_keeps_enforcing_and_every_event_is_read_or_counted_lost",
    ) {
        return;
    }
    let cgroup = TestCgroup::new("killflood");
    let flood = cgroup.child("flood");
    let web = cgroup.child("web");
    let peer = LoopbackPeer::new(2902);
    let text = scope("flood", &cgroup.rel("flood"), "2250-2259")
        + &scope("web", &cgroup.rel("web"), "2260-2269");
    // A small ring buffer (4 pages), so that the flood overflows it while no daemon reads.
    let extra = ["--events-buffer", "16384"];
    let mut first = spawn_daemon(&cgroup, &text, &extra, None);
    first.wait_for_log("ready", Duration::from_secs(30));
    let stop = StopFile::new(&cgroup, "stop");
    // The flood: 100,000 binds on a bound socket, paced to last about 0.7 s: one event each,
    // and one for the first bind and one for the socket's release.
    const FLOOD: u64 = 100_000;
    let mut producer = RunningProbe::spawn(
        &flood,
        &["rebind-paced", "udp", "0", &FLOOD.to_string(), "150000"],
    );
    // Through it all, a scoped child connects new sockets and checks every port.
    let checker = {
        let (web, stop, peer) = (web.clone(), stop.arg().to_owned(), peer.arg());
        std::thread::spawn(move || {
            probe(
                &web,
                &["connect-until", &stop, &peer, "udp", "2260", "2269"],
            )
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let first_log = kill9(first);
    // The flood ends while no daemon reads. (During a restart's handover, when the old and the
    // new programs both run, a bind(0) is steered by one and judged again, as an explicit bind,
    // by the other: two events for one call, which would blur the count here.)
    let flooded = producer.next_result();
    producer.finish();
    let mut second = spawn_daemon(&cgroup, &text, &extra, None);
    second.wait_for_log("ready", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(200));
    stop.stop();
    let checked = checker.join().expect("checker")[0].clone();
    assert_eq!(
        checked["outside"], 0,
        "a socket escaped its range: {checked}"
    );
    assert_eq!(checked["failures"], 0, "{checked}");
    assert_eq!(
        flooded["failures"], FLOOD,
        "each rebind fails EINVAL: {flooded}"
    );
    assert_clean_pins(&cgroup, "after the restart");
    // Every event emitted was read by one of the daemons or counted lost. A record can be logged
    // by the killed daemon an instant before it would have been marked read, and the next daemon
    // then reads it again: at most one event counted twice, none missing. Wait (10 s at most)
    // until the second daemon has read what the ring holds.
    let connects = checked["count"].as_u64().expect("count");
    let emitted = FLOOD + 2 + 2 * connects;
    let start = Instant::now();
    let (received, lost) = loop {
        let lost = second.status()["lost_events"]
            .as_u64()
            .expect("lost_events");
        let received = probe_event_lines(&first_log) + probe_event_lines(&second.log());
        let accounted = received + lost;
        if accounted == emitted || accounted == emitted + 1 {
            break (received, lost);
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "emitted {emitted}, received {received} ({} by the killed daemon), lost {lost}",
            probe_event_lines(&first_log)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // Nothing more arrives afterwards either.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        probe_event_lines(&first_log) + probe_event_lines(&second.log()),
        received
    );
    let kernel_lost = PinnedMap::open(&cgroup.pin_path().join("LOST_EVENTS")).per_cpu_u64_sum(0);
    assert_eq!(
        lost, kernel_lost,
        "status and the kernel's LOST_EVENTS agree"
    );
    assert!(
        lost > 0,
        "the flood overflowed the ring while no daemon read it"
    );
    let steered = second.status()["scopes"][1]["steered"]
        .as_u64()
        .expect("steered");
    assert_eq!(steered, connects, "counters carried over the kill");
    record(
        "faults-3-kill-under-flood",
        &[format!(
            "kill -9 under an event flood (16 KiB ring): {emitted} events emitted, {received} read by \
             the killed and the restarted daemon, {lost} counted lost (status = kernel LOST_EVENTS); \
             {connects} connects through the kill and restart, 0 outside their range"
        )],
    );
}

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
    assert_eq!(portguard_programs(&cgroup.root), [0; 5]);
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
    assert_eq!(portguard_programs(&cgroup.root), [0; 5]);
    assert!(!reserved_any(2270, 2279));
    record(
        "faults-4-bpffs",
        &[format!(
            "bpffs missing: the daemon mounted it, survived kill -9 and was adopted ({sockets} sockets \
             checked in range); a pin path on no bpffs was refused with nothing attached or reserved"
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
        assert_eq!(portguard_programs(&cgroup.root), [0; 5]);
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
    assert_eq!(portguard_programs(&cgroup.root), [1; 5]);
    let mut sockets = assert_steered(&web, &peer, (2280, 2289), "read-only cgroup2");
    // A cgroup made later (outside the namespace) is still followed.
    let late = cgroup.child("late");
    daemon.wait_for_log("scope late: cgroup", Duration::from_secs(5));
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
        log.contains("removed the 12 map(s) this daemon pinned"),
        "{log}"
    );
    // Only the foreign program is attached, nothing is pinned or reserved, and the scope's
    // sockets are as they would be without portguard.
    assert_eq!(portguard_programs(&cgroup.root), [0, 1, 0, 0, 0]);
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
            "a cgroup another program holds exclusively: start refused, 0 of 5 programs left \
             attached, 0 pins, 0 ports reserved; {} sockets checked",
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
                if status["last_reload"]["ok"] == false {
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
        assert_eq!(portguard_programs(&cgroup.root), [1; 5], "{how}");
    };
    let name = path.display().to_string();
    std::fs::remove_file(&path).expect("delete the policy");
    refused(
        "deleted, SIGHUP",
        &format!("cannot open policy {name}"),
        true,
    );
    refused(
        "deleted, reload",
        &format!("cannot open policy {name}"),
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
    let attach = cgroup.child("attach");
    let web = cgroup.child("attach/web");
    let peer = LoopbackPeer::new(2908);
    let at = ["--cgroup", attach.to_str().expect("utf-8")];
    let text = |range: &str| scope("web", &cgroup.rel("attach/web"), range);
    let mut first = spawn_daemon(&cgroup, &text("2340-2344"), &at, None);
    first.wait_for_log("ready", Duration::from_secs(30));
    let (code, _) = first.stop();
    assert_eq!(code, Some(0));
    // Another tool then holds connect4 exclusively on the parent cgroup: the kernel refuses
    // any new program on that hook below it, while the ones already there keep running.
    let foreign = bpf_raw::prog_load(
        bpf_raw::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        BPF_CGROUP_INET4_CONNECT,
        "foreign_conn",
        &[bpf_raw::Insn::mov(0, 1), bpf_raw::Insn::exit()],
    );
    bpf_raw::prog_attach(&foreign, &cgroup.root, BPF_CGROUP_INET4_CONNECT, 0)
        .expect("exclusive attach on the parent");
    let (code, log) =
        spawn_daemon(&cgroup, &text("2345-2349"), &at, None).wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("no program of this daemon stays attached"),
        "{log}"
    );
    assert!(
        log.contains("stay attached, enforcing the maps as this daemon left them"),
        "{log}"
    );
    // The earlier links, one per hook, enforce the refused daemon's policy, whole: its range,
    // and the old range owned by nobody.
    assert_eq!(portguard_programs(&attach), [1; 5]);
    assert_clean_pins_at(&cgroup, &attach);
    let sockets = assert_steered(&web, &peer, (2345, 2349), "after the refused restart");
    let r = probe(&attach, &["bind", "tcp", "2340", "bind", "tcp", "2345"]);
    assert_eq!(errno(&r[0]), 0, "the old range is free: {}", r[0]);
    assert_eq!(errno(&r[1]), EPERM, "the new range is owned: {}", r[1]);
    bpf_raw::prog_detach(&foreign, &cgroup.root, BPF_CGROUP_INET4_CONNECT).expect("detach");
    let out = std::process::Command::new(portguard_tests::portguard_bin())
        .arg("uninstall")
        .arg("--pin-path")
        .arg(cgroup.pin_path())
        .arg("--cgroup")
        .arg(&attach)
        .output()
        .expect("run uninstall");
    assert!(out.status.success(), "{out:?}");
    record(
        "faults-9-restart-refused",
        &[format!(
            "a restart refused at attach (another tool's exclusive program on the parent): the \
             earlier links stayed, one per hook, enforcing the new policy whole; {} calls checked",
            sockets + r.len()
        )],
    );
}
