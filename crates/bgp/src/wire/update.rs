//! UPDATE (RFC 4271 4.3) with RFC 7606 error handling.

use super::attrs::{AttrFault, PathAttribute};
use super::error::{DecodeError, Notification};
use super::{prefix, Ctx};
use ipnet::IpNet;

/// An UPDATE.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Update {
    /// IPv4 withdrawn routes.
    pub withdrawn: Vec<IpNet>,
    /// Path attributes, MP_REACH / MP_UNREACH included.
    pub attributes: Vec<PathAttribute>,
    /// IPv4 NLRI.
    pub nlri: Vec<IpNet>,
    /// RFC 7606 treat-as-withdraw: an attribute was malformed, so every
    /// prefix this UPDATE announces must be handled as withdrawn. Holds the
    /// error that RFC 4271 would have sent, for the log.
    pub treat_as_withdraw: Option<Notification>,
    /// Codes of attributes dropped by RFC 7606 attribute-discard.
    pub discarded: Vec<u8>,
}

impl Update {
    /// Every prefix the UPDATE announces (IPv4 NLRI and MP_REACH).
    pub fn announced(&self) -> Vec<IpNet> {
        let mut out = self.nlri.clone();
        for a in &self.attributes {
            if let PathAttribute::MpReach { nlri, .. } = a {
                out.extend_from_slice(nlri);
            }
        }
        out
    }

    /// Every prefix to withdraw: withdrawn routes, MP_UNREACH and, under
    /// treat-as-withdraw, the announced ones too.
    pub fn withdrawals(&self) -> Vec<IpNet> {
        let mut out = self.withdrawn.clone();
        for a in &self.attributes {
            if let PathAttribute::MpUnreach { withdrawn, .. } = a {
                out.extend_from_slice(withdrawn);
            }
        }
        if self.treat_as_withdraw.is_some() {
            out.extend(self.announced());
        }
        out
    }

    /// The End-of-RIB marker for IPv4 unicast (an empty UPDATE, RFC 4724).
    pub fn is_end_of_rib(&self) -> bool {
        self.withdrawn.is_empty() && self.attributes.is_empty() && self.nlri.is_empty()
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>, ctx: Ctx) {
        let mut w = Vec::new();
        prefix::encode(&mut w, &self.withdrawn);
        out.extend_from_slice(&(w.len() as u16).to_be_bytes());
        out.extend_from_slice(&w);
        let mut a = Vec::new();
        for attr in &self.attributes {
            attr.encode(&mut a, ctx.four_octet_as);
        }
        out.extend_from_slice(&(a.len() as u16).to_be_bytes());
        out.extend_from_slice(&a);
        prefix::encode(out, &self.nlri);
    }

    pub(super) fn decode(b: &[u8], ctx: Ctx) -> Result<Self, DecodeError> {
        let malformed = || DecodeError::notify(3, 1, vec![]);
        let wlen = usize::from(u16::from_be_bytes([b[0], b[1]]));
        if b.len() < 2 + wlen + 2 {
            return Err(malformed());
        }
        let withdrawn = prefix::decode(&b[2..2 + wlen], false, || {
            DecodeError::notify(3, 10, vec![])
        })?;
        let rest = &b[2 + wlen..];
        let alen = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        if rest.len() < 2 + alen {
            return Err(malformed());
        }
        let mut attrs_raw = &rest[2..2 + alen];
        let nlri = prefix::decode(&rest[2 + alen..], false, || {
            DecodeError::notify(3, 10, vec![])
        })?;
        let mut u = Update {
            withdrawn,
            nlri,
            ..Default::default()
        };
        let mut seen = [false; 256];
        while !attrs_raw.is_empty() {
            if attrs_raw.len() < 3 {
                return Err(malformed());
            }
            let (flags, code) = (attrs_raw[0], attrs_raw[1]);
            let (len, head) = if flags & 0x10 != 0 {
                if attrs_raw.len() < 4 {
                    return Err(malformed());
                }
                (
                    usize::from(u16::from_be_bytes([attrs_raw[2], attrs_raw[3]])),
                    4,
                )
            } else {
                (usize::from(attrs_raw[2]), 3)
            };
            if attrs_raw.len() < head + len {
                // an attribute running past the list: nothing after it can be trusted
                return Err(malformed());
            }
            let value = &attrs_raw[head..head + len];
            attrs_raw = &attrs_raw[head + len..];
            if seen[usize::from(code)] {
                // RFC 7606 3.g: repeated MP attributes reset, others keep the first
                if code == 14 || code == 15 {
                    return Err(malformed());
                }
                continue;
            }
            seen[usize::from(code)] = true;
            match PathAttribute::decode(flags, code, value, ctx.four_octet_as) {
                Ok(a) => u.attributes.push(a),
                Err(AttrFault::Reset(e)) => return Err(e),
                Err(AttrFault::TreatAsWithdraw(e)) => {
                    u.treat_as_withdraw.get_or_insert(e.0);
                }
                Err(AttrFault::Discard) => u.discarded.push(code),
            }
        }
        // RFC 7606 3.d: a missing well-known mandatory attribute is treat-as-withdraw
        let has = |c: u8| u.attributes.iter().any(|a| a.code() == c);
        let mp_reach = has(14);
        if u.treat_as_withdraw.is_none() && (!u.nlri.is_empty() || mp_reach) {
            let mut needed = vec![1u8, 2];
            if !u.nlri.is_empty() {
                needed.push(3);
            }
            if let Some(missing) = needed.into_iter().find(|c| !has(*c)) {
                u.treat_as_withdraw = Some(Notification {
                    code: 3,
                    subcode: 3,
                    data: vec![missing],
                });
            }
        }
        Ok(u)
    }
}
