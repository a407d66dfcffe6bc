//! BGP configuration as Kubernetes-shaped resources (Calico's shapes):
//! `BGPConfiguration` (AS, mesh on/off, timers), `BGPPeer` (external
//! routers, global or per node) and `Node` (a node's AS and route-reflector
//! cluster id). Read from manifests (`trellisctl apply -f`, YAML or JSON,
//! several documents per file), validated with the document and field
//! named, stored as JSON under `<prefix>bgp/`.

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr};

/// The API group and version of trellis resources.
pub const API_VERSION: &str = "trellis.dev/v1";
/// The AS nodes use unless configured.
pub const DEFAULT_AS: u32 = 64512;

/// `BGPConfiguration` spec (the one named `default` applies).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpConfiguration {
    /// The nodes' AS.
    #[serde(default = "default_as")]
    pub as_number: u32,
    /// Node-to-node mesh (when no node is a route reflector).
    #[serde(default = "yes")]
    pub node_to_node_mesh_enabled: bool,
    /// Hold time offered to peers (0, or 3 and more).
    #[serde(default = "default_hold")]
    pub hold_time_seconds: u16,
    /// Graceful-restart time (0 turns graceful restart off).
    #[serde(default = "default_restart")]
    pub graceful_restart_seconds: u16,
    /// Most prefixes accepted from one peer (0: no limit).
    #[serde(default = "default_max_prefixes")]
    pub max_prefixes: usize,
    /// Service cluster IP ranges to advertise to external peers (opt-in,
    /// as Calico's): each range from every node; the address of a Service
    /// with `externalTrafficPolicy: Local` also as a /32 from the nodes
    /// that have a ready endpoint of it.
    #[serde(
        default,
        rename = "serviceClusterIPs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub service_cluster_ips: Vec<ServiceCidr>,
    /// `spec.externalIPs` ranges to advertise, likewise.
    #[serde(
        default,
        rename = "serviceExternalIPs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub service_external_ips: Vec<ServiceCidr>,
    /// LoadBalancer ingress ranges to advertise, likewise.
    #[serde(
        default,
        rename = "serviceLoadBalancerIPs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub service_load_balancer_ips: Vec<ServiceCidr>,
}

/// One Service address range to advertise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceCidr {
    /// The range (IPv4).
    pub cidr: ipnet::IpNet,
}

impl BgpConfiguration {
    /// Every Service range to advertise: (range, which addresses it is for).
    pub fn service_ranges(&self) -> Vec<(ipnet::IpNet, ServiceAddrKind)> {
        let mut v = Vec::new();
        for (list, kind) in [
            (&self.service_cluster_ips, ServiceAddrKind::ClusterIp),
            (&self.service_external_ips, ServiceAddrKind::ExternalIp),
            (
                &self.service_load_balancer_ips,
                ServiceAddrKind::LoadBalancerIp,
            ),
        ] {
            v.extend(list.iter().map(|c| (c.cidr.trunc(), kind)));
        }
        v
    }
}

/// Which of a Service's addresses: its cluster IPs, external IPs or load
/// balancer ingress IPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ServiceAddrKind {
    /// `spec.clusterIPs`
    ClusterIp,
    /// `spec.externalIPs`
    ExternalIp,
    /// `status.loadBalancer.ingress[].ip`
    LoadBalancerIp,
}

fn default_as() -> u32 {
    DEFAULT_AS
}
fn yes() -> bool {
    true
}
fn default_hold() -> u16 {
    90
}
fn default_restart() -> u16 {
    120
}
fn default_max_prefixes() -> usize {
    10_000
}

impl Default for BgpConfiguration {
    fn default() -> Self {
        Self {
            as_number: DEFAULT_AS,
            node_to_node_mesh_enabled: true,
            hold_time_seconds: default_hold(),
            graceful_restart_seconds: default_restart(),
            max_prefixes: default_max_prefixes(),
            service_cluster_ips: vec![],
            service_external_ips: vec![],
            service_load_balancer_ips: vec![],
        }
    }
}

