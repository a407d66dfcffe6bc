//! [`Cmd`]s -> nf_tables netlink messages (one batch), attribute for
//! attribute as in `linux/netfilter/nf_tables.h`.

use super::rule::Expr;
use super::script::{Cmd, Elem, ElemData, Hook};
use super::types::Data;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub(crate) const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
pub(crate) const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
const NFPROTO_INET: u8 = 1;
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;

/// Appends attribute `kind` with `value`, padded to 4 bytes (ctnetlink
/// uses it too).
pub(crate) fn attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn nest(out: &mut Vec<u8>, kind: u16, f: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    f(&mut inner);
    attr(out, kind | NLA_F_NESTED, &inner);
}

fn str_attr(out: &mut Vec<u8>, kind: u16, s: &str) {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    attr(out, kind, &v);
}

fn u32_attr(out: &mut Vec<u8>, kind: u16, v: u32) {
    attr(out, kind, &v.to_be_bytes());
}

fn u64_attr(out: &mut Vec<u8>, kind: u16, v: u64) {
    attr(out, kind, &v.to_be_bytes());
}

/// A netlink message: header, `nfgenmsg`, attributes.
pub fn message(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.push(family);
    m.push(0);
    m.extend_from_slice(&res_id.to_be_bytes());
    m.extend_from_slice(attrs);
    m
}

/// Batch begin / end.
pub fn batch(kind: u16, seq: u32) -> Vec<u8> {
    message(kind, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES, &[])
}

fn data_value(out: &mut Vec<u8>, kind: u16, bytes: &[u8]) {
    nest(out, kind, |d| attr(d, 1, bytes)); // NFTA_DATA_VALUE
}

fn data_verdict(out: &mut Vec<u8>, kind: u16, code: i32, chain: Option<&str>) {
    nest(out, kind, |d| {
        nest(d, 2, |v| {
            // NFTA_DATA_VERDICT: NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN
            u32_attr(v, 1, code as u32);
            if let Some(c) = chain {
                str_attr(v, 2, c);
            }
        })
    });
}

