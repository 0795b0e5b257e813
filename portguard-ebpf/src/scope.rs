//! Which scope the calling task is in, and the per-scope bookkeeping every hook shares.

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_xadd},
};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::{bpf_get_current_ancestor_cgroup_id, bpf_loop},
    maps::Array,
};
use portguard_common::{
    Config, Counters, MAX_CGROUP_LEVEL, NO_OWNER, SOCKET_COUNTED, SOCKET_SHARED, ScopeRule,
    SocketRecord,
};

use crate::maps::{
    CONFIG, COUNTERS, PORT_HELD, PORT_OWNER, PORT_SHARED, RULES, SCOPE_BY_CGROUP, SOCKETS,
};

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
/// levels the daemon says scopes live at, so unscoped tasks pay a few lookups at most. It runs
/// in `bpf_loop`: as an unrolled loop every level would be a separate path through the rest of
/// the program for the verifier, and the programs would outgrow its limit.
#[inline(always)]
pub fn current_scope() -> Option<(Config, Option<Scope>)> {
    let config = *CONFIG.get(0)?;
    if config.min_level > config.max_level || config.max_level >= MAX_CGROUP_LEVEL {
        return Some((config, None));
    }
    let mut walk = Walk {
        level: config.max_level,
        min_level: config.min_level,
        scope_id: 0,
        found: 0,
    };
    let levels = config.max_level - config.min_level + 1;
    // SAFETY: `walk` outlives the loop; the callback only touches it through the pointer.
    unsafe { bpf_loop(levels, walk_level as *mut c_void, (&raw mut walk).cast(), 0) };
    if walk.found == 0 {
        return Some((config, None));
    }
    let rule = *RULES.get(walk.scope_id)?;
    Some((
        config,
        Some(Scope {
            id: walk.scope_id,
            rule,
        }),
    ))
}

#[repr(C)]
struct Walk {
    level: u32,
    min_level: u32,
    scope_id: u32,
    found: u32,
}

/// One level of the walk: 1 stops it (a scope found, or no level left), 0 goes one level up.
unsafe extern "C" fn walk_level(_index: u64, walk: *mut Walk) -> i64 {
    // SAFETY: bpf_loop hands back the pointer `walk` passed in.
    let walk = unsafe { &mut *walk };
    if walk.level < walk.min_level {
        return 1;
    }
    // SAFETY: a plain helper call; 0 means the task's cgroup is shallower than `level`.
    let cgroup_id = unsafe { bpf_get_current_ancestor_cgroup_id(walk.level as i32) };
    if cgroup_id != 0 {
        // SAFETY: the value is copied out at once.
        if let Some(&id) = unsafe { SCOPE_BY_CGROUP.get(cgroup_id) } {
            walk.scope_id = id;
            walk.found = 1;
            return 1;
        }
    }
    if walk.level == 0 {
        return 1;
    }
    walk.level -= 1;
    0
}

/// Scope id + 1 of the scope whose range holds `port`, or `NO_OWNER`.
#[inline(always)]
pub fn port_owner(port: u16) -> u32 {
    PORT_OWNER.get(port as u32).copied().unwrap_or(NO_OWNER)
}

/// Whether the programs know of a socket holding the port of `slot` (see `held_slot`) alone.
#[inline(always)]
pub fn port_held(slot: u32) -> bool {
    PORT_HELD.get(slot).is_some_and(|held| *held > 0)
}

/// Whether the programs know of a socket holding the port of `slot` through a shared connect.
#[inline(always)]
pub fn port_shared(slot: u32) -> bool {
    PORT_SHARED.get(slot).is_some_and(|held| *held > 0)
}

/// The count map a socket with record flags `flags` is counted in.
#[inline(always)]
pub fn holders(flags: u16) -> &'static Array<i32> {
    if flags & SOCKET_SHARED != 0 {
        &PORT_SHARED
    } else {
        &PORT_HELD
    }
}

/// Adds `delta` to the number of sockets holding the port of `slot` in `holders`, atomically:
/// other CPUs do the same.
#[inline(always)]
pub fn add_port_held(holders: &Array<i32>, slot: u32, delta: i32) {
    if let Some(held) = holders.get_ptr_mut(slot) {
        // The BPF target has no atomic types; with its result unused this becomes BPF's XADD.
        // SAFETY: the pointer is to a live, aligned map value; the kernel allows atomics on it.
        unsafe { atomic_xadd::<i32, i32, { AtomicOrdering::Relaxed }>(held, delta) };
    }
}

/// Adds `delta` (wrapping) to the counter `field` picks in this CPU's row `row`. Programs on one
/// CPU can preempt each other, so the add is atomic.
#[inline(always)]
pub fn bump(row: u32, field: impl FnOnce(*mut Counters) -> *mut u64, delta: u64) {
    if let Some(counters) = COUNTERS.get_ptr_mut(row) {
        add(field(counters), delta);
    }
}

/// `count!(row, field)`: one more of `Counters::field` for scope row `row`.
macro_rules! count {
    ($row:expr, $field:ident) => {
        // SAFETY: `c` points into a live per-CPU map value.
        $crate::scope::bump($row, |c| unsafe { &raw mut (*c).$field }, 1)
    };
}
pub(crate) use count;

/// Adds `delta` (wrapping) to a counter in a map value, atomically.
#[inline(always)]
pub fn add(counter: *mut u64, delta: u64) {
    // SAFETY: callers pass a pointer into a live, aligned map value.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, delta) };
}

/// Records that the socket `cookie` holds the port of `slot` for scope `scope_id`, and counts
/// it (in `PORT_SHARED` when `flags` has `SOCKET_SHARED`). The record is written first: a
/// socket whose record could not be stored (a full map) is not counted either, so its release
/// can never leave a port counted as held.
#[inline(always)]
pub fn hold_port(cookie: u64, slot: u32, scope_id: u32, flags: u16) {
    let record = SocketRecord {
        slot,
        scope_id: scope_id as u16,
        flags: flags | SOCKET_COUNTED,
    };
    if SOCKETS.insert(cookie, record, BPF_NOEXIST as u64).is_err() {
        return;
    }
    add_port_held(holders(flags), slot, 1);
    count!(scope_id, held);
}
