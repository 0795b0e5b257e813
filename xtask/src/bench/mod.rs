//! `cargo xtask bench`: what portguard costs, measured on this machine. Root only.
//!
//! Event pipeline: the release daemon runs attached at a private cgroup with one scope; a probe
//! in that scope calls bind() on an already bound socket as fast as it can: each call runs the
//! bind hook (one event) and then fails EINVAL in the kernel, so the probe spends its time on
//! events rather than on socket set-up. Each repetition records the event rate the probe
//! produced, the events the daemon lost at the default ring-buffer size, the daemon's CPU time
//! and peak RSS; plus start-to-`ready` time and idle RSS.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::json;

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
    let iterations = if quick { 50_000 } else { 1_000_000 };
    let repetitions = if quick { 1 } else { REPETITIONS };

    // Interleaved, so that a noisy neighbour hurts both variants alike.
    let (mut paced, mut unpaced) = (vec![], vec![]);
    for repetition in 0..repetitions {
        for (pace, runs) in [
            (Some(TARGET_EVENTS_PER_S), &mut paced),
            (None, &mut unpaced),
        ] {
            let run = event_run(&bins, iterations, pace)
                .with_context(|| format!("event pipeline, repetition {}", repetition + 1))?;
            eprintln!(
                "xtask: bench repetition {} ({}): {:.0} events/s, {} lost, daemon CPU {:.0}%, peak RSS {} KiB, ready in {:.0} ms",
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
    let new_cgroup =
        new_cgroup_latency(&bins, if quick { 5 } else { 50 }).context("new-cgroup latency")?;
    eprintln!(
        "xtask: a new scope cgroup was enforced {:.1} ms (median) after its mkdir",
        median(&new_cgroup)
    );
    let all: Vec<&EventRun> = paced.iter().chain(&unpaced).collect();
    let field = |runs: &[&EventRun], f: fn(&EventRun) -> f64| -> Vec<f64> {
        runs.iter().map(|r| f(r)).collect()
    };
    let paced_refs: Vec<&EventRun> = paced.iter().collect();
    let unpaced_refs: Vec<&EventRun> = unpaced.iter().collect();
    let paced_rate = field(&paced_refs, |r| r.events_per_s);
    let unpaced_rate = field(&unpaced_refs, |r| r.events_per_s);
    let paced_lost: u64 = paced.iter().map(|r| r.lost).sum();
    let unpaced_lost: u64 = unpaced.iter().map(|r| r.lost).sum();
    let cpu = field(&paced_refs, |r| r.daemon_cpu_share);
    let peak = field(&all, |r| r.peak_rss_kib as f64);
    let ready = field(&all, |r| r.ready_ms);
    let idle = field(&all, |r| r.idle_rss_kib as f64);
    let target_met =
        paced_lost == 0 && median(&paced_rate) >= f64::from(TARGET_EVENTS_PER_S) * 0.95;
    let machine = machine()?;
    let results = json!({
        "machine": machine,
        "repetitions": repetitions,
        "events_per_run": iterations,
        "ring_buffer_bytes": "default",
        "event_pipeline": {
            "target_met": target_met,
            "paced": {
                "target_events_per_s": TARGET_EVENTS_PER_S,
                "events_per_s": summary(&paced_rate),
                "lost_events_total": paced_lost,
                "daemon_cpu_share": summary(&cpu),
            },
            "unpaced": {
                "events_per_s": summary(&unpaced_rate),
                "lost_events_total": unpaced_lost,
            },
            "daemon_peak_rss_kib": summary(&peak),
        },
        "daemon": {
            "ready_ms": summary(&ready),
            "idle_rss_kib": summary(&idle),
            "new_cgroup_enforced_ms": summary(&new_cgroup),
        },
    });
    // A smoke run must not overwrite the measured results that the README quotes.
    let dir = if quick {
        root.join("target/bench-quick")
    } else {
        root.join("bench")
    };
    fs::create_dir_all(&dir)?;
    fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&results)? + "\n",
    )?;
    let row = |name: &str, values: &[f64], format: fn(f64) -> String| {
        format!(
            "| {name} | {} | {} | {} |\n",
            format(median(values)),
            format(min(values)),
            format(max(values))
        )
    };
    let markdown = format!(
        "Target: {TARGET_EVENTS_PER_S} events/s with zero loss — {}.\n\n| measure | median | min | max |\n|---|---|---|---|\n{}| events lost at that pace, all runs | {paced_lost} | | |\n{}| events lost flat out, all runs | {unpaced_lost} | | |\n{}{}{}{}{}\n{}; {} repetition(s) of {} events per variant, default ring buffer.\n",
        if quick {
            "not judged in a quick run (too short for the producer to keep pace)".to_owned()
        } else if target_met {
            "met".to_owned()
        } else {
            format!(
                "MISSED: the producer reached {:.0} events/s, {paced_lost} lost",
                median(&paced_rate)
            )
        },
        row("events/s paced at the 250,000/s target", &paced_rate, fmt0),
        row("events/s flat out (one producer)", &unpaced_rate, fmt0),
        row(
            "daemon CPU at the paced rate (share of one core)",
            &cpu,
            fmt2
        ),
        row("daemon peak RSS (KiB)", &peak, fmt0),
        row("daemon start to `ready` (ms)", &ready, fmt0),
        row("daemon idle RSS (KiB)", &idle, fmt0),
        row(
            "new scope cgroup enforced after mkdir (ms; target 100)",
            &new_cgroup,
            fmt2
        ),
        machine["description"].as_str().unwrap_or_default(),
        repetitions,
        iterations,
    );
    fs::write(dir.join("results.md"), &markdown)?;
    print!("{markdown}");
    eprintln!("xtask: results in {}", dir.display());
    Ok(())
}

