//! An nft script of one-line commands (the subset trellis writes) ->
//! [`Cmd`]s: `add table|chain|set|map|element|rule`, `delete
//! table|chain|set|map|element`, `flush chain|set|map`, all in family
//! `inet`. Element keys and data are encoded by their set's declaration:
//! declared earlier in the script, or given by the caller's schema.

use super::rule::{self, Expr, NFT_GOTO, NFT_JUMP, NFT_RETURN, NF_ACCEPT, NF_DROP};
use super::types::{parse_decl, Component, Data, SetSpec, Shape};
use super::ParseError;
use std::collections::HashMap;

/// A base chain's hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// `filter`, `nat`, `route`.
    pub kind: String,
    /// `NF_INET_*` hook number.
    pub num: u32,
    /// Priority.
    pub priority: i32,
    /// Policy verdict (`NF_ACCEPT` / `NF_DROP`).
    pub policy: i32,
}

/// Map element data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElemData {
    /// A verdict (with its chain for jump / goto).
    Verdict(i32, Option<String>),
    /// Bytes.
    Value(Vec<u8>),
}

/// One set element as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elem {
    /// The key's bytes.
    pub key: Vec<u8>,
    /// Map data.
    pub data: Option<ElemData>,
    /// `NFT_SET_ELEM_INTERVAL_END` for an interval's end.
    pub end: bool,
}

/// One command of the script (the nft command of the same name).
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    AddTable,
    DelTable,
    AddChain {
        name: String,
        hook: Option<Hook>,
    },
    DelChain(String),
    FlushChain(String),
    AddSet {
        name: String,
        spec: SetSpec,
    },
    DelSet(String),
    FlushSet(String),
    Elements {
        add: bool,
        set: String,
        elems: Vec<Elem>,
    },
    Rule {
        chain: String,
        exprs: Vec<Expr>,
    },
}

/// A script: its commands with their lines, and each one's table (a
/// script may work on several tables: one transaction).
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// The table of each command (family inet), by index into `cmds`.
    pub tables: Vec<String>,
    /// (line number, line, command).
    pub cmds: Vec<(usize, String, Cmd)>,
}

fn hook_num(h: &str) -> Option<u32> {
    Some(match h {
        "prerouting" => 0,
        "input" => 1,
        "forward" => 2,
        "output" => 3,
        "postrouting" => 4,
        _ => return None,
    })
}

/// `{ type nat hook prerouting priority -100; policy accept; }`
fn parse_hook(body: &str) -> Result<Option<Hook>, ParseError> {
    let body = body.trim();
    if body.is_empty() {
        return Ok(None);
    }
    let mut hook = Hook {
        kind: String::new(),
        num: u32::MAX,
        priority: 0,
        policy: NF_ACCEPT,
    };
    for stmt in body.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let w: Vec<&str> = stmt.split_whitespace().collect();
        match w.as_slice() {
            ["type", t, "hook", h, "priority", p] => {
                hook.kind = (*t).to_string();
                hook.num = hook_num(h).ok_or_else(|| ParseError(format!("unknown hook {h:?}")))?;
                hook.priority = p
                    .parse()
                    .map_err(|_| ParseError(format!("bad priority {p:?} (a number)")))?;
            }
            ["policy", "accept"] => hook.policy = NF_ACCEPT,
            ["policy", "drop"] => hook.policy = NF_DROP,
            _ => return Err(ParseError(format!("unsupported chain statement {stmt:?}"))),
        }
    }
    if hook.num == u32::MAX {
        return Err(ParseError(format!("chain body without a hook: {body:?}")));
    }
    Ok(Some(hook))
}

fn component_bytes(c: Component, v: &str) -> Result<Vec<u8>, ParseError> {
    let bad = || ParseError(format!("bad {c:?} value {v:?}"));
    let mut b = match c {
        Component::Ipv4 => v
            .parse::<std::net::Ipv4Addr>()
            .map_err(|_| bad())?
            .octets()
            .to_vec(),
        Component::Proto => vec![rule::proto_number(v).ok_or_else(bad)?],
        Component::Service => v.parse::<u16>().map_err(|_| bad())?.to_be_bytes().to_vec(),
        Component::Mark | Component::Integer => {
            let n = match v.strip_prefix("0x") {
                Some(h) => u32::from_str_radix(h, 16).ok(),
                None => v.parse().ok(),
            };
            n.ok_or_else(bad)?.to_ne_bytes().to_vec()
        }
    };
    b.resize(b.len().div_ceil(4) * 4, 0);
    Ok(b)
}

fn value_bytes(shape: &Shape, v: &str) -> Result<Vec<u8>, ParseError> {
    let parts: Vec<&str> = v.split(" . ").map(str::trim).collect();
    if parts.len() != shape.parts.len() {
        return Err(ParseError(format!(
            "{v:?} has {} parts, the set wants {}",
            parts.len(),
            shape.parts.len()
        )));
    }
    let mut out = Vec::new();
    for (c, p) in shape.parts.iter().zip(parts) {
        out.extend(component_bytes(*c, p)?);
    }
    Ok(out)
}

