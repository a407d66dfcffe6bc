//! A rule of the nft language subset trellis writes -> nf_tables
//! expressions, register for register what nft 1.0.6 emits for it (so
//! that `nft list` prints the rule back as written).
//!
//! The subset: matches on `ip saddr|daddr` (address or prefix),
//! `meta l4proto|mark|nfproto`, `th dport`, `ct state|status`, `fib saddr
//! type`, concatenations of them looked up in a named set (`@set`) or
//! verdict map (`vmap @map`), `& MASK`, `==` / `!=`; statements `counter`,
//! `accept`, `drop`, `return`, `jump`, `goto`, `reject [with tcp reset]`,
//! `masquerade [fully-random]`, `meta mark set meta mark [& | ^ N]...`,
//! `dnat ip to EXPR map @map`, `update @map { KEY : DATA }`.

use super::types::{Data, SetSpec};
use super::ParseError;

/// `NFT_PAYLOAD_*` bases.
const NETWORK: u32 = 1;
const TRANSPORT: u32 = 2;
/// `NFT_META_*` keys.
pub(crate) const META_MARK: u32 = 3;
const META_NFPROTO: u32 = 15;
const META_L4PROTO: u32 = 16;
/// `NFT_CT_*` keys.
const CT_STATE: u32 = 0;
const CT_STATUS: u32 = 2;
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
enum Sel {
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
    fn is_ip(self) -> bool {
        matches!(self, Sel::Saddr | Sel::Daddr)
    }
    fn len(self) -> usize {
        match self {
            Sel::L4proto | Sel::Nfproto => 1,
            Sel::Dport => 2,
            _ => 4,
        }
    }
    fn load(self, dreg: u32) -> Expr {
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
    fn value(self, v: &str) -> Result<Vec<u8>, ParseError> {
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

fn int(v: &str) -> Option<u32> {
    match v.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

/// Register of a value at 32-bit slot `slot`: the first of a group by its
/// 16-byte register, the rest by 32-bit register (as nft numbers them).
fn reg(slot: usize, first: bool) -> u32 {
    if first {
        1 + (slot / 4) as u32
    } else {
        8 + slot as u32
    }
}

struct Compiler<'a> {
    words: Vec<&'a str>,
    i: usize,
    out: Vec<Expr>,
    ip_checked: bool,
    schema: &'a dyn Fn(&str) -> Option<SetSpec>,
}

impl<'a> Compiler<'a> {
    fn peek(&self) -> Option<&'a str> {
        self.words.get(self.i).copied()
    }
    fn peek_at(&self, n: usize) -> Option<&'a str> {
        self.words.get(self.i + n).copied()
    }
    fn next(&mut self) -> Result<&'a str, ParseError> {
        let w = self
            .peek()
            .ok_or_else(|| ParseError("rule ends too early".into()))?;
        self.i += 1;
        Ok(w)
    }
    fn expect(&mut self, w: &str) -> Result<(), ParseError> {
        let got = self.next()?;
        if got != w {
            return Err(ParseError(format!("expected {w:?}, found {got:?}")));
        }
        Ok(())
    }

    /// A selector at the cursor, if there is one.
    fn selector(&mut self) -> Result<Option<Sel>, ParseError> {
        let (a, b) = (self.peek(), self.peek_at(1));
        let (sel, n) = match (a, b) {
            (Some("ip"), Some("saddr")) => (Sel::Saddr, 2),
            (Some("ip"), Some("daddr")) => (Sel::Daddr, 2),
            (Some("meta"), Some("l4proto")) => (Sel::L4proto, 2),
            (Some("meta"), Some("mark")) => (Sel::Mark, 2),
            (Some("meta"), Some("nfproto")) => (Sel::Nfproto, 2),
            (Some("th"), Some("dport")) => (Sel::Dport, 2),
            (Some("ct"), Some("state")) => (Sel::CtState, 2),
            (Some("ct"), Some("status")) => (Sel::CtStatus, 2),
            (Some("fib"), Some("saddr")) if self.peek_at(2) == Some("type") => {
                (Sel::FibSaddrType, 3)
            }
            (Some("numgen"), Some("random")) => {
                if self.peek_at(2) != Some("mod") {
                    return Err(ParseError("expected `numgen random mod N`".into()));
                }
                let m = self
                    .peek_at(3)
                    .and_then(int)
                    .filter(|m| *m > 0)
                    .ok_or_else(|| ParseError("bad numgen modulus".into()))?;
                (Sel::Numgen(m), 4)
            }
            _ => return Ok(None),
        };
        self.i += n;
        Ok(Some(sel))
    }

