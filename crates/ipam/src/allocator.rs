//! The pure allocator: round-robin over the pod addresses of a subnet.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use trellis_model::cidr::{from_u128, to_u128};
use trellis_model::HostRange;

/// Who holds an address: one interface of one container on one network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// CNI network name.
    pub network: String,
    /// CNI_CONTAINERID.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// CNI_IFNAME.
    pub ifname: String,
    /// `namespace/name` of the pod when the runtime said (K8S_POD_*).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// The identity part of an [`Owner`].
pub type OwnerKey = (String, String, String);

impl Owner {
    /// (network, container, ifname).
    pub fn key(&self) -> OwnerKey {
        (
            self.network.clone(),
            self.container_id.clone(),
            self.ifname.clone(),
        )
    }
}

/// Allocation failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// Every pod address of the subnet is taken.
    #[error("no free address left in {0} ({1} addresses, all allocated)")]
    Exhausted(ipnet::IpNet, u128),
    /// The owner already holds an address.
    #[error("container {container} interface {ifname} on network {network} already holds {ip}")]
    AlreadyAllocated {
        /// Network.
        network: String,
        /// Container id.
        container: String,
        /// Interface.
        ifname: String,
        /// The address it holds.
        ip: IpAddr,
    },
}

/// Allocations of one subnet. Never hands out the network, broadcast or
/// gateway address, never one address twice.
#[derive(Debug, Clone)]
pub struct Allocator {
    range: HostRange,
    by_ip: BTreeMap<IpAddr, Owner>,
    by_owner: HashMap<OwnerKey, IpAddr>,
    last: Option<u128>,
}

impl Allocator {
    /// An empty allocator over `range`.
    pub fn new(range: HostRange) -> Self {
        Self {
            range,
            by_ip: BTreeMap::new(),
            by_owner: HashMap::new(),
            last: None,
        }
    }

    /// The range served.
    pub fn range(&self) -> HostRange {
        self.range
    }

    /// The address handed out last (the round-robin cursor).
    pub fn last(&self) -> Option<IpAddr> {
        self.last.map(|v| from_u128(v, self.range.net().addr()))
    }

    /// Sets the round-robin cursor (restored from disk).
    pub fn set_last(&mut self, ip: Option<IpAddr>) {
        self.last = ip.filter(|ip| self.range.is_pod_address(*ip)).map(to_u128);
    }

    /// Picks the next free address after the cursor and records `owner`.
    pub fn allocate(&mut self, owner: Owner) -> Result<IpAddr, IpamError> {
        if let Some(ip) = self.by_owner.get(&owner.key()) {
            return Err(IpamError::AlreadyAllocated {
                network: owner.network,
                container: owner.container_id,
                ifname: owner.ifname,
                ip: *ip,
            });
        }
        let (first, last) = (self.range.first_pod(), self.range.last_pod());
        let start = match self.last {
            Some(l) if l >= first && l < last => l + 1,
            _ => first,
        };
        let like = self.range.net().addr();
        let span = last - first + 1;
        // bounded by the subnet size: an IPv6 /64 is never scanned whole
        let tries = span.min(1 << 20);
        for i in 0..tries {
            let v = first + (start - first + i) % span;
            let ip = from_u128(v, like);
            if !self.by_ip.contains_key(&ip) {
                self.insert(ip, owner);
                self.last = Some(v);
                return Ok(ip);
            }
        }
        Err(IpamError::Exhausted(
            self.range.net(),
            self.range.pod_capacity(),
        ))
    }

    /// Records `ip` for `owner` as found on disk.
    pub fn insert(&mut self, ip: IpAddr, owner: Owner) {
        self.by_owner.insert(owner.key(), ip);
        self.by_ip.insert(ip, owner);
    }

    /// Frees the address of `key`, returning it.
    pub fn release(&mut self, key: &OwnerKey) -> Option<IpAddr> {
        let ip = self.by_owner.remove(key)?;
        self.by_ip.remove(&ip);
        Some(ip)
    }

