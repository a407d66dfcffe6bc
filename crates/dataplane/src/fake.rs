//! A stateful stand-in for the kernel: records every call, keeps links,
//! routes, sysctls and pod interfaces in memory, and fails a chosen verb on
//! demand. For tests of the logic above the dataplane, never as proof that
//! a feature works.

use crate::{
    Dataplane, DataplaneError, HostRoute, NlError, PodIface, PodIfaceState, Result, Underlay,
    VethInfo, VethSpec, VxlanSpec,
};
use ipnet::IpNet;
use nix::errno::Errno;
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Mutex;

/// A link the fake holds in the node namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeLink {
    /// Index.
    pub index: u32,
    /// MAC.
    pub mac: [u8; 6],
    /// Bridge it is enslaved to.
    pub master: Option<u32>,
    /// Hairpin flag.
    pub hairpin: bool,
    /// MTU.
    pub mtu: u32,
    /// For veths: (pod fd, peer name).
    pub peer: Option<(i32, String)>,
}

#[derive(Debug, Default)]
struct State {
    next_index: u32,
    links: BTreeMap<String, FakeLink>,
    routes: Vec<HostRoute>,
    sysctls: BTreeMap<String, String>,
    pods: BTreeMap<(i32, String), PodIfaceState>,
    calls: Vec<String>,
    fail: Option<(String, Errno)>,
    neighbours: BTreeMap<(String, IpAddr), [u8; 6]>,
    fdb: BTreeSet<(String, [u8; 6], IpAddr)>,
    vxlan: Option<VxlanSpec>,
    underlay: Option<Underlay>,
    nft: Option<String>,
}

/// The fake dataplane.
#[derive(Debug, Default)]
pub struct FakeDataplane {
    state: Mutex<State>,
}

impl FakeDataplane {
    /// An empty fake.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the next call of `verb` (e.g. `"pod_configure"`) fail with `errno`.
    pub fn fail_next(&self, verb: &str, errno: Errno) {
        self.lock().fail = Some((verb.to_string(), errno));
    }

    /// Verbs called so far, in order.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// Links in the node namespace.
    pub fn links(&self) -> BTreeMap<String, FakeLink> {
        self.lock().links.clone()
    }

    /// Puts a plain link `name` into the node namespace (a leftover).
    pub fn add_test_link(&self, name: &str) {
        self.lock().add_link(name, 1500, None);
    }

    /// Routes in the node namespace.
    pub fn routes(&self) -> Vec<HostRoute> {
        self.lock().routes.clone()
    }

    /// Neighbours as (dev, ip) -> mac.
    pub fn neighbour_table(&self) -> BTreeMap<(String, IpAddr), [u8; 6]> {
        self.lock().neighbours.clone()
    }

    /// FDB entries as (dev, mac, dst).
    pub fn fdb_table(&self) -> BTreeSet<(String, [u8; 6], IpAddr)> {
        self.lock().fdb.clone()
    }

    /// The VXLAN device, if made.
    pub fn vxlan(&self) -> Option<VxlanSpec> {
        self.lock().vxlan.clone()
    }

    /// Sets what [`Dataplane::underlay`] answers.
    pub fn set_underlay(&self, u: Underlay) {
        self.lock().underlay = Some(u);
    }

    /// The last ruleset applied.
    pub fn nft(&self) -> Option<String> {
        self.lock().nft.clone()
    }

    /// Forgets every call recorded so far.
    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// sysctls written.
    pub fn sysctls(&self) -> BTreeMap<String, String> {
        self.lock().sysctls.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enter(&self, verb: &str) -> Result<std::sync::MutexGuard<'_, State>> {
        let mut s = self.lock();
        s.calls.push(verb.to_string());
        if let Some((v, errno)) = s.fail.clone() {
            if v == verb {
                s.fail = None;
                return Err(DataplaneError::new(verb, NlError::Kernel(errno)));
            }
        }
        Ok(s)
    }
}

impl State {
    fn add_link(&mut self, name: &str, mtu: u32, mac: Option<[u8; 6]>) -> FakeLink {
        self.next_index += 1;
        let index = self.next_index + 1;
        let mac = mac.unwrap_or([0x02, 0, 0, 0, (index >> 8) as u8, index as u8]);
        let link = FakeLink {
            index,
            mac,
            master: None,
            hairpin: false,
            mtu,
            peer: None,
        };
        self.links.insert(name.to_string(), link.clone());
        link
    }
}

impl Dataplane for FakeDataplane {
    fn bridge_ensure(&self, name: &str, _gateway: IpNet, mtu: u32) -> Result<u32> {
        let mut s = self.enter("bridge_ensure")?;
        if let Some(l) = s.links.get(name) {
            return Ok(l.index);
        }
        Ok(s.add_link(name, mtu, None).index)
    }

