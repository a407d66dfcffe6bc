//! The named sets rules match against, and their elements as nft writes
//! them. Sets are named by what defines them (a peer, a port list), never
//! by their elements, so pods that come and go change elements only.

use crate::model::Protocol;
use ipnet::Ipv4Net;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

/// A set's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Set {
    /// Pod addresses (`type ipv4_addr`).
    Pods(BTreeSet<Ipv4Addr>),
    /// Address ranges, disjoint (`type ipv4_addr; flags interval`).
    Nets(BTreeSet<(u32, u32)>),
    /// Protocol and port ranges, disjoint per protocol (`type inet_proto .
    /// inet_service; flags interval`).
    Ports(BTreeSet<(Protocol, u16, u16)>),
    /// Destination pod, protocol and port of named container ports (`type
    /// ipv4_addr . inet_proto . inet_service`).
    Named(BTreeSet<(Ipv4Addr, Protocol, u16)>),
}

impl Set {
    /// The declaration's body (type and flags).
    pub fn decl(&self) -> &'static str {
        match self {
            Set::Pods(_) => "type ipv4_addr;",
            Set::Nets(_) => "type ipv4_addr; flags interval;",
            Set::Ports(_) => "type inet_proto . inet_service; flags interval;",
            Set::Named(_) => "type ipv4_addr . inet_proto . inet_service;",
        }
    }

    /// The elements as nft writes them, in order.
    pub fn elements(&self) -> Vec<String> {
        match self {
            Set::Pods(s) => s.iter().map(|a| a.to_string()).collect(),
            Set::Nets(s) => s
                .iter()
                .map(|(a, b)| {
                    if a == b {
                        Ipv4Addr::from(*a).to_string()
                    } else {
                        format!("{}-{}", Ipv4Addr::from(*a), Ipv4Addr::from(*b))
                    }
                })
                .collect(),
            Set::Ports(s) => s
                .iter()
                .map(|(p, a, b)| {
                    if a == b {
                        format!("{} . {a}", p.nft())
                    } else {
                        format!("{} . {a}-{b}", p.nft())
                    }
                })
                .collect(),
            Set::Named(s) => s
                .iter()
                .map(|(ip, p, port)| format!("{ip} . {} . {port}", p.nft()))
                .collect(),
        }
    }

    /// Same kind as `other` (a set can change elements, not type).
    pub fn same_kind(&self, other: &Set) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }

    /// Whether address `ip` is in a Pods or Nets set.
    pub fn has_addr(&self, ip: Ipv4Addr) -> bool {
        match self {
            Set::Pods(s) => s.contains(&ip),
            Set::Nets(s) => {
                let x = u32::from(ip);
                s.range(..=(x, u32::MAX))
                    .next_back()
                    .is_some_and(|(a, b)| *a <= x && x <= *b)
            }
            _ => false,
        }
    }

    /// Whether a Ports set has `proto`/`port`.
    pub fn has_port(&self, proto: Protocol, port: u16) -> bool {
        match self {
            Set::Ports(s) => s
                .iter()
                .any(|(p, a, b)| *p == proto && *a <= port && port <= *b),
            _ => false,
        }
    }

    /// Whether a Named set has the destination `ip`, `proto`, `port`.
    pub fn has_tuple(&self, ip: Ipv4Addr, proto: Protocol, port: u16) -> bool {
        match self {
            Set::Named(s) => s.contains(&(ip, proto, port)),
            _ => false,
        }
    }
}

/// `nets` less `except`, as disjoint inclusive ranges.
pub fn ranges(nets: &[Ipv4Net], except: &[Ipv4Net]) -> BTreeSet<(u32, u32)> {
    let span = |n: &Ipv4Net| (u32::from(n.network()), u32::from(n.broadcast()));
    let mut have: Vec<(u32, u32)> = nets.iter().map(span).collect();
    have.sort();
    // merge
    let mut merged: Vec<(u32, u32)> = Vec::new();
    for (a, b) in have {
        match merged.last_mut() {
            Some((_, e)) if u64::from(a) <= u64::from(*e) + 1 => *e = (*e).max(b),
            _ => merged.push((a, b)),
        }
    }
    for (xa, xb) in except.iter().map(span) {
        let mut next = Vec::with_capacity(merged.len() + 1);
        for (a, b) in merged {
            if xb < a || xa > b {
                next.push((a, b));
                continue;
            }
            if xa > a {
                next.push((a, xa - 1));
            }
            if xb < b {
                next.push((xb + 1, b));
            }
        }
        merged = next;
    }
    merged.into_iter().collect()
}

/// Port ranges merged per protocol.
pub fn port_ranges(
    ports: impl IntoIterator<Item = (Protocol, u16, u16)>,
) -> BTreeSet<(Protocol, u16, u16)> {
    let mut all: Vec<(Protocol, u16, u16)> = ports.into_iter().collect();
    all.sort();
    let mut out: Vec<(Protocol, u16, u16)> = Vec::new();
    for (p, a, b) in all {
        match out.last_mut() {
            Some((q, _, e)) if *q == p && u32::from(a) <= u32::from(*e) + 1 => *e = (*e).max(b),
            _ => out.push((p, a, b)),
        }
    }
    out.into_iter().collect()
}

/// A stable 64-bit name part (FNV-1a): the same text gives the same name
/// in every version and process.
pub fn hash(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Ipv4Net {
        s.parse().expect("net")
    }

    #[test]
    fn blocks_less_their_exceptions() {
        let r = ranges(
            &[n("10.0.0.0/8")],
            &[n("10.1.0.0/16"), n("10.255.255.255/32")],
        );
        let s = Set::Nets(r);
        assert_eq!(
            s.elements(),
            vec!["10.0.0.0-10.0.255.255", "10.2.0.0-10.255.255.254"]
        );
        assert!(s.has_addr("10.0.0.1".parse().expect("ip")));
        assert!(!s.has_addr("10.1.2.3".parse().expect("ip")));
        assert!(!s.has_addr("10.255.255.255".parse().expect("ip")));
        assert!(!s.has_addr("11.0.0.0".parse().expect("ip")));
        // the whole space, and an exception covering everything
        let all = ranges(&[n("0.0.0.0/0")], &[]);
        assert_eq!(all, BTreeSet::from([(0, u32::MAX)]));
        assert!(ranges(&[n("10.0.0.0/24")], &[n("10.0.0.0/16")]).is_empty());
        // overlapping and adjacent nets merge
        let m = ranges(
            &[n("10.0.1.0/24"), n("10.0.0.0/24"), n("10.0.0.128/25")],
            &[],
        );
        assert_eq!(Set::Nets(m).elements(), vec!["10.0.0.0-10.0.1.255"]);
    }

    #[test]
    fn ports_merge_per_protocol() {
        let p = port_ranges([
            (Protocol::Tcp, 80, 80),
            (Protocol::Tcp, 81, 90),
            (Protocol::Udp, 80, 80),
            (Protocol::Tcp, 85, 100),
        ]);
        assert_eq!(
            Set::Ports(p.clone()).elements(),
            vec!["tcp . 80-100", "udp . 80"]
        );
        let s = Set::Ports(p);
        assert!(s.has_port(Protocol::Tcp, 95));
        assert!(!s.has_port(Protocol::Udp, 81));
        assert_eq!(hash("a"), hash("a"));
        assert_ne!(hash("a"), hash("b"));
    }
}
