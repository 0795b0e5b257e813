//! Turning kernel events into log lines an operator can search (scope, cgroup, port).

use std::net::Ipv4Addr;

use log::Level;
use portguard_common::{
    Event, IPPROTO_TCP, IPPROTO_UDP, NO_SCOPE, OP_BIND, OP_CONNECT, OP_SENDMSG, VERDICT_ALLOWED,
    VERDICT_AUDIT_WOULD_DENY, VERDICT_AUTOBOUND, VERDICT_DENIED, VERDICT_EXHAUSTED,
    VERDICT_OBSERVED, VERDICT_STEERED,
};

pub fn verdict_name(verdict: u8) -> &'static str {
    match verdict {
        VERDICT_ALLOWED => "allowed",
        VERDICT_STEERED => "steered",
        VERDICT_DENIED => "denied",
        VERDICT_EXHAUSTED => "exhausted",
        VERDICT_AUDIT_WOULD_DENY => "audit-would-deny",
        VERDICT_OBSERVED => "observed",
        VERDICT_AUTOBOUND => "autobound",
        _ => "unknown",
    }
}

pub fn op_name(op: u8) -> &'static str {
    match op {
        OP_BIND => "bind",
        OP_CONNECT => "connect",
        OP_SENDMSG => "sendmsg",
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

/// The level to log an event at: refusals always, routine decisions only when debugging.
pub fn level(event: &Event) -> Level {
    match event.verdict {
        VERDICT_DENIED
        | VERDICT_EXHAUSTED
        | VERDICT_AUDIT_WOULD_DENY
        | VERDICT_AUTOBOUND
        | VERDICT_OBSERVED => Level::Info,
        _ => Level::Debug,
    }
}

/// One line describing `event`; `scope_name` maps scope ids to names.
pub fn describe(event: &Event, scope_name: impl Fn(u32) -> Option<String>) -> String {
    let comm_len = event.comm.iter().position(|&b| b == 0).unwrap_or(16);
    let comm = String::from_utf8_lossy(&event.comm[..comm_len]);
    let scope = if event.scope_id == NO_SCOPE {
        "no scope".to_owned()
    } else {
        format!(
            "scope {}",
            scope_name(event.scope_id).unwrap_or_else(|| format!("#{}", event.scope_id))
        )
    };
    let mut line = format!(
        "{} {} {}: pid {} ({}) cgroup {} {}, local port {}",
        verdict_name(event.verdict),
        protocol_name(event.protocol),
        op_name(event.op),
        event.tgid,
        comm,
        event.cgroup_id,
        scope,
        event.local_port,
    );
    if event.op != OP_BIND {
        let remote = Ipv4Addr::from(<[u8; 4]>::try_from(&event.remote_addr[..4]).unwrap_or([0; 4]));
        line += &format!(", remote {remote}:{}", event.remote_port);
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
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        let event = Event {
            tgid: 42,
            pid: 42,
            cgroup_id: 7,
            scope_id: 0,
            attempts: 3,
            remote_addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            comm,
            local_port: 40001,
            remote_port: 8080,
            protocol: IPPROTO_TCP,
            op: OP_CONNECT,
            verdict: VERDICT_STEERED,
            ..Event::default()
        };
        assert_eq!(
            describe(&event, |_| Some("web".into())),
            "steered tcp connect: pid 42 (curl) cgroup 7 scope web, local port 40001, remote 127.0.0.1:8080, 3 port(s) tried"
        );
        assert_eq!(level(&event), Level::Debug);
    }
}