    /// `SEL [. SEL]...`
    fn concat(&mut self) -> Result<Vec<Sel>, ParseError> {
        let first = self
            .selector()?
            .ok_or_else(|| ParseError(format!("expected a selector at {:?}", self.peek())))?;
        let mut v = vec![first];
        while self.peek() == Some(".") {
            self.i += 1;
            let s = self.selector()?.ok_or_else(|| {
                ParseError(format!(
                    "expected a selector after `.` at {:?}",
                    self.peek()
                ))
            })?;
            v.push(s);
        }
        Ok(v)
    }

    /// `SEL [& MASK] [. SEL [& MASK]]...` (a DNAT map's key).
    fn concat_masked(&mut self) -> Result<Vec<(Sel, Option<u32>)>, ParseError> {
        let mut v = Vec::new();
        loop {
            let s = self
                .selector()?
                .ok_or_else(|| ParseError(format!("expected a selector at {:?}", self.peek())))?;
            let mut mask = None;
            if self.peek() == Some("&") {
                self.i += 1;
                let w = self.next()?;
                mask = Some(int(w).ok_or_else(|| ParseError(format!("bad mask {w:?}")))?);
            }
            v.push((s, mask));
            if self.peek() != Some(".") {
                return Ok(v);
            }
            self.i += 1;
        }
    }

    /// Loads `parts` from slot 0 on, each masked one masked right after
    /// its load (as nft orders it).
    fn load_masked(&mut self, parts: &[(Sel, Option<u32>)]) {
        let sels: Vec<Sel> = parts.iter().map(|(s, _)| *s).collect();
        if parts.iter().all(|(_, m)| m.is_none()) {
            self.load(&[(&sels, 0)]);
            return;
        }
        self.ip_check(sels.iter().any(|x| x.is_ip()));
        let mut slot = 0;
        for (n, (s, mask)) in parts.iter().enumerate() {
            let r = reg(slot, n == 0);
            self.out.push(s.load(r));
            if let Some(m) = mask {
                self.out.push(Expr::Bitwise {
                    sreg: r,
                    dreg: r,
                    mask: m.to_ne_bytes().to_vec(),
                    xor: vec![0; 4],
                });
            }
            slot += s.len().div_ceil(4);
        }
    }

    /// The IPv4 check, once per rule, before the first address is loaded.
    fn ip_check(&mut self, loads_ip: bool) {
        if loads_ip && !self.ip_checked {
            self.out.push(Sel::Nfproto.load(1));
            self.out.push(Expr::Cmp {
                sreg: 1,
                op: 0,
                data: vec![2],
            });
            self.ip_checked = true;
        }
    }

    /// Loads `sels` from slot `slot` on (the IPv4 check first, once).
    fn load(&mut self, groups: &[(&[Sel], usize)]) {
        self.ip_check(groups.iter().any(|(s, _)| s.iter().any(|x| x.is_ip())));
        for (sels, start) in groups {
            let mut slot = *start;
            for (n, s) in sels.iter().enumerate() {
                self.out.push(s.load(reg(slot, n == 0)));
                slot += s.len().div_ceil(4);
            }
        }
    }

