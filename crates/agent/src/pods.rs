//! The pods of this node as the API server knows them (Kubernetes mode): a
//! table of the agent's [`KubeSource`], fed by a watch of Pods with the
//! field selector `spec.nodeName=<node>` — only this node's pods, as a
//! kubelet watches them — keyed by namespace/name with what the features
//! that act per pod read (labels for policy, annotations such as bandwidth
//! limits, the UID to tell a re-created pod from the old one). Its watch
//! failures are reported with the others (status, `/readyz` stays as it
//! is: routing does not depend on it); the status document joins it with
//! the attachments and says when it may be stale.

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::watcher;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use trellis_kube::source::{Role, Shown};
use trellis_kube::{KubeSource, Reporter};

/// Where the table lives in the key space: outside `/trellis/v1/`, so no
/// controller's listing includes it.
pub const PREFIX: &str = "/trellis/pods/";
/// The table's name (in errors and [`KubeSource::current`]).
pub const KIND: &str = "pods of this node";

/// What the agent keeps of one Pod.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
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

/// How a Pod shows in the table.
pub fn show_pod(p: &Pod) -> Shown {
    Some((
        format!("{PREFIX}{}", pod_key(p)),
        serde_json::to_vec(&pod_meta(p)).ok()?,
    ))
}

/// This node's pods. Cheap to clone.
#[derive(Clone)]
pub struct LocalPods(KubeSource);

impl LocalPods {
    /// Starts the watch of `node`'s Pods as a table of `src`.
    pub fn watch(src: &KubeSource, client: kube::Client, node: &str, report: Reporter) -> Self {
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        src.watch_kind(
            KIND,
            Role::Table(PREFIX),
            Api::<Pod>::all(client),
            config,
            show_pod,
            report,
        );
        Self(src.clone())
    }

    /// Pod `key` (`namespace/name`); `None` when the API lists no such
    /// pod on this node.
    pub fn get(&self, key: &str) -> Option<PodMeta> {
        let v = self.0.value(&format!("{PREFIX}{key}"))?;
        serde_json::from_slice(&v).ok()
    }

    /// How many pods the API server lists on this node.
    pub fn len(&self) -> usize {
        self.0.count(KIND)
    }

    /// True when it lists none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the table is current: listed once and its watch working.
    pub fn current(&self) -> bool {
        self.0.current(KIND)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    #[test]
    fn a_pod_shows_under_its_namespace_and_name_with_labels_and_ips() {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "ns1", "uid": "u1",
                         "labels": {"app": "web"}, "annotations": {"kubernetes.io/egress-bandwidth": "1M"}},
            "status": {"podIPs": [{"ip": "10.244.1.5"}]},
        }))
        .expect("pod");
        let (key, value) = show_pod(&p).expect("shown");
        assert_eq!(key, "/trellis/pods/ns1/web");
        let m: PodMeta = serde_json::from_slice(&value).expect("meta");
        assert_eq!(m.uid, "u1");
        assert_eq!(m.labels["app"], "web");
        assert_eq!(m.annotations["kubernetes.io/egress-bandwidth"], "1M");
        assert_eq!(m.ips, ["10.244.1.5"]);
        // no namespace: the API's default
        let bare = Pod {
            metadata: ObjectMeta {
                name: Some("x".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(pod_key(&bare), "default/x");
        assert!(
            !PREFIX.starts_with(crate::kube::PREFIX),
            "no controller lists it"
        );
    }
}
