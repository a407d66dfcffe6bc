//! The Kubernetes API as a [`Source`] for the agent's loop: watches
//! (kube-runtime watchers, not polling) of Nodes and of the project's
//! custom resources, shown in the etcd key space the controllers already
//! read — a Node as its subnet claim `subnets/<podCIDR>` holding its node
//! record, a `BGPPeer` as `bgp/peers/<name>` holding its spec — so one loop
//! and one set of controllers serve both datastores.
//!
//! After a watch restarts (the API server was away), the watcher lists
//! again; what disappeared meanwhile becomes a delete event, so changes
//! made while the agent could not see them are applied when it can.

use crate::packed::Packed;
use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, Event as WEvent};
use kube::{Api, Client};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use trellis_store::{Event, KeyValue, Listing, Source, StoreError, WatchItem};

/// Events a subscriber may have queued before it is dropped (and lists
/// again): a slow reader costs a relist, never unbounded memory.
const SUBSCRIBER_QUEUE: usize = 8192;
/// How long a listing waits for every watch to have synced once.
pub const LIST_WAIT: Duration = Duration::from_secs(10);
/// How often the API server is probed while a watch reports errors.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// One object, as the key space shows it: `None` when it is not shown
/// (a Node not published yet).
pub type Shown = Option<(String, Vec<u8>)>;

/// Reports the API server's reachability: `Some(why)` while watches fail,
/// `None` once it answers again.
pub type Reporter = Arc<dyn Fn(Option<String>) + Send + Sync>;

#[derive(Default)]
pub(crate) struct Kind {
    pub(crate) name: String,
    pub(crate) synced: bool,
    /// object name -> what it shows (its value packed)
    pub(crate) objects: HashMap<String, (String, Packed)>,
    /// objects of a relist in progress
    pub(crate) relist: Option<HashMap<String, (String, Vec<u8>)>>,
    /// its watch's last failure, while it lasts; `true`: the API server
    /// answered it (a 403, a 404), so reaching the server does not end it
    pub(crate) error: Option<(String, bool)>,
    /// a table other parts read (this node's Pods): listings do not wait
    /// for it, its failures are reported all the same
    pub(crate) table: bool,
    /// the key prefix its objects show under: a listing waits only for
    /// the kinds it can contain
    pub(crate) prefix: String,
    /// a kind watched by [`KubeSource::watch_resumable`]: what names it in
    /// a snapshot (`what|labels`), and the resourceVersion its objects
    /// are at (`None` until it has listed)
    pub(crate) resumable: Option<(String, Option<String>)>,
}

impl Kind {
    /// A resumable kind's objects are at `rv` now (`None`: unknown).
    pub(crate) fn set_rv(&mut self, rv: Option<String>) {
        if let Some((_, at)) = self.resumable.as_mut() {
            *at = rv;
        }
    }
}

struct Subscriber {
    prefix: String,
    tx: mpsc::Sender<WatchItem>,
}

#[derive(Default)]
pub(crate) struct State {
    revision: i64,
    pub(crate) kinds: Vec<Kind>,
    subscribers: Vec<Subscriber>,
    /// what a snapshot held, per resumable kind, until its watch takes it
    pub(crate) seeds: HashMap<String, crate::snapshot::Seed>,
}

impl State {
    fn listing(&self, prefix: &str) -> Listing {
        let mut items: Vec<KeyValue> = self
            .kinds
            .iter()
            .flat_map(|k| k.objects.values())
            .filter(|(key, _)| key.starts_with(prefix))
            .map(|(key, value)| kv(key, value.bytes(), self.revision))
            .collect();
        items.sort_by(|a, b| a.key.cmp(&b.key));
        // two objects showing one key (two Nodes given one podCIDR): one
        items.dedup_by(|a, b| a.key == b.key);
        Listing {
            items,
            revision: self.revision,
        }
    }

