//! Which cgroups each scope selects right now, kept in the kernel's cgroup -> scope map.
//!
//! Cgroups come and go with services and containers; the watcher reports directories created
//! and removed below the attach point, and a full walk runs at start, on reload and when the
//! watcher lost track. Changes reach the kernel in an order that never leaves a selected cgroup
//! unscoped: entries are added before the walk widens to them, removed before it narrows.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use portguard_common::MAX_CGROUP_LEVEL;

use crate::{
    cgroup::{Cgroup2Mount, cgroup_id},
    loader::{Enforcer, LoadError},
    policy::{Policy, Selector},
};

pub struct ScopeCgroups {
    mount: Cgroup2Mount,
    /// Only cgroups here or below are seen by the programs, so only they are followed.
    attach_at: PathBuf,
    scopes: Vec<Selecting>,
    /// Relative path -> the mapped cgroup.
    mapped: BTreeMap<String, Mapped>,
}

struct Selecting {
    name: String,
    selector: Selector,
    scope_id: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mapped {
    cgroup_id: u64,
    scope_id: u32,
    level: u32,
}

impl ScopeCgroups {
    pub fn new(policy: &Policy, ids: &[u32], mount: Cgroup2Mount, attach_at: PathBuf) -> Self {
        Self {
            mount,
            attach_at,
            scopes: selecting(policy, ids),
            mapped: BTreeMap::new(),
        }
    }

    pub fn attach_at(&self) -> &Path {
        &self.attach_at
    }

    /// Each scope's id and the cgroups it holds now.
    pub fn held(&self) -> Vec<(u32, Vec<String>)> {
        self.scopes
            .iter()
            .map(|scope| {
                let paths = self
                    .mapped
                    .iter()
                    .filter(|(_, m)| m.scope_id == scope.scope_id)
                    .map(|(path, _)| path.clone())
                    .collect();
                (scope.scope_id, paths)
            })
            .collect()
    }

    /// Walks everything below the attach point and brings the kernel map in line with it.
    pub fn sync(&mut self, enforcer: &mut Enforcer) -> Result<(), LoadError> {
        let mut desired = BTreeMap::new();
        let unread = self.select_below(&self.attach_at.clone(), &mut desired);
        self.apply(
            desired,
            |path| !unread.iter().any(|u| under(path, Some(u))),
            enforcer,
        )
    }

    /// A directory appeared at `dir` (absolute): map it and whatever was created inside it
    /// before its watch was in place.
    pub fn created(&mut self, dir: &Path, enforcer: &mut Enforcer) -> Result<(), LoadError> {
        let mut desired = BTreeMap::new();
        let unread = self.select_below(dir, &mut desired);
        let prefix = self.relative(dir);
        self.apply(
            desired,
            |path| under(path, prefix.as_deref()) && !unread.iter().any(|u| under(path, Some(u))),
            enforcer,
        )
    }

    /// The directory at `dir` (absolute) went away, with everything below it.
    pub fn removed(&mut self, dir: &Path, enforcer: &mut Enforcer) -> Result<(), LoadError> {
        let prefix = self.relative(dir);
        self.apply(
            BTreeMap::new(),
            |path| under(path, prefix.as_deref()),
            enforcer,
        )
    }

    /// Switches to a new policy's selectors. A cgroup selected by both policies keeps its entry
    /// (updated in place if its scope id changed), so it is never unscoped in between.
    pub fn replace(
        &mut self,
        policy: &Policy,
        ids: &[u32],
        enforcer: &mut Enforcer,
    ) -> Result<(), LoadError> {
        self.scopes = selecting(policy, ids);
        self.sync(enforcer)
    }

    /// Removes entries of an adopted map that no scope of this policy selects now.
    pub fn drop_unknown(
        &mut self,
        ids: Vec<u64>,
        enforcer: &mut Enforcer,
    ) -> Result<(), LoadError> {
        for id in ids {
            if !self.mapped.values().any(|m| m.cgroup_id == id) {
                enforcer.remove_scope_cgroup(id)?;
                log::info!("cgroup id {id}: no longer scoped (left by an earlier daemon)");
            }
        }
        Ok(())
    }

    /// Logs the scopes that select no cgroup (yet).
    pub fn log_idle(&self) {
        for (scope_id, paths) in self.held() {
            if paths.is_empty() {
                let scope = self.scopes.iter().find(|s| s.scope_id == scope_id);
                if let Some(scope) = scope {
                    log::info!(
                        "scope {}: {} selects no cgroup below {} yet; it is enforced as soon as one appears",
                        scope.name,
                        scope.selector,
                        self.attach_at.display()
                    );
                }
            }
        }
    }

