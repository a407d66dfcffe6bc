//! API objects -> the policy's model, checked. Nothing here panics on
//! input: a field that cannot be understood is named in the object's
//! `problems` and its part fails closed (an allow that matches nothing, a
//! deny or pass that matches everything).

use crate::model::{
    Action, ClusterPolicy, ClusterRule, Expr, NamedPort, Namespace, Namespaces, NetworkPolicy, Op,
    Peer, Pod, PortSpec, Protocol, Rule, Selector, Subject, Tier, NAME_LABEL,
};
use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::{Namespace as KNamespace, Pod as KPod};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy as KPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use std::net::Ipv4Addr;

/// The API group and version of ClusterNetworkPolicy this reads.
pub const CNP_API_VERSION: &str = "policy.networking.k8s.io/v1alpha2";
/// Its plural.
pub const CNP_PLURAL: &str = "clusternetworkpolicies";

/// `s` as a selector; `problems` gets what was not understood (and the
/// selector then matches nothing).
pub fn selector(s: &LabelSelector, at: &str, problems: &mut Vec<String>) -> Selector {
    let mut out = Selector {
        labels: s.match_labels.clone().unwrap_or_default(),
        ..Default::default()
    };
    for (i, e) in s.match_expressions.iter().flatten().enumerate() {
        let values = e.values.clone().unwrap_or_default();
        let op = match e.operator.as_str() {
            "In" => Op::In,
            "NotIn" => Op::NotIn,
            "Exists" => Op::Exists,
            "DoesNotExist" => Op::DoesNotExist,
            other => {
                problems.push(format!(
                    "{at}.matchExpressions[{i}].operator: {other:?} is not In, NotIn, Exists or DoesNotExist"
                ));
                out.nothing = true;
                continue;
            }
        };
        let needs_values = matches!(op, Op::In | Op::NotIn);
        if needs_values == values.is_empty() {
            problems.push(format!(
                "{at}.matchExpressions[{i}]: {:?} {}",
                e.operator,
                if needs_values {
                    "needs values"
                } else {
                    "takes no values"
                }
            ));
            out.nothing = true;
            continue;
        }
        out.exprs.push(Expr {
            key: e.key.clone(),
            op,
            values: values.into_iter().collect(),
        });
    }
    out
}

fn protocol(p: Option<&str>, at: &str, problems: &mut Vec<String>) -> Option<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        other => {
            problems.push(format!("{at}.protocol: {other:?} is not TCP, UDP or SCTP"));
            None
        }
    }
}

fn port_number(n: i32, at: &str, problems: &mut Vec<String>) -> Option<u16> {
    match u16::try_from(n) {
        Ok(p) if p != 0 => Some(p),
        _ => {
            problems.push(format!("{at}: {n} is not a port (1-65535)"));
            None
        }
    }
}

/// `cidr` as an IPv4 net; `Ok(None)` for an IPv6 one (it matches no IPv4
/// traffic).
fn net(cidr: &str, at: &str, problems: &mut Vec<String>) -> Result<Option<Ipv4Net>, ()> {
    match cidr.parse::<IpNet>() {
        Ok(IpNet::V4(n)) => Ok(Some(n.trunc())),
        Ok(IpNet::V6(_)) => Ok(None),
        Err(_) => {
            problems.push(format!("{at}: {cidr:?} is not a CIDR"));
            Err(())
        }
    }
}

