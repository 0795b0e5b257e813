//! The TOML policy: model, parsing with located errors, validation, and compilation to the
//! contents of the kernel maps. Everything here is pure; the daemon and `check` do the I/O.

mod compile;
mod host;
mod parse;
mod range;
mod scope_ids;
mod selector;

use std::fmt;

pub use compile::{CompiledPolicy, compile};
pub use host::{HostPorts, host_warnings, read_sysctl};
pub use parse::parse;
pub use range::PortRange;
pub use scope_ids::assign_ids;
pub use selector::Selector;

/// The policy a daemon starts with when no file is given and /etc/portguard/policy.toml is absent:
/// watch every socket under the attach point, change nothing.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../policy/default.toml");

/// What a scope (or the whole policy) does with its decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Steer and refuse.
    Enforce,
    /// Decide and count, never refuse or steer.
    Audit,
    /// Top level only: audit everything and record every bind/connect under the attach point,
    /// scoped or not.
    Observe,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
            Mode::Observe => "observe",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// Add every scope range to net.ipv4.ip_local_reserved_ports (`reserve`, default true).
    pub reserve: bool,
    pub scopes: Vec<Scope>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    pub name: String,
    /// Which cgroups the scope holds.
    pub selector: Selector,
    /// The scope's ports: its ephemeral range, or with `pool` the whole pool.
    pub ephemeral: PortRange,
    /// With `pool`: every selected cgroup gets its own block of this many ports from the pool.
    pub block: Option<u16>,
    /// `None`: explicit binds may use any port outside other scopes' ranges.
    pub bind: Option<Vec<PortRange>>,
    /// Per-scope override of the policy's mode.
    pub mode: Option<Mode>,
    /// Refuse to send from ports the kernel autobound outside the range.
    pub strict: bool,
    /// connect() shares a port between connections to different destinations (the default),
    /// or gives each connection a port of its own.
    pub share: bool,
    /// Where the scope's table starts in the file.
    pub at: Location,
}

impl Scope {
    /// The mode the kernel applies to this scope's sockets.
    pub fn effective_mode(&self, policy_mode: Mode) -> Mode {
        match (policy_mode, self.mode) {
            (Mode::Observe, _) => Mode::Audit,
            (_, Some(mode)) => mode,
            (mode, None) => mode,
        }
    }
}

/// Line and column, both from 1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl Location {
    /// The location of byte `offset` of `text`.
    pub fn of(text: &str, offset: usize) -> Self {
        let before = &text[..floor_char_boundary(text, offset)];
        let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
        Self {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }
}

fn floor_char_boundary(text: &str, offset: usize) -> usize {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// One problem found in a policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    pub at: Location,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

/// Every error of a policy, in file order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.0.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl PolicyErrors {
    /// Prefixes every error with `file` the way compilers do: `file:line:column: message`.
    pub fn located_in(&self, file: &str) -> String {
        self.0
            .iter()
            .map(|error| format!("{file}:{error}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
