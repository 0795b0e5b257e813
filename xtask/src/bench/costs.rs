//! Issue item 1: what each program costs per call, from the kernel's own accounting.
//!
//! Run-time statistics are switched on with a BPF_ENABLE_STATS file descriptor for this part
//! only (the sysctl is never touched, and items 2 and 3 run without the statistics' own cost).
//! The programs are the ones the kernel reports attached at the daemon's cgroup (and the empty
//! ones at B1's), so programs a later build adds are measured too. Each case runs a probe and
//! reads every program's run_time_ns and run_cnt before and after: the deciding program's
//! time per run is the figure; the others are listed beside it.

use std::collections::{BTreeMap, HashMap};

use anyhow::bail;
use portguard_common::names::{PROG_BIND4, PROG_CONNECT4};
use serde_json::json;

use super::{
    bpf::{self, Attached},
    lab::{DENIED_BIND, Lab, Probe, Variant},
    stats::{median, spread, summary},
};

pub struct Case {
    pub label: String,
    variant: Variant,
    op: &'static str,
    fill: &'static str,
    /// The program whose cost the case is about (for B1: the empty one at its hook).
    decider: &'static str,
    refused: bool,
}

pub struct CaseResult {
    pub case: Case,
    pub ns_per_run: Vec<f64>,
    pub runs_per_call: Vec<f64>,
    /// Every program that ran: label -> ns per run in each repetition.
    pub all: BTreeMap<String, Vec<f64>>,
}

const STEERED_FILLS: [(&str, &str); 5] = [
    ("0%", "none"),
    ("50%", "500"),
    ("90%", "900"),
    ("99%", "990"),
    ("99.9%", "999"),
];

fn cases(lab: &Lab) -> Vec<Case> {
    let case = |label: &str, variant, op, fill, decider, refused| Case {
        label: label.to_owned(),
        variant,
        op,
        fill,
        decider,
        refused,
    };
    let mut cases = vec![
        case(
            "empty program (B1), UDP connect()",
            Variant::B1,
            "udp",
            "none",
            PROG_CONNECT4,
            false,
        ),
        case(
            "unscoped socket (P), UDP connect()",
            Variant::P,
            "udp",
            "none",
            PROG_CONNECT4,
            false,
        ),
        case(
            "scoped allowed bind()",
            Variant::S,
            "bind-range",
            "none",
            PROG_BIND4,
            false,
        ),
        case(
            "denied bind()",
            Variant::S,
            DENIED_BIND,
            "none",
            PROG_BIND4,
            true,
        ),
        case(
            "steered UDP connect()",
            Variant::S,
            "udp",
            "none",
            PROG_CONNECT4,
            false,
        ),
    ];
    for variant in lab.variants(&[Variant::S, Variant::Shared]) {
        for (label, fill) in STEERED_FILLS {
            cases.push(case(
                &format!("steered TCP connect() ({}), {label} full", variant.label()),
                variant,
                "tcp",
                fill,
                PROG_CONNECT4,
                false,
            ));
        }
    }
    cases
}

/// Program id -> the label it is reported under: its name for portguard's, "empty at
/// <portguard's program at that hook>" for B1's.
fn labels(lab: &Lab) -> anyhow::Result<HashMap<u32, String>> {
    let mut labels = HashMap::new();
    let mut by_hook = HashMap::new();
    for program in &lab.portguard {
        let name = bpf::program_stats(program.id)?.name;
        by_hook.insert(program.attach_type, name.clone());
        labels.insert(program.id, name);
    }
    for program in &lab.empty {
        let hook = by_hook
            .get(&program.attach_type)
            .map_or("?", String::as_str);
        labels.insert(program.id, format!("empty at {hook}"));
    }
    Ok(labels)
}

/// run_time_ns and run_cnt of each program.
fn snapshot(programs: &[Attached]) -> anyhow::Result<HashMap<u32, (u64, u64)>> {
    programs
        .iter()
        .map(|p| bpf::program_stats(p.id).map(|s| (p.id, (s.run_time_ns, s.run_count))))
        .collect()
}