fn np_port(p: &NetworkPolicyPort, at: &str, problems: &mut Vec<String>) -> Option<PortSpec> {
    let proto = protocol(p.protocol.as_deref(), at, problems)?;
    match (&p.port, p.end_port) {
        (None, None) => Some(PortSpec::Range {
            protocol: proto,
            from: 1,
            to: 65535,
        }),
        (None, Some(_)) => {
            problems.push(format!("{at}.endPort: needs a numeric port"));
            None
        }
        (Some(IntOrString::Int(n)), end) => {
            let from = port_number(*n, &format!("{at}.port"), problems)?;
            let to = match end {
                None => from,
                Some(e) => {
                    let to = port_number(e, &format!("{at}.endPort"), problems)?;
                    if to < from {
                        problems.push(format!("{at}.endPort: {to} is below port {from}"));
                        return None;
                    }
                    to
                }
            };
            Some(PortSpec::Range {
                protocol: proto,
                from,
                to,
            })
        }
        (Some(IntOrString::String(s)), end) => {
            if end.is_some() {
                problems.push(format!("{at}.endPort: not allowed with a named port"));
                return None;
            }
            // a number written as a string is a number
            if let Ok(n) = s.parse::<i32>() {
                let from = port_number(n, &format!("{at}.port"), problems)?;
                return Some(PortSpec::Range {
                    protocol: proto,
                    from,
                    to: from,
                });
            }
            if s.is_empty() {
                problems.push(format!("{at}.port: empty name"));
                return None;
            }
            Some(PortSpec::Named {
                name: s.clone(),
                protocol: Some(proto),
            })
        }
    }
}

fn np_peer(p: &NetworkPolicyPeer, ns: &str, at: &str, problems: &mut Vec<String>) -> Option<Peer> {
    if let Some(b) = &p.ip_block {
        if p.pod_selector.is_some() || p.namespace_selector.is_some() {
            problems.push(format!("{at}: ipBlock excludes the selectors"));
            return None;
        }
        let cidr = net(&b.cidr, &format!("{at}.ipBlock.cidr"), problems).ok()?;
        let mut except = Vec::new();
        for (i, e) in b.except.iter().flatten().enumerate() {
            let e = net(e, &format!("{at}.ipBlock.except[{i}]"), problems).ok()?;
            except.extend(e);
        }
        return Some(match cidr {
            Some(c) => Peer::Nets {
                nets: vec![c],
                except,
            },
            None => Peer::Nothing,
        });
    }
    let namespaces = match &p.namespace_selector {
        Some(s) => Namespaces::Selected(selector(s, &format!("{at}.namespaceSelector"), problems)),
        None => Namespaces::Named(ns.to_string()),
    };
    let pods = match &p.pod_selector {
        Some(s) => selector(s, &format!("{at}.podSelector"), problems),
        None if p.namespace_selector.is_some() => Selector::default(),
        None => {
            problems.push(format!("{at}: names no peer"));
            return None;
        }
    };
    Some(Peer::Pods { namespaces, pods })
}

fn np_rule(
    peers: Option<&Vec<NetworkPolicyPeer>>,
    ports: Option<&Vec<NetworkPolicyPort>>,
    ns: &str,
    at: &str,
    problems: &mut Vec<String>,
) -> Rule {
    let mut rule = Rule::default();
    let before = problems.len();
    for (i, p) in peers.into_iter().flatten().enumerate() {
        let word = if at.starts_with("ingress") {
            "from"
        } else {
            "to"
        };
        if let Some(p) = np_peer(p, ns, &format!("{at}.{word}[{i}]"), problems) {
            rule.peers.push(p);
        }
    }
    for (i, p) in ports.into_iter().flatten().enumerate() {
        if let Some(p) = np_port(p, &format!("{at}.ports[{i}]"), problems) {
            rule.ports.push(p);
        }
    }
    // a part not understood: the rule allows nothing (never more than
    // written)
    let had_peers = peers.is_some_and(|p| !p.is_empty());
    let had_ports = ports.is_some_and(|p| !p.is_empty());
    if problems.len() > before
        && ((had_peers && rule.peers.is_empty()) || (had_ports && rule.ports.is_empty()))
    {
        rule.peers = vec![Peer::Nothing];
    }
    rule
}

