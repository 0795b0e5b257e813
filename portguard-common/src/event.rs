//! Records the programs send through the `EVENTS` ring buffer.

use core::mem::size_of;

pub const OP_BIND: u8 = 1;
pub const OP_CONNECT: u8 = 2;
/// UDP sendmsg on a socket the kernel autobound.
pub const OP_SENDMSG: u8 = 3;
/// A socket holding a port of a scope's range closed.
pub const OP_RELEASE: u8 = 4;
/// Written by the daemon, not the kernel: a pool had no block for a new cgroup.
pub const OP_POOL: u8 = 5;

pub const VERDICT_ALLOWED: u8 = 1;
pub const VERDICT_STEERED: u8 = 2;
pub const VERDICT_DENIED: u8 = 3;
pub const VERDICT_EXHAUSTED: u8 = 4;
pub const VERDICT_AUDIT_WOULD_DENY: u8 = 5;
/// Observe mode: a socket in no scope, recorded but not judged.
pub const VERDICT_OBSERVED: u8 = 6;
/// The kernel chose the port where no hook could steer it.
pub const VERDICT_AUTOBOUND: u8 = 7;
/// The socket gave its port back.
pub const VERDICT_RELEASED: u8 = 8;

/// `scope_id` of an event about a socket in no scope.
pub const NO_SCOPE: u32 = u32::MAX;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub cgroup_id: u64,
    pub tgid: u32,
    pub pid: u32,
    pub scope_id: u32,
    /// Ports tried before the verdict (steering only).
    pub attempts: u32,
    /// Remote address of a connect or sendmsg, network order; IPv4 in the first four bytes.
    pub remote_addr: [u8; 16],
    pub comm: [u8; 16],
    pub family: u16,
    /// Host order.
    pub local_port: u16,
    /// Host order.
    pub remote_port: u16,
    pub protocol: u8,
    pub op: u8,
    pub verdict: u8,
    pub _pad: [u8; 3],
    /// errno the call failed with, 0 when allowed.
    pub errno: i32,
}
const _: () = assert!(size_of::<Event>() == 80);

#[cfg(feature = "user")]
// SAFETY: repr(C), Copy, no padding (asserted above).
unsafe impl aya::Pod for Event {}
