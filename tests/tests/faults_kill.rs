//! End-to-end faults: the daemon killed with SIGKILL while it loads, while it reloads and under
//! an event flood. Each kill must leave all of portguard's hooks or none, every scope in its
//! range (old or new), and a restart that adopts the pins and is correct; no event may go
//! unaccounted.
//!
//! Ports 2100-2269 and 2350-2359 (scope ranges) and 2900-2902 (loopback peers), each test its
//! own, so that tests running side by side never meet in a port or in ip_local_reserved_ports.

use std::time::{Duration, Instant};

use portguard_tests::{
    Daemon, EPERM, RunningProbe, TestCgroup,
    bpf_query::portguard_programs,
    bpf_raw::PinnedMap,
    checks::{
        assert_clean_pins, assert_steered, assert_whole_or_nothing, in_range, scope, uninstall,
    },
    errno,
    faults::{LoopbackPeer, StopFile, kill9, reserved_any, spawn_daemon},
    port, privileged, probe,
    reliability::record,
};

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
    uninstall(&cgroup, &cgroup.root);

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
        let next = Daemon::start(&cgroup, &text);
        assert_clean_pins(&cgroup, &cgroup.root, &when);
        sockets += assert_steered(&web, &peer, range, &when);
        assert_eq!(next.status()["scopes"][0]["name"], "web", "{when}");
        let (code, _) = next.stop();
        assert_eq!(code, Some(0));
        if !fresh {
            let out = uninstall(&cgroup, &cgroup.root);
            assert!(
                out.contains(&format!(
                    "removed {} link(s) and {} map(s)",
                    portguard_tests::bpf_query::PORTGUARD_LINK_COUNT,
                    portguard_tests::bpf_query::PORTGUARD_MAP_COUNT
                )),
                "{out}"
            );
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
            "kill -9 during start-up (start to `ready` takes {} ms here): {KILLS} kills spread over it \
             left every hook attached {whole} times and none {none} times, never some; \
             {sockets} sockets from bind(0)/connect() checked in range after each kill and restart",
            load.as_millis()
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
        assert_eq!(
            portguard_programs(&cgroup.root),
            portguard_tests::bpf_query::ALL_ATTACHED,
            "{when}"
        );
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
        assert_clean_pins(&cgroup, &cgroup.root, &when);
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
    assert_clean_pins(&cgroup, &cgroup.root, "after the restart");
    // Every event emitted was read by one of the daemons or counted lost. A record can be logged
    // by the killed daemon an instant before it would have been marked read, and the next daemon
    // then reads it again: at most one event counted twice, none missing. Wait (10 s at most)
    // until the second daemon has read what the ring holds.
    let connects = checked["count"].as_u64().expect("count");
    let emitted = FLOOD + 2 + 2 * connects;
    let start = Instant::now();
    let read = |daemon: &portguard_tests::Daemon| {
        let status = daemon.status();
        (
            probe_event_lines(&first_log) + status["events_received"].as_u64().expect("received"),
            status["lost_events"].as_u64().expect("lost_events"),
        )
    };
    let (received, lost) = loop {
        let (received, lost) = read(&second);
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
    assert_eq!(read(&second), (received, lost));
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
fn a_restart_under_a_bind_flood_judges_every_call_once() {
    if !privileged("a_restart_under_a_bind_flood_judges_every_call_once") {
        return;
    }
    let cgroup = TestCgroup::new("handover");
    let flood = cgroup.child("flood");
    let text = scope("flood", &cgroup.rel("flood"), "2350-2359");
    let extra = ["--events-buffer", "16384"];
    let mut first = spawn_daemon(&cgroup, &text, &extra, None);
    first.wait_for_log("ready", Duration::from_secs(30));
    // bind(0) on a bound socket, over and over, flat out (a paced flood pauses between bursts,
    // and could miss the handover): each call is steered once, then fails EINVAL.
    const FLOOD: u64 = 4_000_000;
    let mut producer =
        RunningProbe::spawn(&flood, &["rebind-loop", "udp", "0", &FLOOD.to_string()]);
    std::thread::sleep(Duration::from_millis(300));
    let (code, first_log) = first.stop();
    assert_eq!(code, Some(0), "{first_log}");
    // The restart hands the hooks over while the flood goes on.
    let mut second = spawn_daemon(&cgroup, &text, &extra, None);
    second.wait_for_log("ready", Duration::from_secs(30));
    let state =
        std::fs::read_to_string(format!("/proc/{}/stat", producer.pid())).expect("producer stat");
    assert!(
        !state.contains(") Z "),
        "the flood ended before the handover: make it longer"
    );
    let flooded = producer.next_result();
    producer.finish();
    assert_eq!(flooded["failures"], FLOOD, "{flooded}");
    assert!(
        second.log().contains(&format!(
            "replaced {} link(s)",
            portguard_tests::bpf_query::PORTGUARD_LINK_COUNT
        )),
        "{}",
        second.log()
    );
    assert_clean_pins(&cgroup, &cgroup.root, "after the restart");
    // No call was judged twice: had the earlier programs and the new ones both run, the second
    // would have seen the port the first chose and counted an explicit bind, allowed.
    let scope = second.status()["scopes"][0].clone();
    assert_eq!(scope["steered"], FLOOD + 1, "{scope}");
    assert_eq!(scope["allowed"], 0, "{scope}");
    // And so exactly one event per call (and one for the socket's release): read by one of the
    // two daemons, or counted lost.
    let emitted = FLOOD + 2;
    let start = Instant::now();
    let (received, lost) = loop {
        let status = second.status();
        let lost = status["lost_events"].as_u64().expect("lost_events");
        let received =
            probe_event_lines(&first_log) + status["events_received"].as_u64().expect("received");
        if received + lost >= emitted {
            break (received, lost);
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "emitted {emitted}, received {received}, lost {lost}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(received + lost, emitted, "received {received}, lost {lost}");
    record(
        "faults-3b-restart-under-flood",
        &[format!(
            "a restart (SIGTERM, start) under a flat-out flood of {FLOOD} bind(0) calls: each judged once \
             through the handover (steered {}, allowed 0); {emitted} events emitted, {received} \
             read by the two daemons, {lost} counted lost",
            FLOOD + 1
        )],
    );
}
