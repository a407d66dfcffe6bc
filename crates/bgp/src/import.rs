//! From a received UPDATE to RIB paths: attribute extraction, loop
//! prevention (AS_PATH, ORIGINATOR_ID, CLUSTER_LIST) and the import policy
//! (which prefixes a peer may give us). Pure.

use crate::rib::Path;
use crate::wire::{AsSegment, PathAttribute, Update};
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

/// Who sent an UPDATE, as import needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FromPeer {
    /// The peer's address.
    pub addr: IpAddr,
    /// Its router id.
    pub router_id: Ipv4Addr,
    /// Its AS.
    pub asn: u32,
    /// It is in another AS.
    pub ebgp: bool,
}

/// This speaker, as loop prevention needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Me {
    /// Our AS.
    pub asn: u32,
    /// Our router id.
    pub router_id: Ipv4Addr,
    /// Our cluster id when we reflect routes.
    pub cluster_id: Option<Ipv4Addr>,
}

/// Which prefixes may be accepted, from whom.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportPolicy {
    /// Accepted prefixes must lie inside one of these (empty: anywhere).
    pub inside: Vec<IpNet>,
    /// When set, node peers give us only what the originating router owns:
    /// the originator (ORIGINATOR_ID, else the peer's router id) must map
    /// to exactly this prefix (a node and its leased subnet); routers not
    /// in the map own nothing. External peers may pass on any owned prefix
    /// (a ToR re-announcing node subnets), nothing else.
    pub owners: Option<HashMap<Ipv4Addr, IpNet>>,
    /// Never accepted (our own subnet).
    pub own: Vec<IpNet>,
    /// Most prefixes held from one peer; more are refused (0: no limit).
    pub max_prefixes: usize,
}

/// Why a prefix was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Outside every allowed network.
    Outside(IpNet),
    /// The originator does not own it.
    NotOwner {
        /// The prefix.
        prefix: IpNet,
        /// Its originator.
        originator: Ipv4Addr,
        /// What the originator owns, if anything.
        owns: Option<IpNet>,
    },
    /// It is (or overlaps) our own subnet.
    Own(IpNet),
    /// Over the peer's max-prefix limit.
    Limit(IpNet, usize),
    /// A routing loop (our AS, router id or cluster id in the path).
    Loop(IpNet, &'static str),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Outside(p) => write!(f, "{p} is outside the networks accepted from peers"),
            Self::NotOwner {
                prefix,
                originator,
                owns: Some(o),
            } => write!(
                f,
                "{prefix} from {originator}, which holds {o} and nothing else"
            ),
            Self::NotOwner {
                prefix,
                originator,
                owns: None,
            } => write!(f, "{prefix} from {originator}, which holds no subnet"),
            Self::Own(p) => write!(f, "{p} is this node's own subnet"),
            Self::Limit(p, n) => write!(f, "{p}: peer is at its limit of {n} prefixes"),
            Self::Loop(p, why) => write!(f, "{p}: loop ({why})"),
        }
    }
}

impl ImportPolicy {
    /// Whether `prefix` from `originator` may enter the Loc-RIB; `node`:
    /// it came from a node peer (not an external router).
    pub fn check(&self, prefix: &IpNet, originator: Ipv4Addr, node: bool) -> Result<(), Refusal> {
        if self
            .own
            .iter()
            .any(|o| o.contains(prefix) || prefix.contains(o))
        {
            return Err(Refusal::Own(*prefix));
        }
        if !self.inside.is_empty() && !self.inside.iter().any(|n| n.contains(prefix)) {
            return Err(Refusal::Outside(*prefix));
        }
        if let Some(owners) = &self.owners {
            if !node {
                if owners.values().any(|o| o == prefix) {
                    return Ok(());
                }
                return Err(Refusal::NotOwner {
                    prefix: *prefix,
                    originator,
                    owns: owners.get(&originator).copied(),
                });
            }
            match owners.get(&originator) {
                Some(o) if o == prefix => {}
                owns => {
                    return Err(Refusal::NotOwner {
                        prefix: *prefix,
                        originator,
                        owns: owns.copied(),
                    })
                }
            }
        }
        Ok(())
    }
}