/// The policy's view of `p`.
pub fn network_policy(p: &KPolicy) -> NetworkPolicy {
    let ns = p
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let mut out = NetworkPolicy {
        namespace: ns.clone(),
        name: p.metadata.name.clone().unwrap_or_default(),
        ..Default::default()
    };
    let mut problems = Vec::new();
    let Some(spec) = &p.spec else {
        // a policy without spec selects every pod and isolates ingress
        out.ingress = Some(vec![]);
        return out;
    };
    out.pods = spec
        .pod_selector
        .as_ref()
        .map(|s| selector(s, "spec.podSelector", &mut problems))
        .unwrap_or_default();
    let egress_rules = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
    let (mut ing, mut eg) = (false, false);
    match &spec.policy_types {
        Some(types) if !types.is_empty() => {
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => ing = true,
                    "Egress" => eg = true,
                    other => {
                        problems.push(format!(
                            "spec.policyTypes[{i}]: {other:?} is not Ingress or Egress"
                        ));
                        // fail closed: isolate both
                        ing = true;
                        eg = true;
                    }
                }
            }
        }
        _ => {
            ing = true;
            eg = egress_rules;
        }
    }
    if ing {
        out.ingress = Some(
            spec.ingress
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, r)| {
                    np_rule(
                        r.from.as_ref(),
                        r.ports.as_ref(),
                        &ns,
                        &format!("ingress[{i}]"),
                        &mut problems,
                    )
                })
                .collect(),
        );
    }
    if eg {
        out.egress = Some(
            spec.egress
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, r)| {
                    np_rule(
                        r.to.as_ref(),
                        r.ports.as_ref(),
                        &ns,
                        &format!("egress[{i}]"),
                        &mut problems,
                    )
                })
                .collect(),
        );
    }
    out.problems = problems;
    out
}

/// The policy's view of namespace `n` (its name label added when absent).
pub fn namespace(n: &KNamespace) -> Namespace {
    let name = n.metadata.name.clone().unwrap_or_default();
    let mut labels = n.metadata.labels.clone().unwrap_or_default();
    labels
        .entry(NAME_LABEL.into())
        .or_insert_with(|| name.clone());
    Namespace { name, labels }
}

/// The policy's view of pod `p`. A pod that has ended (phase Succeeded
/// or Failed) keeps no address and no port: its addresses may belong to
/// a new pod already.
pub fn pod(p: &KPod) -> Pod {
    let ended = p
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|ph| ph == "Succeeded" || ph == "Failed");
    let spec = p.spec.as_ref();
    let mut ports = Vec::new();
    for c in spec.map(|s| s.containers.as_slice()).unwrap_or_default() {
        for cp in c.ports.iter().flatten() {
            let Some(name) = cp.name.clone() else {
                continue;
            };
            let mut ignored = Vec::new();
            let (Some(protocol), Some(port)) = (
                protocol(cp.protocol.as_deref(), "", &mut ignored),
                port_number(cp.container_port, "", &mut ignored),
            ) else {
                continue;
            };
            ports.push(NamedPort {
                name,
                protocol,
                port,
            });
        }
    }
    ports.sort();
    ports.dedup();
    if ended {
        ports.clear();
    }
    Pod {
        namespace: p
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: p.metadata.name.clone().unwrap_or_default(),
        labels: p.metadata.labels.clone().unwrap_or_default(),
        ips: p
            .status
            .as_ref()
            .filter(|_| !ended)
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| {
                ips.iter()
                    .filter_map(|i| i.ip.parse::<Ipv4Addr>().ok())
                    .collect()
            })
            .unwrap_or_default(),
        ports,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
    }
}

// ClusterNetworkPolicy v1alpha2, as its CRD (network-policy-api v0.2.0)
// defines it; unknown fields are ignored by serde and a peer or protocol
// with none of the fields known fails closed.

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct CnpObject {
    #[serde(default)]
    metadata: CnpMeta,
    spec: Option<CnpSpec>,
}

