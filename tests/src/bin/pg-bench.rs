//! Timed socket loops for `cargo xtask bench`: one process, pinned to one CPU, in a private
//! network namespace, timing each call with clock_gettime. Prints one JSON object.
//!
//! Usage: pg-bench [OPTIONS] OP CALLS
//!   --cpu N              pin to CPU N first
//!   --outside DIR        cgroup to sit in while setting up (fill sockets and listeners are made
//!                        there, outside the measured cgroup)
//!   --into DIR           cgroup to move into before the timed loop
//!   --range LO-HI        the port range the fill is taken from (a scope's range)
//!   --kernel-range       also make LO-HI the namespace's ip_local_port_range (the kernel's own
//!                        allocator on the scope's range)
//!   --fill SPEC          none | even | odd | PERMILLE (that share of the range, chosen at random)
//!                        held by bound TCP sockets made outside; or tw:PERMILLE: that many
//!                        connections made by the measured process itself, client closing
//!                        first, so their ports sit in TIME_WAIT
//!   --dst same|other     connect to the listener the TIME_WAIT fill used, or to another one
//!   --seed N             for the random fill
//! OP: udp      connect() an unbound UDP socket to 127.0.0.1, then close it
//!     tcp      connect() an unbound TCP socket to a loopback listener, then close it with
//!              SO_LINGER 0 (a reset: no TIME_WAIT builds up during the run); the listener's
//!              side is accepted and closed outside the timed part
//!     bind-range
//!              bind() a new UDP socket to each port of --range in turn, then close it
//!     bind-port PORT
//!              bind() a new UDP socket to PORT, then close it
//! Output: {"calls","failures","errno","call_ns":{median,p99,mean},"cycle_ns":{..},
//!          "fill_held","distinct_ports"}; call_ns times the connect()/bind() alone, cycle_ns
//!          that call and the close().

use std::{collections::HashSet, fs, io, os::fd::RawFd};

use portguard_tests::loopback::{self, connect, local_port, set_linger0, socket};
use serde_json::json;

const LISTEN_SAME: u16 = 5000;
const LISTEN_OTHER: u16 = 5001;

struct Options {
    cpu: Option<usize>,
    outside: Option<String>,
    into: Option<String>,
    range: Option<(u16, u16)>,
    kernel_range: bool,
    fill: String,
    dst_other: bool,
    seed: u64,
    op: String,
    port: u16,
    calls: usize,
}

