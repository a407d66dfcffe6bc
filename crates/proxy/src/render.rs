//! One Service -> its nftables objects (a [`Fragment`]): its own chains
//! and maps, and its entries in the tables' shared maps. Rendering is per
//! Service so that a change costs what the changed Service costs, whatever
//! the number of Services (kube-proxy re-lists everything per sync).
//!
//! Per Service port `ID` = `namespace/name/protocol/port`:
//! - `svc-ID`: masquerades sources outside the cluster network and puts
//!   the chain's id into the packet mark; `trellis-endpoints` then picks
//!   one of every usable endpoint (`pickers`: id -> `pick-N-PROTO`, which
//!   looks up id . `numgen random mod N` in `endpoints_PROTO`);
//! - `local-ID`: the same for this node's endpoints, for traffic policy
//!   Local (`pickers`: id -> `drop` when it has none);
//! - `ext-ID`: what node ports, external and load balancer IPs go to:
//!   masquerade then `svc-ID` (policy Cluster), or pods and the node
//!   itself to `svc-ID` and the rest to `local-ID` with its source kept
//!   (policy Local);
//! - with `sessionAffinity: ClientIP`: `aff-ID` (client -> endpoint, with
//!   the timeout), consulted in `svc-ID` before the choice; the endpoint a
//!   new client got is written by `rec-ID` after DNAT (the id in the mark
//!   says which).
//!
//! Ids are 16 bits: past 65,535 chains, a chain picks its endpoints by
//! rules of its own (`numgen random mod N-i 0 dnat ip to ENDPOINT_i`),
//! without affinity, and says so in the Service's notes.

use crate::endpoints::{for_port, PortEndpoints};
use crate::model::{NodeFacts, Service, ServiceType, Slice};
use crate::{ID_MASK, MASQ_MARK};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

/// The table's shared maps and sets a Service has entries in.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Shared {
    /// `services`: address . protocol . port -> verdict (cluster IPs,
    /// external IPs, load balancer IPs).
    Services,
    /// `nodeports`: protocol . port -> verdict, on the node's addresses.
    NodePorts,
    /// `no_endpoints`: address . protocol . port -> reject / drop.
    NoEndpoints,
    /// `no_endpoint_nodeports`: protocol . port -> reject.
    NoEndpointNodePorts,
    /// `firewall`: load balancer address . protocol . port -> source check.
    Firewall,
    /// `affinity`: affinity id (packet mark) -> the recording chain.
    Affinity,
    /// `cluster_ips`: every ClusterIP (unserved ports are refused).
    ClusterIps,
    /// `hairpin`: endpoint . endpoint, for endpoints that may be on this node
    /// (a pod reaching itself through the Service is masqueraded).
    Hairpin,
    /// `pickers` (in `trellis-endpoints`): chain id (packet mark) ->
    /// `goto pick-N-PROTO`, or `drop` (no endpoints).
    Pickers,
    /// `endpoints_tcp` / `_udp` / `_sctp` (in `trellis-endpoints`): chain
    /// id . index -> endpoint address . port.
    EndpointsTcp,
    /// See [`Shared::EndpointsTcp`].
    EndpointsUdp,
    /// See [`Shared::EndpointsTcp`].
    EndpointsSctp,
}

impl Shared {
    /// Keyed by a chain id, which one Service port holds at a time: never
    /// claimed by two Services, so kept out of the claims (at 5,000
    /// Services x 10 endpoints they were 55,000 of 60,000 claimed keys).
    pub fn owned(self) -> bool {
        matches!(
            self,
            Shared::Pickers | Shared::EndpointsTcp | Shared::EndpointsUdp | Shared::EndpointsSctp
        )
    }

    /// Every shared object, in declaration order.
    pub const ALL: [Shared; 12] = [
        Shared::Services,
        Shared::NodePorts,
        Shared::NoEndpoints,
        Shared::NoEndpointNodePorts,
        Shared::Firewall,
        Shared::Affinity,
        Shared::ClusterIps,
        Shared::Hairpin,
        Shared::Pickers,
        Shared::EndpointsTcp,
        Shared::EndpointsUdp,
        Shared::EndpointsSctp,
    ];

    /// The endpoints map of protocol `p`.
    pub fn endpoints(p: crate::model::Protocol) -> Shared {
        match p {
            crate::model::Protocol::Tcp => Shared::EndpointsTcp,
            crate::model::Protocol::Udp => Shared::EndpointsUdp,
            crate::model::Protocol::Sctp => Shared::EndpointsSctp,
        }
    }

