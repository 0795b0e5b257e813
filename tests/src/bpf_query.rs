//! Asking the kernel which programs are attached to a cgroup (BPF_PROG_QUERY), so tests can
//! prove a stopped daemon left nothing behind.

use std::{fs::File, os::fd::AsRawFd as _, path::Path};

pub const BPF_CGROUP_INET4_BIND: u32 = 8;
pub const BPF_CGROUP_INET6_BIND: u32 = 9;
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;
pub const BPF_CGROUP_INET4_POST_BIND: u32 = 12;
pub const BPF_CGROUP_INET6_POST_BIND: u32 = 13;
pub const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
pub const BPF_CGROUP_UDP6_SENDMSG: u32 = 15;
pub const BPF_CGROUP_INET_SOCK_RELEASE: u32 = 34;

pub const PORTGUARD_ATTACH_TYPES: [u32; 9] = [
    BPF_CGROUP_INET4_BIND,
    BPF_CGROUP_INET6_BIND,
    BPF_CGROUP_INET4_CONNECT,
    BPF_CGROUP_INET6_CONNECT,
    BPF_CGROUP_INET4_POST_BIND,
    BPF_CGROUP_INET6_POST_BIND,
    BPF_CGROUP_UDP4_SENDMSG,
    BPF_CGROUP_UDP6_SENDMSG,
    BPF_CGROUP_INET_SOCK_RELEASE,
];

/// What `portguard_programs` answers when every hook has portguard's program, and when none has.
pub const ALL_ATTACHED: [u32; PORTGUARD_ATTACH_TYPES.len()] = [1; PORTGUARD_ATTACH_TYPES.len()];
pub const NONE_ATTACHED: [u32; PORTGUARD_ATTACH_TYPES.len()] = [0; PORTGUARD_ATTACH_TYPES.len()];
/// What `portguard_programs` answers when every hook has `all` programs but `attach_type`,
/// which has `count`.
pub fn attached_except(
    all: u32,
    attach_type: u32,
    count: u32,
) -> [u32; PORTGUARD_ATTACH_TYPES.len()] {
    PORTGUARD_ATTACH_TYPES.map(|hook| if hook == attach_type { count } else { all })
}

/// Links portguard pins (one per hook) and maps it pins, as `uninstall` reports them.
pub const PORTGUARD_LINK_COUNT: usize = PORTGUARD_ATTACH_TYPES.len();
pub const PORTGUARD_MAP_COUNT: usize = 19;

const BPF_PROG_QUERY: libc::c_long = 16;

/// Number of programs attached directly to the cgroup at `dir` for `attach_type`.
pub fn attached_programs(dir: &Path, attach_type: u32) -> u32 {
    let cgroup = File::open(dir).expect("open cgroup");
    // union bpf_attr, query part: target_fd, attach_type, query_flags, attach_flags,
    // prog_ids (u64), prog_cnt (u32), ...; the rest stays zero.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(cgroup.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&attach_type.to_ne_bytes());
    // SAFETY: attr is a valid, large-enough bpf_attr; prog_ids is NULL so only the count is set.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            attr.as_mut_ptr(),
            attr.len() as u32,
        )
    };
    assert_eq!(
        ret,
        0,
        "BPF_PROG_QUERY: {}",
        std::io::Error::last_os_error()
    );
    u32::from_ne_bytes(attr[24..28].try_into().expect("4 bytes"))
}

/// Programs attached at `dir` for each of portguard's attach types.
pub fn portguard_programs(dir: &Path) -> Vec<u32> {
    PORTGUARD_ATTACH_TYPES
        .iter()
        .map(|&attach_type| attached_programs(dir, attach_type))
        .collect()
}
