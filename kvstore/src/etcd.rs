//! The etcd backend: the production store, through etcd-client with optional mTLS. Works with
//! etcd 3.4 and later.
//!
//! Notes on etcd 3.4 that shape this code:
//! - a watch that starts below the compaction floor is not refused; it is created, then
//!   cancelled with `compact_revision` set. That cancel becomes [`Error::Compacted`];
//! - a watch that breaks (connection lost, leader change) is re-created from the last
//!   delivered event's revision + 1, never from a progress notification, with exponential
//!   backoff and jitter; after [`WATCH_RETRIES`] failed attempts the stream ends with
//!   [`Error::WatchLost`];
//! - large listings are read in pages at one pinned revision, so that no gRPC message grows
//!   past the client's 4 MiB limit.

use std::path::PathBuf;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    CasOutcome, CreateOutcome, Error, Event, EventKind, KeyValue, KvStore, LeaseId, Listing,
    Result, Revision, TxnLimits, WatchStream, Write, check_txn,
};

/// Attempts to re-create a broken watch before giving up.
pub const WATCH_RETRIES: usize = 10;
/// Keys per page when listing.
const LIST_PAGE: i64 = 5_000;
/// Events buffered between a watch task and its consumer.
const CONSUMER_BUFFER: usize = 256;

