//! [`Desired`] -> nft scripts: the whole table at start, afterwards only
//! what changed between two of them, in an order the kernel accepts in one
//! transaction (sets and chains before what names them, map elements off a
//! chain before it goes).

use crate::compile::{Desired, RuleDef, Verdict};
use crate::model::Direction;
use crate::TABLE;
use std::collections::BTreeSet;
use std::fmt::Write;

/// One rule as nft writes it.
pub fn rule(r: &RuleDef, d: Direction) -> String {
    let mut s = String::new();
    let other = match d {
        Direction::Ingress => "saddr",
        Direction::Egress => "daddr",
    };
    if let Some(p) = &r.peer {
        let _ = write!(s, "ip {other} @{p} ");
    }
    if let Some(p) = &r.ports {
        let _ = write!(s, "meta l4proto . th dport @{p} ");
    }
    if let Some(n) = &r.named {
        let _ = write!(s, "ip daddr . meta l4proto . th dport @{n} ");
    }
    let verdict = match &r.verdict {
        Verdict::Accept => "accept".to_string(),
        Verdict::Drop => "drop".to_string(),
        Verdict::Goto(c) => format!("goto {c}"),
        Verdict::Jump(c) => format!("jump {c}"),
        Verdict::Log(l) => {
            // no counter: the drop after it counts
            let _ = write!(
                s,
                "limit rate {}/second burst {} packets log prefix \"{}\" group {}",
                l.rate,
                l.rate,
                crate::log::prefix(&r.origin),
                l.group
            );
            return s;
        }
    };
    s.push_str("counter ");
    s.push_str(&verdict);
    s
}

/// The base chains: replies pass; a TCP packet of a connection the agent
/// cut (its conntrack entry deleted because a policy now denies it) is
/// dropped when it would start a new entry mid-stream (`cut`, both
/// directions, 2 minutes); then one map lookup per direction.
const BASE: &str = "    set cut { type ipv4_addr . ipv4_addr . inet_service . inet_service; flags timeout; timeout 2m; }
    chain egress_hook {
        type filter hook forward priority 0; policy accept;
        ct state established,related accept
        ct state new meta l4proto tcp ip saddr . ip daddr . tcp sport . tcp dport @cut counter drop
        ip saddr vmap @egress
    }
    chain ingress_hook {
        type filter hook forward priority 5; policy accept;
        ct state established,related accept
        ip daddr vmap @ingress
    }
";

/// The script that marks TCP connections as cut (see [`BASE`]): each as
/// (source, destination, source port, destination port), both ways.
pub fn cut(flows: &[(std::net::Ipv4Addr, std::net::Ipv4Addr, u16, u16)]) -> String {
    if flows.is_empty() {
        return String::new();
    }
    let els: Vec<String> = flows
        .iter()
        .flat_map(|(a, b, p, q)| {
            [
                format!("{a} . {b} . {p} . {q}"),
                format!("{b} . {a} . {q} . {p}"),
            ]
        })
        .collect();
    format!("add element inet {TABLE} cut {{ {} }}\n", els.join(", "))
}

fn elements(items: &[String]) -> String {
    items.join(", ")
}

/// The whole table (replacing any there was) in one transaction.
pub fn full(d: &Desired) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "table inet {TABLE} {{}}");
    let _ = writeln!(s, "delete table inet {TABLE}");
    let _ = writeln!(s, "table inet {TABLE} {{");
    let _ = writeln!(s, "    set policed {{ type ipv4_addr; }}");
    let _ = writeln!(s, "    map ingress {{ type ipv4_addr : verdict; }}");
    let _ = writeln!(s, "    map egress {{ type ipv4_addr : verdict; }}");
    for (name, set) in &d.sets {
        let _ = writeln!(s, "    set {name} {{ {} }}", set.decl());
    }
    for name in d.chains.keys() {
        let _ = writeln!(s, "    chain {name} {{}}");
    }
    s.push_str(BASE);
    s.push_str("}\n");
    for (name, set) in &d.sets {
        let e = set.elements();
        if !e.is_empty() {
            let _ = writeln!(s, "add element inet {TABLE} {name} {{ {} }}", elements(&e));
        }
    }
    let chains = chain_order(d);
    for name in &chains {
        let (dir, rules) = &d.chains[name];
        for r in rules {
            let _ = writeln!(s, "add rule inet {TABLE} {name} {}", rule(r, *dir));
        }
    }
    maps(&mut s, &Desired::default(), d);
    s
}

