//! The Kubernetes source: kube watchers (with their backoff) for Namespaces, Pods, Services,
//! Nodes, EndpointSlices and the Cilium policy custom resources, each kept in a store that is
//! replaced as a whole at the end of every (re)list — so a relist after `410 Gone` drops what
//! disappeared meanwhile — and updated by every watch event after it. The stores are turned
//! into [`Loaded`] by the same document parser as the manifest directory, so everything after
//! the source is one code path. Nothing is published before every kind has been listed once;
//! a policy kind whose CRD is not installed counts as listed and empty.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;

use super::SourceProblem;
use super::manifest::{Loaded, add_document};

/// The kinds watched: group, version, kind, plural, whether a missing CRD is tolerated.
const KINDS: [(&str, &str, &str, &str, bool); 8] = [
    ("", "v1", "Namespace", "namespaces", false),
    ("", "v1", "Pod", "pods", false),
    ("", "v1", "Service", "services", false),
    ("", "v1", "Node", "nodes", false),
    (
        "discovery.k8s.io",
        "v1",
        "EndpointSlice",
        "endpointslices",
        false,
    ),
    (
        "networking.k8s.io",
        "v1",
        "NetworkPolicy",
        "networkpolicies",
        false,
    ),
    (
        "cilium.io",
        "v2",
        "CiliumNetworkPolicy",
        "ciliumnetworkpolicies",
        true,
    ),
    (
        "cilium.io",
        "v2",
        "CiliumClusterwideNetworkPolicy",
        "ciliumclusterwidenetworkpolicies",
        true,
    ),
];

/// Quiet time that ends a burst of events before the stores are published.
const DEBOUNCE: Duration = Duration::from_millis(50);

type Key = (Option<String>, String);

/// One kind's state.
#[derive(Default)]
struct KindState {
    store: BTreeMap<Key, serde_json::Value>,
    /// Objects of a (re)list in progress.
    buffer: Option<BTreeMap<Key, serde_json::Value>>,
    /// Listed at least once.
    listed: bool,
}

fn key_of(o: &DynamicObject) -> Key {
    (
        o.metadata.namespace.clone(),
        o.metadata.name.clone().unwrap_or_default(),
    )
}

/// The object as a manifest document: list items carry no `apiVersion` and `kind`.
fn document(o: DynamicObject, api_version: &str, kind: &str) -> serde_json::Value {
    let mut v = serde_json::to_value(o).unwrap_or(serde_json::Value::Null);
    if let Some(map) = v.as_object_mut() {
        map.insert("apiVersion".into(), api_version.into());
        map.insert("kind".into(), kind.into());
    }
    v
}

fn not_installed(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => s.code == 404,
        _ => false,
    }
}

/// Builds what the stores hold, through the manifest source's parser.
fn snapshot(kinds: &[KindState]) -> Loaded {
    let mut loaded = Loaded::default();
    for (state, (_, _, kind, _, _)) in kinds.iter().zip(KINDS) {
        for ((ns, name), value) in &state.store {
            if let Err(reason) = add_document(value.clone(), &mut loaded.objects) {
                let origin = match ns {
                    Some(ns) => format!("{kind} {ns}/{name}"),
                    None => format!("{kind} {name}"),
                };
                loaded.problems.push(SourceProblem { origin, reason });
            }
        }
    }
    loaded
}

/// Watches the cluster through `client` and publishes a complete [`Loaded`] after the first
/// list of every kind and after every burst of changes, until `stop`.
pub async fn run(
    client: kube::Client,
    tx: watch::Sender<Option<Loaded>>,
    mut stop: watch::Receiver<bool>,
) {
    let streams = KINDS
        .iter()
        .enumerate()
        .map(|(i, (group, version, kind, plural, _))| {
            let gvk = GroupVersionKind::gvk(group, version, kind);
            let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
            watcher::watcher(api, watcher::Config::default())
                .default_backoff()
                .map(move |e| (i, e))
                .boxed()
        });
    let mut events = futures::stream::select_all(streams);
    let mut kinds: Vec<KindState> = KINDS.iter().map(|_| KindState::default()).collect();
    // When the stores changed: publish at this deadline (a burst is published at most
    // DEBOUNCE after its first event, however long it goes on).
    let mut publish_at: Option<tokio::time::Instant> = None;
    loop {
        let deadline = publish_at.unwrap_or_else(|| tokio::time::Instant::now() + DEBOUNCE);
        let next = tokio::select! {
            e = events.next() => e,
            () = tokio::time::sleep_until(deadline), if publish_at.is_some() => {
                if kinds.iter().all(|k| k.listed) {
                    let _ = tx.send(Some(snapshot(&kinds)));
                    publish_at = None;
                }
                else {
                    publish_at = Some(tokio::time::Instant::now() + DEBOUNCE);
                }
                continue;
            }
            _ = stop.wait_for(|s| *s) => return,
        };
        let Some((i, event)) = next else {
            return;
        };
        let (group, version, kind, _, optional) = KINDS[i];
        let api_version = if group.is_empty() {
            version.to_owned()
        } else {
            format!("{group}/{version}")
        };
        let state = &mut kinds[i];
        match event {
            Ok(Event::Init) => state.buffer = Some(BTreeMap::new()),
            Ok(Event::InitApply(o)) => {
                let k = key_of(&o);
                state
                    .buffer
                    .get_or_insert_with(BTreeMap::new)
                    .insert(k, document(o, &api_version, kind));
            }
            Ok(Event::InitDone) => {
                state.store = state.buffer.take().unwrap_or_default();
                state.listed = true;
                publish_at.get_or_insert_with(|| tokio::time::Instant::now() + DEBOUNCE);
            }
            Ok(Event::Apply(o)) => {
                let k = key_of(&o);
                state.store.insert(k, document(o, &api_version, kind));
                publish_at.get_or_insert_with(|| tokio::time::Instant::now() + DEBOUNCE);
            }
            Ok(Event::Delete(o)) => {
                state.store.remove(&key_of(&o));
                publish_at.get_or_insert_with(|| tokio::time::Instant::now() + DEBOUNCE);
            }
            Err(e) if optional && not_installed(&e) => {
                if !state.listed {
                    tracing::info!(kind, "the CRD is not installed; treating the kind as empty");
                    state.listed = true;
                    publish_at.get_or_insert_with(|| tokio::time::Instant::now() + DEBOUNCE);
                }
            }
            Err(e) => tracing::warn!(kind, error = %e, "watching failed; retrying with backoff"),
        }
    }
}
