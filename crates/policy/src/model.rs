//! The policy's view of the API objects: pods, namespaces, NetworkPolicies
//! and ClusterNetworkPolicies, already checked ([`crate::k8s`] builds them;
//! what could not be understood is in `problems` and fails closed).

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// The label every namespace carries with its own name.
pub const NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A transport protocol with ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    /// TCP
    Tcp,
    /// UDP
    Udp,
    /// SCTP
    Sctp,
}

impl Protocol {
    /// nft's name.
    pub fn nft(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// From an IP protocol number.
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            132 => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// All of them.
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];
}

/// One `matchExpressions` operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Op {
    /// the label's value is one of the values
    In,
    /// the label is absent or its value none of the values
    NotIn,
    /// the label is present
    Exists,
    /// the label is absent
    DoesNotExist,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Expr {
    /// The label key.
    pub key: String,
    /// The operator.
    pub op: Op,
    /// The values (In, NotIn).
    pub values: BTreeSet<String>,
}

/// A label selector; the empty one selects everything. One that matches
/// nothing (`nothing`) stands for a selector that could not be understood.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Selector {
    /// `matchLabels`.
    pub labels: BTreeMap<String, String>,
    /// `matchExpressions`.
    pub exprs: Vec<Expr>,
    /// Matches nothing (set for a selector that was not understood).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nothing: bool,
}

impl Selector {
    /// Whether `labels` are selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        if self.nothing {
            return false;
        }
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.exprs.iter().all(|e| {
                let v = labels.get(&e.key);
                match e.op {
                    Op::In => v.is_some_and(|v| e.values.contains(v)),
                    Op::NotIn => v.is_none_or(|v| !e.values.contains(v)),
                    Op::Exists => v.is_some(),
                    Op::DoesNotExist => v.is_none(),
                }
            })
    }

    /// Selects everything.
    pub fn is_everything(&self) -> bool {
        !self.nothing && self.labels.is_empty() && self.exprs.is_empty()
    }

    /// A short text for messages and keys (`a=b,k in (x,y),!c`; `{}` for
    /// everything).
    pub fn text(&self) -> String {
        if self.nothing {
            return "<nothing>".into();
        }
        let mut parts: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let mut exprs = self.exprs.clone();
        exprs.sort();
        for e in exprs {
            let vals = e.values.iter().cloned().collect::<Vec<_>>().join(",");
            parts.push(match e.op {
                Op::In => format!("{} in ({vals})", e.key),
                Op::NotIn => format!("{} notin ({vals})", e.key),
                Op::Exists => e.key.clone(),
                Op::DoesNotExist => format!("!{}", e.key),
            });
        }
        if parts.is_empty() {
            "{}".into()
        } else {
            parts.join(",")
        }
    }
}

/// A named container port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NamedPort {
    /// Its name.
    pub name: String,
    /// Its protocol.
    pub protocol: Protocol,
    /// Its number.
    pub port: u16,
}

/// A pod as policy sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Its IPv4 addresses (`status.podIPs`).
    pub ips: Vec<Ipv4Addr>,
    /// Named container ports.
    pub ports: Vec<NamedPort>,
    /// On the host's network: never a subject, never a pod peer.
    pub host_network: bool,
}

impl Pod {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A namespace's labels (with [`NAME_LABEL`] always set).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// Which namespaces a pod peer is looked for in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Namespaces {
    /// This one (a NetworkPolicy's own namespace).
    Named(String),
    /// Those whose labels are selected.
    Selected(Selector),
}

/// One peer of a rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Peer {
    /// The pods of `pods` in `namespaces`.
    Pods {
        /// Where.
        namespaces: Namespaces,
        /// Which.
        pods: Selector,
    },
    /// Addresses: every net of `nets` less every one of `except`.
    Nets {
        /// Included.
        nets: Vec<Ipv4Net>,
        /// Taken out.
        except: Vec<Ipv4Net>,
    },
    /// Nothing (a peer that could not be understood, in an Accept rule).
    Nothing,
}

/// Which ports of a rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PortSpec {
    /// Ports `from..=to` of `protocol` (`1..=65535`: all of them).
    Range {
        /// The protocol.
        protocol: Protocol,
        /// First port.
        from: u16,
        /// Last port.
        to: u16,
    },
    /// The container port called `name` of the destination pod, of
    /// `protocol` (any protocol when `None`).
    Named {
        /// The name.
        name: String,
        /// The protocol.
        protocol: Option<Protocol>,
    },
}

/// One rule of a NetworkPolicy: peers OR-ed (none: every source or
/// destination), ports OR-ed (none: all traffic).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Peers.
    pub peers: Vec<Peer>,
    /// Ports.
    pub ports: Vec<PortSpec>,
}

/// A `networking.k8s.io/v1` NetworkPolicy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPolicy {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The pods of its namespace it applies to.
    pub pods: Selector,
    /// Ingress rules when it isolates ingress (`Some(vec![])`: deny all).
    pub ingress: Option<Vec<Rule>>,
    /// Egress rules when it isolates egress.
    pub egress: Option<Vec<Rule>>,
    /// What could not be understood (the policy then allows nothing of
    /// what those parts would have allowed).
    pub problems: Vec<String>,
}

