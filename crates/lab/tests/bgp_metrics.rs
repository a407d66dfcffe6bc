//! The agent's metrics and readiness under the bgp backend: live values
//! after traffic, after a failed ADD and after a session flap.

mod common;
use common::bgp::*;
use common::*;
use std::time::Duration;
use trellis_lab::exec;

#[test]
fn metrics_and_readiness_follow_traffic_and_a_session_flap() {
    if !privileged("metrics_and_readiness_follow_traffic_and_a_session_flap") {
        return;
    }
    let mut lab = bgp_lab(Datastore::Etcd, 2, 1, None);
    let p = pods(&mut lab);
    wait_established(&lab, "n1", 1);
    reach_all(&lab, &p);
    assert_eq!(agent_http(&lab, "n1", "/healthz").0, "HTTP/1.0 200 OK");
    let (ready, why) = agent_http(&lab, "n1", "/readyz");
    assert_eq!(ready, "HTTP/1.0 200 OK", "{why}");
    let n2_ip = lab.node("n2").expect("n2").ip.clone();
    let peer = format!("peer=\"{n2_ip}\",kind=\"mesh\"");
    let m = agent_http(&lab, "n1", "/metrics").1;
    let v = |m: &str, s: &str| metric(m, s).unwrap_or_else(|| panic!("{s} missing in\n{m}"));
    assert_eq!(
        v(
            &m,
            r#"trellis_cni_requests_total{command="ADD",result="ok",code="0"}"#
        ),
        1.0
    );
    assert_eq!(
        v(
            &m,
            r#"trellis_cni_request_duration_seconds_count{command="ADD",result="ok",code="0"}"#
        ),
        1.0
    );
    assert_eq!(v(&m, r#"trellis_bgp_sessions{state="Established"}"#), 1.0);
    assert_eq!(
        v(&m, &format!("trellis_bgp_routes_received{{{peer}}}")),
        1.0
    );
    assert_eq!(
        v(&m, &format!("trellis_bgp_routes_accepted{{{peer}}}")),
        1.0
    );
    assert_eq!(
        v(&m, &format!("trellis_bgp_routes_advertised{{{peer}}}")),
        1.0
    );
    assert_eq!(
        v(&m, &format!("trellis_bgp_session_established{{{peer}}}")),
        1.0
    );
    assert!(v(&m, r#"trellis_reconciler_runs_total{reconciler="routes"}"#) >= 1.0);
    assert!(
        v(
            &m,
            r#"trellis_reconciler_last_success_timestamp_seconds{reconciler="nftables"}"#
        ) > 1.6e9
    );
    // a lease keep-alive goes out every third of the lab's 4 s TTL
    wait_for("a lease renewal", Duration::from_secs(5), || {
        metric(
            &agent_http(&lab, "n1", "/metrics").1,
            r#"trellis_lease_renewals_total{result="ok"}"#,
        )
        .is_some_and(|x| x >= 1.0)
    });
    // a failed ADD is counted with its CNI code
    // (the node's own namespace as CNI_NETNS: refused by the agent, code 4)
    let node_ns = trellis_lab::netns::path(&lab.ns("n1"))
        .to_string_lossy()
        .into_owned();
    let env: Vec<(String, String)> = lab
        .cni_env("ADD", "n1", "nope")
        .into_iter()
        .map(|(k, v)| {
            if k == "CNI_NETNS" {
                (k, node_ns.clone())
            } else {
                (k, v)
            }
        })
        .collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let bad = lab
        .cni_raw("n1", &env, lab.netconf("n1", "routed").as_bytes())
        .expect("plugin ran");
    assert!(!bad.output.status.success());
    let m = agent_http(&lab, "n1", "/metrics").1;
    assert_eq!(
        v(
            &m,
            r#"trellis_cni_requests_total{command="ADD",result="error",code="4"}"#
        ),
        1.0
    );
    // the session flaps: n2's agent restarts
    lab.stop_agent("n2").expect("stop");
    lab.start_agent("n2").expect("start");
    wait_for(
        "the session is back, counted twice",
        Duration::from_secs(20),
        || {
            let m = agent_http(&lab, "n1", "/metrics").1;
            metric(&m, &format!("trellis_bgp_session_established{{{peer}}}")) == Some(2.0)
                && metric(&m, r#"trellis_bgp_sessions{state="Established"}"#) == Some(1.0)
        },
    );
    // and the CLI reads the same agent in every output form
    for out in ["table", "json", "yaml"] {
        let mut c = std::process::Command::new(lab.bin_dir().join("trellisctl"));
        c.args(["status", "-o", out, "--socket"])
            .arg(lab.status_socket("n1"));
        let text = exec::check(c, None, Duration::from_secs(10)).expect("trellisctl status");
        assert!(text.contains(&n2_ip), "{out}: {text}");
    }
    let mut c = std::process::Command::new(lab.bin_dir().join("trellisctl"));
    c.args(["status", "-o", "xml", "--socket", "/nonexistent"]);
    let t = exec::run(c, None, &[], Duration::from_secs(10)).expect("run");
    assert!(!t.output.status.success());
    let err = String::from_utf8_lossy(&t.output.stderr);
    assert!(
        err.contains("possible values") && err.contains("yaml"),
        "{err}"
    );
    assert!(
        !err.contains("not reachable"),
        "checked before the socket: {err}"
    );
}