/// `BGPPeer` spec: a router outside the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpPeer {
    /// Its address.
    #[serde(rename = "peerIP")]
    pub peer_ip: IpAddr,
    /// Its AS (the nodes' AS: iBGP; another: eBGP).
    pub as_number: u32,
    /// Only this node peers with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Only nodes whose address is inside this subnet peer with it (one
    /// peer resource per rack or segment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_subnet: Option<Ipv4Net>,
    /// TCP MD5 password (RFC 2385).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// eBGP multihop (TTL 255).
    #[serde(default)]
    pub multihop: bool,
    /// Most prefixes accepted from it (default: the configuration's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_prefixes: Option<usize>,
}

/// `Node` spec, BGP part.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeBgp {
    /// The node's AS (default: the configuration's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_number: Option<u32>,
    /// Set: the node is a route reflector with this cluster id.
    #[serde(
        default,
        rename = "routeReflectorClusterID",
        skip_serializing_if = "Option::is_none"
    )]
    pub route_reflector_cluster_id: Option<Ipv4Addr>,
}

/// `Node` spec.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    /// BGP settings.
    #[serde(default)]
    pub bgp: NodeBgp,
}

/// One resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// BGPConfiguration.
    Configuration(String, BgpConfiguration),
    /// BGPPeer.
    Peer(String, BgpPeer),
    /// Node.
    Node(String, NodeSpec),
}

impl Resource {
    /// Its kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Configuration(..) => "BGPConfiguration",
            Self::Peer(..) => "BGPPeer",
            Self::Node(..) => "Node",
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        match self {
            Self::Configuration(n, _) | Self::Peer(n, _) | Self::Node(n, _) => n,
        }
    }

    /// Its datastore key.
    pub fn key(&self, prefix: &str) -> String {
        let dir = match self {
            Self::Configuration(..) => "configurations",
            Self::Peer(..) => "peers",
            Self::Node(..) => "nodes",
        };
        format!("{prefix}bgp/{dir}/{}", self.name())
    }

    /// The resource as a manifest document (`apiVersion`, `kind`,
    /// `metadata.name`, `spec`): what `get -o yaml` prints and what the
    /// API server stores.
    pub fn manifest(&self) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": API_VERSION,
            "kind": self.kind(),
            "metadata": {"name": self.name()},
            "spec": serde_json::from_slice::<serde_json::Value>(&self.value())
                .unwrap_or_default(),
        })
    }

    /// Its stored value (the spec as JSON).
    pub fn value(&self) -> Vec<u8> {
        let v = match self {
            Self::Configuration(_, s) => serde_json::to_vec(s),
            Self::Peer(_, s) => serde_json::to_vec(s),
            Self::Node(_, s) => serde_json::to_vec(s),
        };
        v.unwrap_or_default()
    }
}

