//! NetworkPolicy and ClusterNetworkPolicy in a Kubernetes-mode lab: the
//! upstream `Netpol` probe matrix (namespaces x, y, z; pods a, b, c over
//! two nodes; TCP and UDP 80 and 81; every pod probing every pod), each
//! scenario's expectation from the independent model of
//! `common::netpol`, never from trellis. SCTP: the kernel here has no SCTP
//! sockets (`CONFIG_IP_SCTP` unset), so no SCTP server can answer; the
//! render tests check SCTP rules load and the model tests that they do
//! not match TCP.

mod common;
use common::netpol::World;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;
use trellis_lab::Outcome;

const CONVERGE: Duration = Duration::from_secs(10);

/// The control plane's lock, a 2-node Kubernetes lab and its world of
/// namespaces, pods and servers; `None` when `test` cannot run here.
fn world(test: &str) -> Option<(std::sync::MutexGuard<'static, ()>, trellis_lab::Lab, World)> {
    if !kubernetes(test) {
        return None;
    }
    let one = one_at_a_time();
    let mut lab = kube_lab("vxlan", 2);
    let w = World::build(&mut lab);
    Some((one, lab, w))
}

fn np(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

fn cnp(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
           "metadata": {"name": name}, "spec": spec})
}

#[test]
fn network_policies_match_the_model() {
    let Some((_one, lab, mut w)) = world("network_policies_match_the_model") else {
        return;
    };
    w.check(&lab, "no policy", CONVERGE);

    // default deny ingress in x
    w.apply(
        &lab,
        np(
            "x",
            "deny-in",
            json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        ),
    );
    w.check(&lab, "default-deny-ingress", CONVERGE);
    // the pod's own node always reaches it (kubelet probes)
    let xa = w.pod("x", "a").clone();
    let node_ns = lab.ns(&xa.node);
    assert!(
        matches!(
            lab.probe_tcp(&node_ns, sa(&xa.ip.to_string(), 80), Duration::from_secs(2)),
            Outcome::Answered { .. }
        ),
        "the node reaches its pod under default deny"
    );
    // the drops are counted per policy in /metrics
    let series = r#"trellis_policy_denied_packets_total{tier="NetworkPolicy",policy="x/deny-in"}"#;
    wait_for("denials counted", Duration::from_secs(10), || {
        metric(&agent_http(&lab, &xa.node, "/metrics").1, series).is_some_and(|n| n > 0.0)
    });
    // and logged (the lab sets kubernetes.policy.logDenied): a probe from
    // y/b to x/a on TCP 81 is named with its ports and policy, in
    // /policy/denials and by trellisctl
    let yb = w.pod("y", "b").ip;
    let _ = lab.probe_tcp(
        &lab.pod_ns(&w.pod("y", "b").node, &w.pod("y", "b").lab),
        sa(&xa.ip.to_string(), 81),
        Duration::from_millis(500),
    );
    wait_for("the denial logged", Duration::from_secs(10), || {
        let v: Value = serde_json::from_str(&agent_http(&lab, &xa.node, "/policy/denials").1)
            .unwrap_or_default();
        v.as_array().into_iter().flatten().any(|d| {
            d["src"] == yb.to_string()
                && d["dst"] == xa.ip.to_string()
                && d["proto"] == "tcp"
                && d["dport"] == 81
                && d["tier"] == "NetworkPolicy"
                && d["policy"] == "x/deny-in"
        })
    });
    let mut c = std::process::Command::new(lab.bin_dir().join("trellisctl"));
    c.args(["policy", "denials"]);
    let text = trellis_lab::exec::check(
        c,
        Some(&trellis_lab::netns::path(&lab.ns(&xa.node))),
        Duration::from_secs(10),
    )
    .expect("trellisctl policy denials");
    let want = format!(" -> {}:81/tcp  denied by NetworkPolicy x/deny-in", xa.ip);
    assert!(
        text.lines()
            .any(|l| l.contains(&format!("{yb}:")) && l.ends_with(&want)),
        "{text}"
    );
    // allow x/a from pods b of the same namespace, on TCP 80 only
    w.apply(
        &lab,
        np(
            "x",
            "a-from-b",
            json!({
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}],
                     "ports": [{"port": 80}]}]}),
        ),
    );
    w.check(&lab, "podSelector in the same namespace", CONVERGE);
    // the trace names what decided, from the table x/a's node loaded
    let trace = |src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr, port: &str| -> String {
        let mut c = std::process::Command::new(lab.bin_dir().join("trellisctl"));
        c.args(["policy", "trace", &src.to_string(), &dst.to_string(), port]);
        trellis_lab::exec::check(
            c,
            Some(&trellis_lab::netns::path(&lab.ns(&xa.node))),
            Duration::from_secs(10),
        )
        .expect("trellisctl policy trace")
    };
    let (xb, ya) = (w.pod("x", "b").ip, w.pod("y", "a").ip);
    let t = trace(xb, xa.ip, "80/tcp");
    assert!(
        t.starts_with("ALLOWED") && t.contains("NetworkPolicy x/a-from-b rule 0"),
        "{t}"
    );
    let t = trace(ya, xa.ip, "81/tcp");
    assert!(
        t.starts_with("DENIED") && t.contains("x/a-from-b,x/deny-in"),
        "{t}"
    );
    // namespaceSelector only, and pod AND namespace in one peer
    w.apply(
        &lab,
        np(
            "x",
            "from-y",
            json!({
        "podSelector": {"matchLabels": {"pod": "b"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
        ),
    );
    w.apply(
        &lab,
        np(
            "x",
            "c-from-z-a",
            json!({
        "podSelector": {"matchLabels": {"pod": "c"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}},
                               "podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
        ),
    );
    w.check(&lab, "namespaceSelector; pod AND namespace", CONVERGE);
    // matchExpressions, named ports, UDP only, endPort
    w.apply(&lab, np("y", "exprs", json!({
        "podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "b"]}]},
        "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                        {"key": "ns", "operator": "NotIn", "values": ["x"]}]}}],
                     "ports": [{"protocol": "TCP", "port": "serve-81-tcp"},
                               {"protocol": "UDP", "port": 80, "endPort": 81}]}]})));
    w.check(&lab, "matchExpressions, named port, endPort, UDP", CONVERGE);
    // labels change: a pod's and a namespace's
    w.label_pod(&lab, "x", "b", "pod", Some("bb"));
    w.label_namespace(&lab, "z", "ns", Some("zz"));
    w.check(&lab, "pod and namespace labels updated", CONVERGE);
    w.label_pod(&lab, "x", "b", "pod", Some("b"));
    w.label_namespace(&lab, "z", "ns", Some("z"));
    // egress: deny all from z, then allow to a CIDR with an exception and
    // to the kubernetes.io/metadata.name of y
    let yb = w.pod("y", "b").ip;
    w.apply(&lab, np("z", "egress", json!({
        "podSelector": {}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": [format!("{yb}/32")]}}],
                    "ports": [{"port": 81}]},
                   {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}],
                    "ports": [{"protocol": "UDP", "port": "serve-80-udp"}]}]})));
    w.check(
        &lab,
        "egress to a CIDR with except, named egress port",
        CONVERGE,
    );
    // a policy updated, then all deleted: enforcement stops
    w.apply(
        &lab,
        np(
            "x",
            "deny-in",
            json!({"podSelector": {"matchLabels": {"pod": "c"}},
        "policyTypes": ["Ingress", "Egress"]}),
        ),
    );
    w.check(&lab, "policy updated", CONVERGE);
    w.clear(&lab);
    w.check(&lab, "every policy deleted", CONVERGE);
}

