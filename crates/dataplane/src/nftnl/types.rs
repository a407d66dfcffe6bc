//! Set declarations of the nft language subset trellis writes: key and
//! data types, their byte layout in registers and elements, and the user
//! data nft stores with a set so that `nft list` prints it as declared.

use super::ParseError;

/// nft's datatype ids (`enum datatypes`, nftables `datatype.h`).
const TYPE_INTEGER: u32 = 4;
const TYPE_IPADDR: u32 = 7;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_MARK: u32 = 19;
/// Bits per datatype in a concatenation's type id.
const TYPE_BITS: u32 = 6;

/// Byte order of a value (nft's `enum byteorder`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Several components (a concatenation): no single order.
    Mixed = 0,
    /// Host order (marks, numgen).
    Host = 1,
    /// Network order (addresses, ports).
    Big = 2,
}

/// One component of a key or of map data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// `ipv4_addr` (`ip saddr`, `ip daddr`).
    Ipv4,
    /// `inet_proto` (`meta l4proto`).
    Proto,
    /// `inet_service` (`th dport`, `tcp dport`, ...).
    Service,
    /// `mark`.
    Mark,
    /// a 32-bit host-order integer (`numgen`).
    Integer,
}

impl Component {
    /// nft's datatype id.
    pub fn type_id(self) -> u32 {
        match self {
            Component::Ipv4 => TYPE_IPADDR,
            Component::Proto => TYPE_INET_PROTOCOL,
            Component::Service => TYPE_INET_SERVICE,
            Component::Mark => TYPE_MARK,
            Component::Integer => TYPE_INTEGER,
        }
    }
    /// Bytes of the value.
    pub fn bytes(self) -> usize {
        match self {
            Component::Ipv4 | Component::Mark | Component::Integer => 4,
            Component::Proto => 1,
            Component::Service => 2,
        }
    }
    /// Its byte order.
    pub fn order(self) -> Order {
        match self {
            Component::Mark | Component::Integer => Order::Host,
            Component::Ipv4 | Component::Service | Component::Proto => Order::Big,
        }
    }
    fn by_type_name(name: &str) -> Option<Self> {
        Some(match name {
            "ipv4_addr" => Component::Ipv4,
            "inet_proto" => Component::Proto,
            "inet_service" => Component::Service,
            "mark" => Component::Mark,
            _ => return None,
        })
    }
}

/// A `typeof` expression of a set declaration (nft keeps it in the set's
/// user data to print the declaration back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Typeof {
    /// `numgen random mod N`.
    Numgen(u32),
    /// `ip saddr` / `ip daddr` (`true`: daddr).
    Ip(bool),
    /// `tcp dport` / `udp dport` / `sctp dport` (the protocol number).
    Dport(u8),
    /// `meta mark`.
    Mark,
}

impl Typeof {
    fn component(self) -> Component {
        match self {
            Typeof::Numgen(_) => Component::Integer,
            Typeof::Ip(_) => Component::Ipv4,
            Typeof::Dport(_) => Component::Service,
            Typeof::Mark => Component::Mark,
        }
    }
}

/// A key or a map's data: its components, and the `typeof` expressions
/// when declared that way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// Components in order.
    pub parts: Vec<Component>,
    /// `typeof` expressions (empty: declared with `type`).
    pub typeof_: Vec<Typeof>,
}

impl Shape {
    /// The type id nft gives it (a concatenation's ids packed 6 bits each).
    pub fn type_id(&self) -> u32 {
        self.parts
            .iter()
            .fold(0, |acc, c| (acc << TYPE_BITS) | c.type_id())
    }
    /// Bytes in registers / elements: each component padded to 4.
    pub fn bytes(&self) -> usize {
        self.parts.iter().map(|c| c.bytes().div_ceil(4) * 4).sum()
    }
    /// Its byte order as nft records it.
    pub fn order(&self) -> Order {
        match self.parts.as_slice() {
            [one] => one.order(),
            _ => Order::Mixed,
        }
    }
}

/// Map data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// `: verdict`.
    Verdict,
    /// `: TYPE [. TYPE]`.
    Value(Shape),
}

/// A parsed `type ...; flags ...; timeout ...;` declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    /// The key.
    pub key: Shape,
    /// Map data (`None`: a set).
    pub data: Option<Data>,
    /// `flags interval`.
    pub interval: bool,
    /// `flags dynamic`.
    pub dynamic: bool,
    /// `flags timeout` (or a `timeout`).
    pub timeout_flag: bool,
    /// `timeout Ns` in milliseconds.
    pub timeout_ms: Option<u64>,
}

/// `NFT_SET_*` flags.
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_MAP: u32 = 0x8;
const NFT_SET_TIMEOUT: u32 = 0x10;
const NFT_SET_EVAL: u32 = 0x20;

impl SetSpec {
    /// Its `NFTA_SET_FLAGS`.
    pub fn flags(&self) -> u32 {
        let mut f = 0;
        if self.interval {
            f |= NFT_SET_INTERVAL;
        }
        if self.data.is_some() {
            f |= NFT_SET_MAP;
        }
        if self.timeout_flag || self.timeout_ms.is_some() {
            f |= NFT_SET_TIMEOUT;
        }
        if self.dynamic {
            f |= NFT_SET_EVAL;
        }
        f
    }

