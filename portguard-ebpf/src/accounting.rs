//! Keeping `PORT_HELD` and each scope's `held` true: ports taken by binds, given back by
//! releases, and the one path where the kernel picks a port that no hook can steer (UDP sendmsg
//! on an unbound socket).

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, bpf_sock},
    helpers::generated::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use portguard_common::{
    CONFIG_STRICT, IPPROTO_TCP, IPPROTO_UDP, NO_OWNER, OP_RELEASE, OP_SENDMSG, RULE_AUDIT,
    RULE_STRICT, SOCKET_COUNTED, SOCKET_EXPLICIT, SOCKET_REPORTED, SOCKET_SHARED, SocketRecord,
    TIME_WAIT_NS, VERDICT_AUTOBOUND, VERDICT_RELEASED, held_slot,
};

use crate::{
    addr::{AF_INET6, CallAddr},
    bind::{ALLOW, DENY, ON_INTERNAL_ERROR, refuse},
    events::{Decision, emit},
    maps::{CONFIG, SOCKET_TUPLES, SOCKETS, TIME_WAIT, TUPLES},
    scope::{add_port_held, bump, count, current_scope, hold_port, holders, port_owner},
};

/// TCP states (`BPF_TCP_*`) in which a socket that closes sends the first FIN, so that its
/// connection stays in TIME_WAIT afterwards.
const TCP_ESTABLISHED: u32 = 1;
const TCP_FIN_WAIT1: u32 = 4;
const TCP_FIN_WAIT2: u32 = 5;
const TCP_TIME_WAIT: u32 = 6;
const TCP_CLOSING: u32 = 11;

/// After a successful bind() (not `bpf_bind`, which connect accounts for itself: the kernel
/// runs neither bind hook for it).
#[cgroup_sock(post_bind4)]
pub fn pg_post_bind4(ctx: SockContext) -> i32 {
    try_post_bind(&ctx).unwrap_or(ON_INTERNAL_ERROR)
}

#[cgroup_sock(post_bind6)]
pub fn pg_post_bind6(ctx: SockContext) -> i32 {
    try_post_bind(&ctx).unwrap_or(ON_INTERNAL_ERROR)
}

#[inline(always)]
fn try_post_bind(ctx: &SockContext) -> Option<i32> {
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
    if record.flags & SOCKET_SHARED != 0 {
        release_connection(cookie, sock);
    }
    if record.flags & SOCKET_COUNTED == 0 {
        return ALLOW;
    }
    add_port_held(holders(record.flags), record.slot, -1);
    let scope_id = u32::from(record.scope_id);
    // SAFETY: `c` points into a live per-CPU map value; adding the all-ones value subtracts one.
    bump(scope_id, |c| unsafe { &raw mut (*c).held }, u64::MAX);
    let (family, remote_addr) = remote_of(sock);
    emit(&Decision {
        op: OP_RELEASE,
        verdict: VERDICT_RELEASED,
        scope_id,
        family,
        protocol: sock.protocol as u8,
        local_port: (record.slot & 0xffff) as u16,
        remote_addr,
        remote_port: u16::from_be(sock.dst_port),
        attempts: 0,
        errno: 0,
    });
    ALLOW
}

/// The family and remote address of a socket being released (IPv4 in the first word).
#[inline(always)]
fn remote_of(sock: &bpf_sock) -> (u16, [u32; 4]) {
    // The verifier only allows context loads at a constant offset from the context pointer:
    // each field is loaded on its own, before the family picks one.
    // SAFETY: plain loads of context fields this program type may read.
    let (family, ip4, ip6) = unsafe {
        (
            read_volatile(&sock.family),
            read_volatile(&sock.dst_ip4),
            [
                read_volatile(&sock.dst_ip6[0]),
                read_volatile(&sock.dst_ip6[1]),
                read_volatile(&sock.dst_ip6[2]),
                read_volatile(&sock.dst_ip6[3]),
            ],
        )
    };
    if family == AF_INET6 as u32 {
        (AF_INET6, ip6)
    } else {
        (crate::addr::AF_INET, [ip4, 0, 0, 0])
    }
}

/// Gives back the connection a shared socket claimed. A TCP socket that closes first leaves its
/// connection in TIME_WAIT: that is recorded before the claim goes, so that no search sees the
/// connection free in between.
#[inline(always)]
fn release_connection(cookie: u64, sock: &bpf_sock) {
    // SAFETY: the value is copied out before the entry is removed.
    let Some(&key) = (unsafe { SOCKET_TUPLES.get(cookie) }) else {
        return;
    };
    let closes_first = matches!(
        sock.state,
        TCP_ESTABLISHED | TCP_FIN_WAIT1 | TCP_FIN_WAIT2 | TCP_TIME_WAIT | TCP_CLOSING
    );
    if sock.protocol == IPPROTO_TCP as u32 && closes_first {
        // SAFETY: plain helper call.
        let ends = unsafe { bpf_ktime_get_ns() } + TIME_WAIT_NS;
        let _ = TIME_WAIT.insert(key, ends, BPF_ANY as u64);
    }
    // SAFETY: compared at once.
    if unsafe { TUPLES.get(key) } == Some(&cookie) {
        let _ = TUPLES.remove(key);
    }
    let _ = SOCKET_TUPLES.remove(cookie);
}

/// UDP sendto() on an unbound socket: the kernel has already autobound it from its own range by
/// the time this runs. Count it once per socket; a `strict` scope refuses to send from it.
#[cgroup_sock_addr(sendmsg4)]
pub fn pg_sendmsg4(ctx: SockAddrContext) -> i32 {
    try_sendmsg::<false>(&ctx).unwrap_or(ON_INTERNAL_ERROR)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn pg_sendmsg6(ctx: SockAddrContext) -> i32 {
    try_sendmsg::<true>(&ctx).unwrap_or(ON_INTERNAL_ERROR)
}

#[inline(always)]
fn try_sendmsg<const V6: bool>(ctx: &SockAddrContext) -> Option<i32> {
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
    let remote = CallAddr::read::<V6>(sock_addr);
    let decision = Decision {
        op: OP_SENDMSG,
        verdict: VERDICT_AUTOBOUND,
        scope_id: scope.id,
        family: remote.family,
        protocol: IPPROTO_UDP,
        local_port: port,
        remote_addr: remote.addr,
        remote_port: remote.port,
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
