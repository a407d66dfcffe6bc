//! The cluster part of `trellisctl lab demo`: three nodes with etcd, a pod
//! on each, pod-to-pod across nodes for each backend, with the path the
//! kernel picks for every packet, and egress through masquerade.

use std::time::Duration;
use trellis_lab::{exec, Lab, LabOptions, INTERNET_IP};

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// `ip route get DST` in `ns`, as "via X dev Y".
fn route_get(ns: &str, dst: &str) -> String {
    let out = exec::ip(&["-n", ns, "-j", "route", "get", dst]).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let r = &v[0];
    match r["gateway"].as_str() {
        Some(gw) => format!("via {gw} dev {}", r["dev"].as_str().unwrap_or("?")),
        None => format!("dev {}", r["dev"].as_str().unwrap_or("?")),
    }
}

/// Runs one backend's cluster demo; returns the number of failed checks.
pub fn run(backend: &str, segments: usize) -> anyhow::Result<usize> {
    let what = match (backend, segments) {
        ("bgp", 2) => {
            "3 nodes on two L3 segments, BIRD on the router between them as route reflector"
        }
        ("bgp", _) => "3 nodes on one L2 segment, node-to-node BGP mesh",
        (_, 2) => "3 nodes on two L3 segments (n2 behind the router)",
        _ => "3 nodes on one L2 segment",
    };
    println!("\n== backend {backend}: {what}, etcd on the fabric ==");
    let router = backend == "bgp" && segments == 2;
    let mut lab = Lab::create(LabOptions {
        nodes: 3,
        segments,
        cluster: Some(trellis_lab::cluster_config(backend)?),
        bgp: router.then(|| trellis_lab::bird::SEGMENT_PEERS.to_string()),
        ..Default::default()
    })?;
    let bird = if router {
        Some(trellis_lab::bird::router(&lab, "")?)
    } else {
        None
    };
    println!(
        "{:<5} {:<14} {:<16} {:<16}",
        "node", "underlay", "leased subnet", "pod"
    );
    let nodes = lab.state().nodes.clone();
    let mut pods = Vec::new();
    for n in &nodes {
        // with bgp the agent's default (routed, as Calico) applies
        let mode = if backend == "bgp" { "" } else { "routed" };
        let p = lab.add_pod(&n.name, "web", mode)?;
        println!(
            "{:<5} {:<14} {:<16} {:<16}",
            n.name,
            n.ip,
            lab.node(&n.name)?.subnet,
            p.ip
        );
        pods.push((n.name.clone(), lab.pod_ns(&n.name, "web"), p.ip));
    }
    let mut failures = 0;
    println!(
        "\n{:<9} {:<14} {:>9}  path (the source node's route, then the wire)",
        "from", "to", "ping"
    );
    for (from_node, from_ns, _) in &pods {
        for (to_node, _, to_ip) in &pods {
            if from_node == to_node {
                continue;
            }
            let seg = |n: &str| {
                lab.node(n).map(|x| {
                    x.ip.rsplit_once('.')
                        .map(|(p, _)| p.to_string())
                        .unwrap_or_default()
                })
            };
            let reachable = backend != "host-gw" || seg(from_node)? == seg(to_node)?;
            if !reachable {
                println!(
                    "{:<9} {:<14} {:>9}  {from_node}: {}; not routed: host-gw needs one L2 segment (reported, no black-hole route)",
                    format!("{from_node}/web"),
                    to_ip,
                    "-",
                    route_get(&lab.ns(from_node), to_ip)
                );
                continue;
            }
            // routes appear within a second of a lease; allow for that
            let rtt = (0..20).find_map(|_| {
                lab.ping(from_ns, to_ip, 1).or_else(|| {
                    std::thread::sleep(Duration::from_millis(100));
                    None
                })
            });
            failures += usize::from(rtt.is_none());
            let hop = route_get(&lab.ns(from_node), to_ip);
            let to_underlay = lab.node(to_node)?.ip.clone();
            let wire = if hop.contains("trellis.1") {
                format!("VXLAN VNI 1 -> {to_underlay}:8472")
            } else if hop.contains(&to_underlay) {
                "plain IP on the underlay".to_string()
            } else if router && hop.contains(".1 dev") {
                "plain IP via the router (BIRD learned the route by BGP)".to_string()
            } else {
                "?".to_string()
            };
            println!(
                "{:<9} {:<14} {:>9}  {from_node}: {hop}; {wire}; {to_node}: dev tl* -> pod",
                format!("{from_node}/web"),
                to_ip,
                rtt.map(ms).unwrap_or_else(|| "FAIL".into()),
            );
        }
    }
    let log = std::fs::read_to_string(lab.agent_log("n1")).unwrap_or_default();
    if let Some(p) = log.lines().find(|l| l.contains("cannot reach")) {
        let msg = p.split("routing: ").nth(1).unwrap_or(p);
        println!("n1 reports: {msg}");
    }
    if backend == "bgp" {
        let st = crate::status::fetch(&lab.status_socket("n1"))?;
        println!("\nn1$ trellisctl bgp status");
        print!("{}", crate::bgp::render(&crate::bgp::section(&st)?));
        if let Some(b) = &bird {
            let routes = b.cmd(&["show", "route"])?;
            let learned = nodes.iter().filter(|n| routes.contains(&n.subnet)).count();
            println!(
                "router$ birdc show route: {learned} of {} pod subnets learned",
                nodes.len()
            );
        }
        let tunnels = exec::ip(&["-n", &lab.ns("n1"), "-d", "link"])?;
        let encap = tunnels.contains("vxlan") || tunnels.contains("ipip");
        failures += usize::from(encap);
        println!(
            "encapsulation on n1: {}",
            if encap { "FOUND (unexpected)" } else { "none" }
        );
    }
    let (n1, n1_ns, _) = &pods[0];
    match lab.tcp_exchange(n1_ns, &lab.internet_ns(), INTERNET_IP, 8000) {
        Ok(peer) => println!("egress: {n1}/web -> {INTERNET_IP} (outside the cluster) arrives from {} (the node, masqueraded)", peer.ip()),
        Err(e) => {
            failures += 1;
            println!("egress: FAIL {e}");
        }
    }
    drop(bird);
    lab.destroy()?;
    Ok(failures)
}