#[test]
fn cluster_network_policy_tiers_match_the_model() {
    let Some((_one, lab, mut w)) = world("cluster_network_policy_tiers_match_the_model") else {
        return;
    };
    // Baseline: deny ingress from z everywhere
    w.apply(
        &lab,
        cnp(
            "base-deny-z",
            json!({"tier": "Baseline", "priority": 10,
        "subject": {"namespaces": {}},
        "ingress": [{"action": "Deny", "from": [{"namespaces": {"matchLabels": {"ns": "z"}}}]}]}),
        ),
    );
    w.check(&lab, "baseline deny", CONVERGE);
    // a NetworkPolicy in x: the baseline no longer applies there
    w.apply(
        &lab,
        np(
            "x",
            "allow-80",
            json!({"podSelector": {},
        "ingress": [{"ports": [{"port": 80}, {"protocol": "UDP", "port": 80}]}]}),
        ),
    );
    w.check(&lab, "NetworkPolicy over the baseline", CONVERGE);
    // Admin: deny y -> x on TCP 80 first (priority 1), pass z (priority 5),
    // accept everything to x on 81 (priority 9)
    w.apply(
        &lab,
        cnp(
            "adm-deny",
            json!({"tier": "Admin", "priority": 1,
        "subject": {"namespaces": {"matchLabels": {"ns": "x"}}},
        "ingress": [{"name": "no-y-80", "action": "Deny",
                     "from": [{"namespaces": {"matchLabels": {"ns": "y"}}}],
                     "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]}]}),
        ),
    );
    w.apply(
        &lab,
        cnp(
            "adm-pass",
            json!({"tier": "Admin", "priority": 5,
        "subject": {"namespaces": {"matchLabels": {"ns": "x"}}},
        "ingress": [{"action": "Pass", "from": [{"namespaces": {"matchLabels": {"ns": "z"}}}]}]}),
        ),
    );
    w.apply(&lab, cnp("adm-accept", json!({"tier": "Admin", "priority": 9,
        "subject": {"pods": {"namespaceSelector": {"matchLabels": {"ns": "x"}}, "podSelector": {}}},
        "ingress": [{"action": "Accept",
                     "from": [{"pods": {"namespaceSelector": {}, "podSelector": {}}}],
                     "protocols": [{"tcp": {"destinationPort": {"range": {"start": 81, "end": 82}}}},
                                   {"destinationNamedPort": "serve-81-udp"}]}]})));
    w.check(
        &lab,
        "admin deny, pass, accept over NetworkPolicy and baseline",
        CONVERGE,
    );
    // Admin egress: deny x -> the y network on UDP
    let net = format!("{}/32", w.pod("y", "c").ip);
    w.apply(&lab, cnp("adm-egress", json!({"tier": "Admin", "priority": 2,
        "subject": {"namespaces": {"matchLabels": {"ns": "x"}}},
        "egress": [{"action": "Deny", "to": [{"networks": [net]}],
                    "protocols": [{"udp": {"destinationPort": {"range": {"start": 80, "end": 81}}}}]}]})));
    w.check(&lab, "admin egress to a network", CONVERGE);
    w.clear(&lab);
    w.check(&lab, "all deleted", CONVERGE);
}

#[test]
fn stacked_and_combined_policies_match_the_model() {
    let Some((_one, lab, mut w)) = world("stacked_and_combined_policies_match_the_model") else {
        return;
    };
    // default deny all in y, then an allow-all ingress beside it: the
    // union allows every ingress, egress stays denied
    w.apply(
        &lab,
        np(
            "y",
            "deny-all",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        ),
    );
    w.check(&lab, "default-deny all", CONVERGE);
    w.apply(
        &lab,
        np(
            "y",
            "allow-all-in",
            json!({"podSelector": {}, "ingress": [{}]}),
        ),
    );
    w.check(&lab, "allow-all ingress stacked on deny-all", CONVERGE);
    w.clear(&lab);
    // OR of a pod peer and a namespace peer; two stacked policies on x/a
    // (TCP 80 from y, UDP 81 from x/c); several pod AND namespace peers
    w.apply(
        &lab,
        np(
            "x",
            "a-or",
            json!({
        "podSelector": {"matchLabels": {"pod": "b"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "c"}}},
                              {"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]}),
        ),
    );
    w.apply(
        &lab,
        np(
            "x",
            "a-from-y-80",
            json!({
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                     "ports": [{"protocol": "TCP", "port": 80}]}]}),
        ),
    );
    w.apply(
        &lab,
        np(
            "x",
            "a-from-c-udp",
            json!({
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "c"}}}],
                     "ports": [{"protocol": "UDP", "port": 81}]}]}),
        ),
    );
    w.apply(&lab, np("x", "c-pairs", json!({
        "podSelector": {"matchLabels": {"pod": "c"}},
        "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "a"}}},
            {"namespaceSelector": {"matchLabels": {"ns": "z"}}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]})));
    w.check(
        &lab,
        "OR of peers, stacked policies, several pod AND namespace peers",
        CONVERGE,
    );
    // ingress and egress in one policy
    w.apply(
        &lab,
        np(
            "z",
            "both",
            json!({
        "podSelector": {"matchLabels": {"pod": "b"}},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}}],
                     "ports": [{"protocol": "TCP", "port": 80}]}],
        "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                    "ports": [{"protocol": "UDP", "port": 80}, {"protocol": "TCP", "port": 81}]}]}),
        ),
    );
    w.check(&lab, "ingress and egress together", CONVERGE);
    w.clear(&lab);
    // the Baseline tier's egress: deny y -> z on UDP, allow the rest;
    // a NetworkPolicy selecting y/a takes it over for that pod
    w.apply(&lab, cnp("base-egress", json!({"tier": "Baseline", "priority": 3,
        "subject": {"namespaces": {"matchLabels": {"ns": "y"}}},
        "egress": [{"action": "Deny", "to": [{"namespaces": {"matchLabels": {"ns": "z"}}}],
                    "protocols": [{"udp": {"destinationPort": {"range": {"start": 80, "end": 81}}}}]}]})));
    w.check(&lab, "baseline egress deny", CONVERGE);
    w.apply(
        &lab,
        np(
            "y",
            "a-out-80",
            json!({
        "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
        "egress": [{"ports": [{"protocol": "UDP", "port": 80}]}]}),
        ),
    );
    w.check(&lab, "NetworkPolicy egress over the baseline", CONVERGE);
    // the Admin tier's egress over both, in priority order: Pass y -> z
    // UDP 80 first (1), then deny y -> z entirely (2). UDP 80 falls
    // through to y/a's NetworkPolicy (allowed) or, for y/b and y/c, to the
    // Baseline (denied); the rest of y -> z, TCP included, is denied
    w.apply(
        &lab,
        cnp(
            "adm-pass-out",
            json!({"tier": "Admin", "priority": 1,
        "subject": {"namespaces": {"matchLabels": {"ns": "y"}}},
        "egress": [{"action": "Pass", "to": [{"namespaces": {"matchLabels": {"ns": "z"}}}],
                    "protocols": [{"udp": {"destinationPort": {"number": 80}}}]}]}),
        ),
    );
    w.apply(
        &lab,
        cnp(
            "adm-deny-out",
            json!({"tier": "Admin", "priority": 2,
        "subject": {"namespaces": {"matchLabels": {"ns": "y"}}},
        "egress": [{"action": "Deny", "to": [{"namespaces": {"matchLabels": {"ns": "z"}}}]}]}),
        ),
    );
    w.check(
        &lab,
        "admin egress: pass to the NetworkPolicy and to the baseline, then deny",
        CONVERGE,
    );
    w.clear(&lab);
    w.check(&lab, "all deleted", CONVERGE);
}