pub fn measure(lab: &Lab, repetitions: usize, quick: bool) -> anyhow::Result<Vec<CaseResult>> {
    let calls = if quick { 200 } else { 2_000 };
    let labels = labels(lab)?;
    let mut results: Vec<CaseResult> = cases(lab)
        .into_iter()
        .map(|case| CaseResult {
            case,
            ns_per_run: vec![],
            runs_per_call: vec![],
            all: BTreeMap::new(),
        })
        .collect();
    // Statistics on for this part only: closing the descriptor turns them off again.
    let stats = bpf::enable_stats()?;
    for repetition in 0..repetitions {
        for result in &mut results {
            let case = &result.case;
            let programs = lab.programs(case.variant);
            let before = snapshot(programs)?;
            let run = lab.probe(
                case.variant,
                &Probe {
                    op: case.op,
                    calls,
                    fill: case.fill,
                    other_dst: false,
                    seed: repetition as u64 + 1,
                },
            )?;
            let after = snapshot(programs)?;
            let expected_failures = if case.refused { calls } else { 0 };
            if run.failures != expected_failures {
                bail!(
                    "{}: {} of {calls} calls failed (errno {}), expected {expected_failures}",
                    case.label,
                    run.failures,
                    run.errno
                );
            }
            let mut decider = None;
            for program in programs {
                let (time0, count0) = before[&program.id];
                let (time1, count1) = after[&program.id];
                let (time, count) = (time1 - time0, count1 - count0);
                if count == 0 {
                    continue;
                }
                let label = &labels[&program.id];
                let ns = time as f64 / count as f64;
                result.all.entry(label.clone()).or_default().push(ns);
                if label == case.decider || *label == format!("empty at {}", case.decider) {
                    decider = Some((ns, count));
                }
            }
            let Some((ns, count)) = decider else {
                bail!(
                    "{}: {} never ran (are run-time statistics counting?)",
                    case.label,
                    case.decider
                );
            };
            if (count as usize) < calls || ns <= 0.0 {
                bail!(
                    "{}: {} ran {count} times for {calls} calls, {ns} ns each: not a measurement",
                    case.label,
                    case.decider
                );
            }
            result.ns_per_run.push(ns);
            result.runs_per_call.push(count as f64 / calls as f64);
        }
        eprintln!(
            "xtask: bench program costs repetition {}: {}",
            repetition + 1,
            results
                .iter()
                .map(|r| format!(
                    "{} {:.0} ns",
                    r.case.label,
                    r.ns_per_run.last().copied().unwrap_or(f64::NAN)
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    drop(stats);
    Ok(results)
}

impl CaseResult {
    pub fn to_json(&self) -> serde_json::Value {
        let all: serde_json::Map<String, serde_json::Value> = self
            .all
            .iter()
            .map(|(label, ns)| (label.clone(), summary(ns)))
            .collect();
        json!({
            "case": self.case.label,
            "variant": self.case.variant.label(),
            "program": self.case.decider,
            "ns_per_run": summary(&self.ns_per_run),
            "runs_per_call": summary(&self.runs_per_call),
            "every_program_ns_per_run": all,
        })
    }
}

pub fn markdown(results: &[CaseResult]) -> String {
    let mut out = "| case | program | ns per run | every program that ran (median ns per run) |\n|---|---|---|---|\n".to_owned();
    for result in results {
        let decider = if result.case.variant == Variant::B1 {
            format!("empty at {}", result.case.decider)
        } else {
            result.case.decider.to_owned()
        };
        out += &format!(
            "| {} | {decider} | {} | {} |\n",
            result.case.label,
            spread(&result.ns_per_run, 0),
            result
                .all
                .iter()
                .map(|(label, ns)| format!("{label} {:.0}", median(ns)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    out
}
