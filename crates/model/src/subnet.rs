//! Choosing a node's subnet of the cluster network (pure; the datastore's
//! compare-and-swap decides who really gets it).

use crate::netconf::ClusterConfig;
use ipnet::Ipv4Net;
use std::collections::HashMap;

/// A small stable hash of a node name, to spread first choices.
fn spread(node: &str) -> u64 {
    // FNV-1a
    node.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Picks the subnet `node` should try to claim. `taken` maps claimed
/// subnets to their holder. The node's own claim wins, then its `previous`
/// subnet if free, then the first free one after a name-derived offset.
/// `None` means the cluster network is exhausted.
pub fn choose(
    cfg: &ClusterConfig,
    node: &str,
    taken: &HashMap<Ipv4Net, String>,
    previous: Option<Ipv4Net>,
) -> Option<Ipv4Net> {
    if let Some((net, _)) = taken
        .iter()
        .find(|(net, holder)| holder.as_str() == node && in_range(cfg, **net))
    {
        return Some(*net);
    }
    if let Some(p) = previous.filter(|p| in_range(cfg, *p) && !taken.contains_key(p)) {
        return Some(p);
    }
    let all: Vec<Ipv4Net> = cfg.subnets().collect();
    if all.is_empty() {
        return None;
    }
    let start = (spread(node) % all.len() as u64) as usize;
    (0..all.len())
        .map(|i| all[(start + i) % all.len()])
        .find(|n| !taken.contains_key(n))
}

/// True when `net` is one of the config's leasable subnets.
pub fn in_range(cfg: &ClusterConfig, net: Ipv4Net) -> bool {
    net.prefix_len() == cfg.subnet_len
        && net.network() >= cfg.subnet_min
        && net.network() <= cfg.subnet_max
        && net.trunc() == net
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> ClusterConfig {
        ClusterConfig::parse(r#"{"Network":"10.244.0.0/22","SubnetLen":24}"#).expect("cfg")
    }

    #[test]
    fn own_then_previous_then_free_then_none() {
        let c = cfg(); // 10.244.1.0, .2.0, .3.0
        let n = |s: &str| s.parse::<Ipv4Net>().expect("net");
        let mut taken = HashMap::from([(n("10.244.2.0/24"), "a".to_string())]);
        assert_eq!(choose(&c, "a", &taken, None), Some(n("10.244.2.0/24")));
        assert_eq!(
            choose(&c, "b", &taken, Some(n("10.244.3.0/24"))),
            Some(n("10.244.3.0/24"))
        );
        assert_ne!(
            choose(&c, "b", &taken, Some(n("10.244.2.0/24"))),
            Some(n("10.244.2.0/24"))
        );
        taken.insert(n("10.244.1.0/24"), "x".into());
        taken.insert(n("10.244.3.0/24"), "y".into());
        assert_eq!(choose(&c, "b", &taken, None), None);
    }

    proptest! {
        #[test]
        fn never_a_taken_subnet(names in proptest::collection::vec("[a-z]{1,8}", 1..40)) {
            let c = ClusterConfig::parse(r#"{"Network":"10.0.0.0/16","SubnetLen":20}"#).expect("cfg");
            let mut taken = HashMap::new();
            for name in names {
                match choose(&c, &name, &taken, None) {
                    Some(net) => {
                        prop_assert!(in_range(&c, net));
                        if let Some(holder) = taken.get(&net) { prop_assert_eq!(holder, &name); }
                        taken.insert(net, name);
                    }
                    None => prop_assert_eq!(taken.len() as u32, c.capacity()),
                }
            }
        }
    }
}
