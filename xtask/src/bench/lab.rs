//! The set-up every socket measurement shares: one private cgroup tree holding each baseline
//! side by side, so that the variants can be interleaved without re-attaching anything.
//!
//! ```text
//! portguard-bench-PID-sockets/
//!   b0/              nothing attached: B0 and K run here, and every fill socket is made here
//!   b1/              an empty `r0 = 1; exit` program at each hook portguard attaches
//!     caller/        B1
//!   pg/              the release daemon attached
//!     caller/        P: under the attach point, in no scope
//!     scope/         S: in the scope `bench`, range SCOPE_RANGE, a port per connection
//!                    (`share = false`, as before destination sharing)
//!     shared/        S-share: the same with destination sharing (the default)
//!     other/         a second scope whose range a denied bind aims at
//! ```
//!
//! Each probe is a `pg-bench` process pinned to the last CPU, in a network namespace of its
//! own (portguard's programs apply in every namespace), so host traffic and other tests never
//! share its ports.

use std::{
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use portguard_common::names::ALL_PROGRAMS;

use super::{
    bpf::{self, Attached},
    daemon::{BenchCgroup, Daemon},
};

/// The scope's range, and in K the namespace's ip_local_port_range: 1,000 ports.
pub const SCOPE_RANGE: (u16, u16) = (20000, 20999);
/// The sharing scope's range, as large as the other.
pub const SHARED_RANGE: (u16, u16) = (18000, 18999);
/// The second scope's range; a bind from `bench` to one of its ports is refused.
pub const OTHER_RANGE: (u16, u16) = (19000, 19099);
/// pg-bench's operation for that refused bind: a port of OTHER_RANGE.
pub const DENIED_BIND: &str = "bind-port 19050";
/// The scope option that turns on destination sharing. The S-share variant runs only when
/// `portguard check` accepts a policy with it.
pub const SHARE_OPTION: &str = "share = true";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    B0,
    B1,
    P,
    S,
    Shared,
    K,
}

impl Variant {
    pub fn label(self) -> &'static str {
        match self {
            Self::B0 => "B0",
            Self::B1 => "B1",
            Self::P => "P",
            Self::S => "S",
            Self::Shared => "S-share",
            Self::K => "K",
        }
    }

    /// The range a fill is taken from, and K's ip_local_port_range.
    pub fn range(self) -> (u16, u16) {
        if self == Self::Shared {
            SHARED_RANGE
        } else {
            SCOPE_RANGE
        }
    }
}

/// Fields drop in order: the daemon and the empty programs go before their cgroups do.
pub struct Lab {
    bins: PathBuf,
    cpu: usize,
    daemon: Daemon,
    /// Keeps B1's empty programs attached.
    _empty_links: Vec<OwnedFd>,
    /// What the daemon attached at `pg/`, found by asking the kernel.
    pub portguard: Vec<Attached>,
    /// The empty programs at `b1/`.
    pub empty: Vec<Attached>,
    /// Whether this build knows SHARE_OPTION; if not, why.
    pub share: Result<(), String>,
    /// Programs in force at `b0/` all the same (attached above it, by someone else).
    pub b0_effective: usize,
    cgroup: BenchCgroup,
}

