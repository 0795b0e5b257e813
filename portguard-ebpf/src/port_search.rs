//! Finding a free port of a scope's range.
//!
//! Random retries alone fail most calls once a range is nearly full, so a search visits every
//! port of the range once, from a start point onwards, inside `bpf_loop` so that a 65,535-port
//! range stays within the verifier's limits. Ports the programs know are held are skipped
//! without asking the kernel, and so, for a second, are ports the kernel last said were taken by
//! sockets the programs do not know; the kernel stays the authority for the rest.
//!
//! Three kinds of search:
//! - `Probe` (bind4/bind6 steering a port-0 bind): random start; a port is taken when the
//!   programs count a socket on it, or a socket lookup finds one. The caller rewrites the bind.
//! - `Exclusive` (connect of a `share = false` scope): random start; `bpf_bind` the socket to the
//!   port, alone.
//! - `Shared` (connect of a `share = true` scope): start and counter from the destination hash
//!   (see `dest`); a port is usable unless something holds it exclusively or this very
//!   connection (remote address and port) already runs on it. The connection is claimed in
//!   `TUPLES`, then the socket is bound with SO_REUSEADDR so that connections to other
//!   destinations may share the port, as the kernel's own allocator lets them. A connection
//!   whose previous incarnation is in TIME_WAIT is avoided while another port is free; when none
//!   is, a second pass offers such ports too and the kernel decides, as it does for its own
//!   ports, whether the TIME_WAIT can be reused.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, BPF_NOEXIST, bpf_sock_addr, bpf_sock_tuple, sockaddr},
    helpers::generated::{
        bpf_bind, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_loop, bpf_sk_lookup_udp,
        bpf_sk_release, bpf_skc_lookup_tcp,
    },
};
use portguard_common::{BUSY_HINT_NS, IPPROTO_TCP, ScopeRule, TupleKey, held_slot};

use crate::{
    addr::AF_INET6,
    maps::{BUSY_HINT, TIME_WAIT, TUPLES},
    scope::{port_held, port_shared},
};

const EADDRINUSE: i64 = 98;
const INADDR_LOOPBACK_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const IN6ADDR_LOOPBACK_BE: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// How the search ended.
pub enum Found {
    Port {
        port: u16,
        attempts: u32,
    },
    /// Every port of the range was taken.
    Exhausted {
        attempts: u32,
    },
    /// The kernel refused a bind for a reason other than the port being taken.
    Error {
        errno: i32,
        attempts: u32,
    },
}

/// What the search works on: the socket, its family and the local address it binds to.
pub struct Local {
    pub sock_addr: *mut bpf_sock_addr,
    /// The socket's family (`AF_INET` or `AF_INET6`), which decides the sockaddr for
    /// `bpf_bind` and the lookup tuple.
    pub family: u16,
    /// Network order, IPv4 in the first word; the wildcard unless the socket chose an address.
    pub addr: [u32; 4],
}

/// A shared search's connection and starting point.
pub struct Shared {
    pub key: TupleKey,
    pub cookie: u64,
    pub start: u32,
}

#[repr(C)]
struct Search {
    sock_addr: *mut bpf_sock_addr,
    lo: u32,
    size: u32,
    start: u32,
    protocol: u32,
    family: u32,
    /// Network order; the address the socket binds to.
    addr: [u32; 4],
    /// Shared searches: the connection, `local_port` filled per candidate.
    key: TupleKey,
    cookie: u64,
    now: u64,
    /// 1: skip ports busy a moment ago and connections in TIME_WAIT; 2: the last resort.
    pass: u32,
    found: u32,
    attempts: u32,
    /// Candidates looked at, found one included (moves a destination's counter on).
    examined: u32,
    error: i32,
}

#[repr(C)]
struct SockaddrIn {
    family: u16,
    port_be: u16,
    addr_be: u32,
    zero: [u8; 8],
}

#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port_be: u16,
    flowinfo: u32,
    addr_be: [u32; 4],
    scope_id: u32,
}

/// Picks a port of `rule`'s range that no socket appears to hold for `protocol` on `local`.
/// The caller rewrites the bind to it.
#[inline(always)]
pub fn pick_free_port(local: &Local, rule: &ScopeRule, protocol: u32) -> Found {
    let mut search = Search::new(local, rule, protocol, random_start(rule));
    search.run(probe_candidate)
}

/// Binds the connecting socket alone to a free port of `rule`'s range (connect only:
/// `bpf_bind` is not available to other hooks).
#[inline(always)]
pub fn bind_exclusive_port(local: &Local, rule: &ScopeRule, protocol: u32) -> Found {
    let mut search = Search::new(local, rule, protocol, random_start(rule));
    search.two_passes(exclusive_candidate)
}