/// An UPDATE turned into paths: what to announce, what to withdraw, and
/// what was refused by loop prevention (policy runs later, per prefix).
#[derive(Debug, Default)]
pub struct Imported {
    /// Announced prefixes with their path (one shared path per family).
    pub announced: Vec<(IpNet, crate::rib::SharedPath)>,
    /// Withdrawn prefixes.
    pub withdrawn: Vec<IpNet>,
    /// Refused by loop prevention.
    pub refused: Vec<Refusal>,
}

/// Reads an UPDATE from `peer`.
pub fn import(u: Update, peer: &FromPeer, me: &Me) -> Imported {
    let mut out = Imported {
        withdrawn: u.withdrawals(),
        ..Default::default()
    };
    if u.treat_as_withdraw.is_some() {
        return out;
    }
    let announced = u.announced();
    if announced.is_empty() {
        return out;
    }
    let mut next_hop_v4 = None;
    let mut next_hop_mp = None;
    let mut local_pref = 100;
    let mut med = 0;
    let mut origin = 0;
    let mut as_path_len = 0;
    let mut neighbor_as = None;
    let mut has_own_as = false;
    let mut originator_id = None;
    let mut cluster_list_len = 0;
    let mut cluster_loop = false;
    let mut attrs = Vec::with_capacity(u.attributes.len());
    for a in u.attributes {
        match &a {
            PathAttribute::NextHop(n) => next_hop_v4 = Some(IpAddr::V4(*n)),
            PathAttribute::MpReach { next_hops, .. } => next_hop_mp = next_hops.first().copied(),
            PathAttribute::LocalPref(l) => local_pref = *l,
            PathAttribute::Med(m) => med = *m,
            PathAttribute::Origin(o) => origin = *o,
            PathAttribute::AsPath(segs) => {
                for s in segs {
                    match s {
                        AsSegment::Sequence(v) => {
                            as_path_len += v.len();
                            if neighbor_as.is_none() {
                                neighbor_as = v.first().copied();
                            }
                            has_own_as |= v.contains(&me.asn);
                        }
                        AsSegment::Set(v) => {
                            as_path_len += usize::from(!v.is_empty());
                            has_own_as |= v.contains(&me.asn);
                        }
                    }
                }
            }
            PathAttribute::OriginatorId(o) => originator_id = Some(*o),
            PathAttribute::ClusterList(l) => {
                cluster_list_len = l.len();
                cluster_loop = me.cluster_id.is_some_and(|c| l.contains(&c));
            }
            _ => {}
        }
        if !matches!(
            a,
            PathAttribute::MpReach { .. } | PathAttribute::MpUnreach { .. }
        ) {
            attrs.push(a);
        }
    }
    let why = if peer.ebgp && has_own_as {
        Some("our AS in AS_PATH")
    } else if originator_id == Some(me.router_id) {
        Some("our router id as ORIGINATOR_ID")
    } else if cluster_loop {
        Some("our cluster id in CLUSTER_LIST")
    } else {
        None
    };
    if let Some(why) = why {
        out.refused = announced.iter().map(|p| Refusal::Loop(*p, why)).collect();
        return out;
    }
    let attrs = Arc::new(attrs);
    let base = Path {
        next_hop: next_hop_v4.unwrap_or(peer.addr),
        local_pref: if peer.ebgp { 100 } else { local_pref },
        as_path_len,
        neighbor_as: if peer.ebgp {
            Some(peer.asn)
        } else {
            neighbor_as
        },
        origin,
        med,
        ebgp: peer.ebgp,
        router_id: peer.router_id,
        originator_id,
        cluster_list_len,
        attrs,
    };
    let v6 = next_hop_mp.map(|nh| {
        Arc::new(Path {
            next_hop: nh,
            ..base.clone()
        })
    });
    let v4 = Arc::new(base);
    out.announced.reserve(announced.len());
    for p in announced {
        let path = if p.addr().is_ipv6() {
            match &v6 {
                Some(v6) => v6.clone(),
                None => continue,
            }
        } else {
            v4.clone()
        };
        out.announced.push((p, path));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    fn me() -> Me {
        Me {
            asn: 64512,
            router_id: Ipv4Addr::new(192, 0, 2, 11),
            cluster_id: Some(Ipv4Addr::new(0, 0, 0, 1)),
        }
    }

    fn peer(ebgp: bool) -> FromPeer {
        FromPeer {
            addr: IpAddr::from([192, 0, 2, 12]),
            router_id: Ipv4Addr::new(192, 0, 2, 12),
            asn: if ebgp { 65000 } else { 64512 },
            ebgp,
        }
    }

    fn update(extra: Vec<PathAttribute>) -> Update {
        let mut attributes = vec![
            PathAttribute::Origin(0),
            PathAttribute::AsPath(vec![]),
            PathAttribute::NextHop(Ipv4Addr::new(192, 0, 2, 12)),
        ];
        attributes.extend(extra);
        Update {
            attributes,
            nlri: vec![net("10.244.2.0/24")],
            withdrawn: vec![net("10.244.9.0/24")],
            ..Default::default()
        }
    }

    #[test]
    fn paths_carry_next_hop_and_originator() {
        let got = import(update(vec![]), &peer(false), &me());
        assert_eq!(got.withdrawn, vec![net("10.244.9.0/24")]);
        let (p, path) = &got.announced[0];
        assert_eq!(*p, net("10.244.2.0/24"));
        assert_eq!(path.next_hop, IpAddr::from([192, 0, 2, 12]));
        assert_eq!(path.originator(), Ipv4Addr::new(192, 0, 2, 12));
        let reflected = import(
            update(vec![
                PathAttribute::OriginatorId(Ipv4Addr::new(192, 0, 2, 13)),
                PathAttribute::ClusterList(vec![Ipv4Addr::new(0, 0, 0, 2)]),
            ]),
            &peer(false),
            &me(),
        );
        assert_eq!(
            reflected.announced[0].1.originator(),
            Ipv4Addr::new(192, 0, 2, 13)
        );
    }

    #[test]
    fn loops_are_refused() {
        for (attr, ebgp) in [
            (
                PathAttribute::OriginatorId(Ipv4Addr::new(192, 0, 2, 11)),
                false,
            ),
            (
                PathAttribute::ClusterList(vec![Ipv4Addr::new(0, 0, 0, 1)]),
                false,
            ),
        ] {
            let got = import(update(vec![attr]), &peer(ebgp), &me());
            assert!(got.announced.is_empty());
            assert!(matches!(got.refused[0], Refusal::Loop(..)));
        }
        let mut u = update(vec![]);
        u.attributes[1] = PathAttribute::AsPath(vec![AsSegment::Sequence(vec![65000, 64512])]);
        let got = import(u, &peer(true), &me());
        assert!(matches!(got.refused[0], Refusal::Loop(..)));
    }

    #[test]
    fn treat_as_withdraw_withdraws_everything() {
        let mut u = update(vec![]);
        u.treat_as_withdraw = Some(crate::Notification {
            code: 3,
            subcode: 1,
            data: vec![],
        });
        let got = import(u, &peer(false), &me());
        assert!(got.announced.is_empty());
        assert!(got.withdrawn.contains(&net("10.244.2.0/24")));
    }

    #[test]
    fn policy_inside_owner_own() {
        let n2 = Ipv4Addr::new(192, 0, 2, 12);
        let pol = ImportPolicy {
            inside: vec![net("10.244.0.0/16")],
            owners: Some(HashMap::from([(n2, net("10.244.2.0/24"))])),
            own: vec![net("10.244.1.0/24")],
            max_prefixes: 0,
        };
        assert_eq!(pol.check(&net("10.244.2.0/24"), n2, true), Ok(()));
        assert!(matches!(
            pol.check(&net("10.99.0.0/24"), n2, true),
            Err(Refusal::Outside(_))
        ));
        assert!(matches!(
            pol.check(&net("10.244.3.0/24"), n2, true),
            Err(Refusal::NotOwner { owns: Some(_), .. })
        ));
        assert!(matches!(
            pol.check(&net("10.244.3.0/24"), Ipv4Addr::new(192, 0, 2, 99), true),
            Err(Refusal::NotOwner { owns: None, .. })
        ));
        assert!(matches!(
            pol.check(&net("10.244.1.0/25"), n2, true),
            Err(Refusal::Own(_))
        ));
        // a router passes on node subnets, not others
        let tor = Ipv4Addr::new(192, 0, 2, 1);
        assert_eq!(pol.check(&net("10.244.2.0/24"), tor, false), Ok(()));
        assert!(pol.check(&net("10.244.3.0/24"), tor, false).is_err());
        assert!(pol.check(&net("10.98.0.0/24"), tor, false).is_err());
        let open = ImportPolicy::default();
        assert_eq!(open.check(&net("0.0.0.0/0"), n2, true), Ok(()));
    }
}
