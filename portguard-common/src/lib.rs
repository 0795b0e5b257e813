//! The ABI between portguard's eBPF programs and its daemon.
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of implicit padding, because the same bytes are
//! read by the kernel and by user space. Enumerations are plain integers with named constants: an
//! out-of-range value written by either side must never be undefined behaviour.
#![no_std]

pub mod event;
pub mod names;
pub mod rule;

pub use event::*;
pub use names::*;
pub use rule::*;
