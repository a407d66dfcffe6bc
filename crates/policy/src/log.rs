//! Logging of denied packets: before each drop rule, when logging is on,
//! a rule with the same match sends the packet's headers to an NFLOG
//! group, at most `rate` packets per second per rule, with a prefix that
//! names the tier and policy ([`prefix`]). The agent reads the group and
//! turns each message into a [`Denial`] ([`parse`]); nothing here touches
//! a socket.

use crate::compile::Origin;
use std::net::Ipv4Addr;

/// Denied packets are logged: at most `rate` per second and drop rule, to
/// NFLOG group `group`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LogDenied {
    /// Packets per second and rule (1..=100000).
    pub rate: u32,
    /// The NFLOG group the agent reads.
    pub group: u16,
}

/// Longest prefix the kernel keeps (NF_LOG_PREFIXLEN 128, with its NUL).
const PREFIX_MAX: usize = 127;

/// The log prefix of a drop rule from `o`: `TIER POLICY`, cut to what the
/// kernel keeps (at a character boundary); `"` becomes `'` (nft quotes it).
pub fn prefix(o: &Origin) -> String {
    let mut s = format!("{} {}", o.tier, o.policy).replace('"', "'");
    if s.len() > PREFIX_MAX {
        let mut end = PREFIX_MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// One logged packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// `Admin`, `NetworkPolicy`, `Baseline` or `unknown`.
    pub tier: String,
    /// The policy (or policies) whose drop rule it met.
    pub policy: String,
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// `tcp`, `udp`, `sctp`, `icmp`, or the protocol number.
    pub proto: String,
    /// Source and destination port (TCP, UDP, SCTP).
    pub ports: Option<(u16, u16)>,
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.ports {
            Some((sp, dp)) => write!(
                f,
                "{}:{sp} -> {}:{dp}/{} denied by {} {}",
                self.src, self.dst, self.proto, self.tier, self.policy
            ),
            None => write!(
                f,
                "{} -> {} {} denied by {} {}",
                self.src, self.dst, self.proto, self.tier, self.policy
            ),
        }
    }
}

/// NFNL_SUBSYS_ULOG, NFULNL_MSG_PACKET; NFULA_PAYLOAD, NFULA_PREFIX
const SUBSYS_ULOG: u16 = 4;
const MSG_PACKET: u16 = 0;
const ATTR_PAYLOAD: u16 = 9;
const ATTR_PREFIX: u16 = 10;

/// The netlink attributes of `buf`: (type without flags, payload).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[((len + 3) & !3).min(buf.len())..];
        Some((kind, payload))
    })
}

/// The denials in one datagram read from an NFLOG socket (several netlink
/// messages may share it). Messages that are not IPv4 packets with a
/// prefix, or are cut short, are skipped: the input is the kernel's, but a
/// reader must not trust lengths it did not check.
pub fn parse(mut buf: &[u8]) -> Vec<Denial> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < 16 || len > buf.len() {
            break;
        }
        // nlmsghdr (16), nfgenmsg (4: family, version, group)
        if kind == (SUBSYS_ULOG << 8) | MSG_PACKET && len >= 20 && buf[16] == 2 {
            if let Some(d) = packet(&buf[20..len]) {
                out.push(d);
            }
        }
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    out
}

fn packet(body: &[u8]) -> Option<Denial> {
    let mut prefix = None;
    let mut payload = None;
    for (k, v) in attrs(body) {
        match k {
            ATTR_PREFIX => prefix = Some(v.strip_suffix(&[0]).unwrap_or(v)),
            ATTR_PAYLOAD => payload = Some(v),
            _ => {}
        }
    }
    let prefix = String::from_utf8_lossy(prefix?);
    let (tier, policy) = prefix.split_once(' ').unwrap_or((&prefix, ""));
    let ip = payload?;
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let (proto, has_ports) = match ip[9] {
        6 => ("tcp".to_string(), true),
        17 => ("udp".to_string(), true),
        132 => ("sctp".to_string(), true),
        1 => ("icmp".to_string(), false),
        n => (n.to_string(), false),
    };
    let ports = (has_ports && ip.len() >= ihl + 4 && ihl >= 20).then(|| {
        let l4 = &ip[ihl..];
        (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        )
    });
    Some(Denial {
        tier: tier.to_string(),
        policy: policy.to_string(),
        src,
        dst,
        proto,
        ports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let len = 4 + payload.len();
        let mut a = (len as u16).to_ne_bytes().to_vec();
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        a.resize((len + 3) & !3, 0);
        a
    }

    fn message(family: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut body = vec![family, 0, 0, 100];
        for a in attrs {
            body.extend_from_slice(a);
        }
        let len = 16 + body.len();
        let mut m = (len as u32).to_ne_bytes().to_vec();
        m.extend_from_slice(&((SUBSYS_ULOG << 8) | MSG_PACKET).to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&body);
        m
    }

    fn ipv4(proto: u8, src: [u8; 4], dst: [u8; 4], l4: &[u8]) -> Vec<u8> {
        let mut h = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0];
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h.extend_from_slice(l4);
        h
    }

    fn origin(tier: &'static str, policy: &str) -> Origin {
        Origin {
            tier,
            policy: policy.into(),
            rule: None,
        }
    }

    #[test]
    fn a_logged_tcp_packet_names_its_policy_and_ports() {
        let p = prefix(&origin("NetworkPolicy", "x/deny-all"));
        let ip = ipv4(6, [10, 244, 1, 5], [10, 244, 2, 7], &[0x9c, 0x40, 0, 80]);
        let m = message(
            2,
            &[
                attr(ATTR_PREFIX, format!("{p}\0").as_bytes()),
                attr(ATTR_PAYLOAD, &ip),
            ],
        );
        let d = parse(&m);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].tier, "NetworkPolicy");
        assert_eq!(d[0].policy, "x/deny-all");
        assert_eq!(d[0].ports, Some((40000, 80)));
        assert_eq!(
            d[0].to_string(),
            "10.244.1.5:40000 -> 10.244.2.7:80/tcp denied by NetworkPolicy x/deny-all"
        );
    }

    #[test]
    fn short_foreign_or_unprefixed_messages_are_skipped() {
        let ip = ipv4(17, [10, 0, 0, 1], [10, 0, 0, 2], &[0, 53]);
        // UDP header cut short: no ports, still a denial
        let m = message(
            2,
            &[attr(ATTR_PREFIX, b"Admin x\0"), attr(ATTR_PAYLOAD, &ip)],
        );
        assert_eq!(parse(&m)[0].ports, None);
        // IPv6 family, no prefix, truncated header, garbage length
        assert!(parse(&message(10, &[attr(ATTR_PREFIX, b"Admin x\0")])).is_empty());
        assert!(parse(&message(2, &[attr(ATTR_PAYLOAD, &ip)])).is_empty());
        let short = message(
            2,
            &[attr(ATTR_PREFIX, b"A\0"), attr(ATTR_PAYLOAD, &ip[..12])],
        );
        assert!(parse(&short).is_empty());
        let mut bad = m.clone();
        bad[0] = 0xff;
        assert!(parse(&bad).is_empty());
        assert!(parse(&[1, 2, 3]).is_empty());
    }

    #[test]
    fn a_long_prefix_is_cut_at_a_character_boundary() {
        let long = format!("ns/{}", "é".repeat(100));
        let p = prefix(&origin("NetworkPolicy", &long));
        assert!(p.len() <= PREFIX_MAX);
        assert!(p.starts_with("NetworkPolicy ns/é"));
        assert_eq!(prefix(&origin("Admin", "a\"b")), "Admin a'b");
    }
}
