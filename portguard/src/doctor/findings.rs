//! The checks themselves: pure functions of the host's facts, the policy and the NodePort range.

use std::fmt;

use serde::Serialize;

use super::HostFacts;
use crate::policy::{HostPorts, Policy, PortRange, host_warnings};

/// The dynamic/private ports of IANA (RFC 6335).
pub const IANA_DYNAMIC: PortRange = PortRange::new(49152, 65535);
/// Below this, the kernel's range leaves too few ports for a busy host's outbound connections.
const SMALL_RANGE: u32 = 16384;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Ok,
    Info,
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Ok => "ok",
            Severity::Info => "info",
            Severity::Warning => "warning",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// A stable name for scripts.
    pub check: &'static str,
    pub message: String,
    /// The ports involved, as "lo-hi" or single ports.
    pub ports: Vec<String>,
    pub fix: Option<String>,
}

fn finding(
    severity: Severity,
    check: &'static str,
    message: String,
    ports: Vec<String>,
    fix: Option<String>,
) -> Finding {
    Finding {
        severity,
        check,
        message,
        ports,
        fix,
    }
}

pub fn diagnose(
    facts: &HostFacts,
    policy: Option<&Policy>,
    nodeports: Option<PortRange>,
) -> Vec<Finding> {
    let range = facts.local_range;
    let mut findings = vec![];

    let size = range.len();
    findings.push(if size < SMALL_RANGE {
        finding(
            Severity::Warning,
            "local_port_range_size",
            format!("net.ipv4.ip_local_port_range {range} holds only {size} ports for every outbound connection of the host"),
            vec![range.to_string()],
            Some("widen it, e.g. sysctl -w net.ipv4.ip_local_port_range=\"32768 60999\", or give busy services their own portguard scope".into()),
        )
    } else {
        finding(Severity::Ok, "local_port_range_size", format!("net.ipv4.ip_local_port_range {range} holds {size} ports"), vec![range.to_string()], None)
    });
    if range.lo % 2 == range.hi % 2 {
        findings.push(finding(
            Severity::Warning,
            "local_port_range_parity",
            format!(
                "the ends of net.ipv4.ip_local_port_range {range} have the same parity; the kernel splits the range into even ports for connect() and odd ports for bind(0), so one side gets one port less"
            ),
            vec![range.lo.to_string(), range.hi.to_string()],
            Some(format!("make one end even and the other odd, e.g. \"{} {}\"", range.lo, range.hi.saturating_sub(1))),
        ));
    }
    match range.intersection(&PortRange::new(1, IANA_DYNAMIC.lo - 1)) {
        Some(registered) => findings.push(finding(
            Severity::Info,
            "local_port_range_iana",
            format!(
                "ports {registered} of the ephemeral range lie below the IANA dynamic range {IANA_DYNAMIC} (RFC 6335), where services register fixed ports"
            ),
            vec![registered.to_string()],
            Some("reserve the fixed ports your services use in net.ipv4.ip_local_reserved_ports".into()),
        )),
        None => findings.push(finding(Severity::Ok, "local_port_range_iana", format!("the ephemeral range lies inside the IANA dynamic range {IANA_DYNAMIC}"), vec![], None)),
    }
    findings.push(finding(
        Severity::Info,
        "reserved_ports",
        if facts.reserved.is_empty() {
            "net.ipv4.ip_local_reserved_ports is empty".into()
        } else {
            format!(
                "net.ipv4.ip_local_reserved_ports holds {}",
                join(&facts.reserved)
            )
        },
        facts.reserved.iter().map(ToString::to_string).collect(),
        None,
    ));
    if facts.unprivileged_port_start < 1024 {
        findings.push(finding(
            Severity::Warning,
            "unprivileged_port_start",
            format!(
                "net.ipv4.ip_unprivileged_port_start is {}: unprivileged processes may bind ports {}-1023",
                facts.unprivileged_port_start, facts.unprivileged_port_start
            ),
            vec![format!("{}-1023", facts.unprivileged_port_start)],
            Some("sysctl -w net.ipv4.ip_unprivileged_port_start=1024, unless containers rely on it".into()),
        ));
    }

    let reserved = |port: u16| facts.reserved.iter().any(|r| r.lo <= port && port <= r.hi);
    for listener in &facts.listeners {
        if !(range.lo <= listener.port && listener.port <= range.hi) || reserved(listener.port) {
            continue;
        }
        let who = if listener.owners.is_empty() {
            "an unknown process".to_owned()
        } else {
            listener.owners.join(", ")
        };
        findings.push(finding(
            Severity::Warning,
            "listener_in_ephemeral_range",
            format!(
                "{} port {} ({} on {}) lies inside the ephemeral range {range}: while the service restarts, an outgoing connection can take it",
                listener.protocol, listener.port, who, listener.address
            ),
            vec![listener.port.to_string()],
            Some(format!("add {} to net.ipv4.ip_local_reserved_ports", listener.port)),
        ));
    }

    if let Some(nodeports) = nodeports {
        match nodeports.intersection(&range) {
            Some(shared) => findings.push(finding(
                Severity::Warning,
                "nodeport_range",
                format!("the Kubernetes NodePort range {nodeports} overlaps the ephemeral range {range} on ports {shared}: kube-proxy cannot open a NodePort an outgoing connection holds"),
                vec![shared.to_string()],
                Some(format!("add {shared} to net.ipv4.ip_local_reserved_ports")),
            )),
            None => findings.push(finding(Severity::Ok, "nodeport_range", format!("the NodePort range {nodeports} lies outside the ephemeral range"), vec![], None)),
        }
    }

    if let Some(policy) = policy {
        let host = HostPorts {
            local_range: facts.local_range,
            reserved: facts.reserved.clone(),
        };
        for warning in host_warnings(policy, &host) {
            findings.push(finding(
                Severity::Warning,
                "scope_vs_host",
                warning,
                vec![],
                None,
            ));
        }
        for scope in &policy.scopes {
            if u32::from(scope.ephemeral.lo) < facts.unprivileged_port_start {
                let below = PortRange::new(
                    scope.ephemeral.lo,
                    scope
                        .ephemeral
                        .hi
                        .min(facts.unprivileged_port_start.saturating_sub(1) as u16),
                );
                findings.push(finding(
                    Severity::Warning,
                    "scope_below_unprivileged_start",
                    format!(
                        "scope `{}`'s ephemeral range {} reaches below net.ipv4.ip_unprivileged_port_start {}: unprivileged processes in it get EACCES for ports {below}",
                        scope.name, scope.ephemeral, facts.unprivileged_port_start
                    ),
                    vec![below.to_string()],
                    Some(format!("move scope `{}` to ports {} and above", scope.name, facts.unprivileged_port_start)),
                ));
            }
            for listener in &facts.listeners {
                if scope.ephemeral.lo <= listener.port && listener.port <= scope.ephemeral.hi {
                    findings.push(finding(
                        Severity::Warning,
                        "listener_in_scope_range",
                        format!(
                            "{} port {} ({}) lies in the ephemeral range {} of scope `{}`: that scope has one port less",
                            listener.protocol, listener.port, listener.owners.join(", "), scope.ephemeral, scope.name
                        ),
                        vec![listener.port.to_string()],
                        Some(format!("move the service off port {} or the scope's range off it", listener.port)),
                    ));
                }
            }
            if let Some(shared) = nodeports.and_then(|n| n.intersection(&scope.ephemeral)) {
                findings.push(finding(
                    Severity::Warning,
                    "nodeport_in_scope_range",
                    format!("scope `{}`'s ephemeral range {} overlaps the NodePort range on ports {shared}", scope.name, scope.ephemeral),
                    vec![shared.to_string()],
                    Some(format!("move scope `{}` outside the NodePort range", scope.name)),
                ));
            }
        }
    }
    findings
}

