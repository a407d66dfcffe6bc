//! The network policy tests' world: namespaces x, y, z with pods a, b, c
//! over the lab's nodes, servers on TCP and UDP 80 and 81 in every pod,
//! every pod probing every pod; and an independent model of the API's
//! documented semantics (NetworkPolicy, ClusterNetworkPolicy tiers) that
//! says what each probe should see. The model reads the same JSON the
//! test applies with kubectl; it shares no code with trellis.

use serde_json::Value;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use trellis_lab::{Backend, Lab, Outcome, PodSpec};

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);

/// One pod of the world.
#[derive(Debug, Clone)]
pub struct MPod {
    pub ns: String,
    pub name: String,
    pub node: String,
    /// the lab's short name
    pub lab: String,
    pub ip: Ipv4Addr,
    pub labels: BTreeMap<String, String>,
}

pub struct World {
    pub pods: Vec<MPod>,
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// NetworkPolicies applied (their JSON)
    pub policies: BTreeMap<String, Value>,
    /// ClusterNetworkPolicies applied
    pub cluster: BTreeMap<String, Value>,
    _servers: Vec<Backend>,
}

fn labels_of(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// The container ports every pod declares.
pub fn named_ports() -> Vec<(String, String, u16)> {
    let mut v = Vec::new();
    for port in [80u16, 81] {
        for proto in ["TCP", "UDP"] {
            v.push((
                format!("serve-{port}-{}", proto.to_lowercase()),
                proto.to_string(),
                port,
            ));
        }
    }
    v
}

impl World {
    /// Namespaces and pods, pods spread over the lab's nodes, servers up.
    pub fn build(lab: &mut Lab) -> World {
        let nodes: Vec<String> = lab.state().nodes.iter().map(|n| n.name.clone()).collect();
        let mut namespaces = BTreeMap::new();
        for ns in NAMESPACES {
            let l = BTreeMap::from([
                ("ns".to_string(), ns.to_string()),
                ("kubernetes.io/metadata.name".to_string(), ns.to_string()),
            ]);
            lab.kubectl_stdin(
                &["apply", "-f", "-"],
                &serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": ns, "labels": {"ns": ns}}})
                .to_string(),
            )
            .expect("namespace");
            namespaces.insert(ns.to_string(), l);
        }
        let mut pods = Vec::new();
        let mut i = 0;
        for ns in NAMESPACES {
            for p in PODS {
                let node = nodes[i % nodes.len()].clone();
                i += 1;
                let lab_name = format!("{ns}{p}");
                let labels = BTreeMap::from([("pod".to_string(), p.to_string())]);
                let spec = PodSpec {
                    namespace: ns.into(),
                    name: p.into(),
                    labels: labels.clone(),
                    ports: named_ports(),
                };
                let a = lab
                    .add_pod_as(&node, &lab_name, "", Some(&spec))
                    .unwrap_or_else(|e| panic!("pod {ns}/{p}: {e:#}"));
                pods.push(MPod {
                    ns: ns.into(),
                    name: p.into(),
                    node: node.clone(),
                    lab: lab_name,
                    ip: a.ip.parse().expect("ip"),
                    labels,
                });
            }
        }
        let mut servers = Vec::new();
        for p in &pods {
            for port in [80, 81] {
                servers.push(lab.serve(&p.node, &p.lab, port).expect("serve"));
            }
        }
        World {
            pods,
            namespaces,
            policies: BTreeMap::new(),
            cluster: BTreeMap::new(),
            _servers: servers,
        }
    }

    pub fn pod(&self, ns: &str, name: &str) -> &MPod {
        self.pods
            .iter()
            .find(|p| p.ns == ns && p.name == name)
            .expect("pod of the world")
    }

    /// Applies `v` (a NetworkPolicy or ClusterNetworkPolicy) and records
    /// it in the model.
    pub fn apply(&mut self, lab: &Lab, v: Value) {
        lab.kubectl_stdin(&["apply", "-f", "-"], &v.to_string())
            .unwrap_or_else(|e| panic!("apply {v}: {e:#}"));
        let name = v["metadata"]["name"].as_str().expect("name").to_string();
        if v["kind"] == "ClusterNetworkPolicy" {
            self.cluster.insert(name, v);
        } else {
            let ns = v["metadata"]["namespace"].as_str().unwrap_or("default");
            self.policies.insert(format!("{ns}/{name}"), v);
        }
    }

    /// Deletes every policy.
    pub fn clear(&mut self, lab: &Lab) {
        for (k, _) in std::mem::take(&mut self.policies) {
            let (ns, name) = k.split_once('/').expect("ns/name");
            lab.kubectl(&[
                "-n",
                ns,
                "delete",
                "networkpolicy",
                name,
                "--ignore-not-found",
            ])
            .expect("delete policy");
        }
        for (k, _) in std::mem::take(&mut self.cluster) {
            lab.kubectl(&["delete", "clusternetworkpolicy", &k, "--ignore-not-found"])
                .expect("delete cnp");
        }
    }

    /// Sets label `k=v` (or removes it) on namespace `ns`.
    pub fn label_namespace(&mut self, lab: &Lab, ns: &str, k: &str, v: Option<&str>) {
        let arg = match v {
            Some(v) => format!("{k}={v}"),
            None => format!("{k}-"),
        };
        lab.kubectl(&["label", "namespace", ns, &arg, "--overwrite"])
            .expect("label namespace");
        let l = self.namespaces.get_mut(ns).expect("namespace");
        match v {
            Some(v) => l.insert(k.into(), v.into()),
            None => l.remove(k),
        };
    }

    /// Sets label `k=v` (or removes it) on pod `ns/name`.
    pub fn label_pod(&mut self, lab: &Lab, ns: &str, name: &str, k: &str, v: Option<&str>) {
        let arg = match v {
            Some(v) => format!("{k}={v}"),
            None => format!("{k}-"),
        };
        lab.kubectl(&["-n", ns, "label", "pod", name, &arg, "--overwrite"])
            .expect("label pod");
        let p = self
            .pods
            .iter_mut()
            .find(|p| p.ns == ns && p.name == name)
            .expect("pod");
        match v {
            Some(v) => p.labels.insert(k.into(), v.into()),
            None => p.labels.remove(k),
        };
    }

    /// The model's matrix for `proto`/`port`: (from, to) -> allowed.
    pub fn expected(&self, proto: &str, port: u16) -> BTreeMap<(String, String), bool> {
        let mut m = BTreeMap::new();
        for s in &self.pods {
            for d in &self.pods {
                if s.ip == d.ip {
                    continue;
                }
                m.insert((key(s), key(d)), self.allowed(s, d, proto, port));
            }
        }
        m
    }

    /// What the kernel does now for `proto`/`port`: every pair probed at
    /// once.
    pub fn probe(&self, lab: &Lab, proto: &str, port: u16) -> BTreeMap<(String, String), bool> {
        let pairs: Vec<(&MPod, &MPod)> = self
            .pods
            .iter()
            .flat_map(|s| self.pods.iter().map(move |d| (s, d)))
            .filter(|(s, d)| s.ip != d.ip)
            .collect();
        std::thread::scope(|scope| {
            let handles: Vec<_> = pairs
                .iter()
                .map(|(s, d)| {
                    scope.spawn(move || {
                        let ns = lab.pod_ns(&s.node, &s.lab);
                        let to = SocketAddr::from((d.ip, port));
                        let o = if proto == "UDP" {
                            lab.probe_udp(&ns, to, 0, PROBE_TIMEOUT)
                        } else {
                            lab.probe_tcp(&ns, to, PROBE_TIMEOUT)
                        };
                        let ok = match o {
                            Outcome::Answered { .. } => true,
                            Outcome::TimedOut => false,
                            other => panic!("{} -> {} {proto}/{port}: {other:?}", key(s), key(d)),
                        };
                        ((key(s), key(d)), ok)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("probe thread"))
                .collect()
        })
    }

    /// Probes until the kernel agrees with the model (at most `limit`);
    /// panics with the differences.
    pub fn check(&self, lab: &Lab, case: &str, limit: Duration) {
        let end = Instant::now() + limit;
        for (proto, port) in [("TCP", 80), ("TCP", 81), ("UDP", 80), ("UDP", 81)] {
            let want = self.expected(proto, port);
            loop {
                let got = self.probe(lab, proto, port);
                if got == want {
                    break;
                }
                if Instant::now() >= end {
                    let diff: Vec<String> = want
                        .iter()
                        .filter(|(k, v)| got.get(*k) != Some(v))
                        .map(|((s, d), v)| {
                            format!("{s} -> {d}: want {}", if *v { "allowed" } else { "denied" })
                        })
                        .collect();
                    panic!(
                        "{case}, {proto}/{port}: the kernel differs from the model:\n{}",
                        diff.join("\n")
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    fn ns_labels(&self, ns: &str) -> BTreeMap<String, String> {
        self.namespaces.get(ns).cloned().unwrap_or_default()
    }

    fn allowed(&self, s: &MPod, d: &MPod, proto: &str, port: u16) -> bool {
        self.direction(s, d, d, true, proto, port) && self.direction(d, s, d, false, proto, port)
    }

    /// The verdict for `me` in one direction: egress when `egress` (peer
    /// = destination), else ingress (peer = source). `dst` is the
    /// destination pod (named ports are its).
    fn direction(
        &self,
        me: &MPod,
        peer: &MPod,
        dst: &MPod,
        egress: bool,
        proto: &str,
        port: u16,
    ) -> bool {
        let dir = if egress { "egress" } else { "ingress" };
        // the Admin tier
        if let Some(v) = self.tier("Admin", me, peer, dst, dir, proto, port) {
            match v.as_str() {
                "Accept" => return true,
                "Deny" => return false,
                _ => {} // Pass
            }
        }
        // NetworkPolicies
        let selecting: Vec<&Value> = self
            .policies
            .values()
            .filter(|p| p["metadata"]["namespace"] == me.ns.as_str())
            .filter(|p| selects(&p["spec"]["podSelector"], &me.labels))
            .filter(|p| types(p).contains(&dir.to_string()))
            .collect();
        if !selecting.is_empty() {
            return selecting.iter().any(|p| {
                p["spec"][dir]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|r| self.np_rule(p, r, peer, dst, egress, proto, port))
            });
        }
        // the Baseline tier: only its Deny denies
        self.tier("Baseline", me, peer, dst, dir, proto, port)
            .as_deref()
            != Some("Deny")
    }

    #[allow(clippy::too_many_arguments)]
    fn tier(
        &self,
        tier: &str,
        me: &MPod,
        peer: &MPod,
        dst: &MPod,
        dir: &str,
        proto: &str,
        port: u16,
    ) -> Option<String> {
        let mut cnps: Vec<&Value> = self
            .cluster
            .values()
            .filter(|c| c["spec"]["tier"] == tier)
            .filter(|c| self.subject(&c["spec"]["subject"], me))
            .collect();
        cnps.sort_by_key(|c| {
            (
                c["spec"]["priority"].as_i64().unwrap_or(0),
                c["metadata"]["name"].to_string(),
            )
        });
        let word = if dir == "egress" { "to" } else { "from" };
        for c in cnps {
            for r in c["spec"][dir].as_array().into_iter().flatten() {
                let peer_ok = r[word].as_array().into_iter().flatten().any(|p| {
                    if let Some(n) = p.get("namespaces") {
                        selects(n, &self.ns_labels(&peer.ns))
                    } else if let Some(x) = p.get("pods") {
                        selects(&x["namespaceSelector"], &self.ns_labels(&peer.ns))
                            && selects(&x["podSelector"], &peer.labels)
                    } else if let Some(nets) = p.get("networks") {
                        nets.as_array()
                            .into_iter()
                            .flatten()
                            .any(|n| in_cidr(n.as_str().unwrap_or_default(), peer.ip))
                    } else {
                        false
                    }
                });
                let port_ok = match r.get("protocols") {
                    None => true,
                    Some(ps) => ps.as_array().into_iter().flatten().any(|p| {
                        if let Some(n) = p.get("destinationNamedPort") {
                            has_named(dst, n.as_str().unwrap_or_default(), Some(proto), port)
                        } else {
                            let Some(pp) = p.get(proto.to_lowercase()) else {
                                return false;
                            };
                            let d = &pp["destinationPort"];
                            if let Some(n) = d.get("number") {
                                n.as_u64() == Some(u64::from(port))
                            } else {
                                let (a, b) = (
                                    d["range"]["start"].as_u64().unwrap_or(0),
                                    d["range"]["end"].as_u64().unwrap_or(0),
                                );
                                (a..=b).contains(&u64::from(port))
                            }
                        }
                    }),
                };
                if peer_ok && port_ok {
                    return r["action"].as_str().map(String::from);
                }
            }
        }
        None
    }

    fn subject(&self, s: &Value, p: &MPod) -> bool {
        if let Some(n) = s.get("namespaces") {
            selects(n, &self.ns_labels(&p.ns))
        } else if let Some(x) = s.get("pods") {
            selects(&x["namespaceSelector"], &self.ns_labels(&p.ns))
                && selects(&x["podSelector"], &p.labels)
        } else {
            false
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn np_rule(
        &self,
        policy: &Value,
        r: &Value,
        peer: &MPod,
        dst: &MPod,
        egress: bool,
        proto: &str,
        port: u16,
    ) -> bool {
        let word = if egress { "to" } else { "from" };
        let peers = r[word].as_array().cloned().unwrap_or_default();
        let peer_ok = peers.is_empty()
            || peers.iter().any(|p| {
                if let Some(b) = p.get("ipBlock") {
                    return in_cidr(b["cidr"].as_str().unwrap_or_default(), peer.ip)
                        && !b["except"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|e| in_cidr(e.as_str().unwrap_or_default(), peer.ip));
                }
                let ns_ok = match p.get("namespaceSelector") {
                    Some(n) => selects(n, &self.ns_labels(&peer.ns)),
                    None => policy["metadata"]["namespace"] == peer.ns.as_str(),
                };
                let pod_ok = match p.get("podSelector") {
                    Some(s) => selects(s, &peer.labels),
                    None => true,
                };
                ns_ok && pod_ok
            });
        let ports = r["ports"].as_array().cloned().unwrap_or_default();
        let port_ok = ports.is_empty()
            || ports.iter().any(|p| {
                let pr = p["protocol"].as_str().unwrap_or("TCP");
                if pr != proto {
                    return false;
                }
                match &p["port"] {
                    Value::Null => true,
                    Value::Number(n) => {
                        let n = n.as_u64().unwrap_or(0);
                        let end = p["endPort"].as_u64().unwrap_or(n);
                        (n..=end).contains(&u64::from(port))
                    }
                    Value::String(name) => has_named(dst, name, Some(proto), port),
                    _ => false,
                }
            });
        peer_ok && port_ok
    }
}

fn key(p: &MPod) -> String {
    format!("{}/{}", p.ns, p.name)
}

/// Every world pod declares the same named ports.
fn has_named(_dst: &MPod, name: &str, proto: Option<&str>, port: u16) -> bool {
    named_ports()
        .iter()
        .any(|(n, pr, p)| n == name && proto.is_none_or(|x| x == pr) && *p == port)
}

/// The policy types as the API server defaults them.
fn types(p: &Value) -> Vec<String> {
    match p["spec"]["policyTypes"].as_array() {
        Some(t) if !t.is_empty() => t
            .iter()
            .filter_map(|x| x.as_str().map(|s| s.to_lowercase()))
            .collect(),
        _ => {
            let mut t = vec!["ingress".to_string()];
            if p["spec"]["egress"]
                .as_array()
                .is_some_and(|e| !e.is_empty())
            {
                t.push("egress".into());
            }
            t
        }
    }
}

/// A label selector (JSON) against labels; absent or `{}` selects all.
pub fn selects(sel: &Value, labels: &BTreeMap<String, String>) -> bool {
    let ml = labels_of(&sel["matchLabels"]);
    if ml.iter().any(|(k, v)| labels.get(k) != Some(v)) {
        return false;
    }
    sel["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|e| {
            let k = e["key"].as_str().unwrap_or_default();
            let vals: Vec<&str> = e["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str())
                .collect();
            let have = labels.get(k).map(String::as_str);
            match e["operator"].as_str().unwrap_or_default() {
                "In" => have.is_some_and(|h| vals.contains(&h)),
                "NotIn" => have.is_none_or(|h| !vals.contains(&h)),
                "Exists" => have.is_some(),
                "DoesNotExist" => have.is_none(),
                _ => false,
            }
        })
}

fn in_cidr(cidr: &str, ip: Ipv4Addr) -> bool {
    let Some((a, len)) = cidr.split_once('/') else {
        return false;
    };
    let (Ok(a), Ok(len)) = (a.parse::<Ipv4Addr>(), len.parse::<u32>()) else {
        return false;
    };
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(a) & mask == u32::from(ip) & mask
}
