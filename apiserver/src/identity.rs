//! Identity allocation through the kvstore. Each label set gets one numeric identity from this
//! cluster's range; two apiserver replicas on one store never hand out one number twice nor
//! two numbers for one label set:
//!
//! 1. the reverse key `cilium/state/identities/v1/value/<labels>/<owner>` answers "which
//!    identity has these labels" when it exists (Cilium's allocator layout: the owner is the
//!    user of the identity, here [`OWNER`] for every replica; the key is attached to the
//!    allocator's lease, which it keeps alive, so that keys of a dead store user go away as
//!    Cilium's do);
//! 2. otherwise a free number is claimed with create-if-absent on
//!    `cilium/state/identities/v1/id/<n>` (a number someone else claimed is skipped);
//! 3. then the reverse key is created; if another replica created it first, our number is
//!    given back (compare-and-delete) and theirs is used.
//!
//! Identities no longer used by any pod are released after a grace period.
//!
//! A number claimed with no reverse key pointing at it (a crash between the two creates, a
//! lease that expired while every replica was down) is taken back by [`load`] when no other
//! number has its labels: its reverse key is created again, so identities survive a long
//! outage. Otherwise it is an orphan, exported but never used; once it has stayed one for
//! the grace period (another replica may be between its two creates) it is deleted
//! (compare-and-delete on the revision seen). Reverse keys of this project's earlier layout
//! (no owner) are deleted when found.
//!
//! [`load`]: IdentityAllocator::load

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clustermesh_kvstore::{CasOutcome, CreateOutcome, KvStore, LeaseId};
use clustermesh_model::cluster::{ClusterId, MaxConnectedClusters};
use clustermesh_model::identity::{Identity, allocatable_range};
use clustermesh_model::keys::{IDENTITY_ID_PREFIX, IDENTITY_VALUE_PREFIX, Key};
use clustermesh_model::labels::LabelSet;

/// Why an identity could not be allocated or released.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The store failed.
    #[error("kvstore operation for identity allocation failed")]
    Store(#[from] clustermesh_kvstore::Error),
    /// Every number of the cluster's range is taken.
    #[error("no free identity left in {start}..={end}")]
    Exhausted {
        /// First allocatable identity.
        start: u32,
        /// Last allocatable identity.
        end: u32,
    },
}

/// The owner of this project's reverse keys (Cilium puts a node's name there).
pub const OWNER: &str = "clustermesh-apiserver";

/// The TTL of the lease the reverse keys are attached to (Cilium's default kvstore lease
/// TTL); it is renewed every [`LEASE_RENEWAL`].
pub const LEASE_TTL: Duration = Duration::from_secs(15 * 60);
/// How often the lease is renewed.
pub const LEASE_RENEWAL: Duration = Duration::from_secs(60);

/// Allocates and releases this cluster's identities.
pub struct IdentityAllocator {
    store: Arc<dyn KvStore>,
    /// The lease of the reverse keys, and when it was last renewed.
    lease: Option<(LeaseId, Instant)>,
    /// How often it is renewed ([`LEASE_RENEWAL`]).
    renewal: Duration,
    range: RangeInclusive<u32>,
    grace: Duration,
    /// Label set -> identity, as known from the store and from our own allocations.
    known: BTreeMap<LabelSet, Identity>,
    /// Numbers known to be taken.
    taken: BTreeSet<u32>,
    /// Identities no pod uses, since when.
    unused_since: BTreeMap<Identity, Instant>,
    /// Numbers claimed with no reverse key pointing at them: the revision of the claim, and
    /// since when.
    orphans: BTreeMap<Identity, (clustermesh_kvstore::Revision, Instant)>,
}

fn id_key(id: Identity) -> String {
    Key::Identity { id }.to_string()
}

fn value_key(labels: &LabelSet) -> String {
    Key::IdentityValue {
        labels: labels.clone(),
        owner: OWNER.to_owned(),
    }
    .to_string()
}

