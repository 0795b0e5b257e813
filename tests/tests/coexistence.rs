//! End-to-end: portguard next to another tool's cgroup program on the same cgroup, as systemd's
//! socket-bind filter (`SocketBindDeny=`) would put there. PID 1 here is not systemd, so the test
//! loads such a program itself: a hand-assembled `cgroup/bind4` program refusing one port,
//! attached as a BPF link or with `BPF_PROG_ATTACH` and `BPF_F_ALLOW_MULTI` (what systemd uses
//! when links are not available). Both tools' decisions must hold in every order: the foreign
//! program before and after the daemon starts, across a reload and a restart, and after
//! `portguard uninstall`, which must leave it attached.
//!
//! Ports 2910-2942 and the loopback peer 2950.

use std::path::Path;

use portguard_tests::{
    Daemon, EPERM, TestCgroup,
    bpf_query::{BPF_CGROUP_INET4_BIND, portguard_programs},
    bpf_raw::{self, BPF_F_ALLOW_MULTI},
    checks::uninstall,
    errno,
    faults::{LoopbackPeer, kill9},
    port, privileged, probe,
    reliability::record,
};

fn policy(cgroup: &TestCgroup, db_range: &str) -> String {
    format!(
        "[[scope]]\nname = \"web\"\ncgroup = \"{}\"\nephemeral = \"2910-2919\"\n\
         [[scope]]\nname = \"db\"\ncgroup = \"{}\"\nephemeral = \"{db_range}\"\n",
        cgroup.rel("web"),
        cgroup.rel("db"),
    )
}

/// What each tool decides, seen from a scoped and an unscoped process; returns the calls made.
/// `portguard` and `foreign_web` say whether portguard and the program on `web` are attached.
fn assert_decisions(
    cgroup: &TestCgroup,
    peer: &LoopbackPeer,
    portguard: bool,
    foreign_web: bool,
    when: &str,
) -> usize {
    let (web, outside) = (cgroup.root.join("web"), cgroup.root.join("outside"));
    let r = probe(
        &web,
        &[
            "bind",
            "tcp",
            "2940", // the foreign program at the root refuses it
            "bind",
            "udp",
            "2941", // the one on web refuses it
            "bind",
            "tcp",
            "2942", // nobody's: allowed
            "bind",
            "udp",
            "0", // steered by portguard
            "connect",
            "udp",
            &peer.arg(), // steered by portguard
            "bind",
            "tcp",
            "2925", // db's range: portguard refuses it
        ],
    );
    let expect = |i: usize, want: i64, what: &str| {
        assert_eq!(errno(&r[i]), want, "{when}: {what}: {}", r[i]);
    };
    expect(0, EPERM, "the foreign program's port");
    expect(1, if foreign_web { EPERM } else { 0 }, "web's foreign port");
    expect(2, 0, "a port nobody claims");
    for result in &r[3..5] {
        assert_eq!(errno(result), 0, "{when}: {result}");
        assert_eq!(
            (2910..=2919).contains(&port(result)),
            portguard,
            "{when}: steered only with portguard: {result}"
        );
    }
    expect(
        5,
        if portguard { EPERM } else { 0 },
        "another scope's range",
    );
    let o = probe(&outside, &["bind", "tcp", "2940", "bind", "tcp", "2915"]);
    assert_eq!(
        errno(&o[0]),
        EPERM,
        "{when}: unscoped, foreign port: {}",
        o[0]
    );
    assert_eq!(
        errno(&o[1]),
        if portguard { EPERM } else { 0 },
        "{when}: unscoped into a scope's range: {}",
        o[1]
    );
    r.len() + o.len()
}

fn bind_ids(dir: &Path) -> Vec<u32> {
    let mut ids = bpf_raw::attached_ids(dir, BPF_CGROUP_INET4_BIND);
    ids.sort_unstable();
    ids
}

