//! [`Dataplane`] on the real kernel through rtnetlink.

use crate::netlink::{Netlink, NlError};
use crate::{
    sysctl, Dataplane, DataplaneError, HostRoute, PodIface, PodIfaceState, Result, Underlay,
    VethInfo, VethSpec, VxlanSpec, RTPROT_TRELLIS,
};
use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoPortKind, InfoVeth, LinkAttribute,
    LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use nix::errno::Errno;
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;

/// The kernel, seen from the namespace the agent runs in.
#[derive(Debug)]
pub struct LinuxDataplane {
    /// Where `/proc/sys` is writable (a container mounts the host's
    /// `/proc/sys/net` elsewhere: its own `/proc/sys` is read-only).
    sysctl_dir: std::path::PathBuf,
}

impl Default for LinuxDataplane {
    fn default() -> Self {
        Self::new()
    }
}

impl LinuxDataplane {
    /// A dataplane for the calling process's namespace.
    pub fn new() -> Self {
        Self {
            sysctl_dir: sysctl::PROC_SYS.into(),
        }
    }

    /// One that writes sysctls under `dir` instead of `/proc/sys`.
    pub fn with_sysctl_dir(dir: impl Into<std::path::PathBuf>) -> Self {
        Self {
            sysctl_dir: dir.into(),
        }
    }
}

fn nl(op: impl Into<String>) -> impl FnOnce(NlError) -> DataplaneError {
    let op = op.into();
    move |e| DataplaneError::new(op, e)
}

fn own(op: &str) -> Result<Netlink> {
    Netlink::open().map_err(nl(op))
}

fn family(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

pub(crate) fn link_by_name(name: &str) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_string()));
    m
}

fn up(m: &mut LinkMessage) {
    m.header.flags = LinkFlags::Up;
    m.header.change_mask = LinkFlags::Up;
}

pub(crate) fn get_link(
    sock: &mut Netlink,
    name: &str,
) -> std::result::Result<Option<LinkMessage>, NlError> {
    // RTM_GETLINK by name answers with one message or ENODEV
    match sock.dump_one(RouteNetlinkMessage::GetLink(link_by_name(name))) {
        Ok(Some(RouteNetlinkMessage::NewLink(m))) => Ok(Some(m)),
        Ok(_) => Ok(None),
        Err(NlError::Kernel(Errno::ENODEV)) => Ok(None),
        Err(e) => Err(e),
    }
}

fn link_mac(m: &LinkMessage) -> [u8; 6] {
    let mut mac = [0u8; 6];
    for a in &m.attributes {
        if let LinkAttribute::Address(b) = a {
            if b.len() == 6 {
                mac.copy_from_slice(b);
            }
        }
    }
    mac
}

/// `0a:58:` + the gateway's IPv4 bytes (or the last four of IPv6).
fn bridge_mac(gw: IpAddr) -> [u8; 6] {
    let b = match gw {
        IpAddr::V4(v4) => v4.octets(),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            [o[12], o[13], o[14], o[15]]
        }
    };
    [0x0a, 0x58, b[0], b[1], b[2], b[3]]
}

pub(crate) fn addr_message(index: u32, addr: IpNet) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = family(addr.addr());
    m.header.prefix_len = addr.prefix_len();
    m.header.index = index;
    m.attributes.push(AddressAttribute::Local(addr.addr()));
    m.attributes.push(AddressAttribute::Address(addr.addr()));
    if let (IpNet::V4(v4), true) = (addr, addr.prefix_len() < 31) {
        m.attributes
            .push(AddressAttribute::Broadcast(v4.broadcast()));
    }
    m
}

