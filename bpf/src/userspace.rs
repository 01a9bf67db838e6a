//! The in-memory datapath: the same maps as the kernel's, held in process memory, for
//! unprivileged runs (`--datapath userspace`, `clustermesh up` as a normal user) and for
//! tests of the layers above.

use std::net::Ipv4Addr;

use parking_lot::Mutex;

use crate::api::{
    Backend, BackendId, Datapath, Endpoint, Error, IpCacheValue, PolicyKey, PolicyValue, Prefix,
    Result, ServiceKey, Snapshot,
};

/// Maps in memory. What [`Datapath::snapshot`] returns is exactly what was written.
#[derive(Debug, Default)]
pub struct UserspaceDatapath {
    maps: Mutex<Snapshot>,
}

impl UserspaceDatapath {
    /// Empty maps.
    pub fn new() -> Self {
        Self::default()
    }

    /// The backend a new connection to `key` would get for a given random draw, as the
    /// socket program picks it (`draw % count`); `None` when the service is unknown or has no
    /// backend.
    pub fn pick(&self, key: ServiceKey, draw: u32) -> Option<Backend> {
        let maps = self.maps.lock();
        let ids = maps.services.get(&key)?;
        let count = u32::try_from(ids.len()).ok().filter(|c| *c > 0)?;
        let id = ids[usize::try_from(draw % count).ok()?];
        maps.backends.get(&id).copied()
    }
}

fn check_prefix(p: &Prefix) -> Result<()> {
    if p.len > 32 {
        Err(Error::PrefixLength(p.len))
    } else {
        Ok(())
    }
}

impl Datapath for UserspaceDatapath {
    fn upsert_backends(&self, backends: &[(BackendId, Backend)]) -> Result<()> {
        self.maps.lock().backends.extend(backends.iter().copied());
        Ok(())
    }

    fn delete_backends(&self, ids: &[BackendId]) -> Result<()> {
        let mut maps = self.maps.lock();
        for id in ids {
            maps.backends.remove(id);
        }
        Ok(())
    }

    fn upsert_service(&self, key: ServiceKey, backends: &[BackendId]) -> Result<()> {
        if backends.len() > usize::from(u16::MAX) {
            return Err(Error::TooManyBackends(key, backends.len()));
        }
        self.maps.lock().services.insert(key, backends.to_vec());
        Ok(())
    }

    fn delete_service(&self, key: ServiceKey) -> Result<()> {
        self.maps.lock().services.remove(&key);
        Ok(())
    }

    fn upsert_ipcache(&self, entries: &[(Prefix, IpCacheValue)]) -> Result<()> {
        entries.iter().try_for_each(|(p, _)| check_prefix(p))?;
        let mut maps = self.maps.lock();
        for (p, v) in entries {
            maps.ipcache.insert(p.canonical(), *v);
        }
        Ok(())
    }

    fn delete_ipcache(&self, prefixes: &[Prefix]) -> Result<()> {
        prefixes.iter().try_for_each(check_prefix)?;
        let mut maps = self.maps.lock();
        for p in prefixes {
            maps.ipcache.remove(&p.canonical());
        }
        Ok(())
    }

    fn upsert_endpoints(&self, endpoints: &[(Ipv4Addr, Endpoint)]) -> Result<()> {
        self.maps.lock().endpoints.extend(endpoints.iter().copied());
        Ok(())
    }

    fn delete_endpoints(&self, ips: &[Ipv4Addr]) -> Result<()> {
        let mut maps = self.maps.lock();
        for ip in ips {
            maps.endpoints.remove(ip);
        }
        Ok(())
    }

    fn upsert_policy(&self, entries: &[(PolicyKey, PolicyValue)]) -> Result<()> {
        self.maps.lock().policy.extend(entries.iter().copied());
        Ok(())
    }

    fn delete_policy(&self, keys: &[PolicyKey]) -> Result<()> {
        let mut maps = self.maps.lock();
        for k in keys {
            maps.policy.remove(k);
        }
        Ok(())
    }

    fn snapshot(&self) -> Result<Snapshot> {
        Ok(self.maps.lock().clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BackendState, Proto};

    #[test]
    fn picks_like_the_socket_program_and_refuses_bad_prefixes() {
        let dp = UserspaceDatapath::new();
        let key = ServiceKey {
            vip: Ipv4Addr::new(10, 96, 0, 1),
            port: 80,
            proto: Proto::Tcp,
        };
        let be = |last| Backend {
            ip: Ipv4Addr::new(10, 0, 0, last),
            port: 8080,
            proto: Proto::Tcp,
            state: BackendState::Active,
            cluster_id: 1,
        };
        dp.upsert_backends(&[(1, be(1)), (2, be(2))]).unwrap();
        dp.upsert_service(key, &[1, 2]).unwrap();
        assert_eq!(dp.pick(key, 0), Some(be(1)));
        assert_eq!(dp.pick(key, 7), Some(be(2)));
        dp.upsert_service(key, &[]).unwrap();
        assert_eq!(dp.pick(key, 0), None);
        let bad = Prefix {
            addr: Ipv4Addr::LOCALHOST,
            len: 33,
        };
        assert!(matches!(
            dp.upsert_ipcache(&[(
                bad,
                crate::IpCacheValue {
                    identity: 1,
                    node_ip: None,
                    cluster_id: 0
                }
            )]),
            Err(Error::PrefixLength(33))
        ));
        assert!(dp.snapshot().unwrap().ipcache.is_empty());
    }
}
