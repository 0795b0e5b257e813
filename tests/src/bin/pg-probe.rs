//! A process that moves itself into a cgroup and runs socket operations there, printing one JSON
//! line per operation, for the end-to-end tests.
//!
//! Usage: pg-probe CGROUP_DIR OP...
//!   bind tcp|udp PORT          bind 0.0.0.0:PORT (0: let the system choose) and keep the socket
//!   connect tcp|udp PORT       connect an unbound socket to 127.0.0.1:PORT and keep it
//!   connect-until-fail tcp|udp PORT MAX
//!                              connect new sockets until one fails or MAX succeeded
//!   sendto udp PORT            sendto 127.0.0.1:PORT from a new unbound socket, keep it
//!   close N                    close the N-th kept socket (0-based)
//!   send N PORT                sendto 127.0.0.1:PORT from the N-th kept socket
//!   bind-loop tcp|udp PORT N   N times: a new socket bound to PORT, closed at once
//!   rebind-loop tcp|udp PORT N bind one socket to PORT, then call bind() on it N more times
//!                              (each runs the bind hook, then fails EINVAL): one event per call
//!   rebind-paced tcp|udp PORT N RATE
//!                              the same at RATE calls per second at most
//!   bind0-loop tcp|udp N LO HI bind(0) N new sockets (each closed at once); report how many
//!                              got a port outside LO-HI and how many failed
//!   bind0-until FILE tcp|udp LO HI
//!                              the same until FILE exists (60 s at most), reporting the count
//!   connect-until FILE PORT tcp|udp LO HI
//!                              the same with connect() of new sockets to 127.0.0.1:PORT
//!   connect-loop tcp|udp|mix PORT N LO HI
//!                              N times: connect a new socket to 127.0.0.1:PORT (mix: TCP and
//!                              UDP by turns), check its port is in LO-HI, close it (a TCP one
//!                              with a reset, so no TIME_WAIT holds the port); report how many
//!                              of each, how many were outside LO-HI and how many failed
//!   hold FILE                  print {"op":"hold"} and wait (30 s at most) until FILE exists
//!   move DIR                   move this process into the cgroup at DIR (its sockets stay open)
//!   write N                    write one byte on the N-th kept (connected) socket
//!   linger0 N                  set SO_LINGER 0 on the N-th kept socket, so that closing a TCP
//!                              connection resets it and leaves no TIME_WAIT on its port
//! Each result: {"op":..,"proto":..,"port":local port or 0,"errno":0 or the errno,"count":..}

use std::{io, os::fd::RawFd};

