//! Policies -> what this node's table holds: per local pod and direction
//! a profile chain (the pods with the same policies share it), a chain
//! per NetworkPolicy and direction, the named sets their rules match, and
//! the dispatch maps from a local pod's address to its profile. Chains are
//! named by their content, sets by what defines them: a policy change
//! makes new chains and repoints map elements, a pod change moves set
//! elements.
//!
//! Order per direction, as the API documents it: the Admin tier
//! (ClusterNetworkPolicies by priority, then name; rules in order; the
//! first match decides, Pass skips to the next tier), then the
//! NetworkPolicies (the pod isolated by any of them: the union of their
//! rules allows, everything else is dropped; Baseline never consulted),
//! then the Baseline tier (Accept and Pass allow, Deny drops), then allow.

use crate::model::{
    Action, ClusterPolicy, ClusterRule, Direction, Inputs, Namespace, NetworkPolicy, Peer, Pod,
    PortSpec, Protocol, Rule, Tier,
};
use crate::sets::{hash, port_ranges, ranges, Set};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

/// What a rule does when it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed in this direction.
    Accept,
    /// Dropped.
    Drop,
    /// On in that chain, not back.
    Goto(String),
    /// That chain, then back here unless it decided.
    Jump(String),
    /// Logged (rate-limited), then on to the next rule: the drop with the
    /// same match that follows (see [`crate::log`]).
    Log(crate::log::LogDenied),
}

/// Which policy a rule comes from (for traces, counters and logs).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Origin {
    /// `Admin`, `NetworkPolicy` or `Baseline`.
    pub tier: &'static str,
    /// The policy (`namespace/name`, a ClusterNetworkPolicy's name, or
    /// for the drop of an isolated pod the policies isolating it).
    pub policy: String,
    /// The rule's index in its direction (none: the drop at the end).
    pub rule: Option<usize>,
}

/// One rule of a chain: every match present must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleDef {
    /// A set of the other end's address (source on ingress, destination
    /// on egress).
    pub peer: Option<String>,
    /// A set of protocol . destination port.
    pub ports: Option<String>,
    /// A set of destination address . protocol . destination port.
    pub named: Option<String>,
    /// What a match does.
    pub verdict: Verdict,
    /// Where it comes from.
    pub origin: Origin,
}

/// This node's policy, as the kernel should hold it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Named sets.
    pub sets: BTreeMap<String, Set>,
    /// Chains and their rules (direction of each in its name's prefix).
    pub chains: BTreeMap<String, (Direction, Vec<RuleDef>)>,
    /// Local pod address -> its ingress profile chain.
    pub ingress: BTreeMap<Ipv4Addr, String>,
    /// Local pod address -> its egress profile chain.
    pub egress: BTreeMap<Ipv4Addr, String>,
}

