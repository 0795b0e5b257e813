//! Loading the programs, filling their maps and attaching them to a cgroup.

use std::{
    fs::{self, File},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        CgroupAttachMode, Program,
        links::{FdLink, PinnedLink},
    },
};
use aya_log::EbpfLogger;
use portguard_common::{
    ALL_MAPS, ALL_PROGRAMS, Config, MAP_BIND_ALLOW, MAP_CONFIG, MAP_COUNTERS, MAP_EVENTS,
    MAP_LOST_EVENTS, MAP_PORT_OWNER, MAP_PORT_SECRET, MAP_RESERVED, MAP_RULES, MAP_SCOPE_BY_CGROUP,
    MAP_SCOPE_NAMES, MAX_SCOPES, NO_OWNER, PortBitmap, SCOPE_NAME_BYTES, ScopeRule,
};

use crate::{
    live_state::KernelStats,
    pins,
    policy::{CompiledPolicy, PortRange},
};

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
    #[error("link of {name}: {source}")]
    Link {
        name: &'static str,
        source: aya::programs::links::LinkError,
    },
    #[error("pin {path}: {source}")]
    Pin {
        path: String,
        source: std::io::Error,
    },
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: String,
        source: std::io::Error,
    },
    #[error("drawing the port hash key from getrandom(2): {0}")]
    Random(std::io::Error),
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
    /// Whether the maps were pinned by an earlier daemon.
    adopted: bool,
    /// Where the maps are pinned (the counters are reopened from there to reset them).
    pins: PathBuf,
    /// The port owners of the policy in force (ranges and scope id + 1).
    policy_owners: Vec<(PortRange, u32)>,
}

