//! The targets the issue sets, judged (reported, never failed on), and the results written out:
//! bench/results.json, bench/results.md and the README's headline.

use std::{fs, path::Path};

use anyhow::Context as _;
use serde_json::json;

use super::{
    costs::{self, CaseResult},
    events::{EventResults, TARGET_EVENTS_PER_S, TARGET_IDLE_RSS_KIB, TARGET_READY_MS},
    fill::{self, Level},
    lab::{SCOPE_RANGE, Variant},
    rates::{self, OpResult},
    stats::median,
};

const README_BEGIN: &str = "<!-- bench:begin (written by cargo xtask bench) -->";
const README_END: &str = "<!-- bench:end -->";

pub struct Target {
    pub what: String,
    pub measured: String,
    pub met: bool,
}

pub struct Results<'a> {
    pub quick: bool,
    pub machine: serde_json::Value,
    pub repetitions: usize,
    pub cpu: usize,
    pub share: Result<(), String>,
    pub b0_effective: usize,
    pub costs: &'a [CaseResult],
    pub rates: &'a [OpResult],
    pub fills: &'a [Level],
    pub events: &'a EventResults,
}

impl Results<'_> {
    pub fn targets(&self) -> Vec<Target> {
        let mut targets = vec![];
        let udp = self.rates.iter().find(|op| op.key == "udp_connect");
        for (a, b, floor) in [
            (Variant::P, Variant::B1, 0.99),
            (Variant::S, Variant::B1, 0.90),
        ] {
            let ratio = udp.and_then(|op| op.ratio(a, b)).unwrap_or_default();
            targets.push(Target {
                what: format!("{}/{} ≥ {floor} on UDP connect()", a.label(), b.label()),
                measured: format!("{:.3}", median(&ratio)),
                met: median(&ratio) >= floor,
            });
        }
        let scoped: Vec<Variant> = self
            .fills
            .first()
            .map(|level| level.runs.iter().map(|(v, _)| *v).collect())
            .unwrap_or_default();
        for variant in scoped.into_iter().filter(|&v| v != Variant::K) {
            for (which, f) in [
                (
                    "median",
                    (|r: &super::lab::ProbeRun| r.call_median_ns) as fn(&_) -> f64,
                ),
                ("p99", |r| r.call_p99_ns),
            ] {
                let worst = self
                    .fills
                    .iter()
                    .map(|level| (median(&level.speedup(variant, f)), level.fill.label))
                    .min_by(|a, b| a.0.total_cmp(&b.0));
                let below = self
                    .fills
                    .iter()
                    .filter(|level| median(&level.speedup(variant, f)) < 1.0)
                    .count();
                if let Some((worst, at)) = worst {
                    targets.push(Target {
                        what: format!(
                            "{}/K ≥ 1.0 for the {which} connect() at every fill level",
                            variant.label()
                        ),
                        measured: format!(
                            "below 1 at {below} of {} levels; lowest {worst:.2} at {at}",
                            self.fills.len()
                        ),
                        met: below == 0,
                    });
                }
            }
            let (failures, calls) = self.fills.iter().fold((0, 0), |(f, c), level| {
                let (lf, lc) = level.failures(variant);
                (f + lf, c + lc)
            });
            targets.push(Target {
                what: format!(
                    "{}: no connect() fails while a port is free (every fill level)",
                    variant.label()
                ),
                measured: format!("{failures} of {calls} failed"),
                met: failures == 0,
            });
        }
        let paced = self.events.paced_rate();
        targets.push(Target {
            what: "≥ 200,000 events/s with zero loss".into(),
            measured: format!(
                "{:.0}/s paced at {TARGET_EVENTS_PER_S}/s, {} lost",
                median(&paced),
                self.events.paced_lost()
            ),
            met: self.events.paced_lost() == 0 && median(&paced) >= 200_000.0,
        });
        let idle = self.events.idle_rss_kib();
        targets.push(Target {
            what: "idle RSS ≤ 16 MiB".into(),
            measured: format!("{:.1} MiB", median(&idle) / 1024.0),
            met: median(&idle) <= TARGET_IDLE_RSS_KIB,
        });
        let ready = self.events.ready_ms();
        targets.push(Target {
            what: "start to `ready` ≤ 200 ms".into(),
            measured: format!("{:.0} ms", median(&ready)),
            met: median(&ready) <= TARGET_READY_MS,
        });
        targets
    }

    fn verdict(&self, met: bool) -> &'static str {
        match (self.quick, met) {
            (true, _) => "not judged (quick run)",
            (false, true) => "met",
            (false, false) => "**not met**",
        }
    }

    fn targets_markdown(&self) -> String {
        let mut out = "| target | measured (median) | |\n|---|---|---|\n".to_owned();
        for target in self.targets() {
            out += &format!(
                "| {} | {} | {} |\n",
                target.what,
                target.measured,
                self.verdict(target.met)
            );
        }
        out
    }

    fn context_line(&self) -> String {
        format!(
            "{}; {} repetition(s), variants interleaved, the probe pinned to CPU {}; medians over \
             the repetitions, (min–max) where given.",
            self.machine["description"]
                .as_str()
                .unwrap_or("unknown machine"),
            self.repetitions,
            self.cpu
        )
    }

    fn notes(&self) -> String {
        let mut notes = String::new();
        if let Err(why) = &self.share {
            notes += &format!(
                "- S-share (destination sharing) not measured: this build's `portguard check` \
                 refuses `{}`: {}\n",
                super::lab::SHARE_OPTION,
                why.lines().next().unwrap_or_default()
            );
        }
        if self.b0_effective != 0 {
            notes += &format!(
                "- B0 and K are not bare: {} program(s) attached above the benchmark's cgroup \
                 were in force for them.\n",
                self.b0_effective
            );
        }
        notes
    }

    pub fn markdown(&self) -> String {
        let (lo, hi) = SCOPE_RANGE;
        let size = u32::from(hi - lo) + 1;
        format!(
            "# portguard benchmark\n\n{}\n\n\
             Baselines: **B0** nothing attached; **B1** an empty `r0 = 1; exit` program at every \
             hook portguard attaches; **P** portguard attached, the caller in no scope; **S** the \
             caller in a scope of {size} ports; **K** the kernel's own allocator, \
             ip_local_port_range set to the same {size} ports. Every probe runs in a network \
             namespace of its own.\n\n{}\n## Targets\n\n{}\n\
             ## 1. Cost per program run (kernel accounting, BPF_ENABLE_STATS)\n\n{}\n\
             ## 2. Connect rates\n\n{}\nRates are one second ÷ the median time inside the \
             timed calls; ratios are taken repetition by repetition (variants side by side).\n\n\
             ## 3. connect() latency as the range fills (TCP, S against K)\n\n{}\n\
             S/K is K's latency ÷ S's (above 1: portguard is faster). Fill ports are held by \
             bound sockets outside the scope; a TIME_WAIT fill is made by the measured process \
             itself, client closing first.\n\n\
             ## 4–5. Event pipeline and daemon\n\n{}",
            self.context_line(),
            self.notes(),
            self.targets_markdown(),
            costs::markdown(self.costs),
            rates::markdown(self.rates),
            fill::markdown(self.fills),
            self.events.markdown(!self.quick),
        )
    }

    /// The README's part: the targets and the rates, with the machine they were measured on.
    fn headline(&self) -> String {
        format!(
            "{}\n{}\n{}\nThe full tables (per-program costs, latency at each fill level, the event \
             pipeline) are in `bench/results.md`.\n",
            self.targets_markdown(),
            rates::markdown(self.rates),
            self.context_line()
        )
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut rates = serde_json::Map::new();
        for op in self.rates {
            rates.insert(op.key.into(), op.to_json());
        }
        let targets: Vec<serde_json::Value> = self
            .targets()
            .into_iter()
            .map(|t| json!({ "target": t.what, "measured": t.measured, "met": t.met }))
            .collect();
        let mut results = json!({
            "machine": self.machine,
            "quick": self.quick,
            "repetitions": self.repetitions,
            "probe_cpu": self.cpu,
            "scope_range": [SCOPE_RANGE.0, SCOPE_RANGE.1],
            "share_measured": self.share.is_ok(),
            "b0_effective_programs": self.b0_effective,
            "targets": targets,
            "program_cost": self.costs.iter().map(CaseResult::to_json).collect::<Vec<_>>(),
            "rates": rates,
            "connect_under_fill": self.fills.iter().map(Level::to_json).collect::<Vec<_>>(),
        });
        if let (Some(results), serde_json::Value::Object(events)) =
            (results.as_object_mut(), self.events.to_json())
        {
            results.extend(events);
        }
        results
    }

    /// Writes results.json and results.md into `dir`, and for a full run the README headline.
    pub fn write(&self, root: &Path, dir: &Path) -> anyhow::Result<()> {
        let json = self.to_json();
        refuse_empty(&json, "")?;
        fs::create_dir_all(dir)?;
        fs::write(
            dir.join("results.json"),
            serde_json::to_string_pretty(&json)? + "\n",
        )?;
        let markdown = self.markdown();
        fs::write(dir.join("results.md"), &markdown)?;
        print!("{markdown}");
        if !self.quick {
            update_readme(root, &self.headline())?;
        }
        Ok(())
    }
}

