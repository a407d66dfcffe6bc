//! nft script text: the whole table, and the changes between two
//! renderings of the Services that changed.

use crate::render::{Fragment, SetDef, Shared};
use crate::{PICK_TABLE, TABLE};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::SocketAddr;

/// Most elements per `add element` / `delete element` command.
const CHUNK: usize = 2000;

/// Accumulates one transaction, in an order nft accepts: declarations,
/// element deletes, flushes, deletes, re-declarations, element adds,
/// rules.
#[derive(Default)]
pub struct Script {
    declare: String,
    del_elements: BTreeMap<String, Vec<String>>,
    flush: BTreeSet<String>,
    flush_maps: BTreeSet<String>,
    delete_chains: BTreeSet<String>,
    delete_sets: BTreeSet<String>,
    redeclare: String,
    add_elements: BTreeMap<String, Vec<String>>,
    rules: String,
    /// Number of commands (0: nothing to do).
    pub ops: usize,
}

fn element(key: &str, value: &str) -> String {
    if value.is_empty() {
        key.to_string()
    } else {
        format!("{key} : {value}")
    }
}

fn set_decl(name: &str, def: &SetDef) -> String {
    let kind = if def.decl.contains(':') { "map" } else { "set" };
    format!(
        "add {kind} inet {} {name} {{ {} }}\n",
        table_of(name),
        def.decl
    )
}

impl Script {
    /// A new chain `name` (empty; rules come with [`Self::rules`]).
    pub fn add_chain(&mut self, name: &str) {
        let _ = writeln!(self.declare, "add chain inet {} {name}", table_of(name));
        self.ops += 1;
    }
    /// A new set or map.
    pub fn add_set(&mut self, name: &str, def: &SetDef) {
        self.declare.push_str(&set_decl(name, def));
        self.ops += 1;
    }
    /// A set or map whose declaration changed: deleted, then declared again.
    pub fn replace_set(&mut self, name: &str, def: &SetDef) {
        self.delete_sets.insert(name.to_string());
        self.redeclare.push_str(&set_decl(name, def));
        self.ops += 1;
    }
    /// Element `key` leaves set `set`.
    pub fn del_element(&mut self, set: &str, key: &str) {
        self.del_elements
            .entry(set.to_string())
            .or_default()
            .push(key.to_string());
        self.ops += 1;
    }
    /// Element `key` (: `value`) enters set `set`.
    pub fn add_element(&mut self, set: &str, key: &str, value: &str) {
        self.add_elements
            .entry(set.to_string())
            .or_default()
            .push(element(key, value));
        self.ops += 1;
    }
    /// Chain `name` loses its rules.
    pub fn flush_chain(&mut self, name: &str) {
        self.flush.insert(name.to_string());
        self.ops += 1;
    }
    /// Map `name` loses its elements (a dynamic map: affinity).
    pub fn flush_map(&mut self, name: &str) {
        self.flush_maps.insert(name.to_string());
        self.ops += 1;
    }
    /// Chain `name` goes (flushed first).
    pub fn delete_chain(&mut self, name: &str) {
        self.flush.insert(name.to_string());
        self.delete_chains.insert(name.to_string());
        self.ops += 1;
    }
    /// Set or map `name` goes.
    pub fn delete_set(&mut self, name: &str) {
        self.delete_sets.insert(name.to_string());
        self.ops += 1;
    }
    /// Chain `name` gets `rules` (after any flush).
    pub fn rules(&mut self, name: &str, rules: &[String]) {
        for r in rules {
            let _ = writeln!(self.rules, "add rule inet {} {name} {r}", table_of(name));
        }
        self.ops += 1;
    }

    /// The transaction's text.
    pub fn text(&self) -> String {
        let mut out = self.declare.clone();
        let chunks = |out: &mut String, verb: &str, sets: &BTreeMap<String, Vec<String>>| {
            for (set, els) in sets {
                for c in els.chunks(CHUNK) {
                    let _ = writeln!(
                        out,
                        "{verb} element inet {} {set} {{ {} }}",
                        table_of(set),
                        c.join(", ")
                    );
                }
            }
        };
        chunks(&mut out, "delete", &self.del_elements);
        for c in &self.flush {
            let _ = writeln!(out, "flush chain inet {} {c}", table_of(c));
        }
        for m in &self.flush_maps {
            if !self.delete_sets.contains(m) {
                let _ = writeln!(out, "flush map inet {} {m}", table_of(m));
            }
        }
        for c in &self.delete_chains {
            let _ = writeln!(out, "delete chain inet {} {c}", table_of(c));
        }
        for s in &self.delete_sets {
            // set or map: `delete set` works for both only by kind; name both
            let _ = writeln!(out, "delete {} inet {} {s}", kind_of(s), table_of(s));
        }
        out.push_str(&self.redeclare);
        chunks(&mut out, "add", &self.add_elements);
        out.push_str(&self.rules);
        out
    }
}

/// The table the proxy's object `name` is in (by its name: the endpoint
/// choice's objects are `pick...`, `pickers` and `endpoints_...`).
pub fn table_of(name: &str) -> &'static str {
    if name.starts_with("pick") || name.starts_with("endpoints_") {
        PICK_TABLE
    } else {
        TABLE
    }
}

/// Whether the proxy's object `name` is a map or a set (by its prefix).
pub fn kind_of(name: &str) -> &'static str {
    if name.starts_with("fw-") {
        "set"
    } else {
        "map"
    }
}