    fn set_name(&mut self) -> Result<String, ParseError> {
        let w = self.next()?;
        w.strip_prefix('@')
            .map(str::to_string)
            .ok_or_else(|| ParseError(format!("expected @set, found {w:?}")))
    }

    fn spec(&self, set: &str) -> Result<SetSpec, ParseError> {
        (self.schema)(set).ok_or_else(|| ParseError(format!("unknown set or map {set:?}")))
    }

    /// `meta mark set meta mark [& N] [| N] [^ N]...`
    fn mark_set(&mut self) -> Result<(), ParseError> {
        self.expect("meta")?;
        self.expect("mark")?;
        let (mut mask, mut xor) = (u32::MAX, 0u32);
        let mut ops = 0;
        while let Some(op @ ("&" | "|" | "^")) = self.peek() {
            self.i += 1;
            let w = self.next()?;
            let v = int(w).ok_or_else(|| ParseError(format!("bad mark value {w:?}")))?;
            match op {
                "&" => {
                    mask &= v;
                    xor &= v;
                }
                "|" => {
                    mask &= !v;
                    xor = (xor & !v) | v;
                }
                _ => xor ^= v,
            }
            ops += 1;
        }
        self.out.push(Sel::Mark.load(1));
        if ops > 0 {
            self.out.push(Expr::Bitwise {
                sreg: 1,
                dreg: 1,
                mask: mask.to_ne_bytes().to_vec(),
                xor: xor.to_ne_bytes().to_vec(),
            });
        }
        self.out.push(Expr::MetaSet {
            key: META_MARK,
            sreg: 1,
        });
        Ok(())
    }

    /// A match: `SELS [& MASK] (vmap @m | @s | [==|!=] VALUE)`.
    fn matcher(&mut self) -> Result<(), ParseError> {
        let sels = self.concat()?;
        let mut mask = None;
        if self.peek() == Some("&") {
            self.i += 1;
            let w = self.next()?;
            mask = Some(int(w).ok_or_else(|| ParseError(format!("bad mask {w:?}")))?);
        }
        if sels.len() > 1 && mask.is_some() {
            return Err(ParseError("a mask on a concatenation".into()));
        }
        let and = |c: &mut Self| {
            if let Some(m) = mask {
                c.out.push(Expr::Bitwise {
                    sreg: 1,
                    dreg: 1,
                    mask: m.to_ne_bytes().to_vec(),
                    xor: vec![0; 4],
                });
            }
        };
        match self.peek() {
            Some("vmap") => {
                self.i += 1;
                let set = self.set_name()?;
                self.load(&[(&sels, 0)]);
                and(self);
                self.out.push(Expr::Lookup {
                    set,
                    sreg: 1,
                    dreg: Some(0),
                });
                return Ok(());
            }
            Some(w) if w.starts_with('@') => {
                let set = self.set_name()?;
                self.load(&[(&sels, 0)]);
                and(self);
                self.out.push(Expr::Lookup {
                    set,
                    sreg: 1,
                    dreg: None,
                });
                return Ok(());
            }
            _ => {}
        }
        let [sel] = sels[..] else {
            return Err(ParseError("a concatenation compared to a value".into()));
        };
        let op = match self.peek() {
            Some("==") => {
                self.i += 1;
                0
            }
            Some("!=") => {
                self.i += 1;
                1
            }
            _ => 0,
        };
        let raw = self.next()?;
        // flags (ct state/status): any of them set
        if matches!(sel, Sel::CtState | Sel::CtStatus) && mask.is_none() {
            let bits = sel.value(raw)?;
            self.load(&[(&sels, 0)]);
            self.out.push(Expr::Bitwise {
                sreg: 1,
                dreg: 1,
                mask: bits,
                xor: vec![0; 4],
            });
            self.out.push(Expr::Cmp {
                sreg: 1,
                op: if op == 0 { 1 } else { 0 },
                data: vec![0; 4],
            });
            return Ok(());
        }
        // an IPv4 prefix: whole bytes compared, the rest masked
        if let (true, Some((addr, len))) = (sel.is_ip(), raw.split_once('/')) {
            let bytes = sel.value(addr)?;
            let len: u32 = len
                .parse()
                .ok()
                .filter(|l| *l <= 32)
                .ok_or_else(|| ParseError(format!("bad prefix {raw:?}")))?;
            if len == 32 {
                self.load(&[(&sels, 0)]);
            } else if len.is_multiple_of(8) && len > 0 {
                self.load(&[(&sels, 0)]);
                if let Some(Expr::Payload { len: l, .. }) = self.out.last_mut() {
                    *l = len / 8;
                }
                self.out.push(Expr::Cmp {
                    sreg: 1,
                    op,
                    data: bytes[..(len / 8) as usize].to_vec(),
                });
                return Ok(());
            } else {
                let m = if len == 0 { 0 } else { u32::MAX << (32 - len) }.to_be_bytes();
                self.load(&[(&sels, 0)]);
                self.out.push(Expr::Bitwise {
                    sreg: 1,
                    dreg: 1,
                    mask: m.to_vec(),
                    xor: vec![0; 4],
                });
                let masked: Vec<u8> = bytes.iter().zip(m).map(|(b, m)| b & m).collect();
                self.out.push(Expr::Cmp {
                    sreg: 1,
                    op,
                    data: masked,
                });
                return Ok(());
            }
            self.out.push(Expr::Cmp {
                sreg: 1,
                op,
                data: bytes,
            });
            return Ok(());
        }
        let data = sel.value(raw)?;
        self.load(&[(&sels, 0)]);
        and(self);
        self.out.push(Expr::Cmp { sreg: 1, op, data });
        Ok(())
    }

