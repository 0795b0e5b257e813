//! `cargo xtask test`: everything CI checks.

use std::process::Command;

use crate::{cmd, setup};

pub fn run() -> anyhow::Result<()> {
    setup::run()?;
    setup::ensure_systemd_analyze()?;
    // rustfmt.toml uses options only nightly rustfmt has (as aya does).
    cmd::run(
        Command::new("rustup").args(["run", "nightly", "cargo", "fmt", "--all", "--", "--check"]),
    )?;
    cmd::cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        "portguard-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    clippy_ebpf()?;
    // The end-to-end tests run the daemon binary; build it first so they test this tree.
    cmd::cargo(&["build", "--package", "portguard", "--bins"])?;
    cmd::cargo(&["test", "--workspace", "--exclude", "portguard-ebpf"])?;
    crate::fuzz::run(crate::fuzz::TEST_SECONDS)?;
    crate::reliability::update_readme(&cmd::workspace_root())?;
    // Keeps the benchmark from rotting: a few seconds, results under target/.
    if std::env::var("PORTGUARD_SKIP_PRIVILEGED").as_deref() == Ok("1") {
        println!("SKIPPED cargo xtask bench --quick: needs root (PORTGUARD_SKIP_PRIVILEGED=1)");
    } else {
        crate::bench::run(true)?;
    }
    Ok(())
}

/// The eBPF crate only builds for the BPF target, with nightly.
fn clippy_ebpf() -> anyhow::Result<()> {
    cmd::run(
        Command::new("rustup")
            .args([
                "run",
                "nightly",
                "cargo",
                "clippy",
                "--package",
                "portguard-ebpf",
            ])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
            .args(["--target-dir", "target/ebpf-clippy", "--", "-D", "warnings"])
            // What aya-build passes: aya-ebpf's bindings are chosen by this cfg.
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
            ),
    )
}
