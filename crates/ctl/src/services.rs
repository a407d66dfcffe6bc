//! `trellisctl get services` (the Services as this node's agent
//! programmed them, from its status socket) and `trellisctl trace svc`
//! (the nftables objects that serve one Service, read from the kernel,
//! with their packet counters).

use anyhow::{bail, Context};
use std::fmt::Write;
use std::process::Command;
use trellis_model::status::{ProxyService, ProxyStatus};
use trellis_proxy::{PICK_TABLE, TABLE};

/// The proxy section of a status document, or why there is none.
pub fn section(st: &trellis_model::status::NodeStatus) -> anyhow::Result<ProxyStatus> {
    st.proxy.clone().with_context(|| {
        format!(
            "node {}: the agent does not proxy Services (Kubernetes mode with kubernetes.proxy.enabled)",
            st.node
        )
    })
}

/// The table: one row per Service port; `wide` adds the endpoints.
pub fn render(p: &ProxyStatus, wide: bool) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "{:<32} {:<44} {:<8} {:>9}",
        "SERVICE", "ADDRESSES", "VERDICT", "ENDPOINTS"
    );
    if wide {
        out.push_str("  ENDPOINT ADDRESSES (LOCAL)");
    }
    out.push('\n');
    for s in &p.services {
        for port in &s.ports {
            let _ = write!(
                out,
                "{:<32} {:<44} {:<8} {:>9}",
                s.service,
                port.addresses.join(","),
                port.verdict,
                port.endpoints.len()
            );
            if wide {
                let _ = write!(
                    out,
                    "  {} ({})",
                    port.endpoints.join(","),
                    port.local.join(",")
                );
            }
            out.push('\n');
        }
        for problem in &s.problems {
            let _ = writeln!(out, "{:<32} ! {problem}", s.service);
        }
    }
    for c in &p.conflicts {
        let _ = writeln!(out, "conflict: {c}");
    }
    if !p.synced {
        out.push_str("(not synced yet: Services and EndpointSlices have not listed)\n");
    }
    out
}

fn nft(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("nft")
        .args(args)
        .output()
        .context("cannot run nft (apt-get install nftables)")?;
    if !out.status.success() {
        bail!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// The chain's rules as nft prints them (counters included), indented.
fn chain(name: &str) -> Option<String> {
    let text = nft(&["list", "chain", "inet", TABLE, name]).ok()?;
    Some(
        text.lines()
            .map(str::trim)
            .filter(|l| {
                !l.is_empty() && !l.starts_with("table") && !l.starts_with("chain") && *l != "}"
            })
            .map(|l| format!("      {l}\n"))
            .collect(),
    )
}

fn map(name: &str) -> Option<String> {
    let text = nft(&["list", "map", "inet", TABLE, name]).ok()?;
    let elements: String = text
        .lines()
        .map(str::trim)
        .skip_while(|l| !l.starts_with("elements"))
        .collect::<Vec<_>>()
        .join(" ");
    Some(format!(
        "      {}\n",
        if elements.is_empty() {
            "(empty)".into()
        } else {
            elements
        }
    ))
}

/// The id a chain's rules put into the packet mark (nft lists `meta
/// mark set meta mark & 0x0005ffff | 0x00050000` for id 5).
fn chain_id(rules: &str) -> Option<String> {
    rules.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("meta mark set meta mark & ")?;
        let (_, id) = rest.split_once(" | ")?;
        let v = u32::from_str_radix(id.trim().strip_prefix("0x")?, 16).ok()?;
        (v != 0 && v & 0xffff == 0).then(|| id.trim().to_string())
    })
}

/// `trellis-endpoints`' elements for chain id `id` with `n` endpoints.
fn choice(id: &str, n: usize, port: &str) -> String {
    let get = |m: &str, keys: &str| {
        nft(&[
            "get",
            "element",
            "inet",
            PICK_TABLE,
            m,
            &format!("{{ {keys} }}"),
        ])
        .map(|t| {
            t.lines()
                .map(str::trim)
                .skip_while(|l| !l.starts_with("elements"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|e| format!("(not found: {e})"))
    };
    let mut out = format!("      id {id} -> pickers: {}\n", get("pickers", id));
    let proto = port.rsplit('/').nth(1).unwrap_or("tcp");
    if n > 0 {
        let keys: Vec<String> = (0..n).map(|i| format!("{id} . {i}")).collect();
        let _ = writeln!(
            out,
            "      endpoints_{proto}: {}",
            get(&format!("endpoints_{proto}"), &keys.join(", "))
        );
    }
    out
}

/// What serves Service `name` (`namespace/name`) in this node's kernel.
pub fn trace(p: &ProxyStatus, name: &str) -> anyhow::Result<String> {
    let Some(s): Option<&ProxyService> = p.services.iter().find(|s| s.service == name) else {
        bail!(
            "service {name} is not programmed on this node (known: {})",
            p.services
                .iter()
                .map(|s| s.service.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let mut out = format!("service {name}\n");
    for problem in &s.problems {
        let _ = writeln!(out, "  ! {problem}");
    }
    for port in &s.ports {
        let _ = writeln!(
            out,
            "  port {}  {}  verdict {}  endpoints {}",
            port.id,
            port.addresses.join(","),
            port.verdict,
            port.endpoints.len()
        );
        // the entries a new connection's one lookup finds
        for a in &port.addresses {
            let (addr, proto) = a.rsplit_once('/').unwrap_or((a, "tcp"));
            let (ip, p) = addr.rsplit_once(':').unwrap_or((addr, ""));
            let (set, key) = if ip == "*" {
                (
                    ["nodeports", "no_endpoint_nodeports"],
                    format!("{proto} . {p}"),
                )
            } else {
                (
                    ["services", "no_endpoints"],
                    format!("{ip} . {proto} . {p}"),
                )
            };
            for m in set {
                if let Ok(t) = nft(&["get", "element", "inet", TABLE, m, &format!("{{ {key} }}")]) {
                    let el = t
                        .lines()
                        .map(str::trim)
                        .find(|l| l.starts_with("elements"))
                        .unwrap_or_default()
                        .to_string();
                    let _ = writeln!(out, "    map {m}: {el}");
                }
            }
        }
        for prefix in ["ext", "svc", "local", "rec", "lrec"] {
            let c = format!("{prefix}-{}", port.id);
            if let Some(rules) = chain(&c) {
                let _ = writeln!(out, "    chain {c}");
                out.push_str(&rules);
                // the endpoint choice of the id it puts into the mark
                let n = if prefix == "svc" {
                    port.endpoints.len()
                } else {
                    port.local.len()
                };
                if let (Some(id), "svc" | "local") = (chain_id(&rules), prefix) {
                    out.push_str(&choice(&id, n, &port.id));
                }
            }
        }
        for prefix in ["aff", "laff"] {
            let m = format!("{prefix}-{}", port.id);
            if let Some(els) = map(&m) {
                let _ = writeln!(out, "    map {m}");
                out.push_str(&els);
            }
        }
    }
    let fw = format!("fwc-{name}");
    if let Some(rules) = chain(&fw) {
        let _ = writeln!(out, "  chain {fw} (loadBalancerSourceRanges)");
        out.push_str(&rules);
    }
    Ok(out)
}
