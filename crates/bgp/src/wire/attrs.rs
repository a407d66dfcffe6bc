//! Path attributes (RFC 4271 4.3/5, 4760, 4456, 1997, 6793) and how each
//! one's errors are handled (RFC 7606 section 7).

use super::error::DecodeError;
use super::{prefix, AFI_IPV4, AFI_IPV6, SAFI_UNICAST};
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const OPTIONAL: u8 = 0x80;
const TRANSITIVE: u8 = 0x40;
const PARTIAL: u8 = 0x20;
const EXTENDED: u8 = 0x10;

/// One AS_PATH segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AsSegment {
    /// AS_SET (1).
    Set(Vec<u32>),
    /// AS_SEQUENCE (2).
    Sequence(Vec<u32>),
}

/// A path attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathAttribute {
    /// ORIGIN (1): 0 IGP, 1 EGP, 2 INCOMPLETE.
    Origin(u8),
    /// AS_PATH (2).
    AsPath(Vec<AsSegment>),
    /// NEXT_HOP (3).
    NextHop(Ipv4Addr),
    /// MULTI_EXIT_DISC (4).
    Med(u32),
    /// LOCAL_PREF (5).
    LocalPref(u32),
    /// ATOMIC_AGGREGATE (6).
    AtomicAggregate,
    /// AGGREGATOR (7): AS, router id.
    Aggregator(u32, Ipv4Addr),
    /// COMMUNITIES (8).
    Communities(Vec<u32>),
    /// ORIGINATOR_ID (9, RFC 4456).
    OriginatorId(Ipv4Addr),
    /// CLUSTER_LIST (10, RFC 4456).
    ClusterList(Vec<Ipv4Addr>),
    /// MP_REACH_NLRI (14): AFI, SAFI, next hops, prefixes.
    MpReach {
        /// AFI.
        afi: u16,
        /// SAFI.
        safi: u8,
        /// Next hop(s): one, or global + link-local for IPv6.
        next_hops: Vec<IpAddr>,
        /// Announced prefixes.
        nlri: Vec<IpNet>,
    },
    /// MP_UNREACH_NLRI (15): AFI, SAFI, withdrawn prefixes.
    MpUnreach {
        /// AFI.
        afi: u16,
        /// SAFI.
        safi: u8,
        /// Withdrawn prefixes.
        withdrawn: Vec<IpNet>,
    },
    /// An optional attribute we do not interpret, kept with its flags.
    Unknown {
        /// Flags as received.
        flags: u8,
        /// Type code.
        code: u8,
        /// Value.
        value: Vec<u8>,
    },
}

/// What to do with an attribute that failed to parse (RFC 7606 section 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum AttrFault {
    /// End the session with this NOTIFICATION.
    Reset(DecodeError),
    /// Keep the session; withdraw the UPDATE's routes (the error is kept for logs).
    TreatAsWithdraw(DecodeError),
    /// Drop this attribute only.
    Discard,
}

impl PathAttribute {
    /// The type code.
    pub fn code(&self) -> u8 {
        match self {
            Self::Origin(_) => 1,
            Self::AsPath(_) => 2,
            Self::NextHop(_) => 3,
            Self::Med(_) => 4,
            Self::LocalPref(_) => 5,
            Self::AtomicAggregate => 6,
            Self::Aggregator(..) => 7,
            Self::Communities(_) => 8,
            Self::OriginatorId(_) => 9,
            Self::ClusterList(_) => 10,
            Self::MpReach { .. } => 14,
            Self::MpUnreach { .. } => 15,
            Self::Unknown { code, .. } => *code,
        }
    }

    /// Well-known flags (optional, transitive) of the codes we know.
    fn expected_flags(code: u8) -> Option<u8> {
        Some(match code {
            1 | 2 | 3 | 5 | 6 => TRANSITIVE,
            7 | 8 => OPTIONAL | TRANSITIVE,
            4 | 9 | 10 | 14 | 15 => OPTIONAL,
            _ => return None,
        })
    }

    /// RFC 7606 section 7: how a malformed instance of `code` is handled.
    fn fault(code: u8, err: DecodeError) -> AttrFault {
        match code {
            6 | 7 => AttrFault::Discard,
            14 | 15 => AttrFault::Reset(err),
            _ => AttrFault::TreatAsWithdraw(err),
        }
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>, four_octet_as: bool) {
        let code = self.code();
        let mut v = Vec::new();
        let flags = match self {
            Self::Unknown { flags, value, .. } => {
                v.extend_from_slice(value);
                // an optional transitive attribute we pass on is partial
                if flags & TRANSITIVE != 0 {
                    flags | PARTIAL
                } else {
                    *flags
                }
            }
            _ => {
                self.encode_value(&mut v, four_octet_as);
                Self::expected_flags(code).unwrap_or(OPTIONAL)
            }
        } & !EXTENDED;
        if v.len() > 255 {
            out.extend_from_slice(&[flags | EXTENDED, code]);
            out.extend_from_slice(&(v.len() as u16).to_be_bytes());
        } else {
            out.extend_from_slice(&[flags, code, v.len() as u8]);
        }
        out.extend_from_slice(&v);
    }