impl Enforcer {
    /// Loads every program into the kernel (the verifier runs here), without attaching any.
    /// `events_bytes` sizes the event ring buffer: a power of two, a multiple of the page size.
    ///
    /// Maps are pinned in `pins` (a bpffs directory): existing pins are adopted, with the state
    /// an earlier daemon left in them.
    pub fn load(events_bytes: u32, pins: &Path) -> Result<Self, LoadError> {
        // Any pinned map means state to adopt (aya reuses every pin it finds).
        let adopted = ALL_MAPS.iter().any(|map| pins.join(map).exists());
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pins)
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
            // How close each program is to the verifier's limit of 1,000,000 instructions.
            if let Some(count) = program
                .info()
                .ok()
                .and_then(|info| info.verified_instruction_count())
            {
                log::debug!("program {name}: the verifier processed {count} instructions");
            }
        }
        let mut enforcer = Self {
            ebpf,
            owned_ranges: vec![],
            flags: 0,
            walk: None,
            adopted,
            pins: pins.to_owned(),
            policy_owners: vec![],
        };
        if adopted {
            enforcer.owned_ranges = enforcer.owned_port_ranges()?;
            // The earlier daemon's programs still run on these maps: until this daemon has
            // mapped its cgroups, the walk they use must stay as it was, or scoped sockets
            // would briefly look unscoped.
            let config: Array<&MapData, Config> = enforcer.map(MAP_CONFIG)?;
            let running = config.get(&0, 0).map_err(map_error(MAP_CONFIG))?;
            enforcer.flags = running.flags;
            enforcer.walk = (running.min_level <= running.max_level)
                .then_some((running.min_level, running.max_level));
        }
        enforcer.ensure_port_secret()?;
        Ok(enforcer)
    }

    /// Gives the destination hash of shared ports its random key, once per set of maps: an
    /// adopted key is kept, so a restart does not reshuffle where destinations start.
    fn ensure_port_secret(&mut self) -> Result<(), LoadError> {
        let mut secret: Array<_, [u64; 2]> = self.map_mut(MAP_PORT_SECRET)?;
        if secret.get(&0, 0).map_err(map_error(MAP_PORT_SECRET))? != [0, 0] {
            return Ok(());
        }
        let mut key = [0u64; 2];
        // SAFETY: the buffer is `key`, 16 writable bytes.
        let got = unsafe { libc::getrandom(key.as_mut_ptr().cast(), size_of_val(&key), 0) };
        if got != size_of_val(&key) as isize {
            return Err(LoadError::Random(std::io::Error::last_os_error()));
        }
        secret.set(0, key, 0).map_err(map_error(MAP_PORT_SECRET))
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
        let mut names: Array<_, [u8; SCOPE_NAME_BYTES]> = self.map_mut(MAP_SCOPE_NAMES)?;
        for (id, name) in &policy.names {
            let mut bytes = [0u8; SCOPE_NAME_BYTES];
            let len = name.len().min(SCOPE_NAME_BYTES);
            bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
            names
                .set(*id, bytes, 0)
                .map_err(map_error(MAP_SCOPE_NAMES))?;
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
        self.policy_owners = policy.port_owner.clone();
        self.owned_ranges = policy
            .port_owner
            .iter()
            .map(|(range, _)| (range.lo, range.hi))
            .collect();
        self.flags = policy.config.flags;
        self.write_config()
    }

    /// Widens the cgroup levels the programs walk to cover `levels` as well. Used before
    /// narrowing, so that a walk change never passes through one covering neither (a program
    /// may read the value half-written).
    pub fn widen_walk(&mut self, levels: Option<(u32, u32)>) -> Result<(), LoadError> {
        let wider = match (self.walk, levels) {
            (Some((lo, hi)), Some((new_lo, new_hi))) => Some((lo.min(new_lo), hi.max(new_hi))),
            (walk, None) => walk,
            (None, levels) => levels,
        };
        self.set_walk(wider)
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

    /// Attaches every program to the cgroup at `dir`, alongside any other program there, and pins
    /// each link in `pins` so that enforcement outlives the daemon.
    ///
    /// A link an earlier daemon pinned for the same program at the same cgroup is taken over in
    /// place: the kernel swaps the new program into it (BPF_LINK_UPDATE) atomically for the
    /// hook, so no call goes unjudged and none is judged by both (had the two run side by side,
    /// a bind(0) steered by one would be judged again by the other as an explicit bind).
    ///
    /// The other programs get new links, all or nothing: every one is attached before any is
    /// pinned, so if the kernel refuses one (another tool's program attached there without
    /// `BPF_F_ALLOW_MULTI`) or the daemon dies meanwhile, they close with it and no hook is left
    /// enforcing without the others. Earlier links those replace (at another cgroup, say) are
    /// detached only after the new ones are pinned. Returns how many earlier links were replaced
    /// or taken over.
    pub fn attach(&mut self, dir: &Path, pins: &Path) -> Result<usize, LoadError> {
        let cgroup = File::open(dir).map_err(|source| LoadError::Cgroup {
            path: dir.display().to_string(),
            source,
        })?;
        let cgroup_id = crate::cgroup::cgroup_id(dir).map_err(|source| LoadError::Cgroup {
            path: dir.display().to_string(),
            source,
        })?;
        // Read before staging: the staged pins of this attempt are named like a crashed
        // daemon's.
        let mut earlier = vec![];
        let mut in_place = vec![];
        for name in ALL_PROGRAMS {
            let links = pins::earlier_links(pins, name)?;
            in_place.push(
                links
                    .iter()
                    .find_map(|(path, _)| match pins::link_cgroup(path) {
                        Ok((link, Some(id))) if id == cgroup_id => Some((path.clone(), link)),
                        _ => None,
                    }),
            );
            earlier.push(links);
        }
        let mut links = vec![];
        for (name, taken_over) in ALL_PROGRAMS.into_iter().zip(&in_place) {
            if taken_over.is_none() {
                // On an error the links attached so far are dropped, which detaches them.
                links.push((name, self.attach_link(name, &cgroup)?));
            }
        }
        let mut staged: Vec<(&str, PathBuf, PinnedLink)> = vec![];
        let unstage = |staged: Vec<(&str, PathBuf, PinnedLink)>| {
            for (_, path, pinned) in staged {
                if let Err(error) = pinned.unpin() {
                    log::warn!("cannot remove the staged link {}: {error}", path.display());
                }
            }
        };
        for (name, link) in links {
            // bpffs refuses names with a dot.
            let path = pins.join(format!("link_{name}_staged_{}", pins::staging_suffix()));
            match link.pin(&path) {
                Ok(pinned) => staged.push((name, path, pinned)),
                Err(source) => {
                    unstage(staged);
                    return Err(LoadError::Pin {
                        path: path.display().to_string(),
                        source: std::io::Error::other(source),
                    });
                }
            }
        }
        for (name, taken_over) in ALL_PROGRAMS.into_iter().zip(&in_place) {
            let Some((path, link)) = taken_over else {
                continue;
            };
            let updated = self
                .ebpf
                .program(name)
                .ok_or(LoadError::MissingProgram(name))
                .and_then(|program| {
                    program
                        .fd()
                        .map_err(|source| LoadError::Program { name, source })
                })
                .and_then(|program| {
                    pins::update_link(link.as_fd(), program.as_fd()).map_err(|source| {
                        LoadError::Pin {
                            path: path.display().to_string(),
                            source,
                        }
                    })
                });
            if let Err(error) = updated {
                unstage(staged);
                return Err(error);
            }
        }
        let mut replaced = 0;
        let mut staged = staged.into_iter().peekable();
        for ((name, earlier), taken_over) in ALL_PROGRAMS.into_iter().zip(earlier).zip(in_place) {
            let final_path = pins.join(format!("link_{name}"));
            let kept = match taken_over {
                Some((path, _)) => path,
                None => {
                    let (_, path, _) = staged
                        .next_if(|(staged_name, ..)| *staged_name == name)
                        .ok_or(LoadError::MissingProgram(name))?;
                    path
                }
            };
            // Unpinning keeps each earlier link attached until its fd closes at the end of
            // this iteration, after the new one is in place.
            let mut detach = vec![];
            for (path, link) in earlier {
                replaced += 1;
                if path == kept {
                    continue;
                }
                detach.push(link.unpin().map_err(|source| LoadError::Pin {
                    path: path.display().to_string(),
                    source,
                })?);
            }
            if kept != final_path {
                fs::rename(&kept, &final_path).map_err(|source| LoadError::Pin {
                    path: final_path.display().to_string(),
                    source,
                })?;
            }
            drop(detach);
        }
        Ok(replaced)
    }

    /// Attaches program `name` at `cgroup` as a BPF link, held only by the returned descriptor.
    fn attach_link(&mut self, name: &'static str, cgroup: &File) -> Result<FdLink, LoadError> {
        let program = self
            .ebpf
            .program_mut(name)
            .ok_or(LoadError::MissingProgram(name))?;
        // Single creates a BPF link, which coexists with other programs on the cgroup. The two
        // program types share no trait for this, hence the macro.
        macro_rules! attach_single {
            ($program:expr) => {{
                let id = $program
                    .attach(cgroup, CgroupAttachMode::Single)
                    .map_err(|source| LoadError::Program { name, source })?;
                let link = $program
                    .take_link(id)
                    .map_err(|source| LoadError::Program { name, source })?;
                link.try_into()
                    .map_err(|source| LoadError::Link { name, source })
            }};
        }
        match program {
            Program::CgroupSockAddr(program) => attach_single!(program),
            Program::CgroupSock(program) => attach_single!(program),
            _ => Err(LoadError::MissingProgram(name)),
        }
    }

    /// Gives cgroup instance `instance` of pool scope `pool` its own block: the pool's rule and
    /// allow list with the block as range, the block's ports owned by the instance. Written
    /// before any cgroup points at the instance.
    pub fn instantiate(
        &mut self,
        pool: u32,
        instance: u32,
        block: PortRange,
        name: &str,
    ) -> Result<(), LoadError> {
        let rules: Array<_, ScopeRule> = self.map_mut(MAP_RULES)?;
        let mut rule = rules.get(&pool, 0).map_err(map_error(MAP_RULES))?;
        rule.range_lo = block.lo;
        rule.range_hi = block.hi;
        let mut allow: Array<_, PortBitmap> = self.map_mut(MAP_BIND_ALLOW)?;
        let list = allow.get(&pool, 0).map_err(map_error(MAP_BIND_ALLOW))?;
        allow
            .set(instance, list, 0)
            .map_err(map_error(MAP_BIND_ALLOW))?;
        let mut rules: Array<_, ScopeRule> = self.map_mut(MAP_RULES)?;
        rules.set(instance, rule, 0).map_err(map_error(MAP_RULES))?;
        self.set_name(instance, name)?;
        self.set_port_owner(block, instance + 1)
    }

    /// Returns an instance's block after no cgroup points at it: each port goes back to the
    /// owner the policy in force gives it (its pool, another scope, or nobody), except ports of
    /// `live` blocks, which other instances hold.
    pub fn release_instance(
        &mut self,
        instance: u32,
        block: PortRange,
        live: &[PortRange],
    ) -> Result<(), LoadError> {
        let owners = self.policy_owners.clone();
        let mut map: Array<_, u32> = self.map_mut(MAP_PORT_OWNER)?;
        for port in block.lo..=block.hi {
            if live.iter().any(|r| r.lo <= port && port <= r.hi) {
                continue;
            }
            let owner = owners
                .iter()
                .find(|(range, _)| range.lo <= port && port <= range.hi)
                .map_or(NO_OWNER, |(_, owner)| *owner);
            map.set(u32::from(port), owner, 0)
                .map_err(map_error(MAP_PORT_OWNER))?;
        }
        self.set_name(instance, "")
    }

    /// Zeroes the counters of `id`, before it is given to a new scope or instance.
    pub fn reset_counters(&mut self, id: u32) -> Result<(), LoadError> {
        let data =
            MapData::from_pin(self.pins.join(MAP_COUNTERS)).map_err(map_error(MAP_COUNTERS))?;
        let mut stats = KernelStats {
            counters: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
                .map_err(map_error(MAP_COUNTERS))?,
            lost: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(
                MapData::from_pin(self.pins.join(MAP_LOST_EVENTS))
                    .map_err(map_error(MAP_LOST_EVENTS))?,
            ))
            .map_err(map_error(MAP_LOST_EVENTS))?,
        };
        stats.reset(id);
        Ok(())
    }

    fn set_port_owner(&mut self, range: PortRange, value: u32) -> Result<(), LoadError> {
        let mut owner: Array<_, u32> = self.map_mut(MAP_PORT_OWNER)?;
        for port in range.lo..=range.hi {
            owner
                .set(u32::from(port), value, 0)
                .map_err(map_error(MAP_PORT_OWNER))?;
        }
        Ok(())
    }

    pub fn set_name(&mut self, id: u32, name: &str) -> Result<(), LoadError> {
        let mut bytes = [0u8; SCOPE_NAME_BYTES];
        let len = name.len().min(SCOPE_NAME_BYTES);
        bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
        let mut names: Array<_, [u8; SCOPE_NAME_BYTES]> = self.map_mut(MAP_SCOPE_NAMES)?;
        names.set(id, bytes, 0).map_err(map_error(MAP_SCOPE_NAMES))
    }

    /// The ports portguard reserved in the sysctl, as recorded in the pinned map.
    pub fn reserved(&self) -> Result<PortBitmap, LoadError> {
        let map: Array<&MapData, PortBitmap> = self.map(MAP_RESERVED)?;
        map.get(&0, 0).map_err(map_error(MAP_RESERVED))
    }

    pub fn set_reserved(&mut self, ports: &PortBitmap) -> Result<(), LoadError> {
        let mut map: Array<_, PortBitmap> = self.map_mut(MAP_RESERVED)?;
        map.set(0, ports, 0).map_err(map_error(MAP_RESERVED))
    }

    /// Whether the maps were adopted from an earlier daemon.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The scope names an earlier daemon kept, by id.
    pub fn kept_scope_names(&self) -> Result<Vec<(String, u32)>, LoadError> {
        let map: Array<&MapData, [u8; SCOPE_NAME_BYTES]> = self.map(MAP_SCOPE_NAMES)?;
        let mut names = vec![];
        for id in 0..MAX_SCOPES {
            let bytes = map.get(&id, 0).map_err(map_error(MAP_SCOPE_NAMES))?;
            let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            if len > 0 {
                names.push((String::from_utf8_lossy(&bytes[..len]).into_owned(), id));
            }
        }
        Ok(names)
    }

    /// The kernel's cgroup -> scope map (to reconcile an adopted map).
    pub fn scoped_cgroups(&self) -> Result<Vec<(u64, u32)>, LoadError> {
        let map: HashMap<&MapData, u64, u32> = self.map(MAP_SCOPE_BY_CGROUP)?;
        map.iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_error(MAP_SCOPE_BY_CGROUP))
    }

    /// The port ranges `PORT_OWNER` assigns now, read back from an adopted map.
    fn owned_port_ranges(&self) -> Result<Vec<(u16, u16)>, LoadError> {
        let map: Array<&MapData, u32> = self.map(MAP_PORT_OWNER)?;
        let mut ranges: Vec<(u16, u16)> = vec![];
        for port in 1..=u16::MAX {
            if map
                .get(&u32::from(port), 0)
                .map_err(map_error(MAP_PORT_OWNER))?
                == NO_OWNER
            {
                continue;
            }
            match ranges.last_mut() {
                Some((_, hi)) if *hi + 1 == port => *hi = port,
                _ => ranges.push((port, port)),
            }
        }
        Ok(ranges)
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

    fn map<'a, M>(&'a self, name: &'static str) -> Result<M, LoadError>
    where
        M: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self.ebpf.map(name).ok_or(LoadError::MissingMap(name))?;
        M::try_from(map).map_err(map_error(name))
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

pub(crate) fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> LoadError {
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
