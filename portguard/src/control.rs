//! The daemon's control socket: newline-delimited JSON, root (or one configured group) only.
//! A bad request gets an error response and never disturbs the daemon.

use std::{
    fs, io,
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream, unix::OwnedWriteHalf},
    sync::{broadcast::error::RecvError, mpsc, oneshot},
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
    if let Some(parent) = path.parent()
        && !parent.exists()
    {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        fs::set_permissions(parent, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot set permissions on {}", parent.display()))?;
    }
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

/// Accepts clients until the task is dropped.
pub async fn serve(
    socket: &ControlSocket,
    state: Arc<Mutex<LiveState>>,
    access: Access,
    reloads: ReloadRequests,
) {
    loop {
        match socket.listener.accept().await {
            Ok((stream, _)) => {
                let state = state.clone();
                let reloads = reloads.clone();
                tokio::spawn(async move {
                    if let Err(error) = client(stream, state, access, reloads).await {
                        log::debug!("control client: {error}");
                    }
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
