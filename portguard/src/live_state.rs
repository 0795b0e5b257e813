//! What the daemon knows right now: counters from the kernel, peaks, recent events, followers.
//! Shared between the event reader and the control socket; never held across an await.
//!
//! Events are kept as the kernel's fixed-size records and decoded only when someone reads them,
//! so the reader's cost per event stays a copy, whatever the rate.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{MapData, PerCpuArray, PerCpuValues};
use portguard_common::{AF_INET, Counters, Event, NO_SCOPE, OP_BIND, UNSCOPED_COUNTERS};
use tokio::sync::broadcast;

use crate::{
    event_log::{op_name, protocol_name, verdict_name},
    policy::{Mode, Policy, PortRange},
    protocol::{
        BlockStatus, EventRecord, LastReload, PROTOCOL_VERSION, ScopeCounters, ScopeStatus, Status,
    },
    scope_cgroups::Held,
};

/// Recent events kept for `portguard events`; memory stays bounded whatever the event rate.
pub const HISTORY: usize = 4096;
/// Events a slow follower may fall behind before it is told it lost some.
const FOLLOWER_BACKLOG: usize = 4096;
/// How often the event reader folds the kernel's holdings into the peaks, at most (a clock and
/// status requests do too).
const PEAK_REFRESH: Duration = Duration::from_millis(100);

/// The kernel's per-CPU counter maps, taken out of the loaded object.
pub struct KernelStats {
    pub counters: PerCpuArray<MapData, Counters>,
    pub lost: PerCpuArray<MapData, u64>,
}

impl KernelStats {
    pub fn counters(&self, row: u32) -> Result<Counters, aya::maps::MapError> {
        let mut total = Counters::default();
        for counters in self.counters.get(&row, 0)?.iter() {
            total.add(counters);
        }
        Ok(total)
    }

    pub fn lost_events(&self) -> Result<u64, aya::maps::MapError> {
        Ok(self.lost.get(&0, 0)?.iter().sum())
    }

    /// Zeroes a scope's counters, for an id given to a new scope.
    pub fn reset(&mut self, row: u32) {
        let zeros = aya::util::nr_cpus()
            .map_err(|(_, error)| error.to_string())
            .and_then(|cpus| {
                PerCpuValues::try_from(vec![Counters::default(); cpus]).map_err(|e| e.to_string())
            });
        let result = zeros.and_then(|zeros| {
            self.counters
                .set(row, zeros, 0)
                .map_err(|error| error.to_string())
        });
        if let Err(error) = result {
            log::warn!("cannot reset the counters of scope id {row}: {error}");
        }
    }
}

/// An event as received: the kernel's record and when the daemon read it.
#[derive(Clone, Copy, Debug)]
pub struct Received {
    pub event: Event,
    pub at: SystemTime,
}

/// What followers receive: the event and the scope names in force when it was recorded.
pub type Followed = (Received, ScopeNames);

struct ScopeLive {
    id: u32,
    name: String,
    cgroup: String,
    mode: Mode,
    range: [u16; 2],
    /// The cgroups the scope holds now, a pool's blocks, and what a full pool left out.
    held: Vec<String>,
    blocks: Vec<(String, u32, PortRange)>,
    exhausted: Vec<String>,
    /// With a pool: the block size.
    block: Option<u16>,
    peak: u64,
}

/// Scope names by id, shared with followers so they can decode events on their own.
pub type ScopeNames = Arc<HashMap<u32, String>>;

/// How the last reload went, for `status`.
#[derive(Clone, Debug)]
pub struct ReloadOutcome {
    pub at: Instant,
    pub error: Option<String>,
}

pub struct LiveState {
    started: Instant,
    policy_name: String,
    mode: Mode,
    scopes: Vec<ScopeLive>,
    names: ScopeNames,
    stats: KernelStats,
    history: VecDeque<Received>,
    followers: broadcast::Sender<Followed>,
    peaks_refreshed: Instant,
    last_reload: Option<ReloadOutcome>,
    /// When the last event of each scope or pool instance id arrived.
    last_event: HashMap<u32, Instant>,
    /// Records read from the kernel's ring buffer since start.
    received: u64,
}

impl LiveState {
    pub fn new(policy_name: String, policy: &Policy, ids: &[u32], stats: KernelStats) -> Self {
        let mut state = Self {
            started: Instant::now(),
            policy_name: String::new(),
            mode: policy.mode,
            scopes: vec![],
            names: Arc::default(),
            stats,
            history: VecDeque::with_capacity(HISTORY),
            followers: broadcast::channel(FOLLOWER_BACKLOG).0,
            peaks_refreshed: Instant::now(),
            last_reload: None,
            last_event: HashMap::new(),
            received: 0,
        };
        // At start the counters are either fresh or adopted from an earlier daemon: keep them.
        state.replace_policy(policy_name, policy, ids);
        state
    }

