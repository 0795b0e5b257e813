//! Decision events through the ring buffer, and the count of those that did not fit.

use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid,
    generated::{bpf_get_current_cgroup_id, bpf_ktime_get_ns},
};
use portguard_common::Event;

use crate::{
    maps::{EVENTS, LOST_EVENTS},
    scope::add,
};

/// What a hook decided, in the terms of the event record.
pub struct Decision {
    pub op: u8,
    pub verdict: u8,
    pub scope_id: u32,
    /// `AF_INET` or `AF_INET6`: the family of the address the call named.
    pub family: u16,
    pub protocol: u8,
    pub local_port: u16,
    /// Network order; IPv4 in the first word.
    pub remote_addr: [u32; 4],
    pub remote_port: u16,
    pub attempts: u32,
    pub errno: i32,
}

#[inline(always)]
pub fn emit(decision: &Decision) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        if let Some(lost) = LOST_EVENTS.get_ptr_mut(0) {
            add(lost, 1);
        }
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let mut remote_addr = [0u8; 16];
    for (bytes, word) in remote_addr.chunks_exact_mut(4).zip(decision.remote_addr) {
        bytes.copy_from_slice(&word.to_ne_bytes());
    }
    entry.write(Event {
        // SAFETY: plain helper calls without arguments that can be wrong.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
        scope_id: decision.scope_id,
        attempts: decision.attempts,
        remote_addr,
        comm: bpf_get_current_comm().unwrap_or_default(),
        family: decision.family,
        local_port: decision.local_port,
        remote_port: decision.remote_port,
        protocol: decision.protocol,
        op: decision.op,
        verdict: decision.verdict,
        _pad: [0; 3],
        errno: decision.errno,
    });
    entry.submit(0);
}
