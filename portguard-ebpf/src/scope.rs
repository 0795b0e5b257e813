//! Which scope the calling task is in, and the per-scope bookkeeping every hook shares.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::helpers::generated::bpf_get_current_ancestor_cgroup_id;
use portguard_common::{Config, Counters, MAX_CGROUP_LEVEL, NO_OWNER, ScopeRule};

use crate::maps::{CONFIG, COUNTERS, PORT_HELD, PORT_OWNER, RULES, SCOPE_BY_CGROUP};

/// A scope as one hook sees it.
pub struct Scope {
    pub id: u32,
    pub rule: ScopeRule,
}

/// Returns the global config and the scope of the nearest cgroup, the task's own included, that a
/// scope names.
///
/// sock_addr programs cannot read the socket's cgroup (`bpf_sk_cgroup_id` is refused), so this
/// looks at the current task's cgroup ancestry, deepest level first. The walk is limited to the
/// levels the daemon says scopes live at, so unscoped tasks pay a few lookups at most.
#[inline(always)]
pub fn current_scope() -> Option<(Config, Option<Scope>)> {
    let config = *CONFIG.get(0)?;
    let mut level = config.max_level;
    for _ in 0..MAX_CGROUP_LEVEL {
        if level < config.min_level {
            break;
        }
        // SAFETY: a plain helper call; 0 means the task's cgroup is shallower than `level`.
        let cgroup_id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if cgroup_id != 0 {
            // SAFETY: the value is copied out before anything can delete it.
            if let Some(&id) = unsafe { SCOPE_BY_CGROUP.get(cgroup_id) } {
                let rule = *RULES.get(id)?;
                return Some((config, Some(Scope { id, rule })));
            }
        }
        if level == 0 {
            break;
        }
        level -= 1;
    }
    Some((config, None))
}

/// Scope id + 1 of the scope whose range holds `port`, or `NO_OWNER`.
#[inline(always)]
pub fn port_owner(port: u16) -> u32 {
    PORT_OWNER.get(port as u32).copied().unwrap_or(NO_OWNER)
}

/// Whether the programs know of a socket holding the port of `slot` (see `held_slot`).
#[inline(always)]
pub fn port_held(slot: u32) -> bool {
    PORT_HELD.get(slot).is_some_and(|held| *held > 0)
}

/// Adds `delta` to the number of sockets holding the port of `slot`, atomically: other CPUs do
/// the same.
#[inline(always)]
pub fn add_port_held(slot: u32, delta: i32) {
    if let Some(held) = PORT_HELD.get_ptr_mut(slot) {
        // The BPF target has no atomic types; with its result unused this becomes BPF's XADD.
        // SAFETY: the pointer is to a live, aligned map value; the kernel allows atomics on it.
        unsafe { atomic_xadd::<i32, i32, { AtomicOrdering::Relaxed }>(held, delta) };
    }
}

/// Applies `update` to this CPU's counters of scope row `row`.
#[inline(always)]
pub fn count(row: u32, update: impl FnOnce(&mut Counters)) {
    if let Some(counters) = COUNTERS.get_ptr_mut(row) {
        // SAFETY: per-CPU value, only this program on this CPU touches it now.
        update(unsafe { &mut *counters });
    }
}
