//! `cargo xtask run`: the daemon in the foreground, as an operator would start it.

use std::{os::unix::process::CommandExt as _, process::Command};

use anyhow::bail;

use crate::{cmd, setup};

pub fn run(daemon_args: &[String]) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "`cargo xtask run` must run as root: the daemon loads eBPF programs and attaches them \
             to cgroups (try `sudo -E cargo xtask run`)"
        );
    }
    setup::run()?;
    cmd::cargo(&["build", "--release", "--package", "portguard"])?;
    let binary = cmd::workspace_root().join("target/release/portguard");
    eprintln!(
        "xtask: starting {} daemon {}",
        binary.display(),
        daemon_args.join(" ")
    );
    // exec, so that Ctrl-C and SIGTERM reach the daemon itself.
    let error = Command::new(&binary).arg("daemon").args(daemon_args).exec();
    bail!("cannot start {}: {error}", binary.display())
}