fn verdict(v: &str) -> Result<ElemData, ParseError> {
    let w: Vec<&str> = v.split_whitespace().collect();
    Ok(match w.as_slice() {
        ["accept"] => ElemData::Verdict(NF_ACCEPT, None),
        ["drop"] => ElemData::Verdict(NF_DROP, None),
        ["return"] => ElemData::Verdict(NFT_RETURN, None),
        ["jump", c] => ElemData::Verdict(NFT_JUMP, Some((*c).to_string())),
        ["goto", c] => ElemData::Verdict(NFT_GOTO, Some((*c).to_string())),
        _ => return Err(ParseError(format!("bad verdict {v:?}"))),
    })
}

/// `KEY [: DATA], ...` for a set declared as `spec`.
fn elements(spec: &SetSpec, body: &str, add: bool) -> Result<Vec<Elem>, ParseError> {
    let mut out = Vec::new();
    for e in body.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (k, d) = match e.split_once(" : ") {
            Some((k, d)) => (k.trim(), Some(d.trim())),
            None => (e, None),
        };
        let data = match (&spec.data, d) {
            (None, None) => None,
            (Some(_), None) if !add => None,
            (Some(Data::Verdict), Some(d)) => Some(verdict(d)?),
            (Some(Data::Value(s)), Some(d)) => Some(ElemData::Value(value_bytes(s, d)?)),
            (None, Some(_)) => return Err(ParseError(format!("{e:?}: a set element with data"))),
            (Some(_), None) => {
                return Err(ParseError(format!("{e:?}: a map element without data")))
            }
        };
        if spec.interval {
            // a prefix: its first address, and the address after its last
            // marked as the interval's end (none past 255.255.255.255)
            let [Component::Ipv4] = spec.key.parts[..] else {
                return Err(ParseError("interval sets of IPv4 addresses only".into()));
            };
            let net: ipnet::Ipv4Net = match k.parse() {
                Ok(n) => n,
                Err(_) => k
                    .parse::<std::net::Ipv4Addr>()
                    .map(ipnet::Ipv4Net::from)
                    .map_err(|_| ParseError(format!("bad prefix {k:?}")))?,
            };
            let start = u32::from(net.network());
            out.push(Elem {
                key: start.to_be_bytes().to_vec(),
                data,
                end: false,
            });
            if let Some(after) = u32::from(net.broadcast()).checked_add(1) {
                out.push(Elem {
                    key: after.to_be_bytes().to_vec(),
                    data: None,
                    end: true,
                });
            }
        } else {
            out.push(Elem {
                key: value_bytes(&spec.key, k)?,
                data,
                end: false,
            });
        }
    }
    Ok(out)
}

/// `NAME { BODY }` -> (NAME, BODY).
fn name_body(rest: &str) -> Result<(&str, &str), ParseError> {
    let (name, body) = rest
        .split_once(" {")
        .ok_or_else(|| ParseError(format!("expected `NAME {{ ... }}` in {rest:?}")))?;
    let body = body
        .trim()
        .strip_suffix('}')
        .ok_or_else(|| ParseError(format!("unclosed `{{` in {rest:?}")))?;
    Ok((name.trim(), body))
}

/// Parses `text`; `schema` gives the declaration (`type ...;`) of a set
/// the script uses without declaring it.
pub fn parse(text: &str, schema: &dyn Fn(&str) -> Option<String>) -> Result<Script, ParseError> {
    let mut script = Script::default();
    // sets declared so far, per (table, name)
    let mut declared: HashMap<(String, String), SetSpec> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |e: ParseError| ParseError(format!("line {}: {}: {line}", n + 1, e.0));
        let (table, cmd) = parse_line(line, &mut declared, schema).map_err(at)?;
        script.tables.push(table);
        script.cmds.push((n + 1, line.to_string(), cmd));
    }
    Ok(script)
}