    /// The table it is in.
    pub fn table(self) -> &'static str {
        match self {
            Shared::Pickers
            | Shared::EndpointsTcp
            | Shared::EndpointsUdp
            | Shared::EndpointsSctp => crate::PICK_TABLE,
            _ => crate::TABLE,
        }
    }

    /// Its name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Shared::Services => "services",
            Shared::NodePorts => "nodeports",
            Shared::NoEndpoints => "no_endpoints",
            Shared::NoEndpointNodePorts => "no_endpoint_nodeports",
            Shared::Firewall => "firewall",
            Shared::Affinity => "affinity",
            Shared::ClusterIps => "cluster_ips",
            Shared::Hairpin => "hairpin",
            Shared::Pickers => "pickers",
            Shared::EndpointsTcp => "endpoints_tcp",
            Shared::EndpointsUdp => "endpoints_udp",
            Shared::EndpointsSctp => "endpoints_sctp",
        }
    }

    /// Its declaration (`type ...; flags ...;`).
    pub fn decl(self) -> &'static str {
        match self {
            Shared::Services | Shared::NoEndpoints | Shared::Firewall => {
                "type ipv4_addr . inet_proto . inet_service : verdict;"
            }
            Shared::NodePorts | Shared::NoEndpointNodePorts => {
                "type inet_proto . inet_service : verdict;"
            }
            Shared::Affinity => "type mark : verdict;",
            Shared::ClusterIps => "type ipv4_addr;",
            Shared::Hairpin => "type ipv4_addr . ipv4_addr;",
            Shared::Pickers => "type mark : verdict;",
            Shared::EndpointsTcp => {
                "typeof meta mark . numgen random mod 1 : ip daddr . tcp dport;"
            }
            Shared::EndpointsUdp => {
                "typeof meta mark . numgen random mod 1 : ip daddr . udp dport;"
            }
            Shared::EndpointsSctp => {
                "typeof meta mark . numgen random mod 1 : ip daddr . sctp dport;"
            }
        }
    }

    /// Whether it is a map (elements have values).
    pub fn is_map(self) -> bool {
        !matches!(self, Shared::ClusterIps | Shared::Hairpin)
    }
}

/// A named set or map of a Service.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct SetDef {
    /// `type ...; flags ...;` (or `typeof ...`).
    pub decl: String,
    /// key -> value (`""` in a set).
    pub elements: BTreeMap<String, String>,
}

/// How one Service port is served (for `trellisctl get services`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortSummary {
    /// `namespace/name/protocol/port`.
    pub id: String,
    /// The endpoints new connections go to (policy Cluster).
    pub endpoints: Vec<SocketAddr>,
    /// This node's endpoints (policy Local).
    pub local: Vec<SocketAddr>,
    /// What a client gets when there is nobody to serve it.
    pub verdict: String,
    /// Where it is served: `ADDRESS:PORT/PROTO` and `*:NODEPORT/PROTO`.
    pub addresses: Vec<String>,
}

/// Everything one Service puts into the table.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Fragment {
    /// Its chains: name -> rules.
    pub chains: BTreeMap<String, Vec<String>>,
    /// Its sets and maps.
    pub sets: BTreeMap<String, SetDef>,
    /// Its entries in the shared maps: (map, key, value).
    pub shared: Vec<(Shared, String, String)>,
    /// Why it is not served at all (nothing else is rendered then).
    pub problems: Vec<String>,
    /// What of it is not served (the rest is).
    pub notes: Vec<String>,
    /// Per port, what it was programmed with.
    pub ports: Vec<PortSummary>,
    /// Chains that hold an id (packet mark bits [`crate::ID_MASK`]).
    pub ids: BTreeMap<String, u32>,
    /// This node's ready endpoints, each address once (the health
    /// check's count, as kube-proxy's: terminating ones do not count).
    pub local_endpoints: usize,
    /// The health-check node port to answer (`externalTrafficPolicy:
    /// Local` with addresses reached from outside).
    pub health_check: Option<u16>,
}

/// Chain ids (the high 16 bits of the packet mark): stable while a chain
/// exists, reused after it goes.
#[derive(Debug, Default, Clone)]
pub struct Ids {
    by_chain: HashMap<String, u32>,
    free: Vec<u32>,
    next: u32,
}

