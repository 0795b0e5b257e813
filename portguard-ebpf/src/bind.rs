//! bind() of IPv4 and IPv6 sockets: steer port 0 into the scope's range, judge explicit ports.

use aya_ebpf::{
    helpers::generated::bpf_set_retval, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use portguard_common::{
    CONFIG_OBSERVE, IPPROTO_TCP, IPPROTO_UDP, NO_OWNER, NO_SCOPE, OP_BIND, RULE_AUDIT,
    RULE_BIND_LIST, UNSCOPED_COUNTERS, VERDICT_ALLOWED, VERDICT_AUDIT_WOULD_DENY, VERDICT_DENIED,
    VERDICT_EXHAUSTED, VERDICT_OBSERVED, VERDICT_STEERED,
};

use crate::{
    addr::CallAddr,
    events::{Decision, emit},
    maps::{BIND_ALLOW, RULES},
    port_search::{Local, pick_free_port},
    scope::{Scope, count, current_scope, port_owner},
};

/// Let the call proceed.
pub const ALLOW: i32 = 1;
/// Refuse the call: EPERM, or the errno set with `bpf_set_retval` just before.
pub const DENY: i32 = 0;
/// What a hook answers when it cannot work (a map the daemon always fills is missing): let the
/// call through rather than break the host's networking.
pub const ON_INTERNAL_ERROR: i32 = ALLOW;

pub const EPERM: i32 = 1;
pub const EADDRNOTAVAIL: i32 = 99;

#[cgroup_sock_addr(bind4)]
pub fn pg_bind4(ctx: SockAddrContext) -> i32 {
    try_bind::<false>(&ctx).unwrap_or(ON_INTERNAL_ERROR)
}

#[cgroup_sock_addr(bind6)]
pub fn pg_bind6(ctx: SockAddrContext) -> i32 {
    try_bind::<true>(&ctx).unwrap_or(ON_INTERNAL_ERROR)
}

#[inline(always)]
fn try_bind<const V6: bool>(ctx: &SockAddrContext) -> Option<i32> {
    // SAFETY: the kernel hands sock_addr programs a valid context.
    let sock_addr = unsafe { &mut *ctx.sock_addr };
    let protocol = sock_addr.protocol;
    if protocol != IPPROTO_TCP as u32 && protocol != IPPROTO_UDP as u32 {
        return Some(ALLOW);
    }
    let call = CallAddr::read::<V6>(sock_addr);
    let port = call.port;
    let (config, scope) = current_scope()?;
    let decision = Decision {
        op: OP_BIND,
        verdict: VERDICT_ALLOWED,
        scope_id: NO_SCOPE,
        family: call.family,
        protocol: protocol as u8,
        local_port: port,
        remote_addr: [0; 4],
        remote_port: 0,
        attempts: 0,
        errno: 0,
    };
    let Some(scope) = scope else {
        return Some(unscoped_bind(port, config.flags, decision));
    };
    let decision = Decision {
        scope_id: scope.id,
        ..decision
    };
    if port == 0 {
        // bind() only reaches the hook of the socket's own family.
        let local = Local {
            sock_addr: ctx.sock_addr,
            family: call.family,
            addr: call.addr,
        };
        return Some(steer_bind(ctx, &local, &scope, decision));
    }
    Some(explicit_bind(port, &scope, decision))
}

/// Rule 4: a task in no scope may not bind a port of any scope's range.
#[inline(always)]
fn unscoped_bind(port: u16, config_flags: u32, decision: Decision) -> i32 {
    let owner = if port == 0 {
        NO_OWNER
    } else {
        port_owner(port)
    };
    if owner == NO_OWNER {
        if config_flags & CONFIG_OBSERVE != 0 {
            emit(&Decision {
                verdict: VERDICT_OBSERVED,
                ..decision
            });
        }
        return ALLOW;
    }
    let owner_audits = RULES
        .get(owner - 1)
        .is_some_and(|rule| rule.flags & RULE_AUDIT != 0);
    refuse(UNSCOPED_COUNTERS, owner_audits, decision)
}

/// Rule 3: an explicit port must be in the scope's range, its bind list, or (without a list)
/// outside every other scope's range.
#[inline(always)]
fn explicit_bind(port: u16, scope: &Scope, decision: Decision) -> i32 {
    let allowed = scope.rule.contains(port)
        || if scope.rule.flags & RULE_BIND_LIST != 0 {
            BIND_ALLOW
                .get(scope.id)
                .is_some_and(|allow| allow.contains(port))
        } else {
            port_owner(port) == NO_OWNER
        };
    if allowed {
        count!(scope.id, allowed);
        emit(&decision);
        return ALLOW;
    }
    refuse(scope.id, scope.rule.flags & RULE_AUDIT != 0, decision)
}

/// Rule 1: port 0 becomes a free port of the range.
#[inline(always)]
fn steer_bind(ctx: &SockAddrContext, local: &Local, scope: &Scope, decision: Decision) -> i32 {
    if scope.rule.flags & RULE_AUDIT != 0 {
        // Audit: the kernel picks as it would without portguard.
        count!(scope.id, allowed);
        emit(&decision);
        return ALLOW;
    }
    let found = pick_free_port(local, &scope.rule, decision.protocol as u32);
    if found.port == 0 {
        return exhausted(
            scope.id,
            Decision {
                attempts: found.attempts,
                ..decision
            },
        );
    }
    // SAFETY: user_port is writable in bind4/bind6; the kernel binds the rewritten port.
    unsafe { (*ctx.sock_addr).user_port = found.port.to_be() as u32 };
    count!(scope.id, steered);
    emit(&Decision {
        verdict: VERDICT_STEERED,
        local_port: found.port,
        attempts: found.attempts,
        ..decision
    });
    ALLOW
}

/// Rule 5: no free port fails like the kernel's own allocator, with EADDRNOTAVAIL.
#[inline(always)]
pub fn exhausted(scope_id: u32, decision: Decision) -> i32 {
    count!(scope_id, exhausted);
    emit(&Decision {
        verdict: VERDICT_EXHAUSTED,
        errno: EADDRNOTAVAIL,
        ..decision
    });
    // SAFETY: plain helper call; the syscall then fails with this errno.
    unsafe { bpf_set_retval(-EADDRNOTAVAIL) };
    DENY
}

/// Refuses with EPERM, or in audit mode only records that it would have.
#[inline(always)]
pub fn refuse(row: u32, audit: bool, decision: Decision) -> i32 {
    if audit {
        count!(row, audit_would_deny);
        emit(&Decision {
            verdict: VERDICT_AUDIT_WOULD_DENY,
            errno: EPERM,
            ..decision
        });
        return ALLOW;
    }
    count!(row, denied);
    emit(&Decision {
        verdict: VERDICT_DENIED,
        errno: EPERM,
        ..decision
    });
    DENY
}