impl NetworkPolicy {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A ClusterNetworkPolicy tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Tier {
    /// Before NetworkPolicies.
    Admin,
    /// After them.
    Baseline,
}

/// A ClusterNetworkPolicy rule's action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Action {
    /// Allowed (in this direction).
    Accept,
    /// Dropped.
    Deny,
    /// Decided by the next tier.
    Pass,
}

/// Which pods a ClusterNetworkPolicy applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Subject {
    /// Every pod of the selected namespaces.
    Namespaces(Selector),
    /// The selected pods of the selected namespaces.
    Pods {
        /// Namespaces.
        namespaces: Selector,
        /// Pods.
        pods: Selector,
    },
}

/// One ClusterNetworkPolicy rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRule {
    /// Its name (may be empty).
    pub name: String,
    /// What a match does.
    pub action: Action,
    /// Peers (at least one).
    pub peers: Vec<Peer>,
    /// Ports (none: all traffic).
    pub ports: Vec<PortSpec>,
}

/// A `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterPolicy {
    /// Name.
    pub name: String,
    /// Tier.
    pub tier: Tier,
    /// Priority (0-1000, lower first).
    pub priority: u32,
    /// Subject.
    pub subject: Subject,
    /// Ingress rules, in order.
    pub ingress: Vec<ClusterRule>,
    /// Egress rules, in order.
    pub egress: Vec<ClusterRule>,
    /// What could not be understood.
    pub problems: Vec<String>,
}

/// A traffic direction as seen from the policed pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Direction {
    /// To the pod.
    Ingress,
    /// From the pod.
    Egress,
}

impl Direction {
    /// Both.
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    /// `in` / `out`, as in chain names.
    pub fn short(self) -> &'static str {
        match self {
            Direction::Ingress => "in",
            Direction::Egress => "out",
        }
    }
}

/// Everything the policy is computed from.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// Pods by `namespace/name`.
    pub pods: BTreeMap<String, Pod>,
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// NetworkPolicies by `namespace/name`.
    pub policies: BTreeMap<String, NetworkPolicy>,
    /// ClusterNetworkPolicies by name.
    pub cluster: BTreeMap<String, ClusterPolicy>,
}

impl Inputs {
    /// The labels of namespace `ns` (only its name label when unknown).
    pub fn ns_labels(&self, ns: &str) -> BTreeMap<String, String> {
        self.namespaces
            .get(ns)
            .map(|n| n.labels.clone())
            .unwrap_or_else(|| BTreeMap::from([(NAME_LABEL.to_string(), ns.to_string())]))
    }

    /// Whether pod `p` is in `n`.
    pub fn in_namespaces(&self, p: &Pod, n: &Namespaces) -> bool {
        match n {
            Namespaces::Named(ns) => &p.namespace == ns,
            Namespaces::Selected(s) => s.matches(&self.ns_labels(&p.namespace)),
        }
    }

    /// Whether pod `p` is a subject of `c`.
    pub fn subject_of(&self, p: &Pod, c: &ClusterPolicy) -> bool {
        if p.host_network {
            return false;
        }
        match &c.subject {
            Subject::Namespaces(s) => s.matches(&self.ns_labels(&p.namespace)),
            Subject::Pods { namespaces, pods } => {
                namespaces.matches(&self.ns_labels(&p.namespace)) && pods.matches(&p.labels)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors_as_the_api_documents_them() {
        let e = |key: &str, op, vals: &[&str]| Expr {
            key: key.into(),
            op,
            values: vals.iter().map(|s| s.to_string()).collect(),
        };
        let everything = Selector::default();
        assert!(everything.matches(&l(&[])));
        let s = Selector {
            labels: l(&[("pod", "a")]),
            exprs: vec![e("tier", Op::NotIn, &["db"])],
            nothing: false,
        };
        assert!(s.matches(&l(&[("pod", "a")])));
        assert!(s.matches(&l(&[("pod", "a"), ("tier", "web")])));
        assert!(!s.matches(&l(&[("pod", "a"), ("tier", "db")])));
        assert!(!s.matches(&l(&[("pod", "b")])));
        let ex = Selector {
            exprs: vec![e("k", Op::Exists, &[]), e("j", Op::DoesNotExist, &[])],
            ..Default::default()
        };
        assert!(ex.matches(&l(&[("k", "")])));
        assert!(!ex.matches(&l(&[("k", ""), ("j", "x")])));
        let inn = Selector {
            exprs: vec![e("ns", Op::In, &["x", "y"])],
            ..Default::default()
        };
        assert!(inn.matches(&l(&[("ns", "y")])));
        assert!(!inn.matches(&l(&[])));
        assert_eq!(inn.text(), "ns in (x,y)");
        let none = Selector {
            nothing: true,
            ..Default::default()
        };
        assert!(!none.matches(&l(&[])));
    }
}