fn main() {
    let options = parse(std::env::args().skip(1).collect());
    if let Some(cpu) = options.cpu {
        pin(cpu);
    }
    if let Some(outside) = &options.outside {
        enter_cgroup(outside);
    }
    // A namespace of our own: host traffic and other tests never meet these ports.
    // SAFETY: plain syscall; the process is single-threaded here.
    check(
        unsafe { libc::unshare(libc::CLONE_NEWNET) },
        "unshare(CLONE_NEWNET)",
    );
    loopback_up();
    let range = options.range;
    if options.kernel_range {
        let (lo, hi) = range.expect("--kernel-range needs --range");
        // /proc/sys/net resolves to the namespace of the task that opens it: ours now.
        fs::write(
            "/proc/sys/net/ipv4/ip_local_port_range",
            format!("{lo} {hi}"),
        )
        .expect("set ip_local_port_range");
    }
    let listeners = [listener(LISTEN_SAME), listener(LISTEN_OTHER)];
    let (fill_ports, tw_permille) = fill_plan(&options.fill, range, options.seed);
    let mut fill = vec![];
    for &port in &fill_ports {
        let fd = socket(libc::SOCK_STREAM);
        bind(fd, port).unwrap_or_else(|error| panic!("fill: bind {port}: {error}"));
        fill.push(fd);
    }
    if let Some(into) = &options.into {
        enter_cgroup(into);
    }
    let mut fill_held = fill.len();
    let mut tw_ports = HashSet::new();
    if let Some(permille) = tw_permille {
        let (lo, hi) = range.expect("a TIME_WAIT fill needs --range");
        let count = share(lo, hi, permille);
        for _ in 0..count {
            let fd = socket(libc::SOCK_STREAM);
            if connect(fd, LISTEN_SAME).is_ok() {
                tw_ports.insert(local_port(fd));
            }
            // The client closes first: its side ends in TIME_WAIT.
            close(fd);
            drain(listeners[0]);
        }
        fill_held = tw_ports.len();
    }
    let listener = listeners[usize::from(options.dst_other)];
    let dst = if options.dst_other {
        LISTEN_OTHER
    } else {
        LISTEN_SAME
    };
    let mut call_ns = Vec::with_capacity(options.calls);
    let mut cycle_ns = Vec::with_capacity(options.calls);
    let mut ports = HashSet::new();
    let (mut failures, mut first_errno) = (0usize, 0);
    for call in 0..options.calls {
        let (fd, port) = match options.op.as_str() {
            "udp" => (socket(libc::SOCK_DGRAM), None),
            "tcp" => {
                let fd = socket(libc::SOCK_STREAM);
                set_linger0(fd);
                (fd, None)
            }
            "bind-range" => {
                let (lo, hi) = range.expect("bind-range needs --range");
                let port = lo + (call % (usize::from(hi - lo) + 1)) as u16;
                (socket(libc::SOCK_DGRAM), Some(port))
            }
            "bind-port" => (socket(libc::SOCK_DGRAM), Some(options.port)),
            other => panic!("unknown op {other}"),
        };
        let start = now_ns();
        let result = match port {
            Some(port) => bind(fd, port),
            None => connect(fd, dst),
        };
        let called = now_ns();
        if result.is_ok() && port.is_none() {
            ports.insert(local_port(fd));
        }
        let closing = now_ns();
        close(fd);
        let closed = now_ns();
        call_ns.push(called - start);
        cycle_ns.push(called - start + closed - closing);
        if let Err(error) = result {
            failures += 1;
            if first_errno == 0 {
                first_errno = error.raw_os_error().unwrap_or(-1);
            }
        }
        if options.op == "tcp" {
            drain(listener);
        }
    }
    println!(
        "{}",
        json!({
            "op": options.op,
            "calls": options.calls,
            "failures": failures,
            "errno": first_errno,
            "call_ns": summary(&mut call_ns),
            "cycle_ns": summary(&mut cycle_ns),
            "fill_held": fill_held,
            "distinct_ports": ports.len(),
        })
    );
    for fd in fill.into_iter().chain(listeners) {
        close(fd);
    }
}

fn parse(args: Vec<String>) -> Options {
    let mut options = Options {
        cpu: None,
        outside: None,
        into: None,
        range: None,
        kernel_range: false,
        fill: "none".into(),
        dst_other: false,
        seed: 1,
        op: String::new(),
        port: 0,
        calls: 0,
    };
    let mut args = args.into_iter();
    let mut positional = vec![];
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| panic!("{arg}: missing value"))
        };
        match arg.as_str() {
            "--cpu" => options.cpu = Some(value().parse().expect("--cpu N")),
            "--outside" => options.outside = Some(value()),
            "--into" => options.into = Some(value()),
            "--range" => {
                let range = value();
                let (lo, hi) = range.split_once('-').expect("--range LO-HI");
                let (lo, hi) = (lo.parse().expect("lo"), hi.parse().expect("hi"));
                assert!(lo <= hi, "--range {range}: inverted");
                options.range = Some((lo, hi));
            }
            "--kernel-range" => options.kernel_range = true,
            "--fill" => options.fill = value(),
            "--dst" => options.dst_other = value() == "other",
            "--seed" => options.seed = value().parse().expect("--seed N"),
            _ => positional.push(arg),
        }
    }
    let mut positional = positional.into_iter();
    options.op = positional.next().expect("OP");
    if options.op == "bind-port" {
        options.port = positional.next().expect("PORT").parse().expect("port");
    }
    options.calls = positional.next().expect("CALLS").parse().expect("calls");
    options
}

