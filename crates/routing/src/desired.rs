//! Desired state per backend.

use ipnet::Ipv4Net;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use trellis_model::netconf::{Backend, BackendType};
use trellis_model::node::NodeRecord;

/// The VXLAN device name.
pub const VXLAN_DEV: &str = "trellis.1";

/// This node, as the backends need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNode {
    /// Node name.
    pub name: String,
    /// Its pod subnet.
    pub subnet: Ipv4Net,
    /// Its underlay address.
    pub public_ip: Ipv4Addr,
    /// The underlay interface's subnet: remote nodes inside it share our L2 segment.
    pub underlay: Ipv4Net,
    /// The underlay interface name.
    pub underlay_dev: String,
    /// The underlay MTU.
    pub underlay_mtu: u32,
}

/// The VXLAN device to keep.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct VxlanLink {
    /// VNI.
    pub vni: u32,
    /// UDP port.
    pub port: u16,
    /// Local VTEP (underlay) address.
    pub local: Ipv4Addr,
    /// Underlay device.
    pub dev: String,
    /// MTU = underlay MTU - 50.
    pub mtu: u32,
    /// The VTEP address on the device: the node subnet's network address /32.
    pub vtep_ip: Ipv4Addr,
}

/// Where a route points.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum NextHop {
    /// Over the VXLAN device to a remote VTEP IP (onlink).
    Vxlan(Ipv4Addr),
    /// Over the underlay to a node IP (host-gw).
    Underlay(Ipv4Addr),
}

/// A route to a remote node's pod subnet.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    /// Remote subnet.
    pub dst: Ipv4Net,
    /// Next hop.
    pub via: NextHop,
}

/// A permanent neighbour on the VXLAN device: remote VTEP IP -> VTEP MAC.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Neigh {
    /// VTEP IP.
    pub ip: Ipv4Addr,
    /// VTEP MAC.
    pub mac: [u8; 6],
}

/// A permanent FDB entry on the VXLAN device: VTEP MAC -> node underlay IP.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fdb {
    /// VTEP MAC.
    pub mac: [u8; 6],
    /// Underlay destination.
    pub dst: Ipv4Addr,
}

