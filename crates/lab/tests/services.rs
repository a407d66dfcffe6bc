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

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("ip"), port)
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
    let cli1_ip: std::net::IpAddr = lab
        .state()
        .pods
        .iter()
        .find(|p| p.node == "n1" && p.name == "cli")
        .map(|p| {
            p.ip.split('/')
                .next()
                .unwrap_or_default()
                .parse()
                .expect("ip")
        })
        .expect("cli");
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
    let (code, body) = lab
        .http_get(&cli1, sa(api.trim(), 443), "/")
        .unwrap_or_else(|e| {
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
    drop(backends);
}