use portguard_tests::loopback::{self, connect, local_port, set_linger0};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cgroup, ops)) = args.split_first() else {
        eprintln!("usage: pg-probe CGROUP_DIR OP...");
        std::process::exit(2);
    };
    std::fs::write(
        format!("{cgroup}/cgroup.procs"),
        std::process::id().to_string(),
    )
    .unwrap_or_else(|error| panic!("cannot move into {cgroup}: {error}"));
    let mut kept: Vec<Option<RawFd>> = vec![];
    let mut ops = ops.iter().map(String::as_str);
    while let Some(op) = ops.next() {
        let mut next = || {
            ops.next()
                .unwrap_or_else(|| panic!("{op}: missing argument"))
        };
        match op {
            "bind" => {
                let proto = next();
                let port: u16 = next().parse().expect("port");
                let fd = socket(proto);
                let result = bind(fd, port).map(|()| local_port(fd));
                report(op, proto, result, None);
                kept.push(Some(fd));
            }
            "connect" => {
                let proto = next();
                let port: u16 = next().parse().expect("port");
                let fd = socket(proto);
                let result = connect(fd, port).map(|()| local_port(fd));
                report(op, proto, result, None);
                kept.push(Some(fd));
            }
            "connect-until-fail" => {
                let proto = next();
                let port: u16 = next().parse().expect("port");
                let max: usize = next().parse().expect("max");
                let mut ports = vec![];
                let mut failure = Ok(0);
                for _ in 0..max {
                    let fd = socket(proto);
                    match connect(fd, port) {
                        Ok(()) => {
                            ports.push(local_port(fd));
                            kept.push(Some(fd));
                        }
                        Err(error) => {
                            failure = Err(error);
                            // SAFETY: closing our own fd.
                            unsafe { libc::close(fd) };
                            break;
                        }
                    }
                }
                report(op, proto, failure, Some(&ports));
            }
            "sendto" => {
                let proto = next();
                let port: u16 = next().parse().expect("port");
                let fd = socket(proto);
                report(op, proto, send_to(fd, port), None);
                kept.push(Some(fd));
            }
            "bind-loop" => {
                let proto = next();
                let port: u16 = next().parse().expect("port");
                let times: usize = next().parse().expect("count");
                let mut failures = 0;
                for _ in 0..times {
                    let fd = socket(proto);
                    failures += usize::from(bind(fd, port).is_err());
                    // SAFETY: closing our own fd.
                    unsafe { libc::close(fd) };
                }
                println!(
                    "{{\"op\":\"bind-loop\",\"proto\":\"{proto}\",\"port\":{port},\"errno\":0,\"failures\":{failures},\"pid\":{}}}",
                    std::process::id()
                );
            }
            "rebind-loop" | "rebind-paced" => {
                let proto = next();
                let port: u16 = next().parse().expect("port");
                let times: usize = next().parse().expect("count");
                let per_second: f64 = if op == "rebind-paced" {
                    next().parse().expect("rate")
                } else {
                    f64::INFINITY
                };
                let fd = socket(proto);
                bind(fd, port).expect("first bind");
                let mut refused = 0;
                let start = std::time::Instant::now();
                for call in 0..times {
                    // Pace in batches so that sleeping does not dominate.
                    if call % 256 == 0 && per_second.is_finite() {
                        let due = std::time::Duration::from_secs_f64(call as f64 / per_second);
                        if let Some(wait) = due.checked_sub(start.elapsed()) {
                            std::thread::sleep(wait);
                        }
                    }
                    refused += usize::from(bind(fd, port).is_err());
                }
                println!(
                    "{{\"op\":\"rebind-loop\",\"proto\":\"{proto}\",\"port\":{port},\"errno\":0,\"failures\":{refused},\"pid\":{}}}",
                    std::process::id()
                );
                kept.push(Some(fd));
            }
            "bind0-loop" | "bind0-until" | "connect-until" => {
                let stop_file = (op != "bind0-loop").then(|| next().to_owned());
                // connect-until connects each new socket to this port instead of binding it.
                let connect_to: Option<u16> =
                    (op == "connect-until").then(|| next().parse().expect("port"));
                let proto = next();
                let times: usize = if stop_file.is_some() {
                    usize::MAX
                } else {
                    next().parse().expect("count")
                };
                let lo: u16 = next().parse().expect("lo");
                let hi: u16 = next().parse().expect("hi");
                let (mut outside, mut failures, mut done) = (0, 0, 0usize);
                let start = std::time::Instant::now();
                for call in 0..times {
                    if let Some(file) = &stop_file
                        && call % 64 == 0
                        && (std::path::Path::new(file).exists() || start.elapsed().as_secs() >= 60)
                    {
                        break;
                    }
                    done += 1;
                    let fd = socket(proto);
                    let taken = match connect_to {
                        Some(port) => connect(fd, port),
                        None => bind(fd, 0),
                    };
                    match taken {
                        Ok(()) if !(lo..=hi).contains(&local_port(fd)) => outside += 1,
                        Ok(()) => {}
                        Err(_) => failures += 1,
                    }
                    // SAFETY: closing our own fd.
                    unsafe { libc::close(fd) };
                }
                println!(
                    "{{\"op\":\"{op}\",\"proto\":\"{proto}\",\"port\":0,\"errno\":0,\"count\":{done},\"outside\":{outside},\"failures\":{failures},\"pid\":{}}}",
                    std::process::id()
                );
            }
            "connect-loop" => {
                let mode = next();
                let port: u16 = next().parse().expect("port");
                let times: usize = next().parse().expect("count");
                let lo: u16 = next().parse().expect("lo");
                let hi: u16 = next().parse().expect("hi");
                let (mut tcp, mut udp, mut outside, mut failures) = (0, 0, 0, 0);
                let mut first_errno = 0;
                for call in 0..times {
                    let proto = match mode {
                        "mix" if call % 2 == 0 => "tcp",
                        "mix" => "udp",
                        other => other,
                    };
                    let fd = socket(proto);
                    match connect(fd, port) {
                        Ok(()) => {
                            if !(lo..=hi).contains(&local_port(fd)) {
                                outside += 1;
                            }
                            if proto == "tcp" {
                                set_linger0(fd);
                                tcp += 1;
                            } else {
                                udp += 1;
                            }
                        }
                        Err(error) => {
                            failures += 1;
                            if first_errno == 0 {
                                first_errno = error.raw_os_error().unwrap_or(-1);
                            }
                        }
                    }
                    // SAFETY: closing our own fd.
                    unsafe { libc::close(fd) };
                }
                println!(
                    "{{\"op\":\"connect-loop\",\"proto\":\"{mode}\",\"port\":0,\"errno\":{first_errno},\"count\":{times},\"tcp\":{tcp},\"udp\":{udp},\"outside\":{outside},\"failures\":{failures},\"pid\":{}}}",
                    std::process::id()
                );
            }
            "hold" => {
                let file = next();
                println!(
                    "{{\"op\":\"hold\",\"proto\":\"-\",\"port\":0,\"errno\":0,\"pid\":{}}}",
                    std::process::id()
                );
                use std::io::Write as _;
                std::io::stdout().flush().expect("flush");
                let start = std::time::Instant::now();
                while !std::path::Path::new(file).exists() && start.elapsed().as_secs() < 30 {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            "send" => {
                let index: usize = next().parse().expect("index");
                let port: u16 = next().parse().expect("port");
                let fd = kept[index].expect("socket closed");
                report(op, "udp", send_to(fd, port), None);
            }
            "close" => {
                let index: usize = next().parse().expect("index");
                let fd = kept[index].take().expect("socket already closed");
                // SAFETY: closing our own fd.
                unsafe { libc::close(fd) };
                report(op, "-", Ok(0), None);
            }
            "move" => {
                let dir = next();
                std::fs::write(
                    format!("{dir}/cgroup.procs"),
                    std::process::id().to_string(),
                )
                .unwrap_or_else(|error| panic!("cannot move into {dir}: {error}"));
                report(op, "-", Ok(0), None);
            }
            "write" => {
                let index: usize = next().parse().expect("index");
                let fd = kept[index].expect("socket closed");
                // SAFETY: valid fd and buffer.
                let written = unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) };
                let result = if written == 1 {
                    Ok(local_port(fd))
                } else {
                    Err(io::Error::last_os_error())
                };
                report(op, "-", result, None);
            }
            "linger0" => {
                let index: usize = next().parse().expect("index");
                let fd = kept[index].expect("socket closed");
                set_linger0(fd);
                report(op, "-", Ok(local_port(fd)), None);
            }
            other => panic!("unknown op {other}"),
        }
    }
}

