//! A process that moves itself into a cgroup and opens connections of either family there,
//! printing one JSON line, for the end-to-end tests of IPv6, dual-stack sockets and shared ports.
//!
//! Usage: pg-connect CGROUP_DIR OP PROTO FAMILY ARGS...
//!   PROTO: tcp | udp. FAMILY: 4 (AF_INET), 6 (AF_INET6), dual (AF_INET6 socket, IPv4 addresses
//!   used as ::ffff:a.b.c.d).
//!   hold PROTO FAMILY COUNT DEST...
//!       connect COUNT new unbound sockets, the i-th to DEST[i % len], keeping them all, until
//!       one fails: {"connected":[[local port, dest index],...],"errno":errno of the failure or 0}
//!   churn PROTO FAMILY COUNT LO HI DEST...
//!       COUNT times: connect a new socket to the next DEST, (TCP) wait for the peer to close
//!       first, close: {"count":N,"failures":F,"errnos":[..distinct..],"outside":ports not in LO-HI}
//!   bind PROTO FAMILY ADDR:PORT
//!       bind a new socket to ADDR:PORT: {"port":local port or 0,"errno":..}
//!   bind-hold PROTO FAMILY COUNT ADDR:PORT
//!       bind COUNT new sockets to ADDR:PORT, keeping them, until one fails:
//!       {"ports":[local ports],"errno":errno of the failure or 0}
//! DEST and ADDR: 127.0.0.1:PORT or [::1]:PORT style socket addresses.

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::RawFd,
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [cgroup, op, proto, family, rest @ ..] = args.as_slice() else {
        eprintln!("usage: pg-connect CGROUP_DIR OP PROTO FAMILY ARGS...");
        std::process::exit(2);
    };
    std::fs::write(
        format!("{cgroup}/cgroup.procs"),
        std::process::id().to_string(),
    )
    .unwrap_or_else(|error| panic!("cannot move into {cgroup}: {error}"));
    let kind = match proto.as_str() {
        "tcp" => libc::SOCK_STREAM,
        "udp" => libc::SOCK_DGRAM,
        other => panic!("unknown protocol {other}"),
    };
    let family = Family::parse(family);
    match op.as_str() {
        "hold" => {
            let count: usize = rest[0].parse().expect("count");
            let dests = parse_addrs(&rest[1..]);
            let mut kept = vec![];
            let mut connected = vec![];
            let mut failure = 0;
            for i in 0..count {
                let fd = family.socket(kind);
                let dest = i % dests.len();
                match connect(fd, &family.sockaddr(dests[dest])) {
                    Ok(()) => {
                        connected.push(format!("[{},{dest}]", local_port(fd)));
                        kept.push(fd);
                    }
                    Err(error) => {
                        failure = error.raw_os_error().unwrap_or(-1);
                        break;
                    }
                }
            }
            println!(
                "{{\"connected\":[{}],\"errno\":{failure}}}",
                connected.join(",")
            );
        }
        "churn" => {
            let count: usize = rest[0].parse().expect("count");
            let lo: u16 = rest[1].parse().expect("lo");
            let hi: u16 = rest[2].parse().expect("hi");
            let dests = parse_addrs(&rest[3..]);
            let (mut failures, mut outside) = (0, 0);
            let mut errnos = BTreeSet::new();
            for i in 0..count {
                let fd = family.socket(kind);
                match connect(fd, &family.sockaddr(dests[i % dests.len()])) {
                    Ok(()) => {
                        if !(lo..=hi).contains(&local_port(fd)) {
                            outside += 1;
                        }
                        if kind == libc::SOCK_STREAM {
                            wait_for_peer_close(fd);
                        }
                    }
                    Err(error) => {
                        failures += 1;
                        errnos.insert(error.raw_os_error().unwrap_or(-1));
                    }
                }
                // SAFETY: closing our own fd.
                unsafe { libc::close(fd) };
            }
            let errnos: Vec<String> = errnos.iter().map(i32::to_string).collect();
            println!(
                "{{\"count\":{count},\"failures\":{failures},\"errnos\":[{}],\"outside\":{outside}}}",
                errnos.join(",")
            );
        }
        "bind" => {
            let addr: SocketAddr = rest[0].parse().expect("ADDR:PORT");
            let fd = family.socket(kind);
            let (port, errno) = match bind(fd, &family.sockaddr(addr)) {
                Ok(()) => (local_port(fd), 0),
                Err(error) => (0, error.raw_os_error().unwrap_or(-1)),
            };
            println!("{{\"port\":{port},\"errno\":{errno}}}");
        }
        "bind-hold" => {
            let count: usize = rest[0].parse().expect("count");
            let addr = family.sockaddr(rest[1].parse().expect("ADDR:PORT"));
            let (mut ports, mut failure) = (vec![], 0);
            for _ in 0..count {
                let fd = family.socket(kind);
                match bind(fd, &addr) {
                    Ok(()) => ports.push(local_port(fd).to_string()),
                    Err(error) => {
                        failure = error.raw_os_error().unwrap_or(-1);
                        break;
                    }
                }
            }
            println!("{{\"ports\":[{}],\"errno\":{failure}}}", ports.join(","));
        }
        other => panic!("unknown op {other}"),
    }
}