impl Desired {
    /// The dispatch map of `d`.
    pub fn dispatch(&self, d: Direction) -> &BTreeMap<Ipv4Addr, String> {
        match d {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// Every local pod with a policy in some direction.
    pub fn policed(&self) -> BTreeSet<Ipv4Addr> {
        self.ingress
            .keys()
            .chain(self.egress.keys())
            .copied()
            .collect()
    }
}

/// The policy state of one node: its inputs, which pods are local, and
/// the members of the peer sets in use (kept up to date as pods and
/// namespaces change, so a change costs what it touches).
#[derive(Debug, Default)]
pub struct Engine {
    inputs: Inputs,
    /// local pod address -> pod key
    local: BTreeMap<Ipv4Addr, String>,
    /// pod key -> its local addresses
    local_by_key: BTreeMap<String, BTreeSet<Ipv4Addr>>,
    /// members of pod peers in use
    members: HashMap<Peer, BTreeSet<String>>,
    /// denied packets logged
    log: Option<crate::log::LogDenied>,
}

impl Engine {
    /// Denied packets are logged (`Some`) or not, from the next
    /// [`Engine::desired`] on.
    pub fn set_log(&mut self, log: Option<crate::log::LogDenied>) {
        self.log = log;
    }

    /// Whether and how denied packets are logged.
    pub fn log(&self) -> Option<crate::log::LogDenied> {
        self.log
    }

    /// The inputs.
    pub fn inputs(&self) -> &Inputs {
        &self.inputs
    }

    /// A pod came, changed (`Some`) or went.
    pub fn set_pod(&mut self, key: &str, pod: Option<Pod>) {
        match pod {
            Some(p) => {
                for (peer, m) in self.members.iter_mut() {
                    if member(&self.inputs, peer, &p) {
                        m.insert(key.to_string());
                    } else {
                        m.remove(key);
                    }
                }
                self.inputs.pods.insert(key.to_string(), p);
            }
            None => {
                for m in self.members.values_mut() {
                    m.remove(key);
                }
                self.inputs.pods.remove(key);
            }
        }
    }

    /// A namespace came, changed or went.
    pub fn set_namespace(&mut self, name: &str, ns: Option<Namespace>) {
        match ns {
            Some(n) => self.inputs.namespaces.insert(name.to_string(), n),
            None => self.inputs.namespaces.remove(name),
        };
        let keys: Vec<String> = self
            .inputs
            .pods
            .iter()
            .filter(|(_, p)| p.namespace == name)
            .map(|(k, _)| k.clone())
            .collect();
        for (peer, m) in self.members.iter_mut() {
            for k in &keys {
                if member(&self.inputs, peer, &self.inputs.pods[k]) {
                    m.insert(k.clone());
                } else {
                    m.remove(k);
                }
            }
        }
    }

    /// A NetworkPolicy came, changed or went.
    pub fn set_policy(&mut self, key: &str, p: Option<NetworkPolicy>) {
        match p {
            Some(p) => self.inputs.policies.insert(key.to_string(), p),
            None => self.inputs.policies.remove(key),
        };
    }

    /// A ClusterNetworkPolicy came, changed or went.
    pub fn set_cluster(&mut self, name: &str, p: Option<ClusterPolicy>) {
        match p {
            Some(p) => self.inputs.cluster.insert(name.to_string(), p),
            None => self.inputs.cluster.remove(name),
        };
    }

    /// Local address `ip` belongs to pod `key` (`None`: released).
    pub fn set_local(&mut self, ip: Ipv4Addr, key: Option<String>) {
        if let Some(old) = self.local.remove(&ip) {
            if let Some(s) = self.local_by_key.get_mut(&old) {
                s.remove(&ip);
                if s.is_empty() {
                    self.local_by_key.remove(&old);
                }
            }
        }
        if let Some(k) = key {
            self.local_by_key.entry(k.clone()).or_default().insert(ip);
            self.local.insert(ip, k);
        }
    }

    /// The local pods: address -> pod key.
    pub fn local(&self) -> &BTreeMap<Ipv4Addr, String> {
        &self.local
    }

    /// Addresses of pod `key`: what the API says and what this node gave.
    fn addrs(&self, key: &str) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.inputs
            .pods
            .get(key)
            .map(|p| p.ips.as_slice())
            .unwrap_or_default()
            .iter()
            .copied()
            .chain(self.local_by_key.get(key).into_iter().flatten().copied())
    }

    fn peer_members(&mut self, peer: &Peer) -> &BTreeSet<String> {
        if !self.members.contains_key(peer) {
            let m = self
                .inputs
                .pods
                .iter()
                .filter(|(_, p)| member(&self.inputs, peer, p))
                .map(|(k, _)| k.clone())
                .collect();
            self.members.insert(peer.clone(), m);
        }
        &self.members[peer]
    }

    /// What the kernel should hold now. Peer caches of peers no longer in
    /// use are dropped.
    pub fn desired(&mut self) -> Desired {
        let mut b = Builder {
            log: self.log,
            ..Default::default()
        };
        let local: Vec<(Ipv4Addr, String)> =
            self.local.iter().map(|(a, k)| (*a, k.clone())).collect();
        for (ip, key) in local {
            let Some(pod) = self.inputs.pods.get(&key).cloned() else {
                // not (yet, or no longer) in the API: nothing in or out
                // until it is known
                let chain = b.chain(
                    "unknown",
                    Direction::Ingress,
                    vec![end(
                        Verdict::Drop,
                        "unknown",
                        &format!("pod {key} is not in the API"),
                    )],
                );
                b.out.ingress.insert(ip, chain.clone());
                b.out.egress.insert(ip, chain);
                continue;
            };
            if pod.host_network {
                continue;
            }
            for d in Direction::BOTH {
                if let Some(chain) = self.profile(&pod, d, &mut b) {
                    match d {
                        Direction::Ingress => b.out.ingress.insert(ip, chain),
                        Direction::Egress => b.out.egress.insert(ip, chain),
                    };
                }
            }
        }
        // the sets the rules named
        for (name, def) in std::mem::take(&mut b.wanted) {
            let set = match def {
                SetDef::Pods(peer) => {
                    let keys: Vec<String> = self.peer_members(&peer).iter().cloned().collect();
                    Set::Pods(keys.iter().flat_map(|k| self.addrs(k)).collect())
                }
                SetDef::Nets(s) | SetDef::Ports(s) => s,
                SetDef::Named(name_, proto) => {
                    let mut tuples = BTreeSet::new();
                    for (k, p) in &self.inputs.pods {
                        if p.host_network {
                            continue;
                        }
                        for np in &p.ports {
                            if np.name == name_ && proto.is_none_or(|x| x == np.protocol) {
                                for a in self.addrs(k) {
                                    tuples.insert((a, np.protocol, np.port));
                                }
                            }
                        }
                    }
                    Set::Named(tuples)
                }
            };
            b.out.sets.insert(name, set);
        }
        let used: BTreeSet<Peer> = b.used_peers;
        self.members.retain(|p, _| used.contains(p));
        b.out
    }

    /// The profile chain of `pod` in `d` (built into `b`), if any policy
    /// applies to it in `d`.
    fn profile(&self, pod: &Pod, d: Direction, b: &mut Builder) -> Option<String> {
        let tier = |t: Tier| -> Vec<&ClusterPolicy> {
            let mut v: Vec<&ClusterPolicy> = self
                .inputs
                .cluster
                .values()
                .filter(|c| c.tier == t && !rules_of(c, d).is_empty())
                .filter(|c| self.inputs.subject_of(pod, c))
                .collect();
            v.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
            v
        };
        let admin = tier(Tier::Admin);
        let baseline = tier(Tier::Baseline);
        let nps: Vec<&NetworkPolicy> = self
            .inputs
            .policies
            .values()
            .filter(|p| p.namespace == pod.namespace && p.pods.matches(&pod.labels))
            .filter(|p| np_rules(p, d).is_some())
            .collect();
        if admin.is_empty() && nps.is_empty() && baseline.is_empty() {
            return None;
        }
        // the tail: NetworkPolicies, or when none isolates, the Baseline
        let mut tail: Vec<RuleDef> = Vec::new();
        if nps.is_empty() {
            for c in &baseline {
                for (i, r) in rules_of(c, d).iter().enumerate() {
                    let v = match r.action {
                        Action::Deny => Verdict::Drop,
                        Action::Accept | Action::Pass => Verdict::Accept,
                    };
                    b.cluster_rule(r, v, origin("Baseline", &c.name, i), &mut tail);
                }
            }
            tail.push(end(Verdict::Accept, "default", "no policy isolates it"));
        } else {
            for p in &nps {
                let chain = b.np_chain(p, d);
                if let Some(c) = chain {
                    tail.push(RuleDef {
                        peer: None,
                        ports: None,
                        named: None,
                        verdict: Verdict::Jump(c),
                        origin: origin("NetworkPolicy", &p.key(), 0),
                    });
                }
            }
            let names: Vec<String> = nps.iter().map(|p| p.key()).collect();
            tail.push(end(Verdict::Drop, "NetworkPolicy", &names.join(",")));
        }
        let passes = admin
            .iter()
            .any(|c| rules_of(c, d).iter().any(|r| r.action == Action::Pass));
        let mut rules: Vec<RuleDef> = Vec::new();
        let tail_chain = if passes {
            Some(b.chain(&format!("{}t", d.short()), d, tail.clone()))
        } else {
            None
        };
        for c in &admin {
            for (i, r) in rules_of(c, d).iter().enumerate() {
                let v = match r.action {
                    Action::Accept => Verdict::Accept,
                    Action::Deny => Verdict::Drop,
                    Action::Pass => Verdict::Goto(tail_chain.clone().unwrap_or_default()),
                };
                b.cluster_rule(r, v, origin("Admin", &c.name, i), &mut rules);
            }
        }
        match tail_chain {
            Some(t) => rules.push(RuleDef {
                peer: None,
                ports: None,
                named: None,
                verdict: Verdict::Goto(t),
                origin: origin("Admin", "", 0),
            }),
            None => rules.extend(tail),
        }
        Some(b.chain(d.short(), d, rules))
    }
}

fn origin(tier: &'static str, policy: &str, rule: usize) -> Origin {
    Origin {
        tier,
        policy: policy.to_string(),
        rule: Some(rule),
    }
}

fn end(v: Verdict, tier: &'static str, policy: &str) -> RuleDef {
    RuleDef {
        peer: None,
        ports: None,
        named: None,
        verdict: v,
        origin: Origin {
            tier,
            policy: policy.to_string(),
            rule: None,
        },
    }
}

fn rules_of(c: &ClusterPolicy, d: Direction) -> &[ClusterRule] {
    match d {
        Direction::Ingress => &c.ingress,
        Direction::Egress => &c.egress,
    }
}

fn np_rules(p: &NetworkPolicy, d: Direction) -> Option<&Vec<Rule>> {
    match d {
        Direction::Ingress => p.ingress.as_ref(),
        Direction::Egress => p.egress.as_ref(),
    }
}

/// Whether pod `p` is one of `peer`'s pods.
fn member(inputs: &Inputs, peer: &Peer, p: &Pod) -> bool {
    match peer {
        Peer::Pods { namespaces, pods } => {
            !p.host_network && inputs.in_namespaces(p, namespaces) && pods.matches(&p.labels)
        }
        _ => false,
    }
}

/// How a set is filled.
enum SetDef {
    Pods(Peer),
    Nets(Set),
    Ports(Set),
    Named(String, Option<Protocol>),
}

#[derive(Default)]
struct Builder {
    out: Desired,
    wanted: BTreeMap<String, SetDef>,
    used_peers: BTreeSet<Peer>,
    /// NetworkPolicy chains already built: (policy, direction) -> name
    np: HashMap<(String, Direction), Option<String>>,
    /// each drop is preceded by a log rule with the same match
    log: Option<crate::log::LogDenied>,
}

impl Builder {
    /// Adds chain `rules` named `prefix-HASH(content)`, where the content
    /// includes where each rule comes from (equal rules of two policies
    /// keep their own chains, counters and traces); returns its name.
    fn chain(&mut self, prefix: &str, d: Direction, mut rules: Vec<RuleDef>) -> String {
        if let Some(log) = self.log {
            rules = rules
                .into_iter()
                .flat_map(|r| {
                    let logged = (r.verdict == Verdict::Drop).then(|| RuleDef {
                        verdict: Verdict::Log(log),
                        ..r.clone()
                    });
                    logged.into_iter().chain([r])
                })
                .collect();
        }
        let text: Vec<String> = rules
            .iter()
            .map(|r| format!("{} {:?}", crate::render::rule(r, d), r.origin))
            .collect();
        let name = format!("{prefix}-{}", hash(&text.join("\n")));
        self.out.chains.entry(name.clone()).or_insert((d, rules));
        name
    }

