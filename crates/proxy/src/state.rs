//! The proxy's state: Services and slices as last seen, the fragments in
//! the kernel, the shared maps' claims; [`Proxy::plan`] turns what changed
//! since the last apply into one nft transaction.

use crate::base;
use crate::claims::{claim_entry, conflicts, disputed, Claimant, Claimants, Claims};
use crate::model::{NodeFacts, Protocol, Service, Slice};
use crate::render::{self, Fragment, Ids, Shared};
use crate::script::{self, Script};
use crate::stored::{self, Inputs, Stored};
use crate::{PICK_TABLE, TABLE};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;

pub use crate::claims::Conflict;

/// UDP flows to delete from conntrack, as kube-proxy chooses them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpFlows {
    /// Flows NATed to this endpoint; `None`: flows not NATed at all.
    pub endpoint: Option<SocketAddr>,
    /// ... whose original destination is one of these (Service address
    /// and port) ...
    pub dests: Vec<SocketAddr>,
    /// ... or whose original destination port is one of these node ports.
    pub node_ports: Vec<u16>,
}

/// One transaction to apply, and what it leaves behind once applied.
#[derive(Debug, Default)]
pub struct Plan {
    /// The nft script (empty: nothing changed).
    pub script: String,
    /// Whether it replaces the whole table.
    pub full: bool,
    /// Services rendered again.
    pub services: usize,
    /// UDP conntrack entries that must go (kubernetes #48370): flows of
    /// a Service port NATed to an endpoint it no longer has, and flows to
    /// a Service port that is served now but was not (created un-NATed
    /// before, e.g. while the agent was down).
    pub stale_udp: Vec<UdpFlows>,
    /// the Services it renders again
    keys: Vec<String>,
    /// ... as the kernel will hold them, compact (`None`: gone); a plan
    /// keeps no uncompressed fragment (at 30,000 Services they took 200
    /// MB at the peak of a full plan)
    stored: Vec<Option<Stored>>,
    /// what each was rendered from
    inputs: Vec<Inputs>,
    /// Services rendered again to the fragment the kernel holds, from
    /// inputs with a new fingerprint
    refreshed: Vec<(String, Inputs)>,
    claims: Claims,
    /// the pick chains' users once applied (`None`: unchanged)
    picks: Option<Picks>,
}

/// Per pick chain (`pick-N-PROTO`), how many `pickers` elements go to it.
type Picks = BTreeMap<String, usize>;

impl Plan {
    /// The Services this plan renders again.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// Services whose fragment did not change but whose inputs' new
    /// fingerprint is this (a journal records it).
    pub fn refreshed(&self) -> &[(String, Inputs)] {
        &self.refreshed
    }

    /// The Services this plan renders, as the kernel will hold them once
    /// it is applied (`None`: gone), with the fingerprint of what each was
    /// rendered from — what a journal records. Each is unpacked as the
    /// iterator reaches it.
    pub fn records(&self) -> impl Iterator<Item = (&str, Inputs, Option<Fragment>)> + '_ {
        self.keys
            .iter()
            .zip(&self.stored)
            .zip(&self.inputs)
            .map(|((k, f), i)| (k.as_str(), *i, f.as_ref().map(Stored::get)))
    }
}

/// Services, slices and what the kernel holds.
pub struct Proxy {
    node: NodeFacts,
    services: HashMap<String, Service>,
    slices: HashMap<String, Slice>,
    /// Service -> its slices, sorted (nearly always one: inline, where a
    /// `BTreeSet` would allocate a node of eleven)
    by_service: HashMap<String, SliceKeys>,
    /// what the kernel holds, per Service, compact
    applied: HashMap<String, Stored>,
    /// ... and what it was rendered from (see [`stored::inputs`])
    inputs: HashMap<String, Inputs>,
    /// the fingerprints' salt: node facts and build
    salt: u64,
    claims: HashMap<(Shared, String), Claimants>,
    /// claimed keys whose claimants want different values (conflicts)
    contested: BTreeSet<(Shared, String)>,
    dirty: BTreeSet<String>,
    ids: Ids,
    /// the pick chains in the kernel, with their users
    picks: Picks,
    full: bool,
    stamp: u32,
}

/// The whole-table script of a full plan, written a fragment at a time.
struct FullScript {
    decl: String,
    rules: String,
    elements: BTreeMap<String, Vec<String>>,
}

