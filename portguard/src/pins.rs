//! The pin directory of one installation: the links an earlier daemon left, the record of the
//! ports it reserved, and removing it all.

use std::{
    ffi::CString,
    fs::{self, File},
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, MapData},
    programs::links::PinnedLink,
};
use portguard_common::{ALL_MAPS, ALL_PROGRAMS, MAP_RESERVED, PortBitmap};

use crate::loader::{LoadError, map_error};

/// A suffix no earlier daemon used (a daemon that is always PID 1 in its container must not
/// collide with its own leftovers).
pub fn staging_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos())
}

/// The links of program `name` an earlier daemon pinned in `pins` (a crash may leave a staged
/// one beside the final one).
pub fn earlier_links(pins: &Path, name: &str) -> Result<Vec<(PathBuf, PinnedLink)>, LoadError> {
    let prefix = format!("link_{name}");
    let mut links = vec![];
    let entries = match fs::read_dir(pins) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(links),
        Err(source) => {
            return Err(LoadError::Pin {
                path: pins.display().to_string(),
                source,
            });
        }
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(file) = file.to_str() else { continue };
        if file == prefix || file.starts_with(&format!("{prefix}_staged_")) {
            let path = entry.path();
            let link = PinnedLink::from_pin(&path).map_err(|source| LoadError::Link {
                name: "earlier",
                source,
            })?;
            links.push((path, link));
        }
    }
    Ok(links)
}

/// The ports the installation at `pins` reserved in the sysctl, if it recorded any.
pub fn pinned_reservation(pins: &Path) -> Result<Option<PortBitmap>, LoadError> {
    let path = pins.join(MAP_RESERVED);
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&path).map_err(map_error(MAP_RESERVED))?;
    let map: Array<MapData, PortBitmap> =
        Array::try_from(aya::maps::Map::Array(data)).map_err(map_error(MAP_RESERVED))?;
    map.get(&0, 0).map(Some).map_err(map_error(MAP_RESERVED))
}

/// Removes everything portguard pinned in `pins`: links first (which detaches the programs),
/// then the maps. Returns how many links and maps were removed.
pub fn uninstall(pins: &Path) -> Result<(usize, usize), LoadError> {
    let pin_error = |source| LoadError::Pin {
        path: pins.display().to_string(),
        source,
    };
    let entries: Vec<PathBuf> = match fs::read_dir(pins) {
        Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(source) => return Err(pin_error(source)),
    };
    let name = |path: &PathBuf| {
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_owned()
    };
    let is_link = |file: &str| {
        ALL_PROGRAMS.iter().any(|program| {
            let pin = format!("link_{program}");
            file == pin || file.starts_with(&format!("{pin}_staged_"))
        })
    };
    // Only what portguard pins: a pin path shared with other tools must not lose their pins.
    if let Some(foreign) = entries
        .iter()
        .find(|path| !is_link(&name(path)) && !ALL_MAPS.contains(&name(path).as_str()))
    {
        return Err(pin_error(std::io::Error::other(format!(
            "{} is not portguard's; not removing anything",
            foreign.display()
        ))));
    }
    let (links, maps): (Vec<PathBuf>, Vec<PathBuf>) =
        entries.into_iter().partition(|path| is_link(&name(path)));
    for path in &links {
        let link = PinnedLink::from_pin(path).map_err(|source| LoadError::Link {
            name: "pinned",
            source,
        })?;
        drop(link.unpin().map_err(|source| LoadError::Pin {
            path: path.display().to_string(),
            source,
        })?);
    }
    for path in &maps {
        fs::remove_file(path).map_err(|source| LoadError::Pin {
            path: path.display().to_string(),
            source,
        })?;
    }
    fs::remove_dir(pins).map_err(pin_error)?;
    Ok((links.len(), maps.len()))
}

/// How many of portguard's programs (by name) are attached directly at the cgroup `dir`.
pub fn attached_portguard_programs(dir: &Path) -> std::io::Result<usize> {
    // bpf_attach_type values of the hooks portguard uses (uapi/linux/bpf.h).
    const ATTACH_TYPES: [u32; 9] = [8, 9, 10, 11, 12, 13, 14, 15, 34];
    const BPF_PROG_QUERY: libc::c_long = 16;
    let cgroup = File::open(dir)?;
    let mut ids = vec![];
    for attach_type in ATTACH_TYPES {
        let mut prog_ids = [0u32; 64];
        // union bpf_attr, query: target_fd, attach_type, query_flags, attach_flags, prog_ids,
        // prog_cnt (in: room, out: count).
        let mut attr = [0u8; 128];
        attr[0..4]
            .copy_from_slice(&(std::os::fd::AsRawFd::as_raw_fd(&cgroup) as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&attach_type.to_ne_bytes());
        attr[16..24].copy_from_slice(&(prog_ids.as_mut_ptr() as u64).to_ne_bytes());
        attr[24..28].copy_from_slice(&(prog_ids.len() as u32).to_ne_bytes());
        // SAFETY: attr is a valid bpf_attr whose prog_ids points at a buffer of prog_cnt ids.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_QUERY,
                attr.as_mut_ptr(),
                attr.len() as u32,
            )
        };
        if ret != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let count = u32::from_ne_bytes([attr[24], attr[25], attr[26], attr[27]]) as usize;
        ids.extend_from_slice(&prog_ids[..count.min(prog_ids.len())]);
    }
    Ok(aya::programs::loaded_programs()
        .flatten()
        .filter(|info| ids.contains(&info.id()))
        .filter(|info| {
            info.name_as_str()
                .is_some_and(|name| name.starts_with("pg_"))
        })
        .count())
}

/// The cgroup a pinned link is attached to (`bpf_link_info.cgroup.cgroup_id`), with a
/// descriptor of the link; `None` for a link of another kind.
pub fn link_cgroup(path: &Path) -> std::io::Result<(OwnedFd, Option<u64>)> {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_TYPE_CGROUP: u32 = 3;
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))?;
    // union bpf_attr, obj_get: pathname, bpf_fd, file_flags.
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(c_path.as_ptr() as u64).to_ne_bytes());
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel just returned this new descriptor.
    let link = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // struct bpf_link_info: type, id, prog_id, then (8-aligned) cgroup { cgroup_id, ... }.
    let mut info = [0u8; 64];
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let kind = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
    let cgroup = (kind == BPF_LINK_TYPE_CGROUP)
        .then(|| u64::from_ne_bytes(info[16..24].try_into().unwrap_or([0; 8])));
    Ok((link, cgroup))
}

/// Makes the link run `program` instead of its current one (BPF_LINK_UPDATE): the kernel swaps
/// them atomically for the hook, so no call sees neither and none sees both.
pub fn update_link(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> std::io::Result<()> {
    const BPF_LINK_UPDATE: libc::c_long = 29;
    // union bpf_attr, link_update: link_fd, new_prog_fd, flags, old_prog_fd.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(program.as_raw_fd() as u32).to_ne_bytes());
    sys_bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

fn sys_bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<i64> {
    // SAFETY: attr is a zero-filled bpf_attr of the size passed, whose pointers (if any) point
    // at live buffers of the sizes the command expects.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}
