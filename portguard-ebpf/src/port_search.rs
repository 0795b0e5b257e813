//! Finding a free port of a scope's range.
//!
//! Random retries alone fail most calls once a range is nearly full, so the search visits every
//! port of the range once, starting at a random offset (RFC 6056's "random start, then
//! sequential" idea), inside `bpf_loop` so that a 65,535-port range stays within the verifier's
//! limits. Ports the programs know are held are skipped without asking the kernel; for the rest
//! the kernel decides: `bpf_bind` in connect (EADDRINUSE: try the next), a socket lookup in bind.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock_addr, bpf_sock_tuple, sockaddr},
    helpers::generated::{
        bpf_bind, bpf_get_prandom_u32, bpf_loop, bpf_sk_lookup_udp, bpf_sk_release,
        bpf_skc_lookup_tcp,
    },
};
use portguard_common::{IPPROTO_TCP, ScopeRule, held_slot};

use crate::scope::port_held;

const EADDRINUSE: i64 = 98;
const AF_INET: u16 = 2;
const INADDR_LOOPBACK_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

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

#[repr(C)]
struct Search {
    sock_addr: *mut bpf_sock_addr,
    lo: u32,
    size: u32,
    start: u32,
    protocol: u32,
    /// Network order; the address the socket binds to.
    addr: u32,
    found: u32,
    attempts: u32,
    error: i32,
}

#[repr(C)]
struct SockaddrIn {
    family: u16,
    port_be: u16,
    addr_be: u32,
    zero: [u8; 8],
}

/// Binds the connecting socket to a free port of `rule`'s range on `addr` (network order; the
/// wildcard unless the socket chose a source address), in connect4 only: `bpf_bind` is not
/// available to other hooks.
#[inline(always)]
pub fn bind_free_port(
    sock_addr: *mut bpf_sock_addr,
    rule: &ScopeRule,
    protocol: u32,
    addr: u32,
) -> Found {
    search(sock_addr, rule, protocol, addr, bind_candidate)
}

/// Picks a port of `rule`'s range that no socket appears to hold for `protocol` on `addr`
/// (network order). The caller rewrites the bind to it.
#[inline(always)]
pub fn pick_free_port(
    sock_addr: *mut bpf_sock_addr,
    rule: &ScopeRule,
    protocol: u32,
    addr: u32,
) -> Found {
    search(sock_addr, rule, protocol, addr, probe_candidate)
}

#[inline(always)]
fn search(
    sock_addr: *mut bpf_sock_addr,
    rule: &ScopeRule,
    protocol: u32,
    addr: u32,
    candidate: unsafe extern "C" fn(u64, *mut Search) -> i64,
) -> Found {
    let size = rule.size();
    if size == 0 {
        return Found::Exhausted { attempts: 0 };
    }
    let mut search = Search {
        sock_addr,
        lo: rule.range_lo as u32,
        size,
        // SAFETY: plain helper call.
        start: unsafe { bpf_get_prandom_u32() } % size,
        protocol,
        addr,
        found: 0,
        attempts: 0,
        error: 0,
    };
    // The callback reaches the loop as a function symbol, which becomes the BPF_PSEUDO_FUNC
    // relocation the verifier needs; it must not pass through an integer.
    let callback = candidate as *mut c_void;
    // SAFETY: `search` outlives the loop; the callback only touches it through the pointer.
    unsafe { bpf_loop(size, callback, (&raw mut search).cast(), 0) };
    if search.found != 0 {
        Found::Port {
            port: search.found as u16,
            attempts: search.attempts,
        }
    } else if search.error != 0 {
        Found::Error {
            errno: search.error,
            attempts: search.attempts,
        }
    } else {
        Found::Exhausted {
            attempts: search.attempts,
        }
    }
}

/// The `index`-th port after the random start, wrapping inside the range.
#[inline(always)]
fn nth_port(search: &Search, index: u64) -> Option<u32> {
    let size = search.size;
    if size == 0 {
        return None;
    }
    Some(search.lo + ((search.start as u64 + index) % size as u64) as u32)
}

unsafe extern "C" fn bind_candidate(index: u64, search: *mut Search) -> i64 {
    // SAFETY: bpf_loop hands back the pointer `search` passed in.
    let search = unsafe { &mut *search };
    let Some(port) = nth_port(search, index) else {
        return 1;
    };
    if port_held(held_slot(search.protocol, port)) {
        return 0;
    }
    search.attempts += 1;
    let mut addr = SockaddrIn {
        family: AF_INET,
        port_be: (port as u16).to_be(),
        addr_be: search.addr,
        zero: [0; 8],
    };
    // SAFETY: `addr` is a valid sockaddr_in on this stack frame.
    let ret = unsafe {
        bpf_bind(
            search.sock_addr,
            (&raw mut addr).cast::<sockaddr>(),
            size_of::<SockaddrIn>() as i32,
        )
    };
    match ret {
        0 => {
            search.found = port;
            1
        }
        ret if ret == -EADDRINUSE => 0,
        ret => {
            search.error = -(ret as i32);
            1
        }
    }
}

unsafe extern "C" fn probe_candidate(index: u64, search: *mut Search) -> i64 {
    // SAFETY: bpf_loop hands back the pointer `search` passed in.
    let search = unsafe { &mut *search };
    let Some(port) = nth_port(search, index) else {
        return 1;
    };
    if port_held(held_slot(search.protocol, port)) {
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
    {
        tuple.__bindgen_anon_1.ipv4.daddr = if search.addr == 0 {
            INADDR_LOOPBACK_BE
        } else {
            search.addr
        };
        tuple.__bindgen_anon_1.ipv4.dport = (port as u16).to_be();
    }
    let tuple_size = (size_of::<u32>() * 2 + size_of::<u16>() * 2) as u32;
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
