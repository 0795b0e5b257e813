//! Issue items 4 and 5: the event pipeline, daemon start-up and memory, and how soon a new
//! scope cgroup is enforced.
//!
//! The release daemon runs attached at a private cgroup with one scope; a probe in that scope
//! calls bind() on an already bound socket as fast as it can: each call runs the bind hook (one
//! event) and then fails EINVAL in the kernel, so the probe spends its time on events rather than
//! on socket set-up. Each repetition records the event rate the probe produced, the events the
//! daemon lost at the default ring-buffer size, the daemon's CPU time and peak RSS; plus
//! start-to-`ready` time and idle RSS. These probes run in the host namespace, so their ports
//! stay inside the benchmark's share of it (16000–20999), and the policy leaves the host's
//! ip_local_reserved_ports alone.

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::json;

use super::{
    daemon::{BenchCgroup, Daemon, cpu_ticks, proc_status},
    stats::{fmt0, fmt2, max, median, min, summary},
};

/// Issue target: the daemon keeps up with this many events per second without loss. Paced a
/// little above the 200,000/s.
pub const TARGET_EVENTS_PER_S: u32 = 250_000;
/// Issue targets for the daemon itself.
pub const TARGET_IDLE_RSS_KIB: f64 = 16.0 * 1024.0;
pub const TARGET_READY_MS: f64 = 200.0;

pub struct EventRun {
    events_per_s: f64,
    lost: u64,
    daemon_cpu_share: f64,
    peak_rss_kib: u64,
    idle_rss_kib: u64,
    ready_ms: f64,
}

pub struct EventResults {
    pub iterations: usize,
    pub paced: Vec<EventRun>,
    pub unpaced: Vec<EventRun>,
    pub new_cgroup_ms: Vec<f64>,
}

/// Runs the paced and the flat-out variant interleaved, `repetitions` times, then the
/// new-cgroup latency.
pub fn measure(bins: &Path, quick: bool, repetitions: usize) -> anyhow::Result<EventResults> {
    let iterations = if quick { 50_000 } else { 1_000_000 };
    // Interleaved, so that a noisy neighbour hurts both variants alike.
    let (mut paced, mut unpaced) = (vec![], vec![]);
    for repetition in 0..repetitions {
        for (pace, runs) in [
            (Some(TARGET_EVENTS_PER_S), &mut paced),
            (None, &mut unpaced),
        ] {
            let run = event_run(bins, iterations, pace)
                .with_context(|| format!("event pipeline, repetition {}", repetition + 1))?;
            eprintln!(
                "xtask: bench events {} ({}): {:.0} events/s, {} lost, daemon CPU {:.0}%, peak RSS {} KiB, ready in {:.0} ms",
                repetition + 1,
                if pace.is_some() { "paced" } else { "unpaced" },
                run.events_per_s,
                run.lost,
                run.daemon_cpu_share * 100.0,
                run.peak_rss_kib,
                run.ready_ms
            );
            runs.push(run);
        }
    }
    let new_cgroup_ms =
        new_cgroup_latency(bins, if quick { 5 } else { 50 }).context("new-cgroup latency")?;
    eprintln!(
        "xtask: a new scope cgroup was enforced {:.1} ms (median) after its mkdir",
        median(&new_cgroup_ms)
    );
    Ok(EventResults {
        iterations,
        paced,
        unpaced,
        new_cgroup_ms,
    })
}

impl EventResults {
    pub fn paced_rate(&self) -> Vec<f64> {
        self.paced.iter().map(|r| r.events_per_s).collect()
    }

    pub fn paced_lost(&self) -> u64 {
        self.paced.iter().map(|r| r.lost).sum()
    }

    fn all(&self, f: fn(&EventRun) -> f64) -> Vec<f64> {
        self.paced.iter().chain(&self.unpaced).map(f).collect()
    }

