//! OPEN and its capabilities (RFC 4271 4.2, RFC 5492, 4760, 2918, 4724, 6793).

use super::error::DecodeError;
use std::net::Ipv4Addr;

/// AS_TRANS (RFC 6793): the 2-byte stand-in for a 4-byte AS.
pub const AS_TRANS: u16 = 23456;

/// A capability (RFC 5492).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    /// Multiprotocol extensions (RFC 4760): AFI, SAFI.
    MultiProtocol(u16, u8),
    /// Route refresh (RFC 2918).
    RouteRefresh,
    /// Graceful restart (RFC 4724): restart-state flag, restart time (s),
    /// families as (AFI, SAFI, forwarding-state preserved).
    GracefulRestart {
        /// The R bit: the sender has restarted.
        restarting: bool,
        /// Restart time in seconds (12 bits).
        time: u16,
        /// (AFI, SAFI, F bit).
        families: Vec<(u16, u8, bool)>,
    },
    /// 4-octet AS numbers (RFC 6793) with the sender's AS.
    FourOctetAs(u32),
    /// Anything else, kept as is.
    Unknown(u8, Vec<u8>),
}

/// An OPEN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// The sender's AS (full 4-byte value; the 2-byte field is derived).
    pub asn: u32,
    /// Proposed hold time in seconds (0 or at least 3).
    pub hold_time: u16,
    /// BGP identifier.
    pub id: Ipv4Addr,
    /// Capabilities.
    pub capabilities: Vec<Capability>,
}

impl Capability {
    fn encode(&self, out: &mut Vec<u8>) {
        let (code, value): (u8, Vec<u8>) = match self {
            Self::MultiProtocol(afi, safi) => (1, vec![(afi >> 8) as u8, *afi as u8, 0, *safi]),
            Self::RouteRefresh => (2, vec![]),
            Self::GracefulRestart {
                restarting,
                time,
                families,
            } => {
                let head = (u16::from(*restarting) << 15) | (time & 0x0fff);
                let mut v = head.to_be_bytes().to_vec();
                for (afi, safi, fwd) in families {
                    v.extend_from_slice(&afi.to_be_bytes());
                    v.push(*safi);
                    v.push(if *fwd { 0x80 } else { 0 });
                }
                (64, v)
            }
            Self::FourOctetAs(asn) => (65, asn.to_be_bytes().to_vec()),
            Self::Unknown(code, v) => (*code, v.clone()),
        };
        out.push(code);
        out.push(value.len() as u8);
        out.extend_from_slice(&value);
    }

    fn decode(code: u8, v: &[u8]) -> Result<Self, DecodeError> {
        let bad = || DecodeError::notify(2, 0, vec![code]);
        Ok(match code {
            1 if v.len() == 4 => Self::MultiProtocol(u16::from_be_bytes([v[0], v[1]]), v[3]),
            1 => return Err(bad()),
            2 if v.is_empty() => Self::RouteRefresh,
            2 => return Err(bad()),
            64 if v.len() >= 2 && (v.len() - 2).is_multiple_of(4) => {
                let head = u16::from_be_bytes([v[0], v[1]]);
                Self::GracefulRestart {
                    restarting: head & 0x8000 != 0,
                    time: head & 0x0fff,
                    families: v[2..]
                        .chunks(4)
                        .map(|c| (u16::from_be_bytes([c[0], c[1]]), c[2], c[3] & 0x80 != 0))
                        .collect(),
                }
            }
            64 => return Err(bad()),
            65 if v.len() == 4 => Self::FourOctetAs(u32::from_be_bytes([v[0], v[1], v[2], v[3]])),
            65 => return Err(bad()),
            other => Self::Unknown(other, v.to_vec()),
        })
    }
}

impl Open {
    /// True when the peer announced 4-octet AS support.
    pub fn four_octet_as(&self) -> bool {
        self.capabilities
            .iter()
            .any(|c| matches!(c, Capability::FourOctetAs(_)))
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.push(4);
        let two = u16::try_from(self.asn).unwrap_or(AS_TRANS);
        out.extend_from_slice(&two.to_be_bytes());
        out.extend_from_slice(&self.hold_time.to_be_bytes());
        out.extend_from_slice(&self.id.octets());
        let mut caps = Vec::new();
        for c in &self.capabilities {
            c.encode(&mut caps);
        }
        if caps.is_empty() {
            out.push(0);
        } else {
            // one optional parameter of type 2 holding every capability
            out.push((caps.len() + 2) as u8);
            out.push(2);
            out.push(caps.len() as u8);
            out.extend_from_slice(&caps);
        }
    }

    pub(super) fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let version = b[0];
        if version != 4 {
            return Err(DecodeError::notify(2, 1, vec![0, 4]));
        }
        let as2 = u16::from_be_bytes([b[1], b[2]]);
        let hold_time = u16::from_be_bytes([b[3], b[4]]);
        if hold_time == 1 || hold_time == 2 {
            return Err(DecodeError::notify(2, 6, vec![]));
        }
        let id = Ipv4Addr::new(b[5], b[6], b[7], b[8]);
        if id.is_unspecified() {
            return Err(DecodeError::notify(2, 3, vec![]));
        }
        let opt_len = usize::from(b[9]);
        let mut params = &b[10..];
        if params.len() != opt_len {
            return Err(DecodeError::notify(1, 2, vec![]));
        }
        let mut capabilities = Vec::new();
        while !params.is_empty() {
            if params.len() < 2 || params.len() < 2 + usize::from(params[1]) {
                return Err(DecodeError::notify(2, 0, vec![]));
            }
            let (kind, len) = (params[0], usize::from(params[1]));
            let mut caps = &params[2..2 + len];
            if kind != 2 {
                return Err(DecodeError::notify(2, 4, vec![kind]));
            }
            while !caps.is_empty() {
                if caps.len() < 2 || caps.len() < 2 + usize::from(caps[1]) {
                    return Err(DecodeError::notify(2, 0, vec![]));
                }
                let clen = usize::from(caps[1]);
                capabilities.push(Capability::decode(caps[0], &caps[2..2 + clen])?);
                caps = &caps[2 + clen..];
            }
            params = &params[2 + len..];
        }
        let asn = capabilities
            .iter()
            .find_map(|c| match c {
                Capability::FourOctetAs(a) => Some(*a),
                _ => None,
            })
            .unwrap_or(u32::from(as2));
        if asn == 0 {
            return Err(DecodeError::notify(2, 2, vec![]));
        }
        Ok(Self {
            asn,
            hold_time,
            id,
            capabilities,
        })
    }
}