impl Ids {
    /// The id of `chain`, allocated on first use; `None` when all 65,535
    /// are taken.
    pub fn get(&mut self, chain: &str) -> Option<u32> {
        if let Some(id) = self.by_chain.get(chain) {
            return Some(*id);
        }
        let id = match self.free.pop() {
            Some(id) => id,
            None if self.next < 0xffff => {
                self.next += 1;
                self.next
            }
            None => return None,
        };
        self.by_chain.insert(chain.to_string(), id);
        Some(id)
    }

    /// `chain` had `id` (restored from what the kernel holds).
    pub fn restore(&mut self, chain: &str, id: u32) {
        self.by_chain.insert(chain.to_string(), id);
        self.next = self.next.max(id);
    }

    /// After [`Self::restore`]: ids below the highest that no chain has
    /// are free.
    pub fn settle(&mut self) {
        let used: std::collections::HashSet<u32> = self.by_chain.values().copied().collect();
        self.free = (1..self.next).filter(|i| !used.contains(i)).collect();
    }

    /// `chain` no longer needs its id.
    pub fn release(&mut self, chain: &str) {
        if let Some(id) = self.by_chain.remove(chain) {
            self.free.push(id);
        }
    }
}

fn v4(ips: &[IpAddr]) -> (Vec<IpAddr>, bool) {
    let four: Vec<IpAddr> = ips.iter().copied().filter(IpAddr::is_ipv4).collect();
    let skipped = four.len() != ips.len();
    (four, skipped)
}

