//! The cluster part of `trellisctl lab demo`: three nodes with etcd, a pod
//! on each, pod-to-pod across nodes for each backend, with the path the
//! kernel picks for every packet, and egress through masquerade.
//!
//! Every line states only what was checked: a path is printed from the
//! kernel's route, the VXLAN remote from the node's FDB, the egress source
//! from what the outside host saw; a mismatch prints FAIL and counts.

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

/// What carries a packet whose route is `hop` (via the VXLAN device): the
/// node's FDB entry for the gateway's MAC names the remote VTEP, which must
/// be the target node; the device's VNI and port come from the kernel.
fn vxlan_remote(lab: &Lab, node: &str, hop: &str, to_underlay: &str) -> anyhow::Result<String> {
    let gw = hop.split_whitespace().nth(1).unwrap_or_default();
    let st = crate::status::fetch(&lab.status_socket(node))?;
    let mac = st
        .neighbours
        .iter()
        .find(|n| n.ip == gw)
        .map(|n| n.mac.clone());
    let remote = mac.and_then(|m| st.fdb.iter().find(|f| f.mac == m).map(|f| f.dst.clone()));
    let out = exec::ip(&["-n", &lab.ns(node), "-j", "-d", "link", "show", "trellis.1"])?;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let data = &v[0]["linkinfo"]["info_data"];
    let (vni, port) = (
        data["id"].as_u64().unwrap_or(0),
        data["port"].as_u64().unwrap_or(0),
    );
    Ok(match remote {
        Some(r) if r == to_underlay => format!("VXLAN VNI {vni} -> {r}:{port}"),
        Some(r) => format!("FAIL: VXLAN to {r}, expected {to_underlay}"),
        None => format!("FAIL: no FDB entry for the VTEP {gw}"),
    })
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
                // the claim: no route of ours to that subnet, and the agent reports why
                let to_underlay = lab.node(to_node)?.ip.clone();
                let to_subnet = lab.node(to_node)?.subnet.clone();
                // a node's record reaches the others within a second or so,
                // like its routes: allow for that, as the pings below do
                let deadline = std::time::Instant::now() + Duration::from_secs(3);
                let (st, routed, reported) = loop {
                    let st = crate::status::fetch(&lab.status_socket(from_node))?;
                    let routed = st.routes.iter().any(|r| r.dst == to_subnet);
                    let reported = st.problems.iter().any(|p| p.contains(&to_underlay));
                    if (!routed && reported) || std::time::Instant::now() > deadline {
                        break (st, routed, reported);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                };
                let ok = !routed && reported;
                failures += usize::from(!ok);
                println!(
                    "{:<9} {:<14} {:>9}  {from_node}: {}; not routed: host-gw needs one L2 segment ({})",
                    format!("{from_node}/web"),
                    to_ip,
                    "-",
                    route_get(&lab.ns(from_node), to_ip),
                    if ok {
                        "reported, no black-hole route".to_string()
                    } else {
                        format!(
                            "FAIL: route installed {routed}, problem reported {reported}; {from_node} knows {:?}, reports {:?}",
                            st.peers.iter().map(|p| &p.node).collect::<Vec<_>>(),
                            st.problems
                        )
                    }
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
                vxlan_remote(&lab, from_node, &hop, &to_underlay)?
            } else if hop.contains(&format!("via {to_underlay} ")) {
                "plain IP on the underlay".to_string()
            } else if router && hop.contains(".1 dev") {
                "plain IP via the router (BIRD learned the route by BGP)".to_string()
            } else {
                "FAIL: unexpected path".to_string()
            };
            failures += usize::from(wire.starts_with("FAIL"));
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
            failures += usize::from(learned != nodes.len());
            println!(
                "router$ birdc show route: {learned} of {} pod subnets learned{}",
                nodes.len(),
                if learned == nodes.len() {
                    ""
                } else {
                    " (FAIL)"
                }
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
    // NatOutgoing (on by default): egress leaves with the node's address
    let (n1, n1_ns, _) = &pods[0];
    let n1_ip = lab.node(n1)?.ip.clone();
    match lab.tcp_exchange(n1_ns, &lab.internet_ns(), INTERNET_IP, 8000) {
        Ok(peer) if peer.ip().to_string() == n1_ip => println!(
            "egress: {n1}/web -> {INTERNET_IP} (outside the cluster) arrives from {} (the node {n1}, masqueraded)",
            peer.ip()
        ),
        Ok(peer) => {
            failures += 1;
            println!(
                "egress: FAIL {n1}/web -> {INTERNET_IP} arrives from {}, not from the node ({n1_ip}): not masqueraded",
                peer.ip()
            );
        }
        Err(e) => {
            failures += 1;
            println!("egress: FAIL {e}");
        }
    }
    drop(bird);
    lab.destroy()?;
    Ok(failures)
}
