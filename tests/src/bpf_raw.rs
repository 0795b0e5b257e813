//! Raw bpf(2) for the reliability tests: reading portguard's pinned maps without going through
//! the product (or aya, which it uses), and loading a tiny foreign cgroup program of our own, as
//! systemd's socket-bind filter would be, to check that the two coexist.
//!
//! `union bpf_attr` is laid out by hand, field offsets from uapi/linux/bpf.h; the rest of the
//! union stays zero, as the kernel requires.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;

pub const BPF_PROG_TYPE_CGROUP_SOCK: u32 = 9;
pub const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
/// `BPF_PROG_ATTACH` flag: several programs per cgroup and hook (what links always use).
pub const BPF_F_ALLOW_MULTI: u32 = 2;

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;

fn sys_bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<i64> {
    // SAFETY: attr is a zero-filled bpf_attr of the size passed; every pointer the caller put in
    // it points at a live buffer of the size the command expects.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn put_u32(attr: &mut [u8; 128], offset: usize, value: u32) {
    attr[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
}

fn put_u64(attr: &mut [u8; 128], offset: usize, value: u64) {
    attr[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
}

fn get_u32(bytes: &[u8], offset: usize) -> u32 {
    u32::from_ne_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes"))
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this new descriptor to us.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

/// Opens a pinned object (BPF_OBJ_GET).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut attr = [0u8; 128];
    put_u64(&mut attr, 0, c_path.as_ptr() as u64);
    sys_bpf(BPF_OBJ_GET, &mut attr).map(owned)
}

fn info(fd: &OwnedFd, len: usize) -> Vec<u8> {
    let mut info = vec![0u8; len];
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, fd.as_raw_fd() as u32);
    put_u32(&mut attr, 4, len as u32);
    put_u64(&mut attr, 8, info.as_mut_ptr() as u64);
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).expect("BPF_OBJ_GET_INFO_BY_FD");
    info
}

/// A pinned map, opened for reading.
pub struct PinnedMap {
    fd: OwnedFd,
    kind: u32,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
}

impl PinnedMap {
    pub fn open(path: &Path) -> Self {
        let fd = obj_get(path).unwrap_or_else(|e| panic!("BPF_OBJ_GET {}: {e}", path.display()));
        // struct bpf_map_info: type, id, key_size, value_size, max_entries, ...
        let info = info(&fd, 80);
        Self {
            fd,
            kind: get_u32(&info, 0),
            key_size: get_u32(&info, 8) as usize,
            value_size: get_u32(&info, 12) as usize,
            max_entries: get_u32(&info, 16),
        }
    }

    /// The keys of a hash map, walked with BPF_MAP_GET_NEXT_KEY.
    pub fn keys(&self) -> Vec<Vec<u8>> {
        assert_eq!(self.kind, BPF_MAP_TYPE_HASH, "keys() walks hash maps");
        let mut keys: Vec<Vec<u8>> = vec![];
        loop {
            let mut next = vec![0u8; self.key_size];
            let mut attr = [0u8; 128];
            put_u32(&mut attr, 0, self.fd.as_raw_fd() as u32);
            // A NULL key asks for the first one.
            put_u64(&mut attr, 8, keys.last().map_or(0, |k| k.as_ptr() as u64));
            put_u64(&mut attr, 16, next.as_mut_ptr() as u64);
            match sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                Ok(_) => keys.push(next),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return keys,
                Err(e) => panic!("BPF_MAP_GET_NEXT_KEY: {e}"),
            }
            assert!(
                keys.len() <= self.max_entries as usize,
                "a hash map walk that does not end"
            );
        }
    }

    /// The value under `key`; for a per-CPU map, every possible CPU's value one after the other.
    pub fn lookup(&self, key: &[u8]) -> Option<Vec<u8>> {
        let per_cpu = self.kind == BPF_MAP_TYPE_PERCPU_ARRAY;
        let len = if per_cpu {
            self.value_size.next_multiple_of(8) * possible_cpus()
        } else {
            self.value_size
        };
        let mut value = vec![0u8; len];
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, self.fd.as_raw_fd() as u32);
        put_u64(&mut attr, 8, key.as_ptr() as u64);
        put_u64(&mut attr, 16, value.as_mut_ptr() as u64);
        match sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => Some(value),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
            Err(e) => panic!("BPF_MAP_LOOKUP_ELEM: {e}"),
        }
    }

    /// Entries in use: a hash map's keys, or an array's elements that are not all zero.
    pub fn entries_in_use(&self) -> usize {
        match self.kind {
            BPF_MAP_TYPE_HASH => self.keys().len(),
            BPF_MAP_TYPE_ARRAY => (0..self.max_entries)
                .filter(|index| {
                    self.lookup(&index.to_ne_bytes())
                        .is_some_and(|value| value.iter().any(|&b| b != 0))
                })
                .count(),
            other => panic!("entries_in_use: map type {other} not supported"),
        }
    }

    /// The sum over CPUs of a per-CPU array's u64 element `index` (LOST_EVENTS).
    pub fn per_cpu_u64_sum(&self, index: u32) -> u64 {
        assert_eq!(self.kind, BPF_MAP_TYPE_PERCPU_ARRAY);
        assert_eq!(self.value_size, 8);
        let values = self.lookup(&index.to_ne_bytes()).expect("array element");
        values
            .chunks_exact(8)
            .map(|v| u64::from_ne_bytes(v.try_into().expect("8 bytes")))
            .sum()
    }
}

