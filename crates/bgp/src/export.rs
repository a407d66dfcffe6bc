//! What we advertise to a peer (RFC 4271 9.1.3, RFC 4456 8): our own
//! prefixes to everyone with next hop self; learned iBGP routes only when
//! we are a route reflector and the client rules allow, with ORIGINATOR_ID
//! and CLUSTER_LIST. Routes learned over eBGP are not passed on (each node
//! peers with its routers itself, as in Calico). Pure.

use crate::rib::{Path, PeerId};
use crate::wire::{AsSegment, PathAttribute, AFI_IPV4, AFI_IPV6, SAFI_UNICAST};
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

/// Attributes of one advertised route, shared by the prefixes they carry.
pub type Attrs = Arc<Vec<PathAttribute>>;

/// The peer we advertise to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Its address.
    pub addr: PeerId,
    /// It is in another AS.
    pub ebgp: bool,
    /// It is our route-reflector client.
    pub rr_client: bool,
    /// Our address on the session (next hop self).
    pub local_addr: IpAddr,
}

/// This speaker, as export needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exporter {
    /// Our AS.
    pub asn: u32,
    /// Our cluster id when we reflect routes.
    pub cluster_id: Option<Ipv4Addr>,
}

/// Where the best path came from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// We originate it.
    Local,
    /// Learned from a peer.
    Learned {
        /// The peer.
        from: PeerId,
        /// That peer is our route-reflector client.
        from_client: bool,
        /// The path.
        path: &'a Path,
    },
}

fn next_hop_attr(prefix: &IpNet, nh: IpAddr, target: &Target) -> Option<PathAttribute> {
    match (prefix, nh) {
        (IpNet::V4(_), IpAddr::V4(n)) => Some(PathAttribute::NextHop(n)),
        (IpNet::V6(_), IpAddr::V6(_)) => Some(PathAttribute::MpReach {
            afi: AFI_IPV6,
            safi: SAFI_UNICAST,
            next_hops: vec![nh],
            nlri: vec![],
        }),
        _ => {
            let _ = target;
            None
        }
    }
}

impl Exporter {
    /// The attributes to advertise `prefix` with to `target`, or None when
    /// it must not be advertised there. For IPv6 the next hop travels as an
    /// MP_REACH without NLRI (the prefixes are filled in when the UPDATE is
    /// built).
    pub fn export(&self, prefix: &IpNet, src: Source<'_>, target: &Target) -> Option<Attrs> {
        match src {
            Source::Local => {
                let mut attrs = vec![PathAttribute::Origin(0)];
                if target.ebgp {
                    attrs.push(PathAttribute::AsPath(vec![AsSegment::Sequence(vec![
                        self.asn,
                    ])]));
                } else {
                    attrs.push(PathAttribute::AsPath(vec![]));
                }
                attrs.push(next_hop_attr(prefix, target.local_addr, target)?);
                if !target.ebgp {
                    attrs.push(PathAttribute::LocalPref(100));
                }
                Some(Arc::new(attrs))
            }
            Source::Learned {
                from,
                from_client,
                path,
            } => {
                let cluster = self.cluster_id?;
                if from == target.addr || path.ebgp || target.ebgp {
                    return None;
                }
                // RFC 4456 8: from a client to everyone, from a non-client
                // to clients only
                if !from_client && !target.rr_client {
                    return None;
                }
                let mut attrs: Vec<PathAttribute> = Vec::with_capacity(path.attrs.len() + 3);
                let mut cluster_list = vec![cluster];
                let mut originator = None;
                for a in path.attrs.iter() {
                    match a {
                        PathAttribute::OriginatorId(o) => originator = Some(*o),
                        PathAttribute::ClusterList(l) => cluster_list.extend_from_slice(l),
                        PathAttribute::NextHop(_) => {}
                        other => attrs.push(other.clone()),
                    }
                }
                attrs.push(next_hop_attr(prefix, path.next_hop, target)?);
                if !attrs
                    .iter()
                    .any(|a| matches!(a, PathAttribute::LocalPref(_)))
                {
                    attrs.push(PathAttribute::LocalPref(path.local_pref));
                }
                attrs.push(PathAttribute::OriginatorId(
                    originator.unwrap_or(path.router_id),
                ));
                attrs.push(PathAttribute::ClusterList(cluster_list));
                Some(Arc::new(attrs))
            }
        }
    }
}

/// The family of a prefix as (AFI, SAFI).
pub fn family(p: &IpNet) -> (u16, u8) {
    match p {
        IpNet::V4(_) => (AFI_IPV4, SAFI_UNICAST),
        IpNet::V6(_) => (AFI_IPV6, SAFI_UNICAST),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    fn target(last: u8, rr_client: bool) -> Target {
        Target {
            addr: IpAddr::from([192, 0, 2, last]),
            ebgp: false,
            rr_client,
            local_addr: IpAddr::from([192, 0, 2, 11]),
        }
    }

    fn learned(last: u8) -> Path {
        Path {
            attrs: Arc::new(vec![
                PathAttribute::Origin(0),
                PathAttribute::AsPath(vec![]),
                PathAttribute::NextHop(Ipv4Addr::new(192, 0, 2, last)),
            ]),
            ..crate::rib::test_path([192, 0, 2, last])
        }
    }

    #[test]
    fn local_routes_go_everywhere_with_next_hop_self() {
        let e = Exporter {
            asn: 64512,
            cluster_id: None,
        };
        let a = e
            .export(&net("10.244.1.0/24"), Source::Local, &target(12, false))
            .expect("ibgp");
        assert!(a.contains(&PathAttribute::NextHop(Ipv4Addr::new(192, 0, 2, 11))));
        assert!(a.contains(&PathAttribute::AsPath(vec![])));
        let mut t = target(1, false);
        t.ebgp = true;
        let a = e
            .export(&net("10.244.1.0/24"), Source::Local, &t)
            .expect("ebgp");
        assert!(
            a.contains(&PathAttribute::AsPath(vec![AsSegment::Sequence(vec![
                64512
            ])]))
        );
        assert!(!a.iter().any(|x| matches!(x, PathAttribute::LocalPref(_))));
    }

    #[test]
    fn only_reflectors_pass_learned_routes_on() {
        let p = learned(13);
        let src = Source::Learned {
            from: p.next_hop,
            from_client: true,
            path: &p,
        };
        let plain = Exporter {
            asn: 64512,
            cluster_id: None,
        };
        assert!(plain
            .export(&net("10.244.3.0/24"), src, &target(12, true))
            .is_none());
        let rr = Exporter {
            asn: 64512,
            cluster_id: Some(Ipv4Addr::new(0, 0, 0, 1)),
        };
        let a = rr
            .export(&net("10.244.3.0/24"), src, &target(12, true))
            .expect("reflected");
        assert!(a.contains(&PathAttribute::NextHop(Ipv4Addr::new(192, 0, 2, 13))));
        assert!(a.contains(&PathAttribute::OriginatorId(Ipv4Addr::new(192, 0, 2, 13))));
        assert!(a.contains(&PathAttribute::ClusterList(vec![Ipv4Addr::new(0, 0, 0, 1)])));
        // never back to where it came from
        assert!(rr
            .export(&net("10.244.3.0/24"), src, &target(13, true))
            .is_none());
        // from a non-client: to clients only
        let nc = Source::Learned {
            from: p.next_hop,
            from_client: false,
            path: &p,
        };
        assert!(rr
            .export(&net("10.244.3.0/24"), nc, &target(12, false))
            .is_none());
        assert!(rr
            .export(&net("10.244.3.0/24"), nc, &target(12, true))
            .is_some());
    }
}
