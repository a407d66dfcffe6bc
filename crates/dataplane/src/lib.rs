//! The kernel side of trellis. Everything that issues netlink requests or
//! writes sysctls lives here, behind the [`Dataplane`] trait whose verbs
//! speak the domain (a veth into a pod, a bridge with its gateway), each
//! documented with the `ip` command it mirrors. [`LinuxDataplane`] talks to
//! the kernel; [`FakeDataplane`] records calls and injects errors for tests
//! of the logic above it.

pub mod conntrack;
mod fake;
mod linux;
pub mod netlink;
pub mod nflog;
mod nft;
pub mod nftnl;
mod overlay;
pub mod sandbox;
pub mod sysctl;

pub use fake::{FakeDataplane, FakeLink};
pub use linux::LinuxDataplane;
pub use netlink::NlError;

use ipnet::IpNet;
use std::net::IpAddr;
use std::os::fd::BorrowedFd;

/// Route protocol number marking routes trellis installed (`proto 84`), so
/// pruning never touches anyone else's routes.
pub const RTPROT_TRELLIS: u8 = 84;

/// A failed kernel operation, naming it like the `ip` command it mirrors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{op}: {source}")]
pub struct DataplaneError {
    /// The operation, e.g. `ip link add tl0a1b type veth peer eth0`.
    pub op: String,
    /// What the kernel said.
    pub source: NlError,
}

impl DataplaneError {
    /// Wraps `source` for `op`.
    pub fn new(op: impl Into<String>, source: NlError) -> Self {
        Self {
            op: op.into(),
            source,
        }
    }
}

/// Result alias for dataplane calls.
pub type Result<T> = std::result::Result<T, DataplaneError>;

/// A veth pair whose peer is created directly inside a pod namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethSpec {
    /// Host-side name (`tl` + hash).
    pub host: String,
    /// Name inside the pod (CNI_IFNAME).
    pub peer: String,
    /// MTU of both ends.
    pub mtu: u32,
    /// Fixed MAC for the host side (routed mode answers ARP with it).
    pub host_mac: Option<[u8; 6]>,
    /// Fixed MAC for the pod side (stable across CHECK and restarts).
    pub peer_mac: Option<[u8; 6]>,
    /// Bridge index to enslave the host side to (bridge mode).
    pub master: Option<u32>,
}

/// What a created veth looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethInfo {
    /// Host-side index.
    pub host_index: u32,
    /// Host-side MAC.
    pub host_mac: [u8; 6],
}

/// A route in the node's namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct HostRoute {
    /// Destination.
    pub dst: IpNet,
    /// Output interface.
    pub dev: String,
    /// Next hop, if any.
    pub via: Option<IpAddr>,
    /// The next hop is on the link even without a covering subnet.
    pub onlink: bool,
}

/// The VXLAN device of the vxlan backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    /// Device name (`trellis.1`).
    pub name: String,
    /// VNI.
    pub vni: u32,
    /// UDP destination port.
    pub port: u16,
    /// Local underlay address.
    pub local: IpAddr,
    /// Underlay device.
    pub dev: String,
    /// MTU.
    pub mtu: u32,
    /// Address on the device (the VTEP IP, a /32).
    pub address: IpNet,
    /// Its MAC, kept stable across restarts.
    pub mac: [u8; 6],
}

/// The interface a node's underlay address lives on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    /// Interface name.
    pub dev: String,
    /// The address with its prefix.
    pub net: IpNet,
    /// MTU.
    pub mtu: u32,
}

/// How the pod's interface is configured once it is in the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIface {
    /// Interface name in the pod.
    pub ifname: String,
    /// Address with prefix (a /32 in routed mode).
    pub address: IpNet,
    /// Routes as (destination, next hop, onlink).
    pub routes: Vec<PodRoute>,
}

/// A route inside the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRoute {
    /// Destination.
    pub dst: IpNet,
    /// Next hop; `None` for a link-scope route.
    pub via: Option<IpAddr>,
    /// Next hop is on the link even without a covering subnet (`onlink`).
    pub onlink: bool,
}

/// What the pod's interface looks like now (for CHECK).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIfaceState {
    /// MAC.
    pub mac: [u8; 6],
    /// MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// Addresses.
    pub addresses: Vec<IpNet>,
    /// Gateways of its default routes.
    pub default_via: Vec<IpAddr>,
}

/// The kernel verbs trellis needs, in the node's own namespace unless a
/// pod namespace fd is given.
pub trait Dataplane: Send + Sync {
    /// `ip link add NAME type bridge; ip link set NAME mtu MTU up;
    /// ip addr replace GATEWAY dev NAME` — creates or repairs; returns the index.
    fn bridge_ensure(&self, name: &str, gateway: IpNet, mtu: u32) -> Result<u32>;

