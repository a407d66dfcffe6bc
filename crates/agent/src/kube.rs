//! Kubernetes mode: the cluster config from a ConfigMap, the node's subnet
//! from its Node's `spec.podCIDRs`, its public data written as Node
//! annotations through `nodes/status`, the other nodes and the BGP custom
//! resources from watches ([`trellis_kube::KubeSource`]) fed to the same
//! controllers as in etcd mode, and `NetworkUnavailable=False` once the
//! first sync put the routes in place.
//!
//! The agent waits for what is missing (API server, ConfigMap, podCIDR)
//! with backoff, saying in `/readyz` and the log what it waits for; it
//! never gives up and never crashes on it.

use crate::cluster::{check_backend, local_node, Joined};
use crate::config::{AgentConfig, KubernetesSection};
use crate::health::Health;
use anyhow::Context;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::runtime::watcher;
use kube::Client;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use trellis_dataplane::Dataplane;
use trellis_kube::node::{annotations, internal_ip, node_record, pod_cidr};
use trellis_kube::source::{custom_resource, show_spec, Role, Shown};
use trellis_kube::{KubeSource, Reporter};
use trellis_model::netconf::{BackendType, ClusterConfig};
use trellis_model::node::subnet_key;

/// The key space the Kubernetes objects are shown in (as in etcd mode).
pub const PREFIX: &str = "/trellis/v1/";
/// The ConfigMap key holding the cluster config (as flannel's).
pub const NET_CONF_KEY: &str = "net-conf.json";
/// One API call may take this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The field manager trellis writes as.
const MANAGER: &str = "trellis";

/// A connected client and what joining gave.
pub struct KubeJoined {
    /// The client.
    pub client: Client,
    /// The API server's address, for messages.
    pub server: String,
    /// The node as the backends see it.
    pub joined: Joined,
}