impl IdentityAllocator {
    /// An allocator for `cluster` that releases unused identities after `grace`.
    pub fn new(
        store: Arc<dyn KvStore>,
        cluster: ClusterId,
        mode: MaxConnectedClusters,
        grace: Duration,
    ) -> Self {
        Self {
            store,
            lease: None,
            renewal: LEASE_RENEWAL,
            range: allocatable_range(cluster, mode),
            grace,
            known: BTreeMap::new(),
            taken: BTreeSet::new(),
            unused_since: BTreeMap::new(),
            orphans: BTreeMap::new(),
        }
    }

    /// The lease the reverse keys are attached to: renewed when [`LEASE_RENEWAL`] has passed;
    /// a new one when it is gone (every reverse key of ours is then written again with it).
    async fn lease(&mut self) -> Result<LeaseId, IdentityError> {
        let now = Instant::now();
        match self.lease {
            Some((id, renewed)) if now.duration_since(renewed) < self.renewal => return Ok(id),
            Some((id, _)) => match self.store.keep_alive(id).await {
                Ok(_) => {
                    self.lease = Some((id, now));
                    self.restore_missing(id).await?;
                    return Ok(id);
                }
                Err(clustermesh_kvstore::Error::LeaseNotFound(_)) => {
                    tracing::warn!(
                        "the identities' lease expired; writing their reverse keys again"
                    );
                }
                Err(e) => return Err(e.into()),
            },
            None => {}
        }
        let id = self.store.grant_lease(LEASE_TTL).await?;
        self.lease = Some((id, now));
        let known: Vec<(LabelSet, Identity)> =
            self.known.iter().map(|(l, i)| (l.clone(), *i)).collect();
        for (labels, identity) in known {
            if self.id_holds(identity, &labels).await? {
                self.store
                    .put(
                        &value_key(&labels),
                        identity.to_string().as_bytes(),
                        Some(id),
                    )
                    .await?;
            } else {
                self.forget(&labels, identity);
            }
        }
        Ok(id)
    }

    /// Writes again, with `lease`, the reverse keys of known identities that are gone (another
    /// replica's lease held them and expired): one listing per renewal.
    async fn restore_missing(&mut self, lease: LeaseId) -> Result<(), IdentityError> {
        let present: BTreeSet<String> = self
            .store
            .list(IDENTITY_VALUE_PREFIX)
            .await?
            .kvs
            .into_iter()
            .map(|kv| kv.key)
            .collect();
        let missing: Vec<(LabelSet, Identity)> = self
            .known
            .iter()
            .filter(|(l, _)| !present.contains(&value_key(l)))
            .map(|(l, i)| (l.clone(), *i))
            .collect();
        for (labels, id) in missing {
            // Only while the number still has these labels: one released (and perhaps given
            // to other labels) by another replica meanwhile is forgotten, and the labels get
            // a number anew when next allocated.
            if self.id_holds(id, &labels).await? {
                self.store
                    .create(&value_key(&labels), id.to_string().as_bytes(), Some(lease))
                    .await?;
            } else {
                self.forget(&labels, id);
            }
        }
        Ok(())
    }

    /// Whether `id/<id>` holds `labels`.
    async fn id_holds(&self, id: Identity, labels: &LabelSet) -> Result<bool, IdentityError> {
        Ok(self.store.get(&id_key(id)).await?.is_some_and(|kv| {
            std::str::from_utf8(&kv.value)
                .ok()
                .and_then(|t| t.parse::<LabelSet>().ok())
                .is_some_and(|l| &l == labels)
        }))
    }

    /// Forgets an identity this allocator no longer holds.
    fn forget(&mut self, labels: &LabelSet, id: Identity) {
        tracing::warn!(%id, labels = %labels, "an identity's number no longer holds its labels (released by another replica); it is allocated anew when next used");
        self.known.remove(labels);
        self.unused_since.remove(&id);
    }

    /// The same allocator renewing its lease every `renewal` instead of [`LEASE_RENEWAL`].
    pub fn with_lease_renewal(mut self, renewal: Duration) -> Self {
        self.renewal = renewal;
        self
    }

