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

pub(crate) use super::expr::{
    int, reg, Sel, META_MARK, NFT_GOTO, NFT_JUMP, NFT_RETURN, NF_ACCEPT, NF_DROP,
};
pub use super::expr::{proto_number, Expr};
use super::types::{Data, SetSpec};
use super::ParseError;

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
mod tests;
