//! The addresses a hook sees, read the same way by the IPv4 and the IPv6 programs.
//!
//! A program may only read the `user_ip4` or the `user_ip6` field of its context, the one that
//! matches its attach type, so the family is a const parameter resolved at compile time.

use core::ptr::read_volatile;

use aya_ebpf::bindings::bpf_sock_addr;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// The third word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), network order.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The address and port a bind/connect/sendmsg call names.
#[derive(Clone, Copy)]
pub struct CallAddr {
    /// `AF_INET` or `AF_INET6`: the family of the hook, hence of `addr`.
    pub family: u16,
    /// Network order; IPv4 in the first word.
    pub addr: [u32; 4],
    /// Host order.
    pub port: u16,
}

impl CallAddr {
    #[inline(always)]
    pub fn read<const V6: bool>(sock_addr: &bpf_sock_addr) -> Self {
        let port = u16::from_be(sock_addr.user_port as u16);
        if V6 {
            // The context allows only 4-byte loads of `user_ip6` at constant offsets, not the
            // 8-byte copy the compiler would make of the array.
            // SAFETY: plain loads of context fields this program type may read.
            let addr = unsafe {
                [
                    read_volatile(&sock_addr.user_ip6[0]),
                    read_volatile(&sock_addr.user_ip6[1]),
                    read_volatile(&sock_addr.user_ip6[2]),
                    read_volatile(&sock_addr.user_ip6[3]),
                ]
            };
            Self {
                family: AF_INET6,
                addr,
                port,
            }
        } else {
            Self {
                family: AF_INET,
                addr: [sock_addr.user_ip4, 0, 0, 0],
                port,
            }
        }
    }

    /// The address as the kernel's connection tables hold it: IPv4 as `::ffff:a.b.c.d`, where a
    /// dual-stack socket's connection to an IPv4 host and an IPv4 socket's meet.
    #[inline(always)]
    pub fn mapped(&self) -> [u32; 4] {
        if self.family == AF_INET {
            [0, 0, V4_MAPPED_WORD, self.addr[0]]
        } else {
            self.addr
        }
    }
}

/// The IPv4 address inside an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), network order.
#[inline(always)]
pub fn v4_of_mapped(addr: &[u32; 4]) -> Option<u32> {
    (addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD).then_some(addr[3])
}

/// The socket's family and its local address (network order, IPv4 in the first word): the
/// wildcard unless it was bound or given a source address beforehand. The IPv6 hooks only see
/// IPv6 sockets; the IPv4 hooks see IPv6 UDP sockets too (connect() with an AF_INET address).
#[inline(always)]
pub fn socket_local<const V6: bool>(sock_addr: &bpf_sock_addr) -> (u16, [u32; 4]) {
    // SAFETY: `sk` is always set for sock_addr programs; each field is loaded on its own at a
    // constant offset, the only way the verifier accepts loads through a socket pointer.
    let (family, ip4, ip6) = unsafe {
        let sk = sock_addr.__bindgen_anon_1.sk;
        (
            if V6 {
                AF_INET6 as u32
            } else {
                read_volatile(&raw const (*sk).family)
            },
            read_volatile(&raw const (*sk).src_ip4),
            [
                read_volatile(&raw const (*sk).src_ip6[0]),
                read_volatile(&raw const (*sk).src_ip6[1]),
                read_volatile(&raw const (*sk).src_ip6[2]),
                read_volatile(&raw const (*sk).src_ip6[3]),
            ],
        )
    };
    if family == AF_INET6 as u32 {
        (AF_INET6, ip6)
    } else {
        (AF_INET, [ip4, 0, 0, 0])
    }
}