#[test]
fn a_new_pod_is_policed_from_its_first_packet() {
    let Some((_one, mut lab, mut w)) = world("a_new_pod_is_policed_from_its_first_packet") else {
        return;
    };
    w.apply(
        &lab,
        np(
            "x",
            "deny-egress",
            json!({"podSelector": {}, "policyTypes": ["Egress"]}),
        ),
    );
    w.check(&lab, "default deny egress in x", CONVERGE);
    // a new pod of x: its first packet, sent the moment ADD returns, is
    // already dropped
    let target = w.pod("y", "a").clone();
    let spec = trellis_lab::PodSpec {
        namespace: "x".into(),
        name: "new".into(),
        labels: [("pod".to_string(), "new".to_string())].into(),
        ports: vec![],
    };
    lab.add_pod_as("n1", "xnew", "", Some(&spec))
        .expect("new pod");
    let ns = lab.pod_ns("n1", "xnew");
    let first = lab.probe_udp(
        &ns,
        sa(&target.ip.to_string(), 80),
        0,
        Duration::from_secs(1),
    );
    assert_eq!(
        first,
        Outcome::TimedOut,
        "the first packet of a new pod under default-deny egress"
    );
    // and a pod of y is open at once
    let spec = trellis_lab::PodSpec {
        namespace: "y".into(),
        name: "new".into(),
        labels: [("pod".to_string(), "new".to_string())].into(),
        ports: vec![],
    };
    lab.add_pod_as("n1", "ynew", "", Some(&spec))
        .expect("new pod");
    let ns = lab.pod_ns("n1", "ynew");
    assert!(matches!(
        lab.probe_udp(
            &ns,
            sa(&target.ip.to_string(), 80),
            0,
            Duration::from_secs(2)
        ),
        Outcome::Answered { .. }
    ));
}

