//! `trellisctl lab demo`: a one-node lab with pods in both attach modes.

use std::time::{Duration, Instant};
use trellis_lab::{Lab, LabOptions};

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Runs the demo; the lab is removed when it ends, also on failure.
pub fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    println!("== trellis demo: one node, pods in bridge and routed mode ==\n");
    let mut lab = Lab::create(LabOptions {
        nodes: 1,
        ..Default::default()
    })?;
    let n = lab.node("n1")?.clone();
    println!(
        "lab {}: node n1 in netns {} (underlay {} on the fabric), pod subnet {}, agent log {}",
        lab.id(),
        lab.ns("n1"),
        n.ip,
        n.subnet,
        lab.agent_log("n1").display()
    );
    println!("\n-- attach (real `trellis` CNI plugin -> trellisd over its unix socket) --");
    println!("{:<6} {:<8} {:<18} {:>10}", "pod", "mode", "address", "ADD");
    let pods = [
        ("b1", "bridge"),
        ("b2", "bridge"),
        ("r1", "routed"),
        ("r2", "routed"),
    ];
    let mut ips = Vec::new();
    for (pod, mode) in pods {
        let a = lab.add_pod("n1", pod, mode)?;
        println!(
            "{:<6} {:<8} {:<18} {:>10}",
            pod,
            mode,
            a.address,
            ms(a.took)
        );
        ips.push((pod, mode, a.ip));
    }
    println!("\n-- ping (3 packets) and a TCP echo between every pair --");
    println!(
        "{:<6} {:<6} {:<16} {:>10} {:>8}",
        "from", "to", "target", "ping avg", "tcp"
    );
    let mut failures = 0;
    let mut port = 7000;
    for (from, _, from_ip) in &ips {
        for (to, _, ip) in &ips {
            if from == to {
                continue;
            }
            port += 1;
            let rtt = lab.ping(&lab.pod_ns("n1", from), ip, 3);
            // the echo must come back, and the server must see the pod's own address
            let tcp =
                match lab.tcp_exchange(&lab.pod_ns("n1", from), &lab.pod_ns("n1", to), ip, port) {
                    Ok(peer) if peer.ip().to_string() == *from_ip => "ok".to_string(),
                    Ok(peer) => format!("FAIL (source seen as {})", peer.ip()),
                    Err(_) => "FAIL".to_string(),
                };
            failures += usize::from(rtt.is_none()) + usize::from(tcp != "ok");
            println!(
                "{:<6} {:<6} {:<16} {:>10} {:>8}",
                from,
                to,
                ip,
                rtt.map(ms).unwrap_or_else(|| "FAIL".into()),
                tcp
            );
        }
    }
    println!("\n-- node <-> pod --");
    for (pod, mode, ip) in &ips {
        let to_pod = lab.ping(&lab.ns("n1"), ip, 3);
        let to_node = lab.ping(&lab.pod_ns("n1", pod), &n.ip, 3);
        failures += usize::from(to_pod.is_none()) + usize::from(to_node.is_none());
        println!(
            "node -> {pod:<3} ({mode:<6}) {:>10}    {pod:<3} -> node {:>10}",
            to_pod.map(ms).unwrap_or_else(|| "FAIL".into()),
            to_node.map(ms).unwrap_or_else(|| "FAIL".into())
        );
    }
    println!("\n-- detach (CNI DEL) --");
    for (pod, _, _) in &ips {
        let took = lab.del_pod("n1", pod)?;
        println!("{pod:<6} {:>10}", ms(took));
    }
    let id = lab.id().to_string();
    lab.destroy()?;
    println!("\nlab {id} torn down");
    // across nodes: each backend, and the L3 case where it matters
    for (backend, segments) in [
        ("vxlan", 1),
        ("host-gw", 1),
        ("directrouting", 2),
        ("host-gw", 2),
        ("bgp", 1),
        ("bgp", 2),
    ] {
        failures += crate::cluster_demo::run(backend, segments)?;
    }
    failures += crate::kube_demo::run()?;
    println!("\ndemo took {:.1} s", started.elapsed().as_secs_f64());
    if failures > 0 {
        anyhow::bail!("{failures} check(s) failed");
    }
    println!("all checks passed");
    Ok(())
}