/// Everything the backend wants in the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// The VXLAN device, when any remote goes over VXLAN (or the backend is vxlan).
    pub vxlan: Option<VxlanLink>,
    /// Routes to remote subnets.
    pub routes: BTreeSet<Route>,
    /// Neighbours on the VXLAN device.
    pub neighbours: BTreeSet<Neigh>,
    /// FDB entries on the VXLAN device.
    pub fdb: BTreeSet<Fdb>,
    /// Peers that cannot be served, with the reason (logged and shown in status).
    pub problems: Vec<String>,
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The desired state of `backend` on `local` given the `remotes` (this
/// node's own record among them is ignored).
pub fn desired(backend: &Backend, local: &LocalNode, remotes: &[NodeRecord]) -> Desired {
    let mut d = Desired::default();
    let vxlan_link = VxlanLink {
        vni: backend.vni,
        port: backend.port,
        local: local.public_ip,
        dev: local.underlay_dev.clone(),
        mtu: local.underlay_mtu.saturating_sub(50),
        vtep_ip: local.subnet.network(),
    };
    if backend.kind == BackendType::Vxlan {
        d.vxlan = Some(vxlan_link);
    }
    for r in remotes.iter().filter(|r| r.node != local.name) {
        let std::net::IpAddr::V4(remote_ip) = r.public_ip else {
            d.problems.push(format!(
                "node {}: IPv6 underlay {} is not supported yet",
                r.node, r.public_ip
            ));
            continue;
        };
        let same_segment = local.underlay.contains(&remote_ip);
        let direct = match backend.kind {
            BackendType::HostGw => {
                if !same_segment {
                    d.problems.push(format!(
                        "node {} ({remote_ip}) is not on this node's segment {}: host-gw cannot reach subnet {}; use vxlan or DirectRouting",
                        r.node, local.underlay, r.subnet
                    ));
                    continue;
                }
                true
            }
            BackendType::Vxlan => backend.direct_routing && same_segment,
            BackendType::Bgp | BackendType::Ipip => continue,
        };
        if direct {
            d.routes.insert(Route {
                dst: r.subnet,
                via: NextHop::Underlay(remote_ip),
            });
            continue;
        }
        let Some(mac) = r.vtep_mac.as_deref().and_then(parse_mac) else {
            d.problems.push(format!(
                "node {} publishes no valid VTEP MAC ({:?})",
                r.node, r.vtep_mac
            ));
            continue;
        };
        let vtep = r.subnet.network();
        d.routes.insert(Route {
            dst: r.subnet,
            via: NextHop::Vxlan(vtep),
        });
        d.neighbours.insert(Neigh { ip: vtep, mac });
        d.fdb.insert(Fdb {
            mac,
            dst: remote_ip,
        });
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> LocalNode {
        LocalNode {
            name: "n1".into(),
            subnet: "10.244.1.0/24".parse().expect("net"),
            public_ip: "192.0.2.11".parse().expect("ip"),
            underlay: "192.0.2.0/24".parse().expect("net"),
            underlay_dev: "eth0".into(),
            underlay_mtu: 1500,
        }
    }

    fn node(name: &str, subnet: &str, ip: &str, mac: &str) -> NodeRecord {
        NodeRecord {
            node: name.into(),
            subnet: subnet.parse().expect("net"),
            public_ip: ip.parse().expect("ip"),
            backend_type: "vxlan".into(),
            vtep_mac: Some(mac.into()),
            bgp: None,
        }
    }

    fn backend(kind: BackendType, direct: bool) -> Backend {
        Backend {
            kind,
            vni: 1,
            port: 8472,
            direct_routing: direct,
        }
    }

    fn remotes() -> Vec<NodeRecord> {
        vec![
            node("n1", "10.244.1.0/24", "192.0.2.11", "0e:00:00:00:00:01"),
            node("n2", "10.244.2.0/24", "192.0.2.12", "0e:00:00:00:00:02"),
            node("n3", "10.244.3.0/24", "198.51.100.13", "0e:00:00:00:00:03"),
        ]
    }

    #[test]
    fn vxlan_three_tables_per_remote() {
        let d = desired(&backend(BackendType::Vxlan, false), &local(), &remotes());
        let link = d.vxlan.expect("link");
        assert_eq!((link.vni, link.port, link.mtu), (1, 8472, 1450));
        assert_eq!(link.vtep_ip.to_string(), "10.244.1.0");
        assert_eq!(d.routes.len(), 2);
        assert!(d.routes.contains(&Route {
            dst: "10.244.3.0/24".parse().expect("n"),
            via: NextHop::Vxlan("10.244.3.0".parse().expect("ip"))
        }));
        assert!(d.neighbours.contains(&Neigh {
            ip: "10.244.2.0".parse().expect("ip"),
            mac: [0x0e, 0, 0, 0, 0, 2]
        }));
        assert!(d.fdb.contains(&Fdb {
            mac: [0x0e, 0, 0, 0, 0, 3],
            dst: "198.51.100.13".parse().expect("ip")
        }));
        assert!(d.problems.is_empty());
    }

    #[test]
    fn host_gw_reports_other_segments() {
        let d = desired(&backend(BackendType::HostGw, false), &local(), &remotes());
        assert!(d.vxlan.is_none());
        assert_eq!(
            d.routes.iter().cloned().collect::<Vec<_>>(),
            vec![Route {
                dst: "10.244.2.0/24".parse().expect("n"),
                via: NextHop::Underlay("192.0.2.12".parse().expect("ip"))
            }]
        );
        assert_eq!(d.problems.len(), 1);
        assert!(
            d.problems[0].contains("n3") && d.problems[0].contains("198.51.100.13"),
            "{:?}",
            d.problems
        );
    }

    #[test]
    fn direct_routing_mixes() {
        let d = desired(&backend(BackendType::Vxlan, true), &local(), &remotes());
        assert!(d.routes.contains(&Route {
            dst: "10.244.2.0/24".parse().expect("n"),
            via: NextHop::Underlay("192.0.2.12".parse().expect("ip"))
        }));
        assert!(d.routes.contains(&Route {
            dst: "10.244.3.0/24".parse().expect("n"),
            via: NextHop::Vxlan("10.244.3.0".parse().expect("ip"))
        }));
        assert_eq!(d.fdb.len(), 1);
        assert_eq!(d.neighbours.len(), 1);
    }

    #[test]
    fn bad_vtep_mac_is_a_problem_not_a_route() {
        let mut r = remotes();
        r[1].vtep_mac = Some("zz".into());
        let d = desired(&backend(BackendType::Vxlan, false), &local(), &r);
        assert_eq!(d.routes.len(), 1);
        assert!(d.problems[0].contains("n2"));
    }
}
