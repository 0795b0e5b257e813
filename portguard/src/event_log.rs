//! Names for the kernel's event codes, and the one-line form of an event that both the daemon's
//! log and `portguard events` print, with the names an operator searches for.

use log::Level;
use portguard_common::{
    IPPROTO_TCP, IPPROTO_UDP, OP_BIND, OP_CONNECT, OP_POOL, OP_RELEASE, OP_SENDMSG,
    VERDICT_ALLOWED, VERDICT_AUDIT_WOULD_DENY, VERDICT_AUTOBOUND, VERDICT_DENIED,
    VERDICT_EXHAUSTED, VERDICT_OBSERVED, VERDICT_RELEASED, VERDICT_STEERED,
};

use crate::protocol::EventRecord;

pub fn verdict_name(verdict: u8) -> &'static str {
    match verdict {
        VERDICT_ALLOWED => "allowed",
        VERDICT_STEERED => "steered",
        VERDICT_DENIED => "denied",
        VERDICT_EXHAUSTED => "exhausted",
        VERDICT_AUDIT_WOULD_DENY => "audit-would-deny",
        VERDICT_OBSERVED => "observed",
        VERDICT_AUTOBOUND => "autobound",
        VERDICT_RELEASED => "released",
        _ => "unknown",
    }
}

pub fn op_name(op: u8) -> &'static str {
    match op {
        OP_BIND => "bind",
        OP_CONNECT => "connect",
        OP_SENDMSG => "sendmsg",
        OP_RELEASE => "release",
        OP_POOL => "pool",
        _ => "unknown",
    }
}

pub fn protocol_name(protocol: u8) -> &'static str {
    match protocol {
        IPPROTO_TCP => "tcp",
        IPPROTO_UDP => "udp",
        _ => "other",
    }
}

/// The level to log an event at: refusals and observations always, routine decisions only when
/// debugging.
pub fn level(verdict: &str) -> Level {
    match verdict {
        "denied" | "exhausted" | "audit-would-deny" | "autobound" | "observed" => Level::Info,
        _ => Level::Debug,
    }
}

pub fn describe(event: &EventRecord) -> String {
    let scope = match &event.scope {
        Some(name) => format!("scope {name}"),
        None => "no scope".to_owned(),
    };
    let mut line = format!(
        "{} {} {}: pid {} ({}) cgroup {} {}, local port {}",
        event.verdict,
        event.protocol,
        event.op,
        event.tgid,
        event.comm,
        event.cgroup_id,
        scope,
        event.local_port,
    );
    if let (Some(addr), Some(port)) = (&event.remote_addr, event.remote_port) {
        line += &format!(", remote {addr}:{port}");
    }
    if event.attempts > 0 {
        line += &format!(", {} port(s) tried", event.attempts);
    }
    if event.errno != 0 {
        line += &format!(", errno {}", std::io::Error::from_raw_os_error(event.errno));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_a_steered_connect() {
        let event = EventRecord {
            ts_ns: 1,
            time: "2026-01-01T00:00:00Z".into(),
            tgid: 42,
            pid: 42,
            comm: "curl".into(),
            cgroup_id: 7,
            scope_id: Some(0),
            scope: Some("web".into()),
            family: "ipv4".into(),
            protocol: "tcp".into(),
            op: "connect".into(),
            local_port: 40001,
            remote_addr: Some("127.0.0.1".into()),
            remote_port: Some(8080),
            verdict: "steered".into(),
            attempts: 3,
            errno: 0,
        };
        assert_eq!(
            describe(&event),
            "steered tcp connect: pid 42 (curl) cgroup 7 scope web, local port 40001, remote 127.0.0.1:8080, 3 port(s) tried"
        );
        assert_eq!(level(&event.verdict), Level::Debug);
        assert_eq!(level("denied"), Level::Info);
    }
}
