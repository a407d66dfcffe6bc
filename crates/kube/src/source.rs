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

use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::watcher::{self, Event as WEvent};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use trellis_store::{Event, KeyValue, Listing, Source, StoreError, WatchItem};

/// Events a subscriber may have queued before it is dropped (and lists
/// again): a slow reader costs a relist, never unbounded memory.
const SUBSCRIBER_QUEUE: usize = 256;
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
struct Kind {
    name: String,
    synced: bool,
    /// object name -> what it shows
    objects: HashMap<String, (String, Vec<u8>)>,
    /// objects of a relist in progress
    relist: Option<HashMap<String, (String, Vec<u8>)>>,
    /// its watch's last failure, while it lasts; `true`: the API server
    /// answered it (a 403, a 404), so reaching the server does not end it
    error: Option<(String, bool)>,
}

struct Subscriber {
    prefix: String,
    tx: mpsc::Sender<WatchItem>,
}

#[derive(Default)]
struct State {
    revision: i64,
    kinds: Vec<Kind>,
    subscribers: Vec<Subscriber>,
}

impl State {
    fn listing(&self, prefix: &str) -> Listing {
        let mut items: Vec<KeyValue> = self
            .kinds
            .iter()
            .flat_map(|k| k.objects.values())
            .filter(|(key, _)| key.starts_with(prefix))
            .map(|(key, value)| kv(key, value, self.revision))
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
    fn set(&mut self, k: usize, name: &str, now: Shown, out: &mut Vec<Event>) {
        let before = match &now {
            Some(v) => self.kinds[k].objects.insert(name.to_string(), v.clone()),
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
            } else if now.as_ref().map(|(_, v)| v) == Some(old_value) {
                return;
            }
        }
        if let Some((key, value)) = now {
            self.revision += 1;
            out.push(Event::Put(kv(&key, &value, self.revision)));
        }
    }

    fn shown(&self, key: &str) -> bool {
        self.kinds
            .iter()
            .any(|k| k.objects.values().any(|(k2, _)| k2 == key))
    }

    /// The first watch failure, if any.
    fn error(&self) -> Option<String> {
        self.kinds.iter().find_map(|k| {
            k.error
                .as_ref()
                .map(|(e, _)| format!("watch of {}: {e}", k.name))
        })
    }

    fn publish(&mut self, events: Vec<Event>) {
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

fn kv(key: &str, value: &[u8], revision: i64) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: value.to_vec(),
        create_revision: revision,
        mod_revision: revision,
        lease: 0,
    }
}

/// The adapter. Cheap to clone.
#[derive(Clone)]
pub struct KubeSource {
    state: Arc<Mutex<State>>,
    synced: Arc<Notify>,
    server: String,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches `api` with `config`; each object is shown as `show` says.
    /// Runs until the process ends.
    pub fn watch_kind<K, F>(
        &self,
        what: &str,
        api: Api<K>,
        config: watcher::Config,
        show: F,
        report: Reporter,
    ) where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
        F: Fn(&K) -> Shown + Send + 'static,
    {
        let k = {
            let mut st = self.lock();
            st.kinds.push(Kind {
                name: what.to_string(),
                ..Default::default()
            });
            st.kinds.len() - 1
        };
        let me = self.clone();
        tokio::spawn(async move {
            let mut stream = watcher::watcher(api, config)
                .backoff(crate::backoff::WatchBackoff::default())
                .boxed();
            while let Some(item) = stream.next().await {
                match item {
                    Ok(ev) => {
                        let cleared = {
                            let mut st = me.lock();
                            st.kinds[k].error.take().is_some().then(|| st.error())
                        };
                        if let Some(still) = cleared {
                            report(still);
                        }
                        me.on_event(k, ev, &show);
                    }
                    Err(e) => me.on_error(k, &e.to_string(), answered(&e), &report),
                }
            }
        });
    }

