//! `portguard reload`: ask the running daemon to re-read its policy.

use std::path::Path;

use crate::{client, protocol::Command};

pub fn run(socket: &Path) -> anyhow::Result<()> {
    client::exchange(socket, Command::Reload, |response| {
        if let Some(summary) = response.reloaded {
            println!("{summary}");
        }
        Ok(false)
    })
}
