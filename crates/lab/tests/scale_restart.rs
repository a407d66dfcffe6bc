//! 50 concurrent ADDs and DELs; an agent restart under traffic.

mod common;
use common::*;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use trellis_lab::{exec, Lab};

#[test]
fn fifty_concurrent_adds_then_dels() {
    if !privileged("fifty_concurrent_adds_then_dels") {
        return;
    }
    let lab = lab(1);
    let conf = lab.netconf("n1", "bridge");
    let pods: Vec<String> = (0..50).map(|i| format!("p{i}")).collect();
    for p in &pods {
        exec::ip(&["netns", "add", &lab.pod_ns("n1", p)]).expect("netns");
    }
    let lab = Arc::new(lab);
    // every plugin call runs at once, each on its own thread
    let run_all = |command: &'static str| -> Vec<serde_json::Value> {
        let handles: Vec<_> = pods
            .iter()
            .cloned()
            .map(|p| {
                let lab = Arc::clone(&lab);
                let conf = conf.clone();
                std::thread::spawn(move || {
                    let t = lab.cni(command, "n1", &p, &conf).expect("run plugin");
                    assert!(
                        t.output.status.success(),
                        "{command} {p}: {}",
                        String::from_utf8_lossy(&t.output.stdout)
                    );
                    if command == "ADD" {
                        stdout_json(&t)
                    } else {
                        serde_json::Value::Null
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    };
    let results = run_all("ADD");
    let ips: HashSet<String> = results
        .iter()
        .map(|r| {
            r["ips"][0]["address"]
                .as_str()
                .expect("addr")
                .split('/')
                .next()
                .expect("ip")
                .to_string()
        })
        .collect();
    assert_eq!(ips.len(), 50, "50 distinct addresses");
    let lab_ref = &*lab;
    let node_ns = lab_ref.ns("n1");
    assert_eq!(pod_veths(&node_ns).len(), 50);
    assert_eq!(allocations(lab_ref, "n1").len(), 50);
    for ip in &ips {
        assert!(
            lab_ref.ping(&node_ns, ip, 1).is_some(),
            "pod {ip} unreachable"
        );
    }
    // pod to pod across the bridge, a sample
    assert_ping(
        lab_ref,
        &lab_ref.pod_ns("n1", "p0"),
        ips.iter().next().expect("ip"),
    );
    run_all("DEL");
    assert!(
        pod_veths(&node_ns).is_empty(),
        "links left: {:?}",
        pod_veths(&node_ns)
    );
    assert!(allocations(&lab, "n1").is_empty());
}

fn live_ips(lab: &Lab) -> Vec<String> {
    lab.state()
        .pods
        .iter()
        .map(|p| p.ip.split('/').next().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn agent_restart_keeps_traffic_and_allocations() {
    if !privileged("agent_restart_keeps_traffic_and_allocations") {
        return;
    }
    let mut lab = lab(1);
    let a = lab.add_pod("n1", "a", "bridge").expect("a");
    let b = lab.add_pod("n1", "b", "routed").expect("b");
    let before = allocations(&lab, "n1");
    let a_ns = lab.pod_ns("n1", "a");
    // a ping stream a -> b across the restart: 150 packets, 20 ms apart,
    // flowing before the agent stops
    let mut stream = lab
        .ping_stream(&a_ns, &b.ip, 150, Duration::from_millis(20))
        .expect("ping stream");
    stream
        .wait_first_reply(Duration::from_secs(5))
        .expect("first reply");
    lab.stop_agent("n1").expect("stop");
    // the agent stays down for a while (15 packets' worth), not an instant
    std::thread::sleep(Duration::from_millis(300));
    lab.start_agent("n1").expect("start");
    let (sent, received) = stream.finish(Duration::from_secs(30)).expect("ping");
    assert_eq!((sent, received), (150, 150), "packets lost across restart");
    assert_eq!(allocations(&lab, "n1"), before, "allocations survive");
    // new ADDs never reuse a live address; CHECK of old pods still passes
    for i in 0..5 {
        let p = lab
            .add_pod("n1", &format!("c{i}"), "bridge")
            .expect("add after restart");
        assert!(p.ip != a.ip && p.ip != b.ip, "live ip reused: {}", p.ip);
    }
    let ips = live_ips(&lab);
    assert_eq!(ips.iter().collect::<HashSet<_>>().len(), ips.len());
    let t = lab
        .cni("CHECK", "n1", "a", &lab.netconf("n1", "bridge"))
        .expect("check");
    assert!(
        t.output.status.success(),
        "CHECK after restart: {}",
        String::from_utf8_lossy(&t.output.stdout)
    );
    assert_ping(&lab, &a_ns, &b.ip);
}