/// Runs `attempt` until it succeeds, backing off from 200 ms to 5 s;
/// each failure is shown in `/readyz` and logged when its reason changes.
async fn until_ok<T, F, Fut>(health: &Health, what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let mut wait = Duration::from_millis(200);
    let mut last: Option<String> = None;
    loop {
        let r = match tokio::time::timeout(CALL_TIMEOUT, attempt()).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
        };
        match r {
            Ok(v) => {
                health.set_join_problem(None);
                return v;
            }
            Err(e) => {
                let msg = format!("{what}: {e}");
                if last.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(problem = %msg, "waiting; retrying with backoff");
                    last = Some(msg.clone());
                }
                health.set_join_problem(Some(msg));
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// PATCH `nodes/NODE/status` as trellis's field manager.
async fn patch_status(
    nodes: &Api<Node>,
    node: &str,
    patch: Patch<&serde_json::Value>,
) -> Result<(), String> {
    let pp = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    };
    nodes
        .patch_status(node, &pp, &patch)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

fn split_ref(s: &str) -> (&str, &str) {
    s.split_once('/').unwrap_or(("default", s))
}

/// Connects, reads the cluster config, waits for the node's podCIDR,
/// publishes the node's annotations.
pub async fn join(
    agent: &AgentConfig,
    k: &KubernetesSection,
    dp: &dyn Dataplane,
    health: &Health,
    metrics: &crate::metrics::Metrics,
) -> anyhow::Result<KubeJoined> {
    let (client, server) = trellis_kube::client(&trellis_kube::ClientOptions {
        kubeconfig: k.kubeconfig.clone(),
        server: k.server.clone(),
        on_request: Some(metrics.api_request_hook()),
    })
    .await?;
    let (ns, name) = split_ref(&k.config_map);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let what = format!("ConfigMap {ns}/{name} key {NET_CONF_KEY} at {server}");
    let cfg = until_ok(health, &what, || async {
        let cm = cms.get(name).await.map_err(|e| e.to_string())?;
        let text = cm
            .data
            .as_ref()
            .and_then(|d| d.get(NET_CONF_KEY))
            .ok_or_else(|| format!("no key {NET_CONF_KEY}"))?;
        ClusterConfig::parse(text).map_err(|e| e.to_string())
    })
    .await;
    check_backend(&cfg, dp).with_context(|| what.clone())?;
    let nodes: Api<Node> = Api::all(client.clone());
    let what = format!("Node {} at {server}", agent.node_name);
    let network = cfg.network;
    let joined = until_ok(health, &what, || async {
        let node = nodes
            .get(&agent.node_name)
            .await
            .map_err(|e| e.to_string())?;
        let subnet = pod_cidr(&node).map_err(|e| e.to_string())?;
        if !network.contains(&subnet) {
            return Err(format!(
                "its podCIDR {subnet} is outside the cluster network {network} \
                 (net-conf.json Network); kube-controller-manager's --cluster-cidr \
                 must be that network"
            ));
        }
        let ip = agent
            .public_ip
            .or_else(|| internal_ip(&node))
            .ok_or_else(|| {
                "no IPv4 InternalIP in status.addresses and no publicIp in the agent config"
                    .to_string()
            })?;
        local_node(agent, cfg.clone(), subnet, ip, dp).map_err(|e| format!("{e:#}"))
    })
    .await;
    let what = format!(
        "publishing node {} (PATCH nodes/status) at {server}",
        agent.node_name
    );
    let patch = serde_json::json!({"metadata": {"annotations": annotations(&joined.record)}});
    until_ok(health, &what, || {
        patch_status(&nodes, &agent.node_name, Patch::Merge(&patch))
    })
    .await;
    Ok(KubeJoined {
        client,
        server,
        joined,
    })
}

/// How a Node shows in the key space: its subnet claim with its record;
/// an unpublished node is not shown, a malformed one is reported (once
/// per distinct problem) and skipped — the rest keep working.
fn show_node(prefix: String) -> impl Fn(&Node) -> Shown + Send + 'static {
    let reported: Mutex<HashMap<String, String>> = Mutex::default();
    move |n| {
        let name = n.metadata.name.clone().unwrap_or_default();
        let mut seen = reported.lock().unwrap_or_else(|p| p.into_inner());
        match node_record(n) {
            Ok(r) => {
                seen.remove(&name);
                let value = serde_json::to_vec(&r).ok()?;
                Some((subnet_key(&prefix, r.subnet), value))
            }
            Err(p) => {
                let msg = p.to_string();
                if seen.get(&name) != Some(&msg) {
                    if p.is_pending() {
                        tracing::debug!(node = %name, problem = %msg, "node not routed yet");
                    } else {
                        tracing::warn!(node = %name, problem = %msg, "node skipped");
                    }
                    seen.insert(name, msg);
                }
                None
            }
        }
    }
}

/// Where the watch snapshot is kept (`trellis_kube::snapshot`): written
/// when the agent stops on a signal, read (and removed) when it starts.
pub fn snapshot_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("watch.snapshot")
}

/// What a watch snapshot must have been written by to be used here: the
/// same build of the agent (version; size, times and inode of the
/// executable: what the watches show may change between builds), the same
/// boot (after a reboot the kernel's tables are gone) and the same API
/// server (`server`).
pub fn snapshot_identity(server: &str) -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    format!("{}:{}:{server}", exe_identity(), boot.trim())
}

/// The running program: its version and its executable file (size, times,
/// inode) — another build has another identity.
pub fn exe_identity() -> String {
    use std::os::unix::fs::MetadataExt;
    let exe = std::fs::metadata("/proc/self/exe")
        .map(|m| {
            format!(
                "{}.{}.{}.{}",
                m.len(),
                m.mtime_nsec() + m.mtime() * 1_000_000_000,
                m.ctime(),
                m.ino()
            )
        })
        .unwrap_or_default();
    format!("{}:{exe}", env!("CARGO_PKG_VERSION"))
}

