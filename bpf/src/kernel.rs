//! The kernel datapath: loads the eBPF object with aya, pins its maps under
//! `<bpf-root>/<cluster>/<node>/`, attaches the socket programs to a cgroup and the policy
//! programs to endpoint interfaces (TCX links, pinned too), and gives typed access to the maps.
//!
//! Loading again over existing pins adopts them: maps are reused with their contents, pinned
//! cgroup links are kept as they are, and pinned TC links get the new program atomically, so a
//! restart of the agent does not interrupt traffic.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, RingBuf};
use aya::programs::links::{CgroupAttachMode, FdLink, PinnedLink};
use aya::programs::tc::SchedClassifierLink;
use aya::programs::{CgroupSockAddr, SchedClassifier, SockOps, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use parking_lot::Mutex;

use crate::api::{
    Backend, BackendId, Datapath, Endpoint, Error, IpCacheValue, PolicyKey, PolicyValue, Prefix,
    Result, ServiceKey, Snapshot,
};
use crate::batch;
use crate::events::EventStream;
use crate::layout::{
    BackendRaw, EndpointRaw, HealthKeyRaw, HealthRaw, IpCacheAddrRaw, IpCacheKeyRaw,
    IpCacheValueRaw, LbConfigRaw, PolicyKeyRaw, PolicyValueRaw, ServiceKeyRaw, ServiceValueRaw,
};
use crate::outlier::{BackendHealth, OutlierDetection};

/// The compiled eBPF object (see `build.rs`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/clustermesh.bpf.o"));

/// The socket load-balancing programs and their attach points.
const SOCK_PROGRAMS: [&str; 3] = ["cm_connect4", "cm_sendmsg4", "cm_recvmsg4"];

/// The program that sees how the load balancer's TCP connects end (same cgroup).
const SOCKOPS_PROGRAM: &str = "cm_sockops";

/// Where the datapath pins its maps and links.
#[derive(Debug, Clone)]
pub struct KernelConfig {
    /// The bpffs directory for clustermesh (default `/sys/fs/bpf/clustermesh`).
    pub bpf_root: PathBuf,
    /// This cluster's name.
    pub cluster: String,
    /// This node's name.
    pub node: String,
}

impl KernelConfig {
    /// `<bpf-root>/<cluster>/<node>`.
    pub fn pin_dir(&self) -> PathBuf {
        self.bpf_root.join(&self.cluster).join(&self.node)
    }
}

/// The loaded eBPF object and its maps.
pub struct KernelDatapath {
    pin_dir: PathBuf,
    ebpf: Mutex<Ebpf>,
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error + use<> {
    let path = path.display().to_string();
    move |source| Error::Io { what, path, source }
}

fn map_err(op: &'static str, map: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
    move |source| Error::Map { op, map, source }
}

fn program_err(
    step: &'static str,
    program: &'static str,
) -> impl FnOnce(aya::programs::ProgramError) -> Error {
    move |source| Error::Program {
        step,
        program,
        source,
    }
}

fn map_data<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a MapData> {
    match ebpf.map(name).ok_or(Error::Missing(name))? {
        Map::HashMap(d) | Map::LpmTrie(d) | Map::LruHashMap(d) | Map::RingBuf(d) => Ok(d),
        _ => Err(Error::Missing(name)),
    }
}

fn hash<'a, K: aya::Pod, V: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<HashMap<&'a mut MapData, K, V>> {
    HashMap::try_from(ebpf.map_mut(name).ok_or(Error::Missing(name))?)
        .map_err(map_err("open", name))
}

fn ipcache(ebpf: &mut Ebpf) -> Result<LpmTrie<&mut MapData, IpCacheAddrRaw, IpCacheValueRaw>> {
    LpmTrie::try_from(
        ebpf.map_mut("cm_ipcache")
            .ok_or(Error::Missing("cm_ipcache"))?,
    )
    .map_err(map_err("open", "cm_ipcache"))
}

/// Runs `f` on a thread that has entered the network namespace at `netns` (a file such as
/// `/var/run/netns/NAME`), or on the current thread when `netns` is `None`.
fn in_netns<T: Send>(netns: Option<&Path>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let Some(path) = netns else { return f() };
    let file = std::fs::File::open(path).map_err(io_err("opening network namespace", path))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only (a scoped thread that ends after `f`), with a
            // valid namespace fd that outlives the call.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(Error::Io {
                    what: "entering network namespace",
                    path: path.display().to_string(),
                    source: std::io::Error::last_os_error(),
                });
            }
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

// === impl KernelDatapath ===

