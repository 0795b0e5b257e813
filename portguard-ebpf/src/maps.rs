//! Every map the programs share with each other and with the daemon. All are pinned by name, so
//! a restarted daemon adopts them, and the enforcement state with them.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use portguard_common::{
    Config, Counters, DEST_COUNTER_SLOTS, HELD_SLOTS, MAX_SCOPED_CGROUPS, MAX_SCOPES, PORT_COUNT,
    PortBitmap, SCOPE_NAME_BYTES, ScopeRule, SocketRecord, TupleKey,
};

/// Global settings (index 0), written by the daemon.
#[map(name = "CONFIG")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

/// cgroup id -> scope id, for every cgroup a scope names.
#[map(name = "SCOPE_BY_CGROUP")]
pub static SCOPE_BY_CGROUP: HashMap<u64, u32> = HashMap::pinned(MAX_SCOPED_CGROUPS, 0);

/// scope id -> rule.
#[map(name = "RULES")]
pub static RULES: Array<ScopeRule> = Array::pinned(MAX_SCOPES, 0);

/// scope id -> ports an explicit bind may use besides the range (`bind = [...]`).
#[map(name = "BIND_ALLOW")]
pub static BIND_ALLOW: Array<PortBitmap> = Array::pinned(MAX_SCOPES, 0);

/// port -> scope id + 1 of the scope whose range holds it, `NO_OWNER` for none. Ranges are
/// disjoint, so one lookup answers "whose port is this".
#[map(name = "PORT_OWNER")]
pub static PORT_OWNER: Array<u32> = Array::pinned(PORT_COUNT, 0);

/// `held_slot(protocol, port)` -> number of sockets the programs saw take that port (scope ranges
/// only). A hint that lets the port search skip ports it knows are taken; the kernel stays the
/// authority.
#[map(name = "PORT_HELD")]
pub static PORT_HELD: Array<i32> = Array::pinned(HELD_SLOTS, 0);

/// `held_slot(protocol, port)` -> number of sockets holding that port through a shared
/// connect(). Such a port may carry more connections (to other destinations) but is never handed
/// to a bind(0) or an exclusive connect.
#[map(name = "PORT_SHARED")]
pub static PORT_SHARED: Array<i32> = Array::pinned(HELD_SLOTS, 0);

/// Connections on shared ports -> cookie of the socket that claimed it. Inserted with
/// `BPF_NOEXIST` before the port is bound, so two concurrent connects to one destination can
/// never both take the same port.
#[map(name = "TUPLES")]
pub static TUPLES: HashMap<TupleKey, u64> = HashMap::pinned(TUPLE_SLOTS, 0);
pub const TUPLE_SLOTS: u32 = 131_072;

/// socket cookie -> the connection it claimed in `TUPLES`, for its release: by then the socket
/// may have forgotten its destination (a refused connect clears it).
#[map(name = "SOCKET_TUPLES")]
pub static SOCKET_TUPLES: HashMap<u64, TupleKey> = HashMap::pinned(TUPLE_SLOTS, 0);

/// Connections closed by their own side -> when their TIME_WAIT ends (CLOCK_MONOTONIC ns). The
/// search avoids them while other ports are free, as the kernel's allocator does; losing an
/// entry to eviction only loses that preference, the kernel still refuses a duplicate.
#[map(name = "TIME_WAIT")]
pub static TIME_WAIT: LruHashMap<TupleKey, u64> = LruHashMap::pinned(TUPLE_SLOTS, 0);

/// `held_slot(protocol, port)` -> when `bpf_bind` last found that port taken by a socket the
/// programs do not know (one outside the attach point, or older than the daemon). The search
/// skips such ports for `BUSY_HINT_NS` before it asks the kernel again.
#[map(name = "BUSY_HINT")]
pub static BUSY_HINT: Array<u64> = Array::pinned(HELD_SLOTS, 0);

/// The per-destination counters of the shared-port search (RFC 6056 algorithm 4).
#[map(name = "DEST_COUNTERS")]
pub static DEST_COUNTERS: Array<u32> = Array::pinned(DEST_COUNTER_SLOTS, 0);

/// The key of the destination hash (index 0), random, written by the daemon when it creates the
/// maps and kept across restarts, so that ports are not predictable from outside.
#[map(name = "PORT_SECRET")]
pub static PORT_SECRET: Array<[u64; 2]> = Array::pinned(1, 0);

/// socket cookie -> what the programs recorded about that socket, so that its release undoes
/// exactly what was counted.
#[map(name = "SOCKETS")]
pub static SOCKETS: HashMap<u64, SocketRecord> = HashMap::pinned(SOCKET_SLOTS, 0);
pub const SOCKET_SLOTS: u32 = 262_144;

/// scope id -> decision counters; row `UNSCOPED_COUNTERS` is for sockets in no scope.
#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_SCOPES + 1, 0);

/// Decision events for the daemon. The daemon may resize it at load time.
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::pinned(1024 * 1024, 0);

/// scope id -> the scope's name (NUL-padded), read back by a daemon that adopts these maps so
/// that scope ids survive restarts. No program reads it.
#[map(name = "SCOPE_NAMES")]
pub static SCOPE_NAMES: Array<[u8; SCOPE_NAME_BYTES]> = Array::pinned(MAX_SCOPES, 0);

/// The ports portguard added to net.ipv4.ip_local_reserved_ports (index 0), so that they, and
/// only they, are given back on uninstall. No program reads it.
#[map(name = "RESERVED")]
pub static RESERVED: Array<PortBitmap> = Array::pinned(1, 0);

/// Events that did not fit in the ring buffer (index 0).
#[map(name = "LOST_EVENTS")]
pub static LOST_EVENTS: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);
