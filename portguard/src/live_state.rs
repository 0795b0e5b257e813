//! What the daemon knows right now: counters from the kernel, peaks, recent events, followers.
//! Shared between the event reader and the control socket; never held across an await.
//!
//! Events are kept as the kernel's fixed-size records and decoded only when someone reads them,
//! so the reader's cost per event stays a copy, whatever the rate.

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{MapData, PerCpuArray};
use portguard_common::{AF_INET, Counters, Event, NO_SCOPE, OP_BIND, UNSCOPED_COUNTERS};
use tokio::sync::broadcast;

use crate::{
    event_log::{op_name, protocol_name, verdict_name},
    policy::{Mode, Policy},
    protocol::{EventRecord, PROTOCOL_VERSION, ScopeCounters, ScopeStatus, Status},
};

/// Recent events kept for `portguard events`; memory stays bounded whatever the event rate.
pub const HISTORY: usize = 4096;
/// Events a slow follower may fall behind before it is told it lost some.
const FOLLOWER_BACKLOG: usize = 4096;
/// How often the event reader folds the kernel's holdings into the peaks (status requests
/// always do).
const PEAK_REFRESH: Duration = Duration::from_millis(10);

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
}

/// An event as received: the kernel's record and when the daemon read it.
#[derive(Clone, Copy, Debug)]
pub struct Received {
    pub event: Event,
    pub at: SystemTime,
}

struct ScopeLive {
    name: String,
    cgroup: String,
    mode: Mode,
    range: [u16; 2],
    active: bool,
    peak: u64,
    last_event: Option<Instant>,
}

/// Scope names by id, shared with followers so they can decode events on their own.
pub type ScopeNames = Arc<Vec<String>>;

pub struct LiveState {
    started: Instant,
    policy_name: String,
    mode: Mode,
    scopes: Vec<ScopeLive>,
    names: ScopeNames,
    stats: KernelStats,
    history: VecDeque<Received>,
    followers: broadcast::Sender<Received>,
    peaks_refreshed: Instant,
}

impl LiveState {
    pub fn new(policy_name: String, policy: &Policy, stats: KernelStats) -> Self {
        Self {
            started: Instant::now(),
            policy_name,
            mode: policy.mode,
            scopes: policy
                .scopes
                .iter()
                .map(|scope| ScopeLive {
                    name: scope.name.clone(),
                    cgroup: scope.cgroup.clone(),
                    mode: scope.effective_mode(policy.mode),
                    range: [scope.ephemeral.lo, scope.ephemeral.hi],
                    active: false,
                    peak: 0,
                    last_event: None,
                })
                .collect(),
            names: Arc::new(policy.scopes.iter().map(|s| s.name.clone()).collect()),
            stats,
            history: VecDeque::with_capacity(HISTORY),
            followers: broadcast::channel(FOLLOWER_BACKLOG).0,
            peaks_refreshed: Instant::now(),
        }
    }

    pub fn has_scope(&self, name: &str) -> bool {
        self.scopes.iter().any(|scope| scope.name == name)
    }

    pub fn names(&self) -> ScopeNames {
        self.names.clone()
    }

    pub fn set_active(&mut self, scope_id: usize, active: bool) {
        if let Some(scope) = self.scopes.get_mut(scope_id) {
            scope.active = active;
        }
    }

    /// Records one kernel event received at `at` (read once per batch by the caller).
    pub fn record(&mut self, event: Event, at: SystemTime, now: Instant) {
        if let Some(scope) = self.scopes.get_mut(event.scope_id as usize) {
            scope.last_event = Some(now);
        }
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        let received = Received { event, at };
        self.history.push_back(received);
        if self.followers.receiver_count() > 0 {
            let _ = self.followers.send(received);
        }
    }

    /// Folds the kernel's current holdings into each scope's peak, at most every
    /// `PEAK_REFRESH` unless `force`.
    pub fn refresh_peaks(&mut self, force: bool) {
        if !force && self.peaks_refreshed.elapsed() < PEAK_REFRESH {
            return;
        }
        self.peaks_refreshed = Instant::now();
        for (id, scope) in self.scopes.iter_mut().enumerate() {
            if let Ok(counters) = self.stats.counters(id as u32) {
                scope.peak = scope.peak.max(in_use(&counters));
            }
        }
    }

    pub fn status(&mut self) -> Result<Status, aya::maps::MapError> {
        self.refresh_peaks(true);
        let now = Instant::now();
        let mut scopes = vec![];
        for (id, scope) in self.scopes.iter().enumerate() {
            let counters = self.stats.counters(id as u32)?;
            scopes.push(ScopeStatus {
                name: scope.name.clone(),
                cgroup: scope.cgroup.clone(),
                active: scope.active,
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
                last_event_age_s: scope
                    .last_event
                    .map(|at| now.duration_since(at).as_secs_f64()),
            });
        }
        let unscoped = self.stats.counters(UNSCOPED_COUNTERS)?;
        Ok(Status {
            version: PROTOCOL_VERSION,
            uptime_s: self.started.elapsed().as_secs(),
            lost_events: self.stats.lost_events()?,
            mode: self.mode.to_string(),
            policy: self.policy_name.clone(),
            scopes,
            unscoped: ScopeCounters {
                denied: unscoped.denied,
                audit_would_deny: unscoped.audit_would_deny,
            },
        })
    }

    /// The kept events, oldest first, optionally of one scope and at most `limit` of them.
    pub fn recent(&self, scope: Option<&str>, limit: Option<usize>) -> Vec<EventRecord> {
        let matching: Vec<EventRecord> = self
            .history
            .iter()
            .map(|received| decode(received, &self.names))
            .filter(|event| scope.is_none() || event.scope.as_deref() == scope)
            .collect();
        let skip = limit.map_or(0, |limit| matching.len().saturating_sub(limit));
        matching.into_iter().skip(skip).collect()
    }

    pub fn follow(&self) -> broadcast::Receiver<Received> {
        self.followers.subscribe()
    }

    pub fn stats(&self) -> &KernelStats {
        &self.stats
    }
}

/// Sockets holding a port of the range; the per-CPU sum wraps, read as signed.
fn in_use(counters: &Counters) -> u64 {
    (counters.held as i64).max(0) as u64
}

/// The event in the protocol's terms; `names` maps scope ids to names.
pub fn decode(received: &Received, names: &[String]) -> EventRecord {
    let event = &received.event;
    let comm_len = event
        .comm
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(event.comm.len());
    let has_remote = event.op != OP_BIND;
    let remote = std::net::Ipv4Addr::new(
        event.remote_addr[0],
        event.remote_addr[1],
        event.remote_addr[2],
        event.remote_addr[3],
    );
    let scope_id = (event.scope_id != NO_SCOPE).then_some(event.scope_id);
    EventRecord {
        ts_ns: event.ts_ns,
        time: humantime::format_rfc3339_micros(received.at).to_string(),
        tgid: event.tgid,
        pid: event.pid,
        comm: String::from_utf8_lossy(&event.comm[..comm_len]).into_owned(),
        cgroup_id: event.cgroup_id,
        scope_id,
        scope: scope_id.and_then(|id| names.get(id as usize).cloned()),
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
