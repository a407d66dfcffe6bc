//! `trellisctl apply -f / get / delete -f` of the BGP resources in both
//! datastores: etcd keys, and custom resources through the lab's real API
//! server in Kubernetes mode.

mod common;
use common::*;
use trellis_lab::{Lab, LabOptions};

const MANIFEST: &str = "apiVersion: trellis.dev/v1
kind: BGPConfiguration
metadata: {name: default}
spec: {asNumber: 64513, nodeToNodeMeshEnabled: false}
---
apiVersion: trellis.dev/v1
kind: BGPPeer
metadata: {name: tor}
spec: {peerIP: 192.0.2.1, asNumber: 65000, node: n1, password: s3cret}
---
apiVersion: trellis.dev/v1
kind: Node
metadata: {name: n1}
spec: {bgp: {routeReflectorClusterID: 224.0.0.1}}
";

fn lab(ds: Datastore) -> Lab {
    Lab::create(LabOptions {
        nodes: 0,
        ..ds.cluster("bgp")
    })
    .expect("lab")
}

fn apply_get_delete(ds: Datastore, test: &str) {
    let Some(_running) = ds.runs(test) else {
        return;
    };
    let lab = lab(ds);
    let out = lab.trellisctl_apply(MANIFEST).expect("apply");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "BGPConfiguration/default applied",
            "BGPPeer/tor applied",
            "Node/n1 applied"
        ]
    );
    let table = lab.trellisctl(&["get", "bgppeers"]).expect("get");
    let row = table.lines().nth(1).unwrap_or_default();
    for cell in ["tor", "192.0.2.1", "65000", "n1", "yes"] {
        assert!(
            row.split_whitespace().any(|c| c == cell),
            "{cell}:\n{table}"
        );
    }
    let t = lab
        .trellisctl(&["get", "bgpconfiguration", "default"])
        .expect("get");
    assert!(t.contains("64513") && t.contains("false"), "{t}");
    let t = lab.trellisctl(&["get", "node"]).expect("get");
    assert!(t.contains("224.0.0.1"), "{t}");
    // -o yaml is a manifest apply takes back; -o json a List it also takes
    let yaml = lab
        .trellisctl(&["get", "bgppeers", "-o", "yaml"])
        .expect("yaml");
    assert!(yaml.contains("peerIP: 192.0.2.1"), "{yaml}");
    lab.trellisctl_apply(&yaml).expect("apply the yaml back");
    assert_eq!(
        lab.trellisctl(&["get", "bgppeers", "-o", "yaml"])
            .expect("yaml"),
        yaml,
        "the same after a round trip"
    );
    let json = lab
        .trellisctl(&["get", "nodes", "-o", "json"])
        .expect("json");
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(
        v["items"][0]["spec"]["bgp"]["routeReflectorClusterID"],
        "224.0.0.1"
    );
    lab.trellisctl_apply(&json).expect("apply the json back");
    assert_eq!(
        lab.trellisctl(&["get", "nodes", "-o", "json"])
            .expect("json"),
        json,
        "the same after a round trip"
    );
    if ds == Datastore::Kubernetes {
        // what trellisctl wrote is what kubectl sees
        let k = lab
            .kubectl(&[
                "get",
                "bgppeers.trellis.dev",
                "tor",
                "-o",
                "jsonpath={.spec.asNumber}",
            ])
            .expect("kubectl get");
        assert_eq!(k.trim(), "65000");
    }
    // a manifest with one bad document writes nothing, naming it
    let bad = "apiVersion: trellis.dev/v1\nkind: BGPPeer\nmetadata: {name: good}\nspec: {peerIP: 192.0.2.9, asNumber: 65009}\n---\napiVersion: trellis.dev/v1\nkind: BGPPeer\nmetadata: {name: bad}\nspec: {peerIP: 192.0.2.8, asNumber: 0}\n";
    let e = lab.trellisctl_apply(bad).expect_err("refused");
    assert!(
        e.to_string().contains("document 2") && e.to_string().contains("asNumber"),
        "{e:#}"
    );
    let t = lab.trellisctl(&["get", "bgppeers"]).expect("get");
    assert!(!t.contains("good"), "nothing written:\n{t}");
    let e = lab
        .trellisctl(&["get", "bgppeers", "nope"])
        .expect_err("absent");
    assert!(e.to_string().contains("\"nope\" not found"), "{e:#}");
    // delete: gone, then "not found"
    let out = lab.trellisctl_delete(MANIFEST).expect("delete");
    assert!(out.contains("BGPPeer/tor deleted"), "{out}");
    let out = lab.trellisctl_delete(MANIFEST).expect("delete again");
    assert!(out.contains("BGPPeer/tor not found"), "{out}");
    let t = lab.trellisctl(&["get", "bgppeers"]).expect("get");
    assert_eq!(t.lines().count(), 1, "only the header:\n{t}");
}

#[test]
fn trellisctl_apply_get_delete_in_etcd() {
    apply_get_delete(Datastore::Etcd, "trellisctl_apply_get_delete_in_etcd");
}

#[test]
fn trellisctl_apply_get_delete_through_the_api_server() {
    apply_get_delete(
        Datastore::Kubernetes,
        "trellisctl_apply_get_delete_through_the_api_server",
    );
}

#[test]
fn trellisctl_names_an_unreachable_api_server() {
    let Some(_running) = Datastore::Kubernetes.runs("trellisctl_names_an_unreachable_api_server")
    else {
        return;
    };
    let lab = lab(Datastore::Kubernetes);
    // nothing listens on port 1 of the control-plane address: what
    // trellisctl itself printed names it (not just our command line)
    let t = std::time::Instant::now();
    let e = lab
        .trellisctl(&["get", "bgppeers", "--server", "https://192.0.2.2:1"])
        .expect_err("unreachable");
    let said = stderr(&e);
    assert!(
        said.contains("192.0.2.2:1") && said.contains("list bgppeers"),
        "{e:#}"
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(19), "{e:#}");
    // a refusal by the API server (RBAC: the agents' ServiceAccount may
    // only read these resources) is reported as the server said it
    let agent = lab.dir().join("k8s/agent.kubeconfig");
    let file = lab.dir().join("peers.yaml");
    std::fs::write(&file, MANIFEST).expect("write manifest");
    let e = lab
        .trellisctl(&[
            "apply",
            "-f",
            &file.to_string_lossy(),
            "--kubeconfig",
            &agent.to_string_lossy(),
        ])
        .expect_err("forbidden");
    let said = stderr(&e);
    assert!(
        said.contains("forbidden") && said.contains("(403)"),
        "{said}"
    );
}

/// What the failed command wrote to stderr.
fn stderr(e: &anyhow::Error) -> String {
    match e.downcast_ref::<trellis_lab::exec::ExecError>() {
        Some(trellis_lab::exec::ExecError::Failed { stderr, .. }) => stderr.clone(),
        _ => panic!("not a failed command: {e:#}"),
    }
}
