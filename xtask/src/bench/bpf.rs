//! The few bpf(2) commands the benchmark needs, raw: which programs are attached to a cgroup
//! (BPF_PROG_QUERY), their kernel accounting (BPF_OBJ_GET_INFO_BY_FD), statistics switched on
//! for as long as a file descriptor is open (BPF_ENABLE_STATS), and empty pass-through programs
//! (BPF_PROG_LOAD of `r0 = 1; exit`, attached with BPF_LINK_CREATE) for the B1 baseline.
//! aya loads programs from an object file only; the attribute layouts come from its bindings.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::Context as _;
use aya_obj::generated::{
    BPF_ALU64, BPF_EXIT, BPF_F_QUERY_EFFECTIVE, BPF_JMP, BPF_K, BPF_MOV, bpf_attr, bpf_cmd,
    bpf_insn, bpf_prog_info, bpf_stats_type,
};

/// Attach types are small integers; the kernel answers EINVAL for those that are not cgroup
/// hooks, so trying them all finds whatever a daemon attached, this version's or a later one's.
const ATTACH_TYPES: std::ops::Range<u32> = 0..64;

/// One program attached to a cgroup.
#[derive(Clone, Debug)]
pub struct Attached {
    pub attach_type: u32,
    pub id: u32,
}

/// A program's identity and the kernel's accounting of it.
#[derive(Clone, Debug)]
pub struct ProgramStats {
    pub name: String,
    pub prog_type: u32,
    pub run_time_ns: u64,
    pub run_count: u64,
}

fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: `attr` is a whole bpf_attr, zeroed where the command does not look.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            size_of::<bpf_attr>() as u32,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn zeroed_attr() -> bpf_attr {
    // SAFETY: bpf_attr is plain integers; all-zero is what the kernel expects of unused fields.
    unsafe { std::mem::zeroed() }
}

/// Programs attached at `cgroup` (directly, or with `effective` also those inherited from its
/// ancestors), for every cgroup attach type.
pub fn attached(cgroup: &Path, effective: bool) -> anyhow::Result<Vec<Attached>> {
    let dir = File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
    let mut found = vec![];
    for attach_type in ATTACH_TYPES {
        let mut ids = [0u32; 64];
        let mut attr = zeroed_attr();
        attr.query.__bindgen_anon_1.target_fd = dir.as_raw_fd() as u32;
        attr.query.attach_type = attach_type;
        attr.query.query_flags = if effective { BPF_F_QUERY_EFFECTIVE } else { 0 };
        attr.query.prog_ids = ids.as_mut_ptr() as u64;
        attr.query.__bindgen_anon_2.prog_cnt = ids.len() as u32;
        match bpf(bpf_cmd::BPF_PROG_QUERY, &mut attr) {
            Ok(_) => {}
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(error) => {
                return Err(error).with_context(|| {
                    format!("BPF_PROG_QUERY {} type {attach_type}", cgroup.display())
                });
            }
        }
        // SAFETY: the kernel wrote the count back.
        let count = unsafe { attr.query.__bindgen_anon_2.prog_cnt } as usize;
        found.extend(
            ids[..count.min(ids.len())]
                .iter()
                .map(|&id| Attached { attach_type, id }),
        );
    }
    Ok(found)
}

/// The kernel's record of program `id`.
pub fn program_stats(id: u32) -> anyhow::Result<ProgramStats> {
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_6.__bindgen_anon_1.prog_id = id;
    let fd = bpf(bpf_cmd::BPF_PROG_GET_FD_BY_ID, &mut attr)
        .with_context(|| format!("BPF_PROG_GET_FD_BY_ID {id}"))?;
    // SAFETY: the kernel just returned this descriptor to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: plain integers; the kernel fills what it knows.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = zeroed_attr();
    attr.info.bpf_fd = fd.as_raw_fd() as u32;
    attr.info.info_len = size_of::<bpf_prog_info>() as u32;
    attr.info.info = (&raw mut info) as u64;
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)
        .with_context(|| format!("BPF_OBJ_GET_INFO_BY_FD program {id}"))?;
    let name: Vec<u8> = info
        .name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(ProgramStats {
        name: String::from_utf8_lossy(&name).into_owned(),
        prog_type: info.type_,
        run_time_ns: info.run_time_ns,
        run_count: info.run_cnt,
    })
}

/// Turns on the kernel's run-time accounting of every program until the result is dropped
/// (the sysctl is left as it was).
pub fn enable_stats() -> anyhow::Result<OwnedFd> {
    let mut attr = zeroed_attr();
    attr.enable_stats.type_ = bpf_stats_type::BPF_STATS_RUN_TIME as u32;
    let fd = bpf(bpf_cmd::BPF_ENABLE_STATS, &mut attr).context("BPF_ENABLE_STATS")?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Loads `r0 = 1; exit` as a program of `prog_type` for `attach_type` and links it to the
/// cgroup at `dir`. Detached when the returned link is dropped.
pub fn attach_empty(dir: &Path, prog_type: u32, attach_type: u32) -> anyhow::Result<OwnedFd> {
    let mut insns: [bpf_insn; 2] = [
        // SAFETY: bpf_insn is plain integers; registers 0 are what these instructions use.
        unsafe { std::mem::zeroed() },
        // SAFETY: as above.
        unsafe { std::mem::zeroed() },
    ];
    insns[0].code = (BPF_ALU64 | BPF_MOV | BPF_K) as u8;
    insns[0].imm = 1;
    insns[1].code = (BPF_JMP | BPF_EXIT) as u8;
    let license = c"GPL";
    let mut attr = zeroed_attr();
    // SAFETY: writing plain integer fields of the load member.
    unsafe {
        let load = &mut attr.__bindgen_anon_3;
        load.prog_type = prog_type;
        load.insn_cnt = insns.len() as u32;
        load.insns = insns.as_mut_ptr() as u64;
        load.license = license.as_ptr() as u64;
        load.expected_attach_type = attach_type;
        for (dst, src) in load.prog_name.iter_mut().zip(b"bench_empty") {
            *dst = *src as libc::c_char;
        }
    }
    let prog = bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr)
        .with_context(|| format!("loading an empty program of type {prog_type}"))?;
    // SAFETY: the kernel just returned this descriptor to us.
    let prog = unsafe { OwnedFd::from_raw_fd(prog as i32) };
    let cgroup = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let mut attr = zeroed_attr();
    attr.link_create.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
    attr.link_create.__bindgen_anon_2.target_fd = cgroup.as_raw_fd() as u32;
    attr.link_create.attach_type = attach_type;
    let link = bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr).with_context(|| {
        format!(
            "linking an empty program to {} for attach type {attach_type}",
            dir.display()
        )
    })?;
    // SAFETY: the kernel just returned this descriptor to us; it holds the program.
    Ok(unsafe { OwnedFd::from_raw_fd(link as i32) })
}
