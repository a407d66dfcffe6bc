//! `trellisctl get services` (the Services as this node's agent
//! programmed them, from its status socket) and `trellisctl trace svc`
//! (the nftables objects that serve one Service, read from the kernel,
//! with their packet counters).

use anyhow::{bail, Context};
use std::fmt::Write;
use std::process::Command;
use trellis_model::status::{ProxyService, ProxyStatus};
use trellis_proxy::{ENDPOINTS, TABLE};

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

/// `numgen random mod N [offset K]` in a chain's listing: (N, K).
fn numgen(rules: &str) -> Option<(u32, u32)> {
    let words: Vec<&str> = rules.split_whitespace().collect();
    let at = words
        .windows(3)
        .position(|w| w == ["numgen", "random", "mod"])?;
    let n = words.get(at + 3)?.parse().ok()?;
    let base = match (words.get(at + 4), words.get(at + 5)) {
        (Some(&"offset"), Some(k)) => k.parse().ok()?,
        _ => 0,
    };
    Some((n, base))
}

/// The `elements = { ... }` of a listing, on one line.
fn elements_line(text: &str) -> String {
    let joined: String = text
        .lines()
        .map(str::trim)
        .skip_while(|l| !l.starts_with("elements"))
        .take_while(|l| !l.starts_with('}'))
        .collect::<Vec<_>>()
        .join(" ");
    if joined.is_empty() {
        "(empty)".into()
    } else {
        joined
    }
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
                // the chain's endpoints: its keys of the `endpoints` map
                if let Some((n, base)) = numgen(&rules) {
                    let keys: Vec<String> = (0..u64::from(n))
                        .map(|i| (u64::from(base) + i).to_string())
                        .collect();
                    let _ = writeln!(
                        out,
                        "    map {ENDPOINTS} keys {base}..{}",
                        u64::from(base) + u64::from(n)
                    );
                    let set = format!("{{ {} }}", keys.join(", "));
                    let el = nft(&["get", "element", "inet", TABLE, ENDPOINTS, &set])
                        .map(|t| elements_line(&t))
                        .unwrap_or_else(|e| format!("(cannot read: {e})"));
                    let _ = writeln!(out, "      {el}");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chains_numgen_and_offset_are_read() {
        let rules = "      counter packets 1 bytes 60\n      meta l4proto tcp dnat ip to numgen random mod 3 offset 48 map @endpoints\n";
        assert_eq!(numgen(rules), Some((3, 48)));
        // nft leaves out offset 0
        assert_eq!(
            numgen("dnat ip to numgen random mod 2 map @endpoints"),
            Some((2, 0))
        );
        assert_eq!(numgen("counter drop"), None);
        assert_eq!(numgen("numgen random mod x"), None);
        assert_eq!(
            elements_line("map endpoints {\n\telements = { 48 : 10.0.0.1 . 80,\n\t\t49 : 10.0.0.2 . 80 }\n}\n"),
            "elements = { 48 : 10.0.0.1 . 80, 49 : 10.0.0.2 . 80 }"
        );
    }
}