fn expr(out: &mut Vec<u8>, e: &Expr) {
    let (name, body): (&str, Vec<u8>) = {
        let mut b = Vec::new();
        let name = match e {
            Expr::Payload {
                base,
                offset,
                len,
                dreg,
            } => {
                u32_attr(&mut b, 1, *dreg);
                u32_attr(&mut b, 2, *base);
                u32_attr(&mut b, 3, *offset);
                u32_attr(&mut b, 4, *len);
                "payload"
            }
            Expr::Meta { key, dreg } => {
                u32_attr(&mut b, 1, *dreg);
                u32_attr(&mut b, 2, *key);
                "meta"
            }
            Expr::MetaSet { key, sreg } => {
                u32_attr(&mut b, 2, *key);
                u32_attr(&mut b, 3, *sreg);
                "meta"
            }
            Expr::Ct { key, dreg } => {
                u32_attr(&mut b, 1, *dreg);
                u32_attr(&mut b, 2, *key);
                "ct"
            }
            Expr::Fib {
                flags,
                result,
                dreg,
            } => {
                u32_attr(&mut b, 1, *dreg);
                u32_attr(&mut b, 2, *result);
                u32_attr(&mut b, 3, *flags);
                "fib"
            }
            Expr::Cmp { sreg, op, data } => {
                u32_attr(&mut b, 1, *sreg);
                u32_attr(&mut b, 2, *op);
                data_value(&mut b, 3, data);
                "cmp"
            }
            Expr::Bitwise {
                sreg,
                dreg,
                mask,
                xor,
            } => {
                u32_attr(&mut b, 1, *sreg);
                u32_attr(&mut b, 2, *dreg);
                u32_attr(&mut b, 3, mask.len() as u32);
                data_value(&mut b, 4, mask);
                data_value(&mut b, 5, xor);
                "bitwise"
            }
            Expr::Lookup { set, sreg, dreg } => {
                str_attr(&mut b, 1, set);
                u32_attr(&mut b, 2, *sreg);
                if let Some(d) = dreg {
                    u32_attr(&mut b, 3, *d);
                }
                "lookup"
            }
            Expr::Verdict { code, chain } => {
                u32_attr(&mut b, 1, 0);
                data_verdict(&mut b, 2, *code, chain.as_deref());
                "immediate"
            }
            Expr::Data { dreg, data } => {
                u32_attr(&mut b, 1, *dreg);
                data_value(&mut b, 2, data);
                "immediate"
            }
            Expr::Counter => {
                u64_attr(&mut b, 1, 0);
                u64_attr(&mut b, 2, 0);
                "counter"
            }
            Expr::Numgen { dreg, modulus } => {
                u32_attr(&mut b, 1, *dreg);
                u32_attr(&mut b, 2, *modulus);
                u32_attr(&mut b, 3, 1); // NFT_NG_RANDOM
                u32_attr(&mut b, 4, 0);
                "numgen"
            }
            Expr::Dnat { addr, proto } => {
                u32_attr(&mut b, 1, 1); // NFT_NAT_DNAT
                u32_attr(&mut b, 2, 2); // NFPROTO_IPV4
                u32_attr(&mut b, 3, *addr);
                if let Some(p) = proto {
                    u32_attr(&mut b, 5, *p);
                }
                "nat"
            }
            Expr::Masq { flags } => {
                if *flags != 0 {
                    u32_attr(&mut b, 1, *flags);
                }
                "masq"
            }
            Expr::Reject { kind, code } => {
                u32_attr(&mut b, 1, *kind);
                attr(&mut b, 2, &[*code]);
                "reject"
            }
            Expr::Dynset {
                set,
                sreg_key,
                sreg_data,
            } => {
                str_attr(&mut b, 1, set);
                u32_attr(&mut b, 3, 1); // NFT_DYNSET_OP_UPDATE
                u32_attr(&mut b, 4, *sreg_key);
                u32_attr(&mut b, 5, *sreg_data);
                "dynset"
            }
        };
        (name, b)
    };
    nest(out, 1, |el| {
        str_attr(el, 1, name);
        if !body.is_empty() {
            attr(el, 2 | NLA_F_NESTED, &body);
        }
    });
}

fn elem(out: &mut Vec<u8>, e: &Elem) {
    nest(out, 1, |el| {
        data_value(el, 1, &e.key); // NFTA_SET_ELEM_KEY
        match &e.data {
            Some(ElemData::Value(v)) => data_value(el, 2, v),
            Some(ElemData::Verdict(code, chain)) => data_verdict(el, 2, *code, chain.as_deref()),
            None => {}
        }
        if e.end {
            u32_attr(el, 3, 1); // NFT_SET_ELEM_INTERVAL_END
        }
    });
}

/// Largest attribute payload of one element message (a netlink attribute
/// length is 16 bits).
const ELEMS_MAX: usize = 60_000;

