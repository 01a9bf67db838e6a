//! The filesystems the eBPF datapath needs, mounted when missing, as cilium-agent does: a
//! bpffs under the pin root and a cgroup v2 for socket load balancing. Where a mount is
//! missing and cannot be made, the agent stops with one line naming the mount and the command
//! that provides it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// One line of `/proc/self/mounts`: where, and which filesystem type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The mount point.
    pub dir: PathBuf,
    /// The filesystem type (`bpf`, `cgroup2`, `tmpfs`, ...).
    pub fstype: String,
}

/// Undoes the octal escapes of the mount table (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = (b[i] == b'\\' && i + 3 < b.len())
            .then(|| std::str::from_utf8(&b[i + 1..i + 4]).ok())
            .flatten()
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match octal {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a mount table.
pub fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (_, dir, fstype) = (w.next()?, w.next()?, w.next()?);
            Some(Mount {
                dir: PathBuf::from(unescape(dir)),
                fstype: fstype.to_owned(),
            })
        })
        .collect()
}

fn mounts() -> Result<Vec<Mount>, String> {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|t| parse_mounts(&t))
        .map_err(|e| format!("reading /proc/self/mounts: {e}"))
}

/// The filesystem type `path` lives on: that of the last-mounted, longest mount point that
/// contains it.
pub fn fstype_of(table: &[Mount], path: &Path) -> Option<String> {
    table
        .iter()
        .enumerate()
        .filter(|(_, m)| path.starts_with(&m.dir))
        .max_by_key(|(i, m)| (m.dir.components().count(), *i))
        .map(|(_, m)| m.fstype.clone())
}

fn mount(fstype: &str, dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let out = Command::new("mount")
        .args(["-t", fstype, fstype, &dir.display().to_string()])
        .output()
        .map_err(|e| format!("running mount: {e}"))?;
    if out.status.success() {
        tracing::info!(fstype, dir = %dir.display(), "mounted");
        Ok(())
    } else {
        // mount(8) adds a second line ("dmesg(1) may have more information"): the first says
        // what failed.
        let err = String::from_utf8_lossy(&out.stderr);
        Err(err
            .lines()
            .next()
            .unwrap_or("mount failed")
            .trim()
            .to_owned())
    }
}

/// `path` with symlinks and `..` resolved as far as it exists (the rest appended), so that it
/// compares with the mount table.
fn resolve(path: &Path) -> PathBuf {
    for ancestor in path.ancestors() {
        if let Ok(real) = ancestor.canonicalize() {
            let rest = path.strip_prefix(ancestor).unwrap_or(Path::new(""));
            return real.join(rest);
        }
    }
    path.to_owned()
}

/// Serialises the check-then-mount of concurrent agents (`up` starts several at once): two
/// bpffs mounted on the same point would hide the first one's pins. The lock is on the nearest
/// existing directory of the mount point, so that it needs no writable file.
fn mount_lock(at: &Path) -> Result<std::fs::File, String> {
    let dir = at
        .ancestors()
        .find(|a| a.is_dir())
        .unwrap_or(Path::new("/"));
    let f = std::fs::File::open(dir).map_err(|e| format!("opening {}: {e}", dir.display()))?;
    f.lock()
        .map_err(|e| format!("locking {}: {e}", dir.display()))?;
    Ok(f)
}

/// Makes sure `root` (the pin root) is on a bpffs: mounts one at `/sys/fs/bpf` when the root
/// is under it, else at the root itself.
pub fn ensure_bpffs(root: &Path) -> Result<(), String> {
    let root = &resolve(root);
    if fstype_of(&mounts()?, root).as_deref() == Some("bpf") {
        return Ok(());
    }
    let sys = Path::new("/sys/fs/bpf");
    let at = if root.starts_with(sys) { sys } else { root };
    let _lock = mount_lock(at)?;
    if fstype_of(&mounts()?, root).as_deref() == Some("bpf") {
        return Ok(());
    }
    mount("bpf", at).map_err(|e| {
        format!(
            "bpf.root {} is not on a bpffs and mounting one at {} failed ({e}); mount it with: \
             mount -t bpf bpf {}",
            root.display(),
            at.display(),
            at.display()
        )
    })?;
    match fstype_of(&mounts()?, root).as_deref() {
        Some("bpf") => Ok(()),
        other => Err(format!(
            "bpf.root {} is still on {} after mounting a bpffs at {}",
            root.display(),
            other.unwrap_or("no filesystem"),
            at.display()
        )),
    }
}

/// Makes sure `cgroup` is a cgroup v2 directory: when it is not on one and is a missing or
/// empty directory, mounts the cgroup v2 hierarchy there (as cilium-agent does at
/// `/run/cilium/cgroupv2`); a directory with content on another filesystem is refused.
pub fn ensure_cgroup2(cgroup: &Path) -> Result<(), String> {
    let cgroup = &resolve(cgroup);
    if fstype_of(&mounts()?, cgroup).as_deref() == Some("cgroup2") {
        return Ok(());
    }
    let _lock = mount_lock(cgroup)?;
    let table = mounts()?;
    let here = fstype_of(&table, cgroup);
    if here.as_deref() == Some("cgroup2") {
        return Ok(());
    }
    let empty = match std::fs::read_dir(cgroup) {
        Ok(mut d) => d.next().is_none(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(format!("reading {}: {e}", cgroup.display())),
    };
    let elsewhere = table
        .iter()
        .find(|m| m.fstype == "cgroup2")
        .map(|m| format!(" (this machine has cgroup v2 at {})", m.dir.display()))
        .unwrap_or_default();
    if !empty {
        return Err(format!(
            "bpf.cgroup {} is not a cgroup v2 directory (it is on {}){elsewhere}; set bpf.cgroup \
             to a cgroup v2 directory or to an empty directory, or mount one: mount -t cgroup2 \
             none {}",
            cgroup.display(),
            here.as_deref().unwrap_or("no filesystem"),
            cgroup.display()
        ));
    }
    mount("cgroup2", cgroup).map_err(|e| {
        format!(
            "bpf.cgroup {} is not a cgroup v2 directory and mounting one there failed ({e}); \
             mount it with: mount -t cgroup2 none {}",
            cgroup.display(),
            cgroup.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "sysfs /sys sysfs rw 0 0\n\
        tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
        cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n\
        bpf /sys/fs/bpf bpf rw 0 0\n\
        none /tmp/a\\040b tmpfs rw 0 0\n";

    #[test]
    fn the_longest_mount_point_decides() {
        let t = parse_mounts(TABLE);
        assert_eq!(t[4].dir, Path::new("/tmp/a b"));
        let of = |p: &str| fstype_of(&t, Path::new(p));
        assert_eq!(of("/sys/fs/bpf/clustermesh/c1").as_deref(), Some("bpf"));
        assert_eq!(of("/sys/fs/bpfx").as_deref(), Some("sysfs"));
        assert_eq!(of("/sys/fs/cgroup").as_deref(), Some("tmpfs"));
        assert_eq!(of("/sys/fs/cgroup/unified/x").as_deref(), Some("cgroup2"));
        assert_eq!(of("/tmp/a b/c").as_deref(), Some("tmpfs"));
        assert_eq!(of("relative"), None);
        // A later mount on the same point hides the earlier one.
        let t = parse_mounts("none /x tmpfs rw 0 0\nbpf /x bpf rw 0 0\n");
        assert_eq!(fstype_of(&t, Path::new("/x/y")).as_deref(), Some("bpf"));
    }
}
