//! `throughput`: iperf3 TCP between pods on two nodes for each backend,
//! against node-to-node on the same underlay in the same lab, alternating
//! which goes first; the ratio is the median over runs of pod/node pairs
//! taken back to back. Pods attach in routed mode unless
//! `TRELLIS_BENCH_MODE=bridge`.

use anyhow::{bail, Context};
use std::process::Command;
use std::time::Duration;
use trellis_lab::{exec, netns, Lab, LabOptions};

fn iperf(
    lab: &Lab,
    client_ns: &str,
    server_ns: &str,
    server_ip: &str,
    seconds: usize,
) -> anyhow::Result<f64> {
    let mut srv = Command::new("iperf3");
    srv.args(["-s", "-1", "-B", server_ip]);
    srv.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut server = netns::spawn_in(Some(&netns::path(server_ns)), &mut srv)
        .context("start iperf3 -s (apt-get install iperf3)")?;
    // wait until it listens
    let mut ready = false;
    for _ in 0..200 {
        let ok = netns::within(&netns::path(server_ns), || {
            std::net::TcpStream::connect_timeout(
                &format!("{server_ip}:5201").parse().expect("addr"),
                Duration::from_millis(50),
            )
            .is_ok()
        })?;
        if ok {
            ready = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if !ready {
        let _ = server.kill();
        let _ = server.wait();
        bail!("iperf3 server in {server_ns} did not listen");
    }
    // the probe above used the server's one connection (-1): restart it
    let _ = server.wait();
    let mut server = netns::spawn_in(Some(&netns::path(server_ns)), &mut srv)?;
    std::thread::sleep(Duration::from_millis(100));
    let mut cli = Command::new("iperf3");
    cli.args(["-c", server_ip, "-t", &seconds.to_string(), "-J"]);
    let out = exec::run(
        cli,
        Some(&netns::path(client_ns)),
        &[],
        Duration::from_secs(seconds as u64 + 20),
    );
    let _ = server.kill();
    let _ = server.wait();
    let out = out?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.output.stdout).context("iperf3 -J output")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no bits_per_second in iperf3 output")?;
    let _ = lab;
    Ok(bps / 1e9)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs the benchmark and prints the result line.
pub fn run(runs: usize, seconds: usize) -> anyhow::Result<()> {
    let mut ratios = Vec::new();
    let mut detail = Vec::new();
    for backend in ["host-gw", "vxlan", "directrouting", "bgp"] {
        // node pair on one segment, except DirectRouting's other half: measured on L2 too
        let mut lab = Lab::create(LabOptions {
            nodes: 2,
            cluster: Some(trellis_lab::cluster_config(backend)?),
            ..Default::default()
        })?;
        let mode = std::env::var("TRELLIS_BENCH_MODE").unwrap_or_else(|_| "routed".into());
        let a = lab.add_pod("n1", "a", &mode)?;
        let b = lab.add_pod("n2", "b", &mode)?;
        let _ = a;
        let (pa, pb) = (lab.pod_ns("n1", "a"), lab.pod_ns("n2", "b"));
        let (na, nb) = (lab.ns("n1"), lab.ns("n2"));
        let n2_ip = lab.node("n2")?.ip.clone();
        // routes come from a watch (or BGP sessions): wait until they are in
        let ready = (0..100).any(|_| {
            lab.ping(&pa, &b.ip, 1).is_some() || {
                std::thread::sleep(std::time::Duration::from_millis(100));
                false
            }
        });
        anyhow::ensure!(ready, "{backend}: pods cannot reach each other");
        let (mut pod, mut node) = (Vec::new(), Vec::new());
        for i in 0..runs {
            // alternate which goes first
            if i % 2 == 0 {
                pod.push(iperf(&lab, &pa, &pb, &b.ip, seconds)?);
                node.push(iperf(&lab, &na, &nb, &n2_ip, seconds)?);
            } else {
                node.push(iperf(&lab, &na, &nb, &n2_ip, seconds)?);
                pod.push(iperf(&lab, &pa, &pb, &b.ip, seconds)?);
            }
        }
        // each pod run is paired with the node run next to it in time, so
        // slow drift of a noisy machine cancels out; the median of the pairs
        let pairs: Vec<f64> = pod.iter().zip(&node).map(|(p, n)| p / n).collect();
        let (p, n) = (median(pod), median(node));
        let r = median(pairs);
        detail.push(format!(
            "{backend}: pod {p:.2} Gbit/s, node {n:.2} Gbit/s (medians), paired ratio {r:.2}"
        ));
        ratios.push((backend, r));
        lab.destroy()?;
    }
    for d in &detail {
        eprintln!("{d}");
    }
    let get = |b: &str| {
        ratios
            .iter()
            .find(|(n, _)| *n == b)
            .map(|(_, r)| *r)
            .unwrap_or(0.0)
    };
    println!(
        "hostgw_ratio={:.2} vxlan_ratio={:.2} directrouting_ratio={:.2} bgp_ratio={:.2}",
        get("host-gw"),
        get("vxlan"),
        get("directrouting"),
        get("bgp")
    );
    Ok(())
}
