//! Pure planning of one pod attachment: names, addresses, routes and
//! sysctls for each attach mode, and the CNI result they produce.

use ipnet::IpNet;
use sha2::{Digest, Sha256};
use std::net::{IpAddr, Ipv4Addr};
use trellis_cni::{AttachMode, Attachment, IfaceResult, IpResult, RouteResult};
use trellis_dataplane::{mac_string, HostRoute, PodIface, PodRoute, VethSpec};
use trellis_model::HostRange;

/// The gateway every routed-mode pod uses; the host veth answers its ARP.
pub const ROUTED_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The MAC of every host-side veth in routed mode (as Calico does).
pub const ROUTED_HOST_MAC: [u8; 6] = [0xee; 6];
/// Prefix of host-side veth names.
pub const VETH_PREFIX: &str = "tl";

/// Host-side veth name: `tl` + 11 hex chars of SHA-256(container id, ifname).
/// Stable, 13 characters, so DEL finds it without any state.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let digest = Sha256::digest(format!("{container_id}/{ifname}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{VETH_PREFIX}{}", &hex[..11])
}

/// Pod-side MAC derived from the pod IP (`0a:58:` + IPv4 bytes, the
/// Kubernetes convention), so it is unique in the cluster and stable.
pub fn pod_mac(ip: IpAddr) -> [u8; 6] {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            [0x0a, 0x58, o[0], o[1], o[2], o[3]]
        }
        IpAddr::V6(v6) => {
            let o = v6.octets();
            [0x0a, 0x58, o[12], o[13], o[14], o[15]]
        }
    }
}

/// Everything one ADD does, computed before touching the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Attach mode.
    pub mode: AttachMode,
    /// The pod's address with the prefix it gets in the pod.
    pub address: IpNet,
    /// The pod's gateway.
    pub gateway: IpAddr,
    /// Bridge name and its gateway address (bridge mode).
    pub bridge: Option<(String, IpNet)>,
    /// The veth (master is filled in once the bridge index is known).
    pub veth: VethSpec,
    /// Pod-side configuration.
    pub pod: PodIface,
    /// Host route to the pod (routed mode).
    pub host_route: Option<HostRoute>,
    /// sysctls to set once the host veth exists.
    pub sysctls: Vec<(String, String)>,
}

/// Why a plan cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// Routed mode needs an IPv4 subnet for now.
    #[error("routed mode needs an IPv4 pod subnet; {0} is not")]
    RoutedNeedsV4(IpNet),
}

/// Inputs of a plan.
#[derive(Debug, Clone)]
pub struct PlanInput<'a> {
    /// Mode.
    pub mode: AttachMode,
    /// The allocated address.
    pub ip: IpAddr,
    /// The node's subnet.
    pub range: HostRange,
    /// MTU.
    pub mtu: u32,
    /// Bridge name (bridge mode).
    pub bridge: &'a str,
    /// CNI_CONTAINERID.
    pub container_id: &'a str,
    /// CNI_IFNAME.
    pub ifname: &'a str,
}

/// Plans an attachment.
pub fn plan(i: &PlanInput<'_>) -> Result<Plan, PlanError> {
    let host = host_veth_name(i.container_id, i.ifname);
    let default = |ip: IpAddr| -> IpNet {
        if ip.is_ipv4() {
            "0.0.0.0/0".parse().unwrap_or(IpNet::V4(Default::default()))
        } else {
            "::/0".parse().unwrap_or(IpNet::V6(Default::default()))
        }
    };
    let veth = |host_mac| VethSpec {
        host: host.clone(),
        peer: i.ifname.to_string(),
        mtu: i.mtu,
        host_mac,
        peer_mac: Some(pod_mac(i.ip)),
        master: None,
    };
    match i.mode {
        AttachMode::Bridge => {
            let net = i.range.net();
            let gateway = i.range.gateway();
            let address = IpNet::new(i.ip, net.prefix_len()).unwrap_or(net);
            let gw_cidr = IpNet::new(gateway, net.prefix_len()).unwrap_or(net);
            Ok(Plan {
                mode: i.mode,
                address,
                gateway,
                bridge: Some((i.bridge.to_string(), gw_cidr)),
                veth: veth(None),
                pod: PodIface {
                    ifname: i.ifname.to_string(),
                    address,
                    routes: vec![PodRoute {
                        dst: default(i.ip),
                        via: Some(gateway),
                        onlink: false,
                    }],
                },
                host_route: None,
                sysctls: vec![
                    (format!("net/ipv4/conf/{}/proxy_arp", i.bridge), "1".into()),
                    (
                        format!("net/ipv4/neigh/{}/proxy_delay", i.bridge),
                        "0".into(),
                    ),
                ],
            })
        }
        AttachMode::Routed => {
            let IpAddr::V4(_) = i.ip else {
                return Err(PlanError::RoutedNeedsV4(i.range.net()));
            };
            let gateway = IpAddr::V4(ROUTED_GATEWAY);
            let address = IpNet::new(i.ip, 32).unwrap_or(i.range.net());
            Ok(Plan {
                mode: i.mode,
                address,
                gateway,
                bridge: None,
                veth: veth(Some(ROUTED_HOST_MAC)),
                pod: PodIface {
                    ifname: i.ifname.to_string(),
                    address,
                    routes: vec![PodRoute {
                        dst: default(i.ip),
                        via: Some(gateway),
                        onlink: true,
                    }],
                },
                host_route: Some(HostRoute {
                    dst: address,
                    dev: host.clone(),
                    via: None,
                    onlink: false,
                }),
                sysctls: vec![
                    (format!("net/ipv4/conf/{host}/proxy_arp"), "1".into()),
                    (format!("net/ipv4/neigh/{host}/proxy_delay"), "0".into()),
                ],
            })
        }
    }
}

