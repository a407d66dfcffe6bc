//! Adj-RIB-In and Loc-RIB with best-path selection (RFC 4271 9.1, with the
//! RFC 4456 tie-breaks). Pure: the speaker feeds it UPDATEs per peer and
//! gets back the prefixes whose best path changed.

use ipnet::IpNet;
use rustc_hash::FxHashMap;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

/// A peer, by its address.
pub type PeerId = IpAddr;

/// One path to a prefix, as learned from one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    /// Next hop.
    pub next_hop: IpAddr,
    /// LOCAL_PREF (100 when absent).
    pub local_pref: u32,
    /// Number of ASes in the AS_PATH (an AS_SET counts as one).
    pub as_path_len: usize,
    /// First AS of the path (the neighbouring AS), if any.
    pub neighbor_as: Option<u32>,
    /// ORIGIN: 0 IGP, 1 EGP, 2 INCOMPLETE.
    pub origin: u8,
    /// MED (0 when absent).
    pub med: u32,
    /// Learned over eBGP.
    pub ebgp: bool,
    /// The peer's router id.
    pub router_id: Ipv4Addr,
    /// ORIGINATOR_ID, when reflected (RFC 4456).
    pub originator_id: Option<Ipv4Addr>,
    /// CLUSTER_LIST length (RFC 4456).
    pub cluster_list_len: usize,
    /// The attributes as received (without MP_REACH/MP_UNREACH), for
    /// reflection; shared by every prefix of one UPDATE.
    pub attrs: std::sync::Arc<Vec<crate::wire::PathAttribute>>,
}

impl Path {
    /// The router that originated the path: ORIGINATOR_ID when reflected,
    /// else the peer's router id.
    pub fn originator(&self) -> Ipv4Addr {
        self.originator_id.unwrap_or(self.router_id)
    }
}

/// One peer's Adj-RIB-In (hashed: 100,000s of prefixes, looked up per UPDATE).
pub type Table = FxHashMap<IpNet, SharedPath>;

/// A path shared by every prefix of the UPDATE that carried it.
pub type SharedPath = std::sync::Arc<Path>;

/// A change of the best path for a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// New or different best path.
    Best(IpNet, PeerId, SharedPath),
    /// No path left.
    Gone(IpNet),
}

/// The RIBs of a speaker.
#[derive(Debug, Default, Clone)]
pub struct Rib {
    adj_in: HashMap<PeerId, Table>,
    loc: FxHashMap<IpNet, (PeerId, SharedPath)>,
}

/// True when `a` is preferred over `b` (RFC 4271 9.1.2.2, RFC 4456 9).
pub fn better(a: (&PeerId, &Path), b: (&PeerId, &Path)) -> bool {
    let (pa, a) = a;
    let (pb, b) = b;
    if a.local_pref != b.local_pref {
        return a.local_pref > b.local_pref;
    }
    if a.as_path_len != b.as_path_len {
        return a.as_path_len < b.as_path_len;
    }
    if a.origin != b.origin {
        return a.origin < b.origin;
    }
    // MED only between paths from the same neighbouring AS
    if a.neighbor_as == b.neighbor_as && a.med != b.med {
        return a.med < b.med;
    }
    if a.ebgp != b.ebgp {
        return a.ebgp;
    }
    let ida = a.originator_id.unwrap_or(a.router_id);
    let idb = b.originator_id.unwrap_or(b.router_id);
    if ida != idb {
        return ida < idb;
    }
    if a.cluster_list_len != b.cluster_list_len {
        return a.cluster_list_len < b.cluster_list_len;
    }
    pa < pb
}

impl Rib {
    /// An empty RIB.
    pub fn new() -> Self {
        Self::default()
    }

    /// The best path of every prefix.
    pub fn loc_rib(&self) -> &FxHashMap<IpNet, (PeerId, SharedPath)> {
        &self.loc
    }

    /// Prefixes held from `peer`.
    pub fn received(&self, peer: &PeerId) -> usize {
        self.adj_in.get(peer).map_or(0, Table::len)
    }