    /// The chain of NetworkPolicy `p`'s rules in `d` (none when it has no
    /// rule that can match: it allows nothing).
    fn np_chain(&mut self, p: &NetworkPolicy, d: Direction) -> Option<String> {
        let k = (p.key(), d);
        if let Some(c) = self.np.get(&k) {
            return c.clone();
        }
        let mut rules = Vec::new();
        for (i, r) in np_rules(p, d).into_iter().flatten().enumerate() {
            let o = origin("NetworkPolicy", &p.key(), i);
            self.rule(&r.peers, &r.ports, Verdict::Accept, o, true, &mut rules);
        }
        let name = if rules.is_empty() {
            None
        } else {
            // the policy's name is part of the content: two equal policies
            // keep their own counters
            let text: Vec<String> = rules.iter().map(|r| crate::render::rule(r, d)).collect();
            let name = format!("np-{}", hash(&format!("{}\n{}", p.key(), text.join("\n"))));
            self.out.chains.entry(name.clone()).or_insert((d, rules));
            Some(name)
        };
        self.np.insert(k, name.clone());
        name
    }

    fn cluster_rule(&mut self, r: &ClusterRule, v: Verdict, o: Origin, out: &mut Vec<RuleDef>) {
        self.rule(&r.peers, &r.ports, v, o, false, out);
    }

