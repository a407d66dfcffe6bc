//! trellis's Service proxy, pure: Services + EndpointSlices + this node's
//! facts -> the `inet trellis-proxy` nftables table, rendered per Service
//! ([`render::Fragment`]) and turned into scripts for `nft -f`: the whole
//! table at start, afterwards only what changed ([`Proxy::plan`]). Nothing
//! here reads the kernel; the agent applies the scripts.
//!
//! The datapath: one verdict-map lookup keyed by (address, protocol, port)
//! per new connection (`services`, `nodeports`), whatever the number of
//! Services; the endpoint is picked by at most [`render::CASCADE_MAX`]
//! rules of the Service port's chain (`numgen random mod N-i 0`), a map
//! of its own only for ports with more endpoints. No set per Service
//! otherwise: loading a map per Service, or one map shared by all, grows
//! quadratically in this kernel (measured: docs/architecture.md; so did
//! kube-proxy v1.32's anonymous set per Service). What is not served is
//! refused in the filter hooks (`no_endpoints`, `cluster_ips`).

pub mod base;
mod claims;
pub mod endpoints;
pub mod k8s;
pub mod model;
pub mod render;
pub mod script;
pub mod state;
pub mod stored;

pub use model::{
    Endpoint, NodeFacts, Protocol, Service, ServicePort, ServiceType, Slice, SlicePort,
};
pub use state::{Plan, Proxy, UdpFlows};

/// The table the proxy owns (and only it).
pub const TABLE: &str = "trellis-proxy";
/// The packet mark bit that asks for masquerade in postrouting.
pub const MASQ_MARK: u32 = 0x2000;
/// The packet mark bits that carry an affinity id from the DNAT to the
/// chain that records the client's endpoint (cleared there).
pub const AFFINITY_MASK: u32 = 0xffff_0000;
/// The default node port range (kube-apiserver's default).
pub const NODE_PORT_RANGE: (u16, u16) = (30000, 32767);
