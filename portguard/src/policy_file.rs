//! Reading a policy from disk: where it comes from and what can go wrong before parsing.
//!
//! Every error names the file first, as `file: message` for the file as a whole and
//! `file:line:column: message` for its contents, so `check`, a refused daemon start and a
//! refused reload all point at the same place.

use std::{
    fs,
    io::Read as _,
    os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::bail;

use crate::policy::{self, Policy};

/// The file a daemon reads when no `--policy` is given.
pub const SYSTEM_POLICY: &str = "/etc/portguard/policy.toml";
/// Policies are small; anything bigger is a mistake (a wrong file), not a policy.
pub const MAX_POLICY_BYTES: u64 = 4 * 1024 * 1024;

/// A policy and the name to report its errors under.
pub struct PolicySource {
    pub name: String,
    pub text: String,
}

impl PolicySource {
    /// `--policy FILE`, else the system policy if it exists, else the embedded default.
    pub fn choose(explicit: Option<&Path>) -> anyhow::Result<Self> {
        if let Some(path) = explicit {
            return Self::read(path);
        }
        let system = PathBuf::from(SYSTEM_POLICY);
        if system.exists() {
            return Self::read(&system);
        }
        Ok(Self {
            name: "<embedded default policy>".into(),
            text: policy::EMBEDDED_DEFAULT.into(),
        })
    }

    /// Reads a regular file of at most [`MAX_POLICY_BYTES`]. A FIFO, device or directory at the
    /// path is refused without blocking on it (the open does not wait for a writer).
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let name = path.display().to_string();
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(|error| anyhow::anyhow!("{name}: cannot open the policy: {error}"))?;
        let metadata = file
            .metadata()
            .map_err(|error| anyhow::anyhow!("{name}: cannot read the policy: {error}"))?;
        let file_type = metadata.file_type();
        if !file_type.is_file() {
            let kind = if file_type.is_dir() {
                "a directory"
            } else if file_type.is_fifo() {
                "a FIFO"
            } else if file_type.is_socket() {
                "a socket"
            } else if file_type.is_char_device() || file_type.is_block_device() {
                "a device"
            } else {
                "not a regular file"
            };
            bail!("{name}: the policy is {kind}; a policy must be a regular file");
        }
        if metadata.len() > MAX_POLICY_BYTES {
            bail!(too_big(&name, metadata.len()));
        }
        let mut bytes = vec![];
        // The size may change between the stat and the read: bound the read as well.
        file.take(MAX_POLICY_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|error| anyhow::anyhow!("{name}: cannot read the policy: {error}"))?;
        Self::from_bytes(name, bytes)
    }

    /// The policy in `bytes`, read from the file called `name`: refused when it is larger than
    /// [`MAX_POLICY_BYTES`] or not UTF-8 (with the location of the first bad byte).
    pub fn from_bytes(name: String, bytes: Vec<u8>) -> anyhow::Result<Self> {
        if bytes.len() as u64 > MAX_POLICY_BYTES {
            bail!(too_big(&name, bytes.len() as u64));
        }
        let text = String::from_utf8(bytes).map_err(|error| {
            let offset = error.utf8_error().valid_up_to();
            let at = policy::Location::of(
                std::str::from_utf8(&error.as_bytes()[..offset]).unwrap_or_default(),
                offset,
            );
            anyhow::anyhow!("{name}:{at}: the policy is not UTF-8 text")
        })?;
        Ok(Self { name, text })
    }

    /// Parses the policy; the error lists every problem as `file:line:column: message`.
    ///
    /// A file with nothing in it but blanks and comments is refused: it is what a file cut short
    /// while being written (truncated, then reloaded before the new text landed) looks like,
    /// and taken as a policy it would drop every scope at once.
    pub fn parse(&self) -> anyhow::Result<Policy> {
        if self.text.lines().all(|line| {
            let line = line.trim();
            line.is_empty() || line.starts_with('#')
        }) {
            bail!(
                "{}:1:1: the policy is empty (a truncated file?); a policy without scopes says \
                 so with at least `mode = \"...\"`",
                self.name
            );
        }
        policy::parse(&self.text).map_err(|errors| {
            anyhow::anyhow!(
                "{}\n{}: {} error{}",
                errors.located_in(&self.name),
                self.name,
                errors.0.len(),
                if errors.0.len() == 1 { "" } else { "s" }
            )
        })
    }
}

fn too_big(name: &str, bytes: u64) -> String {
    format!(
        "{name}: the policy is larger than {} MiB (at least {bytes} bytes); is it the right file?",
        MAX_POLICY_BYTES / (1024 * 1024)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file_first() {
        let error = PolicySource::from_bytes("p.toml".into(), b"mode = \"a\xffb\"\n".to_vec())
            .err()
            .expect("not UTF-8");
        assert_eq!(
            error.to_string(),
            "p.toml:1:10: the policy is not UTF-8 text"
        );
        let error =
            PolicySource::from_bytes("p.toml".into(), vec![b'#'; MAX_POLICY_BYTES as usize + 1])
                .err()
                .expect("too big");
        assert!(
            error
                .to_string()
                .starts_with("p.toml: the policy is larger than 4 MiB")
        );
    }

    fn source(text: &str) -> PolicySource {
        PolicySource {
            name: "p.toml".into(),
            text: text.into(),
        }
    }

    #[test]
    fn an_empty_policy_is_refused_but_one_without_scopes_is_not() {
        for empty in ["", "\n  \n", "# all scopes go here\n\n"] {
            let error = format!("{:#}", source(empty).parse().expect_err(empty));
            assert!(
                error.starts_with("p.toml:1:1: the policy is empty"),
                "{empty:?}: {error}"
            );
        }
        let policy = source("# nothing scoped yet\nmode = \"enforce\"\n")
            .parse()
            .expect("a policy without scopes");
        assert!(policy.scopes.is_empty());
    }
}
