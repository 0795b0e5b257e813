//! `portguard events`: recent events, then optionally the live stream.

use std::{io::Write as _, path::Path};

use crate::{client, event_log, protocol::Command};

pub fn run(socket: &Path, follow: bool, json: bool, scope: Option<String>) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    client::exchange(
        socket,
        Command::Events {
            follow,
            scope,
            limit: None,
        },
        |response| {
            if response.end == Some(true) {
                return Ok(false);
            }
            if let Some(event) = response.event {
                let mut out = stdout.lock();
                if json {
                    writeln!(out, "{}", serde_json::to_string(&event)?)?;
                } else {
                    writeln!(out, "{} {}", event.time, event_log::describe(&event))?;
                }
                // Followers read as a stream: every event goes out when it arrives.
                out.flush()?;
            }
            Ok(true)
        },
    )
}