    fn veth_into_netns(&self, spec: &VethSpec, netns: BorrowedFd<'_>) -> Result<VethInfo> {
        let mut s = self.enter("veth_into_netns")?;
        let key = (netns.as_raw_fd(), spec.peer.clone());
        if s.links.contains_key(&spec.host) || s.pods.contains_key(&key) {
            return Err(DataplaneError::new(
                "veth_into_netns",
                NlError::Kernel(Errno::EEXIST),
            ));
        }
        let mut link = s.add_link(&spec.host, spec.mtu, spec.host_mac);
        let pod_mac = spec.peer_mac.unwrap_or([2, 0xaa, 0, 0, 0, 1]);
        link.master = spec.master;
        link.peer = Some(key.clone());
        s.links.insert(spec.host.clone(), link.clone());
        s.pods.insert(
            key,
            PodIfaceState {
                mac: pod_mac,
                mtu: spec.mtu,
                up: false,
                addresses: vec![],
                default_via: vec![],
            },
        );
        Ok(VethInfo {
            host_index: link.index,
            host_mac: link.mac,
        })
    }

    fn bridge_port_hairpin(&self, ifname: &str, on: bool) -> Result<()> {
        let mut s = self.enter("bridge_port_hairpin")?;
        match s.links.get_mut(ifname) {
            Some(l) => {
                l.hairpin = on;
                Ok(())
            }
            None => Err(DataplaneError::new(
                "bridge_port_hairpin",
                NlError::Kernel(Errno::ENODEV),
            )),
        }
    }

    fn link_delete(&self, name: &str) -> Result<bool> {
        let mut s = self.enter("link_delete")?;
        let Some(link) = s.links.remove(name) else {
            return Ok(false);
        };
        if let Some(peer) = link.peer {
            s.pods.remove(&peer);
        }
        s.routes.retain(|r| r.dev != name);
        Ok(true)
    }

    fn link_retire(&self, name: &str, new_name: &str) -> Result<bool> {
        let mut s = self.enter("link_retire")?;
        if s.links.contains_key(new_name) {
            return Err(DataplaneError::new(
                "link_retire",
                NlError::Kernel(Errno::EEXIST),
            ));
        }
        let Some(link) = s.links.remove(name) else {
            return Ok(false);
        };
        // a down link loses its routes, as in the kernel
        s.routes.retain(|r| r.dev != name);
        s.links.insert(new_name.to_string(), link);
        Ok(true)
    }

