//! Checks the reliability tests make after every fault: scoped sockets in their range,
//! portguard's hooks all attached or none, one clean set of pins, and `portguard uninstall`.

use std::path::Path;

use crate::{
    TestCgroup,
    bpf_query::portguard_programs,
    errno,
    faults::{LoopbackPeer, pins},
    port, portguard_bin, probe,
};

/// A `[[scope]]` table with an ephemeral range.
pub fn scope(name: &str, cgroup: &str, range: &str) -> String {
    format!("[[scope]]\nname = \"{name}\"\ncgroup = \"{cgroup}\"\nephemeral = \"{range}\"\n")
}

pub fn in_range(port: u16, (lo, hi): (u16, u16)) -> bool {
    (lo..=hi).contains(&port)
}

/// bind(0) and connect() of TCP and UDP in `dir`: every port must lie in `range`. Returns the
/// number of sockets checked.
pub fn assert_steered(dir: &Path, peer: &LoopbackPeer, range: (u16, u16), when: &str) -> usize {
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
/// Returns whether they are attached.
pub fn assert_whole_or_nothing(dir: &Path, when: &str) -> bool {
    let attached = portguard_programs(dir);
    let whole = attached.iter().all(|&n| n >= 1);
    assert!(
        whole || attached.iter().all(|&n| n == 0),
        "{when}: some hooks enforced without the others: {attached:?}"
    );
    whole
}

/// Exactly one portguard program per hook at `attach`, and the pins hold one link per hook and
/// no staged leftovers.
pub fn assert_clean_pins(cgroup: &TestCgroup, attach: &Path, when: &str) {
    assert_eq!(
        portguard_programs(attach),
        crate::bpf_query::ALL_ATTACHED,
        "{when}"
    );
    let pins = pins(cgroup);
    assert_eq!(
        pins.iter().filter(|p| p.starts_with("link_")).count(),
        crate::bpf_query::PORTGUARD_LINK_COUNT,
        "{when}: {pins:?}"
    );
    assert!(
        !pins.iter().any(|p| p.contains("_staged_")),
        "{when}: {pins:?}"
    );
}

/// `portguard uninstall` of the test's pins, checking nothing is left attached at `attach`;
/// returns its output.
pub fn uninstall(cgroup: &TestCgroup, attach: &Path) -> String {
    let out = std::process::Command::new(portguard_bin())
        .arg("uninstall")
        .arg("--pin-path")
        .arg(cgroup.pin_path())
        .arg("--cgroup")
        .arg(attach)
        .output()
        .expect("run uninstall");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