/// Issue target: the daemon keeps up with this many events per second without loss.
const TARGET_EVENTS_PER_S: u32 = 250_000;

struct EventRun {
    events_per_s: f64,
    lost: u64,
    daemon_cpu_share: f64,
    peak_rss_kib: u64,
    idle_rss_kib: u64,
    ready_ms: f64,
}

fn event_run(bins: &Path, iterations: usize, pace: Option<u32>) -> anyhow::Result<EventRun> {
    let cgroup = BenchCgroup::new()?;
    let scope_dir = cgroup.path.join("web");
    fs::create_dir(&scope_dir)?;
    let started = Instant::now();
    let (daemon, socket, _log) = start_daemon(
        bins,
        &cgroup,
        &format!(
            "[[scope]]\nname = \"web\"\ncgroup = \"{}/web\"\nephemeral = \"23000-23099\"\n",
            cgroup.relative
        ),
    )?;
    let ready_ms = started.elapsed().as_secs_f64() * 1000.0;
    std::thread::sleep(Duration::from_millis(200));
    let pid = daemon.0.id();
    let idle_rss_kib = proc_status(pid, "VmRSS:")?;
    let cpu_before = cpu_ticks(pid)?;

    let flood_start = Instant::now();
    let output = Command::new(bins.join("pg-probe"))
        .arg(&scope_dir)
        .args(match pace {
            Some(rate) => vec![
                "rebind-paced".to_owned(),
                "udp".into(),
                "23050".into(),
                iterations.to_string(),
                rate.to_string(),
            ],
            None => vec![
                "rebind-loop".to_owned(),
                "udp".into(),
                "23050".into(),
                iterations.to_string(),
            ],
        })
        .output()
        .context("running the probe")?;
    let flood = flood_start.elapsed();
    if !output.status.success() {
        bail!("probe failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    // Let the daemon finish reading what is queued before asking.
    std::thread::sleep(Duration::from_millis(300));
    let cpu_after = cpu_ticks(pid)?;
    let status = Command::new(bins.join("portguard"))
        .args(["status", "--json", "--socket"])
        .arg(&socket)
        .output()
        .context("asking the daemon for its status")?;
    if !status.status.success() {
        bail!("status failed: {}", String::from_utf8_lossy(&status.stderr));
    }
    let status: serde_json::Value = serde_json::from_slice(&status.stdout)?;
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
    stop_daemon(bins, daemon, &cgroup)?;
    Ok(EventRun {
        events_per_s: iterations as f64 / flood.as_secs_f64(),
        lost,
        daemon_cpu_share,
        peak_rss_kib,
        idle_rss_kib,
        ready_ms,
    })
}

/// A daemon's log lines, each with the moment it was read.
type LogLines = mpsc::Receiver<(Instant, String)>;

/// Starts the release daemon attached at `cgroup` with `policy`, waits for `ready`, and returns
/// it, its control socket, and its log lines as they arrive, each with the moment it was read.
fn start_daemon(
    bins: &Path,
    cgroup: &BenchCgroup,
    policy: &str,
) -> anyhow::Result<(Daemon, PathBuf, LogLines)> {
    let socket = std::env::temp_dir().join(format!("{}.sock", cgroup.relative));
    let policy_file = std::env::temp_dir().join(format!("{}.toml", cgroup.relative));
    fs::write(&policy_file, policy)?;
    let mut daemon = Daemon(
        Command::new(bins.join("portguard"))
            .arg("daemon")
            .arg("--policy")
            .arg(&policy_file)
            .arg("--cgroup")
            .arg(&cgroup.path)
            .arg("--socket")
            .arg(&socket)
            .arg("--pin-path")
            .arg(cgroup.pin_path())
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the daemon")?,
    );
    let stderr = daemon.0.stderr.take().context("daemon stderr")?;
    let (lines_tx, lines) = mpsc::channel();
    // Drains the log so the daemon never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    loop {
        let (_, line) = lines
            .recv_timeout(Duration::from_secs(30))
            .context("the daemon did not get `ready`")?;
        if line.ends_with("] ready") {
            return Ok((daemon, socket, lines));
        }
    }
}

/// Stops the daemon and removes the enforcement it leaves pinned.
fn stop_daemon(bins: &Path, daemon: Daemon, cgroup: &BenchCgroup) -> anyhow::Result<()> {
    drop(daemon);
    let uninstall = Command::new(bins.join("portguard"))
        .arg("uninstall")
        .arg("--pin-path")
        .arg(cgroup.pin_path())
        .output()
        .context("running portguard uninstall")?;
    if !uninstall.status.success() {
        bail!(
            "uninstall failed: {}",
            String::from_utf8_lossy(&uninstall.stderr)
        );
    }
    Ok(())
}

/// How long after its mkdir a new cgroup a scope selects is enforced: until the daemon logs
/// that its kernel map entry is written (inotify, no polling), `samples` times.
fn new_cgroup_latency(bins: &Path, samples: usize) -> anyhow::Result<Vec<f64>> {
    let cgroup = BenchCgroup::new()?;
    fs::create_dir(cgroup.path.join("pods"))?;
    let (daemon, _, lines) = start_daemon(
        bins,
        &cgroup,
        &format!(
            "[[scope]]\nname = \"pods\"\ncgroup = \"{}/pods/*\"\nephemeral = \"23200-23299\"\n",
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
    stop_daemon(bins, daemon, &cgroup)?;
    let _ = fs::remove_dir(cgroup.path.join("pods"));
    Ok(latencies)
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

struct BenchCgroup {
    path: PathBuf,
    relative: String,
}

impl BenchCgroup {
    fn new() -> anyhow::Result<Self> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
        let mount = mountinfo
            .lines()
            .find_map(|line| {
                let (mount, fs) = line.split_once(" - ")?;
                if fs.split_whitespace().next()? != "cgroup2" {
                    return None;
                }
                mount.split_whitespace().nth(4).map(PathBuf::from)
            })
            .context("no cgroup2 mount")?;
        let relative = format!("portguard-bench-{}", std::process::id());
        let path = mount.join(&relative);
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path, relative })
    }
}

impl BenchCgroup {
    fn pin_path(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(&self.relative)
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        let _ = fs::remove_dir(self.path.join("web"));
        let _ = fs::remove_dir(self.path.join("pods"));
        for _ in 0..50 {
            if fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn proc_status(pid: u32, key: &str) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

fn machine() -> anyhow::Result<serde_json::Value> {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_owned();
    let cpuinfo = fs::read_to_string("/proc/cpuinfo")?;
    let cpu = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map_or("unknown CPU".to_owned(), |(_, name)| name.trim().to_owned());
    let cpus = cpuinfo
        .lines()
        .filter(|line| line.starts_with("processor"))
        .count();
    Ok(json!({
        "kernel": kernel,
        "cpu": cpu,
        "cpus": cpus,
        "description": format!("kernel {kernel}, {cpus} × {cpu}"),
    }))
}

fn summary(values: &[f64]) -> serde_json::Value {
    json!({ "median": median(values), "min": min(values), "max": max(values), "samples": values })
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

fn fmt0(value: f64) -> String {
    format!("{value:.0}")
}

fn fmt2(value: f64) -> String {
    format!("{value:.2}")
}
