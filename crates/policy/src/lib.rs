//! trellis's network policy, pure: NetworkPolicies, ClusterNetworkPolicies,
//! pods and namespaces -> the nftables objects of one node's table `inet
//! trellis-policy` ([`Engine::desired`]), as one script at start and as
//! what changed afterwards ([`render`]). Nothing here reads the kernel.
//!
//! The datapath, in the `forward` hook (after the proxy's DNAT, so a
//! Service is policed on its endpoint): replies of allowed connections
//! pass; a new connection is looked up once per direction by the local
//! pod's address (`egress`, `ingress` verdict maps) and goes to that pod's
//! profile chain (shared by the pods with the same policies), whose rules
//! match named sets: pod addresses of a peer, address ranges, protocol and
//! port ranges, named ports. Traffic from the pod's own node never crosses
//! `forward` (kubelet probes pass by construction).

pub mod compile;
pub mod counters;
pub mod eval;
pub mod k8s;
pub mod log;
pub mod model;
pub mod render;
pub mod sets;

pub use compile::{Desired, Engine, Origin, RuleDef, Verdict};
pub use eval::{Decision, Flow, Step};
pub use log::{Denial, LogDenied};
pub use model::{
    Action, ClusterPolicy, ClusterRule, Direction, Inputs, NamedPort, Namespace, Namespaces,
    NetworkPolicy, Peer, Pod, PortSpec, Protocol, Rule, Selector, Subject, Tier,
};

/// The table the policy owns (and only it).
pub const TABLE: &str = "trellis-policy";
