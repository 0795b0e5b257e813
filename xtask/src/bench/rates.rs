//! Issue item 2: how many UDP connect() calls, and loopback TCP connect()+close() cycles, one
//! CPU gets through for each baseline, and the ratios between them.
//!
//! A UDP connect() on an unbound socket runs the connect hook and picks a port, nothing else,
//! so it isolates what portguard adds; its rate is one second ÷ the median time inside
//! connect() alone. The TCP rate is the same for connect() and close() together (a reset:
//! SO_LINGER 0, so the run builds no TIME_WAIT); the listener's accept() is outside the timed
//! part. Medians, because on a shared machine a few preemptions of milliseconds would
//! otherwise decide a mean; the means are in results.json.

use serde_json::json;

use super::{
    lab::{Lab, Probe, ProbeRun, Variant},
    stats::{median, spread, summary},
};

const VARIANTS: [Variant; 6] = [
    Variant::B0,
    Variant::B1,
    Variant::P,
    Variant::S,
    Variant::Shared,
    Variant::K,
];

/// The ratios the issue asks for (rate of the first over rate of the second, per repetition),
/// and B1/B0: what entering an empty program costs.
pub const RATIOS: [(Variant, Variant); 5] = [
    (Variant::P, Variant::B1),
    (Variant::S, Variant::B1),
    (Variant::S, Variant::K),
    (Variant::Shared, Variant::K),
    (Variant::B1, Variant::B0),
];

pub struct OpResult {
    pub key: &'static str,
    pub label: &'static str,
    tcp: bool,
    pub calls: usize,
    pub runs: Vec<(Variant, Vec<ProbeRun>)>,
}

impl OpResult {
    fn rate(&self, run: &ProbeRun) -> f64 {
        let ns = if self.tcp {
            run.cycle_median_ns
        } else {
            run.call_median_ns
        };
        1e9 / ns
    }

    fn mean_rate(&self, run: &ProbeRun) -> f64 {
        let ns = if self.tcp {
            run.cycle_mean_ns
        } else {
            run.call_mean_ns
        };
        1e9 / ns
    }

    fn runs(&self, variant: Variant) -> Option<&[ProbeRun]> {
        self.runs
            .iter()
            .find(|(v, _)| *v == variant)
            .map(|(_, runs)| runs.as_slice())
    }

    /// Calls per second in each repetition.
    pub fn rates(&self, variant: Variant) -> Option<Vec<f64>> {
        Some(
            self.runs(variant)?
                .iter()
                .map(|run| self.rate(run))
                .collect(),
        )
    }

    /// rate(a) / rate(b), repetition by repetition (they ran side by side).
    pub fn ratio(&self, a: Variant, b: Variant) -> Option<Vec<f64>> {
        let (a, b) = (self.rates(a)?, self.rates(b)?);
        Some(a.iter().zip(&b).map(|(a, b)| a / b).collect())
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut variants = serde_json::Map::new();
        for (variant, runs) in &self.runs {
            let failures: usize = runs.iter().map(|run| run.failures).sum();
            variants.insert(
                variant.label().into(),
                json!({
                    "calls_per_s": summary(&self.rates(*variant).unwrap_or_default()),
                    "calls_per_s_from_mean": summary(&runs.iter().map(|r| self.mean_rate(r)).collect::<Vec<_>>()),
                    "connect_median_ns": summary(&runs.iter().map(|r| r.call_median_ns).collect::<Vec<_>>()),
                    "failures": failures,
                }),
            );
        }
        let mut ratios = serde_json::Map::new();
        for (a, b) in RATIOS {
            if let Some(ratio) = self.ratio(a, b) {
                ratios.insert(format!("{}/{}", a.label(), b.label()), summary(&ratio));
            }
        }
        json!({ "label": self.label, "calls_per_repetition": self.calls, "variants": variants, "ratios": ratios })
    }
}

pub fn measure(lab: &Lab, repetitions: usize, quick: bool) -> anyhow::Result<Vec<OpResult>> {
    let variants = lab.variants(&VARIANTS);
    let mut ops = vec![
        OpResult {
            key: "udp_connect",
            label: "UDP connect()",
            tcp: false,
            calls: if quick { 20_000 } else { 200_000 },
            runs: vec![],
        },
        OpResult {
            key: "tcp_connect_close",
            label: "TCP connect()+close()",
            tcp: true,
            calls: if quick { 2_000 } else { 20_000 },
            runs: vec![],
        },
    ];
    for op in &mut ops {
        op.runs = variants.iter().map(|&v| (v, vec![])).collect();
    }
    for repetition in 0..repetitions {
        for op in &mut ops {
            // Interleaved: every variant once per repetition, so drift hurts them alike.
            for (variant, runs) in &mut op.runs {
                let probe = Probe {
                    op: if op.tcp { "tcp" } else { "udp" },
                    calls: op.calls,
                    fill: "none",
                    other_dst: false,
                    seed: repetition as u64 + 1,
                };
                let run = lab.probe(*variant, &probe)?;
                if run.failures != 0 {
                    anyhow::bail!(
                        "{} ({}): {} of {} calls failed (errno {})",
                        op.label,
                        variant.label(),
                        run.failures,
                        run.calls,
                        run.errno
                    );
                }
                runs.push(run);
            }
            eprintln!(
                "xtask: bench {} repetition {}: {}",
                op.label,
                repetition + 1,
                op.runs
                    .iter()
                    .map(|(v, runs)| format!(
                        "{} {:.0}/s",
                        v.label(),
                        runs.last().map_or(f64::NAN, |run| op.rate(run))
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(ops)
}

/// One row per call: each variant's rate (median over repetitions, in thousands per second)
/// and each ratio as median (min–max).
pub fn markdown(ops: &[OpResult]) -> String {
    let Some(first) = ops.first() else {
        return String::new();
    };
    let variants: Vec<Variant> = first.runs.iter().map(|(v, _)| *v).collect();
    let ratios: Vec<(Variant, Variant)> = RATIOS
        .into_iter()
        .filter(|&(a, b)| variants.contains(&a) && variants.contains(&b))
        .collect();
    let mut out = format!(
        "| calls/s (thousands) | {} | {} |\n|---|{}{}\n",
        variants
            .iter()
            .map(|v| v.label())
            .collect::<Vec<_>>()
            .join(" | "),
        ratios
            .iter()
            .map(|(a, b)| format!("{}/{}", a.label(), b.label()))
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(variants.len()),
        "---|".repeat(ratios.len()),
    );
    for op in ops {
        out += &format!("| {} ({} calls per run) |", op.label, op.calls);
        for &variant in &variants {
            let rates = op.rates(variant).unwrap_or_default();
            out += &format!(" {:.1} |", median(&rates) / 1000.0);
        }
        for &(a, b) in &ratios {
            out += &format!(" {} |", spread(&op.ratio(a, b).unwrap_or_default(), 3));
        }
        out += "\n";
    }
    out
}
