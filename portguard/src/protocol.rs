//! The control socket's protocol: one JSON object per line each way, each carrying `version`.
//!
//! Requests: `{"version":1,"command":"status"}` and
//! `{"version":1,"command":"events","follow":false,"scope":"web","limit":100}`.
//! Responses: `{"version":1,"ok":true,"status":{..}}`, a stream of `{"version":1,"ok":true,
//! "event":{..}}` closed by `{"version":1,"ok":true,"end":true}` (not sent when following), or
//! `{"version":1,"ok":false,"error":".."}`.

use serde::{Deserialize, Serialize};

pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line the daemon reads; longer ones are refused without being buffered.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
pub const DEFAULT_SOCKET: &str = "/run/portguard/portguard.sock";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub version: u32,
    #[serde(flatten)]
    pub command: Command,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    Status,
    /// Re-read the policy; answered with `reloaded` or the policy's errors.
    Reload,
    Events {
        #[serde(default)]
        follow: bool,
        #[serde(default)]
        scope: Option<String>,
        /// Most recent events to send first; default: all the daemon keeps.
        #[serde(default)]
        limit: Option<usize>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub version: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<EventRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<bool>,
    /// What a successful reload applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reloaded: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    fn new() -> Self {
        Self {
            version: PROTOCOL_VERSION,
            ok: true,
            status: None,
            event: None,
            end: None,
            reloaded: None,
            error: None,
        }
    }
    pub fn reloaded(summary: String) -> Self {
        Self {
            reloaded: Some(summary),
            ..Self::new()
        }
    }
    pub fn status(status: Status) -> Self {
        Self {
            status: Some(status),
            ..Self::new()
        }
    }
    pub fn event(event: EventRecord) -> Self {
        Self {
            event: Some(event),
            ..Self::new()
        }
    }
    pub fn end() -> Self {
        Self {
            end: Some(true),
            ..Self::new()
        }
    }
    pub fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(message.into()),
            ..Self::new()
        }
    }
    /// The response as one line, newline included.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).unwrap_or_else(|error| {
            format!(r#"{{"version":{PROTOCOL_VERSION},"ok":false,"error":"encoding: {error}"}}"#)
        });
        line.push('\n');
        line
    }
}

/// Decodes one request line (its newline, if any, included). The error is the message of the
/// error response the daemon sends back; the daemon carries on with the next line.
pub fn decode_request(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(format!("request longer than {MAX_REQUEST_BYTES} bytes"));
    }
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|error| format!("malformed request: {error}"))?;
    match value.get("version").and_then(serde_json::Value::as_u64) {
        Some(version) if version == u64::from(PROTOCOL_VERSION) => {}
        Some(version) => {
            return Err(format!(
                "unsupported protocol version {version}; this daemon speaks version {PROTOCOL_VERSION}"
            ));
        }
        None => return Err("request has no numeric `version`".into()),
    }
    serde_json::from_value(value).map_err(|error| format!("invalid request: {error}"))
}

/// `portguard status --json` prints exactly this.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: u32,
    pub uptime_s: u64,
    /// Events the programs could not put in the ring buffer, since the installation began.
    pub lost_events: u64,
    /// Event records this daemon has read from the ring buffer since it started: with
    /// `lost_events`, every event the programs emitted is accounted for.
    #[serde(default)]
    pub events_received: u64,
    pub mode: String,
    pub policy: String,
    pub scopes: Vec<ScopeStatus>,
    pub unscoped: ScopeCounters,
    /// The last reload (SIGHUP or `portguard reload`), if any.
    pub last_reload: Option<LastReload>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LastReload {
    pub ok: bool,
    pub age_s: f64,
    /// Why the reload was refused; the previous policy stayed in force.
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScopeStatus {
    pub name: String,
    pub cgroup: String,
    /// Whether the scope holds any cgroup now.
    pub active: bool,
    /// The cgroups the scope's selector matches now, relative to the cgroup2 root.
    pub cgroups: Vec<String>,
    /// A pool's block size; each cgroup's block is in `blocks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<BlockStatus>,
    /// Cgroups a full pool has no block for (they stay unscoped until one frees up).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pool_exhausted: Vec<String>,
    pub mode: String,
    pub range: [u16; 2],
    pub size: u32,
    pub in_use: u64,
    pub peak: u64,
    pub steered: u64,
    pub denied: u64,
    pub exhausted: u64,
    pub allowed: u64,
    pub audit_would_deny: u64,
    pub unsteered: u64,
    /// Seconds since the scope's last event, if it had one.
    pub last_event_age_s: Option<f64>,
}

/// One cgroup's block of a pool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockStatus {
    pub cgroup: String,
    pub range: [u16; 2],
    pub in_use: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ScopeCounters {
    pub denied: u64,
    pub audit_would_deny: u64,
}

/// One kernel event, decoded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// CLOCK_MONOTONIC nanoseconds, as the kernel stamped it.
    pub ts_ns: u64,
    /// Wall-clock time the daemon received it, RFC 3339.
    pub time: String,
    pub tgid: u32,
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub scope_id: Option<u32>,
    pub scope: Option<String>,
    pub family: String,
    pub protocol: String,
    pub op: String,
    pub local_port: u16,
    pub remote_addr: Option<String>,
    pub remote_port: Option<u16>,
    pub verdict: String,
    pub attempts: u32,
    pub errno: i32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_decode_with_defaults() {
        let request: Request =
            serde_json::from_str(r#"{"version":1,"command":"events","follow":true}"#)
                .expect("valid");
        assert_eq!(
            request.command,
            Command::Events {
                follow: true,
                scope: None,
                limit: None
            }
        );
        let request: Request =
            serde_json::from_str(r#"{"version":1,"command":"status"}"#).expect("valid");
        assert_eq!(request.command, Command::Status);
        assert!(serde_json::from_str::<Request>(r#"{"version":1,"command":"reboot"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"command":"status"}"#).is_err());
    }

    #[test]
    fn error_responses_are_one_line() {
        let line = Response::error("bad \"request\"\nhere").to_line();
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.starts_with(r#"{"version":1,"ok":false,"error":"bad \"request\"\nhere"}"#));
    }
}