impl KernelDatapath {
    /// Loads the programs into the kernel, creating or adopting the pinned maps. Needs
    /// CAP_BPF (and CAP_NET_ADMIN to attach) and `bpf_root` on a bpffs.
    pub fn load(config: &KernelConfig) -> Result<Self> {
        let pin_dir = config.pin_dir();
        std::fs::create_dir_all(&pin_dir).map_err(io_err("creating pin directory", &pin_dir))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(OBJECT)
            .map_err(Error::Load)?;
        for name in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(Error::Missing(name))?
                .try_into()
                .map_err(program_err("lookup", name))?;
            prog.load().map_err(program_err("load", name))?;
        }
        let prog: &mut SockOps = ebpf
            .program_mut(SOCKOPS_PROGRAM)
            .ok_or(Error::Missing(SOCKOPS_PROGRAM))?
            .try_into()
            .map_err(program_err("lookup", SOCKOPS_PROGRAM))?;
        prog.load().map_err(program_err("load", SOCKOPS_PROGRAM))?;
        for name in ["cm_from_endpoint", "cm_to_endpoint"] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(Error::Missing(name))?
                .try_into()
                .map_err(program_err("lookup", name))?;
            prog.load().map_err(program_err("load", name))?;
        }
        Ok(Self {
            pin_dir,
            ebpf: Mutex::new(ebpf),
        })
    }

    /// The directory holding the pinned maps and links.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Attaches the socket load balancer (and the program that sees how its TCP connects
    /// end) to every socket in `cgroup` (a cgroup v2 directory). Links are pinned; existing
    /// pinned links for this cgroup are adopted.
    pub fn attach_cgroup(&self, cgroup: &Path) -> Result<()> {
        let dir = std::fs::File::open(cgroup).map_err(io_err("opening cgroup", cgroup))?;
        let ino = std::os::unix::fs::MetadataExt::ino(
            &dir.metadata().map_err(io_err("reading cgroup", cgroup))?,
        );
        let mut ebpf = self.ebpf.lock();
        let pin = self.pin_dir.join(format!("link_cg{ino}_{SOCKOPS_PROGRAM}"));
        if !pin.exists() {
            let pin_error = |e: &dyn std::fmt::Display| Error::Pin {
                path: pin.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            };
            let prog: &mut SockOps = ebpf
                .program_mut(SOCKOPS_PROGRAM)
                .ok_or(Error::Missing(SOCKOPS_PROGRAM))?
                .try_into()
                .map_err(program_err("lookup", SOCKOPS_PROGRAM))?;
            let id = prog
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(program_err("attach", SOCKOPS_PROGRAM))?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(program_err("take link", SOCKOPS_PROGRAM))?
                .try_into()
                .map_err(|e| pin_error(&e))?;
            link.pin(&pin).map_err(|e| pin_error(&e))?;
        }
        for name in SOCK_PROGRAMS {
            let pin = self.pin_dir.join(format!("link_cg{ino}_{name}"));
            if pin.exists() {
                continue; // adopted: the pinned link keeps the program attached
            }
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(Error::Missing(name))?
                .try_into()
                .map_err(program_err("lookup", name))?;
            let id = prog
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(program_err("attach", name))?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(program_err("take link", name))?
                .try_into()
                .map_err(|e| Error::Pin {
                    path: pin.display().to_string(),
                    source: std::io::Error::other(format!("{e}")),
                })?;
            link.pin(&pin).map_err(|e| Error::Pin {
                path: pin.display().to_string(),
                source: std::io::Error::other(e),
            })?;
        }
        Ok(())
    }

    /// Attaches the policy programs to an endpoint's host-side interface, in the network
    /// namespace at `netns` (`None`: the current one): TC ingress sees what the endpoint
    /// sends, TC egress what it receives. Links are pinned; pinned links get the newly loaded
    /// program atomically.
    pub fn attach_endpoint(&self, netns: Option<&Path>, interface: &str) -> Result<()> {
        let mut ebpf = self.ebpf.lock();
        let pin_dir = &self.pin_dir;
        for (name, attach) in [
            ("cm_from_endpoint", TcAttachType::Ingress),
            ("cm_to_endpoint", TcAttachType::Egress),
        ] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(Error::Missing(name))?
                .try_into()
                .map_err(program_err("lookup", name))?;
            let pin = pin_dir.join(format!("link_tc_{interface}_{name}"));
            in_netns(netns, || {
                let pin_error = |e: &dyn std::fmt::Display| Error::Pin {
                    path: pin.display().to_string(),
                    source: std::io::Error::other(e.to_string()),
                };
                if pin.exists() {
                    let old = PinnedLink::from_pin(&pin).map_err(|e| pin_error(&e))?;
                    let link = SchedClassifierLink::try_from(FdLink::from(old))
                        .map_err(|e| pin_error(&e))?;
                    let id = prog
                        .attach_to_link(link)
                        .map_err(program_err("replace", name))?;
                    // The pin still names the same link: closing our fd leaves it attached,
                    // and unpinning later detaches it.
                    let link: FdLink = prog
                        .take_link(id)
                        .map_err(program_err("take link", name))?
                        .try_into()
                        .map_err(|e| pin_error(&e))?;
                    drop(link);
                    return Ok(());
                }
                let id = prog
                    .attach(interface, attach)
                    .map_err(program_err("attach", name))?;
                let link: FdLink = prog
                    .take_link(id)
                    .map_err(program_err("take link", name))?
                    .try_into()
                    .map_err(|e| pin_error(&e))?;
                link.pin(&pin).map_err(|e| pin_error(&e))?;
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Detaches the policy programs from an interface (removing their pins).
    pub fn detach_endpoint(&self, interface: &str) -> Result<()> {
        for name in ["cm_from_endpoint", "cm_to_endpoint"] {
            let pin = self.pin_dir.join(format!("link_tc_{interface}_{name}"));
            match PinnedLink::from_pin(&pin) {
                Ok(link) => {
                    link.unpin().map_err(|source| Error::Pin {
                        path: pin.display().to_string(),
                        source,
                    })?;
                }
                Err(_) if !pin.exists() => {}
                Err(e) => {
                    return Err(Error::Pin {
                        path: pin.display().to_string(),
                        source: std::io::Error::other(e.to_string()),
                    });
                }
            }
        }
        Ok(())
    }

    /// The verdict events of the policy programs, as an async stream. Takes the ring buffer:
    /// call once.
    pub fn events(&self) -> Result<EventStream> {
        let map = self
            .ebpf
            .lock()
            .take_map("cm_events")
            .ok_or(Error::Missing("cm_events"))?;
        let ring = RingBuf::try_from(map).map_err(map_err("open", "cm_events"))?;
        EventStream::new(ring)
    }

    /// Sets when the socket load balancer ejects a backend and how it comes back.
    pub fn set_outlier_detection(&self, settings: &OutlierDetection) -> Result<()> {
        let mut ebpf = self.ebpf.lock();
        let mut array: Array<&mut MapData, LbConfigRaw> = Array::try_from(
            ebpf.map_mut("cm_lb_config")
                .ok_or(Error::Missing("cm_lb_config"))?,
        )
        .map_err(map_err("open", "cm_lb_config"))?;
        array
            .set(0, settings.raw(), 0)
            .map_err(map_err("update", "cm_lb_config"))
    }

    /// What outlier detection recorded, per client network namespace and backend.
    pub fn backend_health(&self) -> Result<Vec<BackendHealth>> {
        let mut ebpf = self.ebpf.lock();
        let map = hash::<HealthKeyRaw, HealthRaw>(&mut ebpf, "cm_health")?;
        let now = crate::outlier::monotonic_ns();
        let mut out = Vec::new();
        for item in map.iter() {
            let (k, v) = item.map_err(map_err("iterate", "cm_health"))?;
            out.push(BackendHealth::from_raw(&k, &v, now));
        }
        out.sort_by_key(|h| (h.ip, h.port, h.netns));
        Ok(out)
    }

    /// Removes every pin (maps and links) of this node: programs detach and maps are freed
    /// once nothing else holds them.
    pub fn unpin_all(&self) -> Result<()> {
        let entries =
            std::fs::read_dir(&self.pin_dir).map_err(io_err("listing pins", &self.pin_dir))?;
        for entry in entries {
            let path = entry.map_err(io_err("listing pins", &self.pin_dir))?.path();
            std::fs::remove_file(&path).map_err(io_err("removing pin", &path))?;
        }
        std::fs::remove_dir(&self.pin_dir).map_err(io_err("removing pin directory", &self.pin_dir))
    }

    fn service_count(ebpf: &mut Ebpf, key: ServiceKey) -> Result<u32> {
        let services = hash::<ServiceKeyRaw, ServiceValueRaw>(ebpf, "cm_services")?;
        match services.get(&key.raw(0), 0) {
            Ok(v) => Ok(u32::from(v.count)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(0),
            Err(e) => Err(map_err("lookup", "cm_services")(e)),
        }
    }
}

/// Writes `entries` with one batch call when there are several (falling back to single
/// updates where the map type has no batch support), or a single update.
fn write_batch<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    entries: &[(K, V)],
) -> Result<()> {
    if entries.len() > 1 {
        let fd = map_data(ebpf, name)?.fd().as_fd().as_raw_fd();
        match batch::update(fd, entries) {
            Ok(()) => return Ok(()),
            Err(e) if batch::unsupported(&e) => {}
            Err(source) => {
                return Err(Error::Batch {
                    op: "batch update",
                    map: name,
                    source,
                });
            }
        }
    }
    let mut map = hash::<K, V>(ebpf, name)?;
    for (k, v) in entries {
        map.insert(k, v, 0).map_err(map_err("update", name))?;
    }
    Ok(())
}

fn delete_batch<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    keys: &[K],
) -> Result<()> {
    let mut map = hash::<K, V>(ebpf, name)?;
    for k in keys {
        match map.remove(k) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err("delete", name)(e)),
        }
    }
    Ok(())
}