    /// `ip link add HOST mtu MTU [address MAC] [master BR] up type veth peer
    /// name PEER netns POD mtu MTU` — one request, the peer lands in the pod.
    fn veth_into_netns(&self, spec: &VethSpec, netns: BorrowedFd<'_>) -> Result<VethInfo>;

    /// `ip link set NAME type bridge_slave hairpin on|off`.
    fn bridge_port_hairpin(&self, ifname: &str, on: bool) -> Result<()>;

    /// `ip link del NAME`; `Ok(false)` when it did not exist.
    fn link_delete(&self, name: &str) -> Result<bool>;

    /// `ip link set NAME down; ip link set NAME name NEW`: takes a link out
    /// of service at once (no traffic, its routes gone) so that deleting it,
    /// which waits for RCU in the kernel, can happen later. `Ok(false)` when
    /// `name` did not exist.
    fn link_retire(&self, name: &str, new_name: &str) -> Result<bool>;

    /// Names of the links whose name starts with `prefix`.
    fn links_named(&self, prefix: &str) -> Result<Vec<String>>;

    /// The index of link `name`, if it exists.
    fn link_index(&self, name: &str) -> Result<Option<u32>>;

    /// `ip route replace DST [via GW] dev DEV proto 84 [scope link]`.
    fn route_replace(&self, route: &HostRoute) -> Result<()>;

    /// `sysctl -w KEY=VALUE` (KEY relative to /proc/sys, dots or slashes),
    /// in the node's namespace.
    fn sysctl_set(&self, key: &str, value: &str) -> Result<()>;

    /// Inside the pod: `ip link set lo up; ip addr add ADDR dev IF;
    /// ip link set IF up; ip route add DST via GW dev IF [onlink]`.
    fn pod_configure(&self, netns: BorrowedFd<'_>, iface: &PodIface) -> Result<()>;

    /// Inside the pod: the interface's state, `None` if it does not exist.
    fn pod_inspect(&self, netns: BorrowedFd<'_>, ifname: &str) -> Result<Option<PodIfaceState>>;

    /// True when `netns` is the namespace the agent itself runs in.
    fn is_own_netns(&self, netns: BorrowedFd<'_>) -> Result<bool>;

    /// `ip link add NAME type vxlan id VNI dstport PORT local IP dev DEV
    /// nolearning; ip link set NAME address MAC mtu MTU up; ip addr replace
    /// ADDR dev NAME` — a device with other parameters is recreated.
    fn vxlan_ensure(&self, spec: &VxlanSpec) -> Result<u32>;

    /// `ip route del DST proto 84`; `Ok(false)` when absent.
    fn route_delete(&self, dst: IpNet) -> Result<bool>;

    /// `ip route show table main proto 84`.
    fn routes_owned(&self) -> Result<Vec<HostRoute>>;

    /// `ip neigh replace IP lladdr MAC dev DEV nud permanent`.
    fn neigh_replace(&self, dev: &str, ip: IpAddr, mac: [u8; 6]) -> Result<()>;

    /// `ip neigh del IP dev DEV`; `Ok(false)` when absent.
    fn neigh_delete(&self, dev: &str, ip: IpAddr) -> Result<bool>;

    /// `ip neigh show dev DEV nud permanent`.
    fn neighbours(&self, dev: &str) -> Result<Vec<(IpAddr, [u8; 6])>>;

    /// `bridge fdb replace MAC dev DEV dst IP self permanent`.
    fn fdb_replace(&self, dev: &str, mac: [u8; 6], dst: IpAddr) -> Result<()>;

    /// `bridge fdb del MAC dev DEV dst IP self`; `Ok(false)` when absent.
    fn fdb_delete(&self, dev: &str, mac: [u8; 6], dst: IpAddr) -> Result<bool>;

    /// `bridge fdb show dev DEV` (entries with a remote destination).
    fn fdb(&self, dev: &str) -> Result<Vec<([u8; 6], IpAddr)>>;

    /// The interface holding `ip`, with its prefix and MTU.
    fn underlay(&self, ip: IpAddr) -> Result<Option<Underlay>>;

    /// `nft -f -` with `ruleset`: one atomic transaction.
    fn nft_apply(&self, ruleset: &str) -> Result<()>;

    /// `nft -f -` with `script` (one-line commands of the subset
    /// [`nftnl`] compiles), sent as one nf_tables transaction over netlink
    /// without the `nft` binary; `schema` gives the declaration of a set
    /// the script changes without declaring it.
    fn nft_apply_netlink(
        &self,
        script: &str,
        schema: &dyn Fn(&str) -> Option<String>,
    ) -> Result<()>;

    /// `nft -j list table inet TABLE` (its rules with their counters);
    /// `None` when it does not exist.
    fn nft_table_json(&self, table: &str) -> Result<Option<String>>;

    /// `nft list set inet TABLE SET` succeeds: a cheap check that nobody
    /// deleted a table of ours.
    fn nft_set_exists(&self, table: &str, set: &str) -> Result<bool>;

    /// `nft -j list set inet TABLE SET`: its elements as nft prints them;
    /// `None` when it does not exist.
    fn nft_set_elements(&self, table: &str, set: &str) -> Result<Option<Vec<String>>>;

    /// `conntrack -D -p udp --orig-dst VIP --reply-src ENDPOINT` for each
    /// of `flows`. Returns how many entries went.
    fn conntrack_delete_udp(&self, flows: &[conntrack::UdpFlows]) -> Result<usize>;

    /// The IPv4 addresses of this namespace's interfaces.
    fn local_ipv4(&self) -> Result<Vec<std::net::Ipv4Addr>>;

    /// Deletes the IPv4 conntrack entries `pick` (original, reply tuple)
    /// chooses, once `before` took the list without failing. Returns how
    /// many went.
    fn conntrack_delete_where(
        &self,
        pick: &dyn Fn(&conntrack::Tuple, &conntrack::Tuple) -> bool,
        before: &mut crate::conntrack::BeforeDelete<'_>,
    ) -> Result<usize>;

    /// Whether the kernel can make links of `kind` (`ipip`, `vxlan`, ...):
    /// creates a throw-away link `trellis-probe` in this namespace and
    /// deletes it. `Ok(false)` when the kernel does not know the kind.
    fn link_kind_supported(&self, kind: LinkKind) -> Result<bool>;
}

/// Link kinds a backend may need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// IP-in-IP tunnel.
    Ipip,
    /// VXLAN.
    Vxlan,
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
