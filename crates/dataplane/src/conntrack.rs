//! Deleting conntrack entries (ctnetlink, `NETLINK_NETFILTER`): the UDP
//! flows of a Service endpoint that went. Without this a UDP client that
//! keeps sending (DNS from a long-lived resolver, a game, QUIC) keeps
//! being NATed to the dead endpoint for as long as it keeps the entry
//! alive — the black hole of kubernetes #48370.
//!
//! Mirrors `conntrack -D -p udp --orig-dst VIP --dport PORT --reply-src IP`
//! (kube-proxy's choice: only the Service's flows to that endpoint, not
//! every flow the endpoint has), and for a Service port that starts being
//! served, its flows that were never NATed.

use crate::netlink::attrs;
use crate::NlError;
use netlink_sys::{Socket, SocketAddr as NlAddr};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

const NETLINK_NETFILTER: isize = 12;
const CTNL: u16 = 1 << 8; // NFNL_SUBSYS_CTNETLINK
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const UDP: u8 = 17;

/// One direction of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tuple {
    /// Source address.
    pub src: Option<Ipv4Addr>,
    /// Destination address.
    pub dst: Option<Ipv4Addr>,
    /// IP protocol number.
    pub proto: u8,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
}

/// Decodes a `CTA_TUPLE_*` attribute.
pub fn parse_tuple(b: &[u8]) -> Tuple {
    let mut t = Tuple::default();
    for (k, v) in attrs(b) {
        match k {
            CTA_TUPLE_IP => {
                for (k2, v2) in attrs(v) {
                    let ip = <[u8; 4]>::try_from(v2).ok().map(Ipv4Addr::from);
                    match k2 {
                        CTA_IP_V4_SRC => t.src = ip,
                        CTA_IP_V4_DST => t.dst = ip,
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (k2, v2) in attrs(v) {
                    match (k2, v2) {
                        (CTA_PROTO_NUM, [p, ..]) => t.proto = *p,
                        (CTA_PROTO_SRC_PORT, [a, b2]) => t.sport = u16::from_be_bytes([*a, *b2]),
                        (CTA_PROTO_DST_PORT, [a, b2]) => t.dport = u16::from_be_bytes([*a, *b2]),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    t
}

use crate::nftnl::wire::attr;

/// The `CTA_TUPLE_ORIG` attribute of `t`.
pub fn encode_tuple(t: &Tuple) -> Vec<u8> {
    let mut ip = Vec::new();
    attr(
        &mut ip,
        CTA_IP_V4_SRC,
        &t.src.unwrap_or(Ipv4Addr::UNSPECIFIED).octets(),
    );
    attr(
        &mut ip,
        CTA_IP_V4_DST,
        &t.dst.unwrap_or(Ipv4Addr::UNSPECIFIED).octets(),
    );
    let mut proto = Vec::new();
    attr(&mut proto, CTA_PROTO_NUM, &[t.proto]);
    attr(&mut proto, CTA_PROTO_SRC_PORT, &t.sport.to_be_bytes());
    attr(&mut proto, CTA_PROTO_DST_PORT, &t.dport.to_be_bytes());
    let mut tuple = Vec::new();
    attr(&mut tuple, CTA_TUPLE_IP | NLA_F_NESTED, &ip);
    attr(&mut tuple, CTA_TUPLE_PROTO | NLA_F_NESTED, &proto);
    let mut out = Vec::new();
    attr(&mut out, CTA_TUPLE_ORIG | NLA_F_NESTED, &tuple);
    out
}

fn message(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(20 + payload.len());
    m.extend_from_slice(&((20 + payload.len()) as u32).to_ne_bytes());
    m.extend_from_slice(&(CTNL | kind).to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: AF_INET, version 0, res_id 0
    m.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]);
    m.extend_from_slice(payload);
    m
}

/// Splits a receive buffer into (type, payload after nfgenmsg / errno).
fn messages(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut b = buf;
    while b.len() >= 16 {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let kind = u16::from_ne_bytes([b[4], b[5]]);
        if len < 16 || len > b.len() {
            break;
        }
        out.push((kind, &b[16..len]));
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    out
}

fn transport(e: impl std::fmt::Display) -> NlError {
    NlError::Transport(e.to_string())
}

fn open() -> Result<Socket, NlError> {
    let mut sock = Socket::new(NETLINK_NETFILTER).map_err(transport)?;
    sock.bind_auto().map_err(transport)?;
    sock.connect(&NlAddr::new(0, 0)).map_err(transport)?;
    // every wait has a deadline: a kernel that does not answer is an error
    let tv = nix::sys::time::TimeVal::new(5, 0);
    nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
        .map_err(NlError::Kernel)?;
    // and every write one
    nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::SendTimeout, &tv)
        .map_err(NlError::Kernel)?;
    Ok(sock)
}

/// The original tuples of the IPv4 conntrack entries that `pick`
/// (original, reply) accepts.
fn dump(
    sock: &Socket,
    pick: impl Fn(&Tuple, &Tuple) -> bool,
) -> Result<Vec<(Tuple, Tuple)>, NlError> {
    sock.send(
        &message(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, 1, &[]),
        0,
    )
    .map_err(transport)?;
    let mut found = Vec::new();
    loop {
        let mut buf = Vec::with_capacity(1 << 16);
        sock.recv(&mut buf, 0).map_err(transport)?;
        for (kind, body) in messages(&buf) {
            match kind {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => {
                    let code = body
                        .get(..4)
                        .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]));
                    match code {
                        Some(0) => return Ok(found),
                        Some(c) => return Err(NlError::Kernel(nix::errno::Errno::from_raw(-c))),
                        None => return Err(transport("short error message")),
                    }
                }
                _ => {
                    let Some(attrs_bytes) = body.get(4..) else {
                        continue;
                    };
                    let mut orig = None;
                    let mut reply = None;
                    for (k, v) in attrs(attrs_bytes) {
                        match k {
                            CTA_TUPLE_ORIG => orig = Some(parse_tuple(v)),
                            CTA_TUPLE_REPLY => reply = Some(parse_tuple(v)),
                            _ => {}
                        }
                    }
                    if let (Some(o), Some(r)) = (orig, reply) {
                        if pick(&o, &r) {
                            found.push((o, r));
                        }
                    }
                }
            }
        }
    }
}

/// UDP flows of one Service port to delete, as kube-proxy chooses them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpFlows {
    /// Flows NATed to this endpoint; `None`: flows that were not NATed.
    pub endpoint: Option<SocketAddr>,
    /// Original destinations (the Service's address and port).
    pub dests: Vec<SocketAddr>,
    /// Original destination ports (the Service's node ports).
    pub node_ports: Vec<u16>,
}

impl UdpFlows {
    /// Whether the entry (original, reply) is one of these flows.
    pub fn matches(&self, o: &Tuple, r: &Tuple) -> bool {
        if o.proto != UDP {
            return false;
        }
        let to_service = o.dst.is_some_and(|d| {
            self.dests
                .iter()
                .any(|s| s.ip() == IpAddr::V4(d) && s.port() == o.dport)
        }) || self.node_ports.contains(&o.dport);
        if !to_service {
            return false;
        }
        match self.endpoint {
            Some(SocketAddr::V4(e)) => r.src == Some(*e.ip()) && r.sport == e.port(),
            Some(SocketAddr::V6(_)) => false,
            // not NATed: the reply comes from where the client sent it
            None => r.src == o.dst && r.sport == o.dport,
        }
    }
}

/// Deletes the conntrack entries of `flows`; returns how many went.
pub fn delete_udp(flows: &[UdpFlows]) -> Result<usize, NlError> {
    if flows.is_empty() {
        return Ok(0);
    }
    delete_where(&|o, r| flows.iter().any(|f| f.matches(o, r)), &mut |_| {
        Ok(())
    })
}

/// Told the entries about to be deleted (original, reply); an `Err`
/// stops the deletion.
pub type BeforeDelete<'a> = dyn FnMut(&[(Tuple, Tuple)]) -> Result<(), String> + 'a;

/// Deletes the IPv4 conntrack entries that `pick` (original, reply)
/// chooses, after `before` was told which (and did not fail); returns how
/// many went. An entry the kernel refuses to delete does not stop the
/// others: the first such error comes back once all were tried.
pub fn delete_where(
    pick: &dyn Fn(&Tuple, &Tuple) -> bool,
    before: &mut BeforeDelete<'_>,
) -> Result<usize, NlError> {
    let sock = open()?;
    let doomed = dump(&sock, pick)?;
    if doomed.is_empty() {
        return Ok(0);
    }
    before(&doomed).map_err(NlError::Transport)?;
    let mut deleted = 0;
    let mut first_error = None;
    for (i, (t, _)) in doomed.iter().enumerate() {
        let seq = 2 + i as u32;
        sock.send(
            &message(
                IPCTNL_MSG_CT_DELETE,
                NLM_F_REQUEST | NLM_F_ACK,
                seq,
                &encode_tuple(t),
            ),
            0,
        )
        .map_err(transport)?;
        let mut buf = Vec::with_capacity(4096);
        sock.recv(&mut buf, 0).map_err(transport)?;
        for (kind, body) in messages(&buf) {
            if kind == NLMSG_ERROR {
                match body
                    .get(..4)
                    .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                {
                    Some(0) => deleted += 1,
                    // gone meanwhile: what we wanted
                    Some(c) if -c == libc::ENOENT => {}
                    Some(c) => {
                        first_error.get_or_insert(NlError::Kernel(nix::errno::Errno::from_raw(-c)));
                    }
                    None => {
                        first_error.get_or_insert(transport("short ack"));
                    }
                }
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(deleted),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_services_flows_match() {
        let t = |src: [u8; 4], dst: [u8; 4], sport, dport| Tuple {
            src: Some(src.into()),
            dst: Some(dst.into()),
            proto: UDP,
            sport,
            dport,
        };
        let f = UdpFlows {
            endpoint: Some("10.244.2.5:5353".parse().expect("sa")),
            dests: vec!["10.96.0.10:53".parse().expect("sa")],
            node_ports: vec![30053],
        };
        let client = [10, 244, 1, 7];
        // through the Service, NATed to the endpoint
        assert!(f.matches(
            &t(client, [10, 96, 0, 10], 4000, 53),
            &t([10, 244, 2, 5], client, 5353, 4000)
        ));
        // through the node port
        assert!(f.matches(
            &t(client, [192, 0, 2, 12], 4000, 30053),
            &t([10, 244, 2, 5], client, 5353, 4000)
        ));
        // straight to the pod: not the Service's
        assert!(!f.matches(
            &t(client, [10, 244, 2, 5], 4000, 5353),
            &t([10, 244, 2, 5], client, 5353, 4000)
        ));
        // the Service's flow to another endpoint
        assert!(!f.matches(
            &t(client, [10, 96, 0, 10], 4000, 53),
            &t([10, 244, 3, 5], client, 5353, 4000)
        ));
        // never NATed (before the Service was served)
        let fresh = UdpFlows {
            endpoint: None,
            ..f.clone()
        };
        assert!(fresh.matches(
            &t(client, [10, 96, 0, 10], 4000, 53),
            &t([10, 96, 0, 10], client, 53, 4000)
        ));
        assert!(!fresh.matches(
            &t(client, [10, 96, 0, 10], 4000, 53),
            &t([10, 244, 2, 5], client, 5353, 4000)
        ));
    }

    #[test]
    fn a_tuple_round_trips() {
        let t = Tuple {
            src: Some(Ipv4Addr::new(10, 244, 1, 5)),
            dst: Some(Ipv4Addr::new(10, 96, 0, 10)),
            proto: UDP,
            sport: 40000,
            dport: 53,
        };
        let enc = encode_tuple(&t);
        let (k, inner) = attrs(&enc).next().expect("orig");
        assert_eq!(k, CTA_TUPLE_ORIG);
        assert_eq!(parse_tuple(inner), t);
        // truncated input never panics
        for n in 0..enc.len() {
            let _ = parse_tuple(&enc[..n]);
            let _ = messages(&enc[..n]);
        }
    }
}