    fn statement(&mut self) -> Result<bool, ParseError> {
        let Some(w) = self.peek() else {
            return Ok(false);
        };
        match w {
            "counter" => self.out.push(Expr::Counter),
            "accept" | "drop" | "return" => self.out.push(Expr::Verdict {
                code: match w {
                    "accept" => NF_ACCEPT,
                    "drop" => NF_DROP,
                    _ => NFT_RETURN,
                },
                chain: None,
            }),
            "jump" | "goto" => {
                self.i += 1;
                let chain = self.peek().map(str::to_string);
                self.out.push(Expr::Verdict {
                    code: if w == "jump" { NFT_JUMP } else { NFT_GOTO },
                    chain,
                });
                if self.peek().is_none() {
                    return Err(ParseError(format!("{w} without a chain")));
                }
            }
            "reject" => {
                if self.peek_at(1) == Some("with") {
                    if (self.peek_at(2), self.peek_at(3)) != (Some("tcp"), Some("reset")) {
                        return Err(ParseError("only `reject with tcp reset`".into()));
                    }
                    self.i += 3;
                    self.out.push(Expr::Reject { kind: 1, code: 0 });
                } else {
                    // inet: ICMP(v6) port unreachable
                    self.out.push(Expr::Reject { kind: 2, code: 1 });
                }
            }
            "masquerade" => {
                let mut flags = 0;
                if self.peek_at(1) == Some("fully-random") {
                    self.i += 1;
                    flags |= 0x10;
                }
                self.out.push(Expr::Masq { flags });
            }
            "dnat" => {
                self.i += 1;
                self.expect("ip")?;
                self.expect("to")?;
                // one address and port: `dnat ip to 10.0.0.1:8080`
                if let Some(at) = self
                    .peek()
                    .and_then(|w| w.parse::<std::net::SocketAddrV4>().ok())
                {
                    self.i += 1;
                    self.out.push(Expr::Data {
                        dreg: 1,
                        data: at.ip().octets().to_vec(),
                    });
                    self.out.push(Expr::Data {
                        dreg: 2,
                        data: at.port().to_be_bytes().to_vec(),
                    });
                    self.out.push(Expr::Dnat {
                        addr: 1,
                        proto: Some(2),
                    });
                    return Ok(true);
                }
                let parts = self.concat_masked()?;
                self.expect("map")?;
                let set = self.set_name()?;
                let spec = self.spec(&set)?;
                let proto = match spec.data {
                    Some(Data::Value(s)) if s.parts.len() == 2 => Some(9),
                    Some(Data::Value(s)) if s.parts.len() == 1 => None,
                    _ => {
                        return Err(ParseError(format!(
                            "{set:?} does not map to address [. port]"
                        )))
                    }
                };
                self.load_masked(&parts);
                self.out.push(Expr::Lookup {
                    set,
                    sreg: 1,
                    dreg: Some(1),
                });
                self.out.push(Expr::Dnat { addr: 1, proto });
                return Ok(true);
            }
            "update" => {
                self.i += 1;
                let set = self.set_name()?;
                self.expect("{")?;
                let key = self.concat()?;
                self.expect(":")?;
                let data = self.concat()?;
                self.expect("}")?;
                let key_slots: usize = key.iter().map(|s| s.len().div_ceil(4)).sum();
                let data_slot = key_slots.div_ceil(4) * 4;
                self.load(&[(&key, 0), (&data, data_slot)]);
                self.out.push(Expr::Dynset {
                    set,
                    sreg_key: 1,
                    sreg_data: reg(data_slot, true),
                });
                return Ok(true);
            }
            "meta" if self.peek_at(1) == Some("mark") && self.peek_at(2) == Some("set") => {
                self.i += 3;
                self.mark_set()?;
                return Ok(true);
            }
            _ => {
                self.matcher()?;
                return Ok(true);
            }
        }
        self.i += 1;
        Ok(true)
    }
}

