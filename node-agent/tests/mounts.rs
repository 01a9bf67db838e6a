//! The agent's mounts, on real filesystems (root): the cgroup v2 hierarchy is mounted at an
//! empty directory, a directory with content is refused in one line naming the command, and a
//! bpffs is mounted at a pin root outside /sys/fs/bpf. Each mount is undone, also on failure.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::{Path, PathBuf};
use std::process::Command;

use clustermesh_agent::mounts::{ensure_bpffs, ensure_cgroup2, fstype_of, parse_mounts};

fn fstype(path: &Path) -> Option<String> {
    let table = parse_mounts(&std::fs::read_to_string("/proc/self/mounts").unwrap());
    fstype_of(&table, path)
}

/// Unmounts `dir` (every mount stacked on it) when dropped.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        while fstype(&self.0).is_some_and(|t| t == "cgroup2" || t == "bpf") {
            let ok = Command::new("umount")
                .arg(&self.0)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                break;
            }
        }
    }
}

#[test]
fn missing_mounts_are_made_and_impossible_ones_refused_in_one_line() {
    clustermesh_bpf::testing::require_root();
    let tmp = tempfile::tempdir().unwrap();

    let cg = tmp.path().join("cgroup");
    let _u1 = Unmount(cg.clone());
    ensure_cgroup2(&cg).unwrap();
    assert_eq!(fstype(&cg).as_deref(), Some("cgroup2"));
    assert!(cg.join("cgroup.procs").exists());
    // Already there: nothing more is mounted.
    ensure_cgroup2(&cg).unwrap();

    let full = tmp.path().join("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("x"), "").unwrap();
    let err = ensure_cgroup2(&full).unwrap_err();
    assert!(!err.contains('\n'), "{err}");
    assert!(
        err.contains(&format!("mount -t cgroup2 none {}", full.display())),
        "{err}"
    );
    assert_ne!(fstype(&full).as_deref(), Some("cgroup2"));

    let pins = tmp.path().join("bpf");
    let _u2 = Unmount(pins.clone());
    ensure_bpffs(&pins).unwrap();
    assert_eq!(fstype(&pins).as_deref(), Some("bpf"));
    // Through a symlink the same bpffs is found, not mounted again.
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&pins, &link).unwrap();
    ensure_bpffs(&link.join("c1")).unwrap();
    let stacked = parse_mounts(&std::fs::read_to_string("/proc/self/mounts").unwrap())
        .into_iter()
        .filter(|m| m.dir == pins)
        .count();
    assert_eq!(stacked, 1);
}
