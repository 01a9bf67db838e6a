//! The bpf(2) batch map operations, which aya 0.14 does not wrap: one syscall writes many
//! entries of a hash map.

use std::io;
use std::os::fd::RawFd;

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// The kernel-internal "operation not supported" some map types return for batches.
const ENOTSUPP: i32 = 524;

/// `union bpf_attr`'s batch member (`include/uapi/linux/bpf.h`).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Whether the map type has no batch support (the caller writes one by one instead).
pub(crate) fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | ENOTSUPP | libc::EOPNOTSUPP)
    )
}

/// Writes every `(key, value)` with `BPF_MAP_UPDATE_BATCH`.
pub(crate) fn update<K: aya::Pod, V: aya::Pod>(fd: RawFd, entries: &[(K, V)]) -> io::Result<()> {
    let keys: Vec<K> = entries.iter().map(|(k, _)| *k).collect();
    let values: Vec<V> = entries.iter().map(|(_, v)| *v).collect();
    let mut done = 0usize;
    while done < keys.len() {
        let count = u32::try_from(keys.len() - done).unwrap_or(u32::MAX);
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count,
            map_fd: u32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid bpf_attr batch member; `keys` and `values` point to
        // `count` contiguous Pod keys and values that outlive the call; the kernel only reads
        // them and writes `attr.count`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // The kernel reports how many entries it wrote; keep going if it stopped early.
        done += attr.count as usize;
        if attr.count == 0 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
    }
    Ok(())
}
