//! A Kubernetes `Node` as a trellis node record: the subnet is
//! `spec.podCIDRs` (from kube-controller-manager), the rest comes from the
//! annotations each agent writes on its own Node. Pure, no API calls.

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::Node;
use std::collections::BTreeMap;
use std::net::IpAddr;
use trellis_model::bgp::NodeBgp;
use trellis_model::node::NodeRecord;

/// Prefix of every annotation trellis writes.
pub const ANNOTATION_PREFIX: &str = "trellis.dev/";
/// The node's underlay address.
pub const PUBLIC_IP: &str = "trellis.dev/public-ip";
/// The backend it runs (`vxlan`, `host-gw`, `bgp`).
pub const BACKEND_TYPE: &str = "trellis.dev/backend-type";
/// Its VXLAN tunnel endpoint MAC (vxlan backend).
pub const VTEP_MAC: &str = "trellis.dev/vtep-mac";
/// Its BGP settings from its command line, JSON (bgp backend).
pub const BGP: &str = "trellis.dev/bgp";

/// Why a Node cannot be routed to (yet).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeProblem {
    /// No `spec.podCIDRs` (yet).
    #[error("node {0} has no spec.podCIDRs: kube-controller-manager assigns them with --allocate-node-cidrs=true --cluster-cidr=NETWORK")]
    NoPodCidr(String),
    /// No trellis annotations: its agent has not published it (yet).
    #[error("node {0} has no {PUBLIC_IP} annotation: its trellis agent has not started (yet)")]
    NotPublished(String),
    /// An annotation or the podCIDR does not parse.
    #[error("node {node}: {what}")]
    Malformed {
        /// Node name.
        node: String,
        /// What is wrong, naming the field.
        what: String,
    },
}

impl NodeProblem {
    /// A node that simply is not ready yet (not worth a warning).
    pub fn is_pending(&self) -> bool {
        !matches!(self, Self::Malformed { .. })
    }
}

/// The node's IPv4 pod subnet from `spec.podCIDRs` (or `spec.podCIDR`).
pub fn pod_cidr(node: &Node) -> Result<Ipv4Net, NodeProblem> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let spec = node.spec.as_ref();
    let cidrs: Vec<String> = spec
        .and_then(|s| s.pod_cidrs.clone())
        .filter(|c| !c.is_empty())
        .or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]))
        .unwrap_or_default();
    if cidrs.is_empty() {
        return Err(NodeProblem::NoPodCidr(name));
    }
    let mut v4 = None;
    for c in &cidrs {
        match c.parse::<IpNet>() {
            Ok(IpNet::V4(n)) => {
                v4.get_or_insert(n);
            }
            Ok(IpNet::V6(_)) => {}
            Err(e) => {
                return Err(NodeProblem::Malformed {
                    node: name,
                    what: format!("spec.podCIDRs {c:?}: {e}"),
                })
            }
        }
    }
    v4.ok_or_else(|| NodeProblem::Malformed {
        node: name,
        what: format!("spec.podCIDRs {cidrs:?} has no IPv4 range"),
    })
}

/// The node's first IPv4 `InternalIP` in `status.addresses`.
pub fn internal_ip(node: &Node) -> Option<std::net::Ipv4Addr> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok())
}

