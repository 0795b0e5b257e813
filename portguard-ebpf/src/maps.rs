//! Every map the programs share with each other and with the daemon.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use portguard_common::{
    Config, Counters, HELD_SLOTS, MAX_SCOPED_CGROUPS, MAX_SCOPES, PORT_COUNT, PortBitmap,
    ScopeRule, SocketRecord,
};

/// Global settings (index 0), written by the daemon.
#[map(name = "CONFIG")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// cgroup id -> scope id, for every cgroup a scope names.
#[map(name = "SCOPE_BY_CGROUP")]
pub static SCOPE_BY_CGROUP: HashMap<u64, u32> = HashMap::with_max_entries(MAX_SCOPED_CGROUPS, 0);

/// scope id -> rule.
#[map(name = "RULES")]
pub static RULES: Array<ScopeRule> = Array::with_max_entries(MAX_SCOPES, 0);

/// scope id -> ports an explicit bind may use besides the range (`bind = [...]`).
#[map(name = "BIND_ALLOW")]
pub static BIND_ALLOW: Array<PortBitmap> = Array::with_max_entries(MAX_SCOPES, 0);

/// port -> scope id + 1 of the scope whose range holds it, `NO_OWNER` for none. Ranges are
/// disjoint, so one lookup answers "whose port is this".
#[map(name = "PORT_OWNER")]
pub static PORT_OWNER: Array<u32> = Array::with_max_entries(PORT_COUNT, 0);

/// `held_slot(protocol, port)` -> number of sockets the programs saw take that port (scope ranges
/// only). A hint that lets the port search skip ports it knows are taken; the kernel stays the
/// authority.
#[map(name = "PORT_HELD")]
pub static PORT_HELD: Array<i32> = Array::with_max_entries(HELD_SLOTS, 0);

/// socket cookie -> what the programs recorded about that socket, so that its release undoes
/// exactly what was counted.
#[map(name = "SOCKETS")]
pub static SOCKETS: HashMap<u64, SocketRecord> = HashMap::with_max_entries(SOCKET_SLOTS, 0);
pub const SOCKET_SLOTS: u32 = 262_144;

/// scope id -> decision counters; row `UNSCOPED_COUNTERS` is for sockets in no scope.
#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_SCOPES + 1, 0);

/// Decision events for the daemon. The daemon may resize it at load time.
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1024 * 1024, 0);

/// Events that did not fit in the ring buffer (index 0).
#[map(name = "LOST_EVENTS")]
pub static LOST_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
