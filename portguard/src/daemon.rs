//! `portguard daemon`: load, apply, attach, then serve events and follow cgroups until a signal.

use std::{process::ExitCode, time::Duration};

use anyhow::{Context as _, bail};
use portguard_common::{Counters, Event, UNSCOPED_COUNTERS};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    cgroup::{Cgroup2Mount, is_cgroup2_dir},
    cli::DaemonArgs,
    event_log,
    loader::{Enforcer, LoadError},
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
    enforcer
        .attach(&attach_at)
        .with_context(|| format!("attaching to cgroup {}", attach_at.display()))?;
    let events = enforcer.take_events()?;
    log::info!(
        "policy {} ({} mode, {} scopes) attached at {}",
        source.name,
        policy.mode,
        policy.scopes.len(),
        attach_at.display()
    );
    if policy.mode == Mode::Observe {
        log::info!(
            "observe mode: every bind and connect under the attach point is logged; nothing is changed"
        );
    }
    log::info!("ready");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(
        &mut enforcer,
        &mut cgroups,
        &mount,
        events,
        Duration::from_millis(args.rescan_ms.max(10)),
    ))?;

    for (id, scope) in policy.scopes.iter().enumerate() {
        log_counters(
            &format!("scope {}", scope.name),
            enforcer.counters(id as u32),
        );
    }
    log_counters("unscoped", enforcer.counters(UNSCOPED_COUNTERS));
    let lost = enforcer.lost_events();
    drop(enforcer);
    match lost {
        Ok(lost) => log::info!("stopped; programs detached; lost events: {lost}"),
        Err(error) => log::info!("stopped; programs detached; lost events unknown: {error}"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve(
    enforcer: &mut Enforcer,
    cgroups: &mut ScopeCgroups,
    mount: &Cgroup2Mount,
    events: aya::maps::RingBuf<aya::maps::MapData>,
    rescan: Duration,
) -> anyhow::Result<()> {
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd, so the fd stays open
    // for as long as it is registered.
    let mut events =
        unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) }
            .map_err(|error| anyhow::anyhow!("watching the event ring buffer: {error}"))?;
    let mut rescan = tokio::time::interval(rescan);
    loop {
        tokio::select! {
            _ = sigint.recv() => { log::info!("SIGINT: stopping"); break; }
            _ = sigterm.recv() => { log::info!("SIGTERM: stopping"); break; }
            _ = rescan.tick() => cgroups.sync(mount, enforcer).context("following scope cgroups")?,
            guard = events.readable_mut() => {
                let mut guard = guard.context("waiting for events")?;
                drain_events(guard.get_inner_mut(), cgroups);
                guard.clear_ready();
            }
        }
    }
    Ok(())
}

fn log_counters(what: &str, counters: Result<Counters, LoadError>) {
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

fn drain_events(ring: &mut aya::maps::RingBuf<aya::maps::MapData>, cgroups: &ScopeCgroups) {
    while let Some(item) = ring.next() {
        let Some(event) = read_event(&item) else {
            log::warn!(
                "ignoring a {}-byte event record of unknown layout",
                item.len()
            );
            continue;
        };
        let level = event_log::level(&event);
        if log::log_enabled!(level) {
            log::log!(
                level,
                "{}",
                event_log::describe(&event, |id| cgroups.name(id).map(str::to_owned))
            );
        }
    }
}

fn read_event(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < std::mem::size_of::<Event>() {
        return None;
    }
    // SAFETY: Event is plain old data of that size; the read is unaligned-safe.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}