    pub fn target_met(&self) -> bool {
        self.paced_lost() == 0
            && median(&self.paced_rate()) >= f64::from(TARGET_EVENTS_PER_S) * 0.95
    }

    pub fn idle_rss_kib(&self) -> Vec<f64> {
        self.all(|r| r.idle_rss_kib as f64)
    }

    pub fn ready_ms(&self) -> Vec<f64> {
        self.all(|r| r.ready_ms)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let unpaced_rate: Vec<f64> = self.unpaced.iter().map(|r| r.events_per_s).collect();
        let cpu: Vec<f64> = self.paced.iter().map(|r| r.daemon_cpu_share).collect();
        json!({
            "events_per_run": self.iterations,
            "ring_buffer_bytes": "default",
            "event_pipeline": {
                "target_met": self.target_met(),
                "paced": {
                    "target_events_per_s": TARGET_EVENTS_PER_S,
                    "events_per_s": summary(&self.paced_rate()),
                    "lost_events_total": self.paced_lost(),
                    "daemon_cpu_share": summary(&cpu),
                },
                "unpaced": {
                    "events_per_s": summary(&unpaced_rate),
                    "lost_events_total": self.unpaced.iter().map(|r| r.lost).sum::<u64>(),
                },
                "daemon_peak_rss_kib": summary(&self.all(|r| r.peak_rss_kib as f64)),
            },
            "daemon": {
                "ready_ms": summary(&self.ready_ms()),
                "idle_rss_kib": summary(&self.idle_rss_kib()),
                "new_cgroup_enforced_ms": summary(&self.new_cgroup_ms),
            },
        })
    }

    /// The event pipeline's table; `judged` is false for a quick run, too short for the
    /// producer to keep pace.
    pub fn markdown(&self, judged: bool) -> String {
        let row = |name: &str, values: &[f64], format: fn(f64) -> String| {
            format!(
                "| {name} | {} | {} | {} |\n",
                format(median(values)),
                format(min(values)),
                format(max(values))
            )
        };
        let paced_lost = self.paced_lost();
        let unpaced_lost: u64 = self.unpaced.iter().map(|r| r.lost).sum();
        let unpaced_rate: Vec<f64> = self.unpaced.iter().map(|r| r.events_per_s).collect();
        let cpu: Vec<f64> = self.paced.iter().map(|r| r.daemon_cpu_share).collect();
        let verdict = if !judged {
            "not judged in a quick run (too short for the producer to keep pace)".to_owned()
        } else if self.target_met() {
            "met".to_owned()
        } else {
            format!(
                "MISSED: the producer reached {:.0} events/s, {paced_lost} lost",
                median(&self.paced_rate())
            )
        };
        format!(
            "Target: {TARGET_EVENTS_PER_S} events/s with zero loss — {verdict}.\n\n\
             | measure | median | min | max |\n|---|---|---|---|\n\
             {}| events lost at that pace, all runs | {paced_lost} | | |\n\
             {}| events lost flat out, all runs | {unpaced_lost} | | |\n{}{}{}{}{}\n\
             {} repetition(s) of {} events per variant, default ring buffer. No event was lost \
             below the flat-out rate of one producer, so loss, if any, starts above it.\n",
            row(
                "events/s paced at the 250,000/s target",
                &self.paced_rate(),
                fmt0
            ),
            row("events/s flat out (one producer)", &unpaced_rate, fmt0),
            row(
                "daemon CPU at the paced rate (share of one core)",
                &cpu,
                fmt2
            ),
            row(
                "daemon peak RSS (KiB)",
                &self.all(|r| r.peak_rss_kib as f64),
                fmt0
            ),
            row("daemon start to `ready` (ms)", &self.ready_ms(), fmt0),
            row("daemon idle RSS (KiB)", &self.idle_rss_kib(), fmt0),
            row(
                "new scope cgroup enforced after mkdir (ms; target 100)",
                &self.new_cgroup_ms,
                fmt2
            ),
            self.paced.len(),
            self.iterations,
        )
    }
}

