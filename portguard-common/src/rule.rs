//! Policy as the kernel sees it: which cgroup belongs to which scope, and each scope's rule.

use core::mem::size_of;

/// Most scopes one policy may hold; sizes the per-scope maps.
pub const MAX_SCOPES: u32 = 1024;
/// Bytes of a scope name in `SCOPE_NAMES` (names are at most 64 characters of [a-z0-9_-]).
pub const SCOPE_NAME_BYTES: usize = 64;
/// Most cgroups that may be named by scopes at once.
pub const MAX_SCOPED_CGROUPS: u32 = 16384;
/// Deepest cgroup level the ancestor walk looks at. cgroup trees of real hosts (systemd, kubepods)
/// stay well below this.
pub const MAX_CGROUP_LEVEL: u32 = 64;
/// Number of TCP/UDP ports, the size of the port-indexed maps.
pub const PORT_COUNT: u32 = 65536;
/// Row of the counters map that holds decisions about sockets in no scope.
pub const UNSCOPED_COUNTERS: u32 = MAX_SCOPES;
/// Value of `PORT_OWNER` for a port that lies in no scope's range.
pub const NO_OWNER: u32 = 0;

/// The scope takes no action, it only decides and counts (`mode = "audit"`).
pub const RULE_AUDIT: u32 = 1 << 0;
/// Explicit binds are limited to the range plus the `BIND_ALLOW` bitmap (`bind = [...]`).
pub const RULE_BIND_LIST: u32 = 1 << 1;
/// Refuse ports the kernel autobinds where no hook can steer them (`strict = true`).
pub const RULE_STRICT: u32 = 1 << 2;
/// connect() shares local ports between destinations as the kernel does (`share = true`): one
/// port carries one connection per remote address and port, not one connection in all.
pub const RULE_SHARE: u32 = 1 << 3;

/// One scope's rule, indexed by scope id in `RULES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScopeRule {
    /// First port of the ephemeral range, inclusive, host order.
    pub range_lo: u16,
    /// Last port of the ephemeral range, inclusive, host order.
    pub range_hi: u16,
    /// `RULE_*` bits.
    pub flags: u32,
}
const _: () = assert!(size_of::<ScopeRule>() == 8);

impl ScopeRule {
    pub const fn contains(&self, port: u16) -> bool {
        self.range_lo <= port && port <= self.range_hi
    }
    /// Number of ports in the range; never zero for a rule the daemon wrote.
    pub const fn size(&self) -> u32 {
        self.range_hi as u32 - self.range_lo as u32 + 1
    }
}

/// Global settings, the single entry of `CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Shallowest and deepest cgroup levels that any scope names; the ancestor walk stays
    /// inside them so unscoped sockets cost as few lookups as possible. `min > max`: no scopes.
    pub min_level: u32,
    pub max_level: u32,
    /// `CONFIG_*` bits.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<Config>() == 16);

/// Emit an event for every bind/connect under the attach point, scoped or not.
pub const CONFIG_OBSERVE: u32 = 1 << 0;
/// Some scope is `strict`: only then must binds outside scope ranges be recorded.
pub const CONFIG_STRICT: u32 = 1 << 1;

impl Config {
    pub const fn no_scopes(flags: u32) -> Self {
        Self {
            min_level: 1,
            max_level: 0,
            flags,
            _pad: 0,
        }
    }
}

/// The explicit-bind allow list of a scope: one bit per port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortBitmap {
    pub words: [u64; (PORT_COUNT / 64) as usize],
}
const _: () = assert!(size_of::<PortBitmap>() == 8192);

impl PortBitmap {
    pub const EMPTY: Self = Self {
        words: [0; (PORT_COUNT / 64) as usize],
    };
    pub const fn contains(&self, port: u16) -> bool {
        self.words[(port / 64) as usize] & (1u64 << (port % 64)) != 0
    }
    pub fn insert(&mut self, port: u16) {
        self.words[(port / 64) as usize] |= 1u64 << (port % 64);
    }
    pub fn insert_range(&mut self, lo: u16, hi: u16) {
        for port in lo..=hi {
            self.insert(port);
        }
    }
    pub fn remove(&mut self, port: u16) {
        self.words[(port / 64) as usize] &= !(1u64 << (port % 64));
    }
}

