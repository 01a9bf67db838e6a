//! Numeric security identities. 24 bits are used; the cluster ID sits in the top bits, so
//! every cluster owns a disjoint range and an identity names its cluster.

use std::fmt;
use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterId, MaxConnectedClusters};

/// The number of bits a numeric identity may use.
pub const IDENTITY_BITS: u32 = 24;

/// Identities below this value are reserved for well-known entities.
pub const MIN_WORKLOAD_IDENTITY: u32 = 256;

/// Why a numeric identity was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// More than 24 bits set.
    #[error("identity {0} does not fit in 24 bits")]
    TooLarge(u32),
    /// Not a decimal number.
    #[error("identity {0:?} is not a decimal number")]
    NotANumber(String),
    /// A remote cluster sent an identity it does not own.
    #[error("identity {identity} is outside cluster {cluster}'s range {start}..={end}")]
    OutsideClusterRange {
        /// The refused identity.
        identity: u32,
        /// The cluster that sent it.
        cluster: u16,
        /// First identity the cluster owns.
        start: u32,
        /// Last identity the cluster owns.
        end: u32,
    },
}

/// A numeric security identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Identity(u32);

/// The well-known identities below 256, with Cilium's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReservedIdentity {
    /// The local host.
    Host = 1,
    /// Anything outside the mesh.
    World = 2,
    /// Endpoints not managed by the mesh.
    Unmanaged = 3,
    /// Health-check endpoints.
    Health = 4,
    /// Endpoints whose identity is not resolved yet.
    Init = 5,
    /// Nodes of other clusters (and of this one, seen from a pod).
    RemoteNode = 6,
    /// The Kubernetes API server.
    KubeApiserver = 7,
}

impl ReservedIdentity {
    /// All reserved identities, in numeric order.
    pub const ALL: [Self; 7] = [
        Self::Host,
        Self::World,
        Self::Unmanaged,
        Self::Health,
        Self::Init,
        Self::RemoteNode,
        Self::KubeApiserver,
    ];

    /// The label name Cilium gives it (`reserved:<name>`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::World => "world",
            Self::Unmanaged => "unmanaged",
            Self::Health => "health",
            Self::Init => "init",
            Self::RemoteNode => "remote-node",
            Self::KubeApiserver => "kube-apiserver",
        }
    }

    /// The numeric identity.
    pub const fn identity(self) -> Identity {
        Identity(self as u32)
    }
}

// === impl Identity ===

impl Identity {
    /// The largest value of 24 bits.
    pub const MAX: u32 = (1 << IDENTITY_BITS) - 1;

    /// Validates that `raw` fits in 24 bits.
    pub fn new(raw: u32) -> Result<Self, IdentityError> {
        if raw > Self::MAX {
            return Err(IdentityError::TooLarge(raw));
        }
        Ok(Self(raw))
    }

    /// The identity as a number.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// Whether this is one of the identities below 256.
    pub const fn is_reserved(self) -> bool {
        self.0 < MIN_WORKLOAD_IDENTITY
    }

    /// The well-known entity, when this is one.
    pub fn reserved(self) -> Option<ReservedIdentity> {
        ReservedIdentity::ALL
            .into_iter()
            .find(|r| *r as u32 == self.0)
    }

    /// The cluster ID bits, for a workload identity; `None` for reserved identities.
    pub fn cluster_id(self, mode: MaxConnectedClusters) -> Option<ClusterId> {
        if self.is_reserved() {
            return None;
        }
        ClusterId::new(self.0 >> mode.identity_shift(), mode).ok()
    }

    /// Checks that a cluster owns this identity (for identities received from it).
    pub fn check_owned_by(
        self,
        cluster: ClusterId,
        mode: MaxConnectedClusters,
    ) -> Result<(), IdentityError> {
        let range = cluster_range(cluster, mode);
        if range.contains(&self.0) {
            Ok(())
        } else {
            Err(IdentityError::OutsideClusterRange {
                identity: self.0,
                cluster: cluster.get(),
                start: *range.start(),
                end: *range.end(),
            })
        }
    }

    /// Parses the decimal form used in kvstore keys.
    pub fn parse_decimal(s: &str) -> Result<Self, IdentityError> {
        // `u32::from_str` accepts a leading '+'; keys never carry one.
        if s.is_empty()
            || !s.bytes().all(|b| b.is_ascii_digit())
            || (s.len() > 1 && s.starts_with('0'))
        {
            return Err(IdentityError::NotANumber(s.to_owned()));
        }
        let raw: u32 = s.parse().map_err(|_| IdentityError::TooLarge(u32::MAX))?;
        Self::new(raw)
    }
}

impl TryFrom<u32> for Identity {
    type Error = IdentityError;
    fn try_from(raw: u32) -> Result<Self, Self::Error> {
        Self::new(raw)
    }
}

impl From<Identity> for u32 {
    fn from(id: Identity) -> Self {
        id.0
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Every identity cluster `cluster` owns: `[C << shift, ((C + 1) << shift) - 1]`.
pub fn cluster_range(cluster: ClusterId, mode: MaxConnectedClusters) -> RangeInclusive<u32> {
    let shift = mode.identity_shift();
    let c = u32::from(cluster.get());
    (c << shift)..=(((c + 1) << shift) - 1)
}

/// The identities a cluster hands out to its workloads: its range without the first value
/// (local index 0 is never allocated), so 65,535 (255 mode) or 32,767 (511 mode) of them.
pub fn allocatable_range(cluster: ClusterId, mode: MaxConnectedClusters) -> RangeInclusive<u32> {
    let owned = cluster_range(cluster, mode);
    (owned.start() + 1)..=*owned.end()
}

#[cfg(test)]
mod tests;
