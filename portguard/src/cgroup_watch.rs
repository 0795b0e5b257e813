//! Watching a cgroup subtree for cgroups created and removed, with inotify: one watch per
//! directory (inotify is not recursive), added as directories appear.

use std::{
    collections::HashMap,
    fs, io,
    os::fd::{AsRawFd, RawFd},
    path::{Path, PathBuf},
};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

/// What happened below the watched directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Created(PathBuf),
    Removed(PathBuf),
    /// The kernel dropped events: walk everything again.
    Overflow,
}

pub struct CgroupWatch {
    inotify: Inotify,
    dirs: HashMap<WatchDescriptor, PathBuf>,
    buffer: Vec<u8>,
}

impl AsRawFd for CgroupWatch {
    fn as_raw_fd(&self) -> RawFd {
        self.inotify.as_raw_fd()
    }
}

impl CgroupWatch {
    /// Watches `root` and every directory below it.
    pub fn new(root: &Path) -> io::Result<Self> {
        let mut watch = Self {
            inotify: Inotify::init()?,
            dirs: HashMap::new(),
            buffer: vec![0; 64 * 1024],
        };
        watch.watch_tree(root)?;
        Ok(watch)
    }

    /// Drops every watch and watches `root`'s tree afresh (after an overflow).
    pub fn rewatch(&mut self, root: &Path) -> io::Result<()> {
        for (descriptor, _) in self.dirs.drain() {
            let _ = self.inotify.watches().remove(descriptor);
        }
        self.watch_tree(root)
    }

    pub fn watched(&self) -> usize {
        self.dirs.len()
    }

    fn watch_tree(&mut self, root: &Path) -> io::Result<()> {
        let mut pending = vec![root.to_path_buf()];
        while let Some(dir) = pending.pop() {
            let mask = WatchMask::CREATE
                | WatchMask::DELETE
                | WatchMask::MOVED_FROM
                | WatchMask::MOVED_TO
                | WatchMask::ONLYDIR;
            match self.inotify.watches().add(&dir, mask) {
                Ok(descriptor) => {
                    self.dirs.insert(descriptor, dir.clone());
                }
                // Gone before we got to it: its removal event covers it.
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(error) if dir == root => return Err(error),
                Err(error) => {
                    log::warn!("cannot watch cgroup {}: {error}", dir.display());
                    continue;
                }
            }
            if let Ok(entries) = fs::read_dir(&dir) {
                pending.extend(
                    entries
                        .flatten()
                        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|entry| entry.path()),
                );
            }
        }
        Ok(())
    }

    /// Every change queued now; empty when there is none. New directories are watched before
    /// this returns, so their own children are not missed.
    pub fn changes(&mut self) -> io::Result<Vec<Change>> {
        let mut changes = vec![];
        loop {
            let events = match self.inotify.read_events(&mut self.buffer) {
                Ok(events) => events,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => return Err(error),
            };
            let mut read_any = false;
            let mut ignored = vec![];
            for event in events {
                read_any = true;
                if event.mask.contains(EventMask::Q_OVERFLOW) {
                    changes.push(Change::Overflow);
                    continue;
                }
                if event.mask.contains(EventMask::IGNORED) {
                    ignored.push(event.wd.clone());
                    continue;
                }
                let (Some(parent), Some(name)) = (self.dirs.get(&event.wd), event.name) else {
                    continue;
                };
                if !event.mask.contains(EventMask::ISDIR) {
                    continue;
                }
                let path = parent.join(name);
                if event
                    .mask
                    .intersects(EventMask::CREATE | EventMask::MOVED_TO)
                {
                    changes.push(Change::Created(path));
                } else if event
                    .mask
                    .intersects(EventMask::DELETE | EventMask::MOVED_FROM)
                {
                    changes.push(Change::Removed(path));
                }
            }
            for descriptor in ignored {
                self.dirs.remove(&descriptor);
            }
            if !read_any {
                break;
            }
        }
        let mut unwatched = false;
        for change in &changes {
            if let Change::Created(dir) = change
                && let Err(error) = self.watch_tree(dir)
            {
                // Out of watches (max_user_watches): the periodic walk still finds cgroups.
                log::error!("cannot watch new cgroup {}: {error}", dir.display());
                unwatched = true;
            }
        }
        if unwatched {
            changes.push(Change::Overflow);
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// inotify works on any directory; a temporary tree stands in for cgroupfs.
    #[test]
    fn reports_directories_created_and_removed_at_any_depth() {
        let root = std::env::temp_dir().join(format!("portguard-watch-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("a")).expect("create");
        let mut watch = CgroupWatch::new(&root).expect("watch");
        assert_eq!(watch.watched(), 2);
        fs::create_dir(root.join("a/b")).expect("create");
        assert_eq!(
            watch.changes().expect("read"),
            [Change::Created(root.join("a/b"))]
        );
        // The new directory is watched too, so its children are seen.
        fs::create_dir(root.join("a/b/c")).expect("create");
        fs::write(root.join("a/b/file"), b"").expect("file");
        assert_eq!(
            watch.changes().expect("read"),
            [Change::Created(root.join("a/b/c"))]
        );
        fs::remove_dir(root.join("a/b/c")).expect("remove");
        assert_eq!(
            watch.changes().expect("read"),
            [Change::Removed(root.join("a/b/c"))]
        );
        assert_eq!(watch.changes().expect("read"), []);
        fs::remove_dir_all(&root).expect("clean up");
    }
}