impl FullScript {
    /// The fixed parts of both tables.
    fn new(node: &NodeFacts) -> Self {
        let mut decl = base::sets(node);
        let mut rules = String::new();
        for (name, hook, body) in base::chains(node) {
            if hook.is_empty() {
                let _ = writeln!(decl, "add chain inet {TABLE} {name}");
            } else {
                let _ = writeln!(decl, "add chain inet {TABLE} {name} {{ {hook} }}");
            }
            for r in body {
                let _ = writeln!(rules, "add rule inet {TABLE} {name} {r}");
            }
        }
        for (name, hook, body) in base::pick_chains() {
            let _ = writeln!(decl, "add chain inet {PICK_TABLE} {name} {{ {hook} }}");
            for r in body {
                let _ = writeln!(rules, "add rule inet {PICK_TABLE} {name} {r}");
            }
        }
        Self {
            decl,
            rules,
            elements: BTreeMap::new(),
        }
    }

    /// One Service's objects.
    fn add(&mut self, f: &Fragment) {
        script::full(f, &mut self.decl, &mut self.rules, &mut self.elements);
    }

    /// The script: the shared maps' owners, the pick chains in use, the
    /// stamps; both tables replaced in one transaction.
    fn finish(
        self,
        claims: &HashMap<(Shared, String), Claimants>,
        owned: &HashMap<(Shared, String), String>,
        picks: &Picks,
        stamp: u32,
    ) -> String {
        let Self {
            mut decl,
            mut rules,
            mut elements,
        } = self;
        for c in picks.keys() {
            let _ = writeln!(decl, "add chain inet {PICK_TABLE} {c}");
            for r in render::pick_rules(c).unwrap_or_default() {
                let _ = writeln!(rules, "add rule inet {PICK_TABLE} {c} {r}");
            }
        }
        let mut shared: Vec<(Shared, &String, &str)> = claims
            .iter()
            .filter_map(|((kind, key), v)| v.first().map(|(_, value)| (*kind, key, &**value)))
            .chain(
                owned
                    .iter()
                    .map(|((kind, key), v)| (*kind, key, v.as_str())),
            )
            .collect();
        shared.sort();
        for (kind, key, value) in shared {
            let (set, el) = script::shared_element(kind, key, value);
            elements.entry(set).or_default().push(el);
        }
        for (t, set) in [(TABLE, base::STAMP), (PICK_TABLE, base::PICK_STAMP)] {
            let _ = writeln!(decl, "add element inet {t} {set} {{ {stamp:#010x} }}");
        }
        // the tables go and come back in the same transaction: nothing
        // of an earlier table survives, and no packet sees them half made
        let mut out = String::with_capacity(decl.len() + rules.len() * 2);
        for t in [TABLE, PICK_TABLE] {
            let _ = writeln!(
                out,
                "add table inet {t}\ndelete table inet {t}\nadd table inet {t}"
            );
        }
        out.push_str(&decl);
        drop(decl);
        script::element_lines(&mut out, &elements);
        drop(elements);
        out.push_str(&rules);
        out
    }
}

/// A Service's slices, sorted.
type SliceKeys = smallvec::SmallVec<[String; 1]>;

fn slice_key(s: &Slice) -> String {
    format!("{}/{}", s.namespace, s.name)
}

impl Proxy {
    /// An empty proxy for `node`; the first plan replaces the table.
    pub fn new(node: NodeFacts) -> Self {
        Self {
            salt: stored::salt(&node, ""),
            inputs: HashMap::new(),
            node,
            services: HashMap::new(),
            slices: HashMap::new(),
            by_service: HashMap::new(),
            applied: HashMap::new(),
            claims: HashMap::new(),
            contested: BTreeSet::new(),
            dirty: BTreeSet::new(),
            ids: Ids::default(),
            picks: Picks::new(),
            full: true,
            stamp: 0,
        }
    }

    /// The number the next whole-table load writes into the table's
    /// `stamp` set.
    pub fn set_stamp(&mut self, stamp: u32) {
        self.stamp = stamp;
    }

    /// `build` identifies the running program: what a journal says was
    /// rendered by another build is rendered again.
    pub fn set_build(&mut self, build: &str) {
        self.salt = stored::salt(&self.node, build);
    }