/// Client certificate, key and CA for mTLS to etcd (PEM files).
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// CA that signed the etcd servers' certificates.
    pub ca: PathBuf,
    /// Client certificate.
    pub cert: PathBuf,
    /// Client key.
    pub key: PathBuf,
}

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `https://10.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// mTLS settings; `None` for plain connections.
    pub tls: Option<EtcdTls>,
    /// How long to wait for a connection.
    pub connect_timeout: Duration,
    /// The deadline of every request (for a watch or a lease keep-alive stream: until it is
    /// open). Without quorum etcd holds requests; this turns the wait into an error.
    pub request_timeout: Duration,
    /// What one transaction may hold: `max_ops` must not exceed the servers'
    /// `--max-txn-ops` (etcd's default 128), `max_bytes` must stay below their
    /// `--max-request-bytes` (default 1.5 MiB).
    pub txn_limits: TxnLimits,
}

/// etcd's own defaults: 128 operations, and 1 MiB of writes (below its 1.5 MiB request
/// limit, leaving room for framing).
pub const ETCD_DEFAULT_TXN_LIMITS: TxnLimits = TxnLimits {
    max_ops: 128,
    max_bytes: 1024 * 1024,
};

impl EtcdConfig {
    /// Plain connections with a 5 s connect timeout and a 10 s request deadline.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            tls: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            txn_limits: ETCD_DEFAULT_TXN_LIMITS,
        }
    }
}

/// The etcd [`KvStore`]. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    txn_limits: TxnLimits,
}

fn read_pem(path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::TlsFile {
        path: path.display().to_string(),
        source,
    })
}

/// Maps the gRPC errors the caller must react to onto their own variants.
fn classify(e: etcd_client::Error, requested: Revision, lease: Option<LeaseId>) -> Error {
    let msg = match &e {
        etcd_client::Error::GRpcStatus(status) => Some(status.message()),
        etcd_client::Error::LeaseKeepAliveError(msg) => Some(msg.as_str()),
        _ => None,
    };
    if let Some(msg) = msg {
        if msg.contains("required revision has been compacted") {
            return Error::Compacted {
                requested,
                floor: None,
            };
        }
        if let (true, Some(lease)) = (msg.contains("lease not found"), lease) {
            return Error::LeaseNotFound(lease);
        }
        if msg.contains("request is too large") || msg.contains("message length too large") {
            return Error::TooLarge(msg.to_owned());
        }
    }
    Error::Etcd(e)
}

fn to_kv(kv: &etcd_client::KeyValue) -> Result<KeyValue> {
    Ok(KeyValue {
        key: kv.key_str().map_err(Error::Etcd)?.to_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
    })
}

fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> Revision {
    h.map_or(0, etcd_client::ResponseHeader::revision)
}

/// The first key after every key that starts with `prefix` (etcd's prefix range end).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

// === impl EtcdStore ===

impl EtcdStore {
    /// Connects to etcd.
    pub async fn connect(config: &EtcdConfig) -> Result<Self> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_timeout(config.request_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let Some(tls) = &config.tls {
            let ca = Certificate::from_pem(read_pem(&tls.ca)?);
            let identity = Identity::from_pem(read_pem(&tls.cert)?, read_pem(&tls.key)?);
            options = options.with_tls(TlsOptions::new().ca_certificate(ca).identity(identity));
        }
        let client = Client::connect(&config.endpoints, Some(options))
            .await
            .map_err(|source| Error::EtcdConnect {
                endpoints: config.endpoints.join(","),
                source,
            })?;
        let store = Self {
            client,
            txn_limits: config.txn_limits,
        };
        // Fail now, not on first use, when nothing answers.
        store.current_revision().await.map_err(|e| match e {
            Error::Etcd(source) => Error::EtcdConnect {
                endpoints: config.endpoints.join(","),
                source,
            },
            other => other,
        })?;
        Ok(store)
    }

    /// One page of at most `limit` keys under `prefix`, from `after` (exclusive; `None`: the
    /// first key), at `revision` (`None`: now). Returns the keys, the revision read, and
    /// whether more follow. A reader of a store it does not trust pages through a large
    /// prefix with this, holding one page at a time.
    pub async fn list_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        revision: Option<Revision>,
        limit: usize,
    ) -> Result<(Vec<KeyValue>, Revision, bool)> {
        let from = match after {
            Some(k) => {
                let mut from = k.as_bytes().to_vec();
                from.push(0);
                from
            }
            None => prefix.as_bytes().to_vec(),
        };
        let mut opts = GetOptions::new()
            .with_range(prefix_end(prefix))
            .with_limit(i64::try_from(limit.max(1)).unwrap_or(LIST_PAGE));
        if let Some(rev) = revision {
            opts = opts.with_revision(rev);
        }
        let resp = self
            .client
            .clone()
            .get(from, Some(opts))
            .await
            .map_err(|e| classify(e, revision.unwrap_or(0), None))?;
        let rev = revision.unwrap_or_else(|| header_revision(resp.header()));
        let kvs = resp.kvs().iter().map(to_kv).collect::<Result<Vec<_>>>()?;
        Ok((kvs, rev, resp.more()))
    }

    async fn list_pages(&self, prefix: &str, revision: Option<Revision>) -> Result<Listing> {
        let end = prefix_end(prefix);
        let mut from = prefix.as_bytes().to_vec();
        let mut pinned = revision;
        let mut kvs = Vec::new();
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if let Some(rev) = pinned {
                opts = opts.with_revision(rev);
            }
            let resp = self
                .client
                .clone()
                .get(from.clone(), Some(opts))
                .await
                .map_err(|e| classify(e, revision.unwrap_or(0), None))?;
            let rev = *pinned.get_or_insert(header_revision(resp.header()));
            for kv in resp.kvs() {
                kvs.push(to_kv(kv)?);
            }
            match (resp.more(), resp.kvs().last()) {
                (true, Some(last)) => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(Listing { revision: rev, kvs }),
            }
        }
    }

    async fn txn_outcome(&self, key: &str, txn: Txn, lease: Option<LeaseId>) -> Result<CasOutcome> {
        let resp = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(|e| classify(e, 0, lease))?;
        if resp.succeeded() {
            return Ok(CasOutcome::Done {
                revision: header_revision(resp.header()),
            });
        }
        let current = current_from(&resp.op_responses(), key)?;
        Ok(CasOutcome::Conflict { current })
    }
}

fn current_from(ops: &[TxnOpResponse], key: &str) -> Result<Option<KeyValue>> {
    for op in ops {
        if let TxnOpResponse::Get(get) = op {
            return get.kvs().first().map(to_kv).transpose();
        }
    }
    Err(Error::UnexpectedResponse(format!(
        "etcd txn on {key:?} answered without its read"
    )))
}

fn put_options(lease: Option<LeaseId>) -> Option<PutOptions> {
    lease.map(|l| PutOptions::new().with_lease(l.0))
}

#[async_trait::async_trait]
impl KvStore for EtcdStore {
    async fn current_revision(&self) -> Result<Revision> {
        // A count-only read of one key returns the header with the store's revision.
        let opts = GetOptions::new().with_count_only();
        let resp = self
            .client
            .clone()
            .get("\0", Some(opts))
            .await
            .map_err(Error::Etcd)?;
        Ok(header_revision(resp.header()))
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let resp = self
            .client
            .clone()
            .get(key, None)
            .await
            .map_err(Error::Etcd)?;
        resp.kvs().first().map(to_kv).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<Listing> {
        self.list_pages(prefix, None).await
    }

    async fn list_at(&self, prefix: &str, revision: Revision) -> Result<Listing> {
        let current = self.current_revision().await?;
        if revision > current {
            return Err(Error::FutureRevision {
                requested: revision,
                current,
            });
        }
        self.list_pages(prefix, Some(revision)).await
    }

    async fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<Revision> {
        if key.is_empty() {
            return Err(Error::EmptyKey);
        }
        let resp = self
            .client
            .clone()
            .put(key, value, put_options(lease))
            .await
            .map_err(|e| classify(e, 0, lease))?;
        Ok(header_revision(resp.header()))
    }

    async fn delete(&self, key: &str) -> Result<Option<Revision>> {
        let resp = self
            .client
            .clone()
            .delete(key, None)
            .await
            .map_err(Error::Etcd)?;
        Ok((resp.deleted() > 0).then(|| header_revision(resp.header())))
    }

    async fn apply(&self, writes: &[Write]) -> Result<Option<Revision>> {
        check_txn(writes, self.txn_limits)?;
        if writes.is_empty() {
            return Ok(None);
        }
        let ops: Vec<TxnOp> = writes
            .iter()
            .map(|w| match w {
                Write::Put { key, value } => TxnOp::put(key.as_str(), value.as_slice(), None),
                Write::Delete { key } => TxnOp::delete(key.as_str(), None),
            })
            .collect();
        let resp = self
            .client
            .clone()
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(Error::Etcd)?;
        // etcd uses a revision only when something changed.
        let changed = resp.op_responses().iter().any(|r| match r {
            TxnOpResponse::Put(_) => true,
            TxnOpResponse::Delete(d) => d.deleted() > 0,
            _ => false,
        });
        Ok(changed.then(|| header_revision(resp.header())))
    }

    fn txn_limits(&self) -> TxnLimits {
        self.txn_limits
    }

    async fn create(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<CreateOutcome> {
        if key.is_empty() {
            return Err(Error::EmptyKey);
        }
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, put_options(lease))])
            .or_else([TxnOp::get(key, None)]);
        let resp = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(|e| classify(e, 0, lease))?;
        if resp.succeeded() {
            return Ok(CreateOutcome::Created {
                revision: header_revision(resp.header()),
            });
        }
        match current_from(&resp.op_responses(), key)? {
            Some(current) => Ok(CreateOutcome::Exists { current }),
            // Deleted between the compare and the read inside one txn cannot happen; etcd
            // txns are serialisable.
            None => Err(Error::UnexpectedResponse(format!(
                "etcd refused to create {key:?} but read no key"
            ))),
        }
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Revision,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<CasOutcome> {
        if key.is_empty() {
            return Err(Error::EmptyKey);
        }
        // etcd compares an absent key's mod revision as 0, which is what `expected == 0`
        // asks for.
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, expected)])
            .and_then([TxnOp::put(key, value, put_options(lease))])
            .or_else([TxnOp::get(key, None)]);
        self.txn_outcome(key, txn, lease).await
    }

    async fn compare_and_delete(&self, key: &str, expected: Revision) -> Result<CasOutcome> {
        let txn = Txn::new()
            .when([
                Compare::version(key, CompareOp::Greater, 0),
                Compare::mod_revision(key, CompareOp::Equal, expected),
            ])
            .and_then([TxnOp::delete(key, None)])
            .or_else([TxnOp::get(key, None)]);
        self.txn_outcome(key, txn, None).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        if ttl < Duration::from_millis(1) || ttl > Duration::from_secs(365 * 24 * 3600) {
            return Err(Error::InvalidTtl(ttl));
        }
        let secs = i64::try_from(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0))
            .expect("a year of seconds fits i64");
        let resp = self
            .client
            .clone()
            .lease_grant(secs, None)
            .await
            .map_err(Error::Etcd)?;
        Ok(LeaseId(resp.id()))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        let (mut keeper, mut stream) = self
            .client
            .clone()
            .lease_keep_alive(lease.0)
            .await
            .map_err(|e| classify(e, 0, Some(lease)))?;
        keeper
            .keep_alive()
            .await
            .map_err(|e| classify(e, 0, Some(lease)))?;
        match stream
            .message()
            .await
            .map_err(|e| classify(e, 0, Some(lease)))?
        {
            Some(resp) if resp.ttl() > 0 => Ok(Duration::from_secs(resp.ttl().unsigned_abs())),
            _ => Err(Error::LeaseNotFound(lease)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.client
            .clone()
            .lease_revoke(lease.0)
            .await
            .map_err(|e| classify(e, 0, Some(lease)))?;
        Ok(())
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        let (tx, rx) = mpsc::channel(CONSUMER_BUFFER);
        let client = self.client.clone();
        let prefix = prefix.to_owned();
        tokio::spawn(async move {
            if let Err(e) = run_watch(client, &prefix, after, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        match self.client.clone().compact(revision, None).await {
            Ok(_) => Ok(()),
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("future revision") => {
                let current = self.current_revision().await?;
                Err(Error::FutureRevision {
                    requested: revision,
                    current,
                })
            }
            Err(e) => Err(classify(e, revision, None)),
        }
    }
}

/// Forwards etcd watch responses as events, re-creating the watch after failures.
async fn run_watch(
    mut client: Client,
    prefix: &str,
    mut after: Revision,
    tx: &mpsc::Sender<Result<Event>>,
) -> Result<()> {
    let mut backoff = new_backoff();
    loop {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(after + 1);
        let last_failure = match client.watch(prefix, Some(opts)).await {
            Err(e) => e.to_string(),
            Ok(mut stream) => loop {
                let msg = tokio::select! {
                    () = tx.closed() => return Ok(()),
                    msg = stream.message() => msg,
                };
                let resp = match msg {
                    Ok(Some(resp)) => resp,
                    Ok(None) => break "etcd closed the watch stream".to_owned(),
                    Err(e) => break e.to_string(),
                };
                if resp.compact_revision() > 0 {
                    return Err(Error::Compacted {
                        requested: after + 1,
                        floor: Some(resp.compact_revision()),
                    });
                }
                if resp.canceled() {
                    break format!("etcd cancelled the watch: {}", resp.cancel_reason());
                }
                backoff = new_backoff();
                let mut last = after;
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let kind = match ev.event_type() {
                        EventType::Put => EventKind::Put,
                        EventType::Delete => EventKind::Delete,
                    };
                    let key = kv.key_str().map_err(Error::Etcd)?.to_owned();
                    let value = if kind == EventKind::Put {
                        kv.value().to_vec()
                    } else {
                        Vec::new()
                    };
                    last = kv.mod_revision();
                    let event = Event {
                        kind,
                        key,
                        value,
                        revision: last,
                    };
                    if tx.send(Ok(event)).await.is_err() {
                        return Ok(());
                    }
                }
                after = last;
            },
        };
        let Some(delay) = backoff.next() else {
            return Err(Error::WatchLost {
                prefix: prefix.to_owned(),
                reason: last_failure,
            });
        };
        tracing::debug!(prefix, after, ?delay, reason = %last_failure, "re-creating etcd watch");
        tokio::select! {
            () = tx.closed() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

fn new_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .with_max_times(WATCH_RETRIES)
        .build()
}
