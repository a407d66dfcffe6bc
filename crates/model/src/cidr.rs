//! CIDR arithmetic for pod subnets: which addresses are usable hosts, which
//! one is the gateway. Works for IPv4 and IPv6 through one `u128` view.

use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Errors from CIDR helpers.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    /// The subnet has no room for a gateway plus at least one pod.
    #[error("subnet {0} is too small: it needs room for a gateway and at least one pod")]
    TooSmall(IpNet),
    /// The subnet was given with host bits set (e.g. 10.244.1.7/24).
    #[error("subnet {0} has host bits set; did you mean {1}?")]
    HostBits(IpNet, IpNet),
}

/// Converts an address to its integer value.
pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// Converts an integer back to an address of the same family as `like`.
pub fn from_u128(value: u128, like: IpAddr) -> IpAddr {
    match like {
        // Truncation is intended: callers stay inside an IPv4 subnet.
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(value as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(value)),
    }
}

/// The usable host addresses of a pod subnet: IPv4 excludes the network and
/// broadcast addresses, IPv6 excludes the subnet-router anycast address.
/// The first usable address is the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRange {
    net: IpNet,
    first: u128,
    last: u128,
}

impl HostRange {
    /// Builds the host range of `net`, refusing subnets with host bits set or
    /// without room for a gateway and one pod.
    pub fn new(net: IpNet) -> Result<Self, CidrError> {
        if net.trunc() != net {
            return Err(CidrError::HostBits(net, net.trunc()));
        }
        let network = to_u128(net.network());
        let broadcast = to_u128(net.broadcast());
        let (first, last) = match net {
            IpNet::V4(_) => (network + 1, broadcast.saturating_sub(1)),
            IpNet::V6(_) => (network + 1, broadcast),
        };
        // gateway + at least one pod
        if last < first + 1 || broadcast <= network {
            return Err(CidrError::TooSmall(net));
        }
        Ok(Self { net, first, last })
    }

    /// The subnet.
    pub fn net(&self) -> IpNet {
        self.net
    }

    /// The gateway: the first usable address.
    pub fn gateway(&self) -> IpAddr {
        from_u128(self.first, self.net.addr())
    }

    /// First address that may be handed to a pod (the one after the gateway).
    pub fn first_pod(&self) -> u128 {
        self.first + 1
    }

    /// Last address that may be handed to a pod.
    pub fn last_pod(&self) -> u128 {
        self.last
    }

    /// Number of addresses that may be handed to pods.
    pub fn pod_capacity(&self) -> u128 {
        self.last - self.first
    }

    /// True when `ip` may be handed to a pod.
    pub fn is_pod_address(&self, ip: IpAddr) -> bool {
        if ip.is_ipv4() != self.net.addr().is_ipv4() {
            return false;
        }
        let v = to_u128(ip);
        v >= self.first_pod() && v <= self.last_pod()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test cidr")
    }

    #[test]
    fn v4_slash24() {
        let r = HostRange::new(net("10.244.3.0/24")).expect("range");
        assert_eq!(r.gateway(), "10.244.3.1".parse::<IpAddr>().expect("ip"));
        assert_eq!(r.pod_capacity(), 253);
        assert!(!r.is_pod_address("10.244.3.0".parse().expect("ip")));
        assert!(!r.is_pod_address("10.244.3.1".parse().expect("ip")));
        assert!(r.is_pod_address("10.244.3.2".parse().expect("ip")));
        assert!(r.is_pod_address("10.244.3.254".parse().expect("ip")));
        assert!(!r.is_pod_address("10.244.3.255".parse().expect("ip")));
    }

    #[test]
    fn too_small_and_host_bits() {
        assert_eq!(
            HostRange::new(net("10.0.0.0/31")),
            Err(CidrError::TooSmall(net("10.0.0.0/31")))
        );
        assert!(HostRange::new(net("10.0.0.0/30")).is_ok());
        assert_eq!(
            HostRange::new(net("10.0.0.7/24")),
            Err(CidrError::HostBits(net("10.0.0.7/24"), net("10.0.0.0/24")))
        );
    }

    #[test]
    fn v6() {
        let r = HostRange::new(net("fd00:10::/120")).expect("range");
        assert_eq!(r.gateway(), "fd00:10::1".parse::<IpAddr>().expect("ip"));
        assert!(r.is_pod_address("fd00:10::ff".parse().expect("ip")));
        assert!(!r.is_pod_address("10.0.0.1".parse().expect("ip")));
    }

    proptest! {
        #[test]
        fn pod_addresses_never_network_broadcast_or_gateway(a in any::<u32>(), len in 8u8..=30) {
            let n = IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::from(a), len).expect("len").trunc());
            let r = HostRange::new(n).expect("range");
            for v in [r.first_pod(), r.last_pod()] {
                let ip = from_u128(v, n.addr());
                prop_assert!(n.contains(&ip));
                prop_assert!(ip != n.network() && ip != n.broadcast() && ip != r.gateway());
            }
        }
    }
}