    /// The kernel holds `fragments` (from a journal whose stamp the
    /// table carries; see [`Stored::from_json`]), each rendered from
    /// inputs with the given fingerprint: they count as applied, so the
    /// next plan changes only what differs from them, and renders only
    /// Services whose inputs differ.
    pub fn restore(&mut self, fragments: Vec<stored::Restored>) {
        self.applied.clear();
        self.inputs.clear();
        self.claims.clear();
        self.ids = Ids::default();
        let mut restored_ids = Vec::new();
        let mut picks = Picks::new();
        for stored::Restored {
            key,
            inputs,
            stored,
            shared,
            ids,
        } in fragments
        {
            if inputs != (0, 0) {
                self.inputs.insert(key.clone(), inputs);
            }
            let who: Claimant = Arc::from(key.as_str());
            for (kind, k, v) in &shared {
                if kind.owned() {
                    if *kind == Shared::Pickers {
                        count_pick(&mut picks, Some(v), 1);
                    }
                    continue;
                }
                let e = self.claims.entry((*kind, k.clone())).or_default();
                match e.binary_search_by(|(svc, _)| (**svc).cmp(key.as_str())) {
                    Ok(i) => e[i].1 = v.as_str().into(),
                    Err(i) => e.insert(i, (who.clone(), v.as_str().into())),
                }
            }
            restored_ids.extend(ids);
            self.applied.insert(key, stored);
        }
        self.contested = self
            .claims
            .iter()
            .filter(|(_, v)| disputed(v))
            .map(|(k, _)| k.clone())
            .collect();
        for (chain, id) in restored_ids {
            self.ids.restore(&chain, id);
        }
        self.ids.settle();
        self.picks = picks;
        self.full = false;
        // every known Service is compared with what the kernel holds
        self.dirty.extend(self.applied.keys().cloned());
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
                if let Ok(i) = set.binary_search_by(|k| k.as_str().cmp(key)) {
                    set.remove(i);
                }
                if set.is_empty() {
                    self.by_service.remove(&svc);
                }
            }
        }
        match slice {
            Some(s) => {
                let svc = s.service_key();
                let set = self.by_service.entry(svc.clone()).or_default();
                if let Err(i) = set.binary_search_by(|k| k.as_str().cmp(key)) {
                    set.insert(i, key.to_string());
                }
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

    /// Whether the next plan replaces the whole table.
    pub fn will_replace(&self) -> bool {
        self.full
    }

    /// Every Service as the kernel holds it, with what it was rendered
    /// from.
    pub fn applied_fragments(&self) -> impl Iterator<Item = (&String, Inputs, Fragment)> + '_ {
        self.applied.iter().map(|(k, f)| {
            let inputs = self.inputs.get(k).copied().unwrap_or((0, 0));
            (k, inputs, f.get())
        })
    }

    /// The Services programmed now.
    pub fn programmed_keys(&self) -> impl Iterator<Item = &String> + '_ {
        self.applied.keys()
    }

    /// Whether something waits to be applied.
    pub fn pending(&self) -> bool {
        self.full || !self.dirty.is_empty()
    }

    /// Service `key`'s inputs: the Service and its slices.
    fn inputs_of<'a>(
        services: &'a HashMap<String, Service>,
        by_service: &'a HashMap<String, SliceKeys>,
        slices: &'a HashMap<String, Slice>,
        key: &str,
    ) -> Option<(&'a Service, Vec<&'a Slice>)> {
        let svc = services.get(key)?;
        let slices: Vec<&Slice> = by_service
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|k| slices.get(k))
            .collect();
        Some((svc, slices))
    }

    /// The fingerprint of Service `key`'s inputs (`(0, 0)`: it has none).
    fn fingerprint(&self, key: &str) -> Inputs {
        Self::inputs_of(&self.services, &self.by_service, &self.slices, key)
            .map(|(svc, slices)| stored::inputs(self.salt, svc, &slices))
            .unwrap_or((0, 0))
    }

    fn render(&mut self, key: &str) -> Option<Fragment> {
        let (svc, slices) = Self::inputs_of(&self.services, &self.by_service, &self.slices, key)?;
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
        // the claims of the keys this plan touches (a full plan: of all,
        // from nothing); each key's claimants sorted by Service, the first
        // owns it — whatever the order things happened in
        let mut claims: HashMap<(Shared, String), Claimants> = HashMap::new();
        let empty = Fragment::default();
        // a full plan writes each fragment into the script as it comes
        let mut whole = full.then(|| FullScript::new(&self.node));
        // entries of the maps keyed by chain id: what this plan's old and
        // new fragments hold (an id freed and taken again within the plan
        // shows in both)
        let mut owned_old: HashMap<(Shared, String), String> = HashMap::new();
        let mut owned_new: HashMap<(Shared, String), String> = HashMap::new();
        for key in &keys {
            let inputs = self.fingerprint(key);
            // applied from these very inputs (a restart, a relist): the
            // same fragment, not rendered again
            if !full && inputs != (0, 0) && self.inputs.get(key) == Some(&inputs) {
                continue;
            }
            let new = self.render(key);
            // rendered again but unchanged (a relist, a restart): nothing
            // to apply, record or release
            let stored = new.as_ref().map(Stored::new);
            if !full && stored.as_ref() == self.applied.get(key) {
                if inputs != (0, 0) {
                    plan.refreshed.push((key.clone(), inputs));
                }
                continue;
            }
            let old = self.applied.get(key).map(Stored::get);
            let old = old.as_ref();
            let who: Claimant = Arc::from(key.as_str());
            // ids of chains that went are free again
            if let Some(o) = old {
                for c in o.ids.keys() {
                    if !new.as_ref().is_some_and(|n| n.ids.contains_key(c)) {
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
            plan.stale_udp.extend(udp_fresh(old, new.as_ref()));
            for (kind, k, v) in old.map(|o| o.shared.as_slice()).unwrap_or_default() {
                if kind.owned() {
                    owned_old.insert((*kind, k.clone()), v.clone());
                    continue;
                }
                claim_entry(
                    &mut claims,
                    &self.claims,
                    full,
                    &mut touched,
                    (*kind, k.clone()),
                )
                .retain(|(svc, _)| **svc != **key);
            }
            for (kind, k, val) in new
                .as_ref()
                .map(|n| n.shared.as_slice())
                .unwrap_or_default()
            {
                if kind.owned() {
                    owned_new.insert((*kind, k.clone()), val.clone());
                    continue;
                }
                let v = claim_entry(
                    &mut claims,
                    &self.claims,
                    full,
                    &mut touched,
                    (*kind, k.clone()),
                );
                match v.binary_search_by(|(svc, _)| (**svc).cmp(key.as_str())) {
                    Ok(i) => v[i].1 = val.as_str().into(),
                    Err(i) => v.insert(i, (who.clone(), val.as_str().into())),
                }
            }
            if let (Some(w), Some(f)) = (whole.as_mut(), new.as_ref()) {
                w.add(f);
            }
            plan.keys.push(key.clone());
            plan.stored.push(stored);
            plan.inputs.push(inputs);
        }
        if let Some(w) = whole {
            let mut picks = Picks::new();
            for ((kind, _), v) in &owned_new {
                if *kind == Shared::Pickers {
                    count_pick(&mut picks, Some(v), 1);
                }
            }
            plan.script = w.finish(&claims, &owned_new, &picks, self.stamp);
            plan.picks = Some(picks);
        } else {
            let mut picks = self.picks.clone();
            // the id-keyed entries: deleted, replaced, added
            let mut keys: BTreeSet<&(Shared, String)> = owned_old.keys().collect();
            keys.extend(owned_new.keys());
            for t in keys {
                let (before, after) = (owned_old.get(t), owned_new.get(t));
                shared_change(
                    &mut s,
                    &mut picks,
                    t,
                    before.map(|v| &**v),
                    after.map(|v| &**v),
                );
            }
            for t in &touched {
                let before = self
                    .claims
                    .get(t)
                    .and_then(|v| v.first())
                    .map(|(_, v)| &**v);
                let after = claims.get(t).and_then(|v| v.first()).map(|(_, v)| &**v);
                shared_change(&mut s, &mut picks, t, before, after);
            }
            // pick chains come with their first user, go with their last
            for (c, n) in &picks {
                if !self.picks.contains_key(c) {
                    s.add_chain(c);
                    s.rules(c, &render::pick_rules(c).unwrap_or_default());
                } else if *n == 0 {
                    s.delete_chain(c);
                }
            }
            picks.retain(|_, n| *n > 0);
            if picks != self.picks {
                plan.picks = Some(picks);
            }
            if s.ops > 0 {
                plan.script = s.text();
            }
        }
        plan.claims = claims.into_iter().collect();
        plan
    }

    /// The kernel took `plan`.
    pub fn applied(&mut self, plan: Plan) {
        let full = plan.full;
        if full {
            self.applied.clear();
            self.inputs.clear();
            self.claims.clear();
            self.contested.clear();
            self.full = false;
        }
        if let Some(p) = plan.picks {
            self.picks = p;
        }
        for ((key, stored), inputs) in plan.keys.into_iter().zip(plan.stored).zip(plan.inputs) {
            if inputs == (0, 0) {
                self.inputs.remove(&key);
            } else {
                self.inputs.insert(key.clone(), inputs);
            }
            match stored {
                Some(f) => {
                    self.applied.insert(key, f);
                }
                None => {
                    self.applied.remove(&key);
                }
            }
        }
        for (key, inputs) in plan.refreshed {
            self.inputs.insert(key, inputs);
        }
        for (k, v) in plan.claims {
            if disputed(&v) {
                self.contested.insert(k.clone());
            } else {
                self.contested.remove(&k);
            }
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
        for (key, f) in plan.keys.into_iter().zip(plan.stored) {
            // ids taken by what never reached the kernel go back
            let kept = self
                .applied
                .get(&key)
                .map(|a| a.get().ids)
                .unwrap_or_default();
            let taken = f.map(|f| f.get().ids).unwrap_or_default();
            for c in taken.keys() {
                if !kept.contains_key(c) {
                    self.ids.release(c);
                }
            }
            self.dirty.insert(key);
        }
        self.full = true;
    }

    /// Service `key` as last seen.
    pub fn service(&self, key: &str) -> Option<&Service> {
        self.services.get(key)
    }

    /// What is programmed for Service `key`.
    pub fn programmed(&self, key: &str) -> Option<Fragment> {
        self.applied.get(key).map(Stored::get)
    }

    /// Shared keys a Service claims but another has.
    pub fn conflicts(&self) -> Vec<Conflict> {
        conflicts(&self.contested, &self.claims)
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

/// Where Service port `id` of `f` is served: (address:port, node ports).
fn served_at(f: &Fragment, id: &str) -> (Vec<SocketAddr>, Vec<u16>) {
    let mut dests = Vec::new();
    let mut node_ports = Vec::new();
    for a in f
        .ports
        .iter()
        .filter(|p| p.id == id)
        .flat_map(|p| &p.addresses)
    {
        let at = a.rsplit_once('/').map(|(at, _)| at).unwrap_or(a);
        if let Some(np) = at.strip_prefix("*:") {
            node_ports.extend(np.parse::<u16>().ok());
        } else if let Ok(sa) = at.parse() {
            dests.push(sa);
        }
    }
    (dests, node_ports)
}

/// Whether Service port id `ns/name/proto/port` is UDP.
fn is_udp(id: &str) -> bool {
    id.rsplit('/').nth(1) == Some(Protocol::Udp.as_str())
}

/// The UDP flows to endpoints `old`'s chains no longer send to.
fn udp_endpoints(old: Option<&Fragment>, lost: &[script::Lost]) -> Vec<UdpFlows> {
    let Some(old) = old else { return Vec::new() };
    let mut out: Vec<UdpFlows> = Vec::new();
    for (id, _, endpoint) in lost {
        if !is_udp(id) {
            continue;
        }
        let (dests, node_ports) = served_at(old, id);
        let flows = UdpFlows {
            endpoint: Some(*endpoint),
            dests,
            node_ports,
        };
        // gone from both chains of a port: once
        if !out.contains(&flows) {
            out.push(flows);
        }
    }
    out
}

/// UDP ports of `new` that serve now and did not in `old`: their
/// un-NATed flows must go.
fn udp_fresh(old: Option<&Fragment>, new: Option<&Fragment>) -> Vec<UdpFlows> {
    let Some(new) = new else { return Vec::new() };
    new.ports
        .iter()
        .filter(|p| is_udp(&p.id) && p.verdict == "serve")
        .filter(|p| {
            !old.is_some_and(|o| o.ports.iter().any(|q| q.id == p.id && q.verdict == "serve"))
        })
        .map(|p| {
            let (dests, node_ports) = served_at(new, &p.id);
            UdpFlows {
                endpoint: None,
                dests,
                node_ports,
            }
        })
        .collect()
}

/// `pick` (a `pickers` value) counted `by` for its pick chain.
/// Shared-map entry `t` goes from `before` to `after` (element changes,
/// and the pick chains' users for `pickers`).
fn shared_change(
    s: &mut Script,
    picks: &mut Picks,
    t: &(Shared, String),
    before: Option<&str>,
    after: Option<&str>,
) {
    if before == after {
        return;
    }
    if before.is_some() {
        s.del_element(t.0.name(), &t.1);
    }
    if let Some(v) = after {
        s.add_element(t.0.name(), &t.1, v);
    }
    if t.0 == Shared::Pickers {
        count_pick(picks, before, -1);
        count_pick(picks, after, 1);
    }
}

fn count_pick(picks: &mut Picks, pick: Option<&str>, by: i64) {
    if let Some(c) = pick.and_then(|v| v.strip_prefix("goto ")) {
        let n = picks.entry(c.to_string()).or_default();
        *n = (*n as i64 + by).max(0) as usize;
    }
}
