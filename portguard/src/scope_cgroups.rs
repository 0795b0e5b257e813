//! Which scope cgroups exist right now. A scope may name a cgroup that does not exist yet (a
//! service not started); it is applied when it appears and dropped when it goes.

use std::io;

use crate::{
    cgroup::{Cgroup2Mount, cgroup_id},
    loader::{Enforcer, LoadError},
    policy::Policy,
};

pub struct ScopeCgroups {
    scopes: Vec<Tracked>,
}

struct Tracked {
    name: String,
    cgroup: String,
    scope_id: u32,
    /// The kernel id of the cgroup while it exists.
    id: Option<u64>,
}

impl ScopeCgroups {
    pub fn new(policy: &Policy, ids: &[u32]) -> Self {
        Self {
            scopes: tracked(policy, ids, &[]),
        }
    }

    /// Each scope's id and whether its cgroup exists.
    pub fn active(&self) -> impl Iterator<Item = (u32, bool)> + '_ {
        self.scopes
            .iter()
            .map(|scope| (scope.scope_id, scope.id.is_some()))
    }

    /// Brings the kernel's cgroup -> scope map in line with the cgroups that exist now.
    pub fn sync(&mut self, mount: &Cgroup2Mount, enforcer: &mut Enforcer) -> Result<(), LoadError> {
        for scope in &mut self.scopes {
            let dir = mount.dir(&scope.cgroup);
            let now = match cgroup_id(&dir) {
                Ok(id) => Some(id),
                Err(error) if error.kind() == io::ErrorKind::NotFound => None,
                Err(error) => {
                    log::warn!(
                        "scope {}: cannot read cgroup {}: {error}; keeping its last state",
                        scope.name,
                        dir.display()
                    );
                    continue;
                }
            };
            if now == scope.id {
                continue;
            }
            if let Some(old) = scope.id.take() {
                enforcer.remove_scope_cgroup(old)?;
                log::info!(
                    "scope {}: cgroup {} (id {old}) went away",
                    scope.name,
                    scope.cgroup
                );
            }
            if let Some(id) = now {
                enforcer.add_scope_cgroup(id, scope.scope_id)?;
                scope.id = Some(id);
                log::info!(
                    "scope {}: cgroup {} resolved (id {id})",
                    scope.name,
                    scope.cgroup
                );
            }
        }
        Ok(())
    }

    /// Switches to a new policy: cgroups of the new scopes are mapped (a scope kept by name
    /// keeps its entry throughout), then entries that no new scope claims are removed.
    pub fn replace(
        &mut self,
        policy: &Policy,
        ids: &[u32],
        mount: &Cgroup2Mount,
        enforcer: &mut Enforcer,
    ) -> Result<(), LoadError> {
        let new = tracked(policy, ids, &self.scopes);
        let old = std::mem::replace(&mut self.scopes, new);
        self.sync(mount, enforcer)?;
        for scope in old {
            let Some(id) = scope.id else { continue };
            if !self.scopes.iter().any(|kept| kept.id == Some(id)) {
                enforcer.remove_scope_cgroup(id)?;
                log::info!(
                    "scope {}: cgroup {} (id {id}) no longer scoped",
                    scope.name,
                    scope.cgroup
                );
            }
        }
        Ok(())
    }

    /// Logs the scopes whose cgroup does not exist (yet).
    pub fn log_missing(&self, mount: &Cgroup2Mount) {
        for scope in self.scopes.iter().filter(|scope| scope.id.is_none()) {
            log::info!(
                "scope {}: cgroup {} does not exist yet ({}); it is enforced as soon as it appears",
                scope.name,
                scope.cgroup,
                mount.dir(&scope.cgroup).display()
            );
        }
    }
}

/// The scopes of `policy` to track, keeping the resolved cgroup of any scope of `running` with
/// the same name, cgroup and id (its map entry is already right).
fn tracked(policy: &Policy, ids: &[u32], running: &[Tracked]) -> Vec<Tracked> {
    policy
        .scopes
        .iter()
        .zip(ids)
        .map(|(scope, &scope_id)| Tracked {
            name: scope.name.clone(),
            cgroup: scope.cgroup.clone(),
            scope_id,
            id: running
                .iter()
                .find(|r| {
                    r.name == scope.name && r.cgroup == scope.cgroup && r.scope_id == scope_id
                })
                .and_then(|r| r.id),
        })
        .collect()
}
