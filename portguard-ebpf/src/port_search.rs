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
//!   (see `dest`); a port is usable unless something holds it alone or this very connection
//!   (remote address and port) already runs on it. The connection is claimed in `TUPLES`, then
//!   the socket is bound with SO_REUSEADDR so that connections to other destinations may share
//!   the port, as the kernel's own allocator lets them. Before the loop the kernel is asked
//!   whether it still holds the connection on the first ports of the destination's order (a
//!   LAST_ACK not over yet); connections closed recently (TIME_WAIT, by the programs' records)
//!   are avoided while another port is free; when none is, a second pass offers them and the
//!   kernel decides, as it does for its own ports, whether the TIME_WAIT can be reused.
//!
//! The verifier checks a `bpf_loop` callback again for every state the loop can be entered or
//! continued in, and every branch inside multiplies that: the callbacks stay small, the socket
//! lookups stay outside the shared loops (inside, they made the connect programs ten times as
//! costly to verify, and the daemon's start as many times slower), and the one field that
//! differs from path to path as a constant is made opaque.

// Map keys go by reference: a copy of the 24-byte key on the stack on every call makes the
// loop's callbacks more costly to verify.
#![allow(clippy::needless_borrows_for_generic_args)]

use core::{
    ffi::c_void,
    mem::{MaybeUninit, size_of},
    ptr::write_volatile,
};

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_NOEXIST, bpf_sock_addr, bpf_sock_tuple,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
        sockaddr,
    },
    helpers::generated::{
        bpf_bind, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_loop, bpf_probe_read_kernel,
        bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp,
    },
};
use portguard_common::{BUSY_HINT_NS, IPPROTO_TCP, ScopeRule, TupleKey, held_slot};

use crate::{
    addr::AF_INET6,
    maps::{BUSY_HINT, TIME_WAIT, TUPLES},
    scope::{port_held, port_shared},
};

const EADDRINUSE: i64 = 98;
/// How many ports at the start of a destination's order are checked with the kernel.
const STILL_CLOSING_CHECKS: u32 = 2;
const INADDR_LOOPBACK_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const IN6ADDR_LOOPBACK_BE: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// How the search ended: a port, or an errno, or neither (every port of the range taken).
///
/// A struct with every field set rather than an enum: the compiler copies enums with their
/// unset fields, and the verifier refuses a program that reads an unset register.
#[derive(Clone, Copy)]
pub struct Found {
    /// The port found, 0 for none.
    pub port: u16,
    /// Why the kernel refused a bind, for a reason other than the port being taken; 0 for none.
    pub errno: i32,
    /// Ports tried.
    pub attempts: u32,
}

impl Found {
    pub const fn exhausted(attempts: u32) -> Self {
        Self {
            port: 0,
            errno: 0,
            attempts,
        }
    }
    pub const fn error(errno: i32, attempts: u32) -> Self {
        Self {
            port: 0,
            errno,
            attempts,
        }
    }
    pub const fn is_exhausted(&self) -> bool {
        self.port == 0 && self.errno == 0
    }
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
    /// Where the kernel would file this connection, when the local address it will get is
    /// known: lets the search ask the kernel whether an earlier connection on a candidate port
    /// is still there (LAST_ACK, TIME_WAIT), as the kernel's own allocator does.
    pub lookup: Option<ConnectionLookup>,
}

