//! What the proxy knows of a Service and its endpoints: the fields it
//! serves, already checked (see `k8s.rs`), independent of the API types.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// A transport protocol a Service port can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP
    Tcp,
    /// UDP
    Udp,
    /// SCTP
    Sctp,
}

impl Protocol {
    /// The name nft uses (`meta l4proto tcp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// How the Service is exposed (`spec.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum ServiceType {
    /// Cluster-internal virtual IP only.
    #[default]
    ClusterIP,
    /// Also a port on every node's addresses.
    NodePort,
    /// Also load balancer ingress IPs (and node ports unless disabled).
    LoadBalancer,
    /// A DNS alias: nothing to proxy.
    ExternalName,
}

/// One port of a Service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServicePort {
    /// `name` (may be empty when the Service has one port).
    #[serde(default)]
    pub name: String,
    /// Its protocol.
    pub protocol: Protocol,
    /// The port on the virtual addresses.
    pub port: u16,
    /// The node port, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
}

/// A Service as the proxy serves it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Service {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// `spec.type`.
    #[serde(default)]
    pub kind: ServiceType,
    /// `spec.clusterIPs` (empty: no virtual IP, e.g. ExternalName).
    #[serde(default)]
    pub cluster_ips: Vec<IpAddr>,
    /// Its ports.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// `spec.externalIPs`.
    #[serde(default)]
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`.
    #[serde(default)]
    pub lb_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges` (empty: everyone).
    #[serde(default)]
    pub lb_source_ranges: Vec<IpNet>,
    /// `sessionAffinity: ClientIP` with its timeout in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_timeout: Option<u32>,
    /// `externalTrafficPolicy: Local`.
    #[serde(default)]
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`.
    #[serde(default)]
    pub internal_local: bool,
    /// `spec.healthCheckNodePort` (ETP Local with node ports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<u16>,
    /// What cannot be served; a Service with problems is not programmed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

impl Service {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether it has addresses reached from outside the cluster (node
    /// ports, load balancer IPs, external IPs).
    pub fn has_external(&self) -> bool {
        !self.external_ips.is_empty()
            || !self.lb_ips.is_empty()
            || self.ports.iter().any(|p| p.node_port.is_some())
    }
}

/// One port of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SlicePort {
    /// Matches the Service port's `name`.
    #[serde(default)]
    pub name: String,
    /// Its protocol.
    pub protocol: Protocol,
    /// The port on the endpoints.
    pub port: u16,
}

/// One endpoint of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    /// Its address (the first of `addresses`, as kube-proxy uses).
    pub address: IpAddr,
    /// `conditions.ready` (unset: true).
    pub ready: bool,
    /// `conditions.serving` (unset: as ready).
    pub serving: bool,
    /// `conditions.terminating` (unset: false).
    pub terminating: bool,
    /// `nodeName`, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// An EndpointSlice of a Service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Slice {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The Service it belongs to (label `kubernetes.io/service-name`).
    pub service: String,
    /// Its ports.
    #[serde(default)]
    pub ports: Vec<SlicePort>,
    /// Its endpoints.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

impl Slice {
    /// `namespace/service`: the Service it belongs to.
    pub fn service_key(&self) -> String {
        format!("{}/{}", self.namespace, self.service)
    }
}

/// What the proxy knows of the node it runs on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeFacts {
    /// The Node's name (local endpoints have it as `nodeName`).
    pub name: String,
    /// Addresses node ports are served on.
    pub addresses: Vec<IpAddr>,
    /// The cluster's pod network: traffic from elsewhere to a ClusterIP is
    /// masqueraded.
    pub cluster_cidr: IpNet,
    /// Node ports outside this range are refused (problem, not served).
    pub node_port_range: (u16, u16),
}