    fn encode_value(&self, v: &mut Vec<u8>, four: bool) {
        match self {
            Self::Origin(o) => v.push(*o),
            Self::AsPath(segs) => {
                for s in segs {
                    let (kind, ases) = match s {
                        AsSegment::Set(a) => (1, a),
                        AsSegment::Sequence(a) => (2, a),
                    };
                    v.push(kind);
                    v.push(ases.len() as u8);
                    for a in ases {
                        if four {
                            v.extend_from_slice(&a.to_be_bytes());
                        } else {
                            v.extend_from_slice(
                                &u16::try_from(*a)
                                    .unwrap_or(super::open::AS_TRANS)
                                    .to_be_bytes(),
                            );
                        }
                    }
                }
            }
            Self::NextHop(ip) | Self::OriginatorId(ip) => v.extend_from_slice(&ip.octets()),
            Self::Med(x) | Self::LocalPref(x) => v.extend_from_slice(&x.to_be_bytes()),
            Self::AtomicAggregate => {}
            Self::Aggregator(asn, id) => {
                if four {
                    v.extend_from_slice(&asn.to_be_bytes());
                } else {
                    v.extend_from_slice(
                        &u16::try_from(*asn)
                            .unwrap_or(super::open::AS_TRANS)
                            .to_be_bytes(),
                    );
                }
                v.extend_from_slice(&id.octets());
            }
            Self::Communities(c) => c.iter().for_each(|x| v.extend_from_slice(&x.to_be_bytes())),
            Self::ClusterList(c) => c.iter().for_each(|x| v.extend_from_slice(&x.octets())),
            Self::MpReach {
                afi,
                safi,
                next_hops,
                nlri,
            } => {
                v.extend_from_slice(&afi.to_be_bytes());
                v.push(*safi);
                let mut nh = Vec::new();
                for h in next_hops {
                    match h {
                        IpAddr::V4(a) => nh.extend_from_slice(&a.octets()),
                        IpAddr::V6(a) => nh.extend_from_slice(&a.octets()),
                    }
                }
                v.push(nh.len() as u8);
                v.extend_from_slice(&nh);
                v.push(0);
                prefix::encode(v, nlri);
            }
            Self::MpUnreach {
                afi,
                safi,
                withdrawn,
            } => {
                v.extend_from_slice(&afi.to_be_bytes());
                v.push(*safi);
                prefix::encode(v, withdrawn);
            }
            Self::Unknown { .. } => {}
        }
    }

    /// Decodes one attribute value. Errors come back with RFC 7606's
    /// handling for that attribute.
    pub(super) fn decode(flags: u8, code: u8, v: &[u8], four: bool) -> Result<Self, AttrFault> {
        let raw = {
            let mut r = vec![flags, code];
            if flags & EXTENDED != 0 {
                r.extend_from_slice(&(v.len() as u16).to_be_bytes());
            } else {
                r.push(v.len() as u8);
            }
            r.extend_from_slice(v);
            r
        };
        let Some(expected) = Self::expected_flags(code) else {
            if flags & OPTIONAL == 0 {
                // RFC 4271: an unrecognized well-known attribute ends the session
                return Err(AttrFault::Reset(DecodeError::notify(3, 2, raw)));
            }
            return Ok(Self::Unknown {
                flags,
                code,
                value: v.to_vec(),
            });
        };
        if flags & (OPTIONAL | TRANSITIVE) != expected {
            return Err(Self::fault(code, DecodeError::notify(3, 4, raw)));
        }
        let len_err = || Self::fault(code, DecodeError::notify(3, 5, raw.clone()));
        let u32_at = |i: usize| u32::from_be_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
        let ip_at = |i: usize| Ipv4Addr::new(v[i], v[i + 1], v[i + 2], v[i + 3]);
        Ok(match code {
            1 => {
                if v.len() != 1 {
                    return Err(len_err());
                }
                if v[0] > 2 {
                    return Err(Self::fault(code, DecodeError::notify(3, 6, raw)));
                }
                Self::Origin(v[0])
            }
            2 => Self::AsPath(
                decode_as_path(v, four)
                    .ok_or_else(|| Self::fault(code, DecodeError::notify(3, 11, vec![])))?,
            ),
            3 => {
                if v.len() != 4 {
                    return Err(len_err());
                }
                let nh = ip_at(0);
                if nh.is_unspecified() || nh.is_multicast() || nh.is_broadcast() {
                    return Err(Self::fault(code, DecodeError::notify(3, 8, raw)));
                }
                Self::NextHop(nh)
            }
            4 | 5 | 9 => {
                if v.len() != 4 {
                    return Err(len_err());
                }
                match code {
                    4 => Self::Med(u32_at(0)),
                    5 => Self::LocalPref(u32_at(0)),
                    _ => Self::OriginatorId(ip_at(0)),
                }
            }
            6 => {
                if !v.is_empty() {
                    return Err(len_err());
                }
                Self::AtomicAggregate
            }
            7 => match (v.len(), four) {
                (8, true) => Self::Aggregator(u32_at(0), ip_at(4)),
                (6, false) => {
                    Self::Aggregator(u32::from(u16::from_be_bytes([v[0], v[1]])), ip_at(2))
                }
                _ => return Err(len_err()),
            },
            8 | 10 => {
                if v.is_empty() || !v.len().is_multiple_of(4) {
                    return Err(len_err());
                }
                let n = v.len() / 4;
                if code == 8 {
                    Self::Communities((0..n).map(|i| u32_at(4 * i)).collect())
                } else {
                    Self::ClusterList((0..n).map(|i| ip_at(4 * i)).collect())
                }
            }
            14 => decode_mp_reach(v).map_err(AttrFault::Reset)?,
            _ => decode_mp_unreach(v).map_err(AttrFault::Reset)?,
        })
    }
}

