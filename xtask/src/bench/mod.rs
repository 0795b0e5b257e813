//! `cargo xtask bench`: what portguard costs, measured side by side with the kernel alone, on
//! this machine. Root only.
//!
//! 1. each program's cost per run, from the kernel's accounting (`costs`);
//! 2. UDP connect() and TCP connect()+close() rates for B0, B1, P, S and K (`rates`);
//! 3. TCP connect() latency and failures as the range fills, S against K (`fill`);
//! 4. and 5. the event pipeline, daemon start-up and memory (`events`).
//!
//! The socket measurements run in `pg-bench`, a compiled probe pinned to one CPU in a network
//! namespace of its own (`lab`). `--quick` runs every part once and briefly, so that the
//! benchmark never rots, and writes under target/ rather than over bench/.

mod bpf;
mod costs;
mod daemon;
mod events;
mod fill;
mod lab;
mod rates;
mod report;
mod stats;

use anyhow::{Context as _, bail};

use crate::{cmd, setup};

const REPETITIONS: usize = 5;

pub fn run(quick: bool) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("`cargo xtask bench` must run as root: it loads eBPF programs into the kernel");
    }
    setup::run()?;
    cmd::cargo(&[
        "build",
        "--release",
        "--package",
        "portguard",
        "--package",
        "portguard-tests",
        "--bins",
    ])?;
    let root = cmd::workspace_root();
    let bins = root.join("target/release");
    let repetitions = if quick { 1 } else { REPETITIONS };
    let machine = stats::machine()?;

    let lab = lab::Lab::new(&bins).context("setting up the socket benchmarks")?;
    let costs = costs::measure(&lab, repetitions, quick).context("program costs")?;
    let rates = rates::measure(&lab, repetitions, quick).context("connect rates")?;
    let fills = fill::measure(&lab, repetitions, quick).context("connect under fill")?;
    let (share, b0_effective, cpu) = (lab.share.clone(), lab.b0_effective, lab.cpu());
    lab.stop()?;
    let events = events::measure(&bins, quick, repetitions)?;

    let results = report::Results {
        quick,
        machine,
        repetitions,
        cpu,
        share,
        b0_effective,
        costs: &costs,
        rates: &rates,
        fills: &fills,
        events: &events,
    };
    // A smoke run must not overwrite the measured results that the README quotes.
    let dir = if quick {
        root.join("target/bench-quick")
    } else {
        root.join("bench")
    };
    results.write(&root, &dir)?;
    eprintln!("xtask: results in {}", dir.display());
    Ok(())
}