/// Binds the connecting socket to a port of `rule`'s range that it may share with connections
/// to other destinations (the caller has set SO_REUSEADDR), and claims its connection. Returns
/// the result and the number of ports looked at.
#[inline(always)]
pub fn bind_shared_port(
    local: &Local,
    rule: &ScopeRule,
    protocol: u32,
    shared: &Shared,
) -> (Found, u32) {
    let mut search = Search::new(local, rule, protocol, shared.start);
    search.key = shared.key;
    search.cookie = shared.cookie;
    let found = search.two_passes(shared_candidate);
    (found, search.examined)
}

#[inline(always)]
fn random_start(rule: &ScopeRule) -> u32 {
    // SAFETY: plain helper call.
    let random = unsafe { bpf_get_prandom_u32() };
    let size = rule.size();
    if size == 0 { 0 } else { random % size }
}

impl Search {
    #[inline(always)]
    fn new(local: &Local, rule: &ScopeRule, protocol: u32, start: u32) -> Self {
        Self {
            sock_addr: local.sock_addr,
            lo: rule.range_lo as u32,
            size: rule.size(),
            start,
            protocol,
            family: local.family as u32,
            addr: local.addr,
            key: TupleKey::default(),
            cookie: 0,
            // SAFETY: plain helper call.
            now: unsafe { bpf_ktime_get_ns() },
            pass: 1,
            found: 0,
            attempts: 0,
            examined: 0,
            error: 0,
        }
    }

    /// A first pass that avoids ports known to be busy, then, if it found nothing, a second
    /// that offers them to the kernel.
    #[inline(always)]
    fn two_passes(&mut self, candidate: unsafe extern "C" fn(u64, *mut Search) -> i64) -> Found {
        let first = self.run(candidate);
        if !matches!(first, Found::Exhausted { .. }) {
            return first;
        }
        self.pass = 2;
        self.run(candidate)
    }

    #[inline(always)]
    fn run(&mut self, candidate: unsafe extern "C" fn(u64, *mut Search) -> i64) -> Found {
        if self.size == 0 {
            return Found::Exhausted { attempts: 0 };
        }
        // The callback reaches the loop as a function symbol, which becomes the
        // BPF_PSEUDO_FUNC relocation the verifier needs; it must not pass through an integer.
        let callback = candidate as *mut c_void;
        // SAFETY: `self` outlives the loop; the callback only touches it through the pointer.
        unsafe { bpf_loop(self.size, callback, (self as *mut Self).cast(), 0) };
        if self.found != 0 {
            Found::Port {
                port: self.found as u16,
                attempts: self.attempts,
            }
        } else if self.error != 0 {
            Found::Error {
                errno: self.error,
                attempts: self.attempts,
            }
        } else {
            Found::Exhausted {
                attempts: self.attempts,
            }
        }
    }

    /// The `index`-th port after the start, wrapping inside the range.
    #[inline(always)]
    fn nth_port(&self, index: u64) -> Option<u32> {
        let size = self.size;
        if size == 0 {
            return None;
        }
        Some(self.lo + ((self.start as u64 + index) % size as u64) as u32)
    }

    /// Whether `bpf_bind` found the port of `slot` taken less than `BUSY_HINT_NS` ago.
    #[inline(always)]
    fn busy_a_moment_ago(&self, slot: u32) -> bool {
        BUSY_HINT
            .get(slot)
            .is_some_and(|&at| at != 0 && self.now.wrapping_sub(at) < BUSY_HINT_NS)
    }

    /// Binds the socket to `port` (network-order address of its family). 0 or a negative errno.
    #[inline(always)]
    fn bind(&self, port: u32) -> i64 {
        let port_be = (port as u16).to_be();
        // SAFETY: each sockaddr lives on this stack frame for the call.
        unsafe {
            if self.family == AF_INET6 as u32 {
                let mut addr = SockaddrIn6 {
                    family: AF_INET6,
                    port_be,
                    flowinfo: 0,
                    addr_be: self.addr,
                    scope_id: 0,
                };
                bpf_bind(
                    self.sock_addr,
                    (&raw mut addr).cast::<sockaddr>(),
                    size_of::<SockaddrIn6>() as i32,
                )
            } else {
                let mut addr = SockaddrIn {
                    family: crate::addr::AF_INET,
                    port_be,
                    addr_be: self.addr[0],
                    zero: [0; 8],
                };
                bpf_bind(
                    self.sock_addr,
                    (&raw mut addr).cast::<sockaddr>(),
                    size_of::<SockaddrIn>() as i32,
                )
            }
        }
    }

    /// Remembers that the kernel found the port of `slot` taken.
    #[inline(always)]
    fn mark_busy(&self, slot: u32) {
        let _ = BUSY_HINT.set(slot, self.now, 0);
    }
}

