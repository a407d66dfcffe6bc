//! Kubernetes mode against the real v1.36.2 control plane the lab runs
//! (API server, controller manager): subnets from podCIDRs, routes from
//! the Node watch, annotations and NetworkUnavailable, node deletion and
//! addition, malformed and misplaced nodes, the manifests on the server.

mod common;
use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};
use trellis_lab::{exec, Lab, INTERNET_IP};

fn node_json(lab: &Lab, node: &str) -> Value {
    serde_json::from_str(
        &lab.kubectl(&["get", "node", node, "-o", "json"])
            .expect("get node"),
    )
    .expect("node json")
}

fn backend_in_kubernetes_mode(backend: &str) {
    let _one = one_at_a_time();
    let mut lab = kube_lab(backend, 3);
    let mut pods = vec![];
    for n in ["n1", "n2", "n3"] {
        // the backend's default attach mode (routed with bgp)
        let p = lab.add_pod(n, &format!("p{n}"), "").expect("add pod");
        pods.push((n, lab.pod_ns(n, &format!("p{n}")), p.ip));
    }
    for n in ["n1", "n2", "n3"] {
        // the subnet is the controller manager's podCIDR
        let node = node_json(&lab, n);
        let cidr = node["spec"]["podCIDR"]
            .as_str()
            .expect("podCIDR")
            .to_string();
        let st = status(&lab, n);
        assert_eq!(st["subnet"], cidr.as_str(), "{backend}/{n}: {st}");
        assert_eq!(
            st["backend"],
            if backend == "directrouting" {
                "vxlan"
            } else {
                backend
            }
        );
        // the node published itself through nodes/status
        let ann = &node["metadata"]["annotations"];
        let ip = lab.node(n).expect("node").ip.clone();
        assert_eq!(ann["trellis.dev/public-ip"], ip.as_str(), "{ann}");
        let conds = node["status"]["conditions"].as_array().expect("conditions");
        assert!(
            conds
                .iter()
                .any(|c| c["type"] == "NetworkUnavailable" && c["status"] == "False"),
            "{backend}/{n}: {conds:?}"
        );
    }
    for (_, from, _) in &pods {
        for (_, _, to) in &pods {
            wait_for(
                &format!("{backend}: {from} -> {to}"),
                Duration::from_secs(10),
                || lab.ping(from, to, 1).is_some(),
            );
        }
    }
    // TCP keeps the pod's address across nodes; egress leaves as the node
    let (a, b) = (&pods[0], &pods[1]);
    let peer = lab.tcp_exchange(&a.1, &b.1, &b.2, 7100).expect("tcp");
    assert_eq!(peer.ip().to_string(), a.2, "{backend}: source kept");
    let peer = lab
        .tcp_exchange(&a.1, &lab.internet_ns(), INTERNET_IP, 7200)
        .expect("egress tcp");
    assert_eq!(
        peer.ip().to_string(),
        lab.node("n1").expect("n1").ip,
        "{backend}: masqueraded"
    );
}

#[test]
fn vxlan_in_kubernetes_mode() {
    if kubernetes("vxlan_in_kubernetes_mode") {
        backend_in_kubernetes_mode("vxlan");
    }
}

#[test]
fn host_gw_in_kubernetes_mode() {
    if kubernetes("host_gw_in_kubernetes_mode") {
        backend_in_kubernetes_mode("host-gw");
    }
}

#[test]
fn directrouting_in_kubernetes_mode() {
    if kubernetes("directrouting_in_kubernetes_mode") {
        backend_in_kubernetes_mode("directrouting");
    }
}

#[test]
fn bgp_in_kubernetes_mode() {
    if kubernetes("bgp_in_kubernetes_mode") {
        backend_in_kubernetes_mode("bgp");
    }
}