/// Chains of `f` whose rules mention set `set`.
fn users<'a>(f: &'a Fragment, set: &'a str) -> impl Iterator<Item = &'a String> + 'a {
    let needle = format!("@{set}");
    f.chains.iter().filter_map(move |(name, rules)| {
        rules
            .iter()
            .any(|r| r.split_whitespace().any(|w| w == needle))
            .then_some(name)
    })
}

/// An endpoint a Service port's chain no longer sends to: (port id,
/// whether of its `local-ID` chain, the endpoint).
pub type Lost = (String, bool, SocketAddr);

/// The endpoints of `old`'s ports that `new`'s no longer have, per chain
/// (a port's endpoint lists are sorted: see `endpoints::for_port`).
pub fn lost(old: &Fragment, new: &Fragment) -> Vec<Lost> {
    let mut out = Vec::new();
    for p in &old.ports {
        let now = new.ports.iter().find(|q| q.id == p.id);
        for (local, was, is) in [
            (false, &p.endpoints, now.map(|q| &q.endpoints)),
            (true, &p.local, now.map(|q| &q.local)),
        ] {
            for e in was {
                if is.is_none_or(|is| is.binary_search(e).is_err()) {
                    out.push((p.id.clone(), local, *e));
                }
            }
        }
    }
    out
}

/// Adds to `s` what turns `old` into `new` (one Service's own objects;
/// the shared maps are the caller's). Returns the endpoints its chains
/// no longer send to (their stale UDP flows must go).
pub fn diff(s: &mut Script, old: &Fragment, new: &Fragment) -> Vec<Lost> {
    let mut changed_chains: BTreeSet<&String> = BTreeSet::new();
    for (name, def) in &new.sets {
        match old.sets.get(name) {
            None => {
                s.add_set(name, def);
                for (k, v) in &def.elements {
                    s.add_element(name, k, v);
                }
            }
            Some(o) if o.decl != def.decl => {
                s.replace_set(name, def);
                for (k, v) in &def.elements {
                    s.add_element(name, k, v);
                }
                // rules that use it are re-added after its re-declaration
                changed_chains.extend(users(new, name));
            }
            Some(o) => {
                for (k, v) in &o.elements {
                    match def.elements.get(k) {
                        Some(nv) if nv == v => {}
                        other => {
                            s.del_element(name, k);
                            if let Some(nv) = other {
                                s.add_element(name, k, nv);
                            }
                        }
                    }
                }
                for (k, v) in &def.elements {
                    if !o.elements.contains_key(k) {
                        s.add_element(name, k, v);
                    }
                }
            }
        }
    }
    for (name, rules) in &new.chains {
        match old.chains.get(name) {
            None => {
                s.add_chain(name);
                s.rules(name, rules);
            }
            Some(o) if o != rules || changed_chains.contains(name) => {
                s.flush_chain(name);
                s.rules(name, rules);
            }
            Some(_) => {}
        }
    }
    for name in old.chains.keys() {
        if !new.chains.contains_key(name) {
            s.delete_chain(name);
        }
    }
    for name in old.sets.keys() {
        if !new.sets.contains_key(name) {
            s.delete_set(name);
        }
    }
    let gone = lost(old, new);
    // an endpoint that went: clients kept on it by affinity start over
    for (id, local, _) in &gone {
        let aff = format!("{}-{id}", if *local { "laff" } else { "aff" });
        if new.sets.contains_key(&aff) && old.sets.contains_key(&aff) {
            s.flush_map(&aff);
        }
    }
    gone
}

/// `f`'s objects as `add` commands: declarations (chains empty) into
/// `decl`, rules into `rules`, elements collected per set.
pub fn full(
    f: &Fragment,
    decl: &mut String,
    rules: &mut String,
    elements: &mut BTreeMap<String, Vec<String>>,
) {
    for (name, def) in &f.sets {
        decl.push_str(&set_decl(name, def));
        if !def.elements.is_empty() {
            elements
                .entry(name.clone())
                .or_default()
                .extend(def.elements.iter().map(|(k, v)| element(k, v)));
        }
    }
    for (name, body) in &f.chains {
        let _ = writeln!(decl, "add chain inet {} {name}", table_of(name));
        for r in body {
            let _ = writeln!(rules, "add rule inet {} {name} {r}", table_of(name));
        }
    }
}

/// The declaration of the proxy's set or map `name`, from its name alone
/// (the naming is the proxy's own): what encodes its elements when a
/// script changes a set it does not declare.
pub fn decl_of(name: &str) -> Option<String> {
    if let Some(s) = Shared::ALL.iter().find(|s| s.name() == name) {
        return Some(s.decl().to_string());
    }
    if name == "node_ips" {
        return Some(crate::base::NODE_IPS_DECL.to_string());
    }
    if name == crate::base::STAMP || name == crate::base::PICK_STAMP {
        return Some(crate::base::STAMP_DECL.to_string());
    }
    if name.starts_with("fw-") {
        return Some(FW_DECL.to_string());
    }
    if name.starts_with("aff-") || name.starts_with("laff-") {
        return Some("type ipv4_addr : ipv4_addr . inet_service; flags dynamic,timeout;".into());
    }
    None
}

/// The declaration of a load balancer source range set.
pub const FW_DECL: &str = "type ipv4_addr; flags interval;";

/// `add element` lines for `elements`.
pub fn element_lines(out: &mut String, elements: &BTreeMap<String, Vec<String>>) {
    for (set, els) in elements {
        for c in els.chunks(CHUNK) {
            let _ = writeln!(
                out,
                "add element inet {} {set} {{ {} }}",
                table_of(set),
                c.join(", ")
            );
        }
    }
}

/// `Shared` entries as element strings.
pub fn shared_element(kind: Shared, key: &str, value: &str) -> (String, String) {
    (kind.name().to_string(), element(key, value))
}
