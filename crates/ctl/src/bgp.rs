//! `trellisctl bgp status` (like `calicoctl node status`): the node's
//! speaker and each peer — type, state, uptime, prefixes received,
//! accepted and advertised — from the agent's status socket.

use crate::status::{s, table};
use serde_json::{json, Value};

fn since(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// The BGP part of a status document, or an error when the node does not
/// run the bgp backend.
pub fn section(st: &Value) -> anyhow::Result<Value> {
    match &st["bgp"] {
        Value::Null => anyhow::bail!(
            "node {} runs backend {}, not bgp: no BGP speaker",
            s(&st["node"]),
            s(&st["backend"])
        ),
        b => Ok(b.clone()),
    }
}

/// The readable table.
pub fn render(b: &Value) -> String {
    let mut out = format!(
        "BGP speaker: AS {}  router id {}{}\n",
        s(&b["asn"]),
        s(&b["routerId"]),
        match &b["routeReflectorClusterId"] {
            Value::Null => String::new(),
            c => format!("  route reflector (cluster id {})", s(c)),
        }
    );
    let rows: Vec<Value> = b["peers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|p| {
            json!({
                "peer": p["addr"], "type": p["kind"], "as": p["asn"], "state": p["state"],
                "since": since(p["since_secs"].as_u64().unwrap_or(0)),
                "received": p["received"], "accepted": p["accepted"], "advertised": p["advertised"],
                "stale": p["stale"], "info": p["last_error"],
            })
        })
        .collect();
    table(
        "peers",
        &[
            "peer",
            "type",
            "as",
            "state",
            "since",
            "received",
            "accepted",
            "advertised",
            "stale",
            "info",
        ],
        &rows,
        &mut out,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_peers_and_refuses_other_backends() {
        let st = json!({"node": "n1", "backend": "bgp", "bgp": {
            "asn": 64512, "routerId": "192.0.2.11", "routeReflectorClusterId": null,
            "peers": [{"addr": "192.0.2.12", "kind": "mesh", "asn": 64512, "state": "Established",
                       "since_secs": 75, "received": 1, "accepted": 1, "advertised": 1, "stale": 0,
                       "last_error": null, "router_id": "192.0.2.12"}]}});
        let t = render(&section(&st).expect("bgp"));
        for needle in ["AS 64512", "192.0.2.12", "mesh", "Established", "75s"] {
            assert!(t.contains(needle), "{needle} missing in\n{t}");
        }
        let e = section(&json!({"node": "n1", "backend": "vxlan"})).expect_err("not bgp");
        assert!(e.to_string().contains("vxlan"));
    }
}
