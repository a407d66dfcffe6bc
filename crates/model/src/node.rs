//! What a node publishes about itself in the datastore.

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// A node's public record, stored under its subnet claim and held by its
/// lease: enough for every other node to route to its pods.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    /// Node name.
    pub node: String,
    /// The node's pod subnet.
    pub subnet: Ipv4Net,
    /// Underlay address other nodes reach it at.
    pub public_ip: IpAddr,
    /// Backend the node runs (`vxlan`, `host-gw`, ...).
    pub backend_type: String,
    /// VXLAN tunnel endpoint MAC, for the vxlan backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep_mac: Option<String>,
    /// BGP settings from the agent's command line (a `Node` resource in the
    /// datastore overrides them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<crate::bgp::NodeBgp>,
}

/// The datastore key of a subnet claim: `subnets/10.244.1.0-24`.
pub fn subnet_key(prefix: &str, subnet: Ipv4Net) -> String {
    format!(
        "{prefix}subnets/{}-{}",
        subnet.network(),
        subnet.prefix_len()
    )
}

/// The subnet a claim key names.
pub fn parse_subnet_key(prefix: &str, key: &str) -> Option<Ipv4Net> {
    let rest = key.strip_prefix(prefix)?.strip_prefix("subnets/")?;
    let (ip, len) = rest.rsplit_once('-')?;
    Ipv4Net::new(ip.parse().ok()?, len.parse().ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let n: Ipv4Net = "10.244.7.0/24".parse().expect("net");
        let k = subnet_key("/trellis/v1/", n);
        assert_eq!(k, "/trellis/v1/subnets/10.244.7.0-24");
        assert_eq!(parse_subnet_key("/trellis/v1/", &k), Some(n));
        assert_eq!(
            parse_subnet_key("/trellis/v1/", "/trellis/v1/nodes/x"),
            None
        );
    }
}