/// An echo server on `port` in lab pod `pod` of `node`, one connection.
fn echo_server(
    lab: &trellis_lab::Lab,
    node: &str,
    pod: &str,
    port: u16,
) -> std::thread::JoinHandle<()> {
    use std::io::{Read, Write};
    let ns = trellis_lab::netns::path(&lab.pod_ns(node, pod));
    let l = trellis_lab::netns::within(&ns, || std::net::TcpListener::bind(("0.0.0.0", port)))
        .expect("enter pod")
        .expect("listen");
    std::thread::spawn(move || {
        let Ok((mut s, _)) = l.accept() else { return };
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        let mut buf = [0u8; 64];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    })
}

/// One round trip on `c` within `wait`.
fn echoes(c: &mut std::net::TcpStream, wait: Duration) -> bool {
    use std::io::{Read, Write};
    let _ = c.set_read_timeout(Some(wait));
    if c.write_all(b"ping").is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).is_ok() && &buf == b"ping"
}

#[test]
fn established_connections_survive_unrelated_changes_and_stop_when_denied() {
    let Some((_one, lab, mut w)) =
        world("established_connections_survive_unrelated_changes_and_stop_when_denied")
    else {
        return;
    };
    let (xa, ya) = (w.pod("x", "a").clone(), w.pod("y", "a").clone());
    assert_ne!(xa.node, ya.node, "across nodes");
    let server = echo_server(&lab, &xa.node, &xa.lab, 7000);
    let ns = trellis_lab::netns::path(&lab.pod_ns(&ya.node, &ya.lab));
    let to = sa(&xa.ip.to_string(), 7000);
    let mut c = trellis_lab::netns::within(&ns, || {
        std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))
    })
    .expect("enter pod")
    .expect("connect");
    assert!(
        echoes(&mut c, Duration::from_secs(2)),
        "the connection works"
    );
    // an unrelated policy (z isolated) and one that still allows y -> x/a
    w.apply(
        &lab,
        np(
            "z",
            "deny-in",
            json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        ),
    );
    w.apply(
        &lab,
        np(
            "x",
            "allow-y",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
        ),
    );
    w.check(&lab, "allowed", CONVERGE);
    assert!(
        echoes(&mut c, Duration::from_secs(2)),
        "survives the unrelated and the allowing change"
    );
    // now y -> x/a is denied: the established connection stops within 1 s
    let t0 = std::time::Instant::now();
    w.apply(
        &lab,
        np(
            "x",
            "allow-y",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]}),
        ),
    );
    let mut stopped = None;
    while t0.elapsed() < Duration::from_secs(5) {
        if !echoes(&mut c, Duration::from_millis(150)) {
            stopped = Some(t0.elapsed());
            break;
        }
    }
    let stopped = stopped.expect("the denied connection goes on");
    assert!(
        stopped <= Duration::from_secs(1),
        "stopped after {stopped:?}"
    );
    // and it does not come back
    let mut buf = [0u8; 16];
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    let late = std::io::Read::read(&mut c, &mut buf);
    assert!(
        !matches!(late, Ok(n) if n > 0),
        "an echo came through after the cut: {late:?}"
    );
    w.check(&lab, "denied", CONVERGE);
    drop(c);
    drop(server);
}
