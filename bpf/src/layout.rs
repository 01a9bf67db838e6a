//! `#[repr(C)]` mirrors of the structs in `bpf/include/clustermesh.h`, the one definition of
//! every map layout. Sizes are checked at compile time; field meanings (byte order included)
//! are documented in the header.

#![allow(
    missing_docs,
    reason = "each field is documented once, in include/clustermesh.h"
)]

use aya::Pod;

/// `struct cm_service_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ServiceKeyRaw {
    pub vip: u32,
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
    pub slot: u32,
}

/// `struct cm_service_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServiceValueRaw {
    pub backend_id: u32,
    pub count: u16,
    pub flags: u16,
}

/// `struct cm_backend`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackendRaw {
    pub ip: u32,
    pub port: u16,
    pub proto: u8,
    pub state: u8,
    pub cluster_id: u16,
    pub pad: u16,
}

/// `struct cm_ipcache_key` without the LPM prefix length, which aya's `lpm_trie::Key` adds.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IpCacheAddrRaw {
    pub ip: u32,
}

/// `struct cm_ipcache_key` with its prefix length, for the batch calls.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IpCacheKeyRaw {
    pub prefixlen: u32,
    pub ip: u32,
}

/// `struct cm_ipcache_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IpCacheValueRaw {
    pub identity: u32,
    pub node_ip: u32,
    pub cluster_id: u16,
    pub pad: u16,
}

/// `struct cm_endpoint`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EndpointRaw {
    pub endpoint_id: u32,
    pub identity: u32,
    pub flags: u32,
    pub cluster_id: u16,
    pub pad: u16,
}

/// `struct cm_policy_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PolicyKeyRaw {
    pub endpoint_id: u32,
    pub identity: u32,
    pub port: u16,
    pub proto: u8,
    pub direction: u8,
}

/// `struct cm_policy_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PolicyValueRaw {
    pub verdict: u8,
    pub pad: [u8; 3],
    pub rule_id: u32,
}

/// `struct cm_event`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventRaw {
    pub time_ns: u64,
    pub src_ip: u32,
    pub dst_ip: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub src_cluster: u16,
    pub dst_cluster: u16,
    pub dport: u16,
    pub proto: u8,
    pub direction: u8,
    pub verdict: u8,
    pub pad: [u8; 3],
    pub endpoint_id: u32,
    pub rule_id: u32,
}

/// `struct cm_lb_config`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LbConfigRaw {
    pub consecutive_failures: u32,
    pub pad: u32,
    pub window_ns: u64,
    pub probe_ns: u64,
}

/// `struct cm_health_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct HealthKeyRaw {
    pub netns: u64,
    pub ip: u32,
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

/// `struct cm_health`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HealthRaw {
    pub last_failure_ns: u64,
    pub last_success_ns: u64,
    pub pending_since_ns: u64,
    pub ejected_ns: u64,
    pub failures: u32,
    pub ejections: u32,
    pub reason: u32,
    pub streak: u32,
}

// The header's sizes, by hand: a change on either side without the other fails the build.
const _: () = assert!(size_of::<ServiceKeyRaw>() == 12);
const _: () = assert!(size_of::<ServiceValueRaw>() == 8);
const _: () = assert!(size_of::<BackendRaw>() == 12);
const _: () = assert!(size_of::<IpCacheKeyRaw>() == 8);
const _: () = assert!(size_of::<IpCacheValueRaw>() == 12);
const _: () = assert!(size_of::<EndpointRaw>() == 16);
const _: () = assert!(size_of::<PolicyKeyRaw>() == 12);
const _: () = assert!(size_of::<PolicyValueRaw>() == 8);
const _: () = assert!(size_of::<EventRaw>() == 48);
const _: () = assert!(size_of::<LbConfigRaw>() == 24);
const _: () = assert!(size_of::<HealthKeyRaw>() == 16);
const _: () = assert!(size_of::<HealthRaw>() == 48);

// SAFETY: each struct is #[repr(C)], Copy, made only of integers with explicit padding
// fields, so every bit pattern is valid and no byte is uninitialised padding.
unsafe impl Pod for ServiceKeyRaw {}
// SAFETY: as above.
unsafe impl Pod for ServiceValueRaw {}
// SAFETY: as above.
unsafe impl Pod for BackendRaw {}
// SAFETY: as above.
unsafe impl Pod for IpCacheAddrRaw {}
// SAFETY: as above.
unsafe impl Pod for IpCacheKeyRaw {}
// SAFETY: as above.
unsafe impl Pod for IpCacheValueRaw {}
// SAFETY: as above.
unsafe impl Pod for EndpointRaw {}
// SAFETY: as above.
unsafe impl Pod for PolicyKeyRaw {}
// SAFETY: as above.
unsafe impl Pod for PolicyValueRaw {}
// SAFETY: as above.
unsafe impl Pod for LbConfigRaw {}
// SAFETY: as above.
unsafe impl Pod for HealthKeyRaw {}
// SAFETY: as above.
unsafe impl Pod for HealthRaw {}

impl EventRaw {
    /// Reads an event from ring-buffer bytes; `None` when the record is too short.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < size_of::<Self>() {
            return None;
        }
        // SAFETY: the length was checked above, EventRaw is plain integers (any bit pattern
        // is valid), and read_unaligned does not require the ring buffer's alignment.
        Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_decode_from_ring_bytes_and_short_records_are_refused() {
        let raw = EventRaw {
            time_ns: 5,
            src_ip: 1,
            dport: 80u16.to_be(),
            verdict: 2,
            rule_id: 9,
            ..EventRaw::default()
        };
        // SAFETY: EventRaw is 48 bytes of plain integers with explicit padding fields.
        let bytes: [u8; 48] = unsafe { std::mem::transmute(raw) };
        assert_eq!(EventRaw::from_bytes(&bytes), Some(raw));
        assert_eq!(EventRaw::from_bytes(&bytes[..47]), None);
    }
}