fn report(op: &str, proto: &str, result: io::Result<u16>, ports: Option<&[u16]>) {
    let (port, errno) = match result {
        Ok(port) => (port, 0),
        Err(error) => (0, error.raw_os_error().unwrap_or(-1)),
    };
    let ports = ports.map_or(String::new(), |ports| {
        format!(
            ",\"ports\":[{}]",
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        )
    });
    println!(
        "{{\"op\":\"{op}\",\"proto\":\"{proto}\",\"port\":{port},\"errno\":{errno},\"pid\":{}{ports}}}",
        std::process::id()
    );
}

fn socket(proto: &str) -> RawFd {
    let kind = match proto {
        "tcp" => libc::SOCK_STREAM,
        "udp" => libc::SOCK_DGRAM,
        other => panic!("unknown protocol {other}"),
    };
    loopback::socket(kind)
}

/// Sends one byte to 127.0.0.1:`port` and returns the socket's local port.
fn send_to(fd: RawFd, port: u16) -> io::Result<u16> {
    let addr = loopback::loopback(port);
    // SAFETY: valid fd, buffer and address.
    let sent = unsafe {
        libc::sendto(
            fd,
            b"x".as_ptr().cast(),
            1,
            0,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(local_port(fd))
}

/// Binds to the wildcard address and `port`.
fn bind(fd: RawFd, port: u16) -> io::Result<()> {
    loopback::bind(fd, &loopback::sockaddr([0; 4], port))
}
