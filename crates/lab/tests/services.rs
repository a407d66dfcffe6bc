//! Services through trellis's proxy, on the real control plane (API
//! server, controller manager's EndpointSlice controller), real nftables
//! and real traffic, with no kube-proxy anywhere.

mod common;
use common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use trellis_lab::{Lab, Outcome};

const T: Duration = Duration::from_secs(2);

/// Applies `yaml` and returns the Service's ClusterIP.
fn service(lab: &Lab, yaml: &str, name: &str) -> String {
    lab.kubectl_stdin(&["apply", "-f", "-"], yaml)
        .expect("apply service");
    let ip = lab
        .kubectl(&["get", "service", name, "-o", "jsonpath={.spec.clusterIP}"])
        .expect("clusterIP");
    ip.trim().to_string()
}

/// `node`'s proxy section of its status.
fn proxy(lab: &Lab, node: &str) -> Value {
    status(lab, node)["proxy"].clone()
}

/// Waits until every agent programmed `svc` with `n` endpoints on its
/// first port.
fn wait_endpoints(lab: &Lab, svc: &str, n: usize) {
    for node in lab.state().nodes.iter().map(|n| n.name.clone()) {
        wait_for(
            &format!("{node} programs {svc} with {n} endpoints"),
            Duration::from_secs(30),
            || {
                proxy(lab, &node)["services"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|s| s["service"] == svc)
                    .and_then(|s| s["ports"][0]["endpoints"].as_array().map(Vec::len))
                    == Some(n)
            },
        );
    }
}

/// Who answers `n` connections from `ns` to `to`.
fn answering(lab: &Lab, ns: &str, to: SocketAddr, udp: bool, n: usize) -> BTreeSet<String> {
    let mut by = BTreeSet::new();
    for _ in 0..n {
        let o = if udp {
            lab.probe_udp(ns, to, 0, T)
        } else {
            lab.probe_tcp(ns, to, T)
        };
        match o.by() {
            Some(b) => {
                by.insert(b.to_string());
            }
            None => panic!("{ns} -> {to} ({}): {o:?}", if udp { "udp" } else { "tcp" }),
        }
    }
    by
}

const WEB: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  selector: {app: web}
  externalIPs: [198.51.100.60]
  ports:
    - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
    - {name: dns, port: 53, targetPort: 8080, protocol: UDP}
";

const EMPTY: &str = "apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  selector: {app: nobody}
  ports: [{name: t, port: 80, targetPort: 8080}, {name: u, port: 81, targetPort: 8080, protocol: UDP}]
";

const LB: &str = "apiVersion: v1
kind: Service
metadata: {name: lb, namespace: default}
spec:
  type: LoadBalancer
  selector: {app: web}
  loadBalancerSourceRanges: [192.0.2.1/32]
  ports: [{name: http, port: 80, targetPort: 8080}]
";

