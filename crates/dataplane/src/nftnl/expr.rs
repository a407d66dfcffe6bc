//! The nf_tables expressions a rule compiles to ([`Expr`]), and the
//! selectors (`ip saddr`, `meta l4proto`, `th dport`, `ct state`, ...)
//! with the payload, meta and ct loads nft 1.0.6 emits for each.

use super::ParseError;

/// `NFT_PAYLOAD_*` bases.
pub(crate) const NETWORK: u32 = 1;
pub(crate) const TRANSPORT: u32 = 2;
/// `NFT_META_*` keys.
pub(crate) const META_MARK: u32 = 3;
pub(crate) const META_NFPROTO: u32 = 15;
pub(crate) const META_L4PROTO: u32 = 16;
/// `NFT_CT_*` keys.
pub(crate) const CT_STATE: u32 = 0;
pub(crate) const CT_STATUS: u32 = 2;
/// Verdict codes.
pub(crate) const NF_DROP: i32 = 0;
pub(crate) const NF_ACCEPT: i32 = 1;
pub(crate) const NFT_JUMP: i32 = -3;
pub(crate) const NFT_GOTO: i32 = -4;
pub(crate) const NFT_RETURN: i32 = -5;

/// One nf_tables expression (fields: its netlink attributes).
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// `payload`: `len` bytes at `offset` of `base` into `dreg`.
    Payload {
        base: u32,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    /// `meta` load.
    Meta { key: u32, dreg: u32 },
    /// `meta` set.
    MetaSet { key: u32, sreg: u32 },
    /// `ct` load.
    Ct { key: u32, dreg: u32 },
    /// `fib`: `flags` (saddr, ...), `result` (address type, ...).
    Fib { flags: u32, result: u32, dreg: u32 },
    /// `cmp`: 0 eq, 1 neq.
    Cmp { sreg: u32, op: u32, data: Vec<u8> },
    /// `bitwise`: `(sreg & mask) ^ xor` into `dreg`.
    Bitwise {
        sreg: u32,
        dreg: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    /// `lookup` in a named set (`dreg`: map data or verdict 0).
    Lookup {
        set: String,
        sreg: u32,
        dreg: Option<u32>,
    },
    /// `immediate` verdict.
    Verdict { code: i32, chain: Option<String> },
    /// `immediate` value into `dreg`.
    Data { dreg: u32, data: Vec<u8> },
    /// `counter`.
    Counter,
    /// `numgen random mod`.
    Numgen { dreg: u32, modulus: u32 },
    /// `nat` dnat for IPv4 from registers.
    Dnat { addr: u32, proto: Option<u32> },
    /// `masq` with `NF_NAT_RANGE_*` flags.
    Masq { flags: u32 },
    /// `reject`: type (1 tcp reset, 2 icmpx) and code.
    Reject { kind: u32, code: u8 },
    /// `dynset update`.
    Dynset {
        set: String,
        sreg_key: u32,
        sreg_data: u32,
    },
}

/// IP protocol number of a name (`tcp`, `udp`, `sctp`, `icmp`) or number.
pub fn proto_number(p: &str) -> Option<u8> {
    Some(match p {
        "tcp" => 6,
        "udp" => 17,
        "sctp" => 132,
        "icmp" => 1,
        _ => return p.parse().ok(),
    })
}

/// A value a selector yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sel {
    Saddr,
    Daddr,
    L4proto,
    Mark,
    Nfproto,
    Dport,
    CtState,
    CtStatus,
    FibSaddrType,
    Numgen(u32),
}

impl Sel {
    pub(crate) fn is_ip(self) -> bool {
        matches!(self, Sel::Saddr | Sel::Daddr)
    }
    pub(crate) fn len(self) -> usize {
        match self {
            Sel::L4proto | Sel::Nfproto => 1,
            Sel::Dport => 2,
            _ => 4,
        }
    }
    pub(crate) fn load(self, dreg: u32) -> Expr {
        match self {
            Sel::Saddr | Sel::Daddr => Expr::Payload {
                base: NETWORK,
                offset: if self == Sel::Saddr { 12 } else { 16 },
                len: 4,
                dreg,
            },
            Sel::Dport => Expr::Payload {
                base: TRANSPORT,
                offset: 2,
                len: 2,
                dreg,
            },
            Sel::L4proto => Expr::Meta {
                key: META_L4PROTO,
                dreg,
            },
            Sel::Mark => Expr::Meta {
                key: META_MARK,
                dreg,
            },
            Sel::Nfproto => Expr::Meta {
                key: META_NFPROTO,
                dreg,
            },
            Sel::CtState => Expr::Ct {
                key: CT_STATE,
                dreg,
            },
            Sel::CtStatus => Expr::Ct {
                key: CT_STATUS,
                dreg,
            },
            Sel::FibSaddrType => Expr::Fib {
                flags: 1,
                result: 3,
                dreg,
            },
            Sel::Numgen(modulus) => Expr::Numgen { dreg, modulus },
        }
    }
    /// The bytes of literal `v` for this selector.
    pub(crate) fn value(self, v: &str) -> Result<Vec<u8>, ParseError> {
        let bad = || ParseError(format!("bad value {v:?} for {self:?}"));
        Ok(match self {
            Sel::Saddr | Sel::Daddr => v
                .parse::<std::net::Ipv4Addr>()
                .map_err(|_| bad())?
                .octets()
                .to_vec(),
            Sel::L4proto => vec![proto_number(v).ok_or_else(bad)?],
            Sel::Nfproto => match v {
                "ipv4" => vec![2],
                "ipv6" => vec![10],
                _ => return Err(bad()),
            },
            Sel::Dport => v.parse::<u16>().map_err(|_| bad())?.to_be_bytes().to_vec(),
            Sel::Mark | Sel::Numgen(_) => int(v).ok_or_else(bad)?.to_ne_bytes().to_vec(),
            Sel::CtState | Sel::CtStatus => {
                let mut bits = 0u32;
                for f in v.split(',') {
                    bits |= match (self, f) {
                        (Sel::CtState, "invalid") => 1,
                        (Sel::CtState, "established") => 2,
                        (Sel::CtState, "related") => 4,
                        (Sel::CtState, "new") => 8,
                        (Sel::CtState, "untracked") => 64,
                        (Sel::CtStatus, "expected") => 1,
                        (Sel::CtStatus, "seen-reply") => 2,
                        (Sel::CtStatus, "assured") => 4,
                        (Sel::CtStatus, "confirmed") => 8,
                        (Sel::CtStatus, "snat") => 0x10,
                        (Sel::CtStatus, "dnat") => 0x20,
                        _ => return Err(bad()),
                    };
                }
                bits.to_ne_bytes().to_vec()
            }
            Sel::FibSaddrType => match v {
                "unicast" => 1u32,
                "local" => 2,
                "broadcast" => 3,
                "multicast" => 5,
                _ => return Err(bad()),
            }
            .to_ne_bytes()
            .to_vec(),
        })
    }
}

pub(crate) fn int(v: &str) -> Option<u32> {
    match v.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

/// Register of a value at 32-bit slot `slot`: the first of a group by its
/// 16-byte register, the rest by 32-bit register (as nft numbers them).
pub(crate) fn reg(slot: usize, first: bool) -> u32 {
    if first {
        1 + (slot / 4) as u32
    } else {
        8 + slot as u32
    }
}