    /// Makes the map's entries within `in_scope` equal `desired`.
    fn apply(
        &mut self,
        desired: BTreeMap<String, Mapped>,
        in_scope: impl Fn(&str) -> bool,
        enforcer: &mut Enforcer,
    ) -> Result<(), LoadError> {
        for (path, want) in &desired {
            if self.mapped.get(path) == Some(want) {
                continue;
            }
            // A full map must not stop the daemon: that cgroup stays unscoped, loudly.
            if let Err(error) = enforcer.add_scope_cgroup(want.cgroup_id, want.scope_id) {
                log::error!("cannot scope cgroup {path}: {error}; it stays unscoped");
                continue;
            }
            let name = self.scope_name(want.scope_id);
            log::info!(
                "scope {name}: cgroup {path} (id {}) enforced",
                want.cgroup_id
            );
            // The same path with a new id is a re-created cgroup: the old id goes.
            if let Some(old) = self.mapped.insert(path.clone(), *want)
                && old.cgroup_id != want.cgroup_id
            {
                enforcer.remove_scope_cgroup(old.cgroup_id)?;
            }
        }
        // Widen first, narrow after the removals: the walk never skips a level in between.
        enforcer.widen_walk(levels(self.mapped.values()))?;
        let stale: Vec<String> = self
            .mapped
            .keys()
            .filter(|path| in_scope(path) && !desired.contains_key(*path))
            .cloned()
            .collect();
        for path in stale {
            if let Some(gone) = self.mapped.remove(&path) {
                // Another mapped path may share the id only if it is the same cgroup (cannot
                // happen for distinct paths), so removing the kernel entry is safe.
                enforcer.remove_scope_cgroup(gone.cgroup_id)?;
                log::info!(
                    "scope {}: cgroup {path} (id {}) no longer scoped",
                    self.scope_name(gone.scope_id),
                    gone.cgroup_id
                );
            }
        }
        enforcer.set_walk(levels(self.mapped.values()))
    }

    /// Adds to `desired` every cgroup at or below `dir` that a scope selects, and returns the
    /// directories (relative) it could not read: their entries must not be taken for gone.
    fn select_below(&self, dir: &Path, desired: &mut BTreeMap<String, Mapped>) -> Vec<String> {
        let mut unread = vec![];
        let mut pending = vec![dir.to_path_buf()];
        while let Some(dir) = pending.pop() {
            if let Some(relative) = self.relative(&dir)
                && let Some(scope) = self.scopes.iter().find(|s| s.selector.matches(&relative))
            {
                let level = self.mount.root_level + relative.split('/').count() as u32;
                match cgroup_id(&dir) {
                    Ok(_) if level >= MAX_CGROUP_LEVEL => log::warn!(
                        "scope {}: cgroup {relative} is {level} levels deep; at most {MAX_CGROUP_LEVEL} are followed",
                        scope.name
                    ),
                    Ok(cgroup_id) => {
                        desired.insert(
                            relative,
                            Mapped {
                                cgroup_id,
                                scope_id: scope.scope_id,
                                level,
                            },
                        );
                    }
                    Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                    Err(error) => {
                        log::warn!("cannot read cgroup {}: {error}", dir.display());
                        unread.extend(self.relative(&dir));
                    }
                }
            }
            match fs::read_dir(&dir) {
                Ok(entries) => pending.extend(
                    entries
                        .flatten()
                        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|entry| entry.path()),
                ),
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => {
                    log::warn!("cannot list cgroup {}: {error}", dir.display());
                    unread.extend(self.relative(&dir));
                }
            }
        }
        unread
    }

    /// `dir` relative to the cgroup2 mount, or None for the mount itself or a path outside it.
    fn relative(&self, dir: &Path) -> Option<String> {
        let relative = dir.strip_prefix(&self.mount.path).ok()?.to_str()?;
        (!relative.is_empty()).then(|| relative.to_owned())
    }

    fn scope_name(&self, scope_id: u32) -> &str {
        self.scopes
            .iter()
            .find(|s| s.scope_id == scope_id)
            .map_or("?", |s| s.name.as_str())
    }
}

fn selecting(policy: &Policy, ids: &[u32]) -> Vec<Selecting> {
    policy
        .scopes
        .iter()
        .zip(ids)
        .map(|(scope, &scope_id)| Selecting {
            name: scope.name.clone(),
            selector: scope.selector.clone(),
            scope_id,
        })
        .collect()
}

/// Whether `path` is `prefix` or below it; everything is below no prefix (the mount).
fn under(path: &str, prefix: Option<&str>) -> bool {
    match prefix {
        None => true,
        Some(prefix) => {
            path == prefix
                || path
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('/'))
        }
    }
}

fn levels<'a>(mapped: impl Iterator<Item = &'a Mapped>) -> Option<(u32, u32)> {
    mapped.fold(None, |acc, m| match acc {
        None => Some((m.level, m.level)),
        Some((lo, hi)) => Some((lo.min(m.level), hi.max(m.level))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_respects_component_boundaries() {
        assert!(under("a/b", Some("a")));
        assert!(under("a", Some("a")));
        assert!(!under("ab/c", Some("a")));
        assert!(under("anything", None));
    }

    #[test]
    fn levels_span_the_mapped_cgroups() {
        let m = |level| Mapped {
            cgroup_id: 1,
            scope_id: 0,
            level,
        };
        assert_eq!(levels([m(3), m(1), m(2)].iter()), Some((1, 3)));
        assert_eq!(levels([].iter()), None);
    }
}
