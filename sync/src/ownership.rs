//! Which remote owns each imported pod IP. An address belongs to the first remote that
//! imports it; another remote's claim on it is refused (rejected and counted as
//! `ip/conflict`) until the owner releases it. So a remote cannot take over a pod IP of
//! another cluster in this cluster's agents. (The local cluster's own entries always win in
//! the agents over any remote's.) Shared by the sync workers of one apiserver; rebuilt from
//! their caches at start.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use clustermesh_model::cluster::ClusterName;
use parking_lot::Mutex;

/// The owner of each imported pod IP.
#[derive(Debug, Default)]
pub struct IpOwners {
    owners: Mutex<HashMap<IpAddr, ClusterName>>,
}

impl IpOwners {
    /// Claims `ip` for `cluster`: `Ok` when it was free or already `cluster`'s, else the
    /// owner.
    pub fn claim(&self, ip: IpAddr, cluster: &ClusterName) -> Result<(), ClusterName> {
        let mut owners = self.owners.lock();
        match owners.get(&ip) {
            Some(owner) if owner != cluster => Err(owner.clone()),
            Some(_) => Ok(()),
            None => {
                owners.insert(ip, cluster.clone());
                Ok(())
            }
        }
    }

    /// Releases `ip` if `cluster` owns it.
    pub fn release(&self, ip: &IpAddr, cluster: &ClusterName) {
        let mut owners = self.owners.lock();
        if owners.get(ip) == Some(cluster) {
            owners.remove(ip);
        }
    }

    /// Releases every address `cluster` owns (its cache was deleted).
    pub fn release_all(&self, cluster: &ClusterName) {
        self.owners.lock().retain(|_, owner| owner != cluster);
    }

    /// Releases every address `cluster` owns but `keep` (what its cache holds).
    pub fn release_except(&self, cluster: &ClusterName, keep: &HashSet<IpAddr>) {
        self.owners
            .lock()
            .retain(|ip, owner| owner != cluster || keep.contains(ip));
    }

    /// The owner of `ip`.
    pub fn owner(&self, ip: &IpAddr) -> Option<ClusterName> {
        self.owners.lock().get(ip).cloned()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn the_first_claim_wins_until_released() {
        let owners = IpOwners::default();
        let (a, b) = (
            ClusterName::new("a").unwrap(),
            ClusterName::new("b").unwrap(),
        );
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(owners.claim(ip, &b), Ok(()));
        assert_eq!(owners.claim(ip, &b), Ok(()));
        assert_eq!(owners.claim(ip, &a), Err(b.clone()), "not by name order");
        owners.release(&ip, &a);
        assert_eq!(
            owners.owner(&ip),
            Some(b.clone()),
            "only the owner releases"
        );
        owners.release(&ip, &b);
        assert_eq!(owners.claim(ip, &a), Ok(()));
        owners.release_all(&a);
        assert_eq!(owners.owner(&ip), None);
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        owners.claim(ip, &a).unwrap();
        owners.claim(other, &a).unwrap();
        owners.release_except(&a, &HashSet::from([other]));
        assert_eq!(owners.owner(&ip), None);
        assert_eq!(owners.owner(&other), Some(a));
    }
}