    /// Applies what `peer` announced and withdrew; returns the best-path changes.
    pub fn update(
        &mut self,
        peer: PeerId,
        announced: Vec<(IpNet, SharedPath)>,
        withdrawn: &[IpNet],
    ) -> Vec<Change> {
        let mut touched: Vec<IpNet> = Vec::with_capacity(announced.len() + withdrawn.len());
        let table = self.adj_in.entry(peer).or_default();
        for p in withdrawn {
            if table.remove(p).is_some() {
                touched.push(*p);
            }
        }
        for (p, path) in announced {
            table.insert(p, path);
            touched.push(p);
        }
        self.reselect(touched)
    }

    /// What `peer` sent that was accepted (its Adj-RIB-In after policy).
    pub fn adj_in(&self, peer: &PeerId) -> Option<&Table> {
        self.adj_in.get(peer)
    }

    /// Forgets everything `peer` sent (its session went down).
    pub fn peer_down(&mut self, peer: &PeerId) -> Vec<Change> {
        let Some(table) = self.adj_in.remove(peer) else {
            return vec![];
        };
        self.reselect(table.into_keys().collect())
    }

    fn reselect(&mut self, prefixes: Vec<IpNet>) -> Vec<Change> {
        let mut out = Vec::new();
        for p in prefixes {
            let best = self
                .adj_in
                .iter()
                .filter_map(|(peer, t)| t.get(&p).map(|path| (peer, path)))
                .fold(None::<(&PeerId, &SharedPath)>, |acc, cand| match acc {
                    Some(cur) if !better((cand.0, cand.1), (cur.0, cur.1)) => Some(cur),
                    _ => Some(cand),
                })
                .map(|(peer, path)| (*peer, path.clone()));
            match (best, self.loc.get(&p)) {
                // same peer, same (shared or equal) path: nothing changed
                (Some(b), Some(cur))
                    if cur.0 == b.0 && (SharedPath::ptr_eq(&cur.1, &b.1) || cur.1 == b.1) => {}
                (Some((peer, path)), _) => {
                    self.loc.insert(p, (peer, path.clone()));
                    out.push(Change::Best(p, peer, path));
                }
                (None, Some(_)) => {
                    self.loc.remove(&p);
                    out.push(Change::Gone(p));
                }
                (None, None) => {}
            }
        }
        out
    }
}

