//! The daemon's control socket: newline-delimited JSON, root (or one configured group) only.
//! A bad request gets an error response and never disturbs the daemon.

use std::{
    fs, io,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream, unix::OwnedWriteHalf},
    sync::{Semaphore, broadcast::error::RecvError, mpsc, oneshot},
};

use crate::{
    live_state::{LiveState, decode},
    protocol::{Command, MAX_REQUEST_BYTES, Response, decode_request},
};

/// Asks the daemon's main loop to reload; the answer is the applied summary or the errors.
pub type ReloadRequests = mpsc::Sender<oneshot::Sender<Result<String, String>>>;

/// Who may talk to the daemon besides root.
#[derive(Clone, Copy, Debug)]
pub struct Access {
    pub group: Option<u32>,
}

/// The bound socket; its file is removed on drop.
pub struct ControlSocket {
    pub listener: UnixListener,
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Creates the socket at `path`: mode 0600 owned by root, or 0660 with `group`. A stale socket
/// is replaced; anything else at the path (a symlink, a file) is refused, never followed.
pub fn bind(path: &Path, access: Access) -> anyhow::Result<ControlSocket> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    if fs::symlink_metadata(parent).is_err() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        fs::set_permissions(parent, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot set permissions on {}", parent.display()))?;
    }
    check_directory(parent)?;
    match fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!("another portguard daemon is serving {}", path.display());
            }
            fs::remove_file(path)
                .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
        }
        Ok(metadata) => bail!(
            "refusing to replace {}: it is a {}, not a socket",
            path.display(),
            if metadata.file_type().is_symlink() {
                "symlink"
            } else {
                "file or directory"
            }
        ),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(error).with_context(|| format!("cannot inspect {}", path.display()));
        }
    }
    // The socket is born with its final mode (no window where others may connect), and its
    // group is set without following a symlink someone could swap in at the path.
    let umask = if access.group.is_some() { 0o117 } else { 0o177 };
    // SAFETY: umask has no preconditions; the previous value is restored right after.
    let previous = unsafe { libc::umask(umask) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(previous) };
    let listener =
        bound.with_context(|| format!("cannot bind control socket {}", path.display()))?;
    if let Some(gid) = access.group {
        std::os::unix::fs::lchown(path, Some(0), Some(gid))
            .with_context(|| format!("cannot hand {} to group {gid}", path.display()))?;
    }
    listener.set_nonblocking(true)?;
    Ok(ControlSocket {
        listener: UnixListener::from_std(listener)?,
        path: path.to_owned(),
    })
}

