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
    /// The kernel id of the cgroup while it exists.
    id: Option<u64>,
}

impl ScopeCgroups {
    pub fn new(policy: &Policy) -> Self {
        Self {
            scopes: policy
                .scopes
                .iter()
                .map(|scope| Tracked {
                    name: scope.name.clone(),
                    cgroup: scope.cgroup.clone(),
                    id: None,
                })
                .collect(),
        }
    }

    /// Whether each scope's cgroup exists, in scope order.
    pub fn active(&self) -> impl Iterator<Item = bool> + '_ {
        self.scopes.iter().map(|scope| scope.id.is_some())
    }

    /// Brings the kernel's cgroup -> scope map in line with the cgroups that exist now.
    pub fn sync(&mut self, mount: &Cgroup2Mount, enforcer: &mut Enforcer) -> Result<(), LoadError> {
        for (scope_id, scope) in self.scopes.iter_mut().enumerate() {
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
                enforcer.add_scope_cgroup(id, scope_id as u32)?;
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
