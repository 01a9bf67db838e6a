//! Datapath benchmark (root): map programming rates for backends, services and the ipcache,
//! one by one and batched, beside the raw bpf(2) update cost, and TCP connect latency
//! through the socket load balancer vs. straight to the backend, all in one run.
//!
//! `cargo bench -p clustermesh-bpf`; prints a Markdown table for docs/BENCHMARKS.md.

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark: a failed step ends the run"
)]

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Instant;

use clustermesh_bpf::testing::Topology;
use clustermesh_bpf::{
    Backend, BackendState, Datapath, IpCacheValue, KernelConfig, KernelDatapath, Prefix, Proto,
    ServiceKey,
};

const PROBE: &str = env!("CARGO_BIN_EXE_cm-netprobe");
const BACKENDS: u32 = 65_536;
const IPCACHE: u32 = 524_288;

fn rate(n: u32, t: Instant) -> f64 {
    f64::from(n) / t.elapsed().as_secs_f64()
}

fn be(i: u32) -> Backend {
    let o = i.to_be_bytes();
    Backend {
        ip: Ipv4Addr::new(10, o[1], o[2], o[3]),
        port: 8080,
        proto: Proto::Tcp,
        state: BackendState::Active,
        cluster_id: 1,
    }
}

fn prefix(i: u32) -> Prefix {
    let o = i.to_be_bytes();
    Prefix::host(Ipv4Addr::new(11, o[1], o[2], o[3]))
}

/// The cost of one bare BPF_MAP_UPDATE_ELEM on the pinned backend map, per second.
fn raw_updates_per_second(pin: &std::path::Path, n: u32) -> f64 {
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let map = aya::maps::MapData::from_pin(pin).expect("opening the pinned map");
    let fd = map.fd().as_fd().as_raw_fd();
    let value = [0u8; 12];
    let t = Instant::now();
    for i in 0..n {
        let key = i + 1_000_000;
        let attr = ElemAttr {
            map_fd: u32::try_from(fd).expect("fd"),
            pad: 0,
            key: &key as *const u32 as u64,
            value: value.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: attr is a valid bpf_attr elem member pointing at a 4-byte key and a 12-byte
        // value (the map's sizes) that outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                2 as libc::c_long,
                &attr as *const ElemAttr,
                size_of::<ElemAttr>(),
            )
        };
        assert_eq!(
            rc,
            0,
            "raw update failed: {}",
            std::io::Error::last_os_error()
        );
    }
    rate(n, t)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let topo = Topology::new(
        PROBE.as_ref(),
        &[
            ("client", Ipv4Addr::new(10, 244, 0, 2)),
            ("be1", Ipv4Addr::new(10, 244, 0, 11)),
        ],
    );
    let dp = KernelDatapath::load(&KernelConfig {
        bpf_root: topo.bpf_root().to_owned(),
        cluster: "c1".into(),
        node: "n1".into(),
    })
    .expect("load");

    let backends: Vec<_> = (1..=BACKENDS).map(|i| (i, be(i))).collect();
    let t = Instant::now();
    for b in &backends {
        dp.upsert_backends(std::slice::from_ref(b)).unwrap();
    }
    let backends_single = rate(BACKENDS, t);
    dp.delete_backends(&(1..=BACKENDS).collect::<Vec<_>>())
        .unwrap();
    let t = Instant::now();
    dp.upsert_backends(&backends).unwrap();
    let backends_batch = rate(BACKENDS, t);
    let raw = raw_updates_per_second(&dp.pin_dir().join("cm_backends"), BACKENDS);

    // 1,024 services of 64 backends: 65,536 slots plus 1,024 service entries.
    let t = Instant::now();
    for s in 0..1024u32 {
        let o = s.to_be_bytes();
        let key = ServiceKey {
            vip: Ipv4Addr::new(10, 96, o[2], o[3]),
            port: 80,
            proto: Proto::Tcp,
        };
        let ids: Vec<u32> = (s * 64 + 1..=s * 64 + 64).collect();
        dp.upsert_service(key, &ids).unwrap();
    }
    let services = rate(65_536 + 1024, t);

    let entries: Vec<_> = (0..IPCACHE)
        .map(|i| {
            (
                prefix(i),
                IpCacheValue {
                    identity: 70_000 + i % 1000,
                    node_ip: None,
                    cluster_id: 1,
                },
            )
        })
        .collect();
    let t = Instant::now();
    for e in &entries {
        dp.upsert_ipcache(std::slice::from_ref(e)).unwrap();
    }
    let ipcache_single = rate(IPCACHE, t);
    dp.delete_ipcache(&entries.iter().map(|(p, _)| *p).collect::<Vec<_>>())
        .unwrap();
    let t = Instant::now();
    dp.upsert_ipcache(&entries).unwrap();
    let ipcache_batch = rate(IPCACHE, t);
    dp.unpin_all().unwrap();
    drop(dp);

    // Connect latency, same topology: via the VIP, straight to the backend inside the
    // cgroup (program runs, no service matches), and outside it (no program).
    let dp = KernelDatapath::load(&KernelConfig {
        bpf_root: topo.bpf_root().to_owned(),
        cluster: "c1".into(),
        node: "n2".into(),
    })
    .expect("load");
    dp.attach_cgroup(topo.cgroup()).unwrap();
    dp.upsert_backends(&[(
        1,
        Backend {
            ip: Ipv4Addr::new(10, 244, 0, 11),
            ..be(1)
        },
    )])
    .unwrap();
    dp.upsert_service(
        ServiceKey {
            vip: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            proto: Proto::Tcp,
        },
        &[1],
    )
    .unwrap();
    topo.serve("be1", 8080);
    let lat = |in_cgroup, addr: &str| {
        topo.probe(
            "client",
            in_cgroup,
            &["tcp-latency", addr, "--count", "3000"],
        )
        .join(" ")
    };
    let _warm = lat(true, "10.244.0.11:8080");
    let via_vip = lat(true, "10.96.0.10:80");
    let direct_cg = lat(true, "10.244.0.11:8080");
    let direct = lat(false, "10.244.0.11:8080");
    dp.unpin_all().unwrap();

    println!("| map programming | entries/s |");
    println!("|---|---|");
    println!("| raw bpf(2) BPF_MAP_UPDATE_ELEM, cm_backends | {raw:.0} |");
    println!("| backends, one by one (65,536) | {backends_single:.0} |");
    println!("| backends, one batch (65,536) | {backends_batch:.0} |");
    println!("| services, 1,024 x 64 backends (slots batched per service) | {services:.0} |");
    println!("| ipcache, one by one (524,288) | {ipcache_single:.0} |");
    println!("| ipcache, one call (524,288) | {ipcache_batch:.0} |");
    println!();
    println!("| TCP connect, 3,000 samples | latency |");
    println!("|---|---|");
    println!("| through the VIP (socket LB) | {via_vip} |");
    println!("| to the backend, in the LB cgroup | {direct_cg} |");
    println!("| to the backend, no program | {direct} |");
}
