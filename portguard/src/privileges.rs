//! Giving up privileges once enforcement is live.
//!
//! Loading programs (CAP_BPF), attaching them to a cgroup (CAP_NET_ADMIN) and creating pins and
//! the control socket are done by then. What the running daemon still does needs no capability:
//! map reads and writes go through the map file descriptors it holds, pins are opened and
//! created in its own root-owned bpffs directory, cgroups are watched and stat'ed through
//! world-readable cgroupfs, and `net.ipv4.ip_local_reserved_ports` is writable by uid 0 through
//! its file mode. So it drops every capability from every set, and sets no_new_privs so that no
//! exec could regain any.

use anyhow::{Context as _, bail};
use caps::{CapSet, Capability};

/// What the daemon kept, for its log line.
pub struct Dropped {
    /// The bounding set had to stay as it was: without CAP_SETPCAP (a service manager's
    /// bounding set, as in the systemd unit) it cannot be narrowed.
    pub bounding_kept: Vec<Capability>,
}

/// Sets no_new_privs and empties the effective, permitted, inheritable and ambient sets, and
/// the bounding set where CAP_SETPCAP allows. Must run on the daemon's only thread: the sets
/// belong to each thread.
pub fn drop_all() -> anyhow::Result<Dropped> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes these constant arguments and touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setting no_new_privs");
    }
    caps::clear(None, CapSet::Ambient).context("clearing the ambient capabilities")?;
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)
        .context("reading the effective capabilities")?
    {
        caps::clear(None, CapSet::Bounding).context("clearing the capability bounding set")?;
    }
    for set in [CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
        caps::clear(None, set).with_context(|| format!("clearing the {set:?} capabilities"))?;
    }
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        let left = caps::read(None, set).with_context(|| format!("reading {set:?}"))?;
        if !left.is_empty() {
            bail!("the {set:?} capabilities are still {left:?} after dropping them");
        }
    }
    let mut bounding_kept: Vec<Capability> = caps::read(None, CapSet::Bounding)
        .context("reading the capability bounding set")?
        .into_iter()
        .collect();
    bounding_kept.sort_by_key(|cap| cap.index());
    Ok(Dropped { bounding_kept })
}