    /// Zeroes the counters of ids that no running scope has: called before a new policy's
    /// rules go live, so a scope given a reused id starts from zero and keeps its first counts.
    pub fn reset_new_ids(&mut self, ids: &[u32]) {
        for &id in ids {
            if !self.scopes.iter().any(|scope| scope.id == id) {
                self.stats.reset(id);
                self.last_event.remove(&id);
            }
        }
    }

    /// Switches to a new policy: scopes kept by name keep their peak and last event. (Counters of
    /// ids new to the running policy were zeroed before its rules went live: `reset_new_ids`.)
    pub fn replace_policy(&mut self, policy_name: String, policy: &Policy, ids: &[u32]) {
        let old = std::mem::take(&mut self.scopes);
        for (scope, &id) in policy.scopes.iter().zip(ids) {
            let kept = old.iter().find(|o| o.id == id);
            self.scopes.push(ScopeLive {
                id,
                name: scope.name.clone(),
                cgroup: scope.selector.label(),
                mode: scope.effective_mode(policy.mode),
                range: [scope.ephemeral.lo, scope.ephemeral.hi],
                held: kept.map_or_else(Vec::new, |k| k.held.clone()),
                blocks: kept.map_or_else(Vec::new, |k| k.blocks.clone()),
                exhausted: kept.map_or_else(Vec::new, |k| k.exhausted.clone()),
                block: scope.block,
                peak: kept.map_or(0, |k| k.peak),
            });
        }
        // Old names stay known so that events already recorded still decode.
        let mut names: HashMap<u32, String> = (*self.names).clone();
        names.extend(self.scopes.iter().map(|s| (s.id, s.name.clone())));
        self.names = Arc::new(names);
        self.policy_name = policy_name;
        self.mode = policy.mode;
    }

    pub fn set_reload(&mut self, outcome: ReloadOutcome) {
        self.last_reload = Some(outcome);
    }

    pub fn has_scope(&self, name: &str) -> bool {
        self.scopes.iter().any(|scope| scope.name == name)
    }

    pub fn names(&self) -> ScopeNames {
        self.names.clone()
    }

    pub fn set_held(&mut self, held: Held) {
        let Some(scope) = self.scopes.iter_mut().find(|s| s.id == held.scope_id) else {
            return;
        };
        // Events of a pool's instances carry the instance id: decode them to the pool's name.
        let missing: Vec<u32> = held
            .blocks
            .iter()
            .map(|(_, id, _)| *id)
            .filter(|id| self.names.get(id) != Some(&scope.name))
            .collect();
        if !missing.is_empty() {
            let mut names = (*self.names).clone();
            names.extend(missing.into_iter().map(|id| (id, scope.name.clone())));
            self.names = Arc::new(names);
        }
        scope.held = held.cgroups;
        scope.blocks = held.blocks;
        scope.exhausted = held.exhausted;
    }

    /// Counts `records` read from the kernel's ring buffer (decodable or not).
    pub fn count_received(&mut self, records: usize) {
        self.received += records as u64;
    }

    /// Records one kernel event received at `at` (read once per batch by the caller).
    pub fn record(&mut self, event: Event, at: SystemTime, now: Instant) {
        // By id: one map update per event, whatever the number of scopes and blocks.
        if event.scope_id != NO_SCOPE {
            self.last_event.insert(event.scope_id, now);
        }
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        let received = Received { event, at };
        self.history.push_back(received);
        if self.followers.receiver_count() > 0 {
            let _ = self.followers.send((received, self.names.clone()));
        }
    }

    /// Folds the kernel's current holdings into each scope's peak, at most every
    /// `PEAK_REFRESH` unless `force`.
    pub fn refresh_peaks(&mut self, force: bool) {
        if !force && self.peaks_refreshed.elapsed() < PEAK_REFRESH {
            return;
        }
        self.peaks_refreshed = Instant::now();
        for scope in &mut self.scopes {
            if let Ok(counters) = scope_counters(&self.stats, scope) {
                scope.peak = scope.peak.max(in_use(&counters));
            }
        }
    }