/// Renders `svc` with its `slices` for `node`.
pub fn service(svc: &Service, slices: &[&Slice], node: &NodeFacts, ids: &mut Ids) -> Fragment {
    let mut f = Fragment::default();
    if svc.kind == ServiceType::ExternalName {
        return f;
    }
    let (cluster_ips, s1) = v4(&svc.cluster_ips);
    // a Service that is not served still owns its ClusterIPs: traffic to
    // them is refused, never routed off the node
    let refuse_all = |f: &mut Fragment| {
        for ip in &cluster_ips {
            f.shared
                .push((Shared::ClusterIps, ip.to_string(), String::new()));
        }
    };
    if !svc.problems.is_empty() {
        f.problems = svc.problems.clone();
        refuse_all(&mut f);
        return f;
    }
    let (external_ips, s2) = v4(&svc.external_ips);
    let (lb_ips, s3) = v4(&svc.lb_ips);
    if s1 || s2 || s3 {
        f.notes
            .push("IPv6 addresses are not served yet (the IPv4 ones are)".into());
    }
    // node ports outside the range this node serves: not served at all
    for (i, p) in svc.ports.iter().enumerate() {
        if let Some(np) = p.node_port {
            let (lo, hi) = node.node_port_range;
            if !(lo..=hi).contains(&np) {
                f.problems.push(format!(
                    "spec.ports[{i}].nodePort: {np} is outside the node port range {lo}-{hi} this node serves"
                ));
            }
        }
    }
    if !f.problems.is_empty() {
        refuse_all(&mut f);
        return f;
    }
    let cidr = node.cluster_cidr;
    if svc.external_local && svc.has_external() {
        f.health_check = svc.health_check_node_port;
    }
    let external = |p: &crate::model::ServicePort| {
        p.node_port.is_some() || !external_ips.is_empty() || !lb_ips.is_empty()
    };
    // the load balancer source check, one per Service
    let fw = format!("{}/{}", svc.namespace, svc.name);
    // this family's ranges, overlaps merged (an interval set refuses
    // overlapping elements)
    let v4_ranges: Vec<ipnet::IpNet> = svc
        .lb_source_ranges
        .iter()
        .filter(|r| matches!(r, ipnet::IpNet::V4(_)))
        .copied()
        .collect();
    let ranges: Vec<String> = ipnet::IpNet::aggregate(&v4_ranges)
        .iter()
        .map(ToString::to_string)
        .collect();
    let firewall = !lb_ips.is_empty() && !ranges.is_empty();
    if firewall {
        f.sets.insert(
            format!("fw-{fw}"),
            SetDef {
                decl: crate::script::FW_DECL.into(),
                elements: ranges.iter().map(|r| (r.clone(), String::new())).collect(),
            },
        );
        f.chains.insert(
            format!("fwc-{fw}"),
            vec![
                "counter".into(),
                format!("ip saddr @fw-{fw} return"),
                "drop".into(),
            ],
        );
    }
    // the health check counts this node's ready endpoints, each once
    let mut local_ready_ips = std::collections::BTreeSet::new();
    for sp in &svc.ports {
        let p = sp.protocol.as_str();
        let id = format!("{}/{}/{}/{}", svc.namespace, svc.name, p, sp.port);
        let PortEndpoints {
            cluster,
            local,
            local_ready,
            here,
        } = for_port(sp, slices, &node.name, true);
        local_ready_ips.extend(local_ready.iter().map(|e| e.ip()));
        let ext = external(sp);
        let need_local = svc.internal_local || (svc.external_local && ext);
        let served = !cluster.is_empty();
        if served {
            // a pod reaching itself through the Service is masqueraded
            // (its reply would not come back through the DNAT otherwise);
            // only endpoints that may be on this node can
            for ip in &here {
                f.shared
                    .push((Shared::Hairpin, format!("{ip} . {ip}"), String::new()));
            }
            endpoint_chain(
                &mut f,
                ids,
                ["svc", "aff", "rec"],
                &id,
                &cluster,
                sp,
                svc,
                Some(cidr),
            );
            if need_local {
                // (none here: the choice drops)
                endpoint_chain(
                    &mut f,
                    ids,
                    ["local", "laff", "lrec"],
                    &id,
                    &local,
                    sp,
                    svc,
                    None,
                );
            }
            if ext {
                let mut rules = vec!["counter".to_string()];
                rules.extend(if svc.external_local {
                    vec![
                        format!("ip saddr {cidr} goto svc-{id}"),
                        format!("fib saddr type local meta mark set meta mark | {MASQ_MARK:#x}"),
                        format!("fib saddr type local goto svc-{id}"),
                        format!("goto local-{id}"),
                    ]
                } else {
                    vec![
                        format!("meta mark set meta mark | {MASQ_MARK:#x}"),
                        format!("goto svc-{id}"),
                    ]
                });
                f.chains.insert(format!("ext-{id}"), rules);
            }
        }
        let key = |ip: &IpAddr| format!("{ip} . {p} . {}", sp.port);
        let verdict = if !served {
            "reject"
        } else if svc.internal_local && local.is_empty() {
            "drop"
        } else {
            "serve"
        };
        for ip in &cluster_ips {
            f.shared
                .push((Shared::ClusterIps, ip.to_string(), String::new()));
            match verdict {
                "reject" => f
                    .shared
                    .push((Shared::NoEndpoints, key(ip), "goto refuse".into())),
                "drop" => f.shared.push((Shared::NoEndpoints, key(ip), "drop".into())),
                _ => {
                    let target = if svc.internal_local { "local" } else { "svc" };
                    f.shared
                        .push((Shared::Services, key(ip), format!("goto {target}-{id}")));
                }
            }
        }
        for ip in external_ips.iter().chain(&lb_ips) {
            if served {
                f.shared
                    .push((Shared::Services, key(ip), format!("goto ext-{id}")));
            } else {
                f.shared
                    .push((Shared::NoEndpoints, key(ip), "goto refuse".into()));
            }
        }
        if firewall {
            for ip in &lb_ips {
                f.shared
                    .push((Shared::Firewall, key(ip), format!("goto fwc-{fw}")));
            }
        }
        if let Some(np) = sp.node_port {
            let k = format!("{p} . {np}");
            if served {
                f.shared
                    .push((Shared::NodePorts, k, format!("goto ext-{id}")));
            } else {
                f.shared
                    .push((Shared::NoEndpointNodePorts, k, "goto refuse".into()));
            }
        }
        let mut addresses: Vec<String> = cluster_ips
            .iter()
            .chain(&external_ips)
            .chain(&lb_ips)
            .map(|ip| format!("{ip}:{}/{p}", sp.port))
            .collect();
        if let Some(np) = sp.node_port {
            addresses.push(format!("*:{np}/{p}"));
        }
        f.ports.push(PortSummary {
            id,
            endpoints: cluster,
            local,
            verdict: verdict.into(),
            addresses,
        });
    }
    f.local_endpoints = local_ready_ips.len();
    f
}