#[test]
fn a_foreign_socket_bind_filter_and_portguard_both_hold_in_every_order() {
    if !privileged("a_foreign_socket_bind_filter_and_portguard_both_hold_in_every_order") {
        return;
    }
    let cgroup = TestCgroup::new("coexist");
    let web = cgroup.child("web");
    cgroup.child("db");
    cgroup.child("outside");
    let peer = LoopbackPeer::new(2950);
    let mut calls = 0;

    // First the foreign program, as a link on the attach point, then the daemon.
    let deny_root = bpf_raw::load_bind_deny(2940);
    let root_link = bpf_raw::link_create(&deny_root, &cgroup.root, BPF_CGROUP_INET4_BIND)
        .expect("link the foreign program");
    let root_id = bpf_raw::prog_id(&deny_root);
    calls += assert_decisions(&cgroup, &peer, false, false, "foreign program alone");
    let daemon = Daemon::start(&cgroup, &policy(&cgroup, "2920-2929"));
    assert_eq!(
        portguard_programs(&cgroup.root),
        portguard_tests::bpf_query::attached_except(
            1,
            portguard_tests::bpf_query::BPF_CGROUP_INET4_BIND,
            2
        )
    );
    assert!(bind_ids(&cgroup.root).contains(&root_id));
    calls += assert_decisions(&cgroup, &peer, true, false, "foreign first, then portguard");

    // Then one attached after the daemon, the older way, on the scope's own cgroup (where
    // systemd puts a unit's filter).
    let deny_web = bpf_raw::load_bind_deny(2941);
    bpf_raw::prog_attach(&deny_web, &web, BPF_CGROUP_INET4_BIND, BPF_F_ALLOW_MULTI)
        .expect("attach with BPF_F_ALLOW_MULTI");
    let web_id = bpf_raw::prog_id(&deny_web);
    calls += assert_decisions(&cgroup, &peer, true, true, "foreign after portguard");

    // A reload that changes a scope, then a restart after kill -9 (which replaces every link).
    daemon.write_policy(&policy(&cgroup, "2920-2928"));
    let out = daemon.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    calls += assert_decisions(&cgroup, &peer, true, true, "after a reload");
    kill9(daemon);
    let mut daemon = Daemon::start(&cgroup, &policy(&cgroup, "2920-2928"));
    daemon.wait_for_log(
        &format!(
            "replaced {} link(s)",
            portguard_tests::bpf_query::PORTGUARD_LINK_COUNT
        ),
        std::time::Duration::from_secs(5),
    );
    assert_eq!(
        portguard_programs(&cgroup.root),
        portguard_tests::bpf_query::attached_except(
            1,
            portguard_tests::bpf_query::BPF_CGROUP_INET4_BIND,
            2
        )
    );
    assert!(bind_ids(&cgroup.root).contains(&root_id));
    assert_eq!(bind_ids(&web), [web_id]);
    calls += assert_decisions(&cgroup, &peer, true, true, "after a restart");

    // Uninstall takes portguard's programs only.
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");
    uninstall(&cgroup, &cgroup.root);
    assert_eq!(
        portguard_programs(&cgroup.root),
        portguard_tests::bpf_query::attached_except(
            0,
            portguard_tests::bpf_query::BPF_CGROUP_INET4_BIND,
            1
        )
    );
    assert_eq!(bind_ids(&cgroup.root), [root_id]);
    assert_eq!(bind_ids(&web), [web_id]);
    calls += assert_decisions(&cgroup, &peer, false, true, "after uninstall");

    // And a daemon started again next to both is as before.
    let daemon = Daemon::start(&cgroup, &policy(&cgroup, "2920-2929"));
    calls += assert_decisions(&cgroup, &peer, true, true, "started again");
    drop(daemon);
    bpf_raw::prog_detach(&deny_web, &web, BPF_CGROUP_INET4_BIND).expect("detach");
    drop(root_link);
    assert_eq!(
        bind_ids(&cgroup.root).len(),
        1,
        "only portguard's bind4 left"
    );
    assert!(bind_ids(&web).is_empty());
    record(
        "coexistence",
        &[format!(
            "coexistence with a foreign socket-bind filter (a BPF link before the daemon, a \
             BPF_F_ALLOW_MULTI program after it): {calls} bind/connect calls checked over 7 \
             phases (foreign alone, each order, reload, restart after kill -9, uninstall, start \
             again); the foreign refusals and portguard's steering and refusals all held, and \
             uninstall left the foreign programs attached"
        )],
    );
}