impl Lab {
    pub fn new(bins: &Path) -> anyhow::Result<Self> {
        let cgroup = BenchCgroup::new("sockets")?;
        for child in [
            "b0",
            "b1/caller",
            "pg/caller",
            "pg/scope",
            "pg/shared",
            "pg/other",
        ] {
            cgroup.child(child)?;
        }
        let share = share_supported(bins, &cgroup.relative)?;
        let policy = policy(&cgroup.relative, share.is_ok());
        let (daemon, _log) =
            Daemon::start(bins, &cgroup.path.join("pg"), &cgroup.relative, &policy)?;
        let portguard = bpf::attached(&cgroup.path.join("pg"), false)?;
        let names: Vec<String> = portguard
            .iter()
            .map(|program| bpf::program_stats(program.id).map(|stats| stats.name))
            .collect::<anyhow::Result<_>>()?;
        for expected in ALL_PROGRAMS {
            if !names.iter().any(|name| name == expected) {
                bail!("the daemon did not attach {expected} at pg/ (found {names:?})");
            }
        }
        let mut empty_links = vec![];
        for program in &portguard {
            let prog_type = bpf::program_stats(program.id)?.prog_type;
            empty_links.push(bpf::attach_empty(
                &cgroup.path.join("b1"),
                prog_type,
                program.attach_type,
            )?);
        }
        let empty = bpf::attached(&cgroup.path.join("b1"), false)?;
        if empty.len() != portguard.len() {
            bail!(
                "{} empty programs attached for portguard's {}",
                empty.len(),
                portguard.len()
            );
        }
        let b0_effective = bpf::attached(&cgroup.path.join("b0"), true)?.len();
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        Ok(Self {
            cgroup,
            bins: bins.to_owned(),
            cpu: cpus - 1,
            daemon,
            _empty_links: empty_links,
            portguard,
            empty,
            share,
            b0_effective,
        })
    }

    /// The CPU every probe is pinned to.
    pub fn cpu(&self) -> usize {
        self.cpu
    }

    /// The variants to interleave, among `wanted`: S-share only where this build has it.
    pub fn variants(&self, wanted: &[Variant]) -> Vec<Variant> {
        wanted
            .iter()
            .copied()
            .filter(|&variant| variant != Variant::Shared || self.share.is_ok())
            .collect()
    }

    /// The programs attached for `variant`.
    pub fn programs(&self, variant: Variant) -> &[Attached] {
        match variant {
            Variant::B1 => &self.empty,
            Variant::P | Variant::S | Variant::Shared => &self.portguard,
            Variant::B0 | Variant::K => &[],
        }
    }

    fn caller(&self, variant: Variant) -> PathBuf {
        self.cgroup.path.join(match variant {
            Variant::B0 | Variant::K => "b0",
            Variant::B1 => "b1/caller",
            Variant::P => "pg/caller",
            Variant::S => "pg/scope",
            Variant::Shared => "pg/shared",
        })
    }