unsafe extern "C" fn exclusive_candidate(index: u64, search: *mut Search) -> i64 {
    // SAFETY: bpf_loop hands back the pointer `search` passed in.
    let search = unsafe { &mut *search };
    let Some(port) = search.nth_port(index) else {
        return 1;
    };
    let slot = held_slot(search.protocol, port);
    if port_held(slot) || port_shared(slot) || (search.pass == 1 && search.busy_a_moment_ago(slot))
    {
        return 0;
    }
    search.attempts += 1;
    match search.bind(port) {
        0 => {
            search.found = port;
            1
        }
        ret if ret == -EADDRINUSE => {
            search.mark_busy(slot);
            0
        }
        ret => {
            search.error = -(ret as i32);
            1
        }
    }
}

unsafe extern "C" fn shared_candidate(index: u64, search: *mut Search) -> i64 {
    // SAFETY: bpf_loop hands back the pointer `search` passed in.
    let search = unsafe { &mut *search };
    let Some(port) = search.nth_port(index) else {
        return 1;
    };
    if search.pass == 1 {
        search.examined += 1;
    }
    let slot = held_slot(search.protocol, port);
    // A port some socket holds alone (a listener, an explicit bind) is never shared.
    if port_held(slot) || (search.pass == 1 && search.busy_a_moment_ago(slot)) {
        return 0;
    }
    search.key.local_port = port as u16;
    // SAFETY: the value is copied out at once.
    let time_wait_ends = unsafe { TIME_WAIT.get(&search.key) }.copied();
    let in_time_wait = time_wait_ends.is_some_and(|end| end > search.now);
    if search.pass == 1 && in_time_wait {
        return 0;
    }
    // The claim is what keeps a concurrent connect to the same destination off this port.
    if TUPLES
        .insert(&search.key, &search.cookie, BPF_NOEXIST as u64)
        .is_err()
    {
        return 0;
    }
    search.attempts += 1;
    match search.bind(port) {
        0 => {
            if time_wait_ends.is_some() {
                let _ = TIME_WAIT.remove(&search.key);
            }
            search.found = port;
            1
        }
        ret => {
            let _ = TUPLES.remove(&search.key);
            if ret == -EADDRINUSE {
                search.mark_busy(slot);
                return 0;
            }
            search.error = -(ret as i32);
            1
        }
    }
}

unsafe extern "C" fn probe_candidate(index: u64, search: *mut Search) -> i64 {
    // SAFETY: bpf_loop hands back the pointer `search` passed in.
    let search = unsafe { &mut *search };
    let Some(port) = search.nth_port(index) else {
        return 1;
    };
    let slot = held_slot(search.protocol, port);
    if port_held(slot) || port_shared(slot) {
        return 0;
    }
    search.attempts += 1;
    if socket_holds(search, port) {
        return 0;
    }
    search.found = port;
    1
}

/// Whether the kernel knows a socket bound to `port` that a bind to it would collide with:
/// a TCP listener or a bound UDP socket, on the bind address or the wildcard. Sockets bound but
/// neither listening nor in a lookup table cannot be seen from here; the bind then fails with
/// EADDRINUSE as it would without portguard.
#[inline(always)]
fn socket_holds(search: &Search, port: u32) -> bool {
    // SAFETY: an all-zero tuple is a valid value of this plain-integer union.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let tuple_size = if search.family == AF_INET6 as u32 {
        let wildcard = search.addr == [0; 4];
        tuple.__bindgen_anon_1.ipv6.daddr = if wildcard {
            IN6ADDR_LOOPBACK_BE
        } else {
            search.addr
        };
        tuple.__bindgen_anon_1.ipv6.dport = (port as u16).to_be();
        (size_of::<u32>() * 8 + size_of::<u16>() * 2) as u32
    } else {
        tuple.__bindgen_anon_1.ipv4.daddr = if search.addr[0] == 0 {
            INADDR_LOOPBACK_BE
        } else {
            search.addr[0]
        };
        tuple.__bindgen_anon_1.ipv4.dport = (port as u16).to_be();
        (size_of::<u32>() * 2 + size_of::<u16>() * 2) as u32
    };
    let ctx = search.sock_addr.cast::<c_void>();
    // SAFETY: the tuple lives on this stack frame; a socket found is released right away.
    unsafe {
        let sk = if search.protocol == IPPROTO_TCP as u32 {
            bpf_skc_lookup_tcp(
                ctx,
                &raw mut tuple,
                tuple_size,
                BPF_F_CURRENT_NETNS as u64,
                0,
            )
        } else {
            bpf_sk_lookup_udp(
                ctx,
                &raw mut tuple,
                tuple_size,
                BPF_F_CURRENT_NETNS as u64,
                0,
            )
        };
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
    }
    true
}