#[test]
fn a_deleted_node_is_unrouted_and_a_new_one_routed_within_a_second() {
    if !kubernetes("a_deleted_node_is_unrouted_and_a_new_one_routed_within_a_second") {
        return;
    }
    let _one = one_at_a_time();
    let mut lab = kube_lab("host-gw", 3);
    let n3 = node_json(&lab, "n3")["spec"]["podCIDR"]
        .as_str()
        .expect("podCIDR")
        .to_string();
    wait_for("n1 routes n3", Duration::from_secs(10), || {
        routes(&lab, "n1").contains(&n3)
    });
    let t = Instant::now();
    lab.kubectl(&["delete", "node", "n3", "--wait=false"])
        .expect("delete");
    wait_for(
        "n3's route gone from n1 and n2",
        Duration::from_secs(1),
        || !routes(&lab, "n1").contains(&n3) && !routes(&lab, "n2").contains(&n3),
    );
    eprintln!("route gone {} ms after the delete", t.elapsed().as_millis());
    // a new node: registered, its agent started, routed by the others
    let t = Instant::now();
    let n4 = lab.add_node().expect("add n4");
    let cidr = lab
        .wait_pod_cidr(&n4, Duration::from_secs(5))
        .expect("podCIDR");
    wait_for("n4 routed from n1", Duration::from_secs(1), || {
        routes(&lab, "n1").contains(&cidr)
    });
    eprintln!(
        "n4 routed {} ms after its registration",
        t.elapsed().as_millis()
    );
}

#[test]
fn malformed_and_misplaced_nodes_are_reported_and_the_rest_keep_working() {
    if !kubernetes("malformed_and_misplaced_nodes_are_reported_and_the_rest_keep_working") {
        return;
    }
    let _one = one_at_a_time();
    let mut lab = kube_lab("host-gw", 2);
    let a = lab.add_pod("n1", "a", "bridge").expect("a");
    let b = lab.add_pod("n2", "b", "bridge").expect("b");
    // a foreign node with a podCIDR and broken annotations
    let bad = serde_json::json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "broken", "annotations": {
            "trellis.dev/public-ip": "not-an-ip", "trellis.dev/backend-type": "host-gw"}},
        "spec": {"podCIDR": "10.244.200.0/24", "podCIDRs": ["10.244.200.0/24"]}});
    lab.kubectl_stdin(&["create", "-f", "-"], &bad.to_string())
        .expect("create broken");
    wait_for("the broken node reported", Duration::from_secs(10), || {
        std::fs::read_to_string(lab.agent_log("n1"))
            .unwrap_or_default()
            .contains("\"not-an-ip\"")
    });
    assert!(!routes(&lab, "n1").contains("10.244.200.0"));
    wait_for("a -> b", Duration::from_secs(10), || {
        lab.ping(&lab.pod_ns("n1", "a"), &b.ip, 1).is_some()
    });
    assert!(lab.ping(&lab.pod_ns("n2", "b"), &a.ip, 1).is_some());
    // a node whose podCIDR lies outside the cluster network: its agent
    // is not ready and says why, naming both
    let n3 = serde_json::json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "n3"},
        "spec": {"podCIDR": "10.99.0.0/24", "podCIDRs": ["10.99.0.0/24"]}});
    lab.kubectl_stdin(&["create", "-f", "-"], &n3.to_string())
        .expect("create n3");
    let err = lab.add_node().expect_err("n3's agent cannot serve");
    eprintln!("n3: {err:#}");
    let (code, body) = agent_http(&lab, "n3", "/readyz");
    assert!(code.contains("503"), "{code} {body}");
    assert!(
        body.contains("10.99.0.0/24") && body.contains("10.244.0.0/16"),
        "{body}"
    );
}