    /// Object `name` of kind `k` now shows `now`: the events that follow.
    pub(crate) fn set(&mut self, k: usize, name: &str, now: Shown, out: &mut Vec<Event>) {
        let packed = now.as_ref().map(|(key, v)| (key.clone(), Packed::new(v)));
        let before = match packed {
            Some(v) => self.kinds[k].objects.insert(name.to_string(), v),
            None => self.kinds[k].objects.remove(name),
        };
        if let Some((old_key, old_value)) = &before {
            if now.as_ref().map(|(key, _)| key) != Some(old_key) {
                // the key goes only when no other object shows it
                if !self.shown(old_key) {
                    self.revision += 1;
                    out.push(Event::Delete {
                        key: old_key.clone(),
                        mod_revision: self.revision,
                    });
                }
            } else if self.kinds[k].objects.get(name).map(|(_, v)| v) == Some(old_value) {
                return;
            }
        }
        if let Some((key, value)) = now {
            self.revision += 1;
            out.push(Event::Put(kv(&key, value, self.revision)));
        }
    }

    fn shown(&self, key: &str) -> bool {
        self.kinds
            .iter()
            .any(|k| k.objects.values().any(|(k2, _)| k2 == key))
    }

    /// The first watch failure, if any.
    pub(crate) fn error(&self) -> Option<String> {
        self.kinds.iter().find_map(|k| {
            k.error
                .as_ref()
                .map(|(e, _)| format!("watch of {}: {e}", k.name))
        })
    }

    /// Kind `k` holds `fresh` now (a listing): the events that follow.
    /// First every object that vanished or whose key moved goes, then the
    /// new state comes: a key that changed hands is never deleted after
    /// its new holder's put.
    pub(crate) fn replace(
        &mut self,
        k: usize,
        fresh: HashMap<String, (String, Vec<u8>)>,
        out: &mut Vec<Event>,
    ) {
        let leaving: Vec<String> = self.kinds[k]
            .objects
            .iter()
            .filter(|(n, (key, _))| fresh.get(*n).is_none_or(|(k2, _)| k2 != key))
            .map(|(n, _)| n.clone())
            .collect();
        for name in leaving {
            self.set(k, &name, None, out);
        }
        for (name, v) in fresh {
            self.set(k, &name, Some(v), out);
        }
    }

    pub(crate) fn publish(&mut self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        self.subscribers.retain(|s| {
            let mine: Vec<Event> = events
                .iter()
                .filter(|e| match e {
                    Event::Put(kv) => kv.key.starts_with(&s.prefix),
                    Event::Delete { key, .. } => key.starts_with(&s.prefix),
                })
                .cloned()
                .collect();
            // a full queue drops the subscriber: it lists again
            mine.is_empty() || s.tx.try_send(WatchItem::Events(mine)).is_ok()
        });
    }
}

fn kv(key: &str, value: Vec<u8>, revision: i64) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value,
        create_revision: revision,
        mod_revision: revision,
        lease: 0,
    }
}

/// What a watched kind is to the controllers, and the key prefix its
/// objects show under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role<'a> {
    /// Part of the key space the controllers list and watch: listings of
    /// keys under it wait for its first listing.
    Listed(&'a str),
    /// A table other parts read; no listing waits for it.
    Table(&'a str),
}

impl Role<'_> {
    /// (whether it is a table, its key prefix)
    pub(crate) fn parts(self) -> (bool, String) {
        match self {
            Role::Listed(p) => (false, p.to_string()),
            Role::Table(p) => (true, p.to_string()),
        }
    }
}

/// The adapter. Cheap to clone.
#[derive(Clone)]
pub struct KubeSource {
    state: Arc<Mutex<State>>,
    pub(crate) synced: Arc<Notify>,
    pub(crate) server: String,
}

