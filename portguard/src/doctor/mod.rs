//! `portguard doctor`: what an operator should fix on this host, from live kernel state.

mod findings;
mod host_facts;

use std::{path::Path, process::ExitCode};

use anyhow::Context as _;
pub use findings::{Finding, Severity, diagnose};
pub use host_facts::HostFacts;

use crate::{
    policy::{Policy, PortRange},
    policy_file::PolicySource,
};

pub fn run(
    json: bool,
    policy: Option<&Path>,
    nodeport_range: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let facts = HostFacts::read().context("reading the host's port settings")?;
    let policy: Option<Policy> = match policy {
        Some(path) => Some(PolicySource::read(path)?.parse()?),
        None => match PolicySource::choose(None)? {
            source if source.name.starts_with('<') => None,
            source => Some(source.parse()?),
        },
    };
    let nodeports = nodeport_range
        .map(|text| {
            PortRange::parse(text).map_err(|error| anyhow::anyhow!("--nodeport-range: {error}"))
        })
        .transpose()?;
    let findings = diagnose(&facts, policy.as_ref(), nodeports);
    if json {
        let report = serde_json::json!({
            "version": 1,
            "ip_local_port_range": [facts.local_range.lo, facts.local_range.hi],
            "ip_local_reserved_ports": facts.reserved.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "ip_unprivileged_port_start": facts.unprivileged_port_start,
            "findings": findings,
        });
        println!("{report}");
    } else {
        print!("{}", render(&findings));
    }
    Ok(ExitCode::SUCCESS)
}

fn render(findings: &[Finding]) -> String {
    let mut out = String::new();
    for finding in findings {
        out += &format!("{}: {}\n", finding.severity, finding.message);
        if let Some(fix) = &finding.fix {
            out += &format!("    fix: {fix}\n");
        }
    }
    let warnings = findings
        .iter()
        .filter(|f| f.severity == Severity::Warning)
        .count();
    out += &format!(
        "{warnings} warning{} to look at\n",
        if warnings == 1 { "" } else { "s" }
    );
    out
}