#[test]
fn the_manifests_pass_the_api_server_and_bad_resources_are_refused_naming_the_field() {
    if !kubernetes(
        "the_manifests_pass_the_api_server_and_bad_resources_are_refused_naming_the_field",
    ) {
        return;
    }
    let _one = one_at_a_time();
    let lab = kube_lab("bgp", 1);
    let dir = trellis_lab::deploy_dir();
    for f in std::fs::read_dir(&dir)
        .expect("deploy/kubernetes")
        .flatten()
    {
        let p = f.path();
        if p.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&p).expect("read");
            lab.kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &text)
                .unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
        }
    }
    // the README's resources are accepted ...
    lab.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: trellis.dev/v1\nkind: BGPPeer\nmetadata: {name: tor}\nspec: {peerIP: 192.0.2.1, asNumber: 65000, nodeSubnet: 192.0.2.0/24, password: s3cret}\n",
    )
    .expect("a good peer");
    // ... and what the etcd-mode parser refuses is refused, naming the field
    for (doc, field) in [
        ("kind: BGPPeer\nmetadata: {name: p1}\nspec: {peerIP: 192.0.2.1, asNumber: 0}", "asNumber"),
        ("kind: BGPPeer\nmetadata: {name: p2}\nspec: {peerIP: 224.0.0.5, asNumber: 65000}", "peerIP"),
        ("kind: BGPPeer\nmetadata: {name: p3}\nspec: {peerIP: 192.0.2.1, asNumber: 65000, node: n1, nodeSubnet: 192.0.2.0/24}", "nodeSubnet"),
        ("kind: BGPPeer\nmetadata: {name: p4}\nspec: {peerIP: 192.0.2.1, asNumber: 65000, password: \"\"}", "password"),
        ("kind: BGPPeer\nmetadata: {name: p5}\nspec: {peerIP: 192.0.2.1, asNumber: 65000, colour: red}", "colour"),
        ("kind: BGPConfiguration\nmetadata: {name: other}\nspec: {asNumber: 64512}", "metadata.name"),
        ("kind: BGPConfiguration\nmetadata: {name: default}\nspec: {holdTimeSeconds: 2}", "holdTimeSeconds"),
        ("kind: BGPConfiguration\nmetadata: {name: default}\nspec: {gracefulRestartSeconds: 5000}", "gracefulRestartSeconds"),
        ("kind: Node\nmetadata: {name: n1}\nspec: {bgp: {routeReflectorClusterID: nope}}", "routeReflectorClusterID"),
    ] {
        let doc = format!("apiVersion: trellis.dev/v1\n{doc}\n");
        let err = lab
            .kubectl_stdin(&["apply", "-f", "-"], &doc)
            .expect_err(&format!("refused: {doc}"));
        assert!(err.to_string().contains(field), "{field}: {err:#}");
    }
}

/// `GET /readyz` of `node`'s agent: (ready, body).
fn ready(lab: &Lab, node: &str) -> (bool, String) {
    let (code, body) = agent_http(lab, node, "/readyz");
    (code.contains("200"), body)
}

fn alive(lab: &Lab, node: &str) -> bool {
    let pid = lab.node(node).expect("node").agent_pid.expect("agent pid");
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
}

