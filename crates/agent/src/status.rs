//! The status socket: one JSON document per connection, for `trellisctl
//! status`. It reports what the agent believes (subnet, backend, peers) and
//! what the kernel holds (the routes, neighbours and FDB entries trellis owns).

use crate::cluster::ClusterView;
use crate::service::CniService;
use serde_json::{json, Value};
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use trellis_dataplane::{mac_string, Dataplane};
use trellis_routing::VXLAN_DEV;

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
}

impl StatusSource {
    /// The status document.
    pub fn snapshot(&self) -> Value {
        let view = self.view.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let peers: Vec<Value> = view
            .nodes
            .values()
            .filter(|r| r.node != self.facts.node)
            .map(|r| json!({"node": r.node, "subnet": r.subnet.to_string(), "publicIp": r.public_ip.to_string(), "vtepMac": r.vtep_mac}))
            .collect();
        let routes: Vec<Value> = self
            .dp
            .routes_owned()
            .unwrap_or_default()
            .into_iter()
            .map(|r| json!({"dst": r.dst.to_string(), "via": r.via.map(|v| v.to_string()), "dev": r.dev, "onlink": r.onlink}))
            .collect();
        let neighbours: Vec<Value> = self
            .dp
            .neighbours(VXLAN_DEV)
            .unwrap_or_default()
            .into_iter()
            .map(|(ip, mac)| json!({"ip": ip.to_string(), "mac": mac_string(&mac), "dev": VXLAN_DEV}))
            .collect();
        let fdb: Vec<Value> = self
            .dp
            .fdb(VXLAN_DEV)
            .unwrap_or_default()
            .into_iter()
            .map(|(mac, dst)| json!({"mac": mac_string(&mac), "dst": dst.to_string(), "dev": VXLAN_DEV}))
            .collect();
        json!({
            "node": self.facts.node,
            "subnet": self.facts.subnet,
            "backend": self.facts.backend,
            "mtu": self.facts.mtu,
            "publicIp": self.facts.public_ip,
            "pods": self.service.allocations().len(),
            "peers": peers,
            "routes": routes,
            "neighbours": neighbours,
            "fdb": fdb,
            "problems": view.problems,
            "bgp": view.bgp,
        })
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
                let body = source.snapshot().to_string();
                if let Err(e) = s.write_all(body.as_bytes()) {
                    tracing::debug!("status reply: {e}");
                }
            }
            Err(e) => tracing::warn!("status accept: {e}"),
        }
    }
}