/// Starts the watches the backend needs (the table of this node's Pods,
/// and Services and EndpointSlices when `proxy`, starting from the watch
/// snapshot in `data_dir` if there is one) and returns the source the
/// controllers read.
pub fn source(
    kj: &KubeJoined,
    health: Arc<Health>,
    proxy: bool,
    policy: Option<bool>,
    data_dir: &std::path::Path,
) -> (KubeSource, crate::pods::LocalPods) {
    let src = KubeSource::new(&kj.server);
    if proxy {
        src.load_snapshot(&snapshot_path(data_dir), &snapshot_identity(&kj.server));
    }
    let report: Reporter = Arc::new(move |e| health.set_datastore_error(e));
    let nodes: Api<Node> = Api::all(kj.client.clone());
    src.watch_kind(
        "nodes",
        Role::Listed(PREFIX),
        nodes,
        watcher::Config::default(),
        show_node(PREFIX.to_string()),
        report.clone(),
    );
    if kj.joined.cfg.backend.kind == BackendType::Bgp {
        for (kind, plural, dir) in trellis_kube::source::BGP_RESOURCES {
            let api: Api<DynamicObject> =
                Api::all_with(kj.client.clone(), &custom_resource(kind, plural));
            src.watch_kind(
                &format!("{plural}.{}", trellis_kube::GROUP),
                Role::Listed(&format!("{PREFIX}bgp/{dir}/")),
                api,
                watcher::Config::default(),
                show_spec(format!("{PREFIX}bgp/{dir}/")),
                report.clone(),
            );
        }
    }
    let pods = crate::pods::LocalPods::watch(
        &src,
        kj.client.clone(),
        &kj.joined.local.name,
        report.clone(),
    );
    if proxy {
        crate::proxy::watch(&src, kj.client.clone(), report.clone());
    }
    if let Some(cluster) = policy {
        crate::policy::watch(&src, kj.client.clone(), cluster, report.clone());
    }
    tokio::spawn(src.probe(kj.client.clone(), report));
    (src, pods)
}

/// `policy`'s argument to [`source`]: `None` when policy is off, else
/// whether ClusterNetworkPolicy is served (asked until the API server
/// answers, at most 30 s; then assumed absent, which the log says).
pub async fn policy_watches(kj: &KubeJoined, enabled: bool) -> Option<bool> {
    if !enabled {
        return None;
    }
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match crate::policy::cluster_policies_served(&kj.client).await {
            Ok(true) => return Some(true),
            Ok(false) => {
                tracing::warn!(
                    "policy: the API server does not serve ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2: its CRD is not installed); NetworkPolicy only until the agent restarts"
                );
                return Some(false);
            }
            Err(e) if std::time::Instant::now() >= end => {
                tracing::error!(error = %e, "policy: cannot ask whether ClusterNetworkPolicy is served; NetworkPolicy only until the agent restarts");
                return Some(false);
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Once the first sync has put the routes in place, sets the Node's
/// `NetworkUnavailable` condition to False (as Calico and flannel do), and
/// from then on watches the own Node: a Node deleted and registered again
/// (its annotations and condition gone) is published again; a changed
/// podCIDR stops the agent (its pods hold addresses of the old one).
pub async fn keep_published(client: Client, joined: Joined, health: Arc<Health>) {
    use futures::StreamExt;
    use kube::runtime::WatchStreamExt;
    while !health.is_synced() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let node = joined.local.name.clone();
    let nodes: Api<Node> = Api::all(client);
    let wanted = annotations(&joined.record);
    let config = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let mut stream = watcher::watcher(nodes.clone(), config)
        .backoff(trellis_kube::backoff::WatchBackoff::default())
        .boxed();
    while let Some(item) = stream.next().await {
        let n = match item {
            Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => n,
            Ok(_) => continue,
            Err(e) => {
                tracing::debug!(node = %node, error = %e, "watch of the own Node failed; retrying");
                continue;
            }
        };
        if let Ok(cidr) = pod_cidr(&n) {
            if cidr != joined.subnet {
                health.fatal(format!(
                    "the podCIDR of node {node} changed from {} to {cidr}; pods on this node \
                     have addresses of {}: restart the agent, then the pods",
                    joined.subnet, joined.subnet
                ));
                return;
            }
        }
        let have = n.metadata.annotations.clone().unwrap_or_default();
        let published = wanted.iter().all(|(k, v)| have.get(k) == v.as_ref());
        let available = n
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "NetworkUnavailable" && c.status == "False")
            });
        if published && available {
            continue;
        }
        let mut patch = serde_json::json!({"status": {"conditions": [{
            "type": "NetworkUnavailable", "status": "False",
            "reason": "TrellisIsUp", "message": "trellis has programmed the routes of this node",
        }]}});
        if !published {
            patch["metadata"] = serde_json::json!({"annotations": wanted});
        }
        let what = format!("publishing node {node} (PATCH nodes/status)");
        until_ok(&health, &what, || {
            patch_status(&nodes, &node, Patch::Strategic(&patch))
        })
        .await;
        tracing::info!(node = %node, annotations = !published, "published the node; NetworkUnavailable=False");
    }
}
