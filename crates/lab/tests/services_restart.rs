//! The proxy restarted with its table kept (an upgrade, a crash): the
//! journal says what the kernel holds, so the new agent applies only what
//! changed while it was down — no whole-table load — and serves it.

mod common;
use common::*;
use std::time::Duration;
use trellis_lab::Outcome;

const T: Duration = Duration::from_secs(2);

const A: &str = "apiVersion: v1
kind: Service
metadata: {name: a, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
";

const B: &str = "apiVersion: v1
kind: Service
metadata: {name: b, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 81, targetPort: 8080}]
";

/// `kind`'s count of proxy syncs in `node`'s metrics.
fn syncs(lab: &trellis_lab::Lab, node: &str, kind: &str) -> u64 {
    let (_, body) = agent_http(lab, node, "/metrics");
    body.lines()
        .find(|l| {
            l.starts_with("trellis_proxy_sync_duration_seconds_count")
                && l.contains(&format!("kind=\"{kind}\""))
        })
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_restarted_proxy_applies_only_what_changed_while_it_was_down() {
    if !kubernetes("a_restarted_proxy_applies_only_what_changed_while_it_was_down") {
        return;
    }
    let _one = one_at_a_time();
    let mut lab = kube_lab("vxlan", 2);
    let mut backends = Vec::new();
    for n in ["n1", "n2"] {
        lab.add_pod(n, "web", "").expect("web pod");
        backends.push(lab.serve(n, "web", 8080).expect("serve"));
    }
    lab.add_pod("n1", "cli", "").expect("client");
    let cli = lab.pod_ns("n1", "cli");
    lab.kubectl_stdin(&["apply", "-f", "-"], A)
        .expect("apply a");
    let a = cluster_ip(&lab, "a");
    wait_for("a answers", Duration::from_secs(30), || {
        lab.probe_tcp(&cli, sa(&a, 80), T).by().is_some()
    });
    assert!(
        syncs(&lab, "n1", "full") >= 1,
        "the first sync loads the table"
    );

    // down: b comes, a goes
    lab.stop_agent("n1").expect("stop n1's agent");
    lab.kubectl_stdin(&["apply", "-f", "-"], B)
        .expect("apply b");
    let b = cluster_ip(&lab, "b");
    lab.kubectl(&["delete", "service", "a"]).expect("delete a");
    // the table stayed: a is still served meanwhile (nothing removed it)
    assert!(lab.probe_tcp(&cli, sa(&a, 80), T).by().is_some());
    lab.start_agent("n1").expect("start n1's agent");

    wait_for(
        "b answers after the restart",
        Duration::from_secs(30),
        || lab.probe_tcp(&cli, sa(&b, 81), T).by().is_some(),
    );
    wait_for("a is gone", Duration::from_secs(30), || {
        !matches!(lab.probe_tcp(&cli, sa(&a, 80), T), Outcome::Answered { .. })
    });
    let log = std::fs::read_to_string(lab.agent_log("n1")).expect("log");
    assert!(
        log.contains("the table is the journal's; applying only what changed while down"),
        "the journal was not used:\n{}",
        log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    // its status shows every Service, also those that did not change
    let shown: Vec<String> = status(&lab, "n1")["proxy"]["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["service"].as_str().map(String::from))
        .collect();
    assert_eq!(shown, ["default/b", "default/kubernetes"]);
    // the new process never loaded the whole table
    assert_eq!(syncs(&lab, "n1", "full"), 0);
    assert!(syncs(&lab, "n1", "incremental") >= 1);
    drop(backends);
}