/// Compiles `rule`; `schema` gives the declaration of a map it DNATs
/// through.
pub fn compile(
    rule: &str,
    schema: &dyn Fn(&str) -> Option<SetSpec>,
) -> Result<Vec<Expr>, ParseError> {
    let mut c = Compiler {
        words: rule.split_whitespace().collect(),
        i: 0,
        out: Vec::new(),
        ip_checked: false,
        schema,
    };
    while c.statement()? {}
    if c.out.is_empty() {
        return Err(ParseError("empty rule".into()));
    }
    Ok(c.out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nftnl::types::parse_decl;

    fn c(rule: &str) -> Vec<Expr> {
        let schema =
            |_: &str| parse_decl("typeof numgen random mod 1 : ip daddr . tcp dport;").ok();
        compile(rule, &schema).unwrap_or_else(|e| panic!("{rule}: {}", e.0))
    }

    #[test]
    fn a_concatenation_takes_nfts_registers() {
        let e = c("ip daddr . meta l4proto . th dport vmap @services");
        assert_eq!(e.len(), 6);
        assert_eq!(
            e[2],
            Expr::Payload {
                base: 1,
                offset: 16,
                len: 4,
                dreg: 1
            }
        );
        assert_eq!(e[3], Expr::Meta { key: 16, dreg: 9 });
        assert_eq!(
            e[4],
            Expr::Payload {
                base: 2,
                offset: 2,
                len: 2,
                dreg: 10
            }
        );
        assert_eq!(
            e[5],
            Expr::Lookup {
                set: "services".into(),
                sreg: 1,
                dreg: Some(0)
            }
        );
    }

    #[test]
    fn mark_arithmetic_folds_into_one_bitwise() {
        let e = c("meta mark set meta mark & 0xffff | 0x10000");
        assert_eq!(
            e[1],
            Expr::Bitwise {
                sreg: 1,
                dreg: 1,
                mask: 0xffffu32.to_ne_bytes().to_vec(),
                xor: 0x10000u32.to_ne_bytes().to_vec()
            }
        );
        let e = c("meta mark set meta mark | 0x2000");
        assert_eq!(
            e[1],
            Expr::Bitwise {
                sreg: 1,
                dreg: 1,
                mask: 0xffff_dfffu32.to_ne_bytes().to_vec(),
                xor: 0x2000u32.to_ne_bytes().to_vec()
            }
        );
    }

    #[test]
    fn prefixes_compare_whole_bytes_or_mask() {
        let e = c("ip saddr != 10.244.0.0/16 drop");
        assert_eq!(
            e[2],
            Expr::Payload {
                base: 1,
                offset: 12,
                len: 2,
                dreg: 1
            }
        );
        assert_eq!(
            e[3],
            Expr::Cmp {
                sreg: 1,
                op: 1,
                data: vec![10, 244]
            }
        );
        let e = c("ip saddr 10.240.0.0/12 drop");
        assert_eq!(
            e[3],
            Expr::Bitwise {
                sreg: 1,
                dreg: 1,
                mask: vec![255, 240, 0, 0],
                xor: vec![0; 4]
            }
        );
    }

    #[test]
    fn update_puts_data_in_the_next_register() {
        let e = c("update @aff { ip saddr : ip daddr . th dport }");
        assert_eq!(
            e[3],
            Expr::Payload {
                base: 1,
                offset: 16,
                len: 4,
                dreg: 2
            }
        );
        assert_eq!(
            e[4],
            Expr::Payload {
                base: 2,
                offset: 2,
                len: 2,
                dreg: 13
            }
        );
        assert_eq!(
            e[5],
            Expr::Dynset {
                set: "aff".into(),
                sreg_key: 1,
                sreg_data: 2
            }
        );
    }

    #[test]
    fn dnat_to_one_endpoint_and_numgen_compared() {
        let e = c("meta l4proto tcp numgen random mod 3 0 dnat ip to 10.0.0.1:8080");
        assert_eq!(
            e[2..],
            [
                Expr::Numgen {
                    dreg: 1,
                    modulus: 3
                },
                Expr::Cmp {
                    sreg: 1,
                    op: 0,
                    data: 0u32.to_ne_bytes().to_vec()
                },
                Expr::Data {
                    dreg: 1,
                    data: vec![10, 0, 0, 1]
                },
                Expr::Data {
                    dreg: 2,
                    data: vec![0x1f, 0x90]
                },
                Expr::Dnat {
                    addr: 1,
                    proto: Some(2)
                },
            ]
        );
    }

    #[test]
    fn a_masked_mark_and_numgen_key_dnat_as_nft_orders_them() {
        let schema = |_: &str| {
            parse_decl("typeof meta mark . numgen random mod 1 : ip daddr . udp dport;").ok()
        };
        let e = compile(
            "meta l4proto udp dnat ip to meta mark & 0xffff0000 . numgen random mod 7 map @eps",
            &schema,
        )
        .expect("compiles");
        assert_eq!(
            e[2..],
            [
                Expr::Meta { key: 3, dreg: 1 },
                Expr::Bitwise {
                    sreg: 1,
                    dreg: 1,
                    mask: 0xffff_0000u32.to_ne_bytes().to_vec(),
                    xor: vec![0; 4]
                },
                Expr::Numgen {
                    dreg: 9,
                    modulus: 7
                },
                Expr::Lookup {
                    set: "eps".into(),
                    sreg: 1,
                    dreg: Some(1)
                },
                Expr::Dnat {
                    addr: 1,
                    proto: Some(9)
                },
            ]
        );
    }

    #[test]
    fn what_is_outside_the_subset_is_named() {
        let schema = |_: &str| None;
        for bad in [
            "ip ttl 3 drop",
            "jump",
            "reject with icmp host-unreachable",
            "dnat ip to numgen random mod 2 map @unknown",
            "meta mark set 3",
            "ct state bogus accept",
            "ip saddr 10.0.0.0/33 drop",
            "numgen random mod 0 . ip saddr @x",
            "",
        ] {
            assert!(compile(bad, &schema).is_err(), "{bad}");
        }
    }
}