fn event_run(bins: &Path, iterations: usize, pace: Option<u32>) -> anyhow::Result<EventRun> {
    let cgroup = BenchCgroup::new("events")?;
    let scope_dir = cgroup.child("web")?;
    let started = Instant::now();
    let (daemon, _log) = Daemon::start(
        bins,
        &cgroup.path,
        &cgroup.relative,
        &format!(
            "reserve = false\n[[scope]]\nname = \"web\"\ncgroup = \"{}/web\"\nephemeral = \"16000-16099\"\n",
            cgroup.relative
        ),
    )?;
    let ready_ms = started.elapsed().as_secs_f64() * 1000.0;
    std::thread::sleep(Duration::from_millis(200));
    let pid = daemon.pid();
    let idle_rss_kib = proc_status(pid, "VmRSS:")?;
    let cpu_before = cpu_ticks(pid)?;

    let flood_start = Instant::now();
    let mut probe = Command::new(bins.join("pg-probe"));
    probe.arg(&scope_dir);
    match pace {
        Some(rate) => probe
            .args(["rebind-paced", "udp", "16050"])
            .args([iterations.to_string(), rate.to_string()]),
        None => probe
            .args(["rebind-loop", "udp", "16050"])
            .arg(iterations.to_string()),
    };
    let output = probe.output().context("running the probe")?;
    let flood = flood_start.elapsed();
    if !output.status.success() {
        bail!("probe failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    // Let the daemon finish reading what is queued before asking.
    std::thread::sleep(Duration::from_millis(300));
    let cpu_after = cpu_ticks(pid)?;
    let status = daemon.status()?;
    let lost = status["lost_events"].as_u64().context("lost_events")?;
    let allowed = status["scopes"][0]["allowed"].as_u64().context("allowed")?;
    // The first bind, then one per repeated call.
    if allowed != iterations as u64 + 1 {
        bail!(
            "the scope counted {allowed} binds, expected {}: the measurement is not what it claims",
            iterations + 1
        );
    }
    let peak_rss_kib = proc_status(pid, "VmHWM:")?;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let daemon_cpu_share = (cpu_after - cpu_before) as f64 / ticks_per_s / flood.as_secs_f64();
    daemon.stop()?;
    Ok(EventRun {
        events_per_s: iterations as f64 / flood.as_secs_f64(),
        lost,
        daemon_cpu_share,
        peak_rss_kib,
        idle_rss_kib,
        ready_ms,
    })
}

/// How long after its mkdir a new cgroup a scope selects is enforced: until the daemon logs
/// that its kernel map entry is written (inotify, no polling), `samples` times.
fn new_cgroup_latency(bins: &Path, samples: usize) -> anyhow::Result<Vec<f64>> {
    let cgroup = BenchCgroup::new("cgroups")?;
    cgroup.child("pods")?;
    let (daemon, lines) = Daemon::start(
        bins,
        &cgroup.path,
        &cgroup.relative,
        &format!(
            "reserve = false\n[[scope]]\nname = \"pods\"\ncgroup = \"{}/pods/*\"\nephemeral = \"16200-16299\"\n",
            cgroup.relative
        ),
    )?;
    let mut latencies = vec![];
    for sample in 0..samples {
        let dir = cgroup.path.join(format!("pods/c{sample}"));
        let needle = format!("pods/c{sample} (id");
        while lines.try_recv().is_ok() {}
        let created = Instant::now();
        fs::create_dir(&dir)?;
        loop {
            let (at, line) = lines
                .recv_timeout(Duration::from_secs(5))
                .with_context(|| format!("{} was never enforced", dir.display()))?;
            if line.contains(&needle) && line.contains("enforced") {
                latencies.push(at.duration_since(created).as_secs_f64() * 1000.0);
                break;
            }
        }
        fs::remove_dir(&dir)?;
    }
    daemon.stop()?;
    Ok(latencies)
}
