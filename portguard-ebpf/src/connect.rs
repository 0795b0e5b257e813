//! connect() of IPv4 sockets: give an unbound socket of a scope a port of its range before the
//! kernel's own allocator can pick one.

use aya_ebpf::{
    helpers::generated::{bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::warn;
use portguard_common::{
    CONFIG_OBSERVE, IPPROTO_TCP, IPPROTO_UDP, NO_SCOPE, OP_CONNECT, RULE_AUDIT, VERDICT_ALLOWED,
    VERDICT_DENIED, VERDICT_OBSERVED, VERDICT_STEERED, held_slot,
};

use crate::{
    bind::{ALLOW, DENY, ON_INTERNAL_ERROR, exhausted},
    events::{Decision, emit},
    port_search::{Found, bind_free_port},
    scope::{count, current_scope, hold_port},
};

#[cgroup_sock_addr(connect4)]
pub fn pg_connect4(ctx: SockAddrContext) -> i32 {
    try_connect4(&ctx).unwrap_or(ON_INTERNAL_ERROR)
}

fn try_connect4(ctx: &SockAddrContext) -> Option<i32> {
    // SAFETY: the kernel hands sock_addr programs a valid context with a socket.
    let sock_addr = unsafe { &*ctx.sock_addr };
    let protocol = sock_addr.protocol;
    if protocol != IPPROTO_TCP as u32 && protocol != IPPROTO_UDP as u32 {
        return Some(ALLOW);
    }
    // SAFETY: `sk` is always set for sock_addr programs.
    let local_port = unsafe { (*sock_addr.__bindgen_anon_1.sk).src_port } as u16;
    let (config, scope) = current_scope()?;
    let decision = Decision {
        op: OP_CONNECT,
        verdict: VERDICT_ALLOWED,
        scope_id: NO_SCOPE,
        protocol: protocol as u8,
        local_port,
        remote_ip4: sock_addr.user_ip4,
        remote_port: u16::from_be(sock_addr.user_port as u16),
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
    // SAFETY: `sk` is always set for sock_addr programs.
    let local_ip4 = unsafe { (*sock_addr.__bindgen_anon_1.sk).src_ip4 };
    Some(
        match bind_free_port(ctx.sock_addr, &scope.rule, protocol, local_ip4) {
            Found::Port { port, attempts } => {
                // SAFETY: plain helper call on the program's own context.
                let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
                hold_port(cookie, held_slot(protocol, port as u32), scope.id, 0);
                count!(scope.id, steered);
                emit(&Decision {
                    verdict: VERDICT_STEERED,
                    local_port: port,
                    attempts,
                    ..decision
                });
                ALLOW
            }
            Found::Exhausted { attempts } => exhausted(
                scope.id,
                Decision {
                    attempts,
                    ..decision
                },
            ),
            Found::Error { errno, attempts } => {
                warn!(
                    ctx,
                    "scope {}: bpf_bind failed with errno {}; connect refused", scope.id, errno
                );
                count!(scope.id, denied);
                emit(&Decision {
                    verdict: VERDICT_DENIED,
                    attempts,
                    errno,
                    ..decision
                });
                // SAFETY: plain helper call; the syscall fails with the kernel's own errno.
                unsafe { bpf_set_retval(-errno) };
                DENY
            }
        },
    )
}