/// Refuses a socket directory that anyone but root could change: another user could otherwise
/// swap the socket, or plant a symlink where the daemon creates it. The directory itself must not
/// be a symlink, and it and every directory above it must belong to root and be writable by no
/// one else, unless sticky (as /tmp is: others cannot remove or rename root's files there).
fn check_directory(dir: &Path) -> anyhow::Result<()> {
    let refuse = |why: String| {
        anyhow::anyhow!(
            "refusing the control socket directory {}: {why}",
            dir.display()
        )
    };
    let metadata =
        fs::symlink_metadata(dir).with_context(|| format!("cannot inspect {}", dir.display()))?;
    if metadata.file_type().is_symlink() {
        let target = fs::read_link(dir).unwrap_or_default();
        return Err(refuse(format!(
            "it is a symlink (to {}), which is never followed",
            target.display()
        )));
    }
    if !metadata.is_dir() {
        return Err(refuse("it is not a directory".into()));
    }
    let real =
        fs::canonicalize(dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    for ancestor in real.ancestors() {
        let metadata = fs::metadata(ancestor)
            .with_context(|| format!("cannot inspect {}", ancestor.display()))?;
        let mode = metadata.permissions().mode();
        if metadata.uid() != 0 {
            return Err(refuse(format!(
                "{} belongs to uid {}, not root",
                ancestor.display(),
                metadata.uid()
            )));
        }
        let others_write = mode & 0o002 != 0 || (mode & 0o020 != 0 && metadata.gid() != 0);
        if others_write && mode & 0o1000 == 0 {
            return Err(refuse(format!(
                "{} is writable by other users (mode {:04o}) and not sticky",
                ancestor.display(),
                mode & 0o7777
            )));
        }
    }
    Ok(())
}

/// Most clients served at once; more are told so and hung up on.
pub const MAX_CLIENTS: usize = 64;
/// Requests one connection may send in a burst, and per second after that. The CLI sends one
/// per connection; more is a runaway script, answered with an error and a hang-up.
pub const REQUEST_BURST: u32 = 100;
pub const REQUESTS_PER_SECOND: u32 = 50;

/// A token bucket: [`REQUEST_BURST`] requests at once, refilled at [`REQUESTS_PER_SECOND`].
struct RequestBudget {
    tokens: f64,
    at: Instant,
}

impl RequestBudget {
    fn new(now: Instant) -> Self {
        Self {
            tokens: f64::from(REQUEST_BURST),
            at: now,
        }
    }

    /// Whether one more request may be served at `now`.
    fn take(&mut self, now: Instant) -> bool {
        let refill =
            now.saturating_duration_since(self.at).as_secs_f64() * f64::from(REQUESTS_PER_SECOND);
        self.tokens = (self.tokens + refill).min(f64::from(REQUEST_BURST));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Accepts clients until the task is dropped.
pub async fn serve(
    socket: &ControlSocket,
    state: Arc<Mutex<LiveState>>,
    access: Access,
    reloads: ReloadRequests,
) {
    let clients = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        match socket.listener.accept().await {
            Ok((stream, _)) => {
                let Ok(permit) = clients.clone().try_acquire_owned() else {
                    log::warn!(
                        "control socket: refused a client: {MAX_CLIENTS} clients are connected already"
                    );
                    let refusal = Response::error(format!(
                        "too many clients: the daemon serves {MAX_CLIENTS} at once; try again later"
                    ));
                    // Best effort, never waiting on the refused client.
                    let _ = stream.try_write(refusal.to_line().as_bytes());
                    continue;
                };
                let state = state.clone();
                let reloads = reloads.clone();
                tokio::spawn(async move {
                    if let Err(error) = client(stream, state, access, reloads).await {
                        log::debug!("control client: {error}");
                    }
                    drop(permit);
                });
            }
            Err(error) => {
                log::warn!("control socket: accept failed: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn client(
    stream: UnixStream,
    state: Arc<Mutex<LiveState>>,
    access: Access,
    reloads: ReloadRequests,
) -> io::Result<()> {
    let credentials = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    let allowed = credentials.uid() == 0 || access.group == Some(credentials.gid());
    if !allowed {
        log::warn!(
            "control socket: refused client uid {} gid {} (pid {:?}): not root or the configured group",
            credentials.uid(),
            credentials.gid(),
            credentials.pid()
        );
        let refusal = Response::error(
            "permission denied: the portguard control socket serves root and its configured group only",
        );
        return write.write_all(refusal.to_line().as_bytes()).await;
    }
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    let mut budget = RequestBudget::new(Instant::now());
    loop {
        line.clear();
        let read = (&mut reader)
            .take(MAX_REQUEST_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if read == 0 {
            return Ok(());
        }
        if line.len() > MAX_REQUEST_BYTES {
            // The rest of this line cannot be told apart from the next request: hang up.
            let error = Response::error(format!("request longer than {MAX_REQUEST_BYTES} bytes"));
            return write.write_all(error.to_line().as_bytes()).await;
        }
        if !budget.take(Instant::now()) {
            log::warn!(
                "control socket: hung up on uid {} (pid {:?}): more than {REQUEST_BURST} requests at once or {REQUESTS_PER_SECOND} a second",
                credentials.uid(),
                credentials.pid()
            );
            let error = Response::error(format!(
                "rate limit: at most {REQUEST_BURST} requests at once and {REQUESTS_PER_SECOND} a second on one connection; reconnect and slow down"
            ));
            return write.write_all(error.to_line().as_bytes()).await;
        }
        let request = match decode_request(&line) {
            Ok(request) => request,
            Err(message) => {
                write
                    .write_all(Response::error(message).to_line().as_bytes())
                    .await?;
                continue;
            }
        };
        match request.command {
            Command::Status => {
                let response = match state.lock().map_err(|_| poisoned())?.status() {
                    Ok(status) => Response::status(status),
                    Err(error) => Response::error(format!("reading counters: {error}")),
                };
                write.write_all(response.to_line().as_bytes()).await?;
            }
            Command::Reload => {
                let (answer, outcome) = oneshot::channel();
                let response = if credentials.uid() != 0 {
                    Response::error("permission denied: only root may reload the policy")
                } else if reloads.send(answer).await.is_err() {
                    Response::error("the daemon is stopping")
                } else {
                    match outcome.await {
                        Ok(Ok(summary)) => Response::reloaded(summary),
                        Ok(Err(errors)) => Response::error(errors),
                        Err(_) => Response::error("the daemon is stopping"),
                    }
                };
                write.write_all(response.to_line().as_bytes()).await?;
            }
            Command::Events {
                follow,
                scope,
                limit,
            } => {
                return events(&mut write, &state, follow, scope, limit).await;
            }
        }
    }
}

async fn events(
    write: &mut OwnedWriteHalf,
    state: &Mutex<LiveState>,
    follow: bool,
    scope: Option<String>,
    limit: Option<usize>,
) -> io::Result<()> {
    let snapshot = {
        let state = state.lock().map_err(|_| poisoned())?;
        match &scope {
            Some(name) if !state.has_scope(name) => None,
            // Subscribe before copying the history so nothing falls between the two.
            _ => Some((state.recent(scope.as_deref(), limit), state.follow())),
        }
    };
    let Some((recent, mut live)) = snapshot else {
        let name = scope.unwrap_or_default();
        let error = Response::error(format!("no scope named `{name}` in the running policy"));
        return write.write_all(error.to_line().as_bytes()).await;
    };
    for event in recent {
        write
            .write_all(Response::event(event).to_line().as_bytes())
            .await?;
    }
    if !follow {
        return write.write_all(Response::end().to_line().as_bytes()).await;
    }
    loop {
        match live.recv().await {
            Ok((received, names)) => {
                let event = decode(&received, &names);
                if scope.is_some() && event.scope != scope {
                    continue;
                }
                write
                    .write_all(Response::event(event).to_line().as_bytes())
                    .await?;
            }
            Err(RecvError::Lagged(missed)) => {
                let notice = Response::error(format!(
                    "this follower fell behind and missed {missed} events"
                ));
                write.write_all(notice.to_line().as_bytes()).await?;
            }
            Err(RecvError::Closed) => return Ok(()),
        }
    }
}

fn poisoned() -> io::Error {
    io::Error::other("daemon state lock poisoned")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_connection_gets_a_burst_then_the_sustained_rate() {
        let start = Instant::now();
        let mut budget = RequestBudget::new(start);
        for _ in 0..REQUEST_BURST {
            assert!(budget.take(start));
        }
        assert!(!budget.take(start), "the burst is spent");
        let one_request = Duration::from_secs(1) / REQUESTS_PER_SECOND;
        assert!(budget.take(start + one_request));
        assert!(!budget.take(start + one_request));
        // An idle connection earns back its burst, and no more.
        let later = start + Duration::from_secs(3600);
        for _ in 0..REQUEST_BURST {
            assert!(budget.take(later));
        }
        assert!(!budget.take(later));
    }
}
