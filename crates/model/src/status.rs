//! The agent's status document, as the status socket sends it and
//! `trellisctl status` / `bgp status` read it: one typed struct on both
//! sides (JSON on the wire, camelCase keys).

use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr};

/// One node's status. Every field has a default, so a CLI reads the
/// document of an older or newer agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeStatus {
    /// Node name.
    pub node: String,
    /// Pod subnet (empty until known).
    pub subnet: String,
    /// Routing backend, in a cluster.
    pub backend: Option<String>,
    /// Pod MTU.
    pub mtu: u32,
    /// Underlay address, in a cluster.
    pub public_ip: Option<String>,
    /// What `/readyz` answers.
    pub ready: bool,
    /// Why the node is not ready (empty when it is).
    #[serde(default)]
    pub not_ready: Vec<String>,
    /// Pods with an address on this node.
    pub pods: usize,
    /// Those pods: address, owner and, in Kubernetes mode, what the API
    /// server says of them.
    #[serde(default)]
    pub attached: Vec<PodRow>,
    /// Kubernetes mode: the Pods the API server lists on this node
    /// (`None` until its watch has listed).
    #[serde(default)]
    pub api_pods: Option<usize>,
    /// Other nodes, as the datastore lists them.
    #[serde(default)]
    pub peers: Vec<PeerNode>,
    /// Routes trellis owns in the kernel.
    #[serde(default)]
    pub routes: Vec<RouteRow>,
    /// Permanent neighbours on the VXLAN device.
    #[serde(default)]
    pub neighbours: Vec<NeighbourRow>,
    /// FDB entries on the VXLAN device.
    #[serde(default)]
    pub fdb: Vec<FdbRow>,
    /// Problems the backend reported (unreachable peers, ...).
    #[serde(default)]
    pub problems: Vec<String>,
    /// Failures reading the kernel or the datastore for this document: the
    /// sections above may be incomplete when this is not empty.
    #[serde(default)]
    pub errors: Vec<String>,
    /// The BGP speaker, with the bgp backend.
    #[serde(default)]
    pub bgp: Option<BgpStatus>,
    /// The Service proxy, when it runs on this node.
    #[serde(default)]
    pub proxy: Option<ProxyStatus>,
}

/// The Service proxy as it programmed the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProxyStatus {
    /// Whether Services and EndpointSlices have listed and been applied.
    pub synced: bool,
    /// Services as programmed.
    pub services: Vec<ProxyService>,
    /// Addresses and ports two Services claim (the first keeps them).
    pub conflicts: Vec<String>,
    /// How long the last sync took, in microseconds.
    pub last_sync_us: u64,
    /// Syncs so far.
    pub syncs: u64,
    /// The last sync's failure, while it lasts.
    pub error: Option<String>,
}

/// One Service as the proxy programmed it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProxyService {
    /// `namespace/name`.
    pub service: String,
    /// Its ports.
    pub ports: Vec<ProxyPort>,
    /// What of it is not served, and why.
    pub problems: Vec<String>,
}

/// One Service port as programmed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProxyPort {
    /// `namespace/name/protocol/port`.
    pub id: String,
    /// Endpoints new connections go to.
    pub endpoints: Vec<String>,
    /// This node's endpoints (traffic policy Local).
    pub local: Vec<String>,
    /// `serve`, `reject` (no endpoints) or `drop` (policy Local, none here).
    pub verdict: String,
    /// Where it is served: `ADDRESS:PORT/PROTO`, `*:NODEPORT/PROTO`.
    pub addresses: Vec<String>,
}

/// An attached pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PodRow {
    /// Its address.
    pub ip: String,
    /// `namespace/name`, when the runtime said (K8S_POD_*).
    pub pod: Option<String>,
    /// CNI_CONTAINERID.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// CNI_IFNAME.
    pub ifname: String,
    /// Kubernetes mode: whether the API server lists this Pod on this
    /// node (`false`: deleted there, or never bound here).
    pub in_api: Option<bool>,
    /// Its labels, from the API server.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Another node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerNode {
    /// Its name.
    pub node: String,
    /// Its subnet.
    pub subnet: String,
    /// Its underlay address.
    pub public_ip: String,
    /// Its VTEP MAC (vxlan).
    pub vtep_mac: Option<String>,
}

/// A route trellis owns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteRow {
    /// Destination.
    pub dst: String,
    /// Gateway.
    pub via: Option<String>,
    /// Device.
    pub dev: String,
    /// `onlink` flag.
    pub onlink: bool,
}

/// A permanent neighbour.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NeighbourRow {
    /// Address.
    pub ip: String,
    /// MAC.
    pub mac: String,
    /// Device.
    pub dev: String,
}

/// An FDB entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FdbRow {
    /// MAC.
    pub mac: String,
    /// Remote VTEP.
    pub dst: String,
    /// Device.
    pub dev: String,
}

/// The BGP speaker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BgpStatus {
    /// Our AS.
    pub asn: u32,
    /// Router id.
    pub router_id: String,
    /// Cluster id when this node is a route reflector.
    pub route_reflector_cluster_id: Option<String>,
    /// Peers.
    #[serde(default)]
    pub peers: Vec<BgpPeer>,
}

/// One BGP peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BgpPeer {
    /// Address.
    pub addr: IpAddr,
    /// AS.
    pub asn: u32,
    /// mesh / reflector / rr-client / external.
    pub kind: String,
    /// FSM state.
    pub state: String,
    /// Seconds in this state.
    pub since_secs: u64,
    /// The peer's router id once known.
    pub router_id: Option<Ipv4Addr>,
    /// Prefixes the peer announces to us (accepted or refused).
    pub received: usize,
    /// Of those, accepted.
    pub accepted: usize,
    /// Prefixes we advertise to it.
    pub advertised: usize,
    /// Routes kept as stale during the peer's graceful restart.
    pub stale: usize,
    /// Times the session reached Established (a flap adds one).
    #[serde(default)]
    pub established_count: u64,
    /// The last error, while the session is not established.
    pub last_error: Option<String>,
}
