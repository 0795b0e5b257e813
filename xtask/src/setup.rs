//! Installing what the eBPF build needs, idempotently.
//!
//! bpf-linker has no prebuilt binary we can download here and the distribution has no LLVM as
//! new as the nightly toolchain's, so it is built from crates.io against the nightly
//! toolchain's own libLLVM. It then only runs under `rustup run nightly` (which puts that
//! library on the loader path), which is how aya-build invokes it.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::cmd;

const TOOLCHAIN: &str = "nightly";

pub fn run() -> anyhow::Result<()> {
    ensure_nightly()?;
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    crate::fuzz::ensure_cargo_fuzz()?;
    Ok(())
}

/// The deploy tests check the systemd unit with `systemd-analyze verify`.
pub fn ensure_systemd_analyze() -> anyhow::Result<()> {
    if cmd::output(Command::new("systemd-analyze").arg("--version")).is_some() {
        return Ok(());
    }
    cmd::run(Command::new("apt-get").args(["update", "-q"]))?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends", "systemd"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("installing systemd-analyze (Debian package systemd)")
}

fn ensure_nightly() -> anyhow::Result<()> {
    let installed = cmd::output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the eBPF programs; install it from rustup.rs")?;
    if installed.lines().any(|line| line.starts_with(TOOLCHAIN)) {
        return Ok(());
    }
    cmd::run(Command::new("rustup").args([
        "toolchain",
        "install",
        TOOLCHAIN,
        "--profile",
        "minimal",
    ]))
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let installed = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        TOOLCHAIN,
    ]))
    .unwrap_or_default();
    if installed.lines().any(|line| line.starts_with("rust-src")) {
        return Ok(());
    }
    cmd::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        TOOLCHAIN,
    ]))
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    // A bpf-linker built against an older nightly's libLLVM no longer starts: rebuild then.
    if let Some(version) =
        cmd::output(Command::new("rustup").args(["run", TOOLCHAIN, "bpf-linker", "--version"]))
    {
        eprintln!("xtask: {} is installed", version.trim());
        return Ok(());
    }
    let sysroot =
        cmd::output(Command::new("rustc").args([&format!("+{TOOLCHAIN}"), "--print", "sysroot"]))
            .context("cannot ask the nightly rustc for its sysroot")?;
    let lib_dir = PathBuf::from(sysroot.trim()).join("lib");
    let libllvm = fs::read_dir(&lib_dir)
        .with_context(|| format!("cannot list {}", lib_dir.display()))?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("libLLVM.so.") || name.starts_with("libLLVM-"))
        })
        .with_context(|| {
            format!(
                "the nightly toolchain has no libLLVM in {}",
                lib_dir.display()
            )
        })?;
    let verbose = cmd::output(Command::new("rustc").args([&format!("+{TOOLCHAIN}"), "-vV"]))
        .context("cannot ask the nightly rustc for its LLVM version")?;
    let major = llvm_major(&verbose).context("the nightly rustc does not name its LLVM version")?;

    // LLVM_PREFIX must look like an LLVM install: PREFIX/lib/libLLVM.so.
    let prefix = cache_dir().join(format!("llvm-{major}-prefix"));
    let link = prefix.join("lib").join("libLLVM.so");
    fs::create_dir_all(prefix.join("lib"))
        .with_context(|| format!("cannot create {}", prefix.display()))?;
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("cannot link {} to {}", link.display(), libllvm.display()))?;
    eprintln!(
        "xtask: building bpf-linker against {} (about a minute, once)",
        libllvm.display()
    );
    cmd::run(
        Command::new(cmd::cargo_bin())
            .args([
                "install",
                "--force",
                "bpf-linker",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix),
    )?;
    if cmd::output(Command::new("rustup").args(["run", TOOLCHAIN, "bpf-linker", "--version"]))
        .is_none()
    {
        bail!("bpf-linker was installed but does not start under `rustup run {TOOLCHAIN}`");
    }
    Ok(())
}

/// "LLVM version: 22.1.4" -> 22
fn llvm_major(rustc_verbose: &str) -> Option<u32> {
    rustc_verbose
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))?
        .split('.')
        .next()?
        .trim()
        .parse()
        .ok()
}

fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("portguard")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_llvm_major_version() {
        assert_eq!(
            llvm_major("rustc 1.97.0-nightly\nLLVM version: 22.1.4\n"),
            Some(22)
        );
        assert_eq!(llvm_major("rustc 1.97.0-nightly\n"), None);
    }
}
