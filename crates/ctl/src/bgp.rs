//! `trellisctl bgp status` (like `calicoctl node status`): the node's
//! speaker and each peer — type, state, uptime, prefixes received,
//! accepted and advertised — from the agent's status socket.

use crate::status::{opt, table};
use trellis_model::status::{BgpStatus, NodeStatus};

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
pub fn section(st: &NodeStatus) -> anyhow::Result<BgpStatus> {
    st.bgp.clone().ok_or_else(|| {
        anyhow::anyhow!(
            "node {} runs backend {}, not bgp: no BGP speaker",
            st.node,
            opt(&st.backend)
        )
    })
}

/// The readable table.
pub fn render(b: &BgpStatus) -> String {
    let mut out = format!(
        "BGP speaker: AS {}  router id {}{}\n",
        b.asn,
        b.router_id,
        match &b.route_reflector_cluster_id {
            None => String::new(),
            Some(c) => format!("  route reflector (cluster id {c})"),
        }
    );
    let rows: Vec<Vec<String>> = b
        .peers
        .iter()
        .map(|p| {
            vec![
                p.addr.to_string(),
                p.kind.clone(),
                p.asn.to_string(),
                p.state.clone(),
                since(p.since_secs),
                p.received.to_string(),
                p.accepted.to_string(),
                p.advertised.to_string(),
                p.stale.to_string(),
                opt(&p.last_error),
            ]
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
        let st: NodeStatus = serde_json::from_value(serde_json::json!({
            "node": "n1", "subnet": "10.244.1.0/24", "backend": "bgp", "mtu": 1500, "publicIp": null,
            "ready": true, "pods": 0, "bgp": {
            "asn": 64512, "routerId": "192.0.2.11", "routeReflectorClusterId": null,
            "peers": [{"addr": "192.0.2.12", "kind": "mesh", "asn": 64512, "state": "Established",
                       "sinceSecs": 75, "received": 1, "accepted": 1, "advertised": 1, "stale": 0,
                       "establishedCount": 1, "lastError": null, "routerId": "192.0.2.12"}]}}))
        .expect("typed");
        let t = render(&section(&st).expect("bgp"));
        for needle in ["AS 64512", "192.0.2.12", "mesh", "Established", "75s"] {
            assert!(t.contains(needle), "{needle} missing in\n{t}");
        }
        let other = NodeStatus {
            node: "n1".into(),
            backend: Some("vxlan".into()),
            ..Default::default()
        };
        let e = section(&other).expect_err("not bgp");
        assert!(e.to_string().contains("vxlan"));
    }
}
