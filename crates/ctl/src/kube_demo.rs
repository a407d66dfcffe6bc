//! The Kubernetes part of `trellisctl lab demo`: the real v1.36.2 API
//! server and controller manager in the lab, three nodes registered as
//! Nodes, agents running with the DaemonSet's ServiceAccount, Pod objects
//! attached by the real plugin, pods talking across nodes, Services through
//! trellis's proxy (`svc_demo.rs`), NetworkPolicy and ClusterNetworkPolicy
//! (`policy_demo.rs`), a Node deleted.
//!
//! As in the other parts, every line states what was checked: podCIDRs
//! against what each agent serves, Pod IPs against the attachments, the
//! agents' rights against the API server's own answer (`kubectl auth
//! can-i`); a mismatch prints FAIL and counts.

use std::time::{Duration, Instant};
use trellis_lab::{Lab, LabOptions};

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Runs the Kubernetes-mode demo; returns the number of failed checks.
pub fn run() -> anyhow::Result<usize> {
    println!(
        "\n== Kubernetes mode: the real API server and controller manager (v1.36.2), \
         3 nodes, vxlan; the lab plays the kubelet =="
    );
    let bin = match trellis_lab::k8s::bin_dir() {
        Ok(b) => b,
        Err(e) => {
            println!("FAIL: cannot run Kubernetes mode: {e:#}");
            return Ok(1);
        }
    };
    println!("Kubernetes binaries: {}", bin.display());
    let mut lab = Lab::create(LabOptions {
        nodes: 3,
        kubernetes: Some(trellis_lab::cluster_config("vxlan")?),
        ..Default::default()
    })?;
    let mut failures = 0;
    let nodes: serde_json::Value =
        serde_json::from_str(&lab.kubectl(&["get", "nodes", "-o", "json"])?)?;
    println!(
        "\n$ kubectl get nodes (podCIDR from kube-controller-manager; the rest written by trellis)"
    );
    println!(
        "{:<5} {:<14} {:<16} {:<9} {:<20} agent serves",
        "node", "internalIP", "podCIDR", "backend", "NetworkUnavailable"
    );
    let items = nodes["items"].as_array().cloned().unwrap_or_default();
    if items.len() != 3 {
        failures += 1;
        println!("FAIL: the API server lists {} nodes, not 3", items.len());
    }
    for n in &items {
        let name = n["metadata"]["name"].as_str().unwrap_or_default();
        let cidr = n["spec"]["podCIDR"].as_str().unwrap_or_default();
        let ann = &n["metadata"]["annotations"];
        let cond = n["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "NetworkUnavailable"))
            .and_then(|c| c["status"].as_str())
            .unwrap_or("-");
        let serves = crate::status::fetch(&lab.status_socket(name))?.subnet;
        let internal = n["status"]["addresses"]
            .as_array()
            .and_then(|a| a.iter().find(|a| a["type"] == "InternalIP"))
            .and_then(|a| a["address"].as_str())
            .unwrap_or("-");
        let ok = serves == cidr
            && cond == "False"
            && ann["trellis.dev/public-ip"].as_str() == Some(internal);
        failures += usize::from(!ok);
        println!(
            "{:<5} {:<14} {:<16} {:<9} {:<20} {serves}{}",
            name,
            internal,
            cidr,
            ann["trellis.dev/backend-type"].as_str().unwrap_or("-"),
            cond,
            if ok { "" } else { "  FAIL" }
        );
    }
    // the agents' rights, as the API server answers them
    let sa = "system:serviceaccount:trellis-system:trellis";
    let mut rights = Vec::new();
    for (verb, what, want) in [
        ("patch", "nodes/status", "yes"),
        ("watch", "nodes", "yes"),
        ("patch", "nodes", "no"),
        ("watch", "pods", "yes"),
        ("delete", "pods", "no"),
        ("list", "secrets", "no"),
    ] {
        // a SubjectAccessReview: the API server's RBAC decides
        let (resource, sub) = what.split_once('/').unwrap_or((what, ""));
        let review = serde_json::json!({
            "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": sa,
                     "groups": ["system:serviceaccounts", "system:serviceaccounts:trellis-system", "system:authenticated"],
                     "resourceAttributes": {"verb": verb, "resource": resource, "subresource": sub}},
        });
        let got = match lab
            .kubectl_stdin(
                &["create", "-o", "jsonpath={.status.allowed}", "-f", "-"],
                &review.to_string(),
            )
            .map(|s| s.trim().to_string())
        {
            Ok(a) if a == "true" => "yes".to_string(),
            Ok(a) if a == "false" || a.is_empty() => "no".to_string(),
            Ok(a) => format!("? ({a})"),
            Err(e) => format!("? ({e})"),
        };
        failures += usize::from(got != want);
        rights.push(format!(
            "{verb} {what}: {got}{}",
            if got == want { "" } else { " FAIL" }
        ));
    }
    println!("\nagents run as {sa}: {}", rights.join(", "));
    println!("\nPods (bound to nodes; attached by the real plugin with the kubelet's CNI_ARGS; podIP as the API server has it)");
    let mut pods = Vec::new();
    for n in ["n1", "n2", "n3"] {
        let a = lab.add_pod(n, "web", "")?;
        let obj = Lab::pod_object(n, "web");
        let ip = lab.kubectl(&["get", "pod", &obj, "-o", "jsonpath={.status.podIP}"])?;
        let ok = ip.trim() == a.ip;
        failures += usize::from(!ok);
        println!(
            "{obj:<10} {n:<4} {:<14} ADD {}{}",
            ip.trim(),
            ms(a.took),
            if ok {
                ""
            } else {
                "  FAIL (attached elsewhere)"
            }
        );
        pods.push((n, lab.pod_ns(n, "web"), a.ip));
    }
    println!("\n{:<9} {:<14} {:>9}", "from", "to", "ping");
    for (from, from_ns, _) in &pods {
        for (to, _, ip) in &pods {
            if from == to {
                continue;
            }
            let rtt = (0..20).find_map(|_| {
                lab.ping(from_ns, ip, 1).or_else(|| {
                    std::thread::sleep(Duration::from_millis(100));
                    None
                })
            });
            failures += usize::from(rtt.is_none());
            println!(
                "{:<9} {:<14} {:>9}",
                format!("{from}/web"),
                ip,
                rtt.map(ms).unwrap_or_else(|| "FAIL".into())
            );
        }
    }
    failures += crate::svc_demo::run(&mut lab)?;
    failures += crate::policy_demo::run(&lab)?;
    // a Node deleted: every other node drops its route
    let n3 = lab.node("n3")?.subnet.clone();
    anyhow::ensure!(
        !n3.is_empty() && lab.routes("n1")?.contains(&n3),
        "n1 has no route to n3's subnet {n3:?} to begin with"
    );
    let t = Instant::now();
    lab.kubectl(&["delete", "node", "n3", "--wait=false"])?;
    let gone = loop {
        if !lab.routes("n1")?.contains(&n3) && !lab.routes("n2")?.contains(&n3) {
            break Some(t.elapsed());
        }
        if t.elapsed() > Duration::from_secs(5) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    failures += usize::from(gone.is_none());
    println!(
        "\n$ kubectl delete node n3: the route to {n3} gone from n1 and n2 in {}",
        gone.map(ms)
            .unwrap_or_else(|| "FAIL (still there after 5 s)".into())
    );
    lab.destroy()?;
    Ok(failures)
}
