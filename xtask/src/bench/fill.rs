//! Issue item 3: TCP connect() latency and failures as the range fills, portguard (S) against
//! the kernel's own allocator on the same range (K).
//!
//! The fill ports are held by TCP sockets bound before the probe enters its cgroup, so they are
//! outside the scope and unknown to portguard's own accounting: the worst case for its search,
//! which must ask the kernel about each. The TIME_WAIT fills are made by the measured process
//! itself (client closes first), then it connects to the same listener (the kernel can reuse a
//! TIME_WAIT port only for another 4-tuple) or to another one.

use serde_json::json;

use super::{
    lab::{Lab, Probe, ProbeRun, Variant},
    stats::{median, spread, summary},
};

pub struct Fill {
    pub label: &'static str,
    /// pg-bench's `--fill`.
    spec: &'static str,
    other_dst: bool,
}

pub const FILLS: [Fill; 9] = [
    Fill {
        label: "0%",
        spec: "none",
        other_dst: false,
    },
    Fill {
        label: "50%, even ports taken",
        spec: "even",
        other_dst: false,
    },
    Fill {
        label: "50%, odd ports taken",
        spec: "odd",
        other_dst: false,
    },
    Fill {
        label: "90%",
        spec: "900",
        other_dst: false,
    },
    Fill {
        label: "95%",
        spec: "950",
        other_dst: false,
    },
    Fill {
        label: "99%",
        spec: "990",
        other_dst: false,
    },
    Fill {
        label: "99.9%",
        spec: "999",
        other_dst: false,
    },
    Fill {
        label: "90% TIME_WAIT, same destination",
        spec: "tw:900",
        other_dst: false,
    },
    Fill {
        label: "90% TIME_WAIT, other destination",
        spec: "tw:900",
        other_dst: true,
    },
];

const VARIANTS: [Variant; 3] = [Variant::S, Variant::Shared, Variant::K];

pub struct Level {
    pub fill: &'static Fill,
    pub runs: Vec<(Variant, Vec<ProbeRun>)>,
}

impl Level {
    fn runs(&self, variant: Variant) -> &[ProbeRun] {
        self.runs
            .iter()
            .find(|(v, _)| *v == variant)
            .map_or(&[], |(_, runs)| runs.as_slice())
    }

    fn values(&self, variant: Variant, f: fn(&ProbeRun) -> f64) -> Vec<f64> {
        self.runs(variant).iter().map(f).collect()
    }

    /// Speed of `variant` over K's (K's latency ÷ `variant`'s), repetition by repetition.
    pub fn speedup(&self, variant: Variant, f: fn(&ProbeRun) -> f64) -> Vec<f64> {
        self.values(Variant::K, f)
            .iter()
            .zip(self.values(variant, f))
            .map(|(k, v)| k / v)
            .collect()
    }

    pub fn failures(&self, variant: Variant) -> (usize, usize) {
        let runs = self.runs(variant);
        (
            runs.iter().map(|r| r.failures).sum(),
            runs.iter().map(|r| r.calls).sum(),
        )
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut variants = serde_json::Map::new();
        for (variant, runs) in &self.runs {
            let (failures, calls) = self.failures(*variant);
            variants.insert(
                variant.label().into(),
                json!({
                    "median_ns": summary(&self.values(*variant, |r| r.call_median_ns)),
                    "p99_ns": summary(&self.values(*variant, |r| r.call_p99_ns)),
                    "failures": failures,
                    "calls": calls,
                    "failure_rate": failures as f64 / calls as f64,
                    "first_errno": runs.iter().map(|r| r.errno).find(|&e| e != 0).unwrap_or(0),
                    "fill_ports_held": self.values(*variant, |r| r.fill_held as f64),
                }),
            );
            if *variant != Variant::K {
                variants.insert(
                    format!("{}/K", variant.label()),
                    json!({
                        "median": summary(&self.speedup(*variant, |r| r.call_median_ns)),
                        "p99": summary(&self.speedup(*variant, |r| r.call_p99_ns)),
                    }),
                );
            }
        }
        json!({ "fill": self.fill.label, "variants": variants })
    }
}

pub fn measure(lab: &Lab, repetitions: usize, quick: bool) -> anyhow::Result<Vec<Level>> {
    let variants = lab.variants(&VARIANTS);
    let calls = if quick { 200 } else { 5_000 };
    let mut levels: Vec<Level> = FILLS
        .iter()
        .map(|fill| Level {
            fill,
            runs: variants.iter().map(|&v| (v, vec![])).collect(),
        })
        .collect();
    for repetition in 0..repetitions {
        for level in &mut levels {
            for (variant, runs) in &mut level.runs {
                let probe = Probe {
                    op: "tcp",
                    calls,
                    fill: level.fill.spec,
                    other_dst: level.fill.other_dst,
                    // A new random fill each repetition, the same for every variant.
                    seed: repetition as u64 + 1,
                };
                runs.push(lab.probe(*variant, &probe)?);
            }
            eprintln!(
                "xtask: bench connect at {} repetition {}: {}",
                level.fill.label,
                repetition + 1,
                level
                    .runs
                    .iter()
                    .map(|(v, runs)| {
                        let run = runs.last().expect("just pushed");
                        format!(
                            "{} median {:.1} µs p99 {:.1} µs, {} failed, fill {}",
                            v.label(),
                            run.call_median_ns / 1000.0,
                            run.call_p99_ns / 1000.0,
                            run.failures,
                            run.fill_held
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
    }
    Ok(levels)
}

pub fn markdown(levels: &[Level]) -> String {
    let Some(first) = levels.first() else {
        return String::new();
    };
    let variants: Vec<Variant> = first.runs.iter().map(|(v, _)| *v).collect();
    let scoped: Vec<Variant> = variants
        .iter()
        .copied()
        .filter(|&v| v != Variant::K)
        .collect();
    let mut header = "| fill |".to_owned();
    for v in &variants {
        header += &format!(" {} median µs | {} p99 µs |", v.label(), v.label());
    }
    for v in &scoped {
        header += &format!(" {0}/K median | {0}/K p99 |", v.label());
    }
    for v in &variants {
        header += &format!(" {} failed |", v.label());
    }
    let columns = variants.len() * 3 + scoped.len() * 2;
    let mut out = format!("{header}\n|---|{}\n", "---|".repeat(columns));
    for level in levels {
        out += &format!("| {} |", level.fill.label);
        for &v in &variants {
            out += &format!(
                " {:.1} | {:.1} |",
                median(&level.values(v, |r| r.call_median_ns)) / 1000.0,
                median(&level.values(v, |r| r.call_p99_ns)) / 1000.0
            );
        }
        for &v in &scoped {
            out += &format!(
                " {} | {} |",
                spread(&level.speedup(v, |r| r.call_median_ns), 2),
                spread(&level.speedup(v, |r| r.call_p99_ns), 2)
            );
        }
        for &v in &variants {
            let (failures, calls) = level.failures(v);
            out += &format!(" {failures}/{calls} |");
        }
        out += "\n";
    }
    out
}
