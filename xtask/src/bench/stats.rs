//! Medians and spreads over repetitions, and the machine every figure is measured on.

use std::fs;

use serde_json::json;

/// Median, min, max and every sample, for results.json.
pub fn summary(values: &[f64]) -> serde_json::Value {
    json!({ "median": median(values), "min": min(values), "max": max(values), "samples": values })
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

pub fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}

pub fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// "median (min–max)" with `decimals` places.
pub fn spread(values: &[f64], decimals: usize) -> String {
    format!(
        "{:.decimals$} ({:.decimals$}–{:.decimals$})",
        median(values),
        min(values),
        max(values)
    )
}

pub fn fmt0(value: f64) -> String {
    format!("{value:.0}")
}

pub fn fmt2(value: f64) -> String {
    format!("{value:.2}")
}

/// Kernel, CPU model and count, as every figure states them.
pub fn machine() -> anyhow::Result<serde_json::Value> {
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
