//! The proxy restarted with its table kept (an upgrade, a crash): the
//! journal says what the kernel holds, so the new agent applies only what
//! changed while it was down — no whole-table load — and serves it. After
//! a clean stop its watches resume from the watch snapshot instead of
//! listing; a snapshot whose resourceVersion the API server no longer has,
//! or a damaged one, makes it list, with the same outcome.

mod common;
use common::*;
use std::time::Duration;
use trellis_lab::Outcome;

const T: Duration = Duration::from_secs(2);

/// A Service `name` of the web pods on `port`.
fn service(name: &str, port: u16) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: {port}, targetPort: 8080}}]
"
    )
}

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

/// Compacts the lab's etcd at its current revision.
fn compact_etcd(lab: &trellis_lab::Lab) {
    let ns = lab.etcd_ns();
    let ep = ["--endpoints", "http://127.0.0.1:2379"];
    let out = lab
        .exec(
            &ns,
            &["etcdctl", ep[0], ep[1], "endpoint", "status", "-w", "json"],
            Duration::from_secs(10),
        )
        .expect("etcdctl endpoint status");
    let status: serde_json::Value =
        serde_json::from_slice(&out.output.stdout).expect("etcdctl's JSON");
    let rev = status[0]["Status"]["header"]["revision"]
        .as_i64()
        .expect("a revision");
    let out = lab
        .exec(
            &ns,
            &["etcdctl", ep[0], ep[1], "compact", &rev.to_string()],
            Duration::from_secs(10),
        )
        .expect("etcdctl compact");
    assert!(
        out.output.status.success(),
        "etcdctl compact {rev}: {}{}",
        String::from_utf8_lossy(&out.output.stdout),
        String::from_utf8_lossy(&out.output.stderr)
    );
    eprintln!(
        "compacted etcd at revision {rev}: {}",
        String::from_utf8_lossy(&out.output.stdout).trim()
    );
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
    lab.kubectl_stdin(&["apply", "-f", "-"], &service("a", 80))
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
    lab.kubectl_stdin(&["apply", "-f", "-"], &service("b", 81))
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
    let tail = || log.lines().rev().take(30).collect::<Vec<_>>().join("\n");
    assert!(
        log.contains("the table is the journal's; applying only what changed while down"),
        "the journal was not used:\n{}",
        tail()
    );
    // a clean stop saved the watches; the start resumed both from it
    assert!(log.contains("saved the watch snapshot"), "{}", tail());
    assert_eq!(
        log.matches("starting from the watch snapshot").count(),
        2,
        "Services and EndpointSlices resume:\n{}",
        tail()
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

    // a snapshot from too long ago: the watches list again
    lab.stop_agent("n1").expect("stop n1's agent");
    let snap = lab.dir().join("n1-data/watch.snapshot");
    let text = std::fs::read_to_string(&snap).expect("the stop saved a snapshot");
    let old: Vec<String> = text
        .lines()
        .map(|l| match l.split('\t').collect::<Vec<_>>().as_slice() {
            ["kind", id, _, count] => format!("kind\t{id}\t1\t{count}"),
            _ => l.to_string(),
        })
        .collect();
    std::fs::write(&snap, old.join("\n") + "\n").expect("age the snapshot");
    lab.kubectl_stdin(&["apply", "-f", "-"], &service("c", 82))
        .expect("apply c");
    let c = cluster_ip(&lab, "c");
    lab.kubectl(&["delete", "service", "b"]).expect("delete b");
    // etcd forgets the history before now, as the API server's periodic
    // compaction does, and the API server restarts (its watch cache
    // starts at the current revision): revision 1 can no longer be
    // watched from
    compact_etcd(&lab);
    lab.stop_apiserver().expect("stop the API server");
    lab.start_apiserver().expect("start the API server");
    lab.start_agent("n1").expect("start n1's agent");
    wait_for("c answers", Duration::from_secs(30), || {
        lab.probe_tcp(&cli, sa(&c, 82), T).by().is_some()
    });
    wait_for("b is gone", Duration::from_secs(30), || {
        !matches!(lab.probe_tcp(&cli, sa(&b, 81), T), Outcome::Answered { .. })
    });
    let log = std::fs::read_to_string(lab.agent_log("n1")).expect("log");
    assert_eq!(
        log.matches("the API server no longer has this resourceVersion; listing")
            .count(),
        2,
        "both watches list:\n{}",
        log.lines()
            .filter(|l| l.contains("trellis_kube") || l.contains("proxy"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(!snap.exists(), "a snapshot is used once");

    // a damaged snapshot is reported and not used
    lab.stop_agent("n1").expect("stop n1's agent");
    let text = std::fs::read_to_string(&snap).expect("the stop saved a snapshot");
    std::fs::write(&snap, &text[..text.len() / 2]).expect("cut the snapshot");
    lab.kubectl_stdin(&["apply", "-f", "-"], &service("d", 83))
        .expect("apply d");
    let d = cluster_ip(&lab, "d");
    lab.start_agent("n1").expect("start n1's agent");
    wait_for("d answers", Duration::from_secs(30), || {
        lab.probe_tcp(&cli, sa(&d, 83), T).by().is_some()
    });
    let log = std::fs::read_to_string(lab.agent_log("n1")).expect("log");
    assert!(
        log.contains("watch snapshot not used; listing everything"),
        "{}",
        log.lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
    assert!(lab.probe_tcp(&cli, sa(&c, 82), T).by().is_some());
    drop(backends);
}
