//! connect() of IPv4 and IPv6 sockets: give an unbound socket of a scope a port of its range
//! before the kernel's own allocator can pick one.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_ANY, bpf_sock_addr},
    helpers::generated::{bpf_get_socket_cookie, bpf_set_retval, bpf_setsockopt},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::warn;
use portguard_common::{
    CONFIG_OBSERVE, IPPROTO_TCP, IPPROTO_UDP, NO_SCOPE, OP_CONNECT, RULE_AUDIT, RULE_SHARE,
    SOCKET_SHARED, TupleKey, VERDICT_ALLOWED, VERDICT_DENIED, VERDICT_OBSERVED, VERDICT_STEERED,
    held_slot,
};

use crate::{
    addr::{AF_INET, AF_INET6, CallAddr, socket_local, v4_of_mapped},
    bind::{ALLOW, DENY, ON_INTERNAL_ERROR, exhausted},
    dest::{advance_dest_counter, dest_counter, dest_start},
    events::{Decision, emit},
    maps::SOCKET_TUPLES,
    port_search::{ConnectionLookup, Found, Local, Shared, bind_exclusive_port, bind_shared_port},
    scope::{Scope, count, current_scope, hold_port},
};

const SOL_SOCKET: i32 = 1;
const SO_REUSEADDR: i32 = 2;

#[cgroup_sock_addr(connect4)]
pub fn pg_connect4(ctx: SockAddrContext) -> i32 {
    try_connect::<false>(&ctx).unwrap_or(ON_INTERNAL_ERROR)
}

#[cgroup_sock_addr(connect6)]
pub fn pg_connect6(ctx: SockAddrContext) -> i32 {
    try_connect::<true>(&ctx).unwrap_or(ON_INTERNAL_ERROR)
}

#[inline(always)]
fn try_connect<const V6: bool>(ctx: &SockAddrContext) -> Option<i32> {
    // SAFETY: the kernel hands sock_addr programs a valid context with a socket.
    let sock_addr = unsafe { &*ctx.sock_addr };
    let protocol = sock_addr.protocol;
    if protocol != IPPROTO_TCP as u32 && protocol != IPPROTO_UDP as u32 {
        return Some(ALLOW);
    }
    // SAFETY: `sk` is always set for sock_addr programs.
    let local_port = unsafe { (*sock_addr.__bindgen_anon_1.sk).src_port } as u16;
    let remote = CallAddr::read::<V6>(sock_addr);
    let (config, scope) = current_scope()?;
    let decision = Decision {
        op: OP_CONNECT,
        verdict: VERDICT_ALLOWED,
        scope_id: NO_SCOPE,
        family: remote.family,
        protocol: protocol as u8,
        local_port,
        remote_addr: remote.addr,
        remote_port: remote.port,
        attempts: 0,
        errno: 0,
    };
    let Some(scope) = scope else {
        if config.flags & CONFIG_OBSERVE != 0 {
            emit(&Decision {
                verdict: VERDICT_OBSERVED,
                ..decision
            });
        }
        return Some(ALLOW);
    };
    if local_port != 0 {
        // Already bound: the bind was judged when it happened.
        return Some(ALLOW);
    }
    let decision = Decision {
        scope_id: scope.id,
        ..decision
    };
    if scope.rule.flags & RULE_AUDIT != 0 {
        count!(scope.id, allowed);
        emit(&decision);
        return Some(ALLOW);
    }
    // A source address chosen beforehand (IP_BIND_ADDRESS_NO_PORT) is kept.
    let (family, addr) = socket_local::<V6>(sock_addr);
    let local = Local {
        sock_addr: ctx.sock_addr,
        family,
        addr,
    };
    // SAFETY: plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let shared = scope.rule.flags & RULE_SHARE != 0;
    let (found, key) = if shared {
        connect_shared(ctx.sock_addr, &local, &scope, protocol, &remote, cookie)
    } else {
        (
            bind_exclusive_port(&local, &scope.rule, protocol),
            TupleKey::default(),
        )
    };
    if found.port != 0 {
        let port = found.port;
        let slot = held_slot(protocol, port as u32);
        if shared {
            let key = TupleKey {
                local_port: port,
                ..key
            };
            let _ = SOCKET_TUPLES.insert(cookie, key, BPF_ANY as u64);
            hold_port(cookie, slot, scope.id, SOCKET_SHARED);
        } else {
            hold_port(cookie, slot, scope.id, 0);
        }
        count!(scope.id, steered);
        emit(&Decision {
            verdict: VERDICT_STEERED,
            local_port: port,
            attempts: found.attempts,
            ..decision
        });
        return Some(ALLOW);
    }
    if found.errno == 0 {
        return Some(exhausted(
            scope.id,
            Decision {
                attempts: found.attempts,
                ..decision
            },
        ));
    }
    let errno = found.errno;
    warn!(
        ctx,
        "scope {}: bpf_bind failed with errno {}; connect refused", scope.id, errno
    );
    count!(scope.id, denied);
    emit(&Decision {
        verdict: VERDICT_DENIED,
        attempts: found.attempts,
        errno,
        ..decision
    });
    // SAFETY: plain helper call; the syscall fails with the kernel's own errno.
    unsafe { bpf_set_retval(-errno) };
    Some(DENY)
}

