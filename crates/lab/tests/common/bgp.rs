//! Helpers of the bgp lab tests.

use super::*;
use serde_json::Value;
use std::time::Duration;
use trellis_lab::{exec, Lab, LabOptions};

/// A bgp cluster; in Kubernetes mode the manifest is applied with kubectl.
pub fn bgp_lab(ds: Datastore, nodes: usize, segments: usize, manifest: Option<&str>) -> Lab {
    Lab::create(LabOptions {
        nodes,
        segments,
        bgp: manifest.map(String::from),
        ..ds.cluster("bgp")
    })
    .expect("bgp lab")
}

/// One pod per node in the agent's default attach mode.
pub fn pods(lab: &mut Lab) -> Vec<(String, String, String)> {
    let names: Vec<String> = lab.state().nodes.iter().map(|n| n.name.clone()).collect();
    names
        .into_iter()
        .map(|n| {
            let p = lab.add_pod(&n, "p", "").expect("add pod");
            (n.clone(), lab.pod_ns(&n, "p"), p.ip)
        })
        .collect()
}

pub fn bgp_peers(lab: &Lab, node: &str) -> Vec<Value> {
    status(lab, node)["bgp"]["peers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

pub fn wait_established(lab: &Lab, node: &str, want: usize) {
    wait_for(
        &format!("{node}: {want} sessions established"),
        Duration::from_secs(20),
        || {
            let p = bgp_peers(lab, node);
            p.len() == want && p.iter().all(|x| x["state"] == "Established")
        },
    );
}

pub fn reach_all(lab: &Lab, pods: &[(String, String, String)]) {
    for (_, from, _) in pods {
        for (_, _, ip) in pods {
            wait_for(&format!("{from} -> {ip}"), Duration::from_secs(15), || {
                lab.ping(from, ip, 1).is_some()
            });
        }
    }
}

pub fn no_encapsulation(lab: &Lab, node: &str) {
    let links = exec::ip(&["-n", &lab.ns(node), "-d", "link"]).expect("links");
    assert!(
        !links.contains("trellis.1") && !links.contains("vxlan") && !links.contains("ipip"),
        "{node} has a tunnel device:\n{links}"
    );
    assert!(
        !links.contains("cni0"),
        "{node}: bgp attaches routed, no bridge:\n{links}"
    );
}
