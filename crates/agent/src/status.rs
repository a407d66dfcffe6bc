//! The status socket: one JSON document per connection, for `trellisctl
//! status`. It reports what the agent believes (subnet, backend, peers) and
//! what the kernel holds (the routes, neighbours and FDB entries trellis owns).

use crate::cluster::ClusterView;
use crate::health::Health;
use crate::service::CniService;
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use trellis_dataplane::{mac_string, Dataplane};
use trellis_model::status::{FdbRow, NeighbourRow, NodeStatus, PeerNode, PodRow, RouteRow};
use trellis_routing::VXLAN_DEV;

/// How long a status client may take to read the document.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Fixed facts about this node.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    /// Node name.
    pub node: String,
    /// Pod subnet.
    pub subnet: String,
    /// Backend, when in a cluster.
    pub backend: Option<String>,
    /// Pod MTU.
    pub mtu: u32,
    /// Underlay address, when in a cluster.
    pub public_ip: Option<String>,
}

/// Everything the status reads.
pub struct StatusSource {
    /// Node facts.
    pub facts: NodeFacts,
    /// Cluster view kept by the routing loop.
    pub view: Arc<Mutex<ClusterView>>,
    /// Kernel access.
    pub dp: Arc<dyn Dataplane>,
    /// IPAM.
    pub service: Arc<CniService>,
    /// Readiness.
    pub health: Arc<Health>,
    /// Kubernetes mode: this node's Pods from the API server.
    pub pods: Option<crate::pods::LocalPods>,
    /// The Service proxy, when it runs.
    pub proxy: Option<crate::proxy::SharedStatus>,
}

impl StatusSource {
    /// The status document. A kernel read that fails leaves its section
    /// empty and is named in `errors`, never passed off as "nothing there".
    pub fn snapshot(&self) -> NodeStatus {
        let view = self.view.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut errors = Vec::new();
        let peers = view
            .nodes
            .values()
            .filter(|r| r.node != self.facts.node)
            .map(|r| PeerNode {
                node: r.node.clone(),
                subnet: r.subnet.to_string(),
                public_ip: r.public_ip.to_string(),
                vtep_mac: r.vtep_mac.clone(),
            })
            .collect();
        let routes = match self.dp.routes_owned() {
            Ok(rs) => rs
                .into_iter()
                .map(|r| RouteRow {
                    dst: r.dst.to_string(),
                    via: r.via.map(|v| v.to_string()),
                    dev: r.dev,
                    onlink: r.onlink,
                })
                .collect(),
            Err(e) => {
                errors.push(format!("read routes: {e}"));
                vec![]
            }
        };
        // the VXLAN device exists only with the vxlan backend
        let vxlan = self.facts.backend.as_deref() == Some("vxlan");
        let neighbours = match self.dp.neighbours(VXLAN_DEV) {
            Ok(ns) => ns
                .into_iter()
                .map(|(ip, mac)| NeighbourRow {
                    ip: ip.to_string(),
                    mac: mac_string(&mac),
                    dev: VXLAN_DEV.into(),
                })
                .collect(),
            Err(e) => {
                if vxlan {
                    errors.push(format!("read neighbours of {VXLAN_DEV}: {e}"));
                }
                vec![]
            }
        };
        let fdb = match self.dp.fdb(VXLAN_DEV) {
            Ok(f) => f
                .into_iter()
                .map(|(mac, dst)| FdbRow {
                    mac: mac_string(&mac),
                    dst: dst.to_string(),
                    dev: VXLAN_DEV.into(),
                })
                .collect(),
            Err(e) => {
                if vxlan {
                    errors.push(format!("read fdb of {VXLAN_DEV}: {e}"));
                }
                vec![]
            }
        };
        if let Some(e) = self.health.datastore_error() {
            errors.push(format!("datastore: {e}"));
        }
        let not_ready = self.health.not_ready();
        // what the API server listed; while its watch fails it may be stale
        let listed = self.pods.as_ref().filter(|p| p.current());
        let mut attached: Vec<PodRow> = self
            .service
            .allocations()
            .into_iter()
            .map(|(ip, o)| {
                let meta = o.pod.as_ref().and_then(|k| listed?.get(k));
                PodRow {
                    ip: ip.to_string(),
                    in_api: listed.map(|_| meta.is_some()),
                    labels: meta.map(|m| m.labels).unwrap_or_default(),
                    pod: o.pod,
                    container_id: o.container_id,
                    ifname: o.ifname,
                }
            })
            .collect();
        attached.sort_by(|a, b| a.pod.cmp(&b.pod).then_with(|| a.ip.cmp(&b.ip)));
        NodeStatus {
            node: self.facts.node.clone(),
            subnet: self.facts.subnet.clone(),
            backend: self.facts.backend.clone(),
            mtu: self.facts.mtu,
            public_ip: self.facts.public_ip.clone(),
            ready: not_ready.is_empty(),
            not_ready,
            pods: attached.len(),
            attached,
            api_pods: listed.map(|p| p.len()),
            peers,
            routes,
            neighbours,
            fdb,
            problems: view.problems,
            errors,
            bgp: view.bgp,
            proxy: self
                .proxy
                .as_ref()
                .map(|p| p.lock().unwrap_or_else(|e| e.into_inner()).snapshot()),
        }
    }
}

/// Serves the status socket at `path` forever.
pub fn serve(path: &Path, source: StatusSource) -> anyhow::Result<()> {
    let listener = crate::server::bind(path)?;
    std::thread::spawn(move || serve_loop(listener, source));
    Ok(())
}

fn serve_loop(listener: UnixListener, source: StatusSource) {
    for conn in listener.incoming() {
        match conn {
            Ok(mut s) => {
                let body = serde_json::to_vec(&source.snapshot()).unwrap_or_default();
                let sent = s
                    .set_write_timeout(Some(WRITE_TIMEOUT))
                    .and_then(|()| s.write_all(&body));
                if let Err(e) = sent {
                    tracing::debug!(error = %e, "status reply");
                }
            }
            Err(e) => tracing::warn!(error = %e, "status accept"),
        }
    }
}