#[test]
fn cluster_ip_node_port_external_and_load_balancer_addresses() {
    if !kubernetes("cluster_ip_node_port_external_and_load_balancer_addresses") {
        return;
    }
    let _one = one_at_a_time();
    let mut lab = kube_lab("vxlan", 3);
    let nodes = ["n1", "n2", "n3"];
    let mut backends = Vec::new();
    for n in nodes {
        lab.add_pod(n, "web", "").expect("web pod");
        lab.add_pod(n, "cli", "").expect("client pod");
        backends.push(lab.serve(n, "web", 8080).expect("serve"));
    }
    let ip = service(&lab, WEB, "web");
    let empty = service(&lab, EMPTY, "empty");
    wait_endpoints(&lab, "default/web", 3);
    let all: BTreeSet<String> = nodes.iter().map(|n| format!("web-{n}")).collect();
    // ClusterIP from pods on every node, TCP and UDP: every endpoint
    // answers within 60 connections
    for n in nodes {
        let cli = lab.pod_ns(n, "cli");
        assert_eq!(
            answering(&lab, &cli, sa(&ip, 80), false, 60),
            all,
            "tcp from {n}"
        );
        assert_eq!(
            answering(&lab, &cli, sa(&ip, 53), true, 60),
            all,
            "udp from {n}"
        );
    }
    // a pod keeps its own address towards a ClusterIP (no masquerade)
    let cli1 = lab.pod_ns("n1", "cli");
    let cli1_ip: std::net::IpAddr = lab.pod_ip("n1", "cli").expect("cli").parse().expect("ip");
    match lab.probe_tcp(&cli1, sa(&ip, 80), T) {
        Outcome::Answered { seen, .. } => assert_eq!(seen.ip(), cli1_ip),
        o => panic!("{o:?}"),
    }
    // hairpin: a backend reaching its own Service gets its replies,
    // including when it lands on itself
    let web1 = lab.pod_ns("n1", "web");
    let by = answering(&lab, &web1, sa(&ip, 80), false, 60);
    assert!(by.contains("web-n1"), "never landed on itself: {by:?}");
    // NodePort from a client on the fabric (192.0.2.1), on every node
    let fabric = lab.fabric_ns();
    for n in nodes {
        let node_ip = lab.node(n).expect("node").ip.clone();
        assert_eq!(
            answering(&lab, &fabric, sa(&node_ip, 30080), false, 60),
            all,
            "nodeport on {n}"
        );
    }
    // an external IP, routed to n1 by the fabric
    lab.exec(
        &fabric,
        &[
            "ip",
            "route",
            "replace",
            "198.51.100.60/32",
            "via",
            "192.0.2.11",
        ],
        T,
    )
    .expect("route external ip");
    assert_eq!(
        answering(&lab, &fabric, sa("198.51.100.60", 80), false, 60),
        all,
        "external ip"
    );
    // a LoadBalancer IP (status set as a cloud controller would), open to
    // 192.0.2.1 only: the "internet" host behind the fabric router is not
    service(&lab, LB, "lb");
    lab.kubectl(&[
        "patch",
        "service",
        "lb",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"loadBalancer":{"ingress":[{"ip":"198.51.100.70"}]}}}"#,
    ])
    .expect("lb status");
    lab.exec(
        &fabric,
        &[
            "ip",
            "route",
            "replace",
            "198.51.100.70/32",
            "via",
            "192.0.2.12",
        ],
        T,
    )
    .expect("route lb ip");
    wait_endpoints(&lab, "default/lb", 3);
    wait_for("the LB IP answers", Duration::from_secs(10), || {
        lab.probe_tcp(&fabric, sa("198.51.100.70", 80), T)
            .by()
            .is_some()
    });
    assert_eq!(
        answering(&lab, &fabric, sa("198.51.100.70", 80), false, 30),
        all,
        "lb ip"
    );
    // the internet host reaches the nodes (the same Service's node port
    // answers it), but not the LB IP: its source is outside the ranges
    let lb_np: u16 = lab
        .kubectl(&[
            "get",
            "service",
            "lb",
            "-o",
            "jsonpath={.spec.ports[0].nodePort}",
        ])
        .expect("lb node port")
        .trim()
        .parse()
        .expect("node port");
    let n2_ip = lab.node("n2").expect("n2").ip.clone();
    assert!(
        lab.probe_tcp(&lab.internet_ns(), sa(&n2_ip, lb_np), T)
            .by()
            .is_some(),
        "control: the internet host reaches n2's node port"
    );
    let outside = lab.probe_tcp(&lab.internet_ns(), sa("198.51.100.70", 80), T);
    assert_eq!(
        outside,
        Outcome::TimedOut,
        "outside loadBalancerSourceRanges"
    );
    // no endpoints: refused at once, TCP and UDP; an unserved port too
    for (to, udp) in [
        (sa(&empty, 80), false),
        (sa(&empty, 81), true),
        (sa(&ip, 8443), false),
    ] {
        let t0 = Instant::now();
        let o = if udp {
            lab.probe_udp(&cli1, to, 0, T)
        } else {
            lab.probe_tcp(&cli1, to, T)
        };
        assert_eq!(o, Outcome::Refused, "{to} udp={udp}");
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "{to}: refused after {:?}",
            t0.elapsed()
        );
    }
    // the kubernetes Service reaches the API server (through trellis: a Go
    // TLS server answers plain HTTP with a 400 that says so)
    let api = lab
        .kubectl(&[
            "get",
            "service",
            "kubernetes",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .expect("kubernetes service");
    // the API server's lease reconciler publishes its endpoint on its own
    // schedule: asked until it answers, at most 20 s
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let got = loop {
        match lab.http_get(&cli1, sa(api.trim(), 443), "/") {
            Ok(r) => break Ok(r),
            Err(e) if std::time::Instant::now() > deadline => break Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let (code, body) = got.unwrap_or_else(|e| {
        let slices = lab
            .kubectl(&["get", "endpointslices", "-A", "-o", "yaml"])
            .unwrap_or_default();
        panic!(
            "kubernetes service {api}: {e}\n{}\n{slices}",
            proxy(&lab, "n1")
        )
    });
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("HTTPS server"), "{body}");
    // trellisctl on the node: the Services as programmed, and what serves
    // one in the kernel with its counters
    let ctl = lab.bin_dir().join("trellisctl").display().to_string();
    let sock = lab.status_socket("n1").display().to_string();
    let run = |args: &[&str]| -> String {
        let mut a = vec![ctl.as_str()];
        a.extend_from_slice(args);
        a.extend_from_slice(&["--socket", &sock]);
        let t = lab
            .exec(&lab.ns("n1"), &a, Duration::from_secs(10))
            .expect("trellisctl");
        assert!(
            t.output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&t.output.stderr)
        );
        String::from_utf8_lossy(&t.output.stdout).to_string()
    };
    let wide = run(&["get", "services", "-o", "wide"]);
    for needle in [
        format!("{ip}:80/tcp"),
        "*:30080/tcp".into(),
        "198.51.100.60:80/tcp".into(),
    ] {
        assert!(wide.contains(&needle), "{needle} missing in\n{wide}");
    }
    assert!(
        wide.contains("default/empty") && wide.contains("reject"),
        "{wide}"
    );
    let web_eps = lab_pod_ip(&lab, "n2", "web");
    assert!(wide.contains(&format!("{web_eps}:8080")), "{wide}");
    let trace = run(&["trace", "svc", "default/web"]);
    assert!(trace.contains("chain svc-default/web/tcp/80"), "{trace}");
    // the endpoint choice as the kernel holds it: the chain's id -> the
    // pick chain for its number of endpoints, and the endpoint by index
    assert!(trace.contains("-> pickers: elements = {"), "{trace}");
    assert!(trace.contains(": goto pick-"), "{trace}");
    assert!(trace.contains(&format!(": {web_eps} . 8080")), "{trace}");
    assert!(
        trace.contains(&format!("{ip} . tcp . 80 : goto svc-default/web/tcp/80")),
        "{trace}"
    );
    let counted: u64 = trace
        .lines()
        .filter(|l| l.contains("counter packets"))
        .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok())
        .sum();
    assert!(counted > 0, "no packets counted:\n{trace}");
    let missing = lab
        .exec(
            &lab.ns("n1"),
            &[
                ctl.as_str(),
                "trace",
                "svc",
                "default/nope",
                "--socket",
                &sock,
            ],
            T,
        )
        .expect("exec");
    assert!(!missing.output.status.success());
    assert!(
        String::from_utf8_lossy(&missing.output.stderr).contains("default/nope is not programmed")
    );
    drop(backends);
}