fn join(ranges: &[PortRange]) -> String {
    ranges
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::{super::host_facts::Listener, *};
    use crate::policy::parse;

    fn facts() -> HostFacts {
        HostFacts {
            local_range: PortRange::new(32768, 60999),
            reserved: vec![PortRange::new(40001, 40001)],
            unprivileged_port_start: 1024,
            listeners: vec![
                Listener {
                    protocol: "tcp",
                    address: "0.0.0.0".parse().expect("ip"),
                    port: 40000,
                    owners: vec!["redis (pid 9)".into()],
                },
                Listener {
                    protocol: "tcp",
                    address: "0.0.0.0".parse().expect("ip"),
                    port: 40001,
                    owners: vec![],
                },
                Listener {
                    protocol: "udp",
                    address: "0.0.0.0".parse().expect("ip"),
                    port: 53,
                    owners: vec![],
                },
            ],
        }
    }

    fn checks(findings: &[Finding], severity: Severity) -> Vec<&'static str> {
        findings
            .iter()
            .filter(|f| f.severity == severity)
            .map(|f| f.check)
            .collect()
    }

    #[test]
    fn default_linux_range_is_sized_and_has_mixed_parity() {
        let findings = diagnose(&facts(), None, None);
        assert_eq!(checks(&findings, Severity::Ok), ["local_port_range_size"]);
        assert_eq!(
            checks(&findings, Severity::Info),
            ["local_port_range_iana", "reserved_ports"]
        );
        // Only the unreserved listener inside the range, naming its process.
        assert_eq!(
            checks(&findings, Severity::Warning),
            ["listener_in_ephemeral_range"]
        );
        let listener = findings
            .iter()
            .find(|f| f.check == "listener_in_ephemeral_range")
            .expect("finding");
        assert!(
            listener
                .message
                .contains("tcp port 40000 (redis (pid 9) on 0.0.0.0)"),
            "{}",
            listener.message
        );
        assert_eq!(
            listener.fix.as_deref(),
            Some("add 40000 to net.ipv4.ip_local_reserved_ports")
        );
    }

    #[test]
    fn small_same_parity_range_and_low_unprivileged_start_are_flagged() {
        let mut facts = facts();
        facts.local_range = PortRange::new(50000, 51000);
        facts.unprivileged_port_start = 80;
        facts.listeners.clear();
        let findings = diagnose(&facts, None, None);
        assert_eq!(
            checks(&findings, Severity::Warning),
            [
                "local_port_range_size",
                "local_port_range_parity",
                "unprivileged_port_start"
            ]
        );
    }

    #[test]
    fn nodeports_and_scopes_are_checked_against_everything() {
        let policy =
            parse("[[scope]]\nname = \"web\"\ncgroup = \"w\"\nephemeral = \"39990-40010\"\n")
                .expect("valid");
        let findings = diagnose(&facts(), Some(&policy), Some(PortRange::new(30000, 32767)));
        let warnings = checks(&findings, Severity::Warning);
        assert!(warnings.contains(&"scope_vs_host"), "{warnings:?}");
        assert_eq!(
            findings
                .iter()
                .filter(|f| f.check == "listener_in_scope_range")
                .count(),
            2
        );
        assert_eq!(
            checks(&findings, Severity::Ok),
            ["local_port_range_size", "nodeport_range"]
        );
        let low = parse("[[scope]]\nname = \"low\"\ncgroup = \"l\"\nephemeral = \"1000-1100\"\n")
            .expect("valid");
        let low_findings = diagnose(&facts(), Some(&low), None);
        let below = low_findings
            .iter()
            .find(|f| f.check == "scope_below_unprivileged_start")
            .expect("finding");
        assert_eq!(below.ports, ["1000-1023"]);
        let overlapping = diagnose(&facts(), None, Some(PortRange::new(30000, 33000)));
        let nodeport = overlapping
            .iter()
            .find(|f| f.check == "nodeport_range")
            .expect("finding");
        assert_eq!(
            (nodeport.severity, nodeport.ports.clone()),
            (Severity::Warning, vec!["32768-33000".to_owned()])
        );
    }
}
