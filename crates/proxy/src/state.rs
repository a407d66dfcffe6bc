//! The proxy's state: Services and slices as last seen, the fragments in
//! the kernel, the shared maps' claims; [`Proxy::plan`] turns what changed
//! since the last apply into one nft transaction.

use crate::base;
use crate::model::{NodeFacts, Protocol, Service, Slice};
use crate::render::{self, Fragment, Ids, PortSummary, Shared};
use crate::script::{self, Script};
use crate::TABLE;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write;
use std::net::SocketAddr;

/// A shared map's key and the Services claiming it, in order: (Service,
/// value); the first one has it.
type Claims = Vec<((Shared, String), Vec<(String, String)>)>;

/// One programmed Service for listings: (key, ports, problems, notes).
pub type Summary<'a> = (String, &'a [PortSummary], &'a [String], &'a [String]);

/// One transaction to apply, and what it leaves behind once applied.
#[derive(Debug, Default)]
pub struct Plan {
    /// The nft script (empty: nothing changed).
    pub script: String,
    /// Whether it replaces the whole table.
    pub full: bool,
    /// Services rendered again.
    pub services: usize,
    /// UDP endpoints no longer used by some Service port: their
    /// conntrack entries must go (kubernetes #48370).
    pub stale_udp: Vec<SocketAddr>,
    fragments: Vec<(String, Option<Fragment>)>,
    claims: Claims,
}

/// A shared key claimed by more than one Service with different values:
/// the first keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Conflict {
    /// The Service that does not get it.
    pub service: String,
    /// The shared map and key.
    pub what: String,
    /// The Service that has it.
    pub owner: String,
}

/// Services, slices and what the kernel holds.
pub struct Proxy {
    node: NodeFacts,
    services: HashMap<String, Service>,
    slices: HashMap<String, Slice>,
    by_service: HashMap<String, BTreeSet<String>>,
    applied: HashMap<String, Fragment>,
    claims: HashMap<(Shared, String), Vec<(String, String)>>,
    dirty: BTreeSet<String>,
    ids: Ids,
    full: bool,
}

fn slice_key(s: &Slice) -> String {
    format!("{}/{}", s.namespace, s.name)
}

impl Proxy {
    /// An empty proxy for `node`; the first plan replaces the table.
    pub fn new(node: NodeFacts) -> Self {
        Self {
            node,
            services: HashMap::new(),
            slices: HashMap::new(),
            by_service: HashMap::new(),
            applied: HashMap::new(),
            claims: HashMap::new(),
            dirty: BTreeSet::new(),
            ids: Ids::default(),
            full: true,
        }
    }

    /// The node's facts.
    pub fn node(&self) -> &NodeFacts {
        &self.node
    }

    /// Service `key` (`namespace/name`) is now `svc`.
    pub fn set_service(&mut self, key: &str, svc: Option<Service>) {
        let changed = match svc {
            Some(s) => self.services.insert(key.to_string(), s.clone()).as_ref() != Some(&s),
            None => self.services.remove(key).is_some(),
        };
        if changed {
            self.dirty.insert(key.to_string());
        }
    }

    /// Slice `key` (`namespace/name`) is now `slice`.
    pub fn set_slice(&mut self, key: &str, slice: Option<Slice>) {
        if let Some(old) = self.slices.get(key) {
            if Some(old) == slice.as_ref() {
                return;
            }
            let svc = old.service_key();
            self.dirty.insert(svc.clone());
            if let Some(set) = self.by_service.get_mut(&svc) {
                set.remove(key);
            }
        }
        match slice {
            Some(s) => {
                let svc = s.service_key();
                self.by_service
                    .entry(svc.clone())
                    .or_default()
                    .insert(key.to_string());
                self.dirty.insert(svc);
                self.slices.insert(key.to_string(), s);
            }
            None => {
                self.slices.remove(key);
            }
        }
    }

