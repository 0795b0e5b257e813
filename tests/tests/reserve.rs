//! End-to-end: scope ranges kept in net.ipv4.ip_local_reserved_ports, and exactly the earlier
//! reservation restored on uninstall. The sysctl is shared by the tests running in parallel, so
//! this test edits it under the daemons' lock and only looks at its own ports.

use std::{
    collections::BTreeSet,
    fs,
    os::fd::AsRawFd as _,
    process::Command,
    time::{Duration, Instant},
};

use portguard_tests::{Daemon, TestCgroup, portguard_bin, privileged};

const SYSCTL: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
const LOCK: &str = "/run/portguard/reserved-ports.lock";

fn reserved() -> BTreeSet<u16> {
    // One large read: this sysctl only answers a read at offset 0.
    use std::io::Read as _;
    let mut buffer = vec![0u8; 512 * 1024];
    let read = fs::File::open(SYSCTL)
        .and_then(|mut f| f.read(&mut buffer))
        .expect("read sysctl");
    let text = String::from_utf8_lossy(&buffer[..read]).into_owned();
    let mut ports = BTreeSet::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        ports.extend(lo.parse::<u16>().expect("port")..=hi.parse::<u16>().expect("port"));
    }
    ports
}

/// Adds or removes `port` from the sysctl the way another administrator would, under the lock.
fn edit(port: u16, add: bool) {
    fs::create_dir_all("/run/portguard").expect("runtime directory");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK)
        .expect("lock file");
    // SAFETY: flock on our own fd.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let mut ports = reserved();
    if add {
        ports.insert(port);
    } else {
        ports.remove(&port);
    }
    let text: Vec<String> = ports.iter().map(u16::to_string).collect();
    fs::write(SYSCTL, format!("{}\n", text.join(","))).expect("write sysctl");
}

fn ours(ports: &BTreeSet<u16>) -> Vec<u16> {
    (26000..=26009).filter(|p| ports.contains(p)).collect()
}

#[test]
fn scope_ranges_are_reserved_and_the_earlier_reservation_is_restored() {
    if !privileged("scope_ranges_are_reserved_and_the_earlier_reservation_is_restored") {
        return;
    }
    edit(26005, true); // someone else's reservation, inside the scope's range
    let cgroup = TestCgroup::new("reserve");
    let scope = format!(
        "[[scope]]\nname = \"web\"\ncgroup = \"{}\"\nephemeral = \"26000-26009\"\n",
        cgroup.rel("web")
    );
    let daemon = Daemon::start(&cgroup, &scope);
    assert_eq!(
        ours(&reserved()),
        (26000..=26009).collect::<Vec<_>>(),
        "whole range reserved"
    );

    daemon.write_policy(&format!("reserve = false\n{scope}"));
    assert_eq!(daemon.cli(&["reload"]).status.code(), Some(0));
    assert_eq!(
        ours(&reserved()),
        [26005],
        "only portguard's ports given back"
    );

    daemon.write_policy(&scope);
    assert_eq!(daemon.cli(&["reload"]).status.code(), Some(0));
    assert_eq!(ours(&reserved()).len(), 10);

    // A killed daemon leaves the reservation with the rest of its enforcement...
    daemon.signal(libc::SIGKILL);
    let _ = daemon.wait_exit(Duration::from_secs(5));
    assert_eq!(ours(&reserved()).len(), 10);
    // ...and uninstall gives back exactly what portguard added.
    let out = Command::new(portguard_bin())
        .arg("uninstall")
        .arg("--pin-path")
        .arg(cgroup.pin_path())
        .output()
        .expect("uninstall");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("returned 9 reserved port(s)"));
    let start = Instant::now();
    while ours(&reserved()) != [26005] {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "not restored: {:?}",
            ours(&reserved())
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    edit(26005, false);
}
