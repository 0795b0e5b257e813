//! Where the shared-port search starts for one destination (RFC 6056, algorithm 4).
//!
//! A keyed hash of the destination picks an offset into the range and one of
//! `DEST_COUNTER_SLOTS` counters; the search starts at offset + counter, and the counter moves
//! on by the ports each search looks at. So connections to one destination walk the range in
//! order (each new one starts where the last one stopped, without re-trying the ports it has
//! already used), while different destinations start at unrelated places and reuse each other's
//! ports. Without the key, which is random and never leaves the kernel and the daemon, an
//! observer cannot predict the next port.
//!
//! Algorithm 4 was chosen over the RFC's others: 1 and 2 (random ports) make every connection
//! to a busy destination collide at random and need retries that grow with the fill; 3 (hash
//! offset only) restarts every search for a destination at the same place, re-probing each port
//! still in use; 5 (random increments) trades sequential reuse for little. The kernel itself uses
//! a variant of 4 (`__inet_hash_connect`), so a scope's ports behave as the host's do.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use portguard_common::DEST_COUNTER_SLOTS;

use crate::maps::{DEST_COUNTERS, PORT_SECRET};

/// The destination's place in the range: the hash's offset and its counter slot.
pub struct DestStart {
    pub offset: u32,
    pub counter_slot: u32,
}

/// Hashes the destination (mapped address, port, protocol) with the secret key.
#[inline(always)]
pub fn dest_start(remote: &[u32; 4], remote_port: u16, protocol: u32, size: u32) -> DestStart {
    let key = PORT_SECRET.get(0).copied().unwrap_or([0, 0]);
    let hash = siphash24(
        key,
        [
            u64::from(remote[0]) | u64::from(remote[1]) << 32,
            u64::from(remote[2]) | u64::from(remote[3]) << 32,
            u64::from(remote_port) | u64::from(protocol) << 16,
        ],
    );
    let low = hash as u32;
    DestStart {
        offset: if size == 0 { 0 } else { low % size },
        counter_slot: (hash >> 32) as u32 % DEST_COUNTER_SLOTS,
    }
}

/// The counter of `slot`, where this destination's search continues.
#[inline(always)]
pub fn dest_counter(slot: u32) -> u32 {
    DEST_COUNTERS.get(slot).copied().unwrap_or(0)
}

/// Moves the counter of `slot` past the `examined` ports a search looked at.
#[inline(always)]
pub fn advance_dest_counter(slot: u32, examined: u32) {
    if let Some(counter) = DEST_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: a live, aligned map value; with its result unused this is BPF's XADD.
        unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(counter, examined) };
    }
}

/// SipHash-2-4 of three 64-bit words (24 bytes), the keyed PRF the kernel also uses for its
/// port offsets.
#[inline(always)]
fn siphash24(key: [u64; 2], words: [u64; 3]) -> u64 {
    let mut v = [
        key[0] ^ 0x736f_6d65_7073_6575,
        key[1] ^ 0x646f_7261_6e64_6f6d,
        key[0] ^ 0x6c79_6765_6e65_7261,
        key[1] ^ 0x7465_6462_7974_6573,
    ];
    for word in words {
        v[3] ^= word;
        sip_round(&mut v);
        sip_round(&mut v);
        v[0] ^= word;
    }
    let last = 24u64 << 56;
    v[3] ^= last;
    sip_round(&mut v);
    sip_round(&mut v);
    v[0] ^= last;
    v[2] ^= 0xff;
    for _ in 0..4 {
        sip_round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

#[inline(always)]
fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13) ^ v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16) ^ v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21) ^ v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17) ^ v[2];
    v[2] = v[2].rotate_left(32);
}
