//! portguard's developer tasks. `cargo xtask run` and `cargo xtask test` are all a fresh
//! machine needs: both install what is missing first.

mod bench;
mod cmd;
mod fuzz;
mod reliability;
mod run;
mod setup;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "portguard's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what building and testing need: the nightly rust-src component, bpf-linker (built
    /// against the nightly toolchain's own LLVM) and cargo-fuzz. Quick and idempotent when
    /// everything is there.
    Setup,
    /// Set up, then build portguard (release) with its eBPF programs embedded.
    Build,
    /// Set up, then check formatting, run clippy with warnings denied, the unit tests, each fuzz
    /// target for 20 s and the privileged end-to-end tests (as root; PORTGUARD_SKIP_PRIVILEGED=1
    /// skips those, loudly).
    Test,
    /// As root: measure what portguard costs beside the kernel alone (per-program cost, connect
    /// rates, latency as a range fills, the event pipeline, start-up and memory); write
    /// bench/results.json, bench/results.md and the README's headline.
    Bench {
        /// One short repetition of every part, to check that the benchmark still works (CI runs
        /// this); results go to target/bench-quick.
        #[arg(long)]
        quick: bool,
    },
    /// Set up, then run each cargo-fuzz target (fuzz/) for a while on its committed seeds; new
    /// inputs go to target/fuzz-corpus/, crashes to target/fuzz-artifacts/.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = fuzz::TEST_SECONDS)]
        seconds: u32,
    },
    /// As root: set up, build and run the daemon in the foreground. Without arguments it uses the
    /// embedded observe-only policy; arguments after `--` go to `portguard daemon`.
    Run {
        /// Arguments for `portguard daemon`, e.g. `-- --policy my.toml`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        daemon_args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Build => setup::run()
            .and_then(|()| cmd::cargo(&["build", "--release", "--package", "portguard"])),
        Task::Test => test::run(),
        Task::Bench { quick } => bench::run(quick),
        Task::Fuzz { seconds } => setup::run().and_then(|()| fuzz::run(seconds)),
        Task::Run { daemon_args } => run::run(&daemon_args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}
