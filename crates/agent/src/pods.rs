//! The pods of this node as the API server knows them (Kubernetes mode):
//! a watch of Pods with the field selector `spec.nodeName=<node>` — only
//! this node's pods, as a kubelet watches them — kept by namespace/name
//! with what the features that act per pod read (labels for policy,
//! annotations such as bandwidth limits, the UID to tell a re-created pod
//! from the old one). The status document joins it with the attachments.

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::{watcher, WatchStreamExt};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// What the agent keeps of one Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    /// Its UID.
    pub uid: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its annotations.
    pub annotations: BTreeMap<String, String>,
    /// `status.podIPs`.
    pub ips: Vec<String>,
}

/// The `namespace/name` of a Pod.
pub fn pod_key(p: &Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or("default"),
        p.metadata.name.as_deref().unwrap_or_default()
    )
}

/// What is kept of `p`.
pub fn pod_meta(p: &Pod) -> PodMeta {
    PodMeta {
        uid: p.metadata.uid.clone().unwrap_or_default(),
        labels: p.metadata.labels.clone().unwrap_or_default(),
        annotations: p.metadata.annotations.clone().unwrap_or_default(),
        ips: p
            .status
            .as_ref()
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| ips.iter().map(|i| i.ip.clone()).collect())
            .unwrap_or_default(),
    }
}

#[derive(Default)]
struct State {
    synced: bool,
    pods: HashMap<String, PodMeta>,
    relist: Option<HashMap<String, PodMeta>>,
}

/// This node's pods. Cheap to clone.
#[derive(Clone, Default)]
pub struct LocalPods(Arc<Mutex<State>>);

impl LocalPods {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pod `key` (`namespace/name`); `None` when the API has no such pod
    /// on this node (or the watch has not listed yet: see [`Self::synced`]).
    pub fn get(&self, key: &str) -> Option<PodMeta> {
        self.lock().pods.get(key).cloned()
    }

    /// How many pods the API server lists on this node.
    pub fn len(&self) -> usize {
        self.lock().pods.len()
    }

    /// True when it lists none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the watch has listed once.
    pub fn synced(&self) -> bool {
        self.lock().synced
    }

    /// Applies one watch event.
    pub fn on_event(&self, ev: watcher::Event<Pod>) {
        let mut st = self.lock();
        match ev {
            watcher::Event::Apply(p) => {
                st.pods.insert(pod_key(&p), pod_meta(&p));
            }
            watcher::Event::Delete(p) => {
                st.pods.remove(&pod_key(&p));
            }
            watcher::Event::Init => st.relist = Some(HashMap::new()),
            watcher::Event::InitApply(p) => {
                if let Some(buf) = st.relist.as_mut() {
                    buf.insert(pod_key(&p), pod_meta(&p));
                }
            }
            watcher::Event::InitDone => {
                // pods deleted while the watch was down go with the relist
                st.pods = st.relist.take().unwrap_or_default();
                st.synced = true;
            }
        }
    }

    /// Watches the Pods bound to `node` until the process ends.
    pub fn watch(&self, client: kube::Client, node: &str) {
        let api: Api<Pod> = Api::all(client);
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let me = self.clone();
        let node = node.to_string();
        tokio::spawn(async move {
            let mut stream = watcher::watcher(api, config)
                .backoff(trellis_kube::backoff::WatchBackoff::default())
                .boxed();
            let mut last_error = None;
            while let Some(item) = stream.next().await {
                match item {
                    Ok(ev) => {
                        last_error = None;
                        me.on_event(ev);
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        if last_error.as_ref() != Some(&msg) {
                            tracing::warn!(node = %node, error = %msg, "watch of this node's pods failed; retrying");
                            last_error = Some(msg);
                        }
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    fn pod(name: &str, app: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns1".into()),
                uid: Some(format!("uid-{name}")),
                labels: Some([("app".to_string(), app.to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn events_and_relists_keep_exactly_the_listed_pods() {
        let p = LocalPods::default();
        p.on_event(watcher::Event::Init);
        p.on_event(watcher::Event::InitApply(pod("a", "web")));
        assert!(
            !p.synced() && p.get("ns1/a").is_none(),
            "not before InitDone"
        );
        p.on_event(watcher::Event::InitDone);
        assert_eq!(p.get("ns1/a").expect("a").labels["app"], "web");
        p.on_event(watcher::Event::Apply(pod("a", "db")));
        p.on_event(watcher::Event::Apply(pod("b", "web")));
        assert_eq!(p.get("ns1/a").expect("a").labels["app"], "db");
        assert_eq!(p.len(), 2);
        // b deleted while the watch was down: the relist drops it
        p.on_event(watcher::Event::Init);
        p.on_event(watcher::Event::InitApply(pod("a", "db")));
        assert_eq!(p.len(), 2, "the old state serves until the relist is done");
        p.on_event(watcher::Event::InitDone);
        assert!(p.get("ns1/b").is_none());
        p.on_event(watcher::Event::Delete(pod("a", "db")));
        assert!(p.is_empty());
    }
}