/// Number of possible CPUs (the per-CPU value count), from /sys/devices/system/cpu/possible.
fn possible_cpus() -> usize {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible").expect("possible CPUs");
    text.trim()
        .split(',')
        .map(|part| match part.split_once('-') {
            Some((lo, hi)) => {
                hi.parse::<usize>().expect("cpu") - lo.parse::<usize>().expect("cpu") + 1
            }
            None => 1,
        })
        .sum()
}

/// One eBPF instruction (struct bpf_insn).
#[derive(Clone, Copy)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    /// `dst = *(u32 *)(src + off)`
    pub const fn load_u32(dst: u8, src: u8, off: i16) -> Self {
        Self {
            code: 0x61, // BPF_LDX | BPF_MEM | BPF_W
            regs: (src << 4) | dst,
            off,
            imm: 0,
        }
    }
    /// `if dst == imm goto +off`
    pub const fn jump_if_equal(dst: u8, imm: i32, off: i16) -> Self {
        Self {
            code: 0x15, // BPF_JMP | BPF_JEQ | BPF_K
            regs: dst,
            off,
            imm,
        }
    }
    /// `dst = imm`
    pub const fn mov(dst: u8, imm: i32) -> Self {
        Self {
            code: 0xb7, // BPF_ALU64 | BPF_MOV | BPF_K
            regs: dst,
            off: 0,
            imm,
        }
    }
    pub const fn exit() -> Self {
        Self {
            code: 0x95, // BPF_JMP | BPF_EXIT
            regs: 0,
            off: 0,
            imm: 0,
        }
    }

    fn bytes(&self) -> [u8; 8] {
        let mut bytes = [0u8; 8];
        bytes[0] = self.code;
        bytes[1] = self.regs;
        bytes[2..4].copy_from_slice(&self.off.to_ne_bytes());
        bytes[4..8].copy_from_slice(&self.imm.to_ne_bytes());
        bytes
    }
}

/// Loads `insns` as a program of `prog_type` for `expected_attach_type`; on a verifier refusal
/// the panic carries the verifier's log.
pub fn prog_load(prog_type: u32, expected_attach_type: u32, name: &str, insns: &[Insn]) -> OwnedFd {
    let code: Vec<u8> = insns.iter().flat_map(Insn::bytes).collect();
    let license = CString::new("GPL").expect("license");
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, prog_type);
    put_u32(&mut attr, 4, insns.len() as u32);
    put_u64(&mut attr, 8, code.as_ptr() as u64);
    put_u64(&mut attr, 16, license.as_ptr() as u64);
    put_u32(&mut attr, 24, 1); // log_level
    put_u32(&mut attr, 28, log.len() as u32);
    put_u64(&mut attr, 32, log.as_mut_ptr() as u64);
    let name = name.as_bytes();
    attr[48..48 + name.len().min(15)].copy_from_slice(&name[..name.len().min(15)]);
    put_u32(&mut attr, 68, expected_attach_type);
    match sys_bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => owned(fd),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            panic!(
                "BPF_PROG_LOAD: {e}\n{}",
                String::from_utf8_lossy(&log[..end])
            )
        }
    }
}