/// Where BGP resources live.
pub fn bgp_prefix(prefix: &str) -> String {
    format!("{prefix}bgp/")
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Doc {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<Meta>,
    #[serde(default)]
    spec: serde_yaml::Value,
}

#[derive(Deserialize)]
struct Meta {
    name: Option<String>,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !n.starts_with(['-', '.'])
}

fn validate(r: &Resource) -> Result<(), String> {
    match r {
        Resource::Configuration(name, c) => {
            if name != "default" {
                return Err(format!(
                    "metadata.name: only the BGPConfiguration named \"default\" is used, not {name:?}"
                ));
            }
            if c.as_number == 0 {
                return Err("spec.asNumber: 0 is not an AS number".into());
            }
            if (1..3).contains(&c.hold_time_seconds) {
                return Err("spec.holdTimeSeconds: must be 0 or at least 3".into());
            }
            if c.graceful_restart_seconds > 4095 {
                return Err("spec.gracefulRestartSeconds: at most 4095".into());
            }
            for (field, list) in [
                ("serviceClusterIPs", &c.service_cluster_ips),
                ("serviceExternalIPs", &c.service_external_ips),
                ("serviceLoadBalancerIPs", &c.service_load_balancer_ips),
            ] {
                for (i, r) in list.iter().enumerate() {
                    if !r.cidr.addr().is_ipv4() {
                        return Err(format!(
                            "spec.{field}[{i}].cidr: {}: only IPv4 ranges are advertised (the cluster is IPv4)",
                            r.cidr
                        ));
                    }
                    if r.cidr.prefix_len() == 0 {
                        return Err(format!(
                            "spec.{field}[{i}].cidr: {}: a default route is not a Service range",
                            r.cidr
                        ));
                    }
                }
            }
        }
        Resource::Peer(_, p) => {
            if p.as_number == 0 {
                return Err("spec.asNumber: 0 is not an AS number".into());
            }
            if p.peer_ip.is_unspecified() || p.peer_ip.is_multicast() {
                return Err(format!("spec.peerIP: {} cannot be a peer", p.peer_ip));
            }
            if p.password
                .as_ref()
                .is_some_and(|k| k.is_empty() || k.len() > 80)
            {
                return Err("spec.password: 1 to 80 bytes".into());
            }
            if p.node.is_some() && p.node_subnet.is_some() {
                return Err("spec: set node or nodeSubnet, not both".into());
            }
        }
        Resource::Node(_, n) => {
            if n.bgp.as_number == Some(0) {
                return Err("spec.bgp.asNumber: 0 is not an AS number".into());
            }
        }
    }
    Ok(())
}

fn one(doc: Doc) -> Result<Resource, String> {
    match doc.api_version.as_deref() {
        Some(API_VERSION) => {}
        Some(other) => return Err(format!("apiVersion: {other:?} is not {API_VERSION:?}")),
        None => return Err(format!("apiVersion: missing (want {API_VERSION:?})")),
    }
    let name = doc
        .metadata
        .and_then(|m| m.name)
        .ok_or("metadata.name: missing")?;
    if !valid_name(&name) {
        return Err(format!(
            "metadata.name: {name:?} is not a valid name (lower-case letters, digits, '-', '.')"
        ));
    }
    let spec = if doc.spec.is_null() {
        serde_yaml::Value::Mapping(Default::default())
    } else {
        doc.spec
    };
    let r = match doc.kind.as_deref() {
        Some("BGPConfiguration") => Resource::Configuration(
            name,
            serde_yaml::from_value(spec).map_err(|e| format!("spec: {e}"))?,
        ),
        Some("BGPPeer") => Resource::Peer(
            name,
            serde_yaml::from_value(spec).map_err(|e| format!("spec: {e}"))?,
        ),
        Some("Node") => Resource::Node(
            name,
            serde_yaml::from_value(spec).map_err(|e| format!("spec: {e}"))?,
        ),
        Some(k) => {
            return Err(format!(
                "kind: {k:?} is not one of BGPConfiguration, BGPPeer, Node"
            ))
        }
        None => return Err("kind: missing".into()),
    };
    validate(&r)?;
    Ok(r)
}

/// The resource of `kind` named `name` with a stored `spec` (an etcd
/// value, a custom resource's spec), validated as a manifest would be.
pub fn from_stored(kind: &str, name: &str, spec: &[u8]) -> Result<Resource, String> {
    let spec: serde_yaml::Value =
        serde_json::from_slice(spec).map_err(|e| format!("{kind} {name}: spec: {e}"))?;
    one(Doc {
        api_version: Some(API_VERSION.into()),
        kind: Some(kind.into()),
        metadata: Some(Meta {
            name: Some(name.into()),
        }),
        spec,
    })
    .map_err(|e| format!("{kind} {name}: {e}"))
}

/// The kind stored in datastore directory `dir` (`peers` -> `BGPPeer`).
pub fn kind_of_dir(dir: &str) -> Option<&'static str> {
    match dir {
        "configurations" => Some("BGPConfiguration"),
        "peers" => Some("BGPPeer"),
        "nodes" => Some("Node"),
        _ => None,
    }
}

