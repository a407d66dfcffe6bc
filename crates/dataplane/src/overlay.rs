//! Linux verbs of the routing backends: the VXLAN device, routes to other
//! nodes' subnets, permanent neighbours and FDB entries.

use crate::netlink::{Netlink, NlError};
use crate::{DataplaneError, HostRoute, Result, Underlay, VxlanSpec, RTPROT_TRELLIS};
use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use nix::errno::Errno;
use std::net::IpAddr;

fn nl(op: impl Into<String>) -> impl FnOnce(NlError) -> DataplaneError {
    let op = op.into();
    move |e| DataplaneError::new(op, e)
}

fn index_of(sock: &mut Netlink, name: &str, op: &str) -> Result<u32> {
    crate::linux::get_link(sock, name)
        .map_err(nl(op))?
        .map(|l| l.header.index)
        .ok_or_else(|| DataplaneError::new(op, NlError::Kernel(Errno::ENODEV)))
}

fn vxlan_matches(link: &LinkMessage, spec: &VxlanSpec, dev_index: u32) -> bool {
    let Some(infos) = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(i) => Some(i),
        _ => None,
    }) else {
        return false;
    };
    let data = infos.iter().find_map(|i| match i {
        LinkInfo::Data(InfoData::Vxlan(d)) => Some(d),
        _ => None,
    });
    let Some(data) = data else { return false };
    let has = |want: &InfoVxlan| data.iter().any(|d| d == want);
    let IpAddr::V4(local) = spec.local else {
        return false;
    };
    has(&InfoVxlan::Id(spec.vni))
        && has(&InfoVxlan::Port(spec.port))
        && has(&InfoVxlan::Local(local))
        && has(&InfoVxlan::Link(dev_index))
        && has(&InfoVxlan::Learning(false))
}

/// See [`crate::Dataplane::vxlan_ensure`].
pub fn vxlan_ensure(spec: &VxlanSpec) -> Result<u32> {
    let op = format!(
        "ip link add {} type vxlan id {} dstport {} local {} dev {} nolearning",
        spec.name, spec.vni, spec.port, spec.local, spec.dev
    );
    let mut sock = Netlink::open().map_err(nl(&op))?;
    let dev_index = index_of(&mut sock, &spec.dev, &op)?;
    let IpAddr::V4(local) = spec.local else {
        return Err(DataplaneError::new(
            op,
            NlError::Kernel(Errno::EAFNOSUPPORT),
        ));
    };
    let existing = crate::linux::get_link(&mut sock, &spec.name).map_err(nl(&op))?;
    let keep = existing
        .as_ref()
        .is_some_and(|l| vxlan_matches(l, spec, dev_index));
    if let (Some(_), false) = (&existing, keep) {
        // other parameters: recreate (the old device would carry wrong traffic)
        sock.request(
            RouteNetlinkMessage::DelLink(crate::linux::link_by_name(&spec.name)),
            0,
        )
        .map_err(nl(format!("ip link del {}", spec.name)))?;
    }
    if !keep {
        let mut m = crate::linux::link_by_name(&spec.name);
        m.attributes.push(LinkAttribute::Mtu(spec.mtu));
        m.attributes.push(LinkAttribute::Address(spec.mac.to_vec()));
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vxlan),
            LinkInfo::Data(InfoData::Vxlan(vec![
                InfoVxlan::Id(spec.vni),
                InfoVxlan::Port(spec.port),
                InfoVxlan::Local(local),
                InfoVxlan::Link(dev_index),
                InfoVxlan::Learning(false),
            ])),
        ]));
        match sock.request(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL) {
            Ok(()) | Err(NlError::Kernel(Errno::EEXIST)) => {}
            Err(e) => return Err(DataplaneError::new(op, e)),
        }
    }
    let index = index_of(&mut sock, &spec.name, &op)?;
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.header.flags = LinkFlags::Up;
    m.header.change_mask = LinkFlags::Up;
    m.attributes.push(LinkAttribute::Mtu(spec.mtu));
    sock.request(RouteNetlinkMessage::SetLink(m), 0)
        .map_err(nl(format!("ip link set {} mtu {} up", spec.name, spec.mtu)))?;
    sock.request(
        RouteNetlinkMessage::NewAddress(crate::linux::addr_message(index, spec.address)),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
    .map_err(nl(format!(
        "ip addr replace {} dev {}",
        spec.address, spec.name
    )))?;
    Ok(index)
}

fn owned_route(dst: IpNet) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = if dst.addr().is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    m.header.destination_prefix_length = dst.prefix_len();
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::Other(RTPROT_TRELLIS);
    if dst.prefix_len() > 0 {
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(dst.addr())));
    }
    m
}

