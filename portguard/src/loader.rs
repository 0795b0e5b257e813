//! Loading the programs, filling their maps and attaching them to a cgroup.

use std::{fs::File, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, RingBuf},
    programs::{CgroupAttachMode, Program},
};
use aya_log::EbpfLogger;
use portguard_common::{
    ALL_PROGRAMS, Config, MAP_BIND_ALLOW, MAP_CONFIG, MAP_COUNTERS, MAP_EVENTS, MAP_LOST_EVENTS,
    MAP_PORT_OWNER, MAP_RULES, MAP_SCOPE_BY_CGROUP, NO_OWNER, PortBitmap, ScopeRule,
};

use crate::{live_state::KernelStats, policy::CompiledPolicy};

/// The programs as built by `build.rs`.
pub static PROGRAMS_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portguard"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the eBPF object: {0}")]
    Object(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: String,
        source: std::io::Error,
    },
}

/// The loaded programs and their maps. Dropping it detaches every program.
pub struct Enforcer {
    ebpf: Ebpf,
    /// Port ranges written into `PORT_OWNER`, to clear when a policy replaces them.
    owned_ranges: Vec<(u16, u16)>,
    /// `CONFIG_*` flags of the policy in force.
    flags: u32,
    /// Levels of the shallowest and deepest scoped cgroup, if any.
    walk: Option<(u32, u32)>,
}