    /// nft's user data for the set (libnftnl `NFTNL_UDATA_SET_*` TLVs):
    /// key and data byte order, the `typeof` (or concatenation) of key
    /// and data, whether data is an interval.
    pub fn userdata(&self) -> Vec<u8> {
        let mut out = Vec::new();
        tlv(&mut out, 0, &(self.key.order() as u32).to_ne_bytes());
        if let Some(d) = &self.data {
            let order = match d {
                Data::Verdict => Order::Mixed,
                Data::Value(s) => s.order(),
            };
            tlv(&mut out, 1, &(order as u32).to_ne_bytes());
        }
        if let Some(t) = typeof_udata(&self.key) {
            tlv(&mut out, 3, &t);
        }
        if let Some(d) = &self.data {
            if let Data::Value(s) = d {
                if let Some(t) = typeof_udata(s) {
                    tlv(&mut out, 4, &t);
                }
            }
            tlv(&mut out, 6, &0u32.to_ne_bytes());
        }
        out
    }
}

fn tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    out.push(kind);
    out.push(value.len() as u8);
    out.extend_from_slice(value);
}

/// nft's expression ids in set user data (`enum expr_types`, v1.0.x).
const EXPR_PAYLOAD: u32 = 7;
const EXPR_META: u32 = 9;
const EXPR_CONCAT: u32 = 13;
const EXPR_NUMGEN: u32 = 23;
/// nft's protocol description ids (`enum proto_desc_id`) and field ids.
const PROTO_DESC_IP: u32 = 12;
const PROTO_DESC_TCP: u32 = 8;
const PROTO_DESC_UDP: u32 = 6;
const PROTO_DESC_SCTP: u32 = 10;
const IPHDR_SADDR: u32 = 11;
const IPHDR_DADDR: u32 = 12;
const L4_DPORT: u32 = 2;
/// `NFT_META_MARK`
const META_MARK: u32 = 3;

fn expr_udata(t: Typeof) -> Vec<u8> {
    let mut out = Vec::new();
    let mut data = Vec::new();
    let kind = match t {
        Typeof::Numgen(m) => {
            tlv(&mut data, 0, &1u32.to_ne_bytes()); // random
            tlv(&mut data, 1, &m.to_ne_bytes());
            tlv(&mut data, 2, &0u32.to_ne_bytes());
            EXPR_NUMGEN
        }
        Typeof::Ip(daddr) => {
            tlv(&mut data, 0, &PROTO_DESC_IP.to_ne_bytes());
            let f = if daddr { IPHDR_DADDR } else { IPHDR_SADDR };
            tlv(&mut data, 1, &f.to_ne_bytes());
            EXPR_PAYLOAD
        }
        Typeof::Dport(p) => {
            let desc = match p {
                6 => PROTO_DESC_TCP,
                17 => PROTO_DESC_UDP,
                _ => PROTO_DESC_SCTP,
            };
            tlv(&mut data, 0, &desc.to_ne_bytes());
            tlv(&mut data, 1, &L4_DPORT.to_ne_bytes());
            EXPR_PAYLOAD
        }
        Typeof::Mark => {
            tlv(&mut data, 0, &META_MARK.to_ne_bytes());
            EXPR_META
        }
    };
    tlv(&mut out, 0, &kind.to_ne_bytes());
    tlv(&mut out, 1, &data);
    out
}

/// The `typeof` user data of a key or data shape: the expression, or a
/// concatenation of them; a `type` concatenation is recorded as an empty
/// concatenation (as nft 1.0.6 does); a single `type` has none.
fn typeof_udata(s: &Shape) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    match (s.typeof_.as_slice(), s.parts.len()) {
        ([], 1) => return None,
        ([], _) => {
            tlv(&mut out, 0, &EXPR_CONCAT.to_ne_bytes());
            tlv(&mut out, 1, &[]);
        }
        ([one], _) => return Some(expr_udata(*one)),
        (many, _) => {
            tlv(&mut out, 0, &EXPR_CONCAT.to_ne_bytes());
            let mut inner = Vec::new();
            for (i, t) in many.iter().enumerate() {
                tlv(&mut inner, i as u8, &expr_udata(*t));
            }
            tlv(&mut out, 1, &inner);
        }
    }
    Some(out)
}