/// A plain iBGP path from the router at `nh`, for tests.
#[cfg(test)]
pub(crate) fn test_path(nh: [u8; 4]) -> Path {
    Path {
        next_hop: IpAddr::from(nh),
        local_pref: 100,
        as_path_len: 0,
        neighbor_as: None,
        origin: 0,
        med: 0,
        ebgp: false,
        router_id: Ipv4Addr::from(nh),
        originator_id: None,
        cluster_list_len: 0,
        attrs: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use super::test_path as path;

    fn peer(last: u8) -> PeerId {
        IpAddr::from([192, 0, 2, last])
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    #[test]
    fn best_path_order() {
        let base = path([192, 0, 2, 12]);
        let (p1, p2) = (peer(12), peer(13));
        let cases: Vec<(Path, Path)> = vec![
            (
                Path {
                    local_pref: 200,
                    ..base.clone()
                },
                base.clone(),
            ),
            (
                base.clone(),
                Path {
                    as_path_len: 2,
                    ..base.clone()
                },
            ),
            (
                base.clone(),
                Path {
                    origin: 2,
                    ..base.clone()
                },
            ),
            (
                Path {
                    ebgp: true,
                    ..base.clone()
                },
                base.clone(),
            ),
            (
                base.clone(),
                Path {
                    router_id: Ipv4Addr::new(192, 0, 2, 99),
                    ..base.clone()
                },
            ),
            (
                base.clone(),
                Path {
                    router_id: Ipv4Addr::new(1, 1, 1, 1),
                    originator_id: Some(Ipv4Addr::new(192, 0, 2, 200)),
                    ..base.clone()
                },
            ),
            (
                base.clone(),
                Path {
                    cluster_list_len: 1,
                    ..base.clone()
                },
            ),
        ];
        for (win, lose) in cases {
            assert!(
                better((&p1, &win), (&p2, &lose)),
                "{win:?} should beat {lose:?}"
            );
            assert!(!better((&p2, &lose), (&p1, &win)));
        }
        // MED counts only within one neighbouring AS
        let a = Path {
            med: 10,
            neighbor_as: Some(65001),
            ..base.clone()
        };
        let b = Path {
            med: 5,
            neighbor_as: Some(65002),
            router_id: Ipv4Addr::new(192, 0, 2, 99),
            ..base.clone()
        };
        assert!(
            better((&p1, &a), (&p2, &b)),
            "MED ignored across ASes, router id decides"
        );
        let c = Path {
            med: 5,
            neighbor_as: Some(65001),
            router_id: Ipv4Addr::new(192, 0, 2, 99),
            ..base
        };
        assert!(better((&p2, &c), (&p1, &a)));
    }

    #[test]
    fn changes_on_announce_withdraw_and_peer_down() {
        let mut rib = Rib::new();
        let n = net("10.244.2.0/24");
        let c = rib.update(peer(12), vec![(n, path([192, 0, 2, 12]).into())], &[]);
        assert_eq!(
            c,
            vec![Change::Best(n, peer(12), path([192, 0, 2, 12]).into())]
        );
        // the same path again changes nothing
        assert!(rib
            .update(peer(12), vec![(n, path([192, 0, 2, 12]).into())], &[])
            .is_empty());
        // a better path from another peer takes over; its loss falls back
        let better_path = Path {
            local_pref: 200,
            ..path([192, 0, 2, 13])
        };
        let c = rib.update(peer(13), vec![(n, better_path.clone().into())], &[]);
        assert_eq!(c, vec![Change::Best(n, peer(13), better_path.into())]);
        let c = rib.peer_down(&peer(13));
        assert_eq!(
            c,
            vec![Change::Best(n, peer(12), path([192, 0, 2, 12]).into())]
        );
        let c = rib.update(peer(12), vec![], &[n]);
        assert_eq!(c, vec![Change::Gone(n)]);
        assert!(rib.loc_rib().is_empty());
    }

    proptest! {
        /// Whatever the order of announcements and withdrawals, the Loc-RIB
        /// holds exactly the best of what the Adj-RIBs-In hold.
        #[test]
        fn loc_rib_is_the_best_of_adj_rib_in(ops in proptest::collection::vec((0u8..4, 0u8..6, any::<bool>(), 0u32..3), 1..80)) {
            let mut rib = Rib::new();
            let mut model: HashMap<(u8, u8), Path> = HashMap::new();
            for (p, pre, announce, lp) in ops {
                let n = IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::new(10, 244, pre, 0), 24).expect("net"));
                if announce {
                    let mut pa = path([192, 0, 2, 10 + p]);
                    pa.local_pref = 100 + lp;
                    rib.update(peer(10 + p), vec![(n, pa.clone().into())], &[]);
                    model.insert((p, pre), pa);
                } else {
                    rib.update(peer(10 + p), vec![], &[n]);
                    model.remove(&(p, pre));
                }
            }
            for pre in 0u8..6 {
                let n = IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::new(10, 244, pre, 0), 24).expect("net"));
                let cands: Vec<(PeerId, &Path)> = model.iter().filter(|((_, x), _)| *x == pre).map(|((p, _), pa)| (peer(10 + p), pa)).collect();
                let want = cands.iter().fold(None::<(PeerId, &Path)>, |acc, (pp, pa)| match acc {
                    Some((cp, cpa)) if !better((pp, pa), (&cp, cpa)) => Some((cp, cpa)),
                    _ => Some((*pp, pa)),
                });
                let got = rib.loc_rib().get(&n).map(|(p, pa)| (*p, &**pa));
                prop_assert_eq!(got, want);
            }
        }
    }
}
