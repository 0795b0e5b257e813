//! From a validated policy to what the kernel maps must hold.

use portguard_common::{
    CONFIG_OBSERVE, CONFIG_STRICT, Config, MAX_SCOPES, PortBitmap, RULE_AUDIT, RULE_BIND_LIST,
    RULE_SHARE, RULE_STRICT, ScopeRule,
};

use super::{Mode, Policy, PortRange};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub config: Config,
    /// Each scope's id (see `assign_ids`) and rule, in policy order.
    pub rules: Vec<(u32, ScopeRule)>,
    /// Scope id and allow list of each scope with a `bind` key.
    pub bind_allow: Vec<(u32, Box<PortBitmap>)>,
    /// Each scope's range with the value `PORT_OWNER` holds for its ports (scope id + 1).
    pub port_owner: Vec<(PortRange, u32)>,
    /// Each scope's id and name, kept with the maps so ids survive restarts.
    pub names: Vec<(u32, String)>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("the policy has {0} scopes; at most {MAX_SCOPES} are supported")]
    TooManyScopes(usize),
}

/// `ids` holds each scope's id, in policy order. The cgroup levels the programs walk depend on
/// which cgroups the selectors match, so they are set as cgroups are resolved, not here.
pub fn compile(policy: &Policy, ids: &[u32]) -> Result<CompiledPolicy, CompileError> {
    if policy.scopes.len() > MAX_SCOPES as usize {
        return Err(CompileError::TooManyScopes(policy.scopes.len()));
    }
    let observe = if policy.mode == Mode::Observe {
        CONFIG_OBSERVE
    } else {
        0
    };
    let strict = if policy.scopes.iter().any(|scope| scope.strict) {
        CONFIG_STRICT
    } else {
        0
    };
    let config = Config::no_scopes(observe | strict);
    let mut rules = vec![];
    let mut bind_allow = vec![];
    let mut port_owner = vec![];
    let mut names = vec![];
    for (scope, &id) in policy.scopes.iter().zip(ids) {
        let mut flags = 0;
        if scope.effective_mode(policy.mode) == Mode::Audit {
            flags |= RULE_AUDIT;
        }
        if scope.strict {
            flags |= RULE_STRICT;
        }
        if scope.share {
            flags |= RULE_SHARE;
        }
        if let Some(list) = &scope.bind {
            flags |= RULE_BIND_LIST;
            let mut bitmap = Box::new(PortBitmap::EMPTY);
            for range in list {
                bitmap.insert_range(range.lo, range.hi);
            }
            bind_allow.push((id, bitmap));
        }
        rules.push((
            id,
            ScopeRule {
                range_lo: scope.ephemeral.lo,
                range_hi: scope.ephemeral.hi,
                flags,
            },
        ));
        port_owner.push((scope.ephemeral, id + 1));
        names.push((id, scope.name.clone()));
    }
    Ok(CompiledPolicy {
        config,
        rules,
        bind_allow,
        port_owner,
        names,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse;

    #[test]
    fn compiles_rules_levels_and_lists() {
        let policy = parse(
            r#"
[[scope]]
name = "web"
cgroup = "system.slice/web.service"
ephemeral = "40000-40999"
bind = ["8080"]
strict = true
[[scope]]
name = "batch"
cgroup = "batch.slice/a/b"
ephemeral = "41000-41009"
mode = "audit"
share = false
"#,
        )
        .expect("valid");
        let compiled = compile(&policy, &[0, 1]).expect("compiles");
        assert_eq!(compiled.config.flags, CONFIG_STRICT, "a scope is strict");
        assert_eq!(
            compiled.rules,
            [
                (
                    0,
                    ScopeRule {
                        range_lo: 40000,
                        range_hi: 40999,
                        flags: RULE_BIND_LIST | RULE_STRICT | RULE_SHARE
                    }
                ),
                (
                    1,
                    ScopeRule {
                        range_lo: 41000,
                        range_hi: 41009,
                        flags: RULE_AUDIT
                    }
                ),
            ]
        );
        assert_eq!(compiled.bind_allow.len(), 1);
        assert!(compiled.bind_allow[0].1.contains(8080));
        assert!(!compiled.bind_allow[0].1.contains(8081));
        assert_eq!(compiled.port_owner[1], (PortRange::new(41000, 41009), 2));
    }

    #[test]
    fn no_scopes_means_an_empty_walk_and_observe_sets_the_flag() {
        let compiled = compile(&parse(crate::policy::EMBEDDED_DEFAULT).expect("valid"), &[])
            .expect("compiles");
        assert!(compiled.config.min_level > compiled.config.max_level);
        assert_eq!(compiled.config.flags, CONFIG_OBSERVE);
    }
}