impl KubeSource {
    /// An adapter with no watches yet; `server` names the API server in
    /// errors.
    pub fn new(server: &str) -> Self {
        Self {
            state: Arc::default(),
            synced: Arc::new(Notify::new()),
            server: server.to_string(),
        }
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches `api` with `config`; each object is shown as `show` says,
    /// under the role's key prefix. A [`Role::Listed`] kind holds up the
    /// listings that can contain its keys until it has listed once;
    /// a [`Role::Table`] is read with [`Self::value`] and
    /// [`Self::current`] (under a prefix no controller lists) and does not.
    /// Runs until the process ends.
    pub fn watch_kind<K, F>(
        &self,
        what: &str,
        role: Role<'_>,
        api: Api<K>,
        config: watcher::Config,
        show: F,
        report: Reporter,
    ) where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
        F: Fn(&K) -> Shown + Send + 'static,
    {
        let (table, prefix) = role.parts();
        let what_owned = what.to_string();
        let k = {
            let mut st = self.lock();
            st.kinds.push(Kind {
                name: what.to_string(),
                table,
                prefix,
                ..Default::default()
            });
            st.kinds.len() - 1
        };
        let me = self.clone();
        tokio::spawn(async move {
            // the backoff is ours, not kube's StreamBackoff: that one also
            // waits after a 410 Expired (an API server that restarted
            // forgot our resourceVersion), which only asks for a relist
            let mut backoff = crate::backoff::WatchBackoff::default();
            let mut stream = watcher::watcher(api, config).boxed();
            // a second 410 in a row waits like any failure: no hot loop
            let mut relisting = false;
            while let Some(item) = stream.next().await {
                match item {
                    Ok(ev) => {
                        backoff.reset();
                        relisting = false;
                        let cleared = {
                            let mut st = me.lock();
                            st.kinds[k].error.take().is_some().then(|| st.error())
                        };
                        if let Some(still) = cleared {
                            report(still);
                        }
                        me.on_event(k, ev, &show);
                    }
                    Err(e) if expired(&e) && !relisting => {
                        relisting = true;
                        tracing::debug!(kind = %what_owned, error = %e, "watch expired; listing again");
                    }
                    Err(e) => {
                        me.on_error(k, &e.to_string(), answered(&e), &report);
                        let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        });
    }

    fn on_event<K: kube::Resource, F: Fn(&K) -> Shown>(&self, k: usize, ev: WEvent<K>, show: &F) {
        let mut st = self.lock();
        let mut out = Vec::new();
        match ev {
            WEvent::Apply(o) => st.set(k, &name_of(&o), show(&o), &mut out),
            WEvent::Delete(o) => st.set(k, &name_of(&o), None, &mut out),
            WEvent::Init => st.kinds[k].relist = Some(HashMap::new()),
            WEvent::InitApply(o) => {
                if let (Some(buf), Some(v)) = (st.kinds[k].relist.as_mut(), show(&o)) {
                    buf.insert(name_of(&o), v);
                }
            }
            WEvent::InitDone => {
                let fresh = st.kinds[k].relist.take().unwrap_or_default();
                st.replace(k, fresh, &mut out);
                if !st.kinds[k].synced {
                    st.kinds[k].synced = true;
                    self.synced.notify_waiters();
                }
            }
        }
        st.publish(out);
    }

    pub(crate) fn on_error(&self, k: usize, e: &str, answered: bool, report: &Reporter) {
        let all = {
            let mut st = self.lock();
            let changed = st.kinds[k].error.as_ref().map(|(m, _)| m.as_str()) != Some(e);
            if changed {
                tracing::warn!(server = %self.server, kind = %st.kinds[k].name, error = %e,
                    "API server watch failed; retrying with backoff");
            }
            st.kinds[k].error = Some((e.to_string(), answered));
            st.error()
        };
        report(all.map(|m| format!("{}: {m}", self.server)));
    }

    /// While watches report errors, asks the API server for its version
    /// every second; clears the report once it answers (a watch that
    /// resumes without news sends no event that could clear it).
    pub fn probe(&self, client: Client, report: Reporter) -> impl Future<Output = ()> + Send {
        let me = self.clone();
        async move {
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                let unreachable = me
                    .lock()
                    .kinds
                    .iter()
                    .any(|k| matches!(k.error, Some((_, false))));
                if !unreachable {
                    continue;
                }
                let answered =
                    tokio::time::timeout(Duration::from_secs(2), client.apiserver_version())
                        .await
                        .is_ok_and(|r| r.is_ok());
                if answered {
                    // only failures to reach the server end by reaching it;
                    // an answer it gave (403, 404) stays until its watch works
                    let still = {
                        let mut st = me.lock();
                        for k in st.kinds.iter_mut() {
                            if matches!(k.error, Some((_, false))) {
                                k.error = None;
                            }
                        }
                        st.error()
                    };
                    tracing::info!(server = %me.server, "API server reachable again");
                    report(still);
                }
            }
        }
    }

    /// The value object key `key` shows now, if any.
    pub fn value(&self, key: &str) -> Option<Vec<u8>> {
        let st = self.lock();
        st.kinds
            .iter()
            .flat_map(|k| k.objects.values())
            .find(|(k2, _)| k2 == key)
            .map(|(_, v)| v.bytes())
    }

    /// How many objects of kind `what` it shows.
    pub fn count(&self, what: &str) -> usize {
        self.lock()
            .kinds
            .iter()
            .filter(|k| k.name == what)
            .map(|k| k.objects.len())
            .sum()
    }

    /// Whether kind `what` is watched, has listed once and its watch
    /// works now (`false` while it fails: what it shows may be stale).
    pub fn current(&self, what: &str) -> bool {
        self.lock()
            .kinds
            .iter()
            .any(|k| k.name == what && k.synced && k.error.is_none())
    }

    fn all_synced(&self, prefix: &str) -> Result<(), String> {
        let st = self.lock();
        let holds = |k: &Kind| k.prefix.starts_with(prefix) || prefix.starts_with(&k.prefix);
        match st.kinds.iter().find(|k| !k.synced && !k.table && holds(k)) {
            None => Ok(()),
            Some(k) => Err(format!(
                "the watch of {} has not listed yet{}",
                k.name,
                k.error
                    .as_ref()
                    .map(|(e, _)| format!(" ({e})"))
                    .unwrap_or_default()
            )),
        }
    }
}

/// How an object is named in a kind: namespace/name (two namespaces may
/// hold one name), or its name.
pub(crate) fn name_of<K: kube::Resource>(o: &K) -> String {
    let m = o.meta();
    match &m.namespace {
        Some(ns) => format!("{ns}/{}", m.name.as_deref().unwrap_or_default()),
        None => m.name.clone().unwrap_or_default(),
    }
}

/// A watch whose resourceVersion the API server no longer has (410
/// Expired/Gone, e.g. after it restarted): the watcher lists again.
fn expired(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::WatchError(s) if s.code == 410)
}

/// Whether the API server itself answered with this failure (a status
/// such as 403 or 404), as opposed to not being reached at all.
pub(crate) fn answered(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchError(_) => true,
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => matches!(e, kube::Error::Api(_)),
        _ => false,
    }
}

/// The BGP custom resources: (kind, plural, directory under `bgp/` in the
/// key space).
pub const BGP_RESOURCES: [(&str, &str, &str); 3] = [
    ("BGPConfiguration", "bgpconfigurations", "configurations"),
    ("BGPPeer", "bgppeers", "peers"),
    ("Node", "nodes", "nodes"),
];

/// A custom resource of the project's API group, shown under
/// `bgp/<dir>/<name>` with its `spec` as value.
pub fn custom_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: crate::GROUP.into(),
        version: crate::VERSION.into(),
        api_version: format!("{}/{}", crate::GROUP, crate::VERSION),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// How a custom resource shows: its spec (`{}` when it has none) under
/// `key_prefix` + its name.
pub fn show_spec(key_prefix: String) -> impl Fn(&DynamicObject) -> Shown + Send + 'static {
    move |o| {
        let name = o.metadata.name.clone().unwrap_or_default();
        let spec = o.data.get("spec").cloned().unwrap_or(serde_json::json!({}));
        Some((
            format!("{key_prefix}{name}"),
            serde_json::to_vec(&spec).unwrap_or_default(),
        ))
    }
}

impl Source for KubeSource {
    async fn list(&self, prefix: &str) -> trellis_store::Result<Listing> {
        let deadline = tokio::time::Instant::now() + LIST_WAIT;
        loop {
            let notified = self.synced.notified();
            match self.all_synced(prefix) {
                Ok(()) => return Ok(self.lock().listing(prefix)),
                Err(why) if tokio::time::Instant::now() >= deadline => {
                    return Err(StoreError::Unreachable {
                        endpoints: self.server.clone(),
                        reason: why,
                    })
                }
                Err(_) => {
                    let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
                }
            }
        }
    }

    async fn watch(
        &self,
        prefix: &str,
        revision: i64,
    ) -> trellis_store::Result<mpsc::Receiver<WatchItem>> {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        let mut st = self.lock();
        if st.revision != revision {
            // changed between the listing and now: start from a fresh one
            let _ = tx.try_send(WatchItem::Resync(st.listing(prefix)));
        }
        st.subscribers.push(Subscriber {
            prefix: prefix.to_string(),
            tx,
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests;