impl Enforcer {
    /// Loads every program into the kernel (the verifier runs here), without attaching any.
    /// `events_bytes` sizes the event ring buffer: a power of two, a multiple of the page size.
    pub fn load(events_bytes: u32) -> Result<Self, LoadError> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_EVENTS, events_bytes)
            .load(PROGRAMS_OBJECT)?;
        for name in ALL_PROGRAMS {
            let program = ebpf
                .program_mut(name)
                .ok_or(LoadError::MissingProgram(name))?;
            let loaded = match program {
                Program::CgroupSockAddr(program) => program.load(),
                Program::CgroupSock(program) => program.load(),
                _ => return Err(LoadError::MissingProgram(name)),
            };
            loaded.map_err(|source| LoadError::Program { name, source })?;
        }
        Ok(Self {
            ebpf,
            owned_ranges: vec![],
            flags: 0,
            walk: None,
        })
    }

    /// Writes a policy into the maps, replacing the one in force without a gap: rules and port
    /// owners of the new policy are written before anything of the old one is removed. Scope
    /// cgroups and the levels the programs walk are updated separately, as cgroups are mapped.
    pub fn apply(&mut self, policy: &CompiledPolicy) -> Result<(), LoadError> {
        // Allow lists before the rules that start using them, so a listed port is never refused.
        let mut allow: Array<_, PortBitmap> = self.map_mut(MAP_BIND_ALLOW)?;
        for (id, bitmap) in &policy.bind_allow {
            allow
                .set(*id, bitmap.as_ref(), 0)
                .map_err(map_error(MAP_BIND_ALLOW))?;
        }
        let mut rules: Array<_, ScopeRule> = self.map_mut(MAP_RULES)?;
        for (id, rule) in &policy.rules {
            rules.set(*id, rule, 0).map_err(map_error(MAP_RULES))?;
        }
        let stale = std::mem::take(&mut self.owned_ranges);
        let mut owner: Array<_, u32> = self.map_mut(MAP_PORT_OWNER)?;
        for (range, value) in &policy.port_owner {
            for port in range.lo..=range.hi {
                owner
                    .set(u32::from(port), value, 0)
                    .map_err(map_error(MAP_PORT_OWNER))?;
            }
        }
        let owned_now = |port: u16| {
            policy
                .port_owner
                .iter()
                .any(|(r, _)| r.lo <= port && port <= r.hi)
        };
        for (lo, hi) in stale {
            for port in (lo..=hi).filter(|&port| !owned_now(port)) {
                owner
                    .set(u32::from(port), NO_OWNER, 0)
                    .map_err(map_error(MAP_PORT_OWNER))?;
            }
        }
        self.owned_ranges = policy
            .port_owner
            .iter()
            .map(|(range, _)| (range.lo, range.hi))
            .collect();
        self.flags = policy.config.flags;
        self.write_config()
    }

    /// Sets the cgroup levels the programs walk: those of the shallowest and deepest cgroup
    /// mapped to a scope, or none.
    pub fn set_walk(&mut self, levels: Option<(u32, u32)>) -> Result<(), LoadError> {
        if self.walk != levels {
            self.walk = levels;
            self.write_config()?;
        }
        Ok(())
    }

    fn write_config(&mut self) -> Result<(), LoadError> {
        let config = match self.walk {
            Some((min_level, max_level)) => Config {
                min_level,
                max_level,
                flags: self.flags,
                _pad: 0,
            },
            None => Config::no_scopes(self.flags),
        };
        let mut map: Array<_, Config> = self.map_mut(MAP_CONFIG)?;
        map.set(0, config, 0).map_err(map_error(MAP_CONFIG))
    }

    /// Puts the sockets of cgroup `cgroup_id` (and its descendants) in scope `scope_id`.
    pub fn add_scope_cgroup(&mut self, cgroup_id: u64, scope_id: u32) -> Result<(), LoadError> {
        let mut scopes: HashMap<_, u64, u32> = self.map_mut(MAP_SCOPE_BY_CGROUP)?;
        scopes
            .insert(cgroup_id, scope_id, 0)
            .map_err(map_error(MAP_SCOPE_BY_CGROUP))
    }

    pub fn remove_scope_cgroup(&mut self, cgroup_id: u64) -> Result<(), LoadError> {
        let mut scopes: HashMap<_, u64, u32> = self.map_mut(MAP_SCOPE_BY_CGROUP)?;
        match scopes.remove(&cgroup_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(LoadError::Map {
                name: MAP_SCOPE_BY_CGROUP,
                source,
            }),
        }
    }

    /// Attaches every program to the cgroup at `dir`, alongside any other program there.
    pub fn attach(&mut self, dir: &Path) -> Result<(), LoadError> {
        let cgroup = File::open(dir).map_err(|source| LoadError::Cgroup {
            path: dir.display().to_string(),
            source,
        })?;
        for name in ALL_PROGRAMS {
            let program = self
                .ebpf
                .program_mut(name)
                .ok_or(LoadError::MissingProgram(name))?;
            // Single creates a BPF link, which coexists with other programs on the cgroup.
            let attached = match program {
                Program::CgroupSockAddr(program) => {
                    program.attach(&cgroup, CgroupAttachMode::Single).map(drop)
                }
                Program::CgroupSock(program) => {
                    program.attach(&cgroup, CgroupAttachMode::Single).map(drop)
                }
                _ => return Err(LoadError::MissingProgram(name)),
            };
            attached.map_err(|source| LoadError::Program { name, source })?;
        }
        Ok(())
    }

    /// The event ring buffer, for the daemon's reader.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, LoadError> {
        let map = self
            .ebpf
            .take_map(MAP_EVENTS)
            .ok_or(LoadError::MissingMap(MAP_EVENTS))?;
        RingBuf::try_from(map).map_err(map_error(MAP_EVENTS))
    }

    /// The counter maps, for the daemon's live state.
    pub fn take_stats(&mut self) -> Result<KernelStats, LoadError> {
        Ok(KernelStats {
            counters: self.take(MAP_COUNTERS)?,
            lost: self.take(MAP_LOST_EVENTS)?,
        })
    }

    /// The reader of the programs' aya-log records, which go to the daemon's log.
    pub fn take_logger(&mut self) -> Result<EbpfLogger<&'static dyn log::Log>, aya_log::Error> {
        EbpfLogger::init(&mut self.ebpf)
    }

    fn take<M>(&mut self, name: &'static str) -> Result<M, LoadError>
    where
        M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(LoadError::MissingMap(name))?;
        M::try_from(map).map_err(map_error(name))
    }

    fn map_mut<'a, M>(&'a mut self, name: &'static str) -> Result<M, LoadError>
    where
        M: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self.ebpf.map_mut(name).ok_or(LoadError::MissingMap(name))?;
        M::try_from(map).map_err(map_error(name))
    }
}

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> LoadError {
    move |source| LoadError::Map { name, source }
}

#[cfg(test)]
mod tests {
    use aya_obj::Object;

    use super::*;

    /// Without root: the embedded object holds every program and map the daemon expects, with
    /// names the kernel will not cut.
    #[test]
    fn embedded_object_has_every_program_and_map() {
        let object = Object::parse(PROGRAMS_OBJECT).expect("embedded object parses");
        for name in ALL_PROGRAMS {
            assert!(name.len() <= 15, "{name} is longer than the kernel keeps");
            assert!(object.programs.contains_key(name), "missing program {name}");
        }
        for name in portguard_common::ALL_MAPS {
            assert!(name.len() <= 15, "{name} is longer than the kernel keeps");
            assert!(object.maps.contains_key(name), "missing map {name}");
        }
    }
}
