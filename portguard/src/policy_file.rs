//! Reading a policy from disk: where it comes from and what can go wrong before parsing.

use std::{
    fs,
    io::Read as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

use crate::policy::{self, Policy};

/// The file a daemon reads when no `--policy` is given.
pub const SYSTEM_POLICY: &str = "/etc/portguard/policy.toml";
/// Policies are small; anything bigger is a mistake (a wrong file), not a policy.
const MAX_POLICY_BYTES: u64 = 4 * 1024 * 1024;

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

    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let name = path.display().to_string();
        let file = fs::File::open(path).with_context(|| format!("cannot open policy {name}"))?;
        let metadata = file
            .metadata()
            .with_context(|| format!("cannot read policy {name}"))?;
        if !metadata.is_file() {
            bail!("policy {name} is not a regular file");
        }
        let mut bytes = vec![];
        file.take(MAX_POLICY_BYTES + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("cannot read policy {name}"))?;
        if bytes.len() as u64 > MAX_POLICY_BYTES {
            bail!("policy {name} is larger than {MAX_POLICY_BYTES} bytes; is it the right file?");
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

#[cfg(test)]
mod tests {
    use super::*;

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