    fn on_event<K: kube::Resource, F: Fn(&K) -> Shown>(&self, k: usize, ev: WEvent<K>, show: &F) {
        let name_of = |o: &K| o.meta().name.clone().unwrap_or_default();
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
                // first every object that vanished or whose key moved goes,
                // then the new state comes: a key that changed hands is
                // never deleted after its new holder's put
                let leaving: Vec<String> = st.kinds[k]
                    .objects
                    .iter()
                    .filter(|(n, (key, _))| fresh.get(*n).is_none_or(|(k2, _)| k2 != key))
                    .map(|(n, _)| n.clone())
                    .collect();
                for name in leaving {
                    st.set(k, &name, None, &mut out);
                }
                for (name, v) in fresh {
                    st.set(k, &name, Some(v), &mut out);
                }
                if !st.kinds[k].synced {
                    st.kinds[k].synced = true;
                    self.synced.notify_waiters();
                }
            }
        }
        st.publish(out);
    }

    fn on_error(&self, k: usize, e: &str, answered: bool, report: &Reporter) {
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

    fn all_synced(&self) -> Result<(), String> {
        let st = self.lock();
        match st.kinds.iter().find(|k| !k.synced) {
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

/// Whether the API server itself answered with this failure (a status
/// such as 403 or 404), as opposed to not being reached at all.
fn answered(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchError(_) => true,
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => matches!(e, kube::Error::Api(_)),
        _ => false,
    }
}

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
            match self.all_synced() {
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
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;

    fn cm(name: &str, v: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            data: Some([("v".to_string(), v.to_string())].into()),
            ..Default::default()
        }
    }

    fn show(o: &ConfigMap) -> Shown {
        let v = o.data.as_ref()?.get("v")?.clone();
        // the value names the key, like a podCIDR names a subnet key
        Some((format!("/p/{v}"), o.metadata.name.clone()?.into_bytes()))
    }

    /// A source with one watched kind (no watch running: the tests feed it).
    fn one_kind(synced: bool) -> KubeSource {
        let src = KubeSource::new("test");
        src.lock().kinds.push(Kind {
            name: "configmaps".into(),
            synced,
            ..Default::default()
        });
        src
    }

    fn keys(l: &Listing) -> Vec<String> {
        l.items.iter().map(|i| i.key.clone()).collect()
    }

    #[tokio::test]
    async fn relists_turn_into_deletes_and_key_moves_into_delete_put() {
        let src = one_kind(false);
        let ev = |e: WEvent<ConfigMap>| src.on_event(0, e, &show);
        ev(WEvent::Init);
        ev(WEvent::InitApply(cm("a", "1")));
        ev(WEvent::InitApply(cm("b", "2")));
        assert!(src.all_synced().is_err(), "not synced before InitDone");
        ev(WEvent::InitDone);
        let l = Source::list(&src, "/p/").await.expect("list");
        assert_eq!(keys(&l), ["/p/1", "/p/2"]);
        let mut rx = Source::watch(&src, "/p/", l.revision).await.expect("watch");
        // a changed value that names another key: delete the old, put the new
        ev(WEvent::Apply(cm("a", "3")));
        let Some(WatchItem::Events(e)) = rx.recv().await else {
            panic!("events")
        };
        assert!(
            matches!(&e[0], Event::Delete { key, .. } if key == "/p/1"),
            "{e:?}"
        );
        assert!(matches!(&e[1], Event::Put(kv) if kv.key == "/p/3"), "{e:?}");
        // the same object again: nothing
        ev(WEvent::Apply(cm("a", "3")));
        assert!(rx.try_recv().is_err());
        // a relist without b (deleted while the watch was down): b goes
        ev(WEvent::Init);
        ev(WEvent::InitApply(cm("a", "3")));
        ev(WEvent::InitDone);
        let Some(WatchItem::Events(e)) = rx.recv().await else {
            panic!("events")
        };
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            matches!(&e[0], Event::Delete { key, .. } if key == "/p/2"),
            "{e:?}"
        );
        // a watch from an old revision starts with a fresh listing
        let mut late = Source::watch(&src, "/p/", l.revision).await.expect("watch");
        let Some(WatchItem::Resync(l2)) = late.recv().await else {
            panic!("resync")
        };
        assert_eq!(keys(&l2), ["/p/3"]);
    }

    #[tokio::test]
    async fn keys_that_change_hands_in_a_relist_end_held_and_shared_keys_stay() {
        let src = one_kind(false);
        let ev = |e: WEvent<ConfigMap>| src.on_event(0, e, &show);
        ev(WEvent::Init);
        ev(WEvent::InitApply(cm("a", "1")));
        ev(WEvent::InitApply(cm("b", "3")));
        ev(WEvent::InitDone);
        let l = Source::list(&src, "/p/").await.expect("list");
        let mut rx = Source::watch(&src, "/p/", l.revision).await.expect("watch");
        // a moved to key 2, b took a's old key 1
        ev(WEvent::Init);
        ev(WEvent::InitApply(cm("a", "2")));
        ev(WEvent::InitApply(cm("b", "1")));
        ev(WEvent::InitDone);
        let Some(WatchItem::Events(e)) = rx.recv().await else {
            panic!("events")
        };
        // replaying the events leaves exactly keys 1 and 2
        let mut held = std::collections::BTreeSet::from(["/p/1".to_string(), "/p/3".to_string()]);
        for e in &e {
            match e {
                Event::Put(kv) => held.insert(kv.key.clone()),
                Event::Delete { key, .. } => held.remove(key),
            };
        }
        assert_eq!(
            held.into_iter().collect::<Vec<_>>(),
            ["/p/1", "/p/2"],
            "{e:?}"
        );
        // two objects showing one key: it stays while one still does
        ev(WEvent::Apply(cm("c", "2")));
        ev(WEvent::Delete(cm("a", "2")));
        let l = Source::list(&src, "/p/").await.expect("list");
        assert_eq!(keys(&l), ["/p/1", "/p/2"]);
        while let Ok(WatchItem::Events(e)) = rx.try_recv() {
            assert!(
                !e.iter()
                    .any(|e| matches!(e, Event::Delete { key, .. } if key == "/p/2")),
                "{e:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_slow_subscriber_is_dropped_not_buffered_without_bound() {
        let src = one_kind(true);
        let rev = src.lock().revision;
        let mut rx = Source::watch(&src, "/p/", rev).await.expect("watch");
        for i in 0..(SUBSCRIBER_QUEUE + 10) {
            src.on_event(0, WEvent::Apply(cm("a", &i.to_string())), &show);
        }
        let mut n = 0;
        while rx.recv().await.is_some() {
            n += 1;
        }
        assert_eq!(n, SUBSCRIBER_QUEUE, "then closed: the loop lists again");
        assert!(src.lock().subscribers.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_listing_before_the_first_sync_fails_naming_the_watch() {
        let src = KubeSource::new("https://192.0.2.2:6443");
        src.lock().kinds.push(Kind {
            name: "nodes".into(),
            ..Default::default()
        });
        src.lock().kinds[0].error = Some(("connection refused".into(), false));
        let e = Source::list(&src, "/p/").await.expect_err("not synced");
        let s = e.to_string();
        assert!(
            s.contains("192.0.2.2:6443") && s.contains("nodes") && s.contains("refused"),
            "{s}"
        );
    }
}