/// Reads every document of a manifest. Any bad document fails the whole
/// manifest (nothing is applied), naming the document and the field.
pub fn parse_manifest(text: &str) -> Result<Vec<Resource>, String> {
    let mut out = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let v = serde_yaml::Value::deserialize(de).map_err(|e| format!("document {n}: {e}"))?;
        if v.is_null() {
            continue;
        }
        // a `kind: List` (what `get -o json` prints) holds its documents
        let list = v.get("kind").and_then(|k| k.as_str()) == Some("List");
        let docs = match (list, v.get("items")) {
            (true, Some(serde_yaml::Value::Sequence(items))) => items.clone(),
            (true, _) => return Err(format!("document {n}: a List without items")),
            (false, _) => vec![v],
        };
        for (j, v) in docs.into_iter().enumerate() {
            let at = if list {
                format!("document {n} item {}", j + 1)
            } else {
                format!("document {n}")
            };
            let doc: Doc = serde_yaml::from_value(v).map_err(|e| format!("{at}: {e}"))?;
            out.push(one(doc).map_err(|e| format!("{at}: {e}"))?);
        }
    }
    if out.is_empty() {
        return Err("no resources in the manifest".into());
    }
    Ok(out)
}

/// What the datastore holds under `<prefix>bgp/`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BgpResources {
    /// The `default` configuration (defaults when absent).
    pub config: BgpConfiguration,
    /// External peers by name.
    pub peers: std::collections::BTreeMap<String, BgpPeer>,
    /// Node settings by node name.
    pub nodes: std::collections::BTreeMap<String, NodeBgp>,
}

