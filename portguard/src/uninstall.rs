//! `portguard uninstall`: remove every pin, which detaches the programs.

use std::{path::Path, process::ExitCode};

use anyhow::{Context as _, bail};
use portguard_common::PortBitmap;

use crate::{cgroup::PinLock, pins, reserved_ports};

pub fn run(pins: &Path, cgroup: Option<&Path>) -> anyhow::Result<ExitCode> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("portguard uninstall must run as root: it removes BPF pins");
    }
    if !pins.exists() {
        println!("nothing to remove: {} does not exist", pins.display());
        return Ok(ExitCode::SUCCESS);
    }
    let lock = PinLock::take(pins).context("stop the daemon first")?;
    // Give the reserved ports back first: the record of which ones are ours is a pinned map.
    if let Some(mut ours) = pins::pinned_reservation(pins)? {
        // Only giving back: the record (about to be removed) never lacks a port.
        let (_, removed) = reserved_ports::apply(&PortBitmap::EMPTY, &mut ours, |_| Ok(()))
            .context("restoring net.ipv4.ip_local_reserved_ports")?;
        println!("returned {removed} reserved port(s) to net.ipv4.ip_local_reserved_ports");
    }
    let (links, maps) = pins::uninstall(pins)
        .with_context(|| format!("removing portguard's pins in {}", pins.display()))?;
    drop(lock);
    println!(
        "removed {links} link(s) and {maps} map(s) from {}",
        pins.display()
    );
    if let Some(cgroup) = cgroup {
        let left = pins::attached_portguard_programs(cgroup)
            .with_context(|| format!("checking {}", cgroup.display()))?;
        if left > 0 {
            bail!(
                "{left} portguard program(s) are still attached at {}: another pin path, or a running daemon?",
                cgroup.display()
            );
        }
        println!("no portguard program is attached at {}", cgroup.display());
    }
    Ok(ExitCode::SUCCESS)
}