/// The messages of `cmd` on `table`, numbered from `seq` on; `set_id`
/// numbers new sets in the batch.
pub fn encode(table: &str, cmd: &Cmd, seq: &mut u32, set_id: &mut u32) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut push = |kind: u16, flags: u16, attrs: Vec<u8>| {
        *seq += 1;
        out.push(message(
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            NLM_F_REQUEST | flags,
            *seq,
            NFPROTO_INET,
            0,
            &attrs,
        ));
    };
    let mut a = Vec::new();
    match cmd {
        Cmd::AddTable => {
            str_attr(&mut a, 1, table);
            push(NFT_MSG_NEWTABLE, NLM_F_CREATE, a);
        }
        Cmd::DelTable => {
            str_attr(&mut a, 1, table);
            push(NFT_MSG_DELTABLE, 0, a);
        }
        Cmd::AddChain { name, hook } => {
            str_attr(&mut a, 1, table);
            str_attr(&mut a, 3, name);
            if let Some(Hook {
                kind,
                num,
                priority,
                policy,
            }) = hook
            {
                nest(&mut a, 4, |h| {
                    u32_attr(h, 1, *num);
                    u32_attr(h, 2, *priority as u32);
                });
                u32_attr(&mut a, 5, *policy as u32);
                str_attr(&mut a, 7, kind);
            }
            push(NFT_MSG_NEWCHAIN, NLM_F_CREATE, a);
        }
        Cmd::DelChain(name) | Cmd::FlushChain(name) => {
            str_attr(&mut a, 1, table);
            let (kind, at) = if matches!(cmd, Cmd::DelChain(_)) {
                (NFT_MSG_DELCHAIN, 3)
            } else {
                (NFT_MSG_DELRULE, 2)
            };
            str_attr(&mut a, at, name);
            push(kind, 0, a);
        }
        Cmd::AddSet { name, spec } => {
            str_attr(&mut a, 1, table);
            str_attr(&mut a, 2, name);
            u32_attr(&mut a, 3, spec.flags());
            u32_attr(&mut a, 4, spec.key.type_id());
            u32_attr(&mut a, 5, spec.key.bytes() as u32);
            match &spec.data {
                Some(Data::Verdict) => {
                    u32_attr(&mut a, 6, NFT_DATA_VERDICT);
                    u32_attr(&mut a, 7, 0);
                }
                Some(Data::Value(s)) => {
                    u32_attr(&mut a, 6, s.type_id());
                    u32_attr(&mut a, 7, s.bytes() as u32);
                }
                None => {}
            }
            *set_id += 1;
            u32_attr(&mut a, 10, *set_id);
            if let Some(t) = spec.timeout_ms {
                u64_attr(&mut a, 11, t);
            }
            attr(&mut a, 13, &spec.userdata());
            push(NFT_MSG_NEWSET, NLM_F_CREATE, a);
        }
        Cmd::DelSet(name) | Cmd::FlushSet(name) => {
            // a flush is an element delete naming no element
            str_attr(&mut a, 1, table);
            str_attr(&mut a, 2, name);
            let kind = if matches!(cmd, Cmd::DelSet(_)) {
                NFT_MSG_DELSET
            } else {
                NFT_MSG_DELSETELEM
            };
            push(kind, 0, a);
        }
        Cmd::Elements { add, set, elems } => {
            // as many elements per message as fit in one attribute
            let mut i = 0;
            while i < elems.len() {
                let mut list = Vec::new();
                while i < elems.len() && list.len() < ELEMS_MAX {
                    elem(&mut list, &elems[i]);
                    i += 1;
                }
                let mut a = Vec::new();
                str_attr(&mut a, 1, table);
                str_attr(&mut a, 2, set);
                attr(&mut a, 3 | NLA_F_NESTED, &list);
                if *add {
                    push(NFT_MSG_NEWSETELEM, NLM_F_CREATE, a);
                } else {
                    push(NFT_MSG_DELSETELEM, 0, a);
                }
            }
        }
        Cmd::Rule { chain, exprs } => {
            str_attr(&mut a, 1, table);
            str_attr(&mut a, 2, chain);
            nest(&mut a, 4, |l| {
                for e in exprs {
                    expr(l, e);
                }
            });
            push(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_elements_split_into_messages_that_fit() {
        let elems: Vec<Elem> = (0..20_000u32)
            .map(|i| Elem {
                key: i.to_be_bytes().to_vec(),
                data: None,
                end: false,
            })
            .collect();
        let cmd = Cmd::Elements {
            add: true,
            set: "s".into(),
            elems,
        };
        let (mut seq, mut id) = (0, 0);
        let msgs = encode("t", &cmd, &mut seq, &mut id);
        assert!(msgs.len() > 1);
        assert_eq!(seq as usize, msgs.len());
        for m in &msgs {
            assert!(m.len() < 65_536);
        }
    }
}