fn lpm_key(p: &Prefix) -> Result<LpmKey<IpCacheAddrRaw>> {
    if p.len > 32 {
        return Err(Error::PrefixLength(p.len));
    }
    let p = p.canonical();
    Ok(LpmKey::new(
        u32::from(p.len),
        IpCacheAddrRaw {
            ip: u32::from_ne_bytes(p.addr.octets()),
        },
    ))
}

impl Datapath for KernelDatapath {
    fn upsert_backends(&self, backends: &[(BackendId, Backend)]) -> Result<()> {
        let raw: Vec<(u32, BackendRaw)> = backends.iter().map(|(id, b)| (*id, b.raw())).collect();
        write_batch(&mut self.ebpf.lock(), "cm_backends", &raw)
    }

    fn delete_backends(&self, ids: &[BackendId]) -> Result<()> {
        delete_batch::<u32, BackendRaw>(&mut self.ebpf.lock(), "cm_backends", ids)
    }

    fn upsert_service(&self, key: ServiceKey, backends: &[BackendId]) -> Result<()> {
        let count = u16::try_from(backends.len())
            .map_err(|_| Error::TooManyBackends(key, backends.len()))?;
        let mut ebpf = self.ebpf.lock();
        let old = Self::service_count(&mut ebpf, key)?;
        let slots: Vec<(ServiceKeyRaw, ServiceValueRaw)> = (1u32..)
            .zip(backends)
            .map(|(slot, id)| {
                (
                    key.raw(slot),
                    ServiceValueRaw {
                        backend_id: *id,
                        count: 0,
                        flags: 0,
                    },
                )
            })
            .collect();
        write_batch(&mut ebpf, "cm_services", &slots)?;
        write_batch(
            &mut ebpf,
            "cm_services",
            &[(
                key.raw(0),
                ServiceValueRaw {
                    backend_id: 0,
                    count,
                    flags: 0,
                },
            )],
        )?;
        let stale: Vec<ServiceKeyRaw> = (u32::from(count) + 1..=old).map(|s| key.raw(s)).collect();
        delete_batch::<ServiceKeyRaw, ServiceValueRaw>(&mut ebpf, "cm_services", &stale)
    }