/// The shared search for this destination (see `port_search` and `dest`). The socket gets
/// SO_REUSEADDR, which is what lets the kernel put connections to other destinations on the same
/// port; it is taken back if no port was found.
#[inline(always)]
fn connect_shared(
    sock_addr: *mut bpf_sock_addr,
    local: &Local,
    scope: &Scope,
    protocol: u32,
    remote: &CallAddr,
    cookie: u64,
) -> (Found, TupleKey) {
    let key = TupleKey {
        remote_addr: remote.mapped(),
        remote_port: remote.port,
        local_port: 0,
        protocol: protocol as u8,
        _pad: [0; 3],
    };
    let size = scope.rule.size();
    if size == 0 {
        return (Found::exhausted(0), key);
    }
    if let Err(errno) = set_reuseaddr(sock_addr, 1) {
        return (Found::error(errno, 0), key);
    }
    let dest = dest_start(&key.remote_addr, remote.port, protocol, size);
    let start =
        ((dest.offset as u64 + dest_counter(dest.counter_slot) as u64) % size as u64) as u32;
    let shared = Shared {
        key,
        cookie,
        start,
        lookup: connection_lookup(local, remote),
    };
    let (found, examined) = bind_shared_port(local, &scope.rule, protocol, &shared);
    advance_dest_counter(dest.counter_slot, examined);
    if found.port == 0 {
        let _ = set_reuseaddr(sock_addr, 0);
    }
    (found, key)
}

#[inline(always)]
fn set_reuseaddr(sock_addr: *mut bpf_sock_addr, on: i32) -> Result<(), i32> {
    let mut value = on;
    // SAFETY: `value` lives on this stack frame for the call.
    let ret = unsafe {
        bpf_setsockopt(
            sock_addr.cast::<c_void>(),
            SOL_SOCKET,
            SO_REUSEADDR,
            (&raw mut value).cast::<c_void>(),
            size_of::<i32>() as i32,
        )
    };
    if ret == 0 { Ok(()) } else { Err(-(ret as i32)) }
}

/// Where the kernel will file the connection, when its local address is known before the
/// kernel routes it: the socket's own source address, or loopback for a loopback destination
/// (the route the kernel picks there has it as its source). Otherwise only portguard's own
/// records guard against reusing a connection the kernel still holds.
#[inline(always)]
fn connection_lookup(local: &Local, remote: &CallAddr) -> Option<ConnectionLookup> {
    const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
    const LOOPBACK6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
    let remote4 = if remote.family == AF_INET {
        Some(remote.addr[0])
    } else {
        v4_of_mapped(&remote.addr)
    };
    if let Some(remote4) = remote4 {
        let local4 = if local.family == AF_INET {
            local.addr[0]
        } else {
            v4_of_mapped(&local.addr).unwrap_or(0)
        };
        let local4 = if local4 != 0 {
            local4
        } else if remote4.to_ne_bytes()[0] == 127 {
            LOOPBACK4
        } else {
            return None;
        };
        return Some(ConnectionLookup {
            family: AF_INET,
            local: [local4, 0, 0, 0],
            remote: [remote4, 0, 0, 0],
        });
    }
    let local6 = if local.addr != [0; 4] {
        local.addr
    } else if remote.addr == LOOPBACK6 {
        LOOPBACK6
    } else {
        return None;
    };
    Some(ConnectionLookup {
        family: AF_INET6,
        local: local6,
        remote: remote.addr,
    })
}