#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
    Dual,
}

impl Family {
    fn parse(text: &str) -> Self {
        match text {
            "4" => Self::V4,
            "6" => Self::V6,
            "dual" => Self::Dual,
            other => panic!("unknown family {other}"),
        }
    }

    fn socket(self, kind: i32) -> RawFd {
        let domain = match self {
            Self::V4 => libc::AF_INET,
            Self::V6 | Self::Dual => libc::AF_INET6,
        };
        // SAFETY: plain syscall.
        let fd = unsafe { libc::socket(domain, kind, 0) };
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        if matches!(self, Self::Dual) {
            let off: libc::c_int = 0;
            // SAFETY: valid fd and option buffer.
            let ret = unsafe {
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_IPV6,
                    libc::IPV6_V6ONLY,
                    (&raw const off).cast(),
                    size_of::<libc::c_int>() as u32,
                )
            };
            assert_eq!(ret, 0, "IPV6_V6ONLY: {}", io::Error::last_os_error());
        }
        fd
    }

    /// `addr` as this family's sockaddr (IPv4 mapped for dual-stack sockets).
    fn sockaddr(self, addr: SocketAddr) -> (libc::sockaddr_storage, u32) {
        // SAFETY: an all-zero sockaddr_storage is valid.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let ip6 = match (self, addr.ip()) {
            (Self::V4, IpAddr::V4(ip)) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as u16,
                    sin_port: addr.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(ip.octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_in fits in sockaddr_storage.
                unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
                return (storage, size_of::<libc::sockaddr_in>() as u32);
            }
            (Self::V4, IpAddr::V6(_)) => panic!("an IPv6 address for an AF_INET socket"),
            (_, IpAddr::V4(ip)) => ip.to_ipv6_mapped(),
            (_, IpAddr::V6(ip)) => ip,
        };
        let sin6 = libc::sockaddr_in6 {
            sin6_family: libc::AF_INET6 as u16,
            sin6_port: addr.port().to_be(),
            sin6_flowinfo: 0,
            sin6_addr: libc::in6_addr {
                s6_addr: ip6.octets(),
            },
            sin6_scope_id: 0,
        };
        // SAFETY: sockaddr_in6 fits in sockaddr_storage.
        unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
        (storage, size_of::<libc::sockaddr_in6>() as u32)
    }
}

fn parse_addrs(texts: &[String]) -> Vec<SocketAddr> {
    assert!(!texts.is_empty(), "no destination");
    texts
        .iter()
        .map(|text| text.parse().expect("ADDR:PORT"))
        .collect()
}

fn bind(fd: RawFd, (addr, len): &(libc::sockaddr_storage, u32)) -> io::Result<()> {
    // SAFETY: valid fd and address of `len` bytes.
    let ret = unsafe { libc::bind(fd, (&raw const *addr).cast(), *len) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn connect(fd: RawFd, (addr, len): &(libc::sockaddr_storage, u32)) -> io::Result<()> {
    // SAFETY: valid fd and address of `len` bytes.
    let ret = unsafe { libc::connect(fd, (&raw const *addr).cast(), *len) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads until the peer's FIN, so that the peer, not this socket, ends in TIME_WAIT.
fn wait_for_peer_close(fd: RawFd) {
    let mut byte = 0u8;
    // SAFETY: valid fd and a one-byte buffer.
    while unsafe { libc::recv(fd, (&raw mut byte).cast(), 1, 0) } > 0 {}
}

fn local_port(fd: RawFd) -> u16 {
    // SAFETY: an all-zero sockaddr_storage is valid; getsockname fills it.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as u32;
    // SAFETY: valid fd and out-pointers.
    let ret = unsafe { libc::getsockname(fd, (&raw mut addr).cast(), &mut len) };
    assert_eq!(ret, 0, "getsockname: {}", io::Error::last_os_error());
    // sin_port and sin6_port are both at offset 2.
    // SAFETY: the storage is at least as large as sockaddr_in.
    let sin: libc::sockaddr_in = unsafe { std::ptr::read((&raw const addr).cast()) };
    u16::from_be(sin.sin_port)
}