const STICKY: &str = "apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}
  ports: [{name: http, port: 80, targetPort: 8080}]
";

const LOCAL: &str = "apiVersion: v1
kind: Service
metadata: {name: local, namespace: default}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {app: solo}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30090}]
";

const UDP: &str = "apiVersion: v1
kind: Service
metadata: {name: udp, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: dns, port: 53, targetPort: 8080, protocol: UDP}]
";

#[test]
fn affinity_local_policy_and_endpoints_that_go() {
    if !kubernetes("affinity_local_policy_and_endpoints_that_go") {
        return;
    }
    let _one = one_at_a_time();
    let mut lab = kube_lab("vxlan", 3);
    let nodes = ["n1", "n2", "n3"];
    let mut backends = Vec::new();
    for n in nodes {
        lab.add_pod(n, "web", "").expect("web pod");
        backends.push(lab.serve(n, "web", 8080).expect("serve"));
    }
    lab.add_pod("n1", "cli", "").expect("client");
    lab.add_pod("n2", "solo", "").expect("solo");
    backends.push(lab.serve("n2", "solo", 8080).expect("serve solo"));
    let cli = lab.pod_ns("n1", "cli");
    // ClientIP affinity: 20 connections from one client, one endpoint;
    // after the timeout the client may move
    let sticky = service(&lab, STICKY, "sticky");
    wait_endpoints(&lab, "default/sticky", 3);
    let first = answering(&lab, &cli, sa(&sticky, 80), false, 20);
    assert_eq!(first.len(), 1, "affinity broken: {first:?}");
    let mut moved = false;
    for _ in 0..12 {
        std::thread::sleep(Duration::from_millis(2300));
        let now = answering(&lab, &cli, sa(&sticky, 80), false, 1);
        if now != first {
            moved = true;
            break;
        }
    }
    assert!(moved, "never moved off {first:?} after the 2 s timeout");
    // externalTrafficPolicy Local: the backend (on n2 only) sees the
    // client's own address; n1 and n3 do not serve; the health check
    // answers 200 with 1 on n2, 503 with 0 elsewhere
    service(&lab, LOCAL, "local");
    wait_endpoints(&lab, "default/local", 1);
    let hc: u16 = lab
        .kubectl(&[
            "get",
            "service",
            "local",
            "-o",
            "jsonpath={.spec.healthCheckNodePort}",
        ])
        .expect("hc port")
        .trim()
        .parse()
        .expect("hc number");
    let fabric = lab.fabric_ns();
    let ip = |n: &str| lab.node(n).expect("node").ip.clone();
    match lab.probe_tcp(&fabric, sa(&ip("n2"), 30090), T) {
        Outcome::Answered { by, seen } => {
            assert_eq!(by, "solo-n2");
            assert_eq!(seen.ip().to_string(), "192.0.2.1", "client address kept");
        }
        o => panic!("ETP Local on n2: {o:?}"),
    }
    for n in ["n1", "n3"] {
        assert_eq!(
            lab.probe_tcp(&fabric, sa(&ip(n), 30090), T),
            Outcome::TimedOut,
            "{n}"
        );
    }
    wait_for("health check answers", Duration::from_secs(10), || {
        lab.http_get(&fabric, sa(&ip("n2"), hc), "/healthz").is_ok()
    });
    let (code, body) = lab
        .http_get(&fabric, sa(&ip("n2"), hc), "/healthz")
        .expect("hc n2");
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["localEndpoints"], 1, "{body}");
    assert_eq!(v["service"]["name"], "local", "{body}");
    let (code, body) = lab
        .http_get(&fabric, sa(&ip("n1"), hc), "/healthz")
        .expect("hc n1");
    assert_eq!((code, v_local(&body)), (503, 0), "{body}");
    // a pod on n1 still reaches the ETP Local Service through its node
    // port address (pod traffic goes to all endpoints, as kube-proxy)
    assert_eq!(
        lab.probe_tcp(&cli, sa(&ip("n1"), 30090), T).by(),
        Some("solo-n2")
    );
    // an endpoint removed: new connections stop going to it at once, and
    // a UDP flow to it (one source port, kept alive) moves on
    let udp = service(&lab, UDP, "udp");
    wait_endpoints(&lab, "default/udp", 3);
    let port = 40053;
    let hit = match lab.probe_udp(&cli, sa(&udp, 53), port, T) {
        Outcome::Answered { by, .. } => by,
        o => panic!("udp flow: {o:?}"),
    };
    let victim = hit.rsplit('-').next().expect("node").to_string();
    assert_eq!(
        lab.probe_udp(&cli, sa(&udp, 53), port, T).by(),
        Some(hit.as_str()),
        "flow sticks to its entry"
    );
    let victim_ip = lab_pod_ip(&lab, &victim, "web");
    let t0 = Instant::now();
    lab.del_pod(&victim, "web").expect("delete the pod");
    wait_for(
        "the endpoint leaves every agent",
        Duration::from_secs(15),
        || {
            nodes.iter().all(|n| {
                !proxy(&lab, n)["services"]
                    .to_string()
                    .contains(&format!("{victim_ip}:8080"))
            })
        },
    );
    let gone = t0.elapsed();
    let after = answering(&lab, &cli, sa(&sticky, 80), false, 30);
    assert!(!after.contains(&hit), "{hit} still answers: {after:?}");
    // the same UDP flow (same source port) is answered by another endpoint
    let moved = lab.probe_udp(&cli, sa(&udp, 53), port, T);
    assert!(
        moved.by().is_some_and(|b| b != hit),
        "UDP flow still held by the removed endpoint {hit}: {moved:?} ({gone:?} after the delete)"
    );
    drop(backends);
}

fn v_local(body: &str) -> i64 {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["localEndpoints"].as_i64())
        .unwrap_or(-1)
}

fn lab_pod_ip(lab: &Lab, node: &str, pod: &str) -> String {
    lab.pod_ip(node, pod).expect("pod")
}