/// One line: its table and command.
fn parse_line(
    line: &str,
    declared: &mut HashMap<(String, String), SetSpec>,
    schema: &dyn Fn(&str) -> Option<String>,
) -> Result<(String, Cmd), ParseError> {
    let mut w = line.splitn(4, ' ');
    let (verb, what) = (w.next().unwrap_or(""), w.next().unwrap_or(""));
    if !matches!(verb, "add" | "delete" | "flush") {
        return Err(ParseError(format!("unsupported command `{verb} {what}`")));
    }
    let (family, rest) = (w.next().unwrap_or(""), w.next().unwrap_or(""));
    if family != "inet" {
        return Err(ParseError(format!("family {family:?} (only inet)")));
    }
    let (tname, rest) = if what == "table" {
        (rest.trim(), "")
    } else {
        rest.split_once(' ')
            .ok_or_else(|| ParseError("expected `TABLE NAME ...`".into()))?
    };
    if tname.is_empty() {
        return Err(ParseError("no table named".into()));
    }
    let table = tname.to_string();
    let key = |name: &str| (table.clone(), name.to_string());
    let lookup = |name: &str,
                  declared: &HashMap<(String, String), SetSpec>|
     -> Result<SetSpec, ParseError> {
        if let Some(s) = declared.get(&key(name)) {
            return Ok(s.clone());
        }
        let decl = schema(name)
            .ok_or_else(|| ParseError(format!("set or map {name:?} is not declared")))?;
        parse_decl(&decl)
    };
    let cmd = match (verb, what) {
        ("add", "table") => Cmd::AddTable,
        ("delete", "table") => Cmd::DelTable,
        ("add", "chain") => match rest.split_once(" {") {
            Some(_) => {
                let (name, body) = name_body(rest)?;
                Cmd::AddChain {
                    name: name.to_string(),
                    hook: parse_hook(body)?,
                }
            }
            None => Cmd::AddChain {
                name: rest.trim().to_string(),
                hook: None,
            },
        },
        ("delete", "chain") => Cmd::DelChain(rest.trim().to_string()),
        ("flush", "chain") => Cmd::FlushChain(rest.trim().to_string()),
        ("add", "set" | "map") => {
            let (name, body) = name_body(rest)?;
            let spec = parse_decl(body)?;
            if (what == "map") != spec.data.is_some() {
                return Err(ParseError(format!(
                    "{what} {name:?} declared as a {}",
                    if spec.data.is_some() { "map" } else { "set" }
                )));
            }
            declared.insert(key(name), spec.clone());
            Cmd::AddSet {
                name: name.to_string(),
                spec,
            }
        }
        ("delete", "set" | "map") => {
            declared.remove(&key(rest.trim()));
            Cmd::DelSet(rest.trim().to_string())
        }
        ("flush", "set" | "map") => Cmd::FlushSet(rest.trim().to_string()),
        ("add" | "delete", "element") => {
            let (name, body) = name_body(rest)?;
            let spec = lookup(name, declared)?;
            Cmd::Elements {
                add: verb == "add",
                set: name.to_string(),
                elems: elements(&spec, body, verb == "add")?,
            }
        }
        ("add", "rule") => {
            let (chain, body) = rest
                .split_once(' ')
                .ok_or_else(|| ParseError("a rule without statements".into()))?;
            let specs = |n: &str| lookup(n, declared).ok();
            Cmd::Rule {
                chain: chain.to_string(),
                exprs: rule::compile(body, &specs)?,
            }
        }
        _ => return Err(ParseError(format!("unsupported command `{verb} {what}`"))),
    };
    Ok((table, cmd))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(name: &str) -> Option<String> {
        (name == "services").then(|| "type ipv4_addr . inet_proto . inet_service : verdict;".into())
    }

    #[test]
    fn elements_are_encoded_by_their_sets_declaration() {
        let s = parse(
            "add element inet t services { 10.0.0.1 . tcp . 80 : goto c, 10.0.0.2 . udp . 53 : drop }",
            &schema,
        )
        .expect("parse");
        let Cmd::Elements { elems, .. } = &s.cmds[0].2 else {
            panic!("not elements")
        };
        assert_eq!(elems[0].key, [10, 0, 0, 1, 6, 0, 0, 0, 0, 80, 0, 0]);
        assert_eq!(
            elems[0].data,
            Some(ElemData::Verdict(NFT_GOTO, Some("c".into())))
        );
        assert_eq!(elems[1].data, Some(ElemData::Verdict(NF_DROP, None)));
    }

    #[test]
    fn a_prefix_is_two_interval_elements() {
        let s = parse(
            "add set inet t fw { type ipv4_addr; flags interval; }\nadd element inet t fw { 10.0.0.0/8, 0.0.0.0/0 }",
            &schema,
        )
        .expect("parse");
        let Cmd::Elements { elems, .. } = &s.cmds[1].2 else {
            panic!("not elements")
        };
        assert_eq!(elems.len(), 3);
        assert_eq!(
            (elems[1].key.as_slice(), elems[1].end),
            ([11, 0, 0, 0].as_slice(), true)
        );
    }

    #[test]
    fn errors_name_the_line() {
        for (bad, needle) in [
            ("add element inet t nope { 1 }", "line 1"),
            ("add table ip t", "family"),
            (
                "add element inet t services { 10.0.0.1 . tcp : drop }",
                "parts",
            ),
            (
                "add element inet t services { 10.0.0.1 . tcp . 80 }",
                "without data",
            ),
            (
                "add chain inet t c { type nat hook sideways priority 0; }",
                "hook",
            ),
            ("add map inet t m { type mark; }", "declared as a set"),
            ("list ruleset", "unsupported"),
        ] {
            let e = parse(bad, &schema).expect_err(bad);
            assert!(e.0.contains(needle), "{bad}: {}", e.0);
        }
    }
}
