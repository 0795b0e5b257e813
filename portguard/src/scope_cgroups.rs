//! Which cgroups each scope selects right now, kept in the kernel's cgroup -> scope map.
//!
//! Cgroups come and go with services and containers; the watcher reports directories created
//! and removed below the attach point, and a full walk runs at start, on reload and when the
//! watcher lost track. Changes reach the kernel in an order that never leaves a selected cgroup
//! unscoped: entries are added before the walk widens to them, removed before it narrows.
//!
//! A pool scope gives each cgroup it selects a block of its own: an instance with its own id,
//! rule and counters, created before the cgroup points at it and returned to the pool after the
//! cgroup is gone. No block is ever shared; when none is free the cgroup stays unscoped and the
//! pool reports it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    path::{Path, PathBuf},
};

use portguard_common::{MAX_CGROUP_LEVEL, MAX_SCOPES};

use crate::{
    cgroup::{Cgroup2Mount, cgroup_id},
    loader::{Enforcer, LoadError},
    policy::{Policy, PortRange, Selector},
};

pub struct ScopeCgroups {
    mount: Cgroup2Mount,
    /// Only cgroups here or below are seen by the programs, so only they are followed.
    attach_at: PathBuf,
    scopes: Vec<Selecting>,
    /// Relative path -> the mapped cgroup.
    mapped: BTreeMap<String, Mapped>,
    /// Paths a pool selected but had no free block for.
    exhausted: BTreeSet<String>,
    /// Instances an earlier daemon left: (cgroup id, instance id, scope name, block index).
    adopted: Vec<(u64, u32, String, u32)>,
    /// Pool exhaustions not yet reported as events: (cgroup id, pool scope id).
    unreported: Vec<(u64, u32)>,
    /// The instance id given out last (ids are handed out in rotation).
    last_id: u32,
    /// Set while a freed block is offered to waiting cgroups (one such pass at a time).
    offering: bool,
}

struct Selecting {
    name: String,
    selector: Selector,
    scope_id: u32,
    /// A pool's range and block size.
    pool: Option<(PortRange, u16)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mapped {
    cgroup_id: u64,
    /// The selecting scope.
    scope_id: u32,
    level: u32,
    /// A pool cgroup's instance id and block.
    instance: Option<(u32, PortRange)>,
}

/// What a scope's cgroups are, for status.
pub struct Held {
    pub scope_id: u32,
    pub cgroups: Vec<String>,
    /// For a pool: each cgroup's instance id and block.
    pub blocks: Vec<(String, u32, PortRange)>,
    /// For a pool: cgroups it had no block for.
    pub exhausted: Vec<String>,
}

impl ScopeCgroups {
    pub fn new(policy: &Policy, ids: &[u32], mount: Cgroup2Mount, attach_at: PathBuf) -> Self {
        Self {
            mount,
            attach_at,
            scopes: selecting(policy, ids),
            mapped: BTreeMap::new(),
            exhausted: BTreeSet::new(),
            adopted: vec![],
            unreported: vec![],
            last_id: MAX_SCOPES - 1,
            offering: false,
        }
    }

    pub fn attach_at(&self) -> &Path {
        &self.attach_at
    }

    /// Remembers the pool instances an earlier daemon left (`names` are the kept scope names by
    /// id, instances named `scope#block`), so their cgroups keep their blocks.
    pub fn adopt_instances(&mut self, entries: &[(u64, u32)], names: &[(String, u32)]) {
        for &(cgroup_id, target) in entries {
            let Some((name, _)) = names.iter().find(|(_, id)| *id == target) else {
                continue;
            };
            let Some((scope, block)) = name.split_once('#') else {
                continue;
            };
            if let Ok(block) = block.parse() {
                self.adopted
                    .push((cgroup_id, target, scope.to_owned(), block));
            }
        }
    }

    /// Pool exhaustions since the last call: (cgroup id, pool scope id).
    pub fn take_exhaustions(&mut self) -> Vec<(u64, u32)> {
        std::mem::take(&mut self.unreported)
    }

    /// Ids and names of the live pool instances (ids a reload must not give to scopes).
    pub fn instance_names(&self) -> Vec<(String, u32)> {
        self.mapped
            .values()
            .filter_map(|m| {
                let (id, block) = m.instance?;
                let scope = self.scopes.iter().find(|s| s.scope_id == m.scope_id)?;
                Some((instance_name(&scope.name, block_index(scope, block)?), id))
            })
            .collect()
    }

