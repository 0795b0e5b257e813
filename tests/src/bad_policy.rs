//! The corpus of bad policies: the files committed in `tests/bad-policies/` (each names the
//! error it must give on its first line, `# expect: <text>`) and the cases only a test can make
//! (a huge file, bytes that are not UTF-8, a symlink loop, a directory, a FIFO, a dangling
//! symlink, more scopes than the kernel maps hold). Each can be put at any path, so the same
//! case serves `check`, a daemon's start and a running daemon's reload.

use std::{
    ffi::CString,
    fs,
    io::Read as _,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

/// How one bad policy is made at a path.
enum Make {
    Bytes(Vec<u8>),
    Huge,
    SymlinkLoop,
    Directory,
    Fifo,
    Dangling,
}

pub struct BadPolicy {
    pub name: String,
    /// Text the error must contain (after the file name).
    pub expect: String,
    /// The error points into the text (`file:line:column: ...`) rather than at the file as a
    /// whole (`file: ...`).
    pub in_text: bool,
    make: Make,
}

/// Size of the generated huge policy: ten times the limit.
pub const HUGE_BYTES: usize = 40 * 1024 * 1024;

impl BadPolicy {
    /// Puts the case at `path`, replacing whatever is there (and the loop's partner link).
    pub fn install(&self, path: &Path) {
        remove(path);
        let partner = loop_partner(path);
        remove(&partner);
        match &self.make {
            Make::Bytes(bytes) => fs::write(path, bytes).expect("write bad policy"),
            Make::Huge => {
                let line = b"# a comment line to make the policy file far too big\n";
                let text: Vec<u8> = line.iter().copied().cycle().take(HUGE_BYTES).collect();
                fs::write(path, text).expect("write huge policy");
            }
            Make::SymlinkLoop => {
                std::os::unix::fs::symlink(path, &partner).expect("symlink");
                std::os::unix::fs::symlink(&partner, path).expect("symlink");
            }
            Make::Directory => fs::create_dir(path).expect("create directory"),
            Make::Fifo => {
                let c_path = CString::new(path.as_os_str().as_bytes()).expect("path");
                // SAFETY: valid C string.
                let ret = unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) };
                assert_eq!(ret, 0, "mkfifo: {}", std::io::Error::last_os_error());
            }
            Make::Dangling => {
                std::os::unix::fs::symlink("/nonexistent/portguard-policy", path).expect("symlink")
            }
        }
    }

    /// Checks that `stderr` of a refusal of this case, read from `path`, is one clear error:
    /// the expected text, named after the file, and no other error.
    pub fn assert_one_error(&self, path: &Path, stderr: &str, what: &str) {
        let file = path.display().to_string();
        assert!(
            stderr.contains(&self.expect),
            "{what} of bad policy `{}`: `{}` is missing from:\n{stderr}",
            self.name,
            self.expect
        );
        let located: Vec<&str> = stderr
            .lines()
            .filter(|line| is_located(line, &file))
            .collect();
        let file_level: Vec<&str> = stderr
            .lines()
            .filter(|line| line.contains(&format!("{file}: ")) && !is_count(line, &file))
            .collect();
        if self.in_text {
            assert_eq!(
                located.len(),
                1,
                "{what} of bad policy `{}`: not exactly one `{file}:LINE:COLUMN:` error:\n{stderr}",
                self.name
            );
            assert!(located[0].contains(&self.expect), "{stderr}");
        } else {
            assert!(
                located.is_empty() && file_level.len() == 1,
                "{what} of bad policy `{}`: not exactly one `{file}: ` error:\n{stderr}",
                self.name
            );
        }
    }

    pub fn cleanup(path: &Path) {
        remove(path);
        remove(&loop_partner(path));
    }
}