/// The kernel's id of a loaded program.
pub fn prog_id(prog: &OwnedFd) -> u32 {
    // struct bpf_prog_info: type, id, ...
    get_u32(&info(prog, 64), 4)
}

/// A `cgroup/bind4` program that refuses binds to `port` with EPERM and allows every other: what
/// systemd's `SocketBindDeny=` puts on a unit's cgroup, reduced to one port.
pub fn load_bind_deny(port: u16) -> OwnedFd {
    // struct bpf_sock_addr: user_family @0, user_ip4 @4, user_ip6 @8, user_port @24 (network
    // order in the low 16 bits, as the socket address holds it).
    let port_field = i32::from(port.to_be());
    prog_load(
        BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        crate::bpf_query::BPF_CGROUP_INET4_BIND,
        "foreign_deny",
        &[
            Insn::load_u32(2, 1, 24),
            Insn::jump_if_equal(2, port_field, 2),
            Insn::mov(0, 1),
            Insn::exit(),
            Insn::mov(0, 0),
            Insn::exit(),
        ],
    )
}

/// A `cgroup/sock_release` program that does nothing (allows): a stand-in for any other tool's
/// program on that hook.
pub fn load_release_noop() -> OwnedFd {
    prog_load(
        BPF_PROG_TYPE_CGROUP_SOCK,
        crate::bpf_query::BPF_CGROUP_INET_SOCK_RELEASE,
        "foreign_release",
        &[Insn::mov(0, 1), Insn::exit()],
    )
}

/// Attaches `prog` to the cgroup at `dir` as a BPF link (BPF_LINK_CREATE); detached when the
/// returned link is closed.
pub fn link_create(prog: &OwnedFd, dir: &Path, attach_type: u32) -> io::Result<OwnedFd> {
    let cgroup = File::open(dir)?;
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 4, cgroup.as_raw_fd() as u32);
    put_u32(&mut attr, 8, attach_type);
    sys_bpf(BPF_LINK_CREATE, &mut attr).map(owned)
}

/// Attaches `prog` to the cgroup at `dir` the older way (BPF_PROG_ATTACH) with `flags`
/// (`BPF_F_ALLOW_MULTI`, or 0 for an exclusive attachment). Stays until [`prog_detach`].
pub fn prog_attach(prog: &OwnedFd, dir: &Path, attach_type: u32, flags: u32) -> io::Result<()> {
    let cgroup = File::open(dir)?;
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, cgroup.as_raw_fd() as u32);
    put_u32(&mut attr, 4, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 8, attach_type);
    put_u32(&mut attr, 12, flags);
    sys_bpf(BPF_PROG_ATTACH, &mut attr).map(drop)
}

pub fn prog_detach(prog: &OwnedFd, dir: &Path, attach_type: u32) -> io::Result<()> {
    let cgroup = File::open(dir)?;
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, cgroup.as_raw_fd() as u32);
    put_u32(&mut attr, 4, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 8, attach_type);
    sys_bpf(BPF_PROG_DETACH, &mut attr).map(drop)
}

/// Ids of the programs attached directly at the cgroup `dir` for `attach_type`.
pub fn attached_ids(dir: &Path, attach_type: u32) -> Vec<u32> {
    let cgroup = File::open(dir).expect("open cgroup");
    let mut ids = [0u32; 64];
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, cgroup.as_raw_fd() as u32);
    put_u32(&mut attr, 4, attach_type);
    put_u64(&mut attr, 16, ids.as_mut_ptr() as u64);
    put_u32(&mut attr, 24, ids.len() as u32);
    sys_bpf(BPF_PROG_QUERY, &mut attr).expect("BPF_PROG_QUERY");
    let count = get_u32(&attr, 24) as usize;
    ids[..count.min(ids.len())].to_vec()
}