/// A connection as the kernel's lookup sees it, addresses in network order (IPv4 in the first
/// word when `family` is `AF_INET`).
#[derive(Clone, Copy)]
pub struct ConnectionLookup {
    pub family: u16,
    pub local: [u32; 4],
    pub remote: [u32; 4],
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
    /// 0 when no kernel lookup can be made, else the family of `lookup_*`.
    lookup_family: u32,
    lookup_local: [u32; 4],
    lookup_remote: [u32; 4],
    now: u64,
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
    if let Some(lookup) = shared.lookup
        && protocol == IPPROTO_TCP as u32
    {
        search.lookup_family = lookup.family as u32;
        search.lookup_local = lookup.local;
        search.lookup_remote = lookup.remote;
        search.skip_connections_still_closing();
    }
    let first = search.run(shared_first_pass);
    if !first.is_exhausted() {
        return (first, search.examined);
    }
    let found = search.run(shared_second_pass);
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
            lookup_family: 0,
            lookup_local: [0; 4],
            lookup_remote: [0; 4],
            // SAFETY: plain helper call.
            now: unsafe { bpf_ktime_get_ns() },
            found: 0,
            attempts: 0,
            examined: 0,
            error: 0,
        }
    }

    /// A first pass that avoids ports known to be busy, then, if it found nothing, a second
    /// that offers them to the kernel. Both passes are one loop over twice the range (see
    /// `is_first_pass`): one call site, so the verifier checks the callback once.
    #[inline(always)]
    fn two_passes(&mut self, candidate: unsafe extern "C" fn(u64, *mut Search) -> i64) -> Found {
        let size = self.size;
        self.run_for(size * 2, candidate)
    }

    /// Whether loop iteration `index` belongs to the first pass.
    #[inline(always)]
    fn is_first_pass(&self, index: u64) -> bool {
        index < self.size as u64
    }

    #[inline(always)]
    fn run(&mut self, candidate: unsafe extern "C" fn(u64, *mut Search) -> i64) -> Found {
        let size = self.size;
        self.run_for(size, candidate)
    }

    #[inline(always)]
    fn run_for(
        &mut self,
        iterations: u32,
        candidate: unsafe extern "C" fn(u64, *mut Search) -> i64,
    ) -> Found {
        if self.size == 0 {
            return Found::exhausted(0);
        }
        // The hook reaches this loop along paths that know the socket's family as different
        // constants; the verifier would check the loop's callback once per path. Copied through
        // a helper, it becomes a value the verifier does not know, and one check covers all.
        opaque(&mut self.family);
        // The callback reaches the loop as a function symbol, which becomes the
        // BPF_PSEUDO_FUNC relocation the verifier needs; it must not pass through an integer.
        let callback = candidate as *mut c_void;
        // SAFETY: `self` outlives the loop; the callback only touches it through the pointer.
        unsafe { bpf_loop(iterations, callback, (self as *mut Self).cast(), 0) };
        Found {
            port: self.found as u16,
            errno: if self.found != 0 { 0 } else { self.error },
            attempts: self.attempts,
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

    /// Moves the start past the first ports of the destination's order whose earlier
    /// connection the kernel still holds (a LAST_ACK or TIME_WAIT not over yet). Connections to
    /// one destination reuse its ports in order, so the port the search would try first is the
    /// one most recently given up for longest; when the range is small and busy it may still be
    /// closing, and the kernel would refuse the duplicate. Asked here, outside the loop: asking
    /// inside it makes the programs several times as costly to verify.
    #[inline(always)]
    fn skip_connections_still_closing(&mut self) {
        for _ in 0..STILL_CLOSING_CHECKS {
            let Some(port) = self.nth_port(0) else {
                return;
            };
            if !kernel_holds_connection(self, port) {
                // Whatever the programs recorded of this connection's end (a TIME_WAIT that a
                // reset cut short, or that the kernel reused) is over: the first pass may take
                // it at once instead of searching on.
                self.key.local_port = port as u16;
                let _ = TIME_WAIT.remove(&self.key);
                return;
            }
            let size = self.size;
            if size == 0 {
                return;
            }
            self.start = (self.start + 1) % size;
            self.examined += 1;
        }
    }

    /// Claims the search's connection on `port` (the claim is what keeps a concurrent connect
    /// to the same destination off it), then binds the socket. The loop's verdict: 1 to stop.
    #[inline(always)]
    fn claim_and_bind(&mut self, port: u32, slot: u32) -> i64 {
        if TUPLES
            .insert(&self.key, &self.cookie, BPF_NOEXIST as u64)
            .is_err()
        {
            return 0;
        }
        self.attempts += 1;
        let ret = self.bind(port);
        if ret == 0 {
            self.found = port;
            return 1;
        }
        let _ = TUPLES.remove(&self.key);
        if ret == -EADDRINUSE {
            self.mark_busy(slot);
            return 0;
        }
        self.error = -(ret as i32);
        1
    }

    /// Remembers that the kernel found the port of `slot` taken.
    #[inline(always)]
    fn mark_busy(&self, slot: u32) {
        let _ = BUSY_HINT.set(slot, self.now, 0);
    }
}

/// Makes `value` a value the verifier does not know (see `Search::run_for`).
#[inline(always)]
fn opaque(value: &mut u32) {
    let copy = *value;
    // SAFETY: copies four bytes between two live stack slots.
    unsafe {
        bpf_probe_read_kernel(
            (value as *mut u32).cast(),
            size_of::<u32>() as u32,
            (&raw const copy).cast(),
        )
    };
}

unsafe extern "C" fn exclusive_candidate(index: u64, search: *mut Search) -> i64 {
    // SAFETY: bpf_loop hands back the pointer `search` passed in.
    let search = unsafe { &mut *search };
    let Some(port) = search.nth_port(index) else {
        return 1;
    };
    let slot = held_slot(search.protocol, port);
    let first_pass = search.is_first_pass(index);
    if port_held(slot) || port_shared(slot) || (first_pass && search.busy_a_moment_ago(slot)) {
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

/// The first pass of the shared search: ports the maps say this connection may use, skipping
/// ports busy a moment ago and connections closed recently (TIME_WAIT, or LAST_ACK after the
/// remote end closed first), bound at once.
unsafe extern "C" fn shared_first_pass(index: u64, search: *mut Search) -> i64 {
    // SAFETY: bpf_loop hands back the pointer `search` passed in.
    let search = unsafe { &mut *search };
    let Some(port) = search.nth_port(index) else {
        return 1;
    };
    search.examined += 1;
    let slot = held_slot(search.protocol, port);
    // A port some socket holds alone (a listener, an explicit bind) is never shared.
    if port_held(slot) || search.busy_a_moment_ago(slot) {
        return 0;
    }
    search.key.local_port = port as u16;
    // SAFETY: the value is copied out at once.
    let closed_until = unsafe { TIME_WAIT.get(&search.key) }.copied();
    if closed_until.is_some_and(|end| end > search.now) {
        return 0;
    }
    search.claim_and_bind(port, slot)
}

/// The second pass, when the first found nothing: every port nobody holds alone and that was
/// not busy a moment ago, connections closed recently included: the kernel decides whether a
/// TIME_WAIT may be reused, as it does for its own ports. The destination's order makes the
/// first such port the one whose connection closed longest ago, the likeliest to be reusable.
unsafe extern "C" fn shared_second_pass(index: u64, search: *mut Search) -> i64 {
    // SAFETY: bpf_loop hands back the pointer `search` passed in.
    let search = unsafe { &mut *search };
    let Some(port) = search.nth_port(index) else {
        return 1;
    };
    // Counted too, so that the destination's counter moves past the port taken here and the
    // next connection does not start on the connection just given up.
    search.examined += 1;
    let slot = held_slot(search.protocol, port);
    // Ports busy a moment ago are still skipped: asking the kernel about each of them again
    // costs a failed bind apiece, hundreds of microseconds in a nearly full range. A port
    // freed by a socket the programs do not know is found again within `BUSY_HINT_NS`.
    if port_held(slot) || search.busy_a_moment_ago(slot) {
        return 0;
    }
    search.key.local_port = port as u16;
    let found = search.claim_and_bind(port, slot);
    if search.found != 0 {
        // A TIME_WAIT the kernel lets this connection reuse is over.
        let _ = TIME_WAIT.remove(&search.key);
    }
    found
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

/// Whether the kernel still holds a connection from `port` to the search's remote end, in any
/// state. A listener on `port` answers too (it holds the port alone).
#[inline(always)]
fn kernel_holds_connection(search: &Search, port: u32) -> bool {
    // The tuple is that of a packet arriving from the remote end.
    let (mut tuple, tuple_size) = lookup_tuple(
        search.lookup_family,
        search.lookup_remote,
        search.lookup_local,
        search.key.remote_port.to_be(),
        (port as u16).to_be(),
    );
    // SAFETY: the tuple lives on this stack frame; a socket found is released right away.
    unsafe {
        let sk = bpf_skc_lookup_tcp(
            search.sock_addr.cast::<c_void>(),
            &raw mut tuple,
            tuple_size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        );
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
        true
    }
}

/// A lookup tuple for `family` (addresses network order, IPv4 in the first word) and its size.
///
/// Every word is stored on its own, volatile: the compiler would otherwise turn the zeroed parts
/// into a call to its byte-by-byte memset loop, which the verifier walks again on every path.
#[inline(always)]
fn lookup_tuple(
    family: u32,
    saddr: [u32; 4],
    daddr: [u32; 4],
    sport_be: u16,
    dport_be: u16,
) -> (bpf_sock_tuple, u32) {
    let [s0, s1] = sport_be.to_ne_bytes();
    let [d0, d1] = dport_be.to_ne_bytes();
    let ports = u32::from_ne_bytes([s0, s1, d0, d1]);
    // The IPv4 member (saddr, daddr, sport, dport) lies over the IPv6 one's first 12 bytes.
    let words: [u32; 9] = if family == AF_INET6 as u32 {
        [
            saddr[0], saddr[1], saddr[2], saddr[3], daddr[0], daddr[1], daddr[2], daddr[3], ports,
        ]
    } else {
        [saddr[0], daddr[0], ports, 0, 0, 0, 0, 0, 0]
    };
    let mut tuple = MaybeUninit::<bpf_sock_tuple>::uninit();
    let out = tuple.as_mut_ptr().cast::<u32>();
    for (i, word) in words.into_iter().enumerate() {
        // SAFETY: the tuple is 36 bytes, nine words; each is written once.
        unsafe { write_volatile(out.add(i), word) };
    }
    let size = if family == AF_INET6 as u32 {
        size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>()
    } else {
        size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>()
    };
    // SAFETY: every byte was written above.
    (unsafe { tuple.assume_init() }, size as u32)
}

/// Whether the kernel knows a socket bound to `port` that a bind to it would collide with:
/// a TCP listener or a bound UDP socket, on the bind address or the wildcard. Sockets bound but
/// neither listening nor in a lookup table cannot be seen from here; the bind then fails with
/// EADDRINUSE as it would without portguard.
#[inline(always)]
fn socket_holds(search: &Search, port: u32) -> bool {
    let (daddr, wildcard) = if search.family == AF_INET6 as u32 {
        (search.addr, search.addr == [0; 4])
    } else {
        (search.addr, search.addr[0] == 0)
    };
    let loopback = if search.family == AF_INET6 as u32 {
        IN6ADDR_LOOPBACK_BE
    } else {
        [INADDR_LOOPBACK_BE, 0, 0, 0]
    };
    let (mut tuple, tuple_size) = lookup_tuple(
        search.family,
        [0; 4],
        if wildcard { loopback } else { daddr },
        0,
        (port as u16).to_be(),
    );
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
