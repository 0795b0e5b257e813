//! Reading the host's port settings and listening sockets from /proc.

use std::{collections::HashMap, fs, io, net::IpAddr};

use crate::policy::{HostPorts, PortRange};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFacts {
    pub local_range: PortRange,
    pub reserved: Vec<PortRange>,
    pub unprivileged_port_start: u32,
    pub listeners: Vec<Listener>,
}

/// A TCP socket in LISTEN, or a bound, unconnected UDP socket.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Listener {
    pub protocol: &'static str,
    pub address: IpAddr,
    pub port: u16,
    /// Processes holding the socket, as "comm (pid N)".
    pub owners: Vec<String>,
}

impl HostFacts {
    pub fn read() -> io::Result<Self> {
        let ports = HostPorts::read()?;
        let unprivileged_port_start =
            crate::policy::read_sysctl("/proc/sys/net/ipv4/ip_unprivileged_port_start")?
                .trim()
                .parse()
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        "ip_unprivileged_port_start is not a number",
                    )
                })?;
        let owners = socket_owners();
        let mut listeners = vec![];
        for (file, protocol, listening_state) in [
            ("/proc/net/tcp", "tcp", "0A"),
            ("/proc/net/tcp6", "tcp", "0A"),
            ("/proc/net/udp", "udp", "07"),
            ("/proc/net/udp6", "udp", "07"),
        ] {
            // A kernel without IPv6 has no *6 files.
            let Ok(table) = fs::read_to_string(file) else {
                continue;
            };
            listeners.extend(parse_socket_table(
                &table,
                protocol,
                listening_state,
                &owners,
            ));
        }
        listeners.sort_by_key(|l| (l.port, l.protocol));
        listeners.dedup_by(|a, b| {
            a.port == b.port && a.protocol == b.protocol && a.address == b.address
        });
        Ok(Self {
            local_range: ports.local_range,
            reserved: ports.reserved,
            unprivileged_port_start,
            listeners,
        })
    }
}

/// Parses /proc/net/{tcp,udp}{,6}: sockets in `listening_state` whose remote port is 0.
pub fn parse_socket_table(
    table: &str,
    protocol: &'static str,
    listening_state: &str,
    owners: &HashMap<u64, Vec<String>>,
) -> Vec<Listener> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, state, inode) = (
                fields.get(1)?,
                fields.get(2)?,
                fields.get(3)?,
                fields.get(9)?,
            );
            if *state != listening_state || !remote.ends_with(":0000") {
                return None;
            }
            let (address, port) = local.split_once(':')?;
            let inode: u64 = inode.parse().ok()?;
            Some(Listener {
                protocol,
                address: parse_hex_address(address)?,
                port: u16::from_str_radix(port, 16).ok()?,
                owners: owners.get(&inode).cloned().unwrap_or_default(),
            })
        })
        .collect()
}

/// /proc/net addresses are the kernel's 32-bit words in host order, printed as hex.
fn parse_hex_address(hex: &str) -> Option<IpAddr> {
    let words: Vec<u32> = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok())
        .collect::<Option<_>>()?;
    let bytes: Vec<u8> = words.iter().flat_map(|word| word.to_ne_bytes()).collect();
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

/// socket inode -> "comm (pid N)" of every process holding it (all of them as root; one's own
/// otherwise).
fn socket_owners() -> HashMap<u64, Vec<String>> {
    let mut owners: HashMap<u64, Vec<String>> = HashMap::new();
    let Ok(processes) = fs::read_dir("/proc") else {
        return owners;
    };
    for process in processes.flatten() {
        let Some(pid) = process
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        let comm = fs::read_to_string(process.path().join("comm")).unwrap_or_default();
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            let owner = format!("{} (pid {pid})", comm.trim());
            let list = owners.entry(inode).or_default();
            if !list.contains(&owner) {
                list.push(owner);
            }
        }
    }
    owners
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listening_sockets_and_skips_the_rest() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:9C40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0\n\
   1: 0100007F:9C41 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 5678 1 0\n";
        let owners = HashMap::from([(1234, vec!["nginx (pid 7)".to_owned()])]);
        let listeners = parse_socket_table(table, "tcp", "0A", &owners);
        assert_eq!(
            listeners,
            [Listener {
                protocol: "tcp",
                address: "127.0.0.1".parse().expect("ip"),
                port: 40000,
                owners: vec!["nginx (pid 7)".into()],
            }]
        );
    }

    #[test]
    fn parses_ipv6_addresses() {
        assert_eq!(
            parse_hex_address("00000000000000000000000001000000"),
            Some("::1".parse().expect("ip"))
        );
    }
}