    fn delete_service(&self, key: ServiceKey) -> Result<()> {
        let mut ebpf = self.ebpf.lock();
        let old = Self::service_count(&mut ebpf, key)?;
        let keys: Vec<ServiceKeyRaw> = (0..=old).map(|s| key.raw(s)).collect();
        delete_batch::<ServiceKeyRaw, ServiceValueRaw>(&mut ebpf, "cm_services", &keys)
    }

    fn upsert_ipcache(&self, entries: &[(Prefix, IpCacheValue)]) -> Result<()> {
        let mut ebpf = self.ebpf.lock();
        if entries.len() > 1 {
            let raw: Vec<(IpCacheKeyRaw, IpCacheValueRaw)> = entries
                .iter()
                .map(|(p, v)| {
                    lpm_key(p)?;
                    let p = p.canonical();
                    Ok((
                        IpCacheKeyRaw {
                            prefixlen: u32::from(p.len),
                            ip: u32::from_ne_bytes(p.addr.octets()),
                        },
                        v.raw(),
                    ))
                })
                .collect::<Result<_>>()?;
            let fd = map_data(&ebpf, "cm_ipcache")?.fd().as_fd().as_raw_fd();
            match batch::update(fd, &raw) {
                Ok(()) => return Ok(()),
                Err(e) if batch::unsupported(&e) => {}
                Err(source) => {
                    return Err(Error::Batch {
                        op: "batch update",
                        map: "cm_ipcache",
                        source,
                    });
                }
            }
        }
        let mut trie = ipcache(&mut ebpf)?;
        for (p, v) in entries {
            trie.insert(&lpm_key(p)?, v.raw(), 0)
                .map_err(map_err("update", "cm_ipcache"))?;
        }
        Ok(())
    }