impl Plan {
    /// The CNI result once the veth exists.
    pub fn result(&self, host_mac: &[u8; 6], netns_path: &str) -> Attachment {
        Attachment {
            interfaces: vec![
                IfaceResult {
                    name: self.veth.host.clone(),
                    mac: mac_string(host_mac),
                    mtu: self.veth.mtu,
                    sandbox: String::new(),
                },
                IfaceResult {
                    name: self.veth.peer.clone(),
                    mac: mac_string(&self.veth.peer_mac.unwrap_or_default()),
                    mtu: self.veth.mtu,
                    sandbox: netns_path.to_string(),
                },
            ],
            ips: vec![IpResult {
                address: self.address,
                gateway: Some(self.gateway),
                interface: 1,
            }],
            routes: self
                .pod
                .routes
                .iter()
                .map(|r| RouteResult {
                    dst: r.dst,
                    gw: r.via,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(mode: AttachMode) -> PlanInput<'static> {
        PlanInput {
            mode,
            ip: "10.244.1.7".parse().expect("ip"),
            range: HostRange::new("10.244.1.0/24".parse().expect("net")).expect("range"),
            mtu: 1450,
            bridge: "cni0",
            container_id: "c1",
            ifname: "eth0",
        }
    }

    #[test]
    fn names_are_stable_and_short() {
        let n = host_veth_name("abc", "eth0");
        assert_eq!(n.len(), 13);
        assert_eq!(n, host_veth_name("abc", "eth0"));
        assert_ne!(n, host_veth_name("abc", "eth1"));
        assert_eq!(
            pod_mac("10.244.1.7".parse().expect("ip")),
            [0x0a, 0x58, 10, 244, 1, 7]
        );
    }

    #[test]
    fn bridge_plan() {
        let p = plan(&input(AttachMode::Bridge)).expect("plan");
        assert_eq!(p.address.to_string(), "10.244.1.7/24");
        assert_eq!(p.gateway.to_string(), "10.244.1.1");
        assert_eq!(
            p.bridge,
            Some(("cni0".into(), "10.244.1.1/24".parse().expect("net")))
        );
        assert_eq!(p.pod.routes[0].via, Some("10.244.1.1".parse().expect("ip")));
        assert!(!p.pod.routes[0].onlink);
        assert!(p.host_route.is_none());
        let r = p.result(&[2, 0, 0, 0, 0, 1], "/var/run/netns/x");
        assert_eq!(r.ips[0].interface, 1);
        assert_eq!(r.interfaces[1].mac, "0a:58:0a:f4:01:07");
    }

    #[test]
    fn routed_plan() {
        let p = plan(&input(AttachMode::Routed)).expect("plan");
        assert_eq!(p.address.to_string(), "10.244.1.7/32");
        assert_eq!(p.gateway.to_string(), "169.254.1.1");
        assert!(p.pod.routes[0].onlink);
        assert_eq!(p.veth.host_mac, Some(ROUTED_HOST_MAC));
        let hr = p.host_route.expect("route");
        assert_eq!(hr.dst.to_string(), "10.244.1.7/32");
        assert_eq!(hr.dev, p.veth.host);
        assert!(p
            .sysctls
            .iter()
            .any(|(k, v)| k.ends_with("proxy_arp") && v == "1"));
        assert!(p
            .sysctls
            .iter()
            .any(|(k, v)| k.ends_with("proxy_delay") && v == "0"));
    }
}
