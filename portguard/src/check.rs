//! `portguard check FILE`.

use std::{path::Path, process::ExitCode};

use crate::{
    policy::{HostPorts, Policy, host_warnings},
    policy_file::PolicySource,
};

pub fn run(file: &Path) -> anyhow::Result<ExitCode> {
    let source = PolicySource::read(file)?;
    let policy = match source.parse() {
        Ok(policy) => policy,
        Err(errors) => {
            eprintln!("{errors}");
            return Ok(ExitCode::FAILURE);
        }
    };
    print!("{}", summary(&source.name, &policy));
    match HostPorts::read() {
        Ok(host) => {
            for warning in host_warnings(&policy, &host) {
                eprintln!("warning: {warning}");
            }
        }
        Err(error) => eprintln!("warning: cannot read the host's port settings: {error}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// What a valid policy does, one line per scope.
pub fn summary(name: &str, policy: &Policy) -> String {
    let mut out = format!(
        "{name}: valid; mode {}; {} scope{}\n",
        policy.mode,
        policy.scopes.len(),
        if policy.scopes.len() == 1 { "" } else { "s" }
    );
    for scope in &policy.scopes {
        let bind = match &scope.bind {
            None => "any port outside other scopes' ranges".to_owned(),
            Some(list) => list
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        };
        let ports = match scope.block {
            None => format!(
                "ephemeral {} ({} ports)",
                scope.ephemeral,
                scope.ephemeral.len()
            ),
            Some(block) => format!(
                "pool {} in blocks of {block} ({} cgroups at most)",
                scope.ephemeral,
                scope.ephemeral.len() / u32::from(block)
            ),
        };
        out += &format!(
            "  {}: {}, {}, explicit binds: {}, {}{}{}\n",
            scope.name,
            scope.selector,
            ports,
            bind,
            scope.effective_mode(policy.mode),
            if scope.strict { ", strict" } else { "" },
            if scope.share {
                ""
            } else {
                ", one connection per port"
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse;

    #[test]
    fn summary_names_every_scope() {
        let policy = parse(
            "mode = \"audit\"\n[[scope]]\nname = \"web\"\ncgroup = \"a/b\"\nephemeral = \"40000-40099\"\nbind = [\"8080\"]\nstrict = true\n",
        )
        .expect("valid");
        assert_eq!(
            summary("p.toml", &policy),
            "p.toml: valid; mode audit; 1 scope\n  web: cgroup a/b, ephemeral 40000-40099 (100 ports), explicit binds: 8080, audit, strict\n"
        );
    }
}
