//! Keeping scope ranges in net.ipv4.ip_local_reserved_ports, so the kernel's own allocator never
//! hands them to processes outside their scope. Only ports portguard added are ever removed:
//! whatever was reserved before stays, and comes back exactly on uninstall.

use std::{fs, io, os::fd::AsRawFd as _};

use portguard_common::PortBitmap;

use crate::policy::{PortRange, read_sysctl};

const SYSCTL: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
/// Daemons sharing a network namespace each edit the one sysctl: read-modify-write under a lock.
/// Under the runtime directory, which the systemd unit keeps writable and the DaemonSet shares
/// with the host.
const LOCK_DIR: &str = "/run/portguard";
const LOCK: &str = "/run/portguard/reserved-ports.lock";

/// Makes the ports portguard reserves equal `wanted`. `ours` holds the ports portguard added
/// earlier (and is updated): a wanted port that someone else had already reserved is not ours,
/// and is left alone when no longer wanted. `record` persists the record of our ports; it is
/// called before the sysctl is written, with the ports about to be added already claimed, and
/// after. Returns the ports added and removed.
pub fn apply(
    wanted: &PortBitmap,
    ours: &mut PortBitmap,
    mut record: impl FnMut(&PortBitmap) -> io::Result<()>,
) -> io::Result<(u32, u32)> {
    let _lock = Lock::take()?;
    let current = read_sysctl(SYSCTL)?;
    let reserved = parse(&current)?;
    // Plan on a copy: the record of our ports changes only once the sysctl did.
    let mut next_ours = *ours;
    let (next, added, removed) = plan(&reserved, wanted, &mut next_ours);
    let text = format(&next);
    if text != current.trim() {
        // A daemon killed between the write and the record would leave reserved ports nobody
        // remembers adding, never to be given back. Claimed first, a port the write then did not
        // reach is merely claimed, and the next plan drops it: nobody reserves it.
        record(&claimed_while_writing(ours, &next_ours))?;
        let text = if text.is_empty() {
            "\n".to_owned()
        } else {
            text
        };
        fs::write(SYSCTL, text)?;
    }
    *ours = next_ours;
    record(ours)?;
    Ok((added, removed))
}

/// The ports to hold as ours while the sysctl changes from `ours` to `next`: both.
fn claimed_while_writing(ours: &PortBitmap, next: &PortBitmap) -> PortBitmap {
    let mut claimed = *ours;
    for port in (1..=u16::MAX).filter(|&port| next.contains(port)) {
        claimed.insert(port);
    }
    claimed
}

/// The reservation after applying `wanted`, and how many ports were added and removed.
fn plan(
    reserved: &PortBitmap,
    wanted: &PortBitmap,
    ours: &mut PortBitmap,
) -> (PortBitmap, u32, u32) {
    let mut next = *reserved;
    let (mut added, mut removed) = (0, 0);
    for port in 1..=u16::MAX {
        let is_ours = ours.contains(port);
        match (wanted.contains(port), reserved.contains(port), is_ours) {
            (true, false, _) => {
                next.insert(port);
                ours.insert(port);
                added += 1;
            }
            (false, true, true) => {
                next.remove(port);
                ours.remove(port);
                removed += 1;
            }
            // No longer reserved by anyone (an operator cleared it): not ours any more.
            (_, false, true) => ours.remove(port),
            _ => {}
        }
    }
    (next, added, removed)
}

pub fn bitmap_of(ranges: impl IntoIterator<Item = PortRange>) -> PortBitmap {
    let mut bitmap = PortBitmap::EMPTY;
    for range in ranges {
        bitmap.insert_range(range.lo, range.hi);
    }
    bitmap
}

fn parse(text: &str) -> io::Result<PortBitmap> {
    let ranges = text
        .trim()
        .split(',')
        .filter(|part| !part.is_empty())
        .map(PortRange::parse)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{SYSCTL}: {error}"))
        })?;
    Ok(bitmap_of(ranges))
}

fn format(bitmap: &PortBitmap) -> String {
    ranges_of(bitmap)
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The ports of `bitmap` as maximal ranges.
pub fn ranges_of(bitmap: &PortBitmap) -> Vec<PortRange> {
    let mut ranges: Vec<PortRange> = vec![];
    for port in (1..=u16::MAX).filter(|&port| bitmap.contains(port)) {
        match ranges.last_mut() {
            Some(range) if range.hi + 1 == port => range.hi = port,
            _ => ranges.push(PortRange::new(port, port)),
        }
    }
    ranges
}

struct Lock {
    _file: fs::File,
}

impl Lock {
    fn take() -> io::Result<Self> {
        fs::create_dir_all(LOCK_DIR)?;
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK)?;
        // SAFETY: flock on an fd we own; released when the file closes.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_and_removes_only_its_own_ports() {
        let before = parse("8080,40000-40010").expect("parse");
        let mut ours = PortBitmap::EMPTY;
        // Wanted overlaps someone else's 40000-40010: only 40011-40020 become ours.
        let wanted = bitmap_of([PortRange::new(40005, 40020)]);
        let (after, added, removed) = plan(&before, &wanted, &mut ours);
        assert_eq!(format(&after), "8080,40000-40020");
        assert_eq!((added, removed), (10, 0));
        // Nothing wanted any more: ours go, theirs stay exactly as they were.
        let (restored, added, removed) = plan(&after, &PortBitmap::EMPTY, &mut ours);
        assert_eq!(format(&restored), "8080,40000-40010");
        assert_eq!((added, removed), (0, 10));
        assert_eq!(ours, PortBitmap::EMPTY);
    }

    #[test]
    fn ports_being_added_or_removed_stay_claimed_while_the_sysctl_is_written() {
        let reserved = parse("8080").expect("parse");
        let ours = bitmap_of([PortRange::new(40000, 40009)]);
        let mut next = ours;
        // The scope moves: 40000-40009 go back, 41000-41009 are added.
        let wanted = bitmap_of([PortRange::new(41000, 41009)]);
        plan(&reserved, &wanted, &mut next);
        assert_eq!(format(&next), "41000-41009");
        let claimed = claimed_while_writing(&ours, &next);
        assert_eq!(format(&claimed), "40000-40009,41000-41009");
        // Had the daemon died before the write, the next plan gives up the claim on what is not
        // reserved, and leaves the rest as it was.
        let mut claim = claimed;
        let (after, added, removed) = plan(&reserved, &PortBitmap::EMPTY, &mut claim);
        assert_eq!(format(&after), "8080", "someone else's reservation stays");
        assert_eq!((added, removed), (0, 0));
        assert_eq!(claim, PortBitmap::EMPTY, "the claim is dropped");
    }

    #[test]
    fn parses_and_formats_the_sysctl() {
        assert_eq!(format(&parse(" 1,3-5,6\n").expect("parse")), "1,3-6");
        assert_eq!(format(&parse("\n").expect("parse")), "");
        assert!(parse("x").is_err());
    }
}
