//! trellis's Service proxy, pure: Services + EndpointSlices + this node's
//! facts -> two nftables tables, `inet trellis-proxy` (which Service a new
//! connection is for, and what is done with it) and `inet
//! trellis-endpoints` (which endpoint it goes to), rendered per Service
//! ([`render::Fragment`]) and turned into scripts: both tables at start,
//! afterwards only what changed ([`Proxy::plan`]). Nothing here reads the
//! kernel; the agent applies the scripts.
//!
//! The datapath: one verdict-map lookup keyed by (address, protocol, port)
//! per new connection (`services`, `nodeports`), whatever the number of
//! Services, to the Service port's chain, which puts the port's id into
//! the packet mark ([`ID_MASK`]); then, in `trellis-endpoints`, one lookup
//! of that id (`pickers`: the chain for its number of endpoints N, shared
//! by every port with N) and one of (id, `numgen random mod N`) in the
//! endpoints map of its protocol. An endpoint change changes elements
//! only; a change of N also a `pickers` element, whose check by the kernel
//! walks only the small `trellis-endpoints` table. No set per Service:
//! loading a map per Service, or a map bound by a rule per Service, grows
//! quadratically in this kernel, and a rule change makes the kernel check
//! its whole table (measured: docs/architecture.md). What is not served is
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

/// The table the proxy owns (and only it): dispatch, masquerade,
/// refusals, affinity.
pub const TABLE: &str = "trellis-proxy";
/// The proxy's second table: endpoint choice by port id.
pub const PICK_TABLE: &str = "trellis-endpoints";
/// The packet mark bit that asks for masquerade in postrouting.
pub const MASQ_MARK: u32 = 0x2000;
/// The packet mark bits that carry a Service port chain's id, set in its
/// chain, read by the endpoint choice and by the chain that records a
/// client's endpoint (affinity), cleared after DNAT (filter hooks at -98).
/// trellis owns these bits on the Service path, as kube-proxy owns 0x4000.
pub const ID_MASK: u32 = 0xffff_0000;
/// The default node port range (kube-apiserver's default).
pub const NODE_PORT_RANGE: (u16, u16) = (30000, 32767);
