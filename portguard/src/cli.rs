//! Command-line interface.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::protocol::DEFAULT_SOCKET;

/// Per-cgroup ephemeral port ranges and bind/connect rules, enforced in the kernel by eBPF.
///
/// portguard gives each cgroup (a container, a systemd service, a slice) its own range of
/// ephemeral ports, so services that share a network namespace stop exhausting one host-wide
/// range together, and keeps other processes off ports a scope owns.
#[derive(Debug, Parser)]
#[command(name = "portguard", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the eBPF programs, apply a policy and enforce it until SIGINT or SIGTERM.
    ///
    /// Needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN). Logs one line per scope and `ready`
    /// once enforcement is live; on exit the programs are detached. The log level follows
    /// RUST_LOG (default `info`; `debug` also logs every allowed and steered call).
    Daemon(DaemonArgs),
    /// Validate a policy file: print a summary and exit 0, or print every error with its line and
    /// column and exit 1. Warnings about the host's port settings never fail the check.
    Check {
        /// Policy file (TOML).
        file: PathBuf,
    },
    /// Show each scope of the running daemon: range, ports in use with peak, steered, denied and
    /// exhausted calls, last event; and lost events and uptime.
    Status {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// The daemon's control socket.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Report what to fix on this host: the ephemeral range's size, parity and place against the
    /// IANA range (RFC 6335), reserved ports, ip_unprivileged_port_start, listeners inside the
    /// ephemeral range (with their processes), and the policy's scopes against all of that.
    /// Reads live kernel state; run as root to name every socket's process.
    Doctor {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Policy to check (default: /etc/portguard/policy.toml if it exists).
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        /// The Kubernetes NodePort range to check, e.g. 30000-32767.
        #[arg(long, value_name = "LO-HI")]
        nodeport_range: Option<String>,
    },
    /// Remove everything portguard placed: detach its programs (unpinning their links) and
    /// remove its pinned maps. Stop the daemon first, or it is left without enforcement.
    Uninstall {
        /// The daemon's bpffs directory.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
        /// The cgroup the daemon attached at; checked to have none of portguard's programs left.
        #[arg(long, value_name = "PATH")]
        cgroup: Option<PathBuf>,
    },
    /// Make the running daemon re-read its policy (as SIGHUP does). A policy with errors is
    /// refused with every error, and the running policy stays in force.
    Reload {
        /// The daemon's control socket.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Show the daemon's recent events (binds, connects, releases, refusals), then with --follow
    /// the live stream.
    Events {
        /// Keep printing events as they happen.
        #[arg(long)]
        follow: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Only this scope's events.
        #[arg(long, value_name = "NAME")]
        scope: Option<String>,
        /// The daemon's control socket.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Policy file (TOML). Default: /etc/portguard/policy.toml if it exists, else the embedded
    /// observe-only policy.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// cgroup v2 directory to attach the programs at; they then see every socket created in it or
    /// below. Default: the cgroup2 root found in /proc/self/mountinfo.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Size of the kernel-to-daemon event ring buffer in bytes: a power of two and a multiple of
    /// the page size.
    #[arg(long, value_name = "BYTES", default_value_t = 1024 * 1024, value_parser = parse_ring_size)]
    pub events_buffer: u32,
    /// How often to walk the whole cgroup tree as a safety net, in seconds. Cgroups that appear
    /// or go away are followed at once through inotify; the walk only repairs what a lost
    /// notification could have missed.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub resync_s: u64,
    /// Control socket for `status` and `events`: created mode 0600 (0660 with --socket-group),
    /// owned by root.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// A group whose members may also use the control socket (as their primary group).
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// bpffs directory for the pinned maps and links. They outlive the daemon, so enforcement
    /// continues through restarts and upgrades; a new daemon adopts them. bpffs is mounted at
    /// /sys/fs/bpf if needed.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
}

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/portguard";

fn parse_ring_size(text: &str) -> Result<u32, String> {
    let bytes: u32 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a byte count"))?;
    let page = 4096;
    if !bytes.is_power_of_two() || bytes < page {
        return Err(format!(
            "{bytes} must be a power of two of at least {page} (the page size)"
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn ring_size_must_be_a_power_of_two_page_multiple() {
        assert_eq!(parse_ring_size("8192"), Ok(8192));
        assert!(parse_ring_size("1000").is_err());
        assert!(parse_ring_size("2048").is_err());
        assert!(parse_ring_size("big").is_err());
    }
}
