//! Finding cgroup v2 and the ids the kernel knows cgroups by.

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// Where cgroup v2 is mounted, and the cgroup level of that mount's root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup2Mount {
    pub path: PathBuf,
    /// 0 unless this process runs in a cgroup namespace, whose root sits deeper.
    pub root_level: u32,
}

impl Cgroup2Mount {
    pub fn find() -> io::Result<Self> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
        Self::from_mountinfo(&mountinfo).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no cgroup2 file system in /proc/self/mountinfo (portguard needs cgroup v2)",
            )
        })
    }

    /// Picks the first cgroup2 mount of a mountinfo file (see proc(5)).
    pub fn from_mountinfo(mountinfo: &str) -> Option<Self> {
        mountinfo.lines().find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            if fs.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let mut fields = mount.split_whitespace();
            let root = fields.nth(3)?;
            let mount_point = fields.next()?;
            Some(Self {
                path: PathBuf::from(unescape_octal(mount_point)),
                root_level: unescape_octal(root)
                    .split('/')
                    .filter(|part| !part.is_empty())
                    .count() as u32,
            })
        })
    }
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(value as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The kernel's id of the cgroup at `dir`: on cgroup v2 it is the directory's inode number,
/// the value `bpf_get_current_ancestor_cgroup_id` returns.
pub fn cgroup_id(dir: &Path) -> io::Result<u64> {
    Ok(fs::metadata(dir)?.ino())
}

/// Makes sure `pins` can hold BPF pins: creates it (mode 0700) on a bpf file system, mounting
/// bpffs at /sys/fs/bpf first when the pin path lies there and nothing is mounted.
pub fn prepare_pin_dir(pins: &Path) -> io::Result<()> {
    const BPF_FS_MAGIC: libc::c_long = 0xcafe_4a11;
    const BPFFS: &str = "/sys/fs/bpf";
    let existing = pins
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if fs_magic(existing)? != BPF_FS_MAGIC {
        if !pins.starts_with(BPFFS) || fs_magic(Path::new(BPFFS))? == BPF_FS_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is not on a bpf file system (mount one, or use a path below {BPFFS})",
                    pins.display()
                ),
            ));
        }
        let target = std::ffi::CString::new(BPFFS).map_err(io::Error::other)?;
        let kind = std::ffi::CString::new("bpf").map_err(io::Error::other)?;
        let options = std::ffi::CString::new("mode=0700").map_err(io::Error::other)?;
        // SAFETY: valid C strings; mounting bpffs has no other preconditions.
        let mounted = unsafe {
            libc::mount(
                kind.as_ptr(),
                target.as_ptr(),
                kind.as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        if mounted != 0 {
            let error = io::Error::last_os_error();
            return Err(io::Error::new(
                error.kind(),
                format!("mounting bpffs at {BPFFS}: {error}"),
            ));
        }
        log::info!("mounted a bpf file system at {BPFFS}");
    }
    fs::create_dir_all(pins)?;
    fs::set_permissions(pins, std::os::unix::fs::PermissionsExt::from_mode(0o700))
}

fn fs_magic(path: &Path) -> io::Result<libc::c_long> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_type as libc::c_long)
}

/// An exclusive lock on a pin directory: one daemon (or uninstall) per installation. Held until
/// dropped.
pub struct PinLock {
    _dir: fs::File,
}

impl PinLock {
    /// Takes the lock, or says who holds it. Nothing of the installation may be touched before.
    pub fn take(pins: &Path) -> io::Result<Self> {
        let dir = fs::File::open(pins)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&dir),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } != 0
        {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::WouldBlock {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "another portguard daemon (or uninstall) is using {}",
                        pins.display()
                    ),
                ));
            }
            return Err(error);
        }
        Ok(Self { _dir: dir })
    }
}

/// Whether `dir` is a directory of a cgroup v2 file system.
pub fn is_cgroup2_dir(dir: &Path) -> io::Result<bool> {
    const CGROUP2_SUPER_MAGIC: libc::c_long = 0x6367_7270;
    Ok(fs_magic(dir)? == CGROUP2_SUPER_MAGIC && fs::metadata(dir)?.is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_and_unified_hosts() {
        let hybrid = "25 30 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs ro\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            Cgroup2Mount::from_mountinfo(hybrid),
            Some(Cgroup2Mount {
                path: "/sys/fs/cgroup/unified".into(),
                root_level: 0
            })
        );
        let namespaced = "41 31 0:38 /kubepods.slice/pod\\040x /sys/fs/cgroup rw shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            Cgroup2Mount::from_mountinfo(namespaced),
            Some(Cgroup2Mount {
                path: "/sys/fs/cgroup".into(),
                root_level: 2
            })
        );
        assert_eq!(
            Cgroup2Mount::from_mountinfo("1 2 0:1 / / rw - ext4 /dev/sda rw\n"),
            None
        );
    }

    #[test]
    fn unescapes_mountinfo() {
        assert_eq!(unescape_octal("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape_octal("/trailing\\04"), "/trailing\\04");
    }
}
