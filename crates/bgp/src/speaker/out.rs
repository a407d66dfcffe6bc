//! Packing advertisements into UPDATE messages that fit the 4096-byte
//! limit, grouping prefixes that share attributes. Pure.

use crate::export::Attrs;
use crate::wire::{PathAttribute, Update, AFI_IPV6, SAFI_UNICAST};
use ipnet::IpNet;

const V4_PER_UPDATE: usize = 600;
const V6_PER_UPDATE: usize = 180;
const WITHDRAW_V4_PER_UPDATE: usize = 700;

/// Collects what one peer must be told.
#[derive(Debug, Default)]
pub struct Batch {
    announce: Vec<(Attrs, Vec<IpNet>)>,
    withdraw: Vec<IpNet>,
}

impl Batch {
    /// Adds an announcement.
    pub fn announce(&mut self, prefix: IpNet, attrs: Attrs) {
        match self
            .announce
            .iter_mut()
            .rev()
            .find(|(a, _)| std::sync::Arc::ptr_eq(a, &attrs) || **a == *attrs)
        {
            Some((_, v)) => v.push(prefix),
            None => self.announce.push((attrs, vec![prefix])),
        }
    }

    /// Adds a withdrawal.
    pub fn withdraw(&mut self, prefix: IpNet) {
        self.withdraw.push(prefix);
    }

    /// Nothing to send.
    pub fn is_empty(&self) -> bool {
        self.announce.is_empty() && self.withdraw.is_empty()
    }

    /// The UPDATEs, withdrawals first.
    pub fn into_updates(self) -> Vec<Update> {
        let mut out = Vec::new();
        let (w4, w6): (Vec<IpNet>, Vec<IpNet>) =
            self.withdraw.into_iter().partition(|p| p.addr().is_ipv4());
        for chunk in w4.chunks(WITHDRAW_V4_PER_UPDATE) {
            out.push(Update {
                withdrawn: chunk.to_vec(),
                ..Default::default()
            });
        }
        for chunk in w6.chunks(V6_PER_UPDATE) {
            out.push(Update {
                attributes: vec![PathAttribute::MpUnreach {
                    afi: AFI_IPV6,
                    safi: SAFI_UNICAST,
                    withdrawn: chunk.to_vec(),
                }],
                ..Default::default()
            });
        }
        for (attrs, prefixes) in self.announce {
            let v6 = prefixes.first().is_some_and(|p| p.addr().is_ipv6());
            if v6 {
                for chunk in prefixes.chunks(V6_PER_UPDATE) {
                    let attributes = attrs
                        .iter()
                        .map(|a| match a {
                            PathAttribute::MpReach {
                                afi,
                                safi,
                                next_hops,
                                ..
                            } => PathAttribute::MpReach {
                                afi: *afi,
                                safi: *safi,
                                next_hops: next_hops.clone(),
                                nlri: chunk.to_vec(),
                            },
                            other => other.clone(),
                        })
                        .collect();
                    out.push(Update {
                        attributes,
                        ..Default::default()
                    });
                }
            } else {
                for chunk in prefixes.chunks(V4_PER_UPDATE) {
                    out.push(Update {
                        attributes: attrs.to_vec(),
                        nlri: chunk.to_vec(),
                        ..Default::default()
                    });
                }
            }
        }
        out
    }
}

/// End-of-RIB for a family (RFC 4724 2).
pub fn end_of_rib(v6: bool) -> Update {
    if v6 {
        Update {
            attributes: vec![PathAttribute::MpUnreach {
                afi: AFI_IPV6,
                safi: SAFI_UNICAST,
                withdrawn: vec![],
            }],
            ..Default::default()
        }
    } else {
        Update::default()
    }
}

/// Whether an UPDATE is an End-of-RIB marker of either family.
pub fn is_end_of_rib(u: &Update) -> bool {
    u.is_end_of_rib()
        || (u.withdrawn.is_empty()
            && u.nlri.is_empty()
            && matches!(u.attributes.as_slice(), [PathAttribute::MpUnreach { withdrawn, .. }] if withdrawn.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode, encode, Ctx, Message, MAX_LEN};
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    #[test]
    fn big_batches_fit_and_round_trip() {
        let attrs: Attrs = Arc::new(vec![
            PathAttribute::Origin(0),
            PathAttribute::AsPath(vec![]),
            PathAttribute::NextHop(Ipv4Addr::new(192, 0, 2, 1)),
            PathAttribute::LocalPref(100),
            PathAttribute::OriginatorId(Ipv4Addr::new(192, 0, 2, 9)),
            PathAttribute::ClusterList(vec![Ipv4Addr::new(0, 0, 0, 1)]),
        ]);
        let mut b = Batch::default();
        let mut all = Vec::new();
        for i in 0..5000u32 {
            let p: IpNet = format!("10.{}.{}.0/24", i >> 8, i & 255)
                .parse()
                .expect("net");
            all.push(p);
            b.announce(p, attrs.clone());
            b.withdraw(
                format!("11.{}.{}.128/25", i >> 8, i & 255)
                    .parse()
                    .expect("net"),
            );
        }
        let ctx = Ctx {
            four_octet_as: true,
        };
        let mut got = Vec::new();
        for u in b.into_updates() {
            let bytes = encode(&Message::Update(u), ctx);
            assert!(bytes.len() <= MAX_LEN, "{}", bytes.len());
            let (m, n) = decode(&bytes, ctx).expect("decode").expect("whole");
            assert_eq!(n, bytes.len());
            if let Message::Update(u) = m {
                got.extend(u.announced());
            }
        }
        assert_eq!(got, all);
    }

    #[test]
    fn end_of_rib_markers() {
        assert!(is_end_of_rib(&end_of_rib(false)));
        assert!(is_end_of_rib(&end_of_rib(true)));
        let mut b = Batch::default();
        b.withdraw("2001:db8::/64".parse().expect("net"));
        assert!(!is_end_of_rib(&b.into_updates()[0]));
    }
}