    /// Forgets `ip` whoever holds it.
    pub fn remove_ip(&mut self, ip: IpAddr) -> Option<Owner> {
        let owner = self.by_ip.remove(&ip)?;
        self.by_owner.remove(&owner.key());
        Some(owner)
    }

    /// The address of `key`.
    pub fn lookup(&self, key: &OwnerKey) -> Option<IpAddr> {
        self.by_owner.get(key).copied()
    }

    /// All allocations, by address.
    pub fn allocations(&self) -> impl Iterator<Item = (&IpAddr, &Owner)> {
        self.by_ip.iter()
    }

    /// Allocations of `network` whose (container, ifname) is not in `valid`.
    pub fn stale(&self, network: &str, valid: &HashSet<(String, String)>) -> Vec<(IpAddr, Owner)> {
        self.by_ip
            .iter()
            .filter(|(_, o)| {
                o.network == network && !valid.contains(&(o.container_id.clone(), o.ifname.clone()))
            })
            .map(|(ip, o)| (*ip, o.clone()))
            .collect()
    }

    /// Addresses still free for pods.
    pub fn free(&self) -> u128 {
        let used = self
            .by_ip
            .keys()
            .filter(|ip| self.range.is_pod_address(**ip))
            .count() as u128;
        self.range.pod_capacity() - used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn owner(c: &str) -> Owner {
        Owner {
            network: "n".into(),
            container_id: c.into(),
            ifname: "eth0".into(),
            pod: None,
        }
    }

    fn alloc(net: &str) -> Allocator {
        Allocator::new(HostRange::new(net.parse().expect("net")).expect("range"))
    }

    #[test]
    fn round_robin_skips_gateway_and_wraps() {
        let mut a = alloc("10.0.0.0/29"); // .0 net, .1 gw, .2-.6 pods, .7 bcast
        let got: Vec<String> = (0..5)
            .map(|i| a.allocate(owner(&i.to_string())).expect("ip").to_string())
            .collect();
        assert_eq!(
            got,
            ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
        );
        assert!(matches!(
            a.allocate(owner("x")),
            Err(IpamError::Exhausted(..))
        ));
        a.release(&owner("1").key());
        assert_eq!(a.allocate(owner("y")).expect("ip").to_string(), "10.0.0.3");
    }

    #[test]
    fn released_ip_is_not_reused_at_once() {
        let mut a = alloc("10.0.0.0/24");
        let ip = a.allocate(owner("a")).expect("ip");
        a.release(&owner("a").key());
        assert_ne!(a.allocate(owner("b")).expect("ip"), ip);
    }

    #[test]
    fn double_allocation_is_refused() {
        let mut a = alloc("10.0.0.0/24");
        a.allocate(owner("a")).expect("ip");
        assert!(matches!(
            a.allocate(owner("a")),
            Err(IpamError::AlreadyAllocated { .. })
        ));
    }

    proptest! {
        #[test]
        fn never_twice_never_reserved(ops in proptest::collection::vec((any::<bool>(), 0u8..40), 1..300)) {
            let mut a = alloc("10.1.2.0/27");
            let net: ipnet::IpNet = "10.1.2.0/27".parse().expect("net");
            for (add, who) in ops {
                let o = owner(&who.to_string());
                if add {
                    if let Ok(ip) = a.allocate(o) {
                        prop_assert!(ip != net.network() && ip != net.broadcast());
                        prop_assert!(ip.to_string() != "10.1.2.1");
                    }
                } else {
                    a.release(&o.key());
                }
                let ips: HashSet<_> = a.allocations().map(|(ip, _)| *ip).collect();
                prop_assert_eq!(ips.len(), a.by_owner.len());
                prop_assert_eq!(a.free() + ips.len() as u128, 29);
            }
        }
    }
}
