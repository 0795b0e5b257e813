//! The CLI side of the control socket.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
};

use anyhow::{Context as _, bail};

use crate::protocol::{PROTOCOL_VERSION, Request, Response};

/// Sends `command` and calls `each` for every response line until the daemon ends the answer
/// (or `each` returns false).
pub fn exchange(
    socket: &Path,
    command: crate::protocol::Command,
    mut each: impl FnMut(Response) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let stream = UnixStream::connect(socket).map_err(|error| {
        anyhow::anyhow!(
            "cannot reach the portguard daemon at {}: {error} (is `portguard daemon` running, and are you root?)",
            socket.display()
        )
    })?;
    let request = Request {
        version: PROTOCOL_VERSION,
        command,
    };
    let mut line = serde_json::to_string(&request).context("encoding the request")?;
    line.push('\n');
    // A daemon that refuses this client answers and hangs up without reading the request, so a
    // failed write is only reported if no answer explains it.
    let written = (&stream).write_all(line.as_bytes());
    for line in BufReader::new(&stream).lines() {
        let line = match (line, &written) {
            (Ok(line), _) => line,
            (Err(_), Err(error)) => bail!("writing to {}: {error}", socket.display()),
            (Err(error), Ok(())) => bail!("reading from {}: {error}", socket.display()),
        };
        let response: Response = serde_json::from_str(&line)
            .with_context(|| format!("the daemon sent something that is not a response: {line}"))?;
        if !response.ok && response.event.is_none() && response.status.is_none() {
            let message = response.error.unwrap_or_else(|| "unknown error".into());
            if message.contains("fell behind") {
                eprintln!("portguard: {message}");
                continue;
            }
            bail!("the daemon refused: {message}");
        }
        if !each(response)? {
            return Ok(());
        }
    }
    written.with_context(|| format!("writing to {}", socket.display()))?;
    Ok(())
}