/// Fails on any NaN or infinity in the results: a figure that could not be measured is an
/// error, never a number.
fn refuse_empty(value: &serde_json::Value, path: &str) -> anyhow::Result<()> {
    match value {
        serde_json::Value::Object(map) => map
            .iter()
            .try_for_each(|(key, value)| refuse_empty(value, &format!("{path}.{key}"))),
        serde_json::Value::Array(values) => values
            .iter()
            .enumerate()
            .try_for_each(|(i, value)| refuse_empty(value, &format!("{path}[{i}]"))),
        // serde_json writes NaN and infinities as null.
        serde_json::Value::Null => anyhow::bail!("{path} could not be measured"),
        _ => Ok(()),
    }
}

fn update_readme(root: &Path, headline: &str) -> anyhow::Result<()> {
    let path = root.join("README.md");
    let readme = fs::read_to_string(&path).context("reading README.md")?;
    let (Some(start), Some(end)) = (readme.find(README_BEGIN), readme.find(README_END)) else {
        anyhow::bail!("README.md lacks the markers `{README_BEGIN}` … `{README_END}`");
    };
    let updated = format!(
        "{}{README_BEGIN}\n{headline}{}",
        &readme[..start],
        &readme[end..]
    );
    fs::write(&path, updated).context("writing README.md")?;
    eprintln!("xtask: README.md Performance headline updated");
    Ok(())
}
