//! Identity allocation through the kvstore. Each label set gets one numeric identity from this
//! cluster's range; two apiserver replicas on one store never hand out one number twice nor
//! two numbers for one label set:
//!
//! 1. the reverse key `cilium/state/identities/v1/value/<labels>` answers "which identity has
//!    these labels" when it exists;
//! 2. otherwise a free number is claimed with create-if-absent on
//!    `cilium/state/identities/v1/id/<n>` (a number someone else claimed is skipped);
//! 3. then the reverse key is created; if another replica created it first, our number is
//!    given back (compare-and-delete) and theirs is used.
//!
//! Identities no longer used by any pod are released after a grace period.
//!
//! A crash between the two creates (or between the two deletes of a release) leaves a number
//! claimed with no reverse key pointing at it: an orphan, exported but never used. [`load`]
//! finds them; once one has stayed an orphan for the grace period (another replica may be
//! between its two creates) it is deleted (compare-and-delete on the revision seen).
//!
//! [`load`]: IdentityAllocator::load

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clustermesh_kvstore::{CasOutcome, CreateOutcome, KvStore};
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

/// Allocates and releases this cluster's identities.
pub struct IdentityAllocator {
    store: Arc<dyn KvStore>,
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
            range: allocatable_range(cluster, mode),
            grace,
            known: BTreeMap::new(),
            taken: BTreeSet::new(),
            unused_since: BTreeMap::new(),
            orphans: BTreeMap::new(),
        }
    }

    /// Reads what the store already holds (after a restart, or what another replica wrote).
    pub async fn load(&mut self) -> Result<(), IdentityError> {
        self.known.clear();
        self.taken.clear();
        let values = self.store.list(IDENTITY_VALUE_PREFIX).await?;
        for kv in values.kvs {
            let Ok(Key::IdentityValue { labels }) = Key::parse(&kv.key) else {
                continue;
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
        let owned: BTreeSet<Identity> = self.known.values().copied().collect();
        for kv in ids.kvs {
            if let Ok(Key::Identity { id }) = Key::parse(&kv.key) {
                self.taken.insert(id.get());
                if self.range.contains(&id.get()) && !owned.contains(&id) {
                    self.orphans.insert(id, (kv.mod_revision, now));
                }
            }
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
            match self
                .store
                .create(&vkey, id.to_string().as_bytes(), None)
                .await?
            {
                CreateOutcome::Created { .. } => {
                    self.remember(labels, id);
                    return Ok(id);
                }
                CreateOutcome::Exists { current } => {
                    // Another replica allocated these labels meanwhile: give our number back.
                    self.store.compare_and_delete(&id_key(id), claimed).await?;
                    self.taken.remove(&candidate);
                    let theirs = std::str::from_utf8(&current.value)
                        .ok()
                        .and_then(|s| Identity::parse_decimal(s).ok());
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
            // The number goes only once no label set points at it.
            if let (true, Some(kv)) = (released_value, self.store.get(&id_key(id)).await?) {
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