    fn links_named(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .enter("links_named")?
            .links
            .keys()
            .filter(|n| n.starts_with(prefix))
            .cloned()
            .collect())
    }

    fn link_index(&self, name: &str) -> Result<Option<u32>> {
        Ok(self.enter("link_index")?.links.get(name).map(|l| l.index))
    }

    fn route_replace(&self, route: &HostRoute) -> Result<()> {
        let mut s = self.enter("route_replace")?;
        if !s.links.contains_key(&route.dev) {
            return Err(DataplaneError::new(
                "route_replace",
                NlError::Kernel(Errno::ENODEV),
            ));
        }
        s.routes.retain(|r| r.dst != route.dst);
        s.routes.push(route.clone());
        Ok(())
    }

    fn sysctl_set(&self, key: &str, value: &str) -> Result<()> {
        self.enter("sysctl_set")?
            .sysctls
            .insert(key.to_string(), value.to_string());
        Ok(())
    }

    fn pod_configure(&self, netns: BorrowedFd<'_>, iface: &PodIface) -> Result<()> {
        let mut s = self.enter("pod_configure")?;
        let Some(p) = s.pods.get_mut(&(netns.as_raw_fd(), iface.ifname.clone())) else {
            return Err(DataplaneError::new(
                "pod_configure",
                NlError::Kernel(Errno::ENODEV),
            ));
        };
        p.up = true;
        p.addresses = vec![iface.address];
        p.default_via = iface
            .routes
            .iter()
            .filter(|r| r.dst.prefix_len() == 0)
            .filter_map(|r| r.via)
            .collect();
        Ok(())
    }

    fn pod_inspect(&self, netns: BorrowedFd<'_>, ifname: &str) -> Result<Option<PodIfaceState>> {
        Ok(self
            .enter("pod_inspect")?
            .pods
            .get(&(netns.as_raw_fd(), ifname.to_string()))
            .cloned())
    }

    fn is_own_netns(&self, _netns: BorrowedFd<'_>) -> Result<bool> {
        drop(self.enter("is_own_netns")?);
        Ok(false)
    }

    fn link_kind_supported(&self, kind: crate::LinkKind) -> Result<bool> {
        Ok(kind == crate::LinkKind::Vxlan)
    }

    fn vxlan_ensure(&self, spec: &VxlanSpec) -> Result<u32> {
        let mut s = self.enter("vxlan_ensure")?;
        if s.vxlan.as_ref() != Some(spec) {
            s.vxlan = Some(spec.clone());
            let link = s.add_link(&spec.name, spec.mtu, Some(spec.mac));
            return Ok(link.index);
        }
        Ok(s.links.get(&spec.name).map(|l| l.index).unwrap_or(0))
    }

    fn route_delete(&self, dst: IpNet) -> Result<bool> {
        let mut s = self.enter("route_delete")?;
        let before = s.routes.len();
        s.routes.retain(|r| r.dst != dst);
        Ok(s.routes.len() != before)
    }

    fn routes_owned(&self) -> Result<Vec<HostRoute>> {
        Ok(self.enter("routes_owned")?.routes.clone())
    }

    fn neigh_replace(&self, dev: &str, ip: IpAddr, mac: [u8; 6]) -> Result<()> {
        self.enter("neigh_replace")?
            .neighbours
            .insert((dev.to_string(), ip), mac);
        Ok(())
    }

    fn neigh_delete(&self, dev: &str, ip: IpAddr) -> Result<bool> {
        Ok(self
            .enter("neigh_delete")?
            .neighbours
            .remove(&(dev.to_string(), ip))
            .is_some())
    }

    fn neighbours(&self, dev: &str) -> Result<Vec<(IpAddr, [u8; 6])>> {
        let s = self.enter("neighbours")?;
        Ok(s.neighbours
            .iter()
            .filter(|((d, _), _)| d == dev)
            .map(|((_, ip), mac)| (*ip, *mac))
            .collect())
    }

    fn fdb_replace(&self, dev: &str, mac: [u8; 6], dst: IpAddr) -> Result<()> {
        let mut s = self.enter("fdb_replace")?;
        s.fdb.retain(|(d, m, _)| !(d == dev && *m == mac));
        s.fdb.insert((dev.to_string(), mac, dst));
        Ok(())
    }

    fn fdb_delete(&self, dev: &str, mac: [u8; 6], dst: IpAddr) -> Result<bool> {
        Ok(self
            .enter("fdb_delete")?
            .fdb
            .remove(&(dev.to_string(), mac, dst)))
    }

    fn fdb(&self, dev: &str) -> Result<Vec<([u8; 6], IpAddr)>> {
        let s = self.enter("fdb")?;
        Ok(s.fdb
            .iter()
            .filter(|(d, _, _)| d == dev)
            .map(|(_, m, ip)| (*m, *ip))
            .collect())
    }

    fn nft_apply(&self, ruleset: &str) -> Result<()> {
        self.enter("nft_apply")?.nft = Some(ruleset.to_string());
        Ok(())
    }

    fn nft_apply_netlink(
        &self,
        script: &str,
        schema: &dyn Fn(&str) -> Option<String>,
    ) -> Result<()> {
        // what the kernel would refuse for its form, refused here too
        crate::nftnl::compile(script, schema)
            .map_err(|e| DataplaneError::new("nft (netlink)", NlError::Transport(e.0)))?;
        self.enter("nft_apply")?.nft = Some(script.to_string());
        Ok(())
    }

    fn nft_set_elements(&self, _table: &str, _set: &str) -> Result<Option<Vec<String>>> {
        // the fake keeps scripts, not tables: nothing to read back
        drop(self.enter("nft_set_elements")?);
        Ok(None)
    }

    fn nft_set_exists(&self, _table: &str, _set: &str) -> Result<bool> {
        Ok(self.enter("nft_set_exists")?.nft.is_some())
    }

    fn nft_table_json(&self, _table: &str) -> Result<Option<String>> {
        drop(self.enter("nft_table_json")?);
        Ok(None)
    }

    fn conntrack_delete_udp(&self, flows: &[crate::conntrack::UdpFlows]) -> Result<usize> {
        drop(self.enter("conntrack_delete_udp")?);
        Ok(flows.len())
    }

    fn local_ipv4(&self) -> Result<Vec<std::net::Ipv4Addr>> {
        drop(self.enter("local_ipv4")?);
        Ok(vec![])
    }

    fn conntrack_delete_where(
        &self,
        _pick: &dyn Fn(&crate::conntrack::Tuple, &crate::conntrack::Tuple) -> bool,
        _before: &mut crate::conntrack::BeforeDelete<'_>,
    ) -> Result<usize> {
        drop(self.enter("conntrack_delete_where")?);
        Ok(0)
    }

    fn underlay(&self, _ip: IpAddr) -> Result<Option<Underlay>> {
        Ok(self.enter("underlay")?.underlay.clone())
    }
}