#[test]
fn an_api_server_outage_keeps_traffic_and_changes_made_meanwhile_apply_after() {
    if !kubernetes("an_api_server_outage_keeps_traffic_and_changes_made_meanwhile_apply_after") {
        return;
    }
    let _one = one_at_a_time();
    let mut lab = kube_lab("vxlan", 3);
    let a = lab.add_pod("n1", "a", "").expect("a");
    let b = lab.add_pod("n2", "b", "").expect("b");
    let (a_ns, b_ns) = (lab.pod_ns("n1", "a"), lab.pod_ns("n2", "b"));
    let n3 = lab.node("n3").expect("n3").subnet.clone();
    wait_for("a -> b", Duration::from_secs(10), || {
        lab.ping(&a_ns, &b.ip, 1).is_some()
    });
    wait_for("n1 routes n3", Duration::from_secs(10), || {
        routes(&lab, "n1").contains(&n3)
    });
    // pings both ways for the whole outage: 35 s at 10 per second
    let mut ab = lab
        .ping_stream(&a_ns, &b.ip, 350, Duration::from_millis(100))
        .expect("ping a -> b");
    let mut ba = lab
        .ping_stream(&b_ns, &a.ip, 350, Duration::from_millis(100))
        .expect("ping b -> a");
    ab.wait_first_reply(Duration::from_secs(5))
        .expect("a -> b flows");
    ba.wait_first_reply(Duration::from_secs(5))
        .expect("b -> a flows");
    let down = Instant::now();
    lab.stop_apiserver().expect("stop the API server");
    // the agents say so: status and readiness name the API server
    for n in ["n1", "n2"] {
        wait_for(
            &format!("{n} reports the outage"),
            Duration::from_secs(15),
            || {
                status(&lab, n)["errors"].as_array().is_some_and(|e| {
                    e.iter()
                        .any(|e| e.as_str().is_some_and(|e| e.contains("192.0.2.2:6443")))
                })
            },
        );
    }
    // meanwhile n3 is removed through an API server the agents cannot
    // reach (not by writing etcd behind the API's back)
    lab.start_apiserver_local_only().expect("local API server");
    lab.kubectl_local(&["delete", "node", "n3", "--wait=false"])
        .expect("delete n3");
    lab.stop_apiserver().expect("stop the local API server");
    assert!(
        routes(&lab, "n1").contains(&n3),
        "nobody could have told n1"
    );
    while down.elapsed() < Duration::from_secs(30) {
        assert!(alive(&lab, "n1") && alive(&lab, "n2"), "an agent died");
        std::thread::sleep(Duration::from_millis(500));
    }
    lab.start_apiserver().expect("start the API server");
    let back = Instant::now();
    wait_for(
        "n3's route gone from n1 and n2 after the API server returned",
        Duration::from_secs(15),
        || !routes(&lab, "n1").contains(&n3) && !routes(&lab, "n2").contains(&n3),
    );
    eprintln!(
        "n3 unrouted {} ms after the API server returned",
        back.elapsed().as_millis()
    );
    for n in ["n1", "n2"] {
        wait_for(
            &format!("{n} outage cleared"),
            Duration::from_secs(15),
            || {
                status(&lab, n)["errors"]
                    .as_array()
                    .is_none_or(|e| e.is_empty())
            },
        );
    }
    let (sent, got) = ab.finish(Duration::from_secs(40)).expect("a -> b");
    assert_eq!(
        (sent, got),
        (350, 350),
        "a -> b lost packets during the outage"
    );
    let (sent, got) = ba.finish(Duration::from_secs(10)).expect("b -> a");
    assert_eq!(
        (sent, got),
        (350, 350),
        "b -> a lost packets during the outage"
    );
    // the agents work on without a restart: a new pod is served and reached
    let c = lab.add_pod("n2", "c", "").expect("pod after the outage");
    wait_for("a -> c", Duration::from_secs(10), || {
        lab.ping(&a_ns, &c.ip, 1).is_some()
    });
}

#[test]
fn an_unreachable_api_server_at_start_is_waited_for() {
    if !kubernetes("an_unreachable_api_server_at_start_is_waited_for") {
        return;
    }
    let _one = one_at_a_time();
    let mut lab = kube_lab("host-gw", 2);
    lab.stop_agent("n2").expect("stop n2's agent");
    lab.stop_apiserver().expect("stop the API server");
    let err = lab.start_agent("n2").expect_err("n2 cannot join yet");
    eprintln!("n2: {err:#}");
    // it waits, says why, retries, and does not die
    let (ok, body) = ready(&lab, "n2");
    assert!(!ok && body.contains("192.0.2.2:6443"), "{body}");
    std::thread::sleep(Duration::from_secs(5));
    assert!(alive(&lab, "n2"), "the agent gave up");
    let log = std::fs::read_to_string(lab.agent_log("n2")).unwrap_or_default();
    assert!(log.contains("retrying with backoff"), "{log}");
    lab.start_apiserver().expect("start the API server");
    wait_for(
        "n2 joins once the API server answers",
        Duration::from_secs(15),
        || ready(&lab, "n2").0,
    );
    let a = lab.add_pod("n1", "a", "bridge").expect("a");
    lab.add_pod("n2", "b", "bridge").expect("b");
    wait_for("b -> a", Duration::from_secs(10), || {
        lab.ping(&lab.pod_ns("n2", "b"), &a.ip, 1).is_some()
    });
}

