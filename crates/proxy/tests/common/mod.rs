//! Fixtures and the kernel check shared by the proxy's tests.
#![allow(dead_code, missing_docs)]

use std::process::{Command, Stdio};
use trellis_dataplane::sandbox;
use trellis_proxy::{
    Endpoint, NodeFacts, Protocol, Service, ServicePort, ServiceType, Slice, SlicePort,
};

pub fn node() -> NodeFacts {
    NodeFacts {
        name: "n1".into(),
        addresses: vec!["192.0.2.11".parse().expect("ip")],
        cluster_cidr: "10.244.0.0/16".parse().expect("cidr"),
        node_port_range: trellis_proxy::NODE_PORT_RANGE,
    }
}

pub fn port(name: &str, protocol: Protocol, port: u16, node_port: Option<u16>) -> ServicePort {
    ServicePort {
        name: name.into(),
        protocol,
        port,
        node_port,
    }
}

pub fn svc(ns: &str, name: &str, ip: &str, ports: Vec<ServicePort>) -> Service {
    Service {
        namespace: ns.into(),
        name: name.into(),
        kind: ServiceType::ClusterIP,
        cluster_ips: vec![ip.parse().expect("ip")],
        ports,
        ..Default::default()
    }
}

/// (address, node, ready, serving, terminating)
pub type Ep<'a> = (&'a str, &'a str, bool, bool, bool);

pub fn slice(ns: &str, service: &str, ports: &[(&str, Protocol, u16)], eps: &[Ep]) -> Slice {
    Slice {
        namespace: ns.into(),
        name: format!("{service}-abc"),
        service: service.into(),
        ports: ports
            .iter()
            .map(|(n, p, port)| SlicePort {
                name: (*n).into(),
                protocol: *p,
                port: *port,
            })
            .collect(),
        endpoints: eps
            .iter()
            .map(|(a, n, r, s, t)| Endpoint {
                address: a.parse().expect("ip"),
                ready: *r,
                serving: *s,
                terminating: *t,
                node: Some((*n).into()),
            })
            .collect(),
    }
}

pub fn ready<'a>(addr: &'a str, node: &'a str) -> Ep<'a> {
    (addr, node, true, true, false)
}

/// A check that cannot run: a note, or a failure when `CI` is set.
pub fn cannot_run(why: &str) -> bool {
    assert!(
        std::env::var_os("CI").is_none(),
        "cannot run under CI: {why}"
    );
    eprintln!("SKIP: {why}");
    true
}

/// Applies `scripts` in order with `nft -f` in a network namespace of its
/// own (gone when the command ends) and returns `nft -j list table` of the
/// proxy's table, normalized (no handles, elements sorted). `Err` names
/// the script the kernel refused. `None` when it cannot run here.
pub fn apply_in_netns(scripts: &[String]) -> Option<Result<String, String>> {
    if !sandbox::is_root() {
        cannot_run("applying nft scripts needs root (a private network namespace)");
        return None;
    }
    Some(sandbox::apply_in_netns(trellis_proxy::TABLE, scripts))
}

/// Like [`apply_in_netns`], but each script goes to the kernel as one
/// nf_tables batch over netlink (the agent's way), compiled by
/// `trellis_dataplane::nftnl`; `nft` only lists the result.
pub fn apply_netlink_in_netns(scripts: &[String]) -> Option<Result<String, String>> {
    if !sandbox::is_root() {
        cannot_run("applying over netlink needs root (a private network namespace)");
        return None;
    }
    let scripts = scripts.to_vec();
    // a thread of its own enters a new network namespace (unshare affects
    // only the calling thread; the namespace goes when the thread ends)
    let t = std::thread::spawn(move || -> Result<String, String> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("unshare: {e}"))?;
        for (i, s) in scripts.iter().enumerate() {
            trellis_dataplane::nftnl::apply(
                s,
                &trellis_proxy::script::decl_of,
                std::time::Duration::from_secs(60),
            )
            .map_err(|e| format!("script {i} refused: {e}"))?;
        }
        let out = Command::new("timeout")
            .args([
                "60",
                "nft",
                "-j",
                "list",
                "table",
                "inet",
                trellis_proxy::TABLE,
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).to_string());
        }
        Ok(normalize(&String::from_utf8_lossy(&out.stdout)))
    });
    Some(
        t.join()
            .unwrap_or_else(|_| Err("the netns thread panicked".into())),
    )
}

/// `nft -j` output normalized ([`sandbox::normalize`]).
pub fn normalize(json: &str) -> String {
    sandbox::normalize(json).expect("nft json")
}

/// Feeds `script` to `nft -c` (check only, in a private namespace).
pub fn nft_check(script: &str) -> Option<Result<(), String>> {
    if !sandbox::is_root() {
        cannot_run("nft -c needs root");
        return None;
    }
    Some(sandbox::nft_check(script))
}

/// Panics with the lines only one of `a` and `b` has (normalized tables).
pub fn assert_same_table(a: &str, b: &str, what: &str) {
    if a == b {
        return;
    }
    let la: std::collections::BTreeSet<&str> = a.lines().collect();
    let lb: std::collections::BTreeSet<&str> = b.lines().collect();
    let only_a: Vec<&&str> = la.difference(&lb).take(8).collect();
    let only_b: Vec<&&str> = lb.difference(&la).take(8).collect();
    panic!("{what}\nonly in the first:\n{only_a:#?}\nonly in the second:\n{only_b:#?}");
}

/// `listing` (JSON lines) with each chain id named by its chain: ids are
/// handed out in the order chains come, so a table reached by steps and
/// one loaded whole differ in them and in nothing else.
pub fn ids_named(listing: &str) -> String {
    // a Service port chain's rule `meta mark set meta mark & 0xffff | ID`,
    // as nft lists it: & (ID | 0xffff), | ID
    const SET: &str = r#"{"|":[{"&":[{"meta":{"key":"mark"}},"#;
    let mut names: std::collections::HashMap<u64, String> = Default::default();
    for line in listing.lines() {
        let (Some(at), Some(c)) = (line.find(SET), line.split("\"chain\":\"").nth(1)) else {
            continue;
        };
        let chain = c.split('"').next().unwrap_or_default();
        let rest = &line[at + SET.len()..];
        let mut nums = rest
            .split(|ch: char| !ch.is_ascii_digit())
            .filter(|w| !w.is_empty());
        if let (Some(m), Some(v)) = (nums.next(), nums.next()) {
            if let (Ok(m), Ok(v)) = (m.parse::<u64>(), v.parse::<u64>()) {
                names.insert(v, format!("\"id:{chain}\""));
                names.insert(m, format!("\"idmask:{chain}\""));
            }
        }
    }
    // every number that is one of them (ids are >= 65536: no port, octet
    // or counter of these tests collides)
    let mut out = String::with_capacity(listing.len());
    let mut digits = String::new();
    let flush = |digits: &mut String, out: &mut String| {
        match digits.parse::<u64>().ok().and_then(|n| names.get(&n)) {
            Some(name) => out.push_str(name),
            None => out.push_str(digits),
        }
        digits.clear();
    };
    for ch in listing.chars() {
        if ch.is_ascii_digit() {
            digits.push(ch);
        } else {
            flush(&mut digits, &mut out);
            out.push(ch);
        }
    }
    flush(&mut digits, &mut out);
    // lines re-sorted: elements keyed by ids sort by name now
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort_unstable();
    lines.join("\n")
}
