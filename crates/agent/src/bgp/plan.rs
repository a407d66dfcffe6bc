//! The bgp backend's pure side: from this node, the other nodes and the
//! BGP resources to the speaker's settings, its peers and its import
//! policy; and from learned routes to the kernel routes to keep.
//!
//! Topology, as in Calico: with no route reflector, every node peers with
//! every other (mesh, unless disabled); once nodes carry a cluster id,
//! reflectors peer with every node and the others with the reflectors only.
//! External peers apply to all nodes, to one node, or to the nodes of one
//! subnet. Of two nodes, the lower address dials and the higher waits, so
//! sessions never collide.

use ipnet::{IpNet, Ipv4Net};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use trellis_bgp::import::ImportPolicy;
use trellis_bgp::{PeerKind, PeerSpec};
use trellis_model::bgp::{BgpResources, NodeBgp};
use trellis_model::node::NodeRecord;
use trellis_routing::{Desired, LocalNode, NextHop, Route};

/// The BGP port.
pub const BGP_PORT: u16 = 179;

/// What the speaker should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BgpPlan {
    /// Speaker-wide settings; a change restarts the speaker.
    pub speaker: SpeakerSettings,
    /// Peers.
    pub peers: Vec<PeerSpec>,
    /// Import policy.
    pub policy: ImportPolicy,
}

/// The settings every session depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpeakerSettings {
    /// Our AS.
    pub asn: u32,
    /// Our cluster id when we are a reflector.
    pub cluster_id: Option<Ipv4Addr>,
    /// Hold time.
    pub hold_time: u16,
    /// Graceful-restart time.
    pub restart_time: u16,
}

/// A node's BGP role: the datastore's `Node` resource over what the node
/// published from its command line.
pub fn role(name: &str, record: Option<&NodeRecord>, res: &BgpResources) -> NodeBgp {
    let cli = record.and_then(|r| r.bgp.clone()).unwrap_or_default();
    let ds = res.nodes.get(name).cloned().unwrap_or_default();
    NodeBgp {
        as_number: ds.as_number.or(cli.as_number),
        route_reflector_cluster_id: ds
            .route_reflector_cluster_id
            .or(cli.route_reflector_cluster_id),
    }
}

/// Plans the speaker of `me`. `nodes` holds every node's record (this one
/// too); `cli` is this node's command-line role (used until its record is
/// visible).
pub fn plan(
    me: &LocalNode,
    cluster: Ipv4Net,
    nodes: &BTreeMap<String, NodeRecord>,
    res: &BgpResources,
    cli: &NodeBgp,
) -> BgpPlan {
    let asn_of = |r: &NodeBgp| r.as_number.unwrap_or(res.config.as_number);
    let mut my_role = role(&me.name, nodes.get(&me.name), res);
    my_role.as_number = my_role.as_number.or(cli.as_number);
    my_role.route_reflector_cluster_id = my_role
        .route_reflector_cluster_id
        .or(cli.route_reflector_cluster_id);
    let my_as = asn_of(&my_role);
    let my_ip = IpAddr::V4(me.public_ip);
    let others: Vec<(&NodeRecord, NodeBgp)> = nodes
        .values()
        .filter(|r| r.node != me.name && r.public_ip != my_ip)
        .map(|r| (r, role(&r.node, Some(r), res)))
        .collect();
    let any_reflector = my_role.route_reflector_cluster_id.is_some()
        || others
            .iter()
            .any(|(_, r)| r.route_reflector_cluster_id.is_some());
    let node_peer = |r: &NodeRecord, role: &NodeBgp, kind: PeerKind| PeerSpec {
        addr: r.public_ip,
        port: BGP_PORT,
        asn: asn_of(role),
        local_as: my_as,
        kind,
        password: None,
        passive: r.public_ip < my_ip,
        multihop: false,
        local_addr: Some(my_ip),
        max_prefixes: res.config.max_prefixes,
    };
    let mut peers: Vec<PeerSpec> = Vec::new();
    for (r, role) in &others {
        let kind = match (
            my_role.route_reflector_cluster_id.is_some(),
            role.route_reflector_cluster_id.is_some(),
        ) {
            // reflector to reflector: non-clients of each other
            (true, true) => Some(PeerKind::Reflector),
            (true, false) => Some(PeerKind::RrClient),
            (false, true) => Some(PeerKind::Reflector),
            (false, false) if !any_reflector && res.config.node_to_node_mesh_enabled => {
                Some(PeerKind::Mesh)
            }
            (false, false) => None,
        };
        if let Some(kind) = kind {
            peers.push(node_peer(r, role, kind));
        }
    }
    let node_ips: BTreeSet<IpAddr> = peers.iter().map(|p| p.addr).collect();
    for (name, p) in &res.peers {
        let applies = match (&p.node, &p.node_subnet) {
            (Some(n), _) => *n == me.name,
            (None, Some(net)) => net.contains(&me.public_ip),
            (None, None) => true,
        };
        if !applies || p.peer_ip == my_ip || node_ips.contains(&p.peer_ip) {
            if node_ips.contains(&p.peer_ip) {
                tracing::debug!("bgp peer {name}: {} is a node, already peered", p.peer_ip);
            }
            continue;
        }
        peers.push(PeerSpec {
            addr: p.peer_ip,
            port: BGP_PORT,
            asn: p.as_number,
            local_as: my_as,
            kind: PeerKind::External,
            password: p.password.clone(),
            passive: false,
            multihop: p.multihop,
            local_addr: Some(my_ip),
            max_prefixes: p.max_prefixes.unwrap_or(res.config.max_prefixes),
        });
    }
    peers.sort_by_key(|p| p.addr);
    let owners: HashMap<Ipv4Addr, IpNet> = nodes
        .values()
        .filter_map(|r| match r.public_ip {
            IpAddr::V4(ip) => Some((ip, IpNet::V4(r.subnet))),
            IpAddr::V6(_) => None,
        })
        .collect();
    BgpPlan {
        speaker: SpeakerSettings {
            asn: my_as,
            cluster_id: my_role.route_reflector_cluster_id,
            hold_time: res.config.hold_time_seconds,
            restart_time: res.config.graceful_restart_seconds,
        },
        peers,
        policy: ImportPolicy {
            inside: vec![IpNet::V4(cluster)],
            owners: Some(owners),
            own: vec![IpNet::V4(me.subnet)],
            max_prefixes: res.config.max_prefixes,
        },
    }
}