/// `…FILE:LINE:COLUMN: message` somewhere in the line.
fn is_located(line: &str, file: &str) -> bool {
    let Some(at) = line.find(&format!("{file}:")) else {
        return false;
    };
    let mut parts = line[at + file.len() + 1..].splitn(3, ':');
    matches!(
        (parts.next(), parts.next(), parts.next()),
        (Some(row), Some(column), Some(_))
            if row.parse::<u32>().is_ok() && column.parse::<u32>().is_ok()
    )
}

/// The closing `FILE: N error(s)` line of a list of located errors.
fn is_count(line: &str, file: &str) -> bool {
    line.ends_with(&format!("{file}: 1 error"))
        || line
            .rsplit_once(&format!("{file}: "))
            .and_then(|(_, rest)| rest.strip_suffix(" errors"))
            .is_some_and(|count| count.parse::<u32>().is_ok())
}

fn loop_partner(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".loop");
    PathBuf::from(name)
}

fn remove(path: &Path) {
    match fs::symlink_metadata(path) {
        Ok(metadata) if metadata.is_dir() => fs::remove_dir_all(path).expect("remove directory"),
        Ok(_) => fs::remove_file(path).expect("remove file"),
        Err(_) => {}
    }
}

/// Every case: the committed files, then the generated ones.
pub fn corpus() -> Vec<BadPolicy> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bad-policies");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("tests/bad-policies")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    let mut cases: Vec<BadPolicy> = files
        .iter()
        .map(|path| {
            let bytes = fs::read(path).expect("read bad policy");
            let text = String::from_utf8_lossy(&bytes);
            let expect = text
                .lines()
                .next()
                .and_then(|line| line.strip_prefix("# expect: "))
                .unwrap_or_else(|| panic!("{} lacks a first line `# expect: …`", path.display()))
                .to_owned();
            BadPolicy {
                name: path
                    .file_name()
                    .expect("name")
                    .to_string_lossy()
                    .into_owned(),
                expect,
                in_text: true,
                make: Make::Bytes(bytes),
            }
        })
        .collect();
    assert!(cases.len() >= 30, "the committed corpus went missing");
    let too_many: String = (0..1025)
        .map(|i| {
            format!(
                "[[scope]]\nname = \"s{i}\"\ncgroup = \"c{i}\"\nephemeral = \"{}\"\n",
                10000 + i
            )
        })
        .collect();
    let generated = [
        ("huge", "the policy is larger than 4 MiB", false, Make::Huge),
        (
            "not-utf8",
            "1:12: the policy is not UTF-8 text",
            true,
            Make::Bytes(b"mode = \"enf\xffrce\"\n".to_vec()),
        ),
        (
            "symlink-loop",
            "cannot open the policy: Too many levels of symbolic links",
            false,
            Make::SymlinkLoop,
        ),
        (
            "directory",
            "the policy is a directory; a policy must be a regular file",
            false,
            Make::Directory,
        ),
        (
            "fifo",
            "the policy is a FIFO; a policy must be a regular file",
            false,
            Make::Fifo,
        ),
        (
            "dangling-symlink",
            "cannot open the policy: No such file or directory",
            false,
            Make::Dangling,
        ),
        (
            "too-many-scopes",
            "4097:1: too many scopes: at most 1024 are supported, this is scope 1025",
            true,
            Make::Bytes(too_many.into_bytes()),
        ),
    ];
    cases.extend(
        generated
            .into_iter()
            .map(|(name, expect, in_text, make)| BadPolicy {
                name: name.into(),
                expect: expect.into(),
                in_text,
                make,
            }),
    );
    cases
}

/// Runs `command`, failing the test if it has not exited after `timeout` (then it is killed):
/// a bad policy must never make portguard hang.
pub fn run_bounded(command: &mut Command, timeout: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} still running after {timeout:?}: it hangs");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let mut stdout = vec![];
    let mut stderr = vec![];
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_end(&mut stdout)
        .expect("read stdout");
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_end(&mut stderr)
        .expect("read stderr");
    Output {
        status,
        stdout,
        stderr,
    }
}