fn shape_of_types(text: &str) -> Result<Shape, ParseError> {
    let parts = text
        .split(" . ")
        .map(|t| {
            Component::by_type_name(t.trim())
                .ok_or_else(|| ParseError(format!("unknown type {:?}", t.trim())))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Shape {
        parts,
        typeof_: Vec::new(),
    })
}

fn typeof_expr(text: &str) -> Result<Typeof, ParseError> {
    let w: Vec<&str> = text.split_whitespace().collect();
    Ok(match w.as_slice() {
        ["numgen", "random", "mod", m] => Typeof::Numgen(
            m.parse()
                .map_err(|_| ParseError(format!("bad modulus {m:?}")))?,
        ),
        ["ip", "saddr"] => Typeof::Ip(false),
        ["ip", "daddr"] => Typeof::Ip(true),
        ["meta", "mark"] => Typeof::Mark,
        [p, "dport"] => Typeof::Dport(
            super::rule::proto_number(p)
                .ok_or_else(|| ParseError(format!("unknown protocol {p:?}")))?,
        ),
        _ => return Err(ParseError(format!("unsupported typeof {text:?}"))),
    })
}

fn shape_of_typeof(text: &str) -> Result<Shape, ParseError> {
    let typeof_ = text
        .split(" . ")
        .map(typeof_expr)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Shape {
        parts: typeof_.iter().map(|t| t.component()).collect(),
        typeof_,
    })
}

/// Parses a declaration body: `type K [: D]; [flags f,...;] [timeout Ns;]`
/// or `typeof K [: D];`.
pub fn parse_decl(text: &str) -> Result<SetSpec, ParseError> {
    let mut spec = SetSpec {
        key: Shape {
            parts: Vec::new(),
            typeof_: Vec::new(),
        },
        data: None,
        interval: false,
        dynamic: false,
        timeout_flag: false,
        timeout_ms: None,
    };
    let mut typed = false;
    for stmt in text.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let (word, rest) = stmt.split_once(' ').unwrap_or((stmt, ""));
        match word {
            "type" | "typeof" => {
                let (k, d) = match rest.split_once(" : ") {
                    Some((k, d)) => (k, Some(d)),
                    None => (rest, None),
                };
                let of = |t: &str| {
                    if word == "type" {
                        shape_of_types(t)
                    } else {
                        shape_of_typeof(t)
                    }
                };
                spec.key = of(k)?;
                spec.data = match d {
                    None => None,
                    Some("verdict") => Some(Data::Verdict),
                    Some(d) => Some(Data::Value(of(d)?)),
                };
                typed = true;
            }
            "flags" => {
                for f in rest.split(',').map(str::trim) {
                    match f {
                        "interval" => spec.interval = true,
                        "dynamic" => spec.dynamic = true,
                        "timeout" => spec.timeout_flag = true,
                        _ => return Err(ParseError(format!("unsupported set flag {f:?}"))),
                    }
                }
            }
            "timeout" => {
                let secs = rest
                    .strip_suffix('s')
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| ParseError(format!("bad timeout {rest:?} (want Ns)")))?;
                spec.timeout_ms = Some(secs * 1000);
            }
            _ => return Err(ParseError(format!("unsupported set statement {stmt:?}"))),
        }
    }
    if !typed {
        return Err(ParseError(format!("no type in set declaration {text:?}")));
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenation_ids_and_lengths_are_nfts() {
        let s = parse_decl("type ipv4_addr . inet_proto . inet_service : verdict;").expect("decl");
        assert_eq!(s.key.type_id(), 0x730d);
        assert_eq!(s.key.bytes(), 12);
        assert_eq!(s.flags(), NFT_SET_MAP);
        let h = parse_decl("type ipv4_addr . ipv4_addr;").expect("decl");
        assert_eq!(h.key.type_id(), 0x1c7);
        let a = parse_decl(
            "type ipv4_addr : ipv4_addr . inet_service; flags dynamic,timeout; timeout 30s;",
        )
        .expect("decl");
        assert_eq!(a.flags(), 0x38);
        assert_eq!(a.timeout_ms, Some(30_000));
    }

    #[test]
    fn user_data_matches_what_nft_1_0_6_sends() {
        // captured with `nft --debug=mnl` (NFTA_SET_USERDATA)
        let s = parse_decl("type ipv4_addr . inet_proto . inet_service : verdict;").expect("d");
        assert_eq!(
            s.userdata(),
            [0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 8, 0, 4, 13, 0, 0, 0, 1, 0, 6, 4, 0, 0, 0, 0]
        );
        let e = parse_decl("typeof numgen random mod 1 : ip daddr . tcp dport;").expect("d");
        assert_eq!(
            e.userdata(),
            [
                0, 4, 1, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 26, 0, 4, 23, 0, 0, 0, 1, 18, 0, 4, 1, 0, 0,
                0, 1, 4, 1, 0, 0, 0, 2, 4, 0, 0, 0, 0, 4, 52, 0, 4, 13, 0, 0, 0, 1, 44, 0, 20, 0,
                4, 7, 0, 0, 0, 1, 12, 0, 4, 12, 0, 0, 0, 1, 4, 12, 0, 0, 0, 1, 20, 0, 4, 7, 0, 0,
                0, 1, 12, 0, 4, 8, 0, 0, 0, 1, 4, 2, 0, 0, 0, 6, 4, 0, 0, 0, 0
            ]
        );
    }

    #[test]
    fn bad_declarations_are_named() {
        for bad in [
            "type ipv4_addr . quic;",
            "flags interval;",
            "type mark; flags constant;",
            "type mark; timeout 3m;",
            "typeof ip ttl;",
        ] {
            let e = parse_decl(bad).expect_err(bad);
            assert!(!e.0.is_empty(), "{bad}");
        }
    }
}