    /// Runs one `pg-bench` probe: `op` (with its arguments) `calls` times as `variant`.
    pub fn probe(&self, variant: Variant, probe: &Probe) -> anyhow::Result<ProbeRun> {
        let (lo, hi) = variant.range();
        let mut command = Command::new(self.bins.join("pg-bench"));
        command
            .arg("--cpu")
            .arg(self.cpu.to_string())
            .arg("--outside")
            .arg(self.cgroup.path.join("b0"))
            .arg("--into")
            .arg(self.caller(variant))
            .arg("--range")
            .arg(format!("{lo}-{hi}"))
            .args(["--fill", probe.fill])
            .args(["--dst", if probe.other_dst { "other" } else { "same" }])
            .args(["--seed", &probe.seed.to_string()]);
        if variant == Variant::K {
            command.arg("--kernel-range");
        }
        command
            .args(probe.op.split_whitespace())
            .arg(probe.calls.to_string());
        let output = command.output().context("running pg-bench")?;
        if !output.status.success() {
            bail!(
                "pg-bench {} ({}) failed: {}",
                probe.op,
                variant.label(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let run: serde_json::Value =
            serde_json::from_slice(&output.stdout).context("reading pg-bench's result")?;
        ProbeRun::from_json(run, probe.calls)
            .with_context(|| format!("pg-bench {} ({})", probe.op, variant.label()))
    }

    /// Stops the daemon, detaches the empty programs, removes the cgroups.
    pub fn stop(self) -> anyhow::Result<()> {
        self.daemon.stop()
    }
}

/// What one probe does.
pub struct Probe {
    /// `udp`, `tcp`, `bind-range` or `bind-port PORT`.
    pub op: &'static str,
    pub calls: usize,
    /// See pg-bench's `--fill`.
    pub fill: &'static str,
    pub other_dst: bool,
    pub seed: u64,
}

/// One probe's result, checked: nothing in it is a zero standing for "not measured".
#[derive(Clone, Debug)]
pub struct ProbeRun {
    pub calls: usize,
    pub failures: usize,
    pub errno: i64,
    pub call_median_ns: f64,
    pub call_p99_ns: f64,
    pub call_mean_ns: f64,
    pub cycle_median_ns: f64,
    pub cycle_mean_ns: f64,
    pub fill_held: usize,
}

impl ProbeRun {
    fn from_json(run: serde_json::Value, calls: usize) -> anyhow::Result<Self> {
        let number = |path: &[&str]| -> anyhow::Result<f64> {
            let mut value = &run;
            for key in path {
                value = &value[key];
            }
            let number = value
                .as_f64()
                .with_context(|| format!("no {} in {run}", path.join(".")))?;
            if !number.is_finite() || number < 0.0 {
                bail!("{} is {number}", path.join("."));
            }
            Ok(number)
        };
        let run = Self {
            calls: number(&["calls"])? as usize,
            failures: number(&["failures"])? as usize,
            errno: run["errno"].as_i64().unwrap_or(0),
            call_median_ns: number(&["call_ns", "median"])?,
            call_p99_ns: number(&["call_ns", "p99"])?,
            call_mean_ns: number(&["call_ns", "mean"])?,
            cycle_median_ns: number(&["cycle_ns", "median"])?,
            cycle_mean_ns: number(&["cycle_ns", "mean"])?,
            fill_held: number(&["fill_held"])? as usize,
        };
        if run.calls != calls {
            bail!("{} calls made, {calls} asked for", run.calls);
        }
        if run.call_median_ns <= 0.0 || run.call_mean_ns <= 0.0 {
            bail!("the clock measured nothing: {run:?}");
        }
        Ok(run)
    }
}

fn policy(relative: &str, share: bool) -> String {
    let scope = |name: &str, cgroup: &str, (lo, hi): (u16, u16), extra: &str| {
        format!(
            "[[scope]]\nname = \"{name}\"\ncgroup = \"{relative}/pg/{cgroup}\"\nephemeral = \"{lo}-{hi}\"\n{extra}"
        )
    };
    // The host's ip_local_reserved_ports is left alone: the probes run in namespaces of their own.
    let mut policy = "mode = \"enforce\"\nreserve = false\n".to_owned();
    policy += &scope("bench", "scope", SCOPE_RANGE, "share = false\n");
    policy += &scope("other", "other", OTHER_RANGE, "");
    if share {
        policy += &scope(
            "shared",
            "shared",
            SHARED_RANGE,
            &format!("{SHARE_OPTION}\n"),
        );
    }
    policy
}

/// Whether `portguard check` accepts SHARE_OPTION; if not, its answer.
fn share_supported(bins: &Path, relative: &str) -> anyhow::Result<Result<(), String>> {
    let check = |policy: String| -> anyhow::Result<(bool, String)> {
        let file = std::env::temp_dir().join(format!("{relative}-check.toml"));
        std::fs::write(&file, policy)?;
        let output = Command::new(bins.join("portguard"))
            .arg("check")
            .arg(&file)
            .output()
            .context("running portguard check")?;
        let _ = std::fs::remove_file(&file);
        Ok((
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        ))
    };
    let (with_share, answer) = check(policy(relative, true))?;
    if with_share {
        return Ok(Ok(()));
    }
    let (without, plain_answer) = check(policy(relative, false))?;
    if !without {
        bail!("portguard check refuses the benchmark's policy: {plain_answer}");
    }
    Ok(Err(answer.trim().to_owned()))
}
