//! `portguard daemon`: load, apply, attach, then serve events and the control socket, follow
//! cgroups and reload on request until a signal.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use aya::maps::{MapData, RingBuf};
use portguard_common::{Counters, Event, PortBitmap, UNSCOPED_COUNTERS};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};

use crate::{
    cgroup::{Cgroup2Mount, PinLock, is_cgroup2_dir, prepare_pin_dir},
    cgroup_watch::{CgroupWatch, Change},
    cli::DaemonArgs,
    control::{self, Access},
    event_log,
    live_state::{LiveState, Received, ReloadOutcome, decode},
    loader::{Enforcer, LoadError},
    pins,
    policy::{HostPorts, Mode, Policy, assign_ids, compile, host_warnings},
    policy_file::PolicySource,
    privileges, reserved_ports,
    scope_cgroups::ScopeCgroups,
    service_manager,
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
    prepare_pin_dir(&args.pin_path)
        .with_context(|| format!("preparing the pin directory {}", args.pin_path.display()))?;
    // Before anything of the installation is read or written: a second daemon on the same pins
    // must change nothing.
    let _pin_lock = PinLock::take(&args.pin_path).context("not starting")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Before anything is loaded or pinned (and after the lock, so that a second daemon is told
    // about the lock): a socket path or directory that is not safe refuses the start.
    let socket = {
        let _runtime = runtime.enter();
        control::bind(&args.socket, access)?
    };
    let mut enforcer =
        Enforcer::load(args.events_buffer, &args.pin_path).context("loading the eBPF programs")?;
    // Scope ids survive restarts: an adopted map keeps each scope's cgroups and counters.
    let kept = if enforcer.adopted() {
        let kept = enforcer.kept_scope_names()?;
        log::info!(
            "adopting the pinned state in {} ({} scopes)",
            args.pin_path.display(),
            kept.len()
        );
        kept
    } else {
        vec![]
    };
    warn_about_host(&policy, &enforcer.reserved()?);
    let ids = assign_ids(&kept, &policy).map_err(anyhow::Error::msg)?;
    let compiled = compile(&policy, &ids)?;
    enforcer
        .apply(&compiled)
        .context("writing the policy into the kernel maps")?;
    // Watch before the first walk, so that nothing created in between is missed.
    let watch = CgroupWatch::new(&attach_at)
        .with_context(|| format!("watching cgroups below {}", attach_at.display()))?;
    log::info!(
        "following {} cgroups below {} with inotify",
        watch.watched(),
        attach_at.display()
    );
    let mut cgroups = ScopeCgroups::new(&policy, &ids, mount, attach_at.clone());
    if enforcer.adopted() {
        // Cgroups of a pool keep the blocks an earlier daemon gave them.
        cgroups.adopt_instances(&enforcer.scoped_cgroups()?, &kept);
    }
    cgroups
        .sync(&mut enforcer)
        .context("resolving scope cgroups")?;
    if enforcer.adopted() {
        cgroups
            .drop_unknown(enforcer.scoped_cgroups()?, &mut enforcer)
            .context("reconciling the adopted cgroup map")?;
    }
    cgroups.log_idle();
    reserve_ports(&policy, &mut enforcer)?;
    log_scopes(&policy);
    let events = enforcer.take_events()?;
    let logger = enforcer
        .take_logger()
        .context("reading the programs' log records")?;
    let state = Arc::new(Mutex::new(LiveState::new(
        source.name.clone(),
        &policy,
        &ids,
        enforcer.take_stats()?,
    )));

    running_state_held(&state, &mut cgroups)?;
    let mut running = Running {
        enforcer,
        cgroups,
        state: state.clone(),
        policy,
        ids,
        policy_arg: args.policy.clone(),
    };
    runtime.block_on(async {
        let replaced = match running.enforcer.attach(&attach_at, &args.pin_path) {
            Ok(replaced) => replaced,
            Err(error) => {
                return Err(refuse_attach(
                    error,
                    &running.enforcer,
                    &attach_at,
                    &args.pin_path,
                ));
            }
        };
        if replaced > 0 {
            log::info!("replaced {replaced} link(s) an earlier daemon left, without a gap");
        }
        log::info!(
            "policy {} ({} mode, {} scopes) attached at {}; control socket {}",
            source.name,
            running.policy.mode,
            running.policy.scopes.len(),
            attach_at.display(),
            args.socket.display()
        );
        if running.policy.mode == Mode::Observe {
            log::info!(
                "observe mode: every bind and connect under the attach point is logged; nothing is changed"
            );
        }
        // Everything that needed a capability is done.
        let dropped = privileges::drop_all().context("dropping capabilities")?;
        if dropped.bounding_kept.is_empty() {
            log::info!(
                "dropped every capability (effective, permitted, inheritable, ambient, bounding); no_new_privs set"
            );
        } else {
            log::info!(
                "dropped every capability; the bounding set stays {:?} as the service manager set it \
                 (narrowing it needs CAP_SETPCAP), and no_new_privs keeps them from coming back",
                dropped.bounding_kept
            );
        }
        log::info!("ready");
        service_manager::ready(&format!(
            "enforcing {} ({} scopes)",
            source.name,
            running.policy.scopes.len()
        ));
        let (reload_requests, reloads) = mpsc::channel(4);
        tokio::select! {
            result = running.serve(
                events,
                logger,
                watch,
                reloads,
                Duration::from_secs(args.resync_s.max(1)),
            ) => result,
            () = control::serve(&socket, state.clone(), access, reload_requests) => Ok(()),
        }
    })?;

    {
        let state = lock(&state)?;
        for (scope, id) in running.policy.scopes.iter().zip(&running.ids) {
            log_counters(
                &format!("scope {}", scope.name),
                state.stats().counters(*id),
            );
        }
        log_counters("unscoped", state.stats().counters(UNSCOPED_COUNTERS));
        let lost = state.stats().lost_events();
        drop(running);
        match lost {
            Ok(lost) => log::info!("lost events: {lost}"),
            Err(error) => log::info!("lost events unknown: {error}"),
        }
        log::info!(
            "stopped; enforcement continues through the links pinned in {} (`portguard uninstall` removes them)",
            args.pin_path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The daemon once enforcement is live. Dropping it detaches every program.
struct Running {
    enforcer: Enforcer,
    cgroups: ScopeCgroups,
    state: Arc<Mutex<LiveState>>,
    /// The policy in force and its scope ids.
    policy: Policy,
    ids: Vec<u32>,
    /// `--policy`, re-read on reload.
    policy_arg: Option<PathBuf>,
}

impl Running {
    async fn serve(
        &mut self,
        events: RingBuf<MapData>,
        logger: aya_log::EbpfLogger<&'static dyn log::Log>,
        watch: CgroupWatch,
        mut reloads: mpsc::Receiver<oneshot::Sender<Result<String, String>>>,
        resync: Duration,
    ) -> anyhow::Result<()> {
        let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
        // SAFETY: each AsyncFd owns the object whose fd it watches, so the fd outlives the
        // registration.
        let mut events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
            .map_err(|error| anyhow::anyhow!("watching the event ring buffer: {error}"))?;
        let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
            .map_err(|error| anyhow::anyhow!("watching the programs' log buffer: {error}"))?;
        let mut watch = unsafe { AsyncFd::register_with_interest(watch, Interest::READABLE) }
            .map_err(|error| anyhow::anyhow!("watching cgroups: {error}"))?;
        let mut resync = tokio::time::interval(resync);
        // post_bind4 counts holdings without an event, so peaks are also sampled on a clock.
        let mut peaks = tokio::time::interval(PEAK_SAMPLE);
        peaks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // Set after the daemon caught up with the ring buffer: events gather until then.
        let mut gather_until: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                // Signals, reloads and new cgroups first: an event flood must not delay them.
                biased;
                _ = sigint.recv() => {
                    log::info!("SIGINT: stopping");
                    service_manager::stopping();
                    return self.drain_all_events(events.get_mut());
                }
                _ = sigterm.recv() => {
                    log::info!("SIGTERM: stopping");
                    service_manager::stopping();
                    return self.drain_all_events(events.get_mut());
                }
                _ = sighup.recv() => {
                    log::info!("SIGHUP: reloading the policy");
                    let _ = self.reload()?;
                }
                Some(answer) = reloads.recv() => {
                    log::info!("reload requested on the control socket");
                    let outcome = self.reload()?;
                    let _ = answer.send(outcome);
                }
                _ = resync.tick() => {
                    self.cgroups.sync(&mut self.enforcer).context("walking the cgroup tree")?;
                    running_state_held(&self.state, &mut self.cgroups)?;
                }
                _ = peaks.tick() => lock(&self.state)?.refresh_peaks(true),
                guard = watch.readable_mut() => {
                    let mut guard = guard.context("waiting for cgroup changes")?;
                    self.follow_cgroups(guard.get_inner_mut())?;
                    guard.clear_ready();
                }
                () = tokio::time::sleep_until(gather_until.unwrap_or_else(tokio::time::Instant::now)),
                    if gather_until.is_some() => gather_until = None,
                guard = events.readable_mut(), if gather_until.is_none() => {
                    let mut guard = guard.context("waiting for events")?;
                    // A full batch means more may be waiting: stay ready, but let signals,
                    // reloads and cgroup changes have their turn first.
                    if self.drain_events(guard.get_inner_mut())? < EVENT_BATCH {
                        guard.clear_ready();
                        gather_until = Some(tokio::time::Instant::now() + EVENT_GATHER);
                    } else {
                        // The control socket is served from this same task: let it run too.
                        drop(guard);
                        tokio::task::yield_now().await;
                    }
                }
                guard = logger.readable_mut() => {
                    let mut guard = guard.context("waiting for program log records")?;
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            }
        }
    }

    /// Re-reads the policy. A policy with errors changes nothing: everything that can fail is
    /// checked before the first map is written. The outer error is for failures after that
    /// point (the kernel refusing a map update), which stop the daemon rather than leave it
    /// half-configured unnoticed.
    fn reload(&mut self) -> anyhow::Result<Result<String, String>> {
        service_manager::reloading();
        let outcome = self.reload_policy();
        let status = match &outcome {
            Ok(Ok(summary)) => summary.clone(),
            Ok(Err(_)) => "reload refused; the previous policy stays in force".to_owned(),
            Err(error) => format!("reload failed: {error:#}"),
        };
        service_manager::ready(&status);
        outcome
    }

    fn reload_policy(&mut self) -> anyhow::Result<Result<String, String>> {
        let prepared = PolicySource::choose(self.policy_arg.as_deref())
            .and_then(|source| Ok((source.parse()?, source.name)))
            .and_then(|(policy, name)| {
                // Pool instances keep their ids too: no scope may be given one.
                let running: Vec<(String, u32)> = self
                    .policy
                    .scopes
                    .iter()
                    .map(|scope| scope.name.clone())
                    .zip(self.ids.iter().copied())
                    .chain(self.cgroups.instance_names())
                    .collect();
                let ids = assign_ids(&running, &policy).map_err(anyhow::Error::msg)?;
                let compiled = compile(&policy, &ids)?;
                Ok((policy, name, ids, compiled))
            });
        let (policy, name, ids, compiled) = match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                let message = format!("{error:#}");
                log::error!("reload refused; the running policy stays in force:\n{message}");
                lock(&self.state)?.set_reload(ReloadOutcome {
                    at: Instant::now(),
                    error: Some(message.clone()),
                });
                return Ok(Err(message));
            }
        };
        warn_about_host(&policy, &self.enforcer.reserved()?);
        lock(&self.state)?.reset_new_ids(&ids);
        self.enforcer
            .apply(&compiled)
            .context("reload: writing the new policy into the kernel maps")?;
        self.cgroups
            .replace(&policy, &ids, &mut self.enforcer)
            .context("reload: updating scope cgroups")?;
        self.cgroups
            .refresh_instances(&mut self.enforcer)
            .context("reload: rewriting pool blocks")?;
        reserve_ports(&policy, &mut self.enforcer)?;
        {
            let mut state = lock(&self.state)?;
            state.replace_policy(name.clone(), &policy, &ids);
            state.set_reload(ReloadOutcome {
                at: Instant::now(),
                error: None,
            });
        }
        running_state_held(&self.state, &mut self.cgroups)?;
        log_scopes(&policy);
        let summary = format!(
            "reloaded policy {name}: {} mode, {} scopes",
            policy.mode,
            policy.scopes.len()
        );
        log::info!("{summary}");
        self.policy = policy;
        self.ids = ids;
        Ok(Ok(summary))
    }

    /// Applies what the watcher saw: new cgroups are enforced at once.
    fn follow_cgroups(&mut self, watch: &mut CgroupWatch) -> anyhow::Result<()> {
        let changes = watch.changes().context("reading cgroup changes")?;
        for change in changes {
            match change {
                Change::Created(dir) => self.cgroups.created(&dir, &mut self.enforcer)?,
                Change::Removed(dir) => self.cgroups.removed(&dir, &mut self.enforcer)?,
                Change::Overflow => {
                    log::warn!("cgroup notifications overflowed; walking the whole tree");
                    watch
                        .rewatch(self.cgroups.attach_at())
                        .context("watching cgroups again")?;
                    self.cgroups.sync(&mut self.enforcer)?;
                }
            }
        }
        running_state_held(&self.state, &mut self.cgroups)
    }

    /// Reads what the ring buffer holds, so that a stopping daemon logs and counts every event
    /// written before it stopped (some may have been gathering, see `EVENT_GATHER`).
    fn drain_all_events(&self, ring: &mut RingBuf<MapData>) -> anyhow::Result<()> {
        while self.drain_events(ring)? == EVENT_BATCH {}
        Ok(())
    }

    /// Reads at most `EVENT_BATCH` records and returns how many it read.
    fn drain_events(&self, ring: &mut RingBuf<MapData>) -> anyhow::Result<usize> {
        let mut state = lock(&self.state)?;
        let (at, now) = (SystemTime::now(), Instant::now());
        let names = state.names();
        let mut read = 0;
        while read < EVENT_BATCH {
            let Some(item) = ring.next() else { break };
            read += 1;
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
        state.count_received(read);
        state.refresh_peaks(false);
        Ok(read)
    }
}

/// How often the in-use count of each scope is sampled into its peak.
const PEAK_SAMPLE: Duration = Duration::from_millis(100);

/// How long events gather after the daemon caught up with the ring buffer, before it reads
/// again. The kernel wakes the reader only for a record written while it was caught up, so a
/// reader that reads every record as it comes is woken once per record, and each wakeup is paid
/// for by the program that wrote it (about 1 µs per bind or connect under a steady stream,
/// measured by `cargo xtask bench`). Gathering bounds the wakeups to one per period, at the
/// price of that much delay for `events --follow`.
const EVENT_GATHER: Duration = Duration::from_millis(5);

/// Records read per wakeup before the event loop looks at its other work.
const EVENT_BATCH: usize = 4096;

/// Tells the live state which cgroups each scope holds, and records pool exhaustions as
/// events.
fn running_state_held(state: &Mutex<LiveState>, cgroups: &mut ScopeCgroups) -> anyhow::Result<()> {
    let mut state = lock(state)?;
    for held in cgroups.held() {
        state.set_held(held);
    }
    let (at, now) = (SystemTime::now(), Instant::now());
    for (cgroup_id, scope_id) in cgroups.take_exhaustions() {
        let mut comm = [0u8; 16];
        comm[..9].copy_from_slice(b"portguard");
        let event = Event {
            cgroup_id,
            scope_id,
            tgid: std::process::id(),
            pid: std::process::id(),
            comm,
            family: portguard_common::AF_INET,
            op: portguard_common::OP_POOL,
            verdict: portguard_common::VERDICT_EXHAUSTED,
            ..Event::default()
        };
        state.record(event, at, now);
    }
    Ok(())
}

/// A daemon whose programs the kernel would not attach leaves no link of its own (the loader has
/// already removed them). An adopted installation keeps the earlier daemon's links, which
/// enforce the maps: those hold this daemon's policy in full, written before the attach was
/// tried. A new installation is removed again, with the ports it reserved, so that nothing is
/// left half-applied.
fn refuse_attach(
    error: LoadError,
    enforcer: &Enforcer,
    attach_at: &Path,
    pins: &Path,
) -> anyhow::Error {
    let refused = anyhow::Error::new(error);
    let hint = if refused
        .chain()
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .any(|e| e.raw_os_error() == Some(libc::EPERM))
    {
        " (is another program attached there without BPF_F_ALLOW_MULTI?)"
    } else {
        ""
    };
    let refused = refused.context(format!(
        "attaching to cgroup {}{hint}; no program of this daemon stays attached",
        attach_at.display()
    ));
    if enforcer.adopted() {
        log::info!(
            "the links an earlier daemon pinned in {} stay attached, enforcing the maps as this \
             daemon left them: with this policy in full",
            pins.display()
        );
    } else {
        let undone = enforcer
            .reserved()
            .map_err(anyhow::Error::from)
            .and_then(|mut ours| {
                // Only giving back: the record (about to be removed) never lacks a port.
                let (_, returned) =
                    reserved_ports::apply(&PortBitmap::EMPTY, &mut ours, |_| Ok(()))
                        .context("returning the reserved ports")?;
                let (_, maps) = pins::uninstall(pins)?;
                Ok((returned, maps))
            });
        match undone {
            Ok((returned, maps)) => log::info!(
                "removed the {maps} map(s) this daemon pinned in {} and returned {returned} reserved port(s)",
                pins.display()
            ),
            Err(error) => log::warn!(
                "cannot remove what this daemon pinned in {}: {error:#} (`portguard uninstall` does)",
                pins.display()
            ),
        }
    }
    refused.context("not starting")
}

/// Reserves the policy's ranges in the sysctl (or gives ours back with `reserve = false`). The
/// reservation helps the kernel's own allocator stay out of scope ranges; enforcement does not
/// depend on it, so a failure is logged, not fatal.
fn reserve_ports(policy: &Policy, enforcer: &mut Enforcer) -> anyhow::Result<()> {
    let wanted = if policy.reserve {
        reserved_ports::bitmap_of(policy.scopes.iter().map(|scope| scope.ephemeral))
    } else {
        PortBitmap::EMPTY
    };
    let mut ours = enforcer.reserved()?;
    let record = |ours: &PortBitmap| enforcer.set_reserved(ours).map_err(std::io::Error::other);
    match reserved_ports::apply(&wanted, &mut ours, record) {
        Ok((0, 0)) => {}
        Ok((added, removed)) => log::info!(
            "net.ipv4.ip_local_reserved_ports: reserved {added} scope port(s), returned {removed}"
        ),
        Err(error) => log::warn!("cannot update net.ipv4.ip_local_reserved_ports: {error}"),
    }
    enforcer.set_reserved(&ours)?;
    Ok(())
}

/// Warns about the host's port settings, leaving out the reservations portguard made itself.
fn warn_about_host(policy: &Policy, ours: &PortBitmap) {
    match HostPorts::read() {
        Ok(mut host) => {
            let mut theirs = reserved_ports::bitmap_of(host.reserved.iter().copied());
            for port in 1..=u16::MAX {
                if ours.contains(port) {
                    theirs.remove(port);
                }
            }
            host.reserved = reserved_ports::ranges_of(&theirs);
            for warning in host_warnings(policy, &host) {
                log::warn!("{warning}");
            }
        }
        Err(error) => log::warn!("cannot read the host's port settings: {error}"),
    }
}

fn log_scopes(policy: &Policy) {
    for scope in &policy.scopes {
        log::info!(
            "scope {}: {}, ephemeral {} ({} ports), {}",
            scope.name,
            scope.selector,
            scope.ephemeral,
            scope.ephemeral.len(),
            scope.effective_mode(policy.mode)
        );
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