/// The ports to hold with bound sockets, and the share of the range to fill with TIME_WAIT.
fn fill_plan(spec: &str, range: Option<(u16, u16)>, seed: u64) -> (Vec<u16>, Option<u32>) {
    if spec == "none" {
        return (vec![], None);
    }
    if let Some(permille) = spec.strip_prefix("tw:") {
        return (vec![], Some(permille.parse().expect("tw:PERMILLE")));
    }
    let (lo, hi) = range.expect("a fill needs --range");
    let ports = lo..=hi;
    match spec {
        "even" => (ports.filter(|port| port % 2 == 0).collect(), None),
        "odd" => (ports.filter(|port| port % 2 == 1).collect(), None),
        permille => {
            let permille: u32 = permille.parse().expect("--fill PERMILLE");
            let mut ports: Vec<u16> = ports.collect();
            let count = share(lo, hi, permille);
            // A partial Fisher-Yates shuffle: the first `count` ports are a random subset.
            let mut state = seed.max(1);
            for i in 0..count {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let j = i + (state % (ports.len() - i) as u64) as usize;
                ports.swap(i, j);
            }
            ports.truncate(count);
            (ports, None)
        }
    }
}

/// `permille`/1000 of the ports LO..=HI, rounded.
fn share(lo: u16, hi: u16, permille: u32) -> usize {
    let size = u32::from(hi - lo) + 1;
    ((size * permille + 500) / 1000) as usize
}

/// Median, 99th percentile and mean, in nanoseconds.
fn summary(values: &mut [u64]) -> serde_json::Value {
    if values.is_empty() {
        return json!(null);
    }
    values.sort_unstable();
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    let mean = values.iter().sum::<u64>() as f64 / values.len() as f64;
    json!({ "median": at(0.5), "p99": at(0.99), "mean": mean, "max": at(1.0) })
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC is served by the vDSO.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and the syscall get valid pointers.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        check(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            "sched_setaffinity",
        );
    }
}

fn enter_cgroup(dir: &str) {
    fs::write(
        format!("{dir}/cgroup.procs"),
        std::process::id().to_string(),
    )
    .unwrap_or_else(|error| panic!("cannot move into {dir}: {error}"));
}

/// A new network namespace has its loopback down.
fn loopback_up() {
    let fd = socket(libc::SOCK_DGRAM);
    // SAFETY: a zeroed ifreq is valid; the name fits with its NUL.
    unsafe {
        let mut request: libc::ifreq = std::mem::zeroed();
        for (dst, src) in request.ifr_name.iter_mut().zip(b"lo") {
            *dst = *src as libc::c_char;
        }
        check(
            libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut request),
            "SIOCGIFFLAGS lo",
        );
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        check(
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &request),
            "SIOCSIFFLAGS lo",
        );
    }
    close(fd);
}

/// A non-blocking TCP listener on 127.0.0.1:`port`.
fn listener(port: u16) -> RawFd {
    let fd = socket(libc::SOCK_STREAM);
    bind(fd, port).unwrap_or_else(|error| panic!("listener: bind {port}: {error}"));
    // SAFETY: plain syscalls on our own fd.
    unsafe {
        check(libc::listen(fd, 4096), "listen");
        check(
            libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK),
            "fcntl O_NONBLOCK",
        );
    }
    fd
}

/// Accepts and closes everything queued on `listener`.
fn drain(listener: RawFd) {
    loop {
        // SAFETY: plain syscall; the peer address is not wanted.
        let fd = unsafe { libc::accept(listener, std::ptr::null_mut(), std::ptr::null_mut()) };
        if fd < 0 {
            return;
        }
        close(fd);
    }
}

/// Binds to 127.0.0.1:`port`.
fn bind(fd: RawFd, port: u16) -> io::Result<()> {
    loopback::bind(fd, &loopback::loopback(port))
}

fn close(fd: RawFd) {
    // SAFETY: closing our own fd.
    unsafe { libc::close(fd) };
}

fn check(ret: i32, what: &str) {
    assert!(ret >= 0, "{what}: {}", io::Error::last_os_error());
}
