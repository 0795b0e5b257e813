//! Shared ports (`share = true`, the default): a scope's range carries one connection per
//! destination on each port, as the kernel's own allocator does, over IPv4, IPv6 and dual-stack
//! sockets, and never a duplicate connection.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{SocketAddr, TcpListener, UdpSocket},
    thread,
};

use portguard_tests::{Daemon, EADDRNOTAVAIL, TestCgroup, pg_connect, privileged};
use serde_json::Value;

const HOLD: (u16, u16) = (28000, 28007);
const CHURN: (u16, u16) = (28100, 28115);

fn policy(cgroup: &TestCgroup) -> String {
    format!(
        r#"
[[scope]]
name = "proxy"
cgroup = "{}"
ephemeral = "{}-{}"

[[scope]]
name = "churn"
cgroup = "{}"
ephemeral = "{}-{}"
"#,
        cgroup.rel("proxy"),
        HOLD.0,
        HOLD.1,
        cgroup.rel("churn"),
        CHURN.0,
        CHURN.1,
    )
}

/// Four peers of `proto` on the loopback address of `ip`, outside every test cgroup.
/// TCP peers only listen; they never accept, so connections stay open until the client exits.
fn peers(proto: &str, ip: &str) -> (Vec<String>, Vec<Box<dyn std::any::Any>>) {
    let mut addrs = vec![];
    let mut keep: Vec<Box<dyn std::any::Any>> = vec![];
    for _ in 0..4 {
        let addr: SocketAddr = format!("{ip}:0").parse().expect("address");
        let local = if proto == "tcp" {
            let listener = TcpListener::bind(addr).expect("listen");
            let local = listener.local_addr().expect("addr");
            keep.push(Box::new(listener));
            local
        } else {
            let socket = UdpSocket::bind(addr).expect("udp bind");
            let local = socket.local_addr().expect("addr");
            keep.push(Box::new(socket));
            local
        };
        addrs.push(local.to_string());
    }
    (addrs, keep)
}

/// Four TCP listeners that accept and close at once, so the server side closes first and the
/// client's connections leave no TIME_WAIT behind.
fn closing_listeners(ip: &str) -> Vec<String> {
    (0..4)
        .map(|_| {
            let listener = TcpListener::bind(format!("{ip}:0")).expect("listen");
            let addr = listener.local_addr().expect("addr").to_string();
            thread::spawn(move || {
                for stream in listener.incoming() {
                    drop(stream);
                }
            });
            addr
        })
        .collect()
}

fn connected(result: &Value) -> Vec<(u16, u64)> {
    result["connected"]
        .as_array()
        .expect("connected")
        .iter()
        .map(|pair| {
            (
                pair[0].as_u64().expect("port") as u16,
                pair[1].as_u64().expect("dest"),
            )
        })
        .collect()
}

#[test]
fn eight_ports_carry_thirty_two_connections_to_four_peers() {
    if !privileged("eight_ports_carry_thirty_two_connections_to_four_peers") {
        return;
    }
    let cgroup = TestCgroup::new("share32");
    let proxy = cgroup.child("proxy");
    cgroup.child("churn");
    let _daemon = Daemon::start(&cgroup, &policy(&cgroup));
    let cases = [
        ("tcp", "4", "127.0.0.1"),
        ("tcp", "6", "[::1]"),
        ("tcp", "dual", "127.0.0.1"),
        ("udp", "4", "127.0.0.1"),
        ("udp", "6", "[::1]"),
        ("udp", "dual", "127.0.0.1"),
    ];
    for (proto, family, ip) in cases {
        let case = format!("{proto} over family {family}");
        let (dests, _keep) = peers(proto, ip);
        let mut args = vec!["hold", proto, family, "33"];
        args.extend(dests.iter().map(String::as_str));
        let result = pg_connect(&proxy, &args);
        let pairs = connected(&result);
        assert_eq!(pairs.len(), 32, "{case}: 32 connections succeed: {result}");
        assert_eq!(
            result["errno"].as_i64(),
            Some(EADDRNOTAVAIL),
            "{case}: the 33rd fails as the kernel would: {result}"
        );
        assert!(
            pairs
                .iter()
                .all(|(port, _)| (HOLD.0..=HOLD.1).contains(port)),
            "{case}: every source port in range: {pairs:?}"
        );
        let unique: BTreeSet<_> = pairs.iter().collect();
        assert_eq!(
            unique.len(),
            32,
            "{case}: no duplicate connection: {pairs:?}"
        );
        let mut per_port = BTreeMap::new();
        for (port, _) in &pairs {
            *per_port.entry(*port).or_insert(0) += 1;
        }
        assert_eq!(per_port.len(), 8, "{case}: all 8 ports used: {per_port:?}");
        assert!(
            per_port.values().all(|&n| n == 4),
            "{case}: each port carries one connection per peer: {per_port:?}"
        );
    }
}

#[test]
fn ten_thousand_connections_churn_through_sixteen_shared_ports() {
    if !privileged("ten_thousand_connections_churn_through_sixteen_shared_ports") {
        return;
    }
    let cgroup = TestCgroup::new("churn");
    cgroup.child("proxy");
    let churn = cgroup.child("churn");
    let daemon = Daemon::start(&cgroup, &policy(&cgroup));
    let lo = CHURN.0.to_string();
    let hi = CHURN.1.to_string();
    for (family, ip) in [("4", "127.0.0.1"), ("6", "[::1]"), ("dual", "127.0.0.1")] {
        let dests = closing_listeners(ip);
        let mut args = vec!["churn", "tcp", family, "10000", &lo, &hi];
        args.extend(dests.iter().map(String::as_str));
        let result = pg_connect(&churn, &args);
        assert_eq!(
            (result["failures"].as_u64(), result["outside"].as_u64()),
            (Some(0), Some(0)),
            "family {family}: every connection succeeds from the range: {result}; status {}",
            daemon.status()["scopes"]
        );
    }
}
