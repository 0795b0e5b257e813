//! `portguard daemon`: load, apply, attach, then serve events and the control socket and follow
//! cgroups until a signal.

use std::{
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use aya::maps::{MapData, RingBuf};
use portguard_common::{Counters, Event, UNSCOPED_COUNTERS};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::{
    cgroup::{Cgroup2Mount, is_cgroup2_dir},
    cli::DaemonArgs,
    control::{self, Access},
    event_log,
    live_state::{LiveState, Received, decode},
    loader::Enforcer,
    policy::{HostPorts, Mode, compile, host_warnings},
    policy_file::PolicySource,
    scope_cgroups::ScopeCgroups,
};

pub fn run(args: DaemonArgs) -> anyhow::Result<ExitCode> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "portguard daemon must run as root: it loads eBPF programs (CAP_BPF, CAP_NET_ADMIN) \
             and attaches them to cgroups (CAP_SYS_ADMIN)"
        );
    }
    let access = Access {
        group: args.socket_group.as_deref().map(group_id).transpose()?,
    };
    let source = PolicySource::choose(args.policy.as_deref())?;
    let policy = source
        .parse()
        .context("the policy has errors; not starting")?;
    match HostPorts::read() {
        Ok(host) => {
            for warning in host_warnings(&policy, &host) {
                log::warn!("{warning}");
            }
        }
        Err(error) => log::warn!("cannot read the host's port settings: {error}"),
    }
    let mount = Cgroup2Mount::find()?;
    let attach_at = args.cgroup.clone().unwrap_or_else(|| mount.path.clone());
    if !is_cgroup2_dir(&attach_at)
        .with_context(|| format!("cannot attach at {}", attach_at.display()))?
    {
        bail!(
            "cannot attach at {}: not a cgroup v2 directory (the cgroup2 file system is at {})",
            attach_at.display(),
            mount.path.display()
        );
    }
    let compiled = compile(&policy, mount.root_level)?;

    let mut enforcer = Enforcer::load(args.events_buffer).context("loading the eBPF programs")?;
    enforcer
        .apply(&compiled)
        .context("writing the policy into the kernel maps")?;
    let mut cgroups = ScopeCgroups::new(&policy);
    cgroups
        .sync(&mount, &mut enforcer)
        .context("resolving scope cgroups")?;
    cgroups.log_missing(&mount);
    for scope in &policy.scopes {
        log::info!(
            "scope {}: cgroup {}, ephemeral {} ({} ports), {}",
            scope.name,
            scope.cgroup,
            scope.ephemeral,
            scope.ephemeral.len(),
            scope.effective_mode(policy.mode)
        );
    }
    let events = enforcer.take_events()?;
    let logger = enforcer
        .take_logger()
        .context("reading the programs' log records")?;
    let state = Arc::new(Mutex::new(LiveState::new(
        source.name.clone(),
        &policy,
        enforcer.take_stats()?,
    )));

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let socket = control::bind(&args.socket, access)?;
        enforcer
            .attach(&attach_at)
            .with_context(|| format!("attaching to cgroup {}", attach_at.display()))?;
        log::info!(
            "policy {} ({} mode, {} scopes) attached at {}; control socket {}",
            source.name,
            policy.mode,
            policy.scopes.len(),
            attach_at.display(),
            args.socket.display()
        );
        if policy.mode == Mode::Observe {
            log::info!(
                "observe mode: every bind and connect under the attach point is logged; nothing is changed"
            );
        }
        log::info!("ready");
        let loops = Loops {
            enforcer: &mut enforcer,
            cgroups: &mut cgroups,
            mount: &mount,
            state: &state,
            rescan: Duration::from_millis(args.rescan_ms.max(10)),
        };
        tokio::select! {
            result = loops.run(events, logger) => result,
            () = control::serve(&socket, state.clone(), access) => Ok(()),
        }
    })?;

    let state = state
        .lock()
        .map_err(|_| anyhow::anyhow!("daemon state lock poisoned"))?;
    for (id, scope) in policy.scopes.iter().enumerate() {
        log_counters(
            &format!("scope {}", scope.name),
            state.stats().counters(id as u32),
        );
    }
    log_counters("unscoped", state.stats().counters(UNSCOPED_COUNTERS));
    let lost = state.stats().lost_events();
    drop(enforcer);
    match lost {
        Ok(lost) => log::info!("stopped; programs detached; lost events: {lost}"),
        Err(error) => log::info!("stopped; programs detached; lost events unknown: {error}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// The daemon's own work: signals, kernel events and log records, cgroup rescans.
struct Loops<'a> {
    enforcer: &'a mut Enforcer,
    cgroups: &'a mut ScopeCgroups,
    mount: &'a Cgroup2Mount,
    state: &'a Mutex<LiveState>,
    rescan: Duration,
}

impl Loops<'_> {
    async fn run(
        mut self,
        events: RingBuf<MapData>,
        logger: aya_log::EbpfLogger<&'static dyn log::Log>,
    ) -> anyhow::Result<()> {
        let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        // SAFETY: each AsyncFd owns the object whose fd it watches, so the fd outlives the
        // registration.
        let mut events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
            .map_err(|error| anyhow::anyhow!("watching the event ring buffer: {error}"))?;
        let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
            .map_err(|error| anyhow::anyhow!("watching the programs' log buffer: {error}"))?;
        let mut rescan = tokio::time::interval(self.rescan);
        loop {
            tokio::select! {
                _ = sigint.recv() => { log::info!("SIGINT: stopping"); return Ok(()); }
                _ = sigterm.recv() => { log::info!("SIGTERM: stopping"); return Ok(()); }
                _ = rescan.tick() => self.sync_cgroups()?,
                guard = events.readable_mut() => {
                    let mut guard = guard.context("waiting for events")?;
                    self.drain_events(guard.get_inner_mut())?;
                    guard.clear_ready();
                }
                guard = logger.readable_mut() => {
                    let mut guard = guard.context("waiting for program log records")?;
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            }
        }
    }

    fn sync_cgroups(&mut self) -> anyhow::Result<()> {
        self.cgroups
            .sync(self.mount, self.enforcer)
            .context("following scope cgroups")?;
        let mut state = lock(self.state)?;
        for (id, active) in self.cgroups.active().enumerate() {
            state.set_active(id, active);
        }
        Ok(())
    }

    fn drain_events(&self, ring: &mut RingBuf<MapData>) -> anyhow::Result<()> {
        let mut state = lock(self.state)?;
        let (at, now) = (SystemTime::now(), Instant::now());
        let names = state.names();
        while let Some(item) = ring.next() {
            let Some(event) = read_event(&item) else {
                log::warn!(
                    "ignoring a {}-byte event record of unknown layout",
                    item.len()
                );
                continue;
            };
            state.record(event, at, now);
            let level = event_log::level(event_log::verdict_name(event.verdict));
            if log::log_enabled!(level) {
                let record = decode(&Received { event, at }, &names);
                log::log!(level, "{}", event_log::describe(&record));
            }
        }
        state.refresh_peaks(false);
        Ok(())
    }
}

fn lock(state: &Mutex<LiveState>) -> anyhow::Result<std::sync::MutexGuard<'_, LiveState>> {
    state
        .lock()
        .map_err(|_| anyhow::anyhow!("daemon state lock poisoned"))
}

fn log_counters(what: &str, counters: Result<Counters, aya::maps::MapError>) {
    match counters {
        Ok(c) => log::info!(
            "{what}: steered {}, denied {}, exhausted {}, allowed {}, audit-would-deny {}, unsteered {}",
            c.steered,
            c.denied,
            c.exhausted,
            c.allowed,
            c.audit_would_deny,
            c.unsteered
        ),
        Err(error) => log::warn!("{what}: cannot read counters: {error}"),
    }
}

fn read_event(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < std::mem::size_of::<Event>() {
        return None;
    }
    // SAFETY: Event is plain old data of that size; the read is unaligned-safe.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

/// The gid of group `name`.
fn group_id(name: &str) -> anyhow::Result<u32> {
    let c_name = std::ffi::CString::new(name).context("group name contains a NUL byte")?;
    // SAFETY: valid C string; the result is read before any other getgr* call.
    let group = unsafe { libc::getgrnam(c_name.as_ptr()) };
    if group.is_null() {
        bail!("no group named `{name}` (for --socket-group)");
    }
    // SAFETY: non-null pointer returned by getgrnam.
    Ok(unsafe { (*group).gr_gid })
}