/// See [`crate::Dataplane::route_delete`].
pub fn route_delete(dst: IpNet) -> Result<bool> {
    let op = format!("ip route del {dst} proto 84");
    let mut sock = Netlink::open().map_err(nl(&op))?;
    match sock.request(RouteNetlinkMessage::DelRoute(owned_route(dst)), 0) {
        Ok(()) => Ok(true),
        Err(NlError::Kernel(Errno::ESRCH)) | Err(NlError::Kernel(Errno::ENOENT)) => Ok(false),
        Err(e) => Err(DataplaneError::new(op, e)),
    }
}

fn addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// See [`crate::Dataplane::routes_owned`].
pub fn routes_owned() -> Result<Vec<HostRoute>> {
    let op = "ip route show proto 84";
    let mut sock = Netlink::open().map_err(nl(op))?;
    let names = link_names(&mut sock)?;
    let mut out = Vec::new();
    for msg in sock
        .dump(RouteNetlinkMessage::GetRoute(RouteMessage::default()))
        .map_err(nl(op))?
    {
        let RouteNetlinkMessage::NewRoute(r) = msg else {
            continue;
        };
        if r.header.protocol != RouteProtocol::Other(RTPROT_TRELLIS)
            || r.header.table != RouteHeader::RT_TABLE_MAIN
        {
            continue;
        }
        let mut dst = None;
        let mut via = None;
        let mut dev = String::new();
        for a in &r.attributes {
            match a {
                RouteAttribute::Destination(d) => dst = addr(d),
                RouteAttribute::Gateway(g) => via = addr(g),
                RouteAttribute::Oif(i) => {
                    dev = names
                        .iter()
                        .find(|(idx, _)| idx == i)
                        .map(|(_, n)| n.clone())
                        .unwrap_or_default()
                }
                _ => {}
            }
        }
        let dst = dst.unwrap_or(if r.header.address_family == AddressFamily::Inet6 {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
        });
        let Ok(dst) = IpNet::new(dst, r.header.destination_prefix_length) else {
            continue;
        };
        let onlink = r
            .header
            .flags
            .contains(netlink_packet_route::route::RouteFlags::Onlink);
        out.push(HostRoute {
            dst,
            dev,
            via,
            onlink,
        });
    }
    Ok(out)
}

pub(crate) fn link_names(sock: &mut Netlink) -> Result<Vec<(u32, String)>> {
    let op = "ip link show";
    Ok(sock
        .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
        .map_err(nl(op))?
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => l.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some((l.header.index, n.clone())),
                _ => None,
            }),
            _ => None,
        })
        .collect())
}

fn neigh_message(
    family: AddressFamily,
    index: u32,
    ip: Option<IpAddr>,
    mac: Option<[u8; 6]>,
) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = family;
    m.header.ifindex = index;
    m.header.state = NeighbourState::Permanent;
    if family == AddressFamily::Bridge {
        m.header.flags = NeighbourFlags::Own;
    }
    if let Some(mac) = mac {
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    }
    if let Some(ip) = ip {
        let a = match ip {
            IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
            IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
        };
        m.attributes.push(NeighbourAttribute::Destination(a));
    }
    m
}

fn family_of(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// See [`crate::Dataplane::neigh_replace`].
pub fn neigh_replace(dev: &str, ip: IpAddr, mac: [u8; 6]) -> Result<()> {
    let op = format!(
        "ip neigh replace {ip} lladdr {} dev {dev} nud permanent",
        crate::mac_string(&mac)
    );
    let mut sock = Netlink::open().map_err(nl(&op))?;
    let index = index_of(&mut sock, dev, &op)?;
    sock.request(
        RouteNetlinkMessage::NewNeighbour(neigh_message(family_of(ip), index, Some(ip), Some(mac))),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
    .map_err(nl(op))
}

/// See [`crate::Dataplane::neigh_delete`].
pub fn neigh_delete(dev: &str, ip: IpAddr) -> Result<bool> {
    let op = format!("ip neigh del {ip} dev {dev}");
    let mut sock = Netlink::open().map_err(nl(&op))?;
    let index = match crate::linux::get_link(&mut sock, dev).map_err(nl(&op))? {
        Some(l) => l.header.index,
        None => return Ok(false),
    };
    match sock.request(
        RouteNetlinkMessage::DelNeighbour(neigh_message(family_of(ip), index, Some(ip), None)),
        0,
    ) {
        Ok(()) => Ok(true),
        Err(NlError::Kernel(Errno::ENOENT)) | Err(NlError::Kernel(Errno::ESRCH)) => Ok(false),
        Err(e) => Err(DataplaneError::new(op, e)),
    }
}

/// One neighbour or FDB row: address, MAC, state.
type NeighRow = (Option<IpAddr>, Option<[u8; 6]>, NeighbourState);

fn neigh_dump(dev: &str, family: AddressFamily, op: &str) -> Result<Vec<NeighRow>> {
    let mut sock = Netlink::open().map_err(nl(op))?;
    let Some(link) = crate::linux::get_link(&mut sock, dev).map_err(nl(op))? else {
        return Ok(vec![]);
    };
    let mut q = NeighbourMessage::default();
    q.header.family = family;
    let mut out = Vec::new();
    for msg in sock
        .dump(RouteNetlinkMessage::GetNeighbour(q))
        .map_err(nl(op))?
    {
        let RouteNetlinkMessage::NewNeighbour(n) = msg else {
            continue;
        };
        if n.header.ifindex != link.header.index {
            continue;
        }
        let mut ip = None;
        let mut mac = None;
        for a in &n.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                    ip = Some(IpAddr::V4(*v4))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                    ip = Some(IpAddr::V6(*v6))
                }
                // AF_BRIDGE rows (FDB) carry the remote as raw bytes
                NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                    ip = match b.len() {
                        4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
                        _ => None,
                    }
                }
                NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => {
                    let mut m = [0u8; 6];
                    m.copy_from_slice(b);
                    mac = Some(m);
                }
                _ => {}
            }
        }
        out.push((ip, mac, n.header.state));
    }
    Ok(out)
}