fn route_message(dst: IpNet, oif: u32, via: Option<IpAddr>, onlink: bool) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = family(dst.addr());
    m.header.destination_prefix_length = dst.prefix_len();
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::Other(RTPROT_TRELLIS);
    m.header.scope = if via.is_some() {
        RouteScope::Universe
    } else {
        RouteScope::Link
    };
    m.header.kind = RouteType::Unicast;
    if onlink {
        m.header.flags = RouteFlags::Onlink;
    }
    if dst.prefix_len() > 0 {
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(dst.addr())));
    }
    if let Some(gw) = via {
        m.attributes
            .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
    }
    m.attributes.push(RouteAttribute::Oif(oif));
    m
}

impl Dataplane for LinuxDataplane {
    fn bridge_ensure(&self, name: &str, gateway: IpNet, mtu: u32) -> Result<u32> {
        let op = format!("ip link add {name} type bridge");
        let mut sock = own(&op)?;
        if get_link(&mut sock, name).map_err(nl(&op))?.is_none() {
            let mut m = link_by_name(name);
            m.attributes.push(LinkAttribute::Mtu(mtu));
            // a fixed MAC keeps the bridge from taking a port's MAC, which
            // changes as pods come and go and leaves pods' ARP caches stale
            m.attributes
                .push(LinkAttribute::Address(bridge_mac(gateway.addr()).to_vec()));
            m.attributes
                .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                    InfoKind::Bridge,
                )]));
            match sock.request(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL) {
                // another ADD created it meanwhile
                Ok(()) | Err(NlError::Kernel(Errno::EEXIST)) => {}
                Err(e) => return Err(DataplaneError::new(op, e)),
            }
        }
        let link = get_link(&mut sock, name)
            .map_err(nl(&op))?
            .ok_or_else(|| DataplaneError::new(&op, NlError::Kernel(Errno::ENODEV)))?;
        let index = link.header.index;
        let op = format!("ip addr replace {gateway} dev {name}");
        sock.request(
            RouteNetlinkMessage::NewAddress(addr_message(index, gateway)),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map_err(nl(&op))?;
        if !link.header.flags.contains(LinkFlags::Up) {
            let mut m = LinkMessage::default();
            m.header.index = index;
            up(&mut m);
            m.attributes.push(LinkAttribute::Mtu(mtu));
            sock.request(RouteNetlinkMessage::SetLink(m), 0)
                .map_err(nl(format!("ip link set {name} mtu {mtu} up")))?;
        }
        Ok(index)
    }

    fn veth_into_netns(&self, spec: &VethSpec, netns: BorrowedFd<'_>) -> Result<VethInfo> {
        let op = format!(
            "ip link add {} type veth peer name {} netns <pod>",
            spec.host, spec.peer
        );
        let mut sock = own(&op)?;
        let mut peer = link_by_name(&spec.peer);
        peer.attributes.push(LinkAttribute::Mtu(spec.mtu));
        if let Some(mac) = spec.peer_mac {
            peer.attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
        // the peer cannot be set up here: veth_open fails with ENOTCONN
        // until the host side exists; pod_configure brings it up
        peer.attributes
            .push(LinkAttribute::NetNsFd(std::os::fd::AsRawFd::as_raw_fd(
                &netns,
            )));
        let mut m = link_by_name(&spec.host);
        up(&mut m);
        m.attributes.push(LinkAttribute::Mtu(spec.mtu));
        if let Some(mac) = spec.host_mac {
            m.attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
        if let Some(master) = spec.master {
            m.attributes.push(LinkAttribute::Controller(master));
        }
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        sock.request(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)
            .map_err(nl(&op))?;
        let link = get_link(&mut sock, &spec.host)
            .map_err(nl(&op))?
            .ok_or_else(|| DataplaneError::new(&op, NlError::Kernel(Errno::ENODEV)))?;
        Ok(VethInfo {
            host_index: link.header.index,
            host_mac: link_mac(&link),
        })
    }

    fn bridge_port_hairpin(&self, ifname: &str, on: bool) -> Result<()> {
        let op = format!(
            "ip link set {ifname} type bridge_slave hairpin {}",
            if on { "on" } else { "off" }
        );
        let mut m = link_by_name(ifname);
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::PortKind(InfoPortKind::Bridge),
            LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::HairpinMode(
                on,
            )])),
        ]));
        own(&op)?
            .request(RouteNetlinkMessage::NewLink(m), 0)
            .map_err(nl(op))
    }

    fn link_delete(&self, name: &str) -> Result<bool> {
        let op = format!("ip link del {name}");
        match own(&op)?.request(RouteNetlinkMessage::DelLink(link_by_name(name)), 0) {
            Ok(()) => Ok(true),
            Err(NlError::Kernel(Errno::ENODEV)) => Ok(false),
            Err(e) => Err(DataplaneError::new(op, e)),
        }
    }

    fn link_retire(&self, name: &str, new_name: &str) -> Result<bool> {
        let op = format!("ip link set {name} down");
        let mut sock = own(&op)?;
        let mut m = link_by_name(name);
        m.header.change_mask = LinkFlags::Up;
        match sock.request(RouteNetlinkMessage::SetLink(m), 0) {
            Ok(()) => {}
            Err(NlError::Kernel(Errno::ENODEV)) => return Ok(false),
            Err(e) => return Err(DataplaneError::new(op, e)),
        }
        // a rename by name needs the index: IFLA_IFNAME is the new name then
        let op = format!("ip link set {name} name {new_name}");
        let Some(link) = get_link(&mut sock, name).map_err(nl(&op))? else {
            return Ok(false);
        };
        let mut m = LinkMessage::default();
        m.header.index = link.header.index;
        m.attributes
            .push(LinkAttribute::IfName(new_name.to_string()));
        sock.request(RouteNetlinkMessage::SetLink(m), 0)
            .map_err(nl(op))?;
        Ok(true)
    }

    fn links_named(&self, prefix: &str) -> Result<Vec<String>> {
        let mut sock = own("ip link show")?;
        Ok(crate::overlay::link_names(&mut sock)?
            .into_iter()
            .map(|(_, n)| n)
            .filter(|n| n.starts_with(prefix))
            .collect())
    }

    fn link_index(&self, name: &str) -> Result<Option<u32>> {
        let op = format!("ip link show {name}");
        let mut sock = own(&op)?;
        Ok(get_link(&mut sock, name)
            .map_err(nl(op))?
            .map(|l| l.header.index))
    }

    fn route_replace(&self, route: &HostRoute) -> Result<()> {
        let via = route.via.map(|v| format!(" via {v}")).unwrap_or_default();
        let op = format!(
            "ip route replace {}{via} dev {} proto 84",
            route.dst, route.dev
        );
        let mut sock = own(&op)?;
        let index = get_link(&mut sock, &route.dev)
            .map_err(nl(&op))?
            .ok_or_else(|| DataplaneError::new(&op, NlError::Kernel(Errno::ENODEV)))?
            .header
            .index;
        sock.request(
            RouteNetlinkMessage::NewRoute(route_message(route.dst, index, route.via, route.onlink)),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map_err(nl(op))
    }

    fn sysctl_set(&self, key: &str, value: &str) -> Result<()> {
        sysctl::set(&self.sysctl_dir, key, value)
    }

    fn pod_configure(&self, netns: BorrowedFd<'_>, iface: &PodIface) -> Result<()> {
        let name = &iface.ifname;
        let mut sock = Netlink::open_in(netns).map_err(nl("enter pod netns"))?;
        let mut lo = link_by_name("lo");
        up(&mut lo);
        sock.request(RouteNetlinkMessage::SetLink(lo), 0)
            .map_err(nl("ip link set lo up (pod)"))?;
        let op = format!("ip link show {name} (pod)");
        let index = get_link(&mut sock, name)
            .map_err(nl(&op))?
            .ok_or_else(|| DataplaneError::new(&op, NlError::Kernel(Errno::ENODEV)))?
            .header
            .index;
        sock.request(
            RouteNetlinkMessage::NewAddress(addr_message(index, iface.address)),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map_err(nl(format!(
            "ip addr add {} dev {name} (pod)",
            iface.address
        )))?;
        let mut m = LinkMessage::default();
        m.header.index = index;
        up(&mut m);
        sock.request(RouteNetlinkMessage::SetLink(m), 0)
            .map_err(nl(format!("ip link set {name} up (pod)")))?;
        for r in &iface.routes {
            let via = r.via.map(|v| format!(" via {v}")).unwrap_or_default();
            let onlink = if r.onlink { " onlink" } else { "" };
            sock.request(
                RouteNetlinkMessage::NewRoute(route_message(r.dst, index, r.via, r.onlink)),
                NLM_F_CREATE | NLM_F_REPLACE,
            )
            .map_err(nl(format!(
                "ip route replace {}{via} dev {name}{onlink} (pod)",
                r.dst
            )))?;
        }
        Ok(())
    }

    fn pod_inspect(&self, netns: BorrowedFd<'_>, ifname: &str) -> Result<Option<PodIfaceState>> {
        let op = format!("ip addr show {ifname} (pod)");
        let mut sock = Netlink::open_in(netns).map_err(nl(&op))?;
        let Some(link) = get_link(&mut sock, ifname).map_err(nl(&op))? else {
            return Ok(None);
        };
        let index = link.header.index;
        let mtu = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
            .unwrap_or(0);
        let mut addresses = Vec::new();
        for msg in sock
            .dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))
            .map_err(nl(&op))?
        {
            let RouteNetlinkMessage::NewAddress(a) = msg else {
                continue;
            };
            if a.header.index != index {
                continue;
            }
            for attr in &a.attributes {
                if let AddressAttribute::Address(ip) = attr {
                    if let Ok(net) = IpNet::new(*ip, a.header.prefix_len) {
                        addresses.push(net);
                    }
                }
            }
        }
        let mut default_via = Vec::new();
        for msg in sock
            .dump(RouteNetlinkMessage::GetRoute(RouteMessage::default()))
            .map_err(nl("ip route show (pod)"))?
        {
            let RouteNetlinkMessage::NewRoute(r) = msg else {
                continue;
            };
            if r.header.destination_prefix_length != 0
                || r.header.table != RouteHeader::RT_TABLE_MAIN
            {
                continue;
            }
            let oif = r
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index));
            for a in &r.attributes {
                if let (true, RouteAttribute::Gateway(gw)) = (oif, a) {
                    match gw {
                        RouteAddress::Inet(v4) => default_via.push(IpAddr::V4(*v4)),
                        RouteAddress::Inet6(v6) => default_via.push(IpAddr::V6(*v6)),
                        _ => {}
                    }
                }
            }
        }
        Ok(Some(PodIfaceState {
            mac: link_mac(&link),
            mtu,
            up: link.header.flags.contains(LinkFlags::Up),
            addresses,
            default_via,
        }))
    }

    fn is_own_netns(&self, netns: BorrowedFd<'_>) -> Result<bool> {
        let err = |e: std::io::Error| {
            let errno = Errno::from_raw(e.raw_os_error().unwrap_or(Errno::EIO as i32));
            DataplaneError::new("stat netns", NlError::Kernel(errno))
        };
        let theirs = std::fs::File::from(netns.as_fd().try_clone_to_owned().map_err(err)?)
            .metadata()
            .map_err(err)?;
        let mine = std::fs::metadata("/proc/thread-self/ns/net").map_err(err)?;
        Ok(theirs.ino() == mine.ino() && theirs.dev() == mine.dev())
    }

    fn vxlan_ensure(&self, spec: &VxlanSpec) -> Result<u32> {
        crate::overlay::vxlan_ensure(spec)
    }

    fn route_delete(&self, dst: IpNet) -> Result<bool> {
        crate::overlay::route_delete(dst)
    }

    fn routes_owned(&self) -> Result<Vec<HostRoute>> {
        crate::overlay::routes_owned()
    }

    fn neigh_replace(&self, dev: &str, ip: IpAddr, mac: [u8; 6]) -> Result<()> {
        crate::overlay::neigh_replace(dev, ip, mac)
    }

    fn neigh_delete(&self, dev: &str, ip: IpAddr) -> Result<bool> {
        crate::overlay::neigh_delete(dev, ip)
    }

    fn neighbours(&self, dev: &str) -> Result<Vec<(IpAddr, [u8; 6])>> {
        crate::overlay::neighbours(dev)
    }

    fn fdb_replace(&self, dev: &str, mac: [u8; 6], dst: IpAddr) -> Result<()> {
        crate::overlay::fdb_replace(dev, mac, dst)
    }

    fn fdb_delete(&self, dev: &str, mac: [u8; 6], dst: IpAddr) -> Result<bool> {
        crate::overlay::fdb_delete(dev, mac, dst)
    }

    fn fdb(&self, dev: &str) -> Result<Vec<([u8; 6], IpAddr)>> {
        crate::overlay::fdb(dev)
    }

    fn underlay(&self, ip: IpAddr) -> Result<Option<Underlay>> {
        crate::overlay::underlay(ip)
    }

    fn nft_apply(&self, ruleset: &str) -> Result<()> {
        crate::nft::apply(ruleset)
    }

    fn nft_apply_netlink(
        &self,
        script: &str,
        schema: &dyn Fn(&str) -> Option<String>,
    ) -> Result<()> {
        crate::nftnl::apply(script, schema, crate::nft::APPLY_DEADLINE)
            .map_err(|e| DataplaneError::new("nft (netlink)", e))
    }

    fn nft_set_elements(&self, table: &str, set: &str) -> Result<Option<Vec<String>>> {
        crate::nft::set_elements(table, set)
    }

    fn nft_set_exists(&self, table: &str, set: &str) -> Result<bool> {
        crate::nft::set_exists(table, set)
    }

    fn nft_table_json(&self, table: &str) -> Result<Option<String>> {
        crate::nft::table_json(table)
    }

    fn local_ipv4(&self) -> Result<Vec<std::net::Ipv4Addr>> {
        let addrs = nix::ifaddrs::getifaddrs()
            .map_err(|e| DataplaneError::new("getifaddrs", crate::NlError::Kernel(e)))?;
        Ok(addrs
            .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
            .collect())
    }

    fn conntrack_delete_where(
        &self,
        pick: &dyn Fn(&crate::conntrack::Tuple, &crate::conntrack::Tuple) -> bool,
        before: &mut crate::conntrack::BeforeDelete<'_>,
    ) -> Result<usize> {
        crate::conntrack::delete_where(pick, before)
            .map_err(|e| DataplaneError::new("conntrack -D (flows a policy now denies)", e))
    }

    fn conntrack_delete_udp(&self, flows: &[crate::conntrack::UdpFlows]) -> Result<usize> {
        crate::conntrack::delete_udp(flows)
            .map_err(|e| DataplaneError::new("conntrack -D -p udp --orig-dst --reply-src", e))
    }

    fn link_kind_supported(&self, kind: crate::LinkKind) -> Result<bool> {
        const PROBE: &str = "trellis-probe";
        let (name, info) = match kind {
            crate::LinkKind::Ipip => ("ipip", InfoKind::IpIp),
            crate::LinkKind::Vxlan => ("vxlan", InfoKind::Vxlan),
        };
        let op = format!("ip link add {PROBE} type {name}");
        let mut sock = own(&op)?;
        let mut m = link_by_name(PROBE);
        m.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(info)]));
        match sock.request(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL) {
            Ok(()) | Err(NlError::Kernel(Errno::EEXIST)) => {
                self.link_delete(PROBE)?;
                Ok(true)
            }
            // "Unknown device type": no driver, none loadable
            Err(NlError::Kernel(Errno::EOPNOTSUPP)) => Ok(false),
            Err(e) => Err(DataplaneError::new(op, e)),
        }
    }
}
