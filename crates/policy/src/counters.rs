//! The kernel's packet counters of the drop rules (`nft -j list table`),
//! each attributed to the tier and policy whose rule it is, by chain and
//! position in the [`Desired`] that was loaded.

use crate::compile::{Desired, Verdict};
use std::collections::BTreeMap;

/// One drop rule's packets: (chain, position) -> (tier, policy, packets).
pub type Drops = BTreeMap<(String, usize), (&'static str, String, u64)>;

/// The drop rules' counters in `json` (nft's JSON listing of the table),
/// for the rules `d` says are drops; rules nft lists that `d` does not
/// know (the base chains) are left out.
pub fn drops(json: &str, d: &Desired) -> Result<Drops, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("nft -j printed no JSON: {e}"))?;
    let mut position: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = Drops::new();
    for o in v["nftables"].as_array().into_iter().flatten() {
        let Some(r) = o.get("rule") else { continue };
        let chain = r["chain"].as_str().unwrap_or_default().to_string();
        let i = {
            let n = position.entry(chain.clone()).or_default();
            *n += 1;
            *n - 1
        };
        let Some((_, rules)) = d.chains.get(&chain) else {
            continue;
        };
        let Some(rule) = rules.get(i) else { continue };
        if rule.verdict != Verdict::Drop {
            continue;
        }
        let packets = r["expr"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|e| e.get("counter"))
            .and_then(|c| c["packets"].as_u64())
            .unwrap_or(0);
        out.insert(
            (chain, i),
            (rule.origin.tier, rule.origin.policy.clone(), packets),
        );
    }
    Ok(out)
}

/// Per (tier, policy), the packets dropped since `before` (a rule whose
/// counter went down was made anew: all of its count is new).
pub fn delta(before: &Drops, now: &Drops) -> BTreeMap<(&'static str, String), u64> {
    let mut out = BTreeMap::new();
    for (k, (tier, policy, n)) in now {
        let was = before.get(k).map(|(_, _, p)| *p).unwrap_or(0);
        let d = if *n >= was { n - was } else { *n };
        if d > 0 {
            *out.entry((*tier, policy.clone())).or_default() += d;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{Origin, RuleDef};
    use crate::model::Direction;

    #[test]
    fn drops_are_read_by_chain_and_position() {
        let rule = |v: Verdict, policy: &str| RuleDef {
            peer: None,
            ports: None,
            named: None,
            verdict: v,
            origin: Origin {
                tier: "NetworkPolicy",
                policy: policy.into(),
                rule: None,
            },
        };
        let mut d = Desired::default();
        d.chains.insert(
            "in-1".into(),
            (
                Direction::Ingress,
                vec![rule(Verdict::Accept, "x/a"), rule(Verdict::Drop, "x/a,x/b")],
            ),
        );
        let json = r#"{"nftables": [{"metainfo": {}},
            {"rule": {"chain": "ingress_hook", "expr": [{"counter": {"packets": 9, "bytes": 1}}, {"drop": null}]}},
            {"rule": {"chain": "in-1", "expr": [{"counter": {"packets": 5, "bytes": 1}}, {"accept": null}]}},
            {"rule": {"chain": "in-1", "expr": [{"counter": {"packets": 3, "bytes": 1}}, {"drop": null}]}}]}"#;
        let now = drops(json, &d).expect("parsed");
        assert_eq!(now.len(), 1);
        assert_eq!(now[&("in-1".to_string(), 1)].2, 3);
        let before = Drops::new();
        let dl = delta(&before, &now);
        assert_eq!(dl[&("NetworkPolicy", "x/a,x/b".to_string())], 3);
        // a counter that went down belongs to a chain made anew
        let mut later = now.clone();
        later.get_mut(&("in-1".to_string(), 1)).expect("rule").2 = 1;
        assert_eq!(
            delta(&now, &later)[&("NetworkPolicy", "x/a,x/b".to_string())],
            1
        );
        assert!(drops("not json", &d).is_err());
    }
}