#[test]
fn a_node_without_pod_cidr_waits_and_says_why() {
    if !kubernetes("a_node_without_pod_cidr_waits_and_says_why") {
        return;
    }
    let _one = one_at_a_time();
    let mut lab = kube_lab("host-gw", 1);
    lab.stop_controller_manager()
        .expect("stop the controller manager");
    let err = lab.add_node().expect_err("n2 has no podCIDR");
    eprintln!("n2: {err:#}");
    let (ok, body) = ready(&lab, "n2");
    assert!(!ok, "{body}");
    assert!(
        body.contains("spec.podCIDRs") && body.contains("--allocate-node-cidrs"),
        "names what is missing and the likely cause: {body}"
    );
    assert!(alive(&lab, "n2"));
    lab.start_controller_manager()
        .expect("start the controller manager");
    wait_for(
        "n2 ready once it has a podCIDR",
        Duration::from_secs(20),
        || ready(&lab, "n2").0,
    );
    let cidr = lab
        .wait_pod_cidr("n2", Duration::from_secs(1))
        .expect("podCIDR");
    assert_eq!(status(&lab, "n2")["subnet"], cidr.as_str());
}

fn attached(lab: &Lab, node: &str, pod: &str) -> Value {
    status(lab, node)["attached"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["pod"] == pod).cloned())
        .unwrap_or(Value::Null)
}

#[test]
fn the_agent_watches_its_own_nodes_pods() {
    if !kubernetes("the_agent_watches_its_own_nodes_pods") {
        return;
    }
    let _one = one_at_a_time();
    let mut lab = kube_lab("host-gw", 2);
    let a = lab.add_pod("n1", "a", "").expect("a");
    lab.add_pod("n2", "b", "").expect("b");
    // n1 knows its pod from the API: labels, and only this node's pods
    let pod = format!("default/{}", Lab::pod_object("n1", "a"));
    wait_for("n1 lists its pod", Duration::from_secs(5), || {
        attached(&lab, "n1", &pod)["inApi"] == true
    });
    let row = attached(&lab, "n1", &pod);
    assert_eq!(row["ip"], a.ip.as_str(), "{row}");
    assert_eq!(row["labels"]["app"], "a", "{row}");
    assert_eq!(status(&lab, "n1")["apiPods"], 1, "n2's pod is not watched");
    // a label change reaches it
    lab.kubectl(&["label", "pod", &Lab::pod_object("n1", "a"), "tier=web"])
        .expect("label");
    wait_for("the new label", Duration::from_secs(2), || {
        attached(&lab, "n1", &pod)["labels"]["tier"] == "web"
    });
    // the Pod deleted in the API while still attached: said so
    lab.kubectl(&[
        "delete",
        "pod",
        &Lab::pod_object("n1", "a"),
        "--grace-period=0",
        "--force",
    ])
    .expect("delete pod");
    wait_for(
        "the deleted Pod shown as not listed",
        Duration::from_secs(2),
        || attached(&lab, "n1", &pod)["inApi"] == false,
    );
    assert_eq!(status(&lab, "n1")["apiPods"], 0);
    let table = exec::check(
        {
            let mut c = std::process::Command::new(lab.bin_dir().join("trellisctl"));
            c.args(["status", "--socket"]).arg(lab.status_socket("n1"));
            c
        },
        None,
        Duration::from_secs(10),
    )
    .expect("trellisctl status");
    assert!(
        table.contains(&pod) && table.contains("not listed on this node"),
        "{table}"
    );
}