impl BgpResources {
    /// Reads stored key/values; unreadable ones are returned as errors to
    /// log (and skipped).
    pub fn from_kvs<'a>(
        prefix: &str,
        kvs: impl Iterator<Item = (&'a str, &'a [u8])>,
    ) -> (Self, Vec<String>) {
        let mut out = Self::default();
        let mut errors = Vec::new();
        let base = bgp_prefix(prefix);
        for (k, v) in kvs {
            let Some(rest) = k.strip_prefix(&base) else {
                continue;
            };
            let Some((dir, name)) = rest.split_once('/') else {
                continue;
            };
            let res = match dir {
                "configurations" if name == "default" => serde_json::from_slice(v)
                    .map(|c| out.config = c)
                    .map_err(|e| e.to_string()),
                "configurations" => Ok(()),
                "peers" => serde_json::from_slice(v)
                    .map(|p| {
                        out.peers.insert(name.to_string(), p);
                    })
                    .map_err(|e| e.to_string()),
                "nodes" => serde_json::from_slice::<NodeSpec>(v)
                    .map(|n| {
                        out.nodes.insert(name.to_string(), n.bgp);
                    })
                    .map_err(|e| e.to_string()),
                _ => Ok(()),
            };
            if let Err(e) = res {
                errors.push(format!("{k}: {e}"));
            }
        }
        (out, errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_resources_round_trip_through_manifests_and_lists() {
        let text = "apiVersion: trellis.dev/v1\nkind: BGPPeer\nmetadata: {name: tor}\n\
                    spec: {peerIP: 192.0.2.1, asNumber: 65000, node: n1}\n---\n\
                    apiVersion: trellis.dev/v1\nkind: Node\nmetadata: {name: n1}\n\
                    spec: {bgp: {routeReflectorClusterID: 224.0.0.1}}\n";
        let rs = parse_manifest(text).expect("manifest");
        // stored (etcd value or custom resource spec) -> the same resource
        for r in &rs {
            let dir = r
                .key("/p/")
                .split('/')
                .nth(3)
                .unwrap_or_default()
                .to_string();
            let kind = kind_of_dir(&dir).expect("dir");
            assert_eq!(&from_stored(kind, r.name(), &r.value()).expect("stored"), r);
        }
        // `get -o json` prints a List; apply takes it back
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List",
            "items": rs.iter().map(Resource::manifest).collect::<Vec<_>>()});
        assert_eq!(parse_manifest(&list.to_string()).expect("list"), rs);
        // a bad item is named inside its list; a bad stored spec names the field
        let mut bad = list.clone();
        bad["items"][1]["spec"]["bgp"]["asNumber"] = 0.into();
        let e = parse_manifest(&bad.to_string()).expect_err("bad item");
        assert!(
            e.contains("document 1 item 2") && e.contains("asNumber"),
            "{e}"
        );
        let e = from_stored("BGPPeer", "x", br#"{"peerIP":"224.0.0.5","asNumber":1}"#)
            .expect_err("multicast peer");
        assert!(e.contains("BGPPeer x") && e.contains("peerIP"), "{e}");
        assert!(from_stored("BGPPeer", "x", b"not json").is_err());
    }

    #[test]
    fn a_calico_shaped_manifest() {
        let m = r#"
apiVersion: trellis.dev/v1
kind: BGPConfiguration
metadata: {name: default}
spec:
  asNumber: 64512
  nodeToNodeMeshEnabled: false
  serviceClusterIPs: [{cidr: 10.96.0.0/12}]
  serviceLoadBalancerIPs: [{cidr: 198.51.100.7/24}]
---
apiVersion: trellis.dev/v1
kind: BGPPeer
metadata:
  name: tor-a
spec:
  peerIP: 192.0.2.1
  asNumber: 64513
  nodeSubnet: 192.0.2.0/24
  password: s3cret
---
apiVersion: trellis.dev/v1
kind: Node
metadata: {name: n1}
spec:
  bgp:
    routeReflectorClusterID: 224.0.0.1
"#;
        let rs = parse_manifest(m).expect("parses");
        assert_eq!(rs.len(), 3);
        assert_eq!(rs[0].key("/t/"), "/t/bgp/configurations/default");
        assert!(matches!(&rs[1], Resource::Peer(n, p) if n == "tor-a" && p.as_number == 64513));
        let stored: Vec<(String, Vec<u8>)> = rs.iter().map(|r| (r.key("/t/"), r.value())).collect();
        let (res, errs) = BgpResources::from_kvs(
            "/t/",
            stored.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
        );
        assert!(errs.is_empty());
        assert!(!res.config.node_to_node_mesh_enabled);
        assert_eq!(
            res.config.service_ranges(),
            vec![
                (
                    "10.96.0.0/12".parse().expect("net"),
                    ServiceAddrKind::ClusterIp
                ),
                (
                    "198.51.100.0/24".parse().expect("net"),
                    ServiceAddrKind::LoadBalancerIp
                ),
            ]
        );
        assert_eq!(res.config.graceful_restart_seconds, 120);
        assert_eq!(
            res.nodes["n1"].route_reflector_cluster_id,
            Some(Ipv4Addr::new(224, 0, 0, 1))
        );
    }

    #[test]
    fn errors_name_the_document_and_field() {
        for (m, want) in [
            ("kind: BGPPeer\nmetadata: {name: a}\nspec: {peerIP: 1.2.3.4, asNumber: 1}", "document 1: apiVersion"),
            ("apiVersion: trellis.dev/v1\nkind: Pod\nmetadata: {name: a}", "kind: \"Pod\""),
            ("apiVersion: trellis.dev/v1\nkind: BGPPeer\nmetadata: {name: a}\nspec: {peerIP: 1.2.3.4}", "asNumber"),
            ("apiVersion: trellis.dev/v1\nkind: BGPPeer\nmetadata: {name: a}\nspec: {peerIP: nope, asNumber: 1}", "spec"),
            ("apiVersion: trellis.dev/v1\nkind: BGPPeer\nmetadata: {name: a}\nspec: {peerIP: 1.2.3.4, asNumber: 1, colour: red}", "colour"),
            ("apiVersion: trellis.dev/v1\nkind: BGPConfiguration\nmetadata: {name: other}", "\"default\""),
            ("apiVersion: trellis.dev/v1\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {holdTimeSeconds: 2}", "holdTimeSeconds"),
            ("apiVersion: trellis.dev/v1\nkind: Node\nmetadata: {name: Bad_Name}", "metadata.name"),
            ("apiVersion: trellis.dev/v1\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {serviceExternalIPs: [{cidr: 10.0.0.0/8}, {cidr: 'fd00::/64'}]}", "spec.serviceExternalIPs[1].cidr"),
            ("apiVersion: trellis.dev/v1\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {serviceClusterIPs: [{cidr: 0.0.0.0/0}]}", "default route"),
            ("apiVersion: trellis.dev/v1\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {serviceClusterIPs: [{range: 10.96.0.0/12}]}", "range"),
            ("---\n", "no resources"),
            ("apiVersion: trellis.dev/v1\nkind: Node\nmetadata: {name: a}\n---\nkind: [", "document 2"),
        ] {
            let e = parse_manifest(m).expect_err(m);
            assert!(e.contains(want), "{m:?}: {e}");
        }
    }
}