    /// The rules of one policy rule: one per peer (or one without a peer
    /// match when `any_peer_if_none` and there are none) and per port
    /// kind (numbers in one set, each named port in its own).
    #[allow(clippy::too_many_arguments)]
    fn rule(
        &mut self,
        peers: &[Peer],
        ports: &[PortSpec],
        v: Verdict,
        o: Origin,
        any_peer_if_none: bool,
        out: &mut Vec<RuleDef>,
    ) {
        let mut peer_sets: Vec<Option<String>> = Vec::new();
        if peers.is_empty() {
            if any_peer_if_none {
                peer_sets.push(None);
            }
        } else {
            for p in peers {
                match p {
                    Peer::Nothing => {}
                    Peer::Pods { .. } => {
                        let name = format!("pods-{}", hash(&format!("{p:?}")));
                        self.used_peers.insert(p.clone());
                        self.wanted
                            .entry(name.clone())
                            .or_insert_with(|| SetDef::Pods(p.clone()));
                        peer_sets.push(Some(name));
                    }
                    Peer::Nets { nets, except } => {
                        let r = ranges(nets, except);
                        if r.is_empty() {
                            continue;
                        }
                        let set = Set::Nets(r);
                        let name = format!("nets-{}", hash(&set.elements().join(",")));
                        self.wanted.entry(name.clone()).or_insert(SetDef::Nets(set));
                        peer_sets.push(Some(name));
                    }
                }
            }
        }
        // port kinds
        let mut kinds: Vec<(Option<String>, Option<String>)> = Vec::new();
        let numbers: Vec<(Protocol, u16, u16)> = ports
            .iter()
            .filter_map(|p| match p {
                PortSpec::Range { protocol, from, to } => Some((*protocol, *from, *to)),
                PortSpec::Named { .. } => None,
            })
            .collect();
        if !numbers.is_empty() {
            let set = Set::Ports(port_ranges(numbers));
            let name = format!("ports-{}", hash(&set.elements().join(",")));
            self.wanted
                .entry(name.clone())
                .or_insert(SetDef::Ports(set));
            kinds.push((Some(name), None));
        }
        for p in ports {
            if let PortSpec::Named { name, protocol } = p {
                let key = format!("{name}/{}", protocol.map(|p| p.nft()).unwrap_or("any"));
                let set = format!("named-{}", hash(&key));
                self.wanted
                    .entry(set.clone())
                    .or_insert_with(|| SetDef::Named(name.clone(), *protocol));
                kinds.push((None, Some(set)));
            }
        }
        if ports.is_empty() {
            kinds.push((None, None));
        }
        for peer in &peer_sets {
            for (ports, named) in &kinds {
                out.push(RuleDef {
                    peer: peer.clone(),
                    ports: ports.clone(),
                    named: named.clone(),
                    verdict: v.clone(),
                    origin: o.clone(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests;