    /// Each scope's cgroups (and a pool's blocks) now.
    pub fn held(&self) -> Vec<Held> {
        self.scopes
            .iter()
            .map(|scope| {
                let mine: Vec<(&String, &Mapped)> = self
                    .mapped
                    .iter()
                    .filter(|(_, m)| m.scope_id == scope.scope_id)
                    .collect();
                Held {
                    scope_id: scope.scope_id,
                    cgroups: mine.iter().map(|(path, _)| (*path).clone()).collect(),
                    blocks: mine
                        .iter()
                        .filter_map(|(path, m)| {
                            m.instance.map(|(id, block)| ((*path).clone(), id, block))
                        })
                        .collect(),
                    exhausted: self
                        .exhausted
                        .iter()
                        .filter(|path| {
                            self.selecting(path)
                                .is_some_and(|s| s.scope_id == scope.scope_id)
                        })
                        .cloned()
                        .collect(),
                }
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
        entries: Vec<(u64, u32)>,
        enforcer: &mut Enforcer,
    ) -> Result<(), LoadError> {
        for (id, _) in entries {
            if !self.mapped.values().any(|m| m.cgroup_id == id) {
                enforcer.remove_scope_cgroup(id)?;
                log::info!("cgroup id {id}: no longer scoped (left by an earlier daemon)");
            }
        }
        // Adopted instances no cgroup took up again: their names go, so their ids are free.
        for (_, id, _, _) in std::mem::take(&mut self.adopted) {
            if !self
                .mapped
                .values()
                .any(|m| m.instance.is_some_and(|(i, _)| i == id))
            {
                enforcer.set_name(id, "")?;
            }
        }
        Ok(())
    }

    /// Logs the scopes that select no cgroup (yet).
    pub fn log_idle(&self) {
        for held in self.held().iter().filter(|held| held.cgroups.is_empty()) {
            if let Some(scope) = self.scopes.iter().find(|s| s.scope_id == held.scope_id) {
                log::info!(
                    "scope {}: {} selects no cgroup below {} yet; it is enforced as soon as one appears",
                    scope.name,
                    scope.selector,
                    self.attach_at.display()
                );
            }
        }
    }

    /// Makes the map's entries within `in_scope` equal `desired` (path -> selecting scope id,
    /// cgroup id, level).
    fn apply(
        &mut self,
        desired: BTreeMap<String, (u64, u32, u32)>,
        in_scope: impl Fn(&str) -> bool,
        enforcer: &mut Enforcer,
    ) -> Result<(), LoadError> {
        let mut released_any = false;
        for (path, &(cgroup_id, scope_id, level)) in &desired {
            let Some(scope) = self.scopes.iter().find(|s| s.scope_id == scope_id) else {
                continue;
            };
            let pool = scope.pool;
            let name = scope.name.clone();
            let current = self.mapped.get(path).copied();
            let same_shape = |m: &Mapped| match (m.instance, pool) {
                (None, None) => true,
                (Some((_, block)), Some(_)) => block_index(scope, block).is_some(),
                _ => false,
            };
            if current.is_some_and(|m| {
                m.cgroup_id == cgroup_id && m.scope_id == scope_id && same_shape(&m)
            }) {
                continue;
            }
            let instance = match pool {
                None => None,
                Some(pool) => {
                    match self.new_instance(&name, scope_id, pool, cgroup_id, enforcer)? {
                        Some(instance) => Some(instance),
                        None => {
                            if self.exhausted.insert(path.clone()) {
                                self.unreported.push((cgroup_id, scope_id));
                                log::error!(
                                    "scope {name}: pool {} exhausted: cgroup {path} has no block and stays unscoped",
                                    pool.0
                                );
                            }
                            // A block that no longer fits its (reloaded) pool is not kept.
                            if let Some(stale) = self.mapped.remove(path) {
                                enforcer.remove_scope_cgroup(stale.cgroup_id)?;
                                self.release(&stale, enforcer)?;
                            }
                            continue;
                        }
                    }
                }
            };
            self.exhausted.remove(path);
            let target = instance.map_or(scope_id, |(id, _)| id);
            // A full map must not stop the daemon: that cgroup stays unscoped, loudly.
            if let Err(error) = enforcer.add_scope_cgroup(cgroup_id, target) {
                log::error!("cannot scope cgroup {path}: {error}; it stays unscoped");
                if let Some((id, block)) = instance {
                    let live = self.live_blocks(id);
                    enforcer.release_instance(id, block, &live)?;
                }
                continue;
            }
            match instance {
                Some((id, block)) => log::info!(
                    "scope {name}: cgroup {path} (id {cgroup_id}) enforced with block {block} (instance {id})"
                ),
                None => log::info!("scope {name}: cgroup {path} (id {cgroup_id}) enforced"),
            }
            let mapped = Mapped {
                cgroup_id,
                scope_id,
                level,
                instance,
            };
            if let Some(old) = self.mapped.insert(path.clone(), mapped) {
                // The same path with a new id is a re-created cgroup: the old id goes.
                if old.cgroup_id != cgroup_id {
                    enforcer.remove_scope_cgroup(old.cgroup_id)?;
                }
                released_any |= self.release(&old, enforcer)?;
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
                enforcer.remove_scope_cgroup(gone.cgroup_id)?;
                released_any |= self.release(&gone, enforcer)?;
                log::info!(
                    "scope {}: cgroup {path} (id {}) no longer scoped",
                    self.scope_name(gone.scope_id),
                    gone.cgroup_id
                );
            }
        }
        self.exhausted
            .retain(|path| !in_scope(path) || desired.contains_key(path));
        enforcer.set_walk(levels(self.mapped.values()))?;
        // A block came free: cgroups waiting for one get it now.
        // One pass at a time: the pass itself may free no further block for anyone.
        if released_any && !self.exhausted.is_empty() && !self.offering {
            self.offering = true;
            let offered = self.sync(enforcer);
            self.offering = false;
            return offered;
        }
        Ok(())
    }

    /// A block and an instance id for a cgroup of pool scope `scope_id`, or None when the pool
    /// is full. An instance an earlier daemon gave this cgroup is kept.
    fn new_instance(
        &mut self,
        name: &str,
        scope_id: u32,
        (range, size): (PortRange, u16),
        cgroup_id: u64,
        enforcer: &mut Enforcer,
    ) -> Result<Option<(u32, PortRange)>, LoadError> {
        let blocks = range.len() / u32::from(size);
        let block_at = |index: u32| {
            let lo = range.lo as u32 + index * u32::from(size);
            PortRange::new(lo as u16, (lo + u32::from(size) - 1) as u16)
        };
        // Taken: any live block that overlaps, whatever its scope (a reload may have renamed
        // or resized a pool), and blocks an earlier daemon gave cgroups not yet seen again.
        let mut taken: Vec<PortRange> = self
            .mapped
            .values()
            .filter_map(|m| m.instance.map(|(_, b)| b))
            .collect();
        taken.extend(
            self.adopted
                .iter()
                .filter(|(cgroup, _, scope, _)| scope == name && *cgroup != cgroup_id)
                .filter(|(_, _, _, block)| *block < blocks)
                .map(|(_, _, _, block)| block_at(*block)),
        );
        let free = |index: u32| {
            let candidate = block_at(index);
            !taken.iter().any(|t| t.intersection(&candidate).is_some())
        };
        let adopted = self
            .adopted
            .iter()
            .find(|(cgroup, _, scope, block)| {
                *cgroup == cgroup_id && scope == name && *block < blocks
            })
            .map(|(_, id, _, block)| (*id, *block))
            .filter(|(_, block)| {
                let candidate = block_at(*block);
                !self
                    .mapped
                    .values()
                    .filter_map(|m| m.instance.map(|(_, b)| b))
                    .any(|b| b.intersection(&candidate).is_some())
            });
        let (id, index, fresh) = match adopted {
            Some((id, index)) => (id, index, false),
            None => {
                let Some(index) = (0..blocks).find(|b| free(*b)) else {
                    return Ok(None);
                };
                let Some(id) = self.free_id() else {
                    log::error!(
                        "scope {name}: no free id for another pool instance (at most {MAX_SCOPES})"
                    );
                    return Ok(None);
                };
                (id, index, true)
            }
        };
        let block = block_at(index);
        if fresh {
            enforcer.reset_counters(id)?;
        }
        enforcer.instantiate(scope_id, id, block, &instance_name(name, index))?;
        Ok(Some((id, block)))
    }

    /// Returns a mapping's block to its pool; true if there was one.
    fn release(&self, gone: &Mapped, enforcer: &mut Enforcer) -> Result<bool, LoadError> {
        let Some((id, block)) = gone.instance else {
            return Ok(false);
        };
        let live = self.live_blocks(id);
        enforcer.release_instance(id, block, &live)?;
        Ok(true)
    }

    /// The blocks live instances other than `except` hold.
    fn live_blocks(&self, except: u32) -> Vec<PortRange> {
        self.mapped
            .values()
            .filter_map(|m| m.instance)
            .filter(|(id, _)| *id != except)
            .map(|(_, block)| block)
            .collect()
    }

    /// Rewrites every live instance from its pool's rule: after a reload the pool's flags or
    /// allow list may have changed, and the policy's port owners were written over the blocks.
    pub fn refresh_instances(&self, enforcer: &mut Enforcer) -> Result<(), LoadError> {
        for mapped in self.mapped.values() {
            let Some((id, block)) = mapped.instance else {
                continue;
            };
            let Some(scope) = self.scopes.iter().find(|s| s.scope_id == mapped.scope_id) else {
                continue;
            };
            let Some(index) = block_index(scope, block) else {
                continue;
            };
            enforcer.instantiate(
                mapped.scope_id,
                id,
                block,
                &instance_name(&scope.name, index),
            )?;
        }
        Ok(())
    }

    /// The lowest id no scope, instance or adopted instance uses.
    /// An id no scope, mapping, instance or adopted instance uses, taken in rotation so that a
    /// released id (whose sockets may still be closing) is not reused at once.
    fn free_id(&mut self) -> Option<u32> {
        let free = (1..=MAX_SCOPES)
            .map(|step| (self.last_id + step) % MAX_SCOPES)
            .find(|id| {
                !self.scopes.iter().any(|s| s.scope_id == *id)
                    && !self
                        .mapped
                        .values()
                        .any(|m| m.scope_id == *id || m.instance.is_some_and(|(i, _)| i == *id))
                    && !self.adopted.iter().any(|(_, i, _, _)| i == id)
            })?;
        self.last_id = free;
        Some(free)
    }

    fn selecting(&self, relative: &str) -> Option<&Selecting> {
        self.scopes.iter().find(|s| s.selector.matches(relative))
    }

    /// Adds to `desired` every cgroup at or below `dir` that a scope selects, and returns the
    /// directories (relative) it could not read: their entries must not be taken for gone.
    fn select_below(
        &self,
        dir: &Path,
        desired: &mut BTreeMap<String, (u64, u32, u32)>,
    ) -> Vec<String> {
        let mut unread = vec![];
        let mut pending = vec![dir.to_path_buf()];
        while let Some(dir) = pending.pop() {
            if let Some(relative) = self.relative(&dir)
                && let Some(scope) = self.selecting(&relative)
            {
                let level = self.mount.root_level + relative.split('/').count() as u32;
                match cgroup_id(&dir) {
                    Ok(_) if level >= MAX_CGROUP_LEVEL => log::warn!(
                        "scope {}: cgroup {relative} is {level} levels deep; at most {MAX_CGROUP_LEVEL} are followed",
                        scope.name
                    ),
                    Ok(cgroup_id) => {
                        desired.insert(relative, (cgroup_id, scope.scope_id, level));
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
            pool: scope.block.map(|block| (scope.ephemeral, block)),
        })
        .collect()
}

/// How an instance is named in `SCOPE_NAMES`, so that an adopting daemon finds its block.
fn instance_name(scope: &str, block: u32) -> String {
    format!("{scope}#{block}")
}

/// The block's index in its scope's pool, or None when it is not a block of that pool (a reload
/// moved or resized it).
fn block_index(scope: &Selecting, block: PortRange) -> Option<u32> {
    let (range, size) = scope.pool?;
    let offset = u32::from(block.lo).checked_sub(u32::from(range.lo))?;
    (offset % u32::from(size) == 0 && block.hi <= range.hi && block.len() == u32::from(size))
        .then(|| offset / u32::from(size))
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
            instance: None,
        };
        assert_eq!(levels([m(3), m(1), m(2)].iter()), Some((1, 3)));
        assert_eq!(levels([].iter()), None);
    }
}
