//! Keeping `PORT_HELD` and each scope's `held` true: ports taken by binds, given back by
//! releases, and the one path where the kernel picks a port that no hook can steer (UDP sendmsg
//! on an unbound socket).

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::bpf_get_socket_cookie,
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use portguard_common::{
    CONFIG_STRICT, IPPROTO_TCP, IPPROTO_UDP, NO_OWNER, OP_RELEASE, OP_SENDMSG, RULE_AUDIT,
    RULE_STRICT, SOCKET_COUNTED, SOCKET_EXPLICIT, SOCKET_REPORTED, SocketRecord, VERDICT_AUTOBOUND,
    VERDICT_RELEASED, held_slot,
};

use crate::{
    bind::{ALLOW, DENY, ON_INTERNAL_ERROR, refuse},
    events::{Decision, emit},
    maps::{CONFIG, SOCKETS},
    scope::{add_port_held, bump, count, current_scope, hold_port, port_owner},
};

/// After a successful bind() (not `bpf_bind`, which connect4 accounts for itself: the kernel
/// runs neither bind hook for it).
#[cgroup_sock(post_bind4)]
pub fn pg_post_bind4(ctx: SockContext) -> i32 {
    try_post_bind4(&ctx).unwrap_or(ON_INTERNAL_ERROR)
}

fn try_post_bind4(ctx: &SockContext) -> Option<i32> {
    // SAFETY: the kernel hands sock programs a valid socket.
    let sock = unsafe { &*ctx.sock };
    if sock.protocol != IPPROTO_TCP as u32 && sock.protocol != IPPROTO_UDP as u32 {
        return Some(ALLOW);
    }
    let port = sock.src_port;
    if port == 0 {
        return Some(ALLOW);
    }
    let slot = held_slot(sock.protocol, port);
    let owner = port_owner(port as u16);
    if owner != NO_OWNER {
        // SAFETY: plain helper call on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
        hold_port(cookie, slot, owner - 1, SOCKET_EXPLICIT);
        return Some(ALLOW);
    }
    // Only strict scopes need to tell explicit binds from autobinds later; every other bind on
    // the host stops here, without a cookie or a cgroup walk.
    if CONFIG.get(0)?.flags & CONFIG_STRICT == 0 {
        return Some(ALLOW);
    }
    let (_, scope) = current_scope()?;
    if let Some(scope) = scope.filter(|scope| scope.rule.flags & RULE_STRICT != 0) {
        // SAFETY: plain helper call on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
        let record = SocketRecord {
            slot,
            scope_id: scope.id as u16,
            flags: SOCKET_EXPLICIT,
        };
        let _ = SOCKETS.insert(cookie, record, BPF_NOEXIST as u64);
    }
    Some(ALLOW)
}

/// A socket closes: undo what was counted for it, in the scope it was counted in.
#[cgroup_sock(sock_release)]
pub fn pg_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the kernel hands sock programs a valid socket.
    let sock = unsafe { &*ctx.sock };
    if sock.protocol != IPPROTO_TCP as u32 && sock.protocol != IPPROTO_UDP as u32 {
        return ALLOW;
    }
    // SAFETY: plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(&record) = (unsafe { SOCKETS.get(cookie) }) else {
        return ALLOW;
    };
    let _ = SOCKETS.remove(cookie);
    if record.flags & SOCKET_COUNTED == 0 {
        return ALLOW;
    }
    add_port_held(record.slot, -1);
    let scope_id = u32::from(record.scope_id);
    // SAFETY: `c` points into a live per-CPU map value; adding the all-ones value subtracts one.
    bump(scope_id, |c| unsafe { &raw mut (*c).held }, u64::MAX);
    emit(&Decision {
        op: OP_RELEASE,
        verdict: VERDICT_RELEASED,
        scope_id,
        protocol: sock.protocol as u8,
        local_port: (record.slot & 0xffff) as u16,
        remote_ip4: sock.dst_ip4,
        remote_port: u16::from_be(sock.dst_port),
        attempts: 0,
        errno: 0,
    });
    ALLOW
}

/// UDP sendto() on an unbound socket: the kernel has already autobound it from its own range by
/// the time this runs. Count it once per socket; a `strict` scope refuses to send from it.
#[cgroup_sock_addr(sendmsg4)]
pub fn pg_sendmsg4(ctx: SockAddrContext) -> i32 {
    try_sendmsg4(&ctx).unwrap_or(ON_INTERNAL_ERROR)
}

fn try_sendmsg4(ctx: &SockAddrContext) -> Option<i32> {
    let (_, scope) = current_scope()?;
    let Some(scope) = scope else {
        return Some(ALLOW);
    };
    // SAFETY: the kernel hands sock_addr programs a valid context with a socket.
    let sock_addr = unsafe { &*ctx.sock_addr };
    let port = unsafe { (*sock_addr.__bindgen_anon_1.sk).src_port } as u16;
    if scope.rule.contains(port) {
        return Some(ALLOW);
    }
    // SAFETY: plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let strict = scope.rule.flags & RULE_STRICT != 0 && scope.rule.flags & RULE_AUDIT == 0;
    // SAFETY: the value is copied out at once.
    match unsafe { SOCKETS.get(cookie) }.copied() {
        Some(record) if record.flags & SOCKET_EXPLICIT != 0 => return Some(ALLOW),
        Some(_) => return Some(if strict { DENY } else { ALLOW }),
        None => {}
    }
    let record = SocketRecord {
        slot: held_slot(IPPROTO_UDP as u32, u32::from(port)),
        scope_id: scope.id as u16,
        flags: SOCKET_REPORTED,
    };
    let _ = SOCKETS.insert(cookie, record, BPF_NOEXIST as u64);
    count!(scope.id, unsteered);
    let decision = Decision {
        op: OP_SENDMSG,
        verdict: VERDICT_AUTOBOUND,
        scope_id: scope.id,
        protocol: IPPROTO_UDP,
        local_port: port,
        remote_ip4: sock_addr.user_ip4,
        remote_port: u16::from_be(sock_addr.user_port as u16),
        attempts: 0,
        errno: 0,
    };
    if scope.rule.flags & RULE_STRICT != 0 {
        return Some(refuse(
            scope.id,
            scope.rule.flags & RULE_AUDIT != 0,
            decision,
        ));
    }
    emit(&decision);
    Some(ALLOW)
}
