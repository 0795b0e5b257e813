//! IPv4 socket calls the probe binaries share (pg-probe, pg-bench): each probe makes the same
//! few calls towards loopback, and they should behave alike.

use std::{io, os::fd::RawFd};

/// A new AF_INET socket of `kind` (SOCK_STREAM, SOCK_DGRAM).
pub fn socket(kind: i32) -> RawFd {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(libc::AF_INET, kind, 0) };
    assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
    fd
}

/// `ip`:`port` as a sockaddr_in.
pub fn sockaddr(ip: [u8; 4], port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip),
        },
        sin_zero: [0; 8],
    }
}

/// 127.0.0.1:`port`.
pub fn loopback(port: u16) -> libc::sockaddr_in {
    sockaddr([127, 0, 0, 1], port)
}

pub fn bind(fd: RawFd, addr: &libc::sockaddr_in) -> io::Result<()> {
    // SAFETY: valid fd and address.
    let ret = unsafe {
        libc::bind(
            fd,
            (&raw const *addr).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        )
    };
    result(ret)
}

/// Connects to 127.0.0.1:`port`.
pub fn connect(fd: RawFd, port: u16) -> io::Result<()> {
    let addr = loopback(port);
    // SAFETY: valid fd and address.
    let ret = unsafe {
        libc::connect(
            fd,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        )
    };
    result(ret)
}

pub fn local_port(fd: RawFd) -> u16 {
    // SAFETY: zeroed sockaddr_in is valid; getsockname fills it.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_in>() as u32;
    // SAFETY: valid fd and out-pointers.
    let ret = unsafe { libc::getsockname(fd, (&raw mut addr).cast(), &mut len) };
    assert_eq!(ret, 0, "getsockname: {}", io::Error::last_os_error());
    u16::from_be(addr.sin_port)
}

/// SO_LINGER with a zero timeout: close() sends a reset instead of a FIN, and leaves no
/// TIME_WAIT.
pub fn set_linger0(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and option buffer.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as u32,
        )
    };
    assert_eq!(ret, 0, "SO_LINGER: {}", io::Error::last_os_error());
}

fn result(ret: i32) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