    /// Replaces everything (a listing): changed Services become dirty.
    pub fn replace(&mut self, services: Vec<Service>, slices: Vec<Slice>) {
        let svc_keys: BTreeSet<String> = services.iter().map(Service::key).collect();
        let gone: Vec<String> = self
            .services
            .keys()
            .filter(|k| !svc_keys.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            self.set_service(&k, None);
        }
        for s in services {
            self.set_service(&s.key(), Some(s));
        }
        let slice_keys: BTreeSet<String> = slices.iter().map(slice_key).collect();
        let gone: Vec<String> = self
            .slices
            .keys()
            .filter(|k| !slice_keys.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            self.set_slice(&k, None);
        }
        for s in slices {
            self.set_slice(&slice_key(&s), Some(s));
        }
    }

    /// The next apply replaces the whole table (after a failed apply, or
    /// to repair the kernel).
    pub fn force_full(&mut self) {
        self.full = true;
    }

    /// Whether something waits to be applied.
    pub fn pending(&self) -> bool {
        self.full || !self.dirty.is_empty()
    }

    fn render(&mut self, key: &str) -> Option<Fragment> {
        let svc = self.services.get(key)?;
        let slices: Vec<&Slice> = self
            .by_service
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k))
            .collect();
        Some(render::service(svc, &slices, &self.node, &mut self.ids))
    }

    /// The transaction that brings the kernel to the current state. Call
    /// [`Self::applied`] with it once the kernel took it, or
    /// [`Self::force_full`] if it did not.
    pub fn plan(&mut self) -> Plan {
        let full = self.full;
        let keys: Vec<String> = if full {
            let mut all: BTreeSet<String> = self.services.keys().cloned().collect();
            all.extend(self.applied.keys().cloned());
            all.extend(std::mem::take(&mut self.dirty));
            all.into_iter().collect()
        } else {
            std::mem::take(&mut self.dirty).into_iter().collect()
        };
        let mut plan = Plan {
            full,
            services: keys.len(),
            ..Default::default()
        };
        let mut s = Script::default();
        let mut touched: BTreeSet<(Shared, String)> = BTreeSet::new();
        let mut claims = self.claims.clone();
        let empty = Fragment::default();
        for key in &keys {
            let new = self.render(key);
            let old = self.applied.get(key);
            // affinity ids of chains that went are free again
            if let Some(o) = old {
                for c in &o.affinity_chains {
                    if !new.as_ref().is_some_and(|n| n.affinity_chains.contains(c)) {
                        self.ids.release(c);
                    }
                }
            }
            if !full {
                let lost = script::diff(
                    &mut s,
                    old.unwrap_or(&empty),
                    new.as_ref().unwrap_or(&empty),
                );
                plan.stale_udp.extend(udp_endpoints(old, &lost));
            } else if let Some(o) = old {
                let lost = script::diff(&mut Script::default(), o, new.as_ref().unwrap_or(&empty));
                plan.stale_udp.extend(udp_endpoints(Some(o), &lost));
            }
            // claims of the shared maps
            for (kind, k, _) in old.map(|o| o.shared.as_slice()).unwrap_or_default() {
                if let Some(v) = claims.get_mut(&(*kind, k.clone())) {
                    v.retain(|(svc, _)| svc != key);
                }
                touched.insert((*kind, k.clone()));
            }
            for (kind, k, val) in new
                .as_ref()
                .map(|n| n.shared.as_slice())
                .unwrap_or_default()
            {
                let v = claims.entry((*kind, k.clone())).or_default();
                if !v.iter().any(|(svc, vv)| svc == key && vv == val) {
                    v.push((key.clone(), val.clone()));
                }
                touched.insert((*kind, k.clone()));
            }
            plan.fragments.push((key.clone(), new));
        }
        if full {
            plan.script = self.full_script(&plan.fragments, &claims);
        } else {
            for t in &touched {
                let before = self.claims.get(t).and_then(|v| v.first()).map(|(_, v)| v);
                let after = claims.get(t).and_then(|v| v.first()).map(|(_, v)| v);
                if before == after {
                    continue;
                }
                if before.is_some() {
                    s.del_element(t.0.name(), &t.1);
                }
                if let Some(v) = after {
                    s.add_element(t.0.name(), &t.1, v);
                }
            }
            if s.ops > 0 {
                plan.script = s.text();
            }
        }
        plan.claims = if full {
            claims.into_iter().collect()
        } else {
            touched
                .into_iter()
                .map(|t| {
                    let v = claims.remove(&t).unwrap_or_default();
                    (t, v)
                })
                .collect()
        };
        plan
    }

    fn full_script(
        &self,
        fragments: &[(String, Option<Fragment>)],
        claims: &HashMap<(Shared, String), Vec<(String, String)>>,
    ) -> String {
        let mut decl = base::sets(&self.node);
        let mut bodies = String::new();
        let mut elements: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, hook, _) in base::chains(&self.node) {
            let _ = writeln!(decl, "\tchain {name} {{ {hook} }}");
        }
        for (name, _, rules) in base::chains(&self.node) {
            let _ = writeln!(bodies, "\tchain {name} {{");
            for r in rules {
                let _ = writeln!(bodies, "\t\t{r}");
            }
            bodies.push_str("\t}\n");
        }
        for f in fragments.iter().filter_map(|(_, f)| f.as_ref()) {
            script::full(f, &mut decl, &mut bodies, &mut elements);
        }
        let mut shared: Vec<_> = claims
            .iter()
            .filter_map(|((kind, key), v)| v.first().map(|(_, value)| (*kind, key, value)))
            .collect();
        shared.sort();
        for (kind, key, value) in shared {
            let (set, el) = script::shared_element(kind, key, value);
            elements.entry(set).or_default().push(el);
        }
        let mut out = format!(
            "table inet {TABLE} {{}}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n{decl}}}\ntable inet {TABLE} {{\n{bodies}}}\n"
        );
        script::element_lines(&mut out, &elements);
        out
    }

    /// The kernel took `plan`.
    pub fn applied(&mut self, plan: Plan) {
        if plan.full {
            self.applied.clear();
            self.claims.clear();
            self.full = false;
        }
        for (key, f) in plan.fragments {
            match f {
                Some(f) => {
                    self.applied.insert(key, f);
                }
                None => {
                    self.applied.remove(&key);
                }
            }
        }
        for (k, v) in plan.claims {
            if v.is_empty() {
                self.claims.remove(&k);
            } else {
                self.claims.insert(k, v);
            }
        }
    }

    /// The kernel refused `plan`: what it would have changed is dirty
    /// again and the next plan replaces the whole table.
    pub fn failed(&mut self, plan: Plan) {
        for (key, _) in plan.fragments {
            self.dirty.insert(key);
        }
        self.full = true;
    }

    /// What is programmed for Service `key`.
    pub fn programmed(&self, key: &str) -> Option<&Fragment> {
        self.applied.get(key)
    }

    /// Every programmed Service with its port summaries, problems and notes.
    pub fn summaries(&self) -> Vec<Summary<'_>> {
        let mut v: Vec<_> = self
            .applied
            .iter()
            .map(|(k, f)| {
                (
                    k.clone(),
                    f.ports.as_slice(),
                    f.problems.as_slice(),
                    f.notes.as_slice(),
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Shared keys a Service claims but another has.
    pub fn conflicts(&self) -> Vec<Conflict> {
        let mut out = Vec::new();
        for ((kind, key), v) in &self.claims {
            if let Some((owner, value)) = v.first() {
                for (svc, val) in &v[1..] {
                    if val != value && svc != owner {
                        out.push(Conflict {
                            service: svc.clone(),
                            what: format!("{} {key}", kind.name()),
                            owner: owner.clone(),
                        });
                    }
                }
            }
        }
        out.sort_by(|a, b| (&a.service, &a.what).cmp(&(&b.service, &b.what)));
        out
    }

    /// Number of Services known (programmed or not).
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// Whether no Service is known.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

/// The UDP endpoints among `lost` endpoint-map values of `old`.
fn udp_endpoints(old: Option<&Fragment>, lost: &[(String, String)]) -> Vec<SocketAddr> {
    let Some(old) = old else { return Vec::new() };
    lost.iter()
        .filter(|(map, _)| map.starts_with("eps-") || map.starts_with("leps-"))
        .filter(|(map, _)| map.contains(&format!("/{}/", Protocol::Udp.as_str())))
        .filter(|(map, _)| old.sets.contains_key(map))
        .filter_map(|(_, v)| {
            let (ip, port) = v.split_once(" . ")?;
            Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?))
        })
        .collect()
}
