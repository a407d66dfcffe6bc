//! The Services part of the Kubernetes demo: trellis as the Service proxy
//! (no kube-proxy anywhere), on the Services and EndpointSlices of the
//! real API server and controller manager. Every line is checked; a
//! mismatch prints FAIL and counts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use trellis_lab::{Lab, Outcome};

const WEB: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  selector: {app: web}
  ports:
    - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
    - {name: dns, port: 53, targetPort: 8080, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  selector: {app: nobody}
  ports: [{name: http, port: 80, targetPort: 8080}]
";

const T: Duration = Duration::from_secs(2);

fn programmed(lab: &Lab, node: &str, svc: &str) -> Option<usize> {
    let st = crate::status::fetch(&lab.status_socket(node)).ok()?;
    st.proxy?
        .services
        .into_iter()
        .find(|s| s.service == svc)
        .map(|s| s.ports.first().map(|p| p.endpoints.len()).unwrap_or(0))
}

fn wait_programmed(lab: &Lab, svc: &str, n: usize) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        if ["n1", "n2", "n3"]
            .iter()
            .all(|node| programmed(lab, node, svc) == Some(n))
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Who answered `n` tries, and how many did not.
fn spread(
    lab: &Lab,
    ns: &str,
    to: SocketAddr,
    udp: bool,
    n: usize,
) -> (BTreeMap<String, usize>, usize) {
    let mut by = BTreeMap::new();
    let mut failed = 0;
    for _ in 0..n {
        let o = if udp {
            lab.probe_udp(ns, to, 0, T)
        } else {
            lab.probe_tcp(ns, to, T)
        };
        match o.by() {
            Some(b) => *by.entry(b.to_string()).or_default() += 1,
            None => failed += 1,
        }
    }
    (by, failed)
}

fn show(by: &BTreeMap<String, usize>) -> String {
    by.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs the Services part on `lab` (web pods on n1..n3, label app: web).
pub fn run(lab: &mut Lab) -> anyhow::Result<usize> {
    println!("\n-- Services: trellis proxies them on nftables (no kube-proxy in this cluster) --");
    let mut failures = 0;
    let mut backends = Vec::new();
    for n in ["n1", "n2", "n3"] {
        backends.push(lab.serve(n, "web", 8080)?);
    }
    lab.add_pod("n1", "cli", "")?;
    let cli = lab.pod_ns("n1", "cli");
    lab.kubectl_stdin(&["apply", "-f", "-"], WEB)?;
    let ip = |name: &str| -> anyhow::Result<String> {
        Ok(lab
            .kubectl(&["get", "service", name, "-o", "jsonpath={.spec.clusterIP}"])?
            .trim()
            .to_string())
    };
    let (web, empty) = (ip("web")?, ip("empty")?);
    let t = Instant::now();
    let ok = wait_programmed(lab, "default/web", 3);
    failures += usize::from(!ok);
    println!(
        "$ kubectl apply: Service web {web} (3 endpoints from the EndpointSlice controller) programmed on n1, n2, n3 in {}",
        if ok { format!("{:.0} ms", t.elapsed().as_secs_f64() * 1e3) } else { "FAIL (not within 30 s)".into() }
    );
    let at = |ip: &str, port: u16| SocketAddr::new(ip.parse().unwrap_or([0, 0, 0, 0].into()), port);
    for (what, to, udp) in [("tcp", at(&web, 80), false), ("udp", at(&web, 53), true)] {
        let (by, failed) = spread(lab, &cli, to, udp, 30);
        let ok = by.len() == 3 && failed == 0;
        failures += usize::from(!ok);
        println!(
            "n1/cli -> {to} ({what}) x30: {}{}",
            show(&by),
            if ok {
                String::new()
            } else {
                format!("  FAIL ({failed} unanswered, {} backends)", by.len())
            }
        );
    }
    let n2 = lab.node("n2")?.ip.clone();
    match lab.probe_tcp(&lab.fabric_ns(), at(&n2, 30080), T) {
        Outcome::Answered { by, seen } => {
            // externalTrafficPolicy Cluster: masqueraded, the client's
            // address is not what the backend sees
            let masqueraded = seen.ip().to_string() != "192.0.2.1";
            failures += usize::from(!masqueraded);
            println!(
                "fabric (192.0.2.1) -> NodePort {n2}:30080: answered by {by}, which saw {seen} ({})",
                if masqueraded { "masqueraded: externalTrafficPolicy Cluster" } else { "FAIL: not masqueraded" }
            );
        }
        o => {
            failures += 1;
            println!("fabric -> NodePort {n2}:30080: FAIL ({o:?})");
        }
    }
    let t = Instant::now();
    let o = lab.probe_tcp(&cli, at(&empty, 80), T);
    let ok = o == Outcome::Refused;
    failures += usize::from(!ok);
    println!(
        "n1/cli -> {empty}:80 (Service without endpoints): {} in {:.1} ms{}",
        o.kind(),
        t.elapsed().as_secs_f64() * 1e3,
        if ok { "" } else { "  FAIL (want refused)" }
    );
    // a pod deleted: its endpoint leaves every node, nobody sends to it
    let t = Instant::now();
    lab.del_pod("n3", "web")?;
    let ok = wait_programmed(lab, "default/web", 2);
    let (by, failed) = spread(lab, &cli, at(&web, 80), false, 20);
    let ok = ok && failed == 0 && !by.contains_key("web-n3");
    failures += usize::from(!ok);
    println!(
        "$ kubectl delete pod web-n3: gone from every node's table in {:.0} ms; 20 connections: {}{}",
        t.elapsed().as_secs_f64() * 1e3,
        show(&by),
        if ok { "" } else { "  FAIL" }
    );
    println!("\n$ trellisctl get services -o wide   (n1)");
    match crate::status::fetch(&lab.status_socket("n1"))
        .and_then(|st| crate::services::section(&st))
    {
        Ok(p) => print!("{}", crate::services::render(&p, true)),
        Err(e) => {
            failures += 1;
            println!("FAIL: {e:#}");
        }
    }
    drop(backends);
    Ok(failures)
}