/// Per-scope decision counters, one row per scope in the per-CPU `COUNTERS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Port-0 binds and unbound connects given a port of the range.
    pub steered: u64,
    /// Calls refused with EPERM.
    pub denied: u64,
    /// Calls refused with EADDRNOTAVAIL because no port of the range was free.
    pub exhausted: u64,
    /// Explicit binds the policy allows (and, in audit mode, calls it lets the kernel handle).
    pub allowed: u64,
    /// Calls an audit-mode scope would have refused.
    pub audit_would_deny: u64,
    /// Sockets that sent from a port the kernel autobound outside the range, where no hook
    /// could steer it (UDP sendmsg on an unbound socket).
    pub unsteered: u64,
    /// Sockets holding a port of the range now. Per CPU this wraps (a socket may be counted on
    /// one CPU and released on another); the wrapping sum over CPUs is exact.
    pub held: u64,
}
const _: () = assert!(size_of::<Counters>() == 56);

impl Counters {
    pub fn add(&mut self, other: &Self) {
        self.steered += other.steered;
        self.denied += other.denied;
        self.exhausted += other.exhausted;
        self.allowed += other.allowed;
        self.audit_would_deny += other.audit_would_deny;
        self.unsteered += other.unsteered;
        self.held = self.held.wrapping_add(other.held);
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, and have no padding (asserted above).
    unsafe impl aya::Pod for super::ScopeRule {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::PortBitmap {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::SocketRecord {}
    unsafe impl aya::Pod for super::TupleKey {}
}

/// Entries of `PORT_HELD`: one per port for TCP, then one per port for UDP. A port taken for one
/// protocol is still free for the other.
pub const HELD_SLOTS: u32 = 2 * PORT_COUNT;

/// The `PORT_HELD` index of `port` for `protocol`.
pub const fn held_slot(protocol: u32, port: u32) -> u32 {
    if protocol == crate::IPPROTO_UDP as u32 {
        PORT_COUNT + (port & 0xffff)
    } else {
        port & 0xffff
    }
}

/// What the programs recorded about one socket (`SOCKETS`, keyed by socket cookie), so that its
/// release undoes exactly what was counted, for the scope it was counted in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketRecord {
    /// The socket's `PORT_HELD` slot (see `held_slot`).
    pub slot: u32,
    /// The scope whose `held` counter the socket was added to.
    pub scope_id: u16,
    /// `SOCKET_*` bits.
    pub flags: u16,
}
const _: () = assert!(size_of::<SocketRecord>() == 8);

/// The socket's port was added to `PORT_HELD` and its scope's `held`; its release takes it away.
pub const SOCKET_COUNTED: u16 = 1 << 0;
/// The socket's port came from an explicit bind() the policy allowed.
pub const SOCKET_EXPLICIT: u16 = 1 << 1;
/// The socket's port was autobound by the kernel and has been reported once.
pub const SOCKET_REPORTED: u16 = 1 << 2;
/// The socket was given a shared port by connect(): it is counted in `PORT_SHARED`, not
/// `PORT_HELD`, and its connection is claimed in `TUPLES`.
pub const SOCKET_SHARED: u16 = 1 << 3;

/// A connection as portguard tells connections apart on a shared port: the remote end (IPv4 as
/// `::ffff:a.b.c.d`, so that IPv4 and dual-stack sockets meet in one key space, as they do in
/// the kernel's tables), the local port and the protocol. The local address is left out: two
/// connections that differ only in it are treated as the same, which can only make the search
/// skip a port the kernel would have allowed, never hand out a duplicate.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TupleKey {
    /// Network order.
    pub remote_addr: [u32; 4],
    /// Host order.
    pub remote_port: u16,
    /// Host order.
    pub local_port: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<TupleKey>() == 24);

/// Entries of `DEST_COUNTERS`, the per-destination counters of the shared-port search (RFC 6056
/// algorithm 4's table).
pub const DEST_COUNTER_SLOTS: u32 = 4096;
/// How long a connection closed by its own side keeps its tuple in TIME_WAIT (the kernel's
/// TCP_TIMEWAIT_LEN).
pub const TIME_WAIT_NS: u64 = 60_000_000_000;
/// How long a port that `bpf_bind` found taken by a socket portguard does not know about is
/// skipped before it is tried again.
pub const BUSY_HINT_NS: u64 = 1_000_000_000;