/// Chains in an order where a chain's jump and goto targets come first
/// (the kernel checks loops as rules are added).
fn chain_order(d: &Desired) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(d: &Desired, n: &str, seen: &mut BTreeSet<String>, out: &mut Vec<String>) {
        if !seen.insert(n.to_string()) {
            return;
        }
        if let Some((_, rules)) = d.chains.get(n) {
            for r in rules {
                if let Verdict::Goto(c) | Verdict::Jump(c) = &r.verdict {
                    visit(d, c, seen, out);
                }
            }
        }
        out.push(n.to_string());
    }
    for n in d.chains.keys() {
        visit(d, n, &mut seen, &mut out);
    }
    out
}

fn maps(s: &mut String, old: &Desired, new: &Desired) {
    for dir in Direction::BOTH {
        let map = match dir {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        let (o, n) = (old.dispatch(dir), new.dispatch(dir));
        let gone: Vec<String> = o
            .iter()
            .filter(|(a, c)| n.get(a) != Some(c))
            .map(|(a, _)| a.to_string())
            .collect();
        if !gone.is_empty() {
            let _ = writeln!(
                s,
                "delete element inet {TABLE} {map} {{ {} }}",
                elements(&gone)
            );
        }
        let add: Vec<String> = n
            .iter()
            .filter(|(a, c)| o.get(a) != Some(c))
            .map(|(a, c)| format!("{a} : goto {c}"))
            .collect();
        if !add.is_empty() {
            let _ = writeln!(s, "add element inet {TABLE} {map} {{ {} }}", elements(&add));
        }
    }
    let (po, pn) = (old.policed(), new.policed());
    let gone: Vec<String> = po.difference(&pn).map(|a| a.to_string()).collect();
    let add: Vec<String> = pn.difference(&po).map(|a| a.to_string()).collect();
    if !gone.is_empty() {
        let _ = writeln!(
            s,
            "delete element inet {TABLE} policed {{ {} }}",
            elements(&gone)
        );
    }
    if !add.is_empty() {
        let _ = writeln!(
            s,
            "add element inet {TABLE} policed {{ {} }}",
            elements(&add)
        );
    }
}

/// What turns the table of `old` into the one of `new`; empty when they
/// are the same.
pub fn diff(old: &Desired, new: &Desired) -> String {
    let mut s = String::new();
    // new sets, and elements of the kept ones
    for (name, set) in &new.sets {
        match old.sets.get(name) {
            Some(o) if o.same_kind(set) => {
                let (oe, ne): (BTreeSet<String>, BTreeSet<String>) = (
                    o.elements().into_iter().collect(),
                    set.elements().into_iter().collect(),
                );
                let gone: Vec<String> = oe.difference(&ne).cloned().collect();
                let add: Vec<String> = ne.difference(&oe).cloned().collect();
                if !gone.is_empty() {
                    let _ = writeln!(
                        s,
                        "delete element inet {TABLE} {name} {{ {} }}",
                        elements(&gone)
                    );
                }
                if !add.is_empty() {
                    let _ = writeln!(
                        s,
                        "add element inet {TABLE} {name} {{ {} }}",
                        elements(&add)
                    );
                }
            }
            // a new set (names carry their kind: never one of another kind)
            _ => {
                let _ = writeln!(s, "add set inet {TABLE} {name} {{ {} }}", set.decl());
                let e = set.elements();
                if !e.is_empty() {
                    let _ = writeln!(s, "add element inet {TABLE} {name} {{ {} }}", elements(&e));
                }
            }
        }
    }
    // new chains (content-named: an existing one never changes)
    for name in chain_order(new) {
        if old.chains.contains_key(&name) {
            continue;
        }
        let (dir, rules) = &new.chains[&name];
        let _ = writeln!(s, "add chain inet {TABLE} {name}");
        for r in rules {
            let _ = writeln!(s, "add rule inet {TABLE} {name} {}", rule(r, *dir));
        }
    }
    maps(&mut s, old, new);
    // chains no longer named: emptied, then deleted, callers first
    let mut gone: Vec<String> = chain_order(old)
        .into_iter()
        .filter(|c| !new.chains.contains_key(c))
        .collect();
    gone.reverse();
    for c in &gone {
        let _ = writeln!(s, "flush chain inet {TABLE} {c}");
    }
    for c in &gone {
        let _ = writeln!(s, "delete chain inet {TABLE} {c}");
    }
    for name in old.sets.keys() {
        if !new.sets.contains_key(name) {
            let _ = writeln!(s, "delete set inet {TABLE} {name}");
        }
    }
    s
}