    pub fn status(&mut self) -> Result<Status, aya::maps::MapError> {
        self.refresh_peaks(true);
        let now = Instant::now();
        let mut scopes = vec![];
        for scope in &self.scopes {
            let counters = scope_counters(&self.stats, scope)?;
            let mut blocks = vec![];
            for (cgroup, id, range) in &scope.blocks {
                blocks.push(BlockStatus {
                    cgroup: cgroup.clone(),
                    range: [range.lo, range.hi],
                    in_use: in_use(&self.stats.counters(*id)?),
                });
            }
            scopes.push(ScopeStatus {
                name: scope.name.clone(),
                cgroup: scope.cgroup.clone(),
                active: !scope.held.is_empty(),
                cgroups: scope.held.clone(),
                block: scope.block,
                blocks,
                pool_exhausted: scope.exhausted.clone(),
                mode: scope.mode.to_string(),
                range: scope.range,
                size: u32::from(scope.range[1]) - u32::from(scope.range[0]) + 1,
                in_use: in_use(&counters),
                peak: scope.peak,
                steered: counters.steered,
                denied: counters.denied,
                exhausted: counters.exhausted,
                allowed: counters.allowed,
                audit_would_deny: counters.audit_would_deny,
                unsteered: counters.unsteered,
                last_event_age_s: std::iter::once(scope.id)
                    .chain(scope.blocks.iter().map(|(_, id, _)| *id))
                    .filter_map(|id| self.last_event.get(&id))
                    .max()
                    .map(|at| now.duration_since(*at).as_secs_f64()),
            });
        }
        let unscoped = self.stats.counters(UNSCOPED_COUNTERS)?;
        Ok(Status {
            version: PROTOCOL_VERSION,
            uptime_s: self.started.elapsed().as_secs(),
            lost_events: self.stats.lost_events()?,
            events_received: self.received,
            mode: self.mode.to_string(),
            policy: self.policy_name.clone(),
            scopes,
            unscoped: ScopeCounters {
                denied: unscoped.denied,
                audit_would_deny: unscoped.audit_would_deny,
            },
            last_reload: self.last_reload.as_ref().map(|reload| LastReload {
                ok: reload.error.is_none(),
                age_s: now.duration_since(reload.at).as_secs_f64(),
                error: reload.error.clone(),
            }),
        })
    }

    /// The kept events, oldest first, optionally of one scope and at most `limit` of them.
    pub fn recent(&self, scope: Option<&str>, limit: Option<usize>) -> Vec<EventRecord> {
        let scope_id = scope.map(|name| {
            self.names
                .iter()
                .find(|(_, n)| *n == name)
                .map(|(id, _)| *id)
        });
        let matching: Vec<&Received> = self
            .history
            .iter()
            .filter(|received| match scope_id {
                None => true,
                Some(id) => id == Some(received.event.scope_id),
            })
            .collect();
        let skip = limit.map_or(0, |limit| matching.len().saturating_sub(limit));
        matching
            .into_iter()
            .skip(skip)
            .map(|received| decode(received, &self.names))
            .collect()
    }

    /// A live feed of events recorded from now on. Taken under the same lock as the history
    /// copy, so the two meet exactly.
    pub fn follow(&self) -> broadcast::Receiver<Followed> {
        self.followers.subscribe()
    }

    pub fn stats(&self) -> &KernelStats {
        &self.stats
    }
}

/// A scope's counters: a pool's own row plus those of all its instances.
fn scope_counters(stats: &KernelStats, scope: &ScopeLive) -> Result<Counters, aya::maps::MapError> {
    let mut total = stats.counters(scope.id)?;
    for (_, id, _) in &scope.blocks {
        total.add(&stats.counters(*id)?);
    }
    Ok(total)
}

/// Sockets holding a port of the range; the per-CPU sum wraps, read as signed.
fn in_use(counters: &Counters) -> u64 {
    (counters.held as i64).max(0) as u64
}

/// The event in the protocol's terms; `names` maps scope ids to names.
pub fn decode(received: &Received, names: &HashMap<u32, String>) -> EventRecord {
    let event = &received.event;
    let comm_len = event
        .comm
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(event.comm.len());
    let has_remote = event.op != OP_BIND;
    let remote = if event.family == AF_INET {
        let [a, b, c, d, ..] = event.remote_addr;
        std::net::IpAddr::from([a, b, c, d])
    } else {
        std::net::IpAddr::from(event.remote_addr)
    };
    let scope_id = (event.scope_id != NO_SCOPE).then_some(event.scope_id);
    EventRecord {
        ts_ns: event.ts_ns,
        time: humantime::format_rfc3339_micros(received.at).to_string(),
        tgid: event.tgid,
        pid: event.pid,
        comm: String::from_utf8_lossy(&event.comm[..comm_len]).into_owned(),
        cgroup_id: event.cgroup_id,
        scope_id,
        scope: scope_id.and_then(|id| names.get(&id).cloned()),
        family: if event.family == AF_INET {
            "ipv4"
        } else {
            "ipv6"
        }
        .into(),
        protocol: protocol_name(event.protocol).into(),
        op: op_name(event.op).into(),
        local_port: event.local_port,
        remote_addr: has_remote.then(|| remote.to_string()),
        remote_port: has_remote.then_some(event.remote_port),
        verdict: verdict_name(event.verdict).into(),
        attempts: event.attempts,
        errno: event.errno,
    }
}