/// See [`crate::Dataplane::neighbours`].
pub fn neighbours(dev: &str) -> Result<Vec<(IpAddr, [u8; 6])>> {
    Ok(neigh_dump(
        dev,
        AddressFamily::Inet,
        &format!("ip neigh show dev {dev}"),
    )?
    .into_iter()
    .filter(|(_, _, st)| *st == NeighbourState::Permanent)
    .filter_map(|(ip, mac, _)| Some((ip?, mac?)))
    .collect())
}

/// See [`crate::Dataplane::fdb_replace`].
pub fn fdb_replace(dev: &str, mac: [u8; 6], dst: IpAddr) -> Result<()> {
    let op = format!(
        "bridge fdb replace {} dev {dev} dst {dst} self permanent",
        crate::mac_string(&mac)
    );
    let mut sock = Netlink::open().map_err(nl(&op))?;
    let index = index_of(&mut sock, dev, &op)?;
    sock.request(
        RouteNetlinkMessage::NewNeighbour(neigh_message(
            AddressFamily::Bridge,
            index,
            Some(dst),
            Some(mac),
        )),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
    .map_err(nl(op))
}

/// See [`crate::Dataplane::fdb_delete`].
pub fn fdb_delete(dev: &str, mac: [u8; 6], dst: IpAddr) -> Result<bool> {
    let op = format!(
        "bridge fdb del {} dev {dev} dst {dst} self",
        crate::mac_string(&mac)
    );
    let mut sock = Netlink::open().map_err(nl(&op))?;
    let index = match crate::linux::get_link(&mut sock, dev).map_err(nl(&op))? {
        Some(l) => l.header.index,
        None => return Ok(false),
    };
    match sock.request(
        RouteNetlinkMessage::DelNeighbour(neigh_message(
            AddressFamily::Bridge,
            index,
            Some(dst),
            Some(mac),
        )),
        0,
    ) {
        Ok(()) => Ok(true),
        Err(NlError::Kernel(Errno::ENOENT)) | Err(NlError::Kernel(Errno::ESRCH)) => Ok(false),
        Err(e) => Err(DataplaneError::new(op, e)),
    }
}

/// See [`crate::Dataplane::fdb`].
pub fn fdb(dev: &str) -> Result<Vec<([u8; 6], IpAddr)>> {
    Ok(neigh_dump(
        dev,
        AddressFamily::Bridge,
        &format!("bridge fdb show dev {dev}"),
    )?
    .into_iter()
    .filter_map(|(ip, mac, _)| Some((mac?, ip?)))
    .collect())
}

/// See [`crate::Dataplane::underlay`].
pub fn underlay(ip: IpAddr) -> Result<Option<Underlay>> {
    let op = format!("ip addr show to {ip}");
    let mut sock = Netlink::open().map_err(nl(&op))?;
    let names = link_names(&mut sock)?;
    for msg in sock
        .dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))
        .map_err(nl(&op))?
    {
        let RouteNetlinkMessage::NewAddress(a) = msg else {
            continue;
        };
        let has = a.attributes.iter().any(
            |x| matches!(x, AddressAttribute::Address(v) | AddressAttribute::Local(v) if *v == ip),
        );
        if !has {
            continue;
        }
        let Some((_, dev)) = names.iter().find(|(i, _)| *i == a.header.index) else {
            continue;
        };
        let link = crate::linux::get_link(&mut sock, dev).map_err(nl(&op))?;
        let mtu = link
            .and_then(|l| {
                l.attributes.iter().find_map(|x| match x {
                    LinkAttribute::Mtu(m) => Some(*m),
                    _ => None,
                })
            })
            .unwrap_or(1500);
        let net = IpNet::new(ip, a.header.prefix_len)
            .map_err(|_| DataplaneError::new(&op, NlError::Kernel(Errno::EINVAL)))?;
        return Ok(Some(Underlay {
            dev: dev.clone(),
            net: net.trunc(),
            mtu,
        }));
    }
    Ok(None)
}