fn decode_as_path(mut v: &[u8], four: bool) -> Option<Vec<AsSegment>> {
    let size = if four { 4 } else { 2 };
    let mut segs = Vec::new();
    while !v.is_empty() {
        if v.len() < 2 {
            return None;
        }
        let (kind, count) = (v[0], usize::from(v[1]));
        if count == 0 || v.len() < 2 + count * size {
            return None;
        }
        let ases: Vec<u32> = v[2..2 + count * size]
            .chunks(size)
            .map(|c| {
                if four {
                    u32::from_be_bytes([c[0], c[1], c[2], c[3]])
                } else {
                    u32::from(u16::from_be_bytes([c[0], c[1]]))
                }
            })
            .collect();
        segs.push(match kind {
            1 => AsSegment::Set(ases),
            2 => AsSegment::Sequence(ases),
            _ => return None,
        });
        v = &v[2 + count * size..];
    }
    Some(segs)
}

fn optional_error() -> DecodeError {
    DecodeError::notify(3, 9, vec![])
}

fn family(afi: u16, safi: u8) -> Result<bool, DecodeError> {
    match (afi, safi) {
        (AFI_IPV4, SAFI_UNICAST) => Ok(false),
        (AFI_IPV6, SAFI_UNICAST) => Ok(true),
        _ => Err(optional_error()),
    }
}

fn decode_mp_reach(v: &[u8]) -> Result<PathAttribute, DecodeError> {
    if v.len() < 5 {
        return Err(optional_error());
    }
    let (afi, safi, nh_len) = (u16::from_be_bytes([v[0], v[1]]), v[2], usize::from(v[3]));
    let v6 = family(afi, safi)?;
    if v.len() < 4 + nh_len + 1 {
        return Err(optional_error());
    }
    let nh = &v[4..4 + nh_len];
    let next_hops = match (v6, nh_len) {
        (false, 4) => vec![IpAddr::V4(Ipv4Addr::new(nh[0], nh[1], nh[2], nh[3]))],
        (true, 16) | (true, 32) => nh
            .chunks(16)
            .map(|c| {
                let mut o = [0u8; 16];
                o.copy_from_slice(c);
                IpAddr::V6(Ipv6Addr::from(o))
            })
            .collect(),
        _ => return Err(optional_error()),
    };
    let nlri = prefix::decode(&v[4 + nh_len + 1..], v6, optional_error)?;
    Ok(PathAttribute::MpReach {
        afi,
        safi,
        next_hops,
        nlri,
    })
}

fn decode_mp_unreach(v: &[u8]) -> Result<PathAttribute, DecodeError> {
    if v.len() < 3 {
        return Err(optional_error());
    }
    let (afi, safi) = (u16::from_be_bytes([v[0], v[1]]), v[2]);
    let v6 = family(afi, safi)?;
    let withdrawn = prefix::decode(&v[3..], v6, optional_error)?;
    Ok(PathAttribute::MpUnreach {
        afi,
        safi,
        withdrawn,
    })
}
