//! The host's own port settings, and where a policy collides with them.

use std::{fs, io};

use super::{Policy, PortRange};

const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// `net.ipv4.ip_local_port_range` and `net.ipv4.ip_local_reserved_ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPorts {
    pub local_range: PortRange,
    pub reserved: Vec<PortRange>,
}

impl HostPorts {
    pub fn read() -> io::Result<Self> {
        let range = read_sysctl(LOCAL_PORT_RANGE)?;
        let reserved = read_sysctl(RESERVED_PORTS)?;
        Self::parse(&range, &reserved)
            .map_err(|message| io::Error::new(io::ErrorKind::InvalidData, message))
    }

    /// Parses the two sysctl files' contents ("32768\t60999", "8080,9000-9010").
    pub fn parse(range: &str, reserved: &str) -> Result<Self, String> {
        let mut ends = range.split_whitespace().map(str::parse::<u16>);
        let local_range = match (ends.next(), ends.next()) {
            (Some(Ok(lo)), Some(Ok(hi))) if lo <= hi => PortRange::new(lo, hi),
            _ => {
                return Err(format!(
                    "cannot read {LOCAL_PORT_RANGE}: `{}`",
                    range.trim()
                ));
            }
        };
        let reserved = reserved
            .trim()
            .split(',')
            .filter(|part| !part.is_empty())
            .map(|part| PortRange::parse(part).map_err(|e| format!("{RESERVED_PORTS}: {e}")))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            local_range,
            reserved,
        })
    }
}

/// Reads a sysctl file in one read: some handlers (ip_local_reserved_ports among them) only
/// answer a read at offset 0, so the small first read of `read_to_string` truncates them.
pub fn read_sysctl(path: &str) -> io::Result<String> {
    use std::io::Read as _;
    // The longest reserved-ports value (every other port) is under 400 KiB.
    let mut buffer = vec![0u8; 512 * 1024];
    let read = fs::File::open(path)?.read(&mut buffer)?;
    buffer.truncate(read);
    String::from_utf8(buffer)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("{path} is not text")))
}

/// Warnings for scope ranges the kernel's own allocator may also use, or that other services
/// reserved.
pub fn host_warnings(policy: &Policy, host: &HostPorts) -> Vec<String> {
    let mut warnings = vec![];
    for scope in &policy.scopes {
        // With `reserve`, the daemon reserves the scope's ports itself.
        if let Some(shared) = scope
            .ephemeral
            .intersection(&host.local_range)
            .filter(|_| !policy.reserve)
        {
            let reserved = host
                .reserved
                .iter()
                .filter_map(|r| r.intersection(&shared))
                .map(|r| r.len())
                .sum::<u32>();
            if reserved < shared.len() {
                warnings.push(format!(
                    "scope `{}`: ephemeral range {} overlaps net.ipv4.ip_local_port_range {} on ports {}: \
                     the kernel may hand these ports to processes outside the scope; \
                     add them to net.ipv4.ip_local_reserved_ports",
                    scope.name, scope.ephemeral, host.local_range, shared
                ));
            }
        }
        for reserved in &host.reserved {
            if let Some(shared) = scope.ephemeral.intersection(reserved) {
                warnings.push(format!(
                    "scope `{}`: ephemeral range {} overlaps net.ipv4.ip_local_reserved_ports entry {} on ports {}: \
                     ports are reserved so that a fixed service can bind them; check that none does",
                    scope.name, scope.ephemeral, reserved, shared
                ));
            }
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse;

    #[test]
    fn reads_sysctl_formats() {
        let host = HostPorts::parse("32768\t60999\n", "8080,9000-9010\n").expect("parses");
        assert_eq!(host.local_range, PortRange::new(32768, 60999));
        assert_eq!(
            host.reserved,
            [PortRange::new(8080, 8080), PortRange::new(9000, 9010)]
        );
        assert_eq!(
            HostPorts::parse("1 2", "")
                .expect("empty reserved")
                .reserved,
            []
        );
        assert!(HostPorts::parse("garbage", "").is_err());
    }

    #[test]
    fn warns_with_the_ports_involved() {
        let policy = parse(
            "reserve = false\n[[scope]]\nname = \"a\"\ncgroup = \"a\"\nephemeral = \"60000-61999\"\n\
             [[scope]]\nname = \"b\"\ncgroup = \"b\"\nephemeral = \"62000-62099\"\n",
        )
        .expect("valid");
        let host = HostPorts::parse("32768 60999", "62050-62060").expect("parses");
        assert_eq!(
            host_warnings(&policy, &host),
            [
                "scope `a`: ephemeral range 60000-61999 overlaps net.ipv4.ip_local_port_range 32768-60999 on ports 60000-60999: the kernel may hand these ports to processes outside the scope; add them to net.ipv4.ip_local_reserved_ports",
                "scope `b`: ephemeral range 62000-62099 overlaps net.ipv4.ip_local_reserved_ports entry 62050-62060 on ports 62050-62060: ports are reserved so that a fixed service can bind them; check that none does",
            ]
        );
        // Reserved inside the kernel's range: the kernel will not hand them out, but they are
        // still someone's reservation.
        let host = HostPorts::parse("32768 60999", "60000-60999").expect("parses");
        let warnings = host_warnings(&policy, &host);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("ip_local_reserved_ports entry 60000-60999 on ports 60000-60999")
        );
    }
}
