//! portguard's cgroup programs: per-cgroup ephemeral port ranges and bind rules, IPv4 and IPv6.
#![no_std]
#![no_main]
// The BPF target has no atomic read-modify-write types; the counters need the intrinsic.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod accounting;
mod addr;
mod bind;
mod connect;
mod dest;
mod events;
mod maps;
mod port_search;
mod scope;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never entered.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
