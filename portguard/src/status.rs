//! `portguard status`: one row per scope.

use std::path::Path;

use comfy_table::{CellAlignment, Table, presets::UTF8_FULL_CONDENSED};

use crate::{
    client,
    protocol::{Command, Status},
};

pub fn run(socket: &Path, json: bool) -> anyhow::Result<()> {
    let mut status = None;
    client::exchange(socket, Command::Status, |response| {
        status = response.status;
        Ok(false)
    })?;
    let status = status.ok_or_else(|| anyhow::anyhow!("the daemon sent no status"))?;
    if json {
        println!("{}", serde_json::to_string(&status)?);
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}

pub fn render(status: &Status) -> String {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header([
        "SCOPE",
        "CGROUP",
        "RANGE",
        "IN USE",
        "PEAK",
        "STEERED",
        "DENIED",
        "EXHAUSTED",
        "LAST EVENT",
    ]);
    for scope in &status.scopes {
        let cgroup = match scope.cgroups.as_slice() {
            [] => format!("{} (none yet)", scope.cgroup),
            [only] if *only == scope.cgroup => only.clone(),
            [only] => format!("{}: {only}", scope.cgroup),
            many => format!("{} ({} cgroups)", scope.cgroup, many.len()),
        };
        let name = if scope.mode == "enforce" {
            scope.name.clone()
        } else {
            format!("{} ({})", scope.name, scope.mode)
        };
        table.add_row([
            name,
            cgroup,
            format!("{}-{}", scope.range[0], scope.range[1]),
            format!(
                "{} {}/{}",
                bar(scope.in_use, scope.size),
                scope.in_use,
                scope.size
            ),
            scope.peak.to_string(),
            scope.steered.to_string(),
            scope.denied.to_string(),
            scope.exhausted.to_string(),
            scope.last_event_age_s.map_or("never".into(), age),
        ]);
        for block in &scope.blocks {
            let size = u32::from(block.range[1]) - u32::from(block.range[0]) + 1;
            table.add_row([
                "  └ block".to_owned(),
                block.cgroup.clone(),
                format!("{}-{}", block.range[0], block.range[1]),
                format!("{} {}/{size}", bar(block.in_use, size), block.in_use),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
    }
    for column in 3..=7 {
        if let Some(column) = table.column_mut(column) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    let mut out = if status.scopes.is_empty() {
        format!("no scopes ({} mode)\n", status.mode)
    } else {
        format!("{table}\n")
    };
    out += &format!(
        "policy {} ({} mode) · unscoped binds denied {} · lost events {} · up {}\n",
        status.policy,
        status.mode,
        status.unscoped.denied,
        status.lost_events,
        age(status.uptime_s as f64)
    );
    for scope in status
        .scopes
        .iter()
        .filter(|s| !s.pool_exhausted.is_empty())
    {
        out += &format!(
            "pool of scope {} exhausted: no block for {}\n",
            scope.name,
            scope.pool_exhausted.join(", ")
        );
    }
    if let Some(reload) = &status.last_reload {
        match &reload.error {
            None => out += &format!("last reload {} ago: applied\n", age(reload.age_s)),
            Some(error) => {
                out += &format!(
                    "last reload {} ago FAILED; the policy above stays in force:\n",
                    age(reload.age_s)
                );
                for line in error.lines() {
                    out += &format!("  {line}\n");
                }
            }
        }
    }
    out
}

/// A ten-cell bar of how full a range is.
fn bar(in_use: u64, size: u32) -> String {
    let filled = if size == 0 {
        0
    } else {
        ((in_use.min(u64::from(size)) * 10).div_ceil(u64::from(size))) as usize
    };
    format!("{}{}", "█".repeat(filled), "░".repeat(10 - filled))
}

fn age(seconds: f64) -> String {
    let seconds = seconds.max(0.0) as u64;
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ScopeCounters, ScopeStatus};

    #[test]
    fn renders_scopes_with_bars_and_footer() {
        let status = Status {
            version: 1,
            uptime_s: 3725,
            lost_events: 2,
            events_received: 40,
            mode: "enforce".into(),
            policy: "/etc/portguard/policy.toml".into(),
            scopes: vec![ScopeStatus {
                name: "web".into(),
                cgroup: "system.slice/web.service".into(),
                active: true,
                cgroups: vec!["system.slice/web.service".into()],
                block: None,
                blocks: vec![],
                pool_exhausted: vec![],
                mode: "enforce".into(),
                range: [40000, 40999],
                size: 1000,
                in_use: 250,
                peak: 300,
                steered: 10,
                denied: 1,
                exhausted: 0,
                allowed: 3,
                audit_would_deny: 0,
                unsteered: 0,
                last_event_age_s: Some(75.0),
            }],
            unscoped: ScopeCounters::default(),
            last_reload: Some(crate::protocol::LastReload {
                ok: false,
                age_s: 3.0,
                error: Some("p.toml:3:1: unknown key `x` in scope".into()),
            }),
        };
        let text = render(&status);
        assert!(text.contains("███░░░░░░░ 250/1000"), "{text}");
        assert!(text.contains("1m15s"), "{text}");
        assert!(text.contains("lost events 2 · up 1h02m"), "{text}");
        assert!(
            text.contains("last reload 3s ago FAILED; the policy above stays in force:\n  p.toml:3:1: unknown key `x` in scope"),
            "{text}"
        );
    }

    #[test]
    fn bar_is_full_only_when_full() {
        assert_eq!(bar(0, 10), "░░░░░░░░░░");
        assert_eq!(bar(1, 1000), "█░░░░░░░░░");
        assert_eq!(bar(1000, 1000), "██████████");
    }
}