#[derive(Deserialize, Default)]
struct CnpMeta {
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CnpSpec {
    tier: String,
    priority: i64,
    subject: CnpSubject,
    #[serde(default)]
    ingress: Vec<CnpRule>,
    #[serde(default)]
    egress: Vec<CnpRule>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct CnpSubject {
    namespaces: Option<LabelSelector>,
    pods: Option<CnpPods>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(rename_all = "camelCase")]
struct CnpPods {
    namespace_selector: Option<LabelSelector>,
    pod_selector: Option<LabelSelector>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CnpRule {
    #[serde(default)]
    name: String,
    action: String,
    #[serde(default, alias = "to")]
    from: Vec<CnpPeer>,
    protocols: Option<Vec<CnpProtocol>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct CnpPeer {
    namespaces: Option<LabelSelector>,
    pods: Option<CnpPods>,
    networks: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct CnpProtocol {
    tcp: Option<CnpPorts>,
    udp: Option<CnpPorts>,
    sctp: Option<CnpPorts>,
    destination_named_port: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct CnpPorts {
    destination_port: Option<CnpPort>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct CnpPort {
    number: Option<i32>,
    range: Option<CnpRange>,
}

#[derive(Deserialize, Default)]
struct CnpRange {
    start: i32,
    end: i32,
}

fn cnp_pods(p: &CnpPods, at: &str, problems: &mut Vec<String>) -> (Selector, Selector) {
    let ns = p
        .namespace_selector
        .as_ref()
        .map(|s| selector(s, &format!("{at}.namespaceSelector"), problems))
        .unwrap_or_default();
    let pods = match &p.pod_selector {
        Some(s) => selector(s, &format!("{at}.podSelector"), problems),
        None => {
            problems.push(format!("{at}.podSelector: required"));
            Selector {
                nothing: true,
                ..Default::default()
            }
        }
    };
    (ns, pods)
}

fn cnp_peer(p: &CnpPeer, at: &str, problems: &mut Vec<String>) -> Option<Peer> {
    let set = [
        p.namespaces.is_some(),
        p.pods.is_some(),
        p.networks.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if set != 1 {
        problems.push(format!(
            "{at}: needs exactly one of namespaces, pods, networks (a field this version does not know?)"
        ));
        return None;
    }
    if let Some(s) = &p.namespaces {
        return Some(Peer::Pods {
            namespaces: Namespaces::Selected(selector(s, &format!("{at}.namespaces"), problems)),
            pods: Selector::default(),
        });
    }
    if let Some(pp) = &p.pods {
        let (ns, pods) = cnp_pods(pp, &format!("{at}.pods"), problems);
        return Some(Peer::Pods {
            namespaces: Namespaces::Selected(ns),
            pods,
        });
    }
    let mut nets = Vec::new();
    for (i, n) in p.networks.iter().flatten().enumerate() {
        nets.extend(net(n, &format!("{at}.networks[{i}]"), problems).ok()?);
    }
    Some(Peer::Nets {
        nets,
        except: vec![],
    })
}

fn cnp_ports(ps: &[CnpProtocol], at: &str, problems: &mut Vec<String>) -> Option<Vec<PortSpec>> {
    let mut out = Vec::new();
    for (i, p) in ps.iter().enumerate() {
        let at = format!("{at}.protocols[{i}]");
        let mut found = 0;
        for (proto, ports) in [
            (Protocol::Tcp, &p.tcp),
            (Protocol::Udp, &p.udp),
            (Protocol::Sctp, &p.sctp),
        ] {
            let Some(ports) = ports else { continue };
            found += 1;
            let at = format!("{at}.{}", proto.nft());
            let Some(d) = &ports.destination_port else {
                problems.push(format!("{at}.destinationPort: required"));
                return None;
            };
            let (from, to) = match (d.number, &d.range) {
                (Some(n), None) => {
                    let n = port_number(n, &format!("{at}.destinationPort.number"), problems)?;
                    (n, n)
                }
                (None, Some(r)) => {
                    let s = port_number(
                        r.start,
                        &format!("{at}.destinationPort.range.start"),
                        problems,
                    )?;
                    let e =
                        port_number(r.end, &format!("{at}.destinationPort.range.end"), problems)?;
                    if s > e {
                        problems.push(format!(
                            "{at}.destinationPort.range: start {s} is above end {e}"
                        ));
                        return None;
                    }
                    (s, e)
                }
                _ => {
                    problems.push(format!(
                        "{at}.destinationPort: needs exactly one of number, range"
                    ));
                    return None;
                }
            };
            out.push(PortSpec::Range {
                protocol: proto,
                from,
                to,
            });
        }
        if let Some(n) = &p.destination_named_port {
            found += 1;
            out.push(PortSpec::Named {
                name: n.clone(),
                protocol: None,
            });
        }
        if found != 1 {
            problems.push(format!(
                "{at}: needs exactly one of tcp, udp, sctp, destinationNamedPort"
            ));
            return None;
        }
    }
    Some(out)
}

fn cnp_rule(r: &CnpRule, at: &str, problems: &mut Vec<String>) -> ClusterRule {
    let before = problems.len();
    let action = match r.action.as_str() {
        "Accept" => Action::Accept,
        "Deny" => Action::Deny,
        "Pass" => Action::Pass,
        other => {
            problems.push(format!(
                "{at}.action: {other:?} is not Accept, Deny or Pass"
            ));
            Action::Deny
        }
    };
    let word = if at.starts_with("ingress") {
        "from"
    } else {
        "to"
    };
    let mut peers = Vec::new();
    let mut bad_peer = r.from.is_empty();
    if r.from.is_empty() {
        problems.push(format!("{at}.{word}: at least one peer is required"));
    }
    for (i, p) in r.from.iter().enumerate() {
        match cnp_peer(p, &format!("{at}.{word}[{i}]"), problems) {
            Some(p) => peers.push(p),
            None => bad_peer = true,
        }
    }
    let ports = match &r.protocols {
        None => Some(vec![]),
        Some(ps) => cnp_ports(ps, at, problems),
    };
    let failed = bad_peer || ports.is_none() || problems.len() > before;
    let everything = || Peer::Nets {
        nets: vec![Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).expect("/0 is a prefix")],
        except: vec![],
    };
    if failed {
        // fail closed: an Accept matches nothing, a Deny or Pass everything
        let (peers, ports) = match action {
            Action::Accept => (vec![Peer::Nothing], vec![]),
            _ => (vec![everything()], vec![]),
        };
        let action = if action == Action::Pass {
            Action::Deny
        } else {
            action
        };
        return ClusterRule {
            name: r.name.clone(),
            action,
            peers,
            ports,
        };
    }
    ClusterRule {
        name: r.name.clone(),
        action,
        peers,
        ports: ports.unwrap_or_default(),
    }
}

/// The policy's view of a ClusterNetworkPolicy given as the API's JSON;
/// `Err` names what makes it unusable as a whole (it is then not applied,
/// and the caller reports it).
pub fn cluster_policy(v: &serde_json::Value) -> Result<ClusterPolicy, String> {
    let o: CnpObject = serde_json::from_value(v.clone()).map_err(|e| format!("spec: {e}"))?;
    let name = o.metadata.name;
    let spec = o.spec.ok_or_else(|| format!("{name}: spec: missing"))?;
    let mut problems = Vec::new();
    let tier = match spec.tier.as_str() {
        "Admin" => Tier::Admin,
        "Baseline" => Tier::Baseline,
        other => {
            return Err(format!(
                "{name}: spec.tier: {other:?} is not Admin or Baseline"
            ))
        }
    };
    if !(0..=1000).contains(&spec.priority) {
        return Err(format!(
            "{name}: spec.priority: {} is not in 0-1000",
            spec.priority
        ));
    }
    let subject = match (&spec.subject.namespaces, &spec.subject.pods) {
        (Some(s), None) => {
            Subject::Namespaces(selector(s, "spec.subject.namespaces", &mut problems))
        }
        (None, Some(p)) => {
            let (namespaces, pods) = cnp_pods(p, "spec.subject.pods", &mut problems);
            Subject::Pods { namespaces, pods }
        }
        _ => {
            return Err(format!(
                "{name}: spec.subject: needs exactly one of namespaces, pods"
            ))
        }
    };
    let ingress = spec
        .ingress
        .iter()
        .enumerate()
        .map(|(i, r)| cnp_rule(r, &format!("ingress[{i}]"), &mut problems))
        .collect();
    let egress = spec
        .egress
        .iter()
        .enumerate()
        .map(|(i, r)| cnp_rule(r, &format!("egress[{i}]"), &mut problems))
        .collect();
    Ok(ClusterPolicy {
        name,
        tier,
        priority: spec.priority as u32,
        subject,
        ingress,
        egress,
        problems,
    })
}

#[cfg(test)]
mod tests;