    fn delete_ipcache(&self, prefixes: &[Prefix]) -> Result<()> {
        let mut ebpf = self.ebpf.lock();
        let mut trie = ipcache(&mut ebpf)?;
        for p in prefixes {
            match trie.remove(&lpm_key(p)?) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err("delete", "cm_ipcache")(e)),
            }
        }
        Ok(())
    }

    fn upsert_endpoints(&self, endpoints: &[(Ipv4Addr, Endpoint)]) -> Result<()> {
        let raw: Vec<(u32, EndpointRaw)> = endpoints
            .iter()
            .map(|(ip, e)| (u32::from_ne_bytes(ip.octets()), e.raw()))
            .collect();
        write_batch(&mut self.ebpf.lock(), "cm_endpoints", &raw)
    }

    fn delete_endpoints(&self, ips: &[Ipv4Addr]) -> Result<()> {
        let keys: Vec<u32> = ips
            .iter()
            .map(|ip| u32::from_ne_bytes(ip.octets()))
            .collect();
        delete_batch::<u32, EndpointRaw>(&mut self.ebpf.lock(), "cm_endpoints", &keys)
    }

    fn upsert_policy(&self, entries: &[(PolicyKey, PolicyValue)]) -> Result<()> {
        let raw: Vec<(PolicyKeyRaw, PolicyValueRaw)> =
            entries.iter().map(|(k, v)| (k.raw(), v.raw())).collect();
        write_batch(&mut self.ebpf.lock(), "cm_policy", &raw)
    }

    fn delete_policy(&self, keys: &[PolicyKey]) -> Result<()> {
        let raw: Vec<PolicyKeyRaw> = keys.iter().map(PolicyKey::raw).collect();
        delete_batch::<PolicyKeyRaw, PolicyValueRaw>(&mut self.ebpf.lock(), "cm_policy", &raw)
    }

    fn snapshot(&self) -> Result<Snapshot> {
        let mut ebpf = self.ebpf.lock();
        let mut snap = Snapshot::default();

        let services = hash::<ServiceKeyRaw, ServiceValueRaw>(&mut ebpf, "cm_services")?;
        let mut slots: BTreeMap<ServiceKey, BTreeMap<u32, BackendId>> = BTreeMap::new();
        let mut counts: BTreeMap<ServiceKey, u16> = BTreeMap::new();
        for item in services.iter() {
            let (k, v) = item.map_err(map_err("iterate", "cm_services"))?;
            let Some(key) = ServiceKey::from_raw(&k) else {
                continue;
            };
            if k.slot == 0 {
                counts.insert(key, v.count);
            } else {
                slots.entry(key).or_default().insert(k.slot, v.backend_id);
            }
        }
        for (key, count) in counts {
            let by_slot = slots.remove(&key).unwrap_or_default();
            snap.services.insert(
                key,
                (1..=u32::from(count))
                    .filter_map(|s| by_slot.get(&s).copied())
                    .collect(),
            );
        }

        let backends = hash::<u32, BackendRaw>(&mut ebpf, "cm_backends")?;
        for item in backends.iter() {
            let (id, b) = item.map_err(map_err("iterate", "cm_backends"))?;
            if let Some(b) = Backend::from_raw(&b) {
                snap.backends.insert(id, b);
            }
        }

        let trie = ipcache(&mut ebpf)?;
        for item in trie.iter() {
            let (k, v) = item.map_err(map_err("iterate", "cm_ipcache"))?;
            let len = u8::try_from(k.prefix_len()).map_err(|_| Error::PrefixLength(u8::MAX))?;
            let prefix = Prefix {
                addr: Ipv4Addr::from(k.data().ip.to_ne_bytes()),
                len,
            };
            snap.ipcache.insert(prefix, IpCacheValue::from_raw(&v));
        }

        let endpoints = hash::<u32, EndpointRaw>(&mut ebpf, "cm_endpoints")?;
        for item in endpoints.iter() {
            let (ip, e) = item.map_err(map_err("iterate", "cm_endpoints"))?;
            snap.endpoints
                .insert(Ipv4Addr::from(ip.to_ne_bytes()), Endpoint::from_raw(&e));
        }

        let policy = hash::<PolicyKeyRaw, PolicyValueRaw>(&mut ebpf, "cm_policy")?;
        for item in policy.iter() {
            let (k, v) = item.map_err(map_err("iterate", "cm_policy"))?;
            snap.policy
                .insert(PolicyKey::from_raw(&k), PolicyValue::from_raw(&v));
        }
        Ok(snap)
    }
}
