//! End-to-end faults: the daemon killed while it loads, reloads and reads an event flood; bpffs
//! or cgroup2 missing or read-only; another tool's program in the way; a scope cgroup removed
//! under live sockets; the policy file deleted, truncated or renamed over. Each must end in a
//! clear log line and either a correct enforcement state or a clean refusal, checked with
//! probes (ports, errnos) and with what the kernel has attached.
//!
//! Ports 2100-2299 (scope ranges) and 2900-2949 (loopback peers), each test its own.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use portguard_tests::{
    Daemon, TestCgroup,
    bpf_query::{BPF_CGROUP_INET4_CONNECT, portguard_programs},
    bpf_raw, errno,
    faults::{LoopbackPeer, kill9, pins, reserved_any, spawn_daemon},
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
    assert_eq!(portguard_programs(&cgroup.root), [1, 1, 1, 1, 1], "{when}");
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
fn a_cgroup_another_program_holds_exclusively_is_refused_with_nothing_left_attached() {
    if !privileged(
        "a_cgroup_another_program_holds_exclusively_is_refused_with_nothing_left_attached",
    ) {
        return;
    }
    let cgroup = TestCgroup::new("exclusive");
    let web = cgroup.child("web");
    let peer = LoopbackPeer::new(2905);
    let text = scope("web", &cgroup.rel("web"), "2260-2269");
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
    assert!(!reserved_any(2260, 2269));
    let r = probe(&web, &["bind", "udp", "0", "connect", "udp", &peer.arg()]);
    assert!(
        r.iter()
            .all(|r| errno(r) == 0 && !in_range(port(r), (2260, 2269))),
        "no half policy steering some calls: {r:?}"
    );
    // Once the other program is gone, the daemon starts as if nothing had happened.
    bpf_raw::prog_detach(&foreign, &cgroup.root, BPF_CGROUP_INET4_CONNECT).expect("detach");
    let daemon = Daemon::start(&cgroup, &text);
    assert!(!daemon.log().contains("adopting"), "{}", daemon.log());
    let sockets = assert_steered(&web, &peer, (2260, 2269), "after the refusal");
    record(
        "faults-6-attach-refused",
        &[format!(
            "a cgroup another program holds exclusively: start refused, 0 of 5 programs left \
             attached, 0 pins, 0 ports reserved; {} sockets checked",
            sockets + r.len()
        )],
    );
}