/// The record other nodes route by, or why there is none.
pub fn node_record(node: &Node) -> Result<NodeRecord, NodeProblem> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let subnet = pod_cidr(node)?;
    let empty = BTreeMap::new();
    let ann = node.metadata.annotations.as_ref().unwrap_or(&empty);
    let malformed = |what: String| NodeProblem::Malformed {
        node: name.clone(),
        what,
    };
    let Some(ip) = ann.get(PUBLIC_IP) else {
        return Err(NodeProblem::NotPublished(name));
    };
    let public_ip: IpAddr = ip
        .parse()
        .map_err(|e| malformed(format!("annotation {PUBLIC_IP} {ip:?}: {e}")))?;
    let backend_type = ann
        .get(BACKEND_TYPE)
        .ok_or_else(|| malformed(format!("annotation {BACKEND_TYPE} is missing")))?
        .clone();
    if !matches!(backend_type.as_str(), "vxlan" | "host-gw" | "bgp") {
        return Err(malformed(format!(
            "annotation {BACKEND_TYPE} {backend_type:?}: expected vxlan, host-gw or bgp"
        )));
    }
    let vtep_mac = match ann.get(VTEP_MAC) {
        Some(m) if is_mac(m) => Some(m.clone()),
        Some(m) => {
            return Err(malformed(format!(
                "annotation {VTEP_MAC} {m:?}: not a MAC address"
            )))
        }
        None if backend_type == "vxlan" => {
            return Err(malformed(format!(
                "annotation {VTEP_MAC} is missing (backend vxlan)"
            )))
        }
        None => None,
    };
    let bgp = match ann.get(BGP) {
        Some(b) => Some(
            serde_json::from_str::<NodeBgp>(b)
                .map_err(|e| malformed(format!("annotation {BGP}: {e}")))?,
        ),
        None => None,
    };
    Ok(NodeRecord {
        node: name,
        subnet,
        public_ip,
        backend_type,
        vtep_mac,
        bgp,
    })
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// The annotations that publish `record` (what an agent writes on its own
/// Node); `None` removes one.
pub fn annotations(record: &NodeRecord) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    out.insert(PUBLIC_IP.to_string(), Some(record.public_ip.to_string()));
    out.insert(BACKEND_TYPE.to_string(), Some(record.backend_type.clone()));
    out.insert(VTEP_MAC.to_string(), record.vtep_mac.clone());
    out.insert(
        BGP.to_string(),
        record
            .bgp
            .as_ref()
            .map(|b| serde_json::to_string(b).unwrap_or_default()),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};
    use kube::api::ObjectMeta;

    fn node(cidrs: &[&str], ann: &[(&str, &str)]) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                annotations: Some(
                    ann.iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidrs: Some(cidrs.iter().map(|c| c.to_string()).collect()),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(vec![
                    NodeAddress {
                        type_: "Hostname".into(),
                        address: "n1".into(),
                    },
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: "fd00::11".into(),
                    },
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: "192.0.2.11".into(),
                    },
                ]),
                ..Default::default()
            }),
        }
    }

    const VX: &[(&str, &str)] = &[
        (PUBLIC_IP, "192.0.2.11"),
        (BACKEND_TYPE, "vxlan"),
        (VTEP_MAC, "0e:aa:c0:00:02:0b"),
    ];

    #[test]
    fn a_published_node_round_trips() {
        let n = node(&["fd00::/64", "10.244.1.0/24"], VX);
        let r = node_record(&n).expect("record");
        assert_eq!(r.subnet.to_string(), "10.244.1.0/24");
        assert_eq!(r.vtep_mac.as_deref(), Some("0e:aa:c0:00:02:0b"));
        assert_eq!(internal_ip(&n), Some("192.0.2.11".parse().expect("ip")));
        let ann: Vec<(String, String)> = annotations(&r)
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
        let back = node(
            &["10.244.1.0/24"],
            &ann.iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect::<Vec<_>>(),
        );
        assert_eq!(node_record(&back).expect("again"), r);
    }

    #[test]
    fn pending_and_malformed_nodes_say_what_is_wrong() {
        let e = node_record(&node(&[], VX)).expect_err("no cidr");
        assert!(
            e.is_pending() && e.to_string().contains("--allocate-node-cidrs"),
            "{e}"
        );
        let e = node_record(&node(&["10.244.1.0/24"], &[])).expect_err("unpublished");
        assert!(e.is_pending(), "{e}");
        for (ann, field) in [
            (
                vec![(PUBLIC_IP, "nope"), (BACKEND_TYPE, "host-gw")],
                PUBLIC_IP,
            ),
            (
                vec![(PUBLIC_IP, "192.0.2.1"), (BACKEND_TYPE, "udp")],
                BACKEND_TYPE,
            ),
            (
                vec![(PUBLIC_IP, "192.0.2.1"), (BACKEND_TYPE, "vxlan")],
                VTEP_MAC,
            ),
            (
                vec![
                    (PUBLIC_IP, "192.0.2.1"),
                    (BACKEND_TYPE, "vxlan"),
                    (VTEP_MAC, "zz"),
                ],
                VTEP_MAC,
            ),
            (
                vec![(PUBLIC_IP, "192.0.2.1"), (BACKEND_TYPE, "bgp"), (BGP, "{")],
                BGP,
            ),
        ] {
            let e = node_record(&node(&["10.244.1.0/24"], &ann)).expect_err("malformed");
            assert!(!e.is_pending() && e.to_string().contains(field), "{e}");
        }
        let e = node_record(&node(&["10.244.1.0/33"], VX)).expect_err("bad cidr");
        assert!(e.to_string().contains("spec.podCIDRs"), "{e}");
        let e = node_record(&node(&["fd00::/64"], VX)).expect_err("v6 only");
        assert!(e.to_string().contains("IPv4"), "{e}");
    }
}