    /// Reads what the store already holds (after a restart, or what another replica wrote).
    pub async fn load(&mut self) -> Result<(), IdentityError> {
        self.known.clear();
        self.taken.clear();
        let values = self.store.list(IDENTITY_VALUE_PREFIX).await?;
        for kv in values.kvs {
            let labels = match Key::parse(&kv.key) {
                Ok(Key::IdentityValue { labels, owner }) if owner == OWNER => labels,
                // Another user's (a Cilium agent's), or not a key.
                Ok(_) => continue,
                Err(_) => {
                    // This project's earlier layout (no owner): replaced below.
                    if kv.key.ends_with(';') {
                        self.store.delete(&kv.key).await?;
                    }
                    continue;
                }
            };
            let Some(id) = std::str::from_utf8(&kv.value)
                .ok()
                .and_then(|s| Identity::parse_decimal(s).ok())
            else {
                continue;
            };
            self.known.insert(labels, id);
        }
        let ids = self.store.list(IDENTITY_ID_PREFIX).await?;
        let now = Instant::now();
        self.orphans.clear();
        let mut owned: BTreeSet<Identity> = self.known.values().copied().collect();
        for kv in ids.kvs {
            let Ok(Key::Identity { id }) = Key::parse(&kv.key) else {
                continue;
            };
            self.taken.insert(id.get());
            if !self.range.contains(&id.get()) || owned.contains(&id) {
                continue;
            }
            // A number whose reverse key is gone: taken back when no other number has its
            // labels.
            let labels = std::str::from_utf8(&kv.value)
                .ok()
                .and_then(|t| t.parse::<LabelSet>().ok());
            if let Some(labels) = labels.filter(|l| !self.known.contains_key(l)) {
                let lease = self.lease().await?;
                if let CreateOutcome::Created { .. } = self
                    .store
                    .create(&value_key(&labels), id.to_string().as_bytes(), Some(lease))
                    .await?
                {
                    self.known.insert(labels, id);
                    owned.insert(id);
                    continue;
                }
            }
            self.orphans.insert(id, (kv.mod_revision, now));
        }
        if !self.orphans.is_empty() {
            tracing::info!(orphans = ?self.orphans.keys().collect::<Vec<_>>(), "identities with no label set pointing at them (an interrupted allocation or release): deleted after the grace period unless claimed");
        }
        Ok(())
    }

    /// Deletes the orphans that stayed orphans for the grace period; returns them.
    async fn collect_orphans(&mut self, now: Instant) -> Result<Vec<Identity>, IdentityError> {
        let due: Vec<(Identity, clustermesh_kvstore::Revision)> = self
            .orphans
            .iter()
            .filter(|(_, (_, since))| now.duration_since(*since) >= self.grace)
            .map(|(id, (rev, _))| (*id, *rev))
            .collect();
        let mut deleted = Vec::new();
        for (id, rev) in due {
            // Forgotten only once it is settled: a store error leaves it for the next pass.
            let current = self.store.get(&id_key(id)).await?;
            self.orphans.remove(&id);
            let Some(kv) = current else {
                self.taken.remove(&id.get());
                continue;
            };
            if kv.mod_revision != rev {
                continue;
            }
            // Claimed meanwhile (a replica finished its allocation): no orphan.
            let labels = std::str::from_utf8(&kv.value)
                .ok()
                .and_then(|t| t.parse::<LabelSet>().ok());
            if let Some(labels) = labels
                && self.read_value(&value_key(&labels)).await? == Some(id)
            {
                self.remember(&labels, id);
                continue;
            }
            if let CasOutcome::Done { .. } = self.store.compare_and_delete(&id_key(id), rev).await?
            {
                self.taken.remove(&id.get());
                deleted.push(id);
            }
        }
        Ok(deleted)
    }

    /// The identity of every label set currently known.
    pub fn identities(&self) -> &BTreeMap<LabelSet, Identity> {
        &self.known
    }