/// Kernel routes for learned best paths: next hops on this node's segment
/// become routes; others are problems (the route would lead nowhere —
/// peer with a router that relays it).
pub fn learned_routes(me: &LocalNode, learned: &BTreeMap<Ipv4Net, Ipv4Addr>) -> Desired {
    let mut d = Desired::default();
    for (dst, nh) in learned {
        if me.underlay.contains(nh) && *nh != me.public_ip {
            d.routes.insert(Route {
                dst: *dst,
                via: NextHop::Underlay(*nh),
            });
        } else {
            d.problems.push(format!(
                "route to {dst} via {nh}: next hop is not on this node's segment {}; peer with a router on the segment (BGPPeer) to reach it",
                me.underlay
            ));
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_model::bgp::BgpPeer;

    fn local(n: u8) -> LocalNode {
        LocalNode {
            name: format!("n{n}"),
            subnet: format!("10.244.{n}.0/24").parse().expect("net"),
            public_ip: Ipv4Addr::new(192, 0, 2, 10 + n),
            underlay: "192.0.2.0/24".parse().expect("net"),
            underlay_dev: "eth0".into(),
            underlay_mtu: 1500,
        }
    }

    fn record(n: u8) -> NodeRecord {
        let l = local(n);
        NodeRecord {
            node: l.name,
            subnet: l.subnet,
            public_ip: IpAddr::V4(l.public_ip),
            backend_type: "bgp".into(),
            vtep_mac: None,
            bgp: None,
        }
    }

    fn nodes(n: u8) -> BTreeMap<String, NodeRecord> {
        (1..=n).map(|i| (format!("n{i}"), record(i))).collect()
    }

    fn cluster() -> Ipv4Net {
        "10.244.0.0/16".parse().expect("net")
    }

    #[test]
    fn mesh_peers_with_every_other_node_lower_address_dials() {
        let p = plan(
            &local(2),
            cluster(),
            &nodes(3),
            &BgpResources::default(),
            &NodeBgp::default(),
        );
        let addrs: Vec<IpAddr> = p.peers.iter().map(|p| p.addr).collect();
        assert_eq!(
            addrs,
            vec![IpAddr::from([192, 0, 2, 11]), IpAddr::from([192, 0, 2, 13])]
        );
        assert!(p.peers[0].passive && !p.peers[1].passive);
        assert!(p
            .peers
            .iter()
            .all(|p| p.kind == PeerKind::Mesh && p.asn == 64512));
        let owners = p.policy.owners.as_ref().expect("owners");
        assert_eq!(owners.len(), 3);
        assert_eq!(p.policy.own, vec![IpNet::V4(local(2).subnet)]);
    }

    #[test]
    fn reflectors_take_over_the_topology() {
        let mut res = BgpResources::default();
        res.nodes.insert(
            "n1".into(),
            NodeBgp {
                as_number: None,
                route_reflector_cluster_id: Some(Ipv4Addr::new(224, 0, 0, 1)),
            },
        );
        let rr = plan(&local(1), cluster(), &nodes(5), &res, &NodeBgp::default());
        assert_eq!(rr.speaker.cluster_id, Some(Ipv4Addr::new(224, 0, 0, 1)));
        assert_eq!(rr.peers.len(), 4);
        assert!(rr.peers.iter().all(|p| p.kind == PeerKind::RrClient));
        let client = plan(&local(4), cluster(), &nodes(5), &res, &NodeBgp::default());
        assert_eq!(client.peers.len(), 1);
        assert_eq!(client.peers[0].kind, PeerKind::Reflector);
        assert_eq!(client.peers[0].addr, IpAddr::from([192, 0, 2, 11]));
    }

    #[test]
    fn external_peers_global_per_node_per_subnet_and_mesh_off() {
        let mut res = BgpResources::default();
        res.config.node_to_node_mesh_enabled = false;
        let peer = |ip: [u8; 4], node: Option<&str>, subnet: Option<&str>| BgpPeer {
            peer_ip: IpAddr::from(ip),
            as_number: 64513,
            node: node.map(String::from),
            node_subnet: subnet.map(|s| s.parse().expect("net")),
            password: Some("pw".into()),
            multihop: false,
            max_prefixes: None,
        };
        res.peers
            .insert("all".into(), peer([203, 0, 113, 1], None, None));
        res.peers
            .insert("n2-only".into(), peer([203, 0, 113, 2], Some("n2"), None));
        res.peers.insert(
            "seg-a".into(),
            peer([192, 0, 2, 1], None, Some("192.0.2.0/24")),
        );
        res.peers.insert(
            "seg-b".into(),
            peer([198, 51, 100, 1], None, Some("198.51.100.0/24")),
        );
        let p = plan(&local(1), cluster(), &nodes(3), &res, &NodeBgp::default());
        let addrs: Vec<IpAddr> = p.peers.iter().map(|p| p.addr).collect();
        assert_eq!(
            addrs,
            vec![IpAddr::from([192, 0, 2, 1]), IpAddr::from([203, 0, 113, 1])]
        );
        assert!(p
            .peers
            .iter()
            .all(|p| p.kind == PeerKind::External && p.password.as_deref() == Some("pw")));
        let p2 = plan(&local(2), cluster(), &nodes(3), &res, &NodeBgp::default());
        assert_eq!(p2.peers.len(), 3);
    }

    #[test]
    fn command_line_role_until_the_datastore_says_otherwise() {
        let cli = NodeBgp {
            as_number: Some(65001),
            route_reflector_cluster_id: None,
        };
        let p = plan(
            &local(1),
            cluster(),
            &nodes(2),
            &BgpResources::default(),
            &cli,
        );
        assert_eq!(p.speaker.asn, 65001);
        let mut res = BgpResources::default();
        res.nodes.insert(
            "n1".into(),
            NodeBgp {
                as_number: Some(65002),
                route_reflector_cluster_id: None,
            },
        );
        assert_eq!(
            plan(&local(1), cluster(), &nodes(2), &res, &cli)
                .speaker
                .asn,
            65002
        );
    }

    #[test]
    fn learned_routes_on_the_segment_only() {
        let learned = BTreeMap::from([
            (
                "10.244.2.0/24".parse().expect("net"),
                Ipv4Addr::new(192, 0, 2, 12),
            ),
            (
                "10.244.9.0/24".parse().expect("net"),
                Ipv4Addr::new(198, 51, 100, 19),
            ),
        ]);
        let d = learned_routes(&local(1), &learned);
        assert_eq!(d.routes.len(), 1);
        assert!(d.vxlan.is_none() && d.neighbours.is_empty() && d.fdb.is_empty());
        assert_eq!(d.problems.len(), 1);
        assert!(d.problems[0].contains("198.51.100.19"));
    }
}