/// `chain-ID` for endpoints `eps`, with the client affinity of `svc`
/// (map `aff-ID`, recorded by `rec-ID`): it puts its id into the packet
/// mark, and `trellis-endpoints` DNATs by it. Without an id (all taken),
/// its own rules pick the endpoint.
#[allow(clippy::too_many_arguments)]
fn endpoint_chain(
    f: &mut Fragment,
    ids: &mut Ids,
    [chain, aff, rec]: [&str; 3],
    id: &str,
    eps: &[SocketAddr],
    sp: &crate::model::ServicePort,
    svc: &Service,
    masquerade_outside: Option<ipnet::IpNet>,
) {
    let p = sp.protocol.as_str();
    let name = format!("{chain}-{id}");
    // new connections through this chain (`trellisctl trace svc`)
    let mut rules = vec!["counter".to_string()];
    if let Some(cidr) = masquerade_outside {
        rules.push(format!(
            "ip saddr != {cidr} meta mark set meta mark | {MASQ_MARK:#x}"
        ));
    }
    let Some(n) = ids.get(&name) else {
        f.notes.push(format!(
            "{name}: no chain id left (65,535 in use): endpoints picked by its own rules{}",
            if svc.affinity_timeout.is_some() {
                ", without client affinity"
            } else {
                ""
            }
        ));
        rules.extend(cascade(p, eps));
        f.chains.insert(name, rules);
        return;
    };
    f.ids.insert(name.clone(), n);
    let mark = format!("{:#010x}", n << 16);
    rules.push(format!(
        "meta mark set meta mark & {:#x} | {mark}",
        !ID_MASK
    ));
    if let Some(timeout) = svc.affinity_timeout {
        rules.push(format!(
            "meta l4proto {p} dnat ip to ip saddr map @{aff}-{id}"
        ));
        f.sets.insert(
            format!("{aff}-{id}"),
            SetDef {
                decl: format!(
                    "type ipv4_addr : ipv4_addr . inet_service; flags dynamic,timeout; timeout {timeout}s;"
                ),
                elements: BTreeMap::new(),
            },
        );
        f.chains.insert(
            format!("{rec}-{id}"),
            vec![
                format!("update @{aff}-{id} {{ ip saddr : ip daddr . th dport }}"),
                format!("meta mark set meta mark & {:#x}", !ID_MASK),
            ],
        );
        f.shared
            .push((Shared::Affinity, mark.clone(), format!("goto {rec}-{id}")));
    }
    // the choice, in `trellis-endpoints`: elements only
    let picker = if eps.is_empty() {
        "drop".to_string()
    } else {
        format!("goto {}", pick_chain(eps.len(), p))
    };
    f.shared.push((Shared::Pickers, mark.clone(), picker));
    let map = Shared::endpoints(sp.protocol);
    for (i, e) in eps.iter().enumerate() {
        f.shared.push((
            map,
            format!("{mark} . {i}"),
            format!("{} . {}", e.ip(), e.port()),
        ));
    }
    f.chains.insert(name, rules);
}

/// Rules that pick one of `eps` (rule i takes the connection with
/// probability 1/(N-i): each endpoint 1/N); `drop` when there are none.
fn cascade(p: &str, eps: &[SocketAddr]) -> Vec<String> {
    let n = eps.len();
    if n == 0 {
        return vec!["drop".into()];
    }
    eps.iter()
        .enumerate()
        .map(|(i, e)| {
            if i + 1 < n {
                format!(
                    "meta l4proto {p} numgen random mod {} 0 dnat ip to {e}",
                    n - i
                )
            } else {
                format!("meta l4proto {p} dnat ip to {e}")
            }
        })
        .collect()
}

/// The `trellis-endpoints` chain that picks one of `n` endpoints of
/// protocol `p`, shared by every port with as many.
pub fn pick_chain(n: usize, p: &str) -> String {
    format!("pick-{n}-{p}")
}

/// The rules of pick chain `name` (`pick-N-PROTO`).
pub fn pick_rules(name: &str) -> Option<Vec<String>> {
    let rest = name.strip_prefix("pick-")?;
    let (n, p) = rest.split_once('-')?;
    let n: u32 = n.parse().ok().filter(|n| *n > 0)?;
    if !matches!(p, "tcp" | "udp" | "sctp") {
        return None;
    }
    Some(vec![format!(
        "meta l4proto {p} dnat ip to meta mark & {ID_MASK:#x} . numgen random mod {n} map @endpoints_{p}"
    )])
}
