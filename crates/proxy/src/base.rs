//! The tables' fixed part: shared maps, hooks, the refusal, the
//! masquerade, the endpoint choice by chain id. Depends only on the
//! node's facts.

use crate::model::NodeFacts;
use crate::render::Shared;
use crate::{ID_MASK, MASQ_MARK, TABLE};
use std::fmt::Write;

/// The fixed chains: name -> (hook line or `""`, rules).
pub fn chains(node: &NodeFacts) -> Vec<(&'static str, String, Vec<String>)> {
    let _ = node;
    let hook =
        |t: &str, h: &str, prio: &str| format!("type {t} hook {h} priority {prio}; policy accept;");
    let record = format!("meta mark & {ID_MASK:#x} != 0 meta mark & {ID_MASK:#x} vmap @affinity");
    let clear = format!(
        "meta mark & {ID_MASK:#x} != 0 meta mark set meta mark & {:#x}",
        !ID_MASK
    );
    vec![
        // refusals (priorities: dstnat = -100, srcnat = 100, filter = 0;
        // by number: nft 1.0.6 takes names only in some hooks): TCP gets a reset, the rest ICMP port unreachable
        (
            "refuse",
            String::new(),
            vec!["meta l4proto tcp reject with tcp reset".into(), "reject".into()],
        ),
        // the one lookup per new connection
        (
            "dispatch",
            String::new(),
            vec![
                "ip daddr . meta l4proto . th dport vmap @services".into(),
                "ip daddr @node_ips meta l4proto . th dport vmap @nodeports".into(),
            ],
        ),
        ("nat_prerouting", hook("nat", "prerouting", "-100"), vec!["jump dispatch".into()]),
        ("nat_output", hook("nat", "output", "-100"), vec!["jump dispatch".into()]),
        (
            "nat_postrouting",
            hook("nat", "postrouting", "100"),
            vec![
                format!("ct status dnat ip saddr . ip daddr @hairpin meta mark set meta mark | {MASQ_MARK:#x}"),
                format!("meta mark & {MASQ_MARK:#x} == {MASQ_MARK:#x} meta mark set meta mark ^ {MASQ_MARK:#x} masquerade fully-random"),
            ],
        ),
        // load balancer source ranges, checked before DNAT
        (
            "firewall_check",
            String::new(),
            vec!["ip daddr . meta l4proto . th dport vmap @firewall".into()],
        ),
        ("filter_prerouting_pre", hook("filter", "prerouting", "-110"), vec!["ct state new jump firewall_check".into()]),
        ("filter_output_pre", hook("filter", "output", "-110"), vec!["ct state new jump firewall_check".into()]),
        // after both DNATs (-100 here, -99 in trellis-endpoints): client
        // affinity records the endpoint a new client got; the chain id
        // leaves the mark
        ("affinity_prerouting", hook("filter", "prerouting", "-98"), vec![record.clone(), clear.clone()]),
        ("affinity_output", hook("filter", "output", "-98"), vec![record, clear]),
        // what is not served (after DNAT: only the unserved keep their address)
        (
            "unserved",
            String::new(),
            vec![
                "ip daddr . meta l4proto . th dport vmap @no_endpoints".into(),
                "ip daddr @node_ips meta l4proto . th dport vmap @no_endpoint_nodeports".into(),
                "ip daddr @cluster_ips goto refuse".into(),
            ],
        ),
        ("filter_forward", hook("filter", "forward", "-10"), vec!["ct state new jump unserved".into()]),
        ("filter_input", hook("filter", "input", "-10"), vec!["ct state new jump unserved".into()]),
        ("filter_output", hook("filter", "output", "-10"), vec!["ct state new jump unserved".into()]),
    ]
}

/// The endpoint choice's fixed chains (table `trellis-endpoints`): the
/// chain id a Service port's chain put into the mark -> `pickers`. Its
/// own table: a change of `pickers` makes the kernel check the table it
/// is in, and this one holds no Service's rules.
pub fn pick_chains() -> Vec<(&'static str, String, Vec<String>)> {
    let pick = format!("meta mark & {ID_MASK:#x} != 0 meta mark & {ID_MASK:#x} vmap @pickers");
    vec![
        (
            "pick_prerouting",
            "type nat hook prerouting priority -99; policy accept;".into(),
            vec![pick.clone()],
        ),
        (
            "pick_output",
            "type nat hook output priority -99; policy accept;".into(),
            vec![pick],
        ),
    ]
}

/// The shared sets and maps as `add` commands, `node_ips` filled.
pub fn sets(node: &NodeFacts) -> String {
    let mut out = String::new();
    for s in Shared::ALL {
        let kind = if s.is_map() { "map" } else { "set" };
        let _ = writeln!(
            out,
            "add {kind} inet {} {} {{ {} }}",
            s.table(),
            s.name(),
            s.decl()
        );
    }
    let _ = writeln!(out, "add set inet {TABLE} node_ips {{ {NODE_IPS_DECL} }}");
    let _ = writeln!(out, "add set inet {TABLE} {STAMP} {{ {STAMP_DECL} }}");
    let _ = writeln!(
        out,
        "add set inet {} {PICK_STAMP} {{ {STAMP_DECL} }}",
        crate::PICK_TABLE
    );
    let ips: Vec<String> = node
        .addresses
        .iter()
        .filter(|a| a.is_ipv4())
        .map(ToString::to_string)
        .collect();
    if !ips.is_empty() {
        let _ = writeln!(
            out,
            "add element inet {TABLE} node_ips {{ {} }}",
            ips.join(", ")
        );
    }
    out
}

/// A set holding one number written with each whole-table load: which
/// load the table comes from (the agent's journal of what it applied
/// since names the same number, or the journal does not describe it).
pub const STAMP: &str = "stamp";
/// Its declaration.
pub const STAMP_DECL: &str = "type mark;";
/// The same number in `trellis-endpoints` (both tables come from one load).
pub const PICK_STAMP: &str = "pick_stamp";

/// The declaration of `node_ips`.
pub const NODE_IPS_DECL: &str = "type ipv4_addr;";
