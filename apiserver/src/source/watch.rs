//! Change notification for the manifest directory: inotify through the `notify` crate, so the
//! directory is read when something in it changed, not on a timer. Events only say *that*
//! something changed and which paths; [`super::manifest::ManifestDir::poll`] still decides what
//! changed (the paths named are re-read even when their modification time and size did not
//! change). Symlinks are not followed by the watch (like the walk), so a link loop costs
//! nothing and nothing outside the directory is watched.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use notify::event::ModifyKind;
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use parking_lot::Mutex;

/// What the watch saw since the last [`DirWatch::take`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Paths named by events (files and directories, created, written, removed, renamed or
    /// with changed attributes).
    pub paths: BTreeSet<PathBuf>,
    /// Events were lost (the kernel's queue overflowed) or the watch failed: read everything.
    pub rescan: bool,
    /// The watched directory itself was removed or moved: the watch must be set up again.
    pub root_gone: bool,
}

impl Changes {
    /// Whether nothing happened.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty() && !self.rescan && !self.root_gone
    }
}

#[derive(Default)]
struct Shared {
    changes: Mutex<Changes>,
    wake: tokio::sync::Notify,
}

/// A recursive watch on a directory. Dropping it ends the watch (and notify's thread).
pub struct DirWatch {
    shared: Arc<Shared>,
    _watcher: RecommendedWatcher,
}

impl std::fmt::Debug for DirWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirWatch").finish_non_exhaustive()
    }
}

impl DirWatch {
    /// Watches `dir` and everything below it. Fails when inotify cannot be used (for example
    /// `fs.inotify.max_user_instances` or `max_user_watches` reached).
    pub fn new(dir: &Path) -> Result<Self, notify::Error> {
        let shared = Arc::new(Shared::default());
        let root = dir.to_owned();
        let handler_shared = Arc::clone(&shared);
        let handler = move |event: notify::Result<notify::Event>| {
            let mut c = handler_shared.changes.lock();
            match event {
                // Opening and reading (ours included) changes nothing.
                Ok(e) if matches!(e.kind, EventKind::Access(_)) => return,
                Ok(e) => {
                    if e.need_rescan() {
                        c.rescan = true;
                    }
                    // Removed or renamed; a changed mode or time on it is not a loss.
                    if matches!(
                        e.kind,
                        EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
                    ) && e.paths.iter().any(|p| p == &root)
                    {
                        c.root_gone = true;
                    }
                    c.paths.extend(e.paths);
                }
                Err(_) => c.rescan = true,
            }
            drop(c);
            handler_shared.wake.notify_one();
        };
        let mut watcher = RecommendedWatcher::new(
            handler,
            notify::Config::default().with_follow_symlinks(false),
        )?;
        watcher.watch(dir, RecursiveMode::Recursive)?;
        Ok(Self {
            shared,
            _watcher: watcher,
        })
    }

    /// Waits until something changed (at once if something did since the last
    /// [`DirWatch::take`]).
    pub async fn changed(&self) {
        if !self.shared.changes.lock().is_empty() {
            return;
        }
        self.shared.wake.notified().await;
    }

    /// What changed since the last call.
    pub fn take(&self) -> Changes {
        std::mem::take(&mut *self.shared.changes.lock())
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a panic is the failure report"
    )]

    use std::time::Duration;

    use super::*;

    async fn next(w: &DirWatch) -> Changes {
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("a change notification within 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
        w.take()
    }

    #[tokio::test]
    async fn changes_below_the_directory_are_reported_and_reads_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        // A link loop and a link out of the tree: not followed, no hang.
        std::os::unix::fs::symlink(&root, root.join("loop")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("out")).unwrap();
        let w = DirWatch::new(&root).unwrap();
        assert!(w.take().is_empty());

        let file = root.join("a.yaml");
        std::fs::write(&file, "x: 1\n").unwrap();
        let c = next(&w).await;
        assert!(c.paths.contains(&file), "{c:?}");
        assert!(!c.rescan && !c.root_gone);

        // A directory made later is watched too.
        std::fs::create_dir(root.join("sub")).unwrap();
        next(&w).await;
        let deep = root.join("sub/b.yaml");
        std::fs::write(&deep, "x: 2\n").unwrap();
        let mut seen = next(&w).await;
        // The new directory's watch may come after the file's creation: notify then reports
        // it from its scan of the new directory, or the write comes next.
        while !seen.paths.contains(&deep) {
            seen = next(&w).await;
        }

        // Reading (what the source does) is no change.
        let _ = w.take();
        std::fs::read_to_string(&file).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(w.take().is_empty(), "a read woke the source");

        // Attributes (a permission fixed) and removal are changes.
        use std::os::unix::fs::PermissionsExt as _;
        // The directory's own mode changed: a change, not a lost directory.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o750)).unwrap();
        let c = next(&w).await;
        assert!(c.paths.contains(&root) && !c.root_gone, "{c:?}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(next(&w).await.paths.contains(&file));
        std::fs::remove_file(&file).unwrap();
        assert!(next(&w).await.paths.contains(&file));

        // The directory itself goes: the watch says it must be set up again.
        drop(dir);
        let mut c = next(&w).await;
        while !c.root_gone {
            c = next(&w).await;
        }
    }

    #[test]
    fn a_missing_directory_cannot_be_watched() {
        let dir = tempfile::tempdir().unwrap();
        assert!(DirWatch::new(&dir.path().join("nope")).is_err());
    }
}