    /// The identity of `labels`, allocating one if needed.
    pub async fn allocate(&mut self, labels: &LabelSet) -> Result<Identity, IdentityError> {
        if let Some(id) = self.known.get(labels) {
            return Ok(*id);
        }
        let vkey = value_key(labels);
        if let Some(id) = self.read_value(&vkey).await? {
            self.remember(labels, id);
            return Ok(id);
        }
        let text = labels.to_kvstore_string();
        let mut candidate = *self.range.start();
        loop {
            while self.taken.contains(&candidate) {
                candidate += 1;
            }
            if candidate > *self.range.end() {
                return Err(IdentityError::Exhausted {
                    start: *self.range.start(),
                    end: *self.range.end(),
                });
            }
            let id = Identity::new(candidate).expect("allocatable ranges fit in 24 bits");
            let claimed = match self
                .store
                .create(&id_key(id), text.as_bytes(), None)
                .await?
            {
                CreateOutcome::Created { revision } => revision,
                CreateOutcome::Exists { .. } => {
                    self.taken.insert(candidate);
                    continue;
                }
            };
            self.taken.insert(candidate);
            let lease = self.lease().await?;
            match self
                .store
                .create(&vkey, id.to_string().as_bytes(), Some(lease))
                .await?
            {
                CreateOutcome::Created { .. } => {
                    self.remember(labels, id);
                    return Ok(id);
                }
                CreateOutcome::Exists { current } => {
                    let theirs = std::str::from_utf8(&current.value)
                        .ok()
                        .and_then(|s| Identity::parse_decimal(s).ok());
                    // Our own number: another replica's start took it back while we were
                    // between the two creates. It is ours; keep it.
                    if theirs == Some(id) {
                        self.remember(labels, id);
                        return Ok(id);
                    }
                    // Another replica allocated these labels meanwhile: give our number back.
                    self.store.compare_and_delete(&id_key(id), claimed).await?;
                    self.taken.remove(&candidate);
                    match theirs {
                        Some(theirs) => {
                            self.remember(labels, theirs);
                            return Ok(theirs);
                        }
                        None => {
                            tracing::warn!(key = %vkey, "identity value key holds no identity; allocating anew")
                        }
                    }
                }
            }
        }
    }

    async fn read_value(&self, vkey: &str) -> Result<Option<Identity>, IdentityError> {
        Ok(self.store.get(vkey).await?.and_then(|kv| {
            std::str::from_utf8(&kv.value)
                .ok()
                .and_then(|s| Identity::parse_decimal(s).ok())
        }))
    }

    fn remember(&mut self, labels: &LabelSet, id: Identity) {
        self.known.insert(labels.clone(), id);
        self.taken.insert(id.get());
        self.unused_since.remove(&id);
    }

    /// Releases identities whose label sets no pod has used for the grace period. Returns
    /// what was released.
    pub async fn release_unused(
        &mut self,
        in_use: &BTreeSet<&LabelSet>,
        now: Instant,
    ) -> Result<Vec<Identity>, IdentityError> {
        // Renewed here, on every pass of the source.
        self.lease().await?;
        let mut released = self.collect_orphans(now).await?;
        let unused: Vec<(LabelSet, Identity)> = self
            .known
            .iter()
            .filter(|(l, _)| !in_use.contains(l))
            .map(|(l, i)| (l.clone(), *i))
            .collect();
        for (_, id) in self.known.iter().filter(|(l, _)| in_use.contains(l)) {
            self.unused_since.remove(id);
        }
        for (labels, id) in unused {
            let since = *self.unused_since.entry(id).or_insert(now);
            if now.duration_since(since) < self.grace {
                continue;
            }
            let vkey = value_key(&labels);
            let value = self.store.get(&vkey).await?;
            let released_value = match value {
                Some(kv) => matches!(
                    self.store
                        .compare_and_delete(&vkey, kv.mod_revision)
                        .await?,
                    CasOutcome::Done { .. }
                ),
                None => true,
            };
            // The number goes only once no label set points at it, and only while it still
            // has these labels (never another label set's number).
            if let (true, Some(kv)) = (released_value, self.store.get(&id_key(id)).await?)
                && std::str::from_utf8(&kv.value)
                    .ok()
                    .and_then(|t| t.parse::<LabelSet>().ok())
                    .is_some_and(|l| l == labels)
            {
                self.store
                    .compare_and_delete(&id_key(id), kv.mod_revision)
                    .await?;
            }
            self.known.remove(&labels);
            self.taken.remove(&id.get());
            self.unused_since.remove(&id);
            released.push(id);
        }
        Ok(released)
    }
}
