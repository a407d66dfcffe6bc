//! `trellisctl policy trace SRC DST [PORT/PROTO]`: how this node's policy
//! table decides a new connection, asked of the agent (`/policy/trace`
//! on its HTTP address), which evaluates the very table it loaded.
//! `trellisctl policy denials`: the last denied packets the agent logged
//! (`/policy/denials`; with `kubernetes.policy.logDenied`).

use anyhow::{bail, Context};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(5);

/// The agent's decision as JSON.
pub fn fetch(
    http: SocketAddr,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    port: Option<&str>,
) -> anyhow::Result<Value> {
    let mut q = format!("src={src}&dst={dst}");
    if let Some(p) = port {
        q.push_str(&format!("&port={}", p.replace('/', "%2F")));
    }
    get(http, &format!("/policy/trace?{q}"))
}

/// The last denied packets the agent logged, as JSON.
pub fn denials(http: SocketAddr) -> anyhow::Result<Value> {
    get(http, "/policy/denials")
}

/// `GET path` of the agent's HTTP address: its JSON answer.
fn get(http: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let mut s = TcpStream::connect_timeout(&http, TIMEOUT)
        .with_context(|| format!("the agent's HTTP address {http} is not reachable"))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .with_context(|| format!("reading the agent's answer from {http}"))?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("the agent says: {}", body.trim());
    }
    serde_json::from_str(body).with_context(|| format!("the agent's answer is not JSON: {body:?}"))
}

/// Logged denials as lines of text, oldest first.
pub fn render_denials(v: &Value) -> String {
    let items = v.as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        return "no denied packet logged (is kubernetes.policy.logDenied on?)\n".into();
    }
    let mut out = String::new();
    for d in items {
        let s = |k: &str| d[k].as_str().unwrap_or_default().to_string();
        let flow = match (d["sport"].as_u64(), d["dport"].as_u64()) {
            (Some(sp), Some(dp)) => {
                format!("{}:{sp} -> {}:{dp}/{}", s("src"), s("dst"), s("proto"))
            }
            _ => format!("{} -> {} {}", s("src"), s("dst"), s("proto")),
        };
        out.push_str(&format!(
            "{:.3}  {flow}  denied by {} {}\n",
            d["time"].as_f64().unwrap_or_default(),
            s("tier"),
            s("policy")
        ));
    }
    out
}

/// The decision as lines of text.
pub fn render(d: &Value, src: Ipv4Addr, dst: Ipv4Addr, port: Option<&str>) -> String {
    let allowed = d["allowed"].as_bool().unwrap_or(false);
    let mut out = format!(
        "{} {src} -> {dst} {}\n",
        if allowed { "ALLOWED" } else { "DENIED" },
        port.unwrap_or("(no port)")
    );
    let steps = d["steps"].as_array().cloned().unwrap_or_default();
    if steps.is_empty() {
        out.push_str("  no policy applies to either end on this node\n");
    }
    for s in steps {
        let verdict = if s["allowed"].as_bool().unwrap_or(false) {
            "allowed"
        } else {
            "denied"
        };
        let tier = s["tier"].as_str().unwrap_or_default();
        let policy = s["policy"].as_str().unwrap_or_default();
        let by = match (tier, s["rule"].as_u64()) {
            ("default", _) => "no policy isolates it".to_string(),
            ("unknown", _) => format!("{policy}: nothing in or out until it is known"),
            ("NetworkPolicy", None) => {
                format!("NetworkPolicy: no rule of {policy} allows it (isolated)")
            }
            (t, Some(r)) => format!("{t} {policy} rule {r}"),
            (t, None) => format!("{t} {policy}"),
        };
        out.push_str(&format!(
            "  {:<8} {verdict:<8} by {by} (chain {})\n",
            s["direction"].as_str().unwrap_or_default(),
            s["chain"].as_str().unwrap_or_default()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denials_read_as_lines() {
        let v = serde_json::json!([
            {"time": 1.5, "tier": "Admin", "policy": "deny-x", "src": "10.0.0.1", "dst": "10.0.0.2", "proto": "tcp", "sport": 40000, "dport": 80},
            {"time": 2.0, "tier": "NetworkPolicy", "policy": "x/a", "src": "10.0.0.1", "dst": "10.0.0.2", "proto": "icmp", "sport": null, "dport": null}]);
        let t = render_denials(&v);
        assert_eq!(
            t,
            "1.500  10.0.0.1:40000 -> 10.0.0.2:80/tcp  denied by Admin deny-x\n\
             2.000  10.0.0.1 -> 10.0.0.2 icmp  denied by NetworkPolicy x/a\n"
        );
        assert!(render_denials(&serde_json::json!([])).contains("logDenied"));
    }

    #[test]
    fn a_decision_reads_as_text() {
        let d = serde_json::json!({"allowed": false, "steps": [
            {"direction": "egress", "allowed": true, "tier": "default", "policy": "", "rule": null, "chain": "out-1"},
            {"direction": "ingress", "allowed": false, "tier": "NetworkPolicy", "policy": "x/deny", "rule": null, "chain": "in-2"}]});
        let t = render(
            &d,
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            Some("80/tcp"),
        );
        assert!(t.starts_with("DENIED 10.0.0.1 -> 10.0.0.2 80/tcp"), "{t}");
        assert!(
            t.contains("ingress  denied   by NetworkPolicy: no rule of x/deny allows it"),
            "{t}"
        );
    }
}
