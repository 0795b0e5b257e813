//! The foundation's rules hold whatever family a program uses: IPv6 sockets and dual-stack
//! sockets (IPV6_V6ONLY off, IPv4 addresses as ::ffff:a.b.c.d) are steered and judged exactly
//! as IPv4 ones.

use portguard_tests::{Daemon, EADDRNOTAVAIL, EPERM, TestCgroup, pg_connect, privileged};
use serde_json::Value;

fn port(result: &Value) -> u16 {
    result["port"].as_u64().expect("port") as u16
}

fn errno(result: &Value) -> i64 {
    result["errno"].as_i64().expect("errno")
}

#[test]
fn ipv6_and_dual_stack_sockets_follow_the_same_rules() {
    if !privileged("ipv6_and_dual_stack_sockets_follow_the_same_rules") {
        return;
    }
    let cgroup = TestCgroup::new("families");
    let web = cgroup.child("web");
    let other = cgroup.child("other");
    let outside = cgroup.child("outside");
    let daemon = Daemon::start(
        &cgroup,
        &format!(
            r#"
[[scope]]
name = "web"
cgroup = "{}"
ephemeral = "28200-28203"

[[scope]]
name = "other"
cgroup = "{}"
ephemeral = "28210-28219"
"#,
            cgroup.rel("web"),
            cgroup.rel("other"),
        ),
    );
    for (family, any, loopback) in [
        ("6", "[::]", "[::1]"),
        ("dual", "[::]", "127.0.0.1"),
        ("dual", "0.0.0.0", "127.0.0.1"),
    ] {
        for proto in ["tcp", "udp"] {
            let case = format!("{proto} over family {family} bound to {any}");
            // Rule 1: port 0 lands in the scope's range.
            let r = pg_connect(&web, &["bind", proto, family, &format!("{any}:0")]);
            assert_eq!(errno(&r), 0, "{case}: bind(0): {r}");
            assert!(
                (28200..=28203).contains(&port(&r)),
                "{case}: bind(0) in range: {r}"
            );
            // Rule 3: not in another scope's range; anything else is fine.
            let r = pg_connect(&web, &["bind", proto, family, &format!("{loopback}:28212")]);
            assert_eq!(errno(&r), EPERM, "{case}: another scope's port: {r}");
            let r = pg_connect(&web, &["bind", proto, family, &format!("{loopback}:28250")]);
            assert_eq!(
                (errno(&r), port(&r)),
                (0, 28250),
                "{case}: a free port: {r}"
            );
            // Rule 4: a socket in no scope may not take a scope's port.
            let r = pg_connect(&outside, &["bind", proto, family, &format!("{any}:28201")]);
            assert_eq!(errno(&r), EPERM, "{case}: unscoped into a range: {r}");
            // Rule 2 with sharing, over the family: an unbound connect lands in range.
            let peer = std::net::TcpListener::bind(format!("{loopback}:0"))
                .or_else(|_| std::net::TcpListener::bind("127.0.0.1:0"))
                .expect("listener");
            let udp_peer = std::net::UdpSocket::bind(format!("{loopback}:0")).expect("udp peer");
            let dest = if proto == "tcp" {
                peer.local_addr().expect("addr").to_string()
            } else {
                udp_peer.local_addr().expect("addr").to_string()
            };
            let r = pg_connect(&other, &["hold", proto, family, "1", &dest]);
            let connected = r["connected"].as_array().expect("connected");
            assert_eq!(connected.len(), 1, "{case}: connect: {r}");
            let source = connected[0][0].as_u64().expect("port") as u16;
            assert!(
                (28210..=28219).contains(&source),
                "{case}: connect source in range: {r}"
            );
        }
    }
    // The events name the family and the IPv6 remote address.
    let events = daemon.events();
    assert!(
        events.iter().any(|event| event["op"] == "connect"
            && event["verdict"] == "steered"
            && event["family"] == "ipv6"
            && event["remote_addr"] == "::1"),
        "a steered IPv6 connect to ::1 among the events: {events:?}"
    );
    assert!(
        events.iter().any(|event| event["op"] == "connect"
            && event["family"] == "ipv6"
            && event["remote_addr"] == "::ffff:127.0.0.1"),
        "a dual-stack connect shows the mapped address: {events:?}"
    );
    // Rule 5: a full range fails like the kernel's allocator, with EADDRNOTAVAIL: four IPv6
    // bind(0)s take the four ports, the fifth finds none.
    for proto in ["tcp", "udp"] {
        let r = pg_connect(&web, &["bind-hold", proto, "6", "5", "[::]:0"]);
        let mut ports: Vec<u64> = r["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .map(|port| port.as_u64().expect("port"))
            .collect();
        ports.sort_unstable();
        assert_eq!(
            ports,
            [28200, 28201, 28202, 28203],
            "{proto}: the whole range: {r}"
        );
        assert_eq!(errno(&r), EADDRNOTAVAIL, "{proto}: then exhaustion: {r}");
    }
}
