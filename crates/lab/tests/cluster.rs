//! Cluster networking across nodes: every backend on an L2 lab, the L3 lab,
//! joins and deaths, restarts, etcd outages, drift repair and egress.

mod common;
use common::*;
use std::time::{Duration, Instant};
use trellis_lab::{exec, Lab, LabOptions, INTERNET_IP};

fn cluster_lab(backend: &str, nodes: usize, segments: usize) -> Lab {
    Lab::create(LabOptions {
        nodes,
        segments,
        cluster: Some(trellis_lab::cluster_config(backend).expect("backend")),
        ..Default::default()
    })
    .expect("cluster lab")
}

/// One pod per node; returns (node, pod ns, pod ip).
fn pods(lab: &mut Lab, mode: &str) -> Vec<(String, String, String)> {
    let names: Vec<String> = lab.state().nodes.iter().map(|n| n.name.clone()).collect();
    names
        .into_iter()
        .map(|n| {
            let p = lab.add_pod(&n, "p", mode).expect("add pod");
            (n.clone(), lab.pod_ns(&n, "p"), p.ip)
        })
        .collect()
}

fn wait_ping(lab: &Lab, from: &str, to: &str) {
    wait_for(&format!("{from} -> {to}"), Duration::from_secs(10), || {
        lab.ping(from, to, 1).is_some()
    });
}

fn full_mesh(lab: &Lab, pods: &[(String, String, String)]) {
    for (_, from, _) in pods {
        for (_, _, ip) in pods {
            wait_ping(lab, from, ip);
        }
    }
    // TCP across nodes, the source address seen by the receiver is the pod's
    let (a, b) = (&pods[0], &pods[1]);
    let peer = lab.tcp_exchange(&a.1, &b.1, &b.2, 7100).expect("tcp");
    assert_eq!(
        peer.ip().to_string(),
        a.2,
        "pod source address kept across nodes"
    );
}

fn backend_on_l2(backend: &str) {
    let mut lab = cluster_lab(backend, 3, 1);
    let p = pods(&mut lab, "bridge");
    full_mesh(&lab, &p);
    let r = routes(&lab, "n1");
    let has_vxlan = exec::ip(&["-n", &lab.ns("n1"), "link"])
        .expect("link")
        .contains("trellis.1");
    // the agent's status agrees with the kernel
    // the backend's MTU reaches the pods without any manual step
    let mtu = ip_json(&p[0].1, &["link", "show", "eth0"])[0]["mtu"]
        .as_u64()
        .expect("mtu");
    assert_eq!(
        mtu,
        if backend == "host-gw" { 1500 } else { 1450 },
        "{backend}"
    );
    let st = status(&lab, "n1");
    assert_eq!(st["peers"].as_array().expect("peers").len(), 2, "{st}");
    assert_eq!(st["routes"].as_array().expect("routes").len(), 2, "{st}");
    let vx = if backend == "vxlan" { 2 } else { 0 };
    assert_eq!(st["fdb"].as_array().expect("fdb").len(), vx, "{st}");
    assert_eq!(
        st["neighbours"].as_array().expect("neigh").len(),
        vx,
        "{st}"
    );
    match backend {
        "vxlan" => assert!(r.contains("dev trellis.1") && has_vxlan, "{r}"),
        // same segment: plain routes, and host-gw makes no VXLAN device at all
        "host-gw" => assert!(
            r.contains("via 192.0.2.1") && !r.contains("trellis.1") && !has_vxlan,
            "{r}"
        ),
        "directrouting" => assert!(
            r.contains("dev eth0") && !r.contains("dev trellis.1"),
            "{r}"
        ),
        _ => unreachable!(),
    }
}

#[test]
fn vxlan_l2() {
    if privileged("vxlan_l2") {
        backend_on_l2("vxlan");
    }
}

#[test]
fn host_gw_l2() {
    if privileged("host_gw_l2") {
        backend_on_l2("host-gw");
    }
}

#[test]
fn directrouting_l2() {
    if privileged("directrouting_l2") {
        backend_on_l2("directrouting");
    }
}

#[test]
fn l3_underlay() {
    if !privileged("l3_underlay") {
        return;
    }
    // n1, n3 on 192.0.2.0/24; n2 on 198.51.100.0/24; the fabric routes between
    for backend in ["vxlan", "directrouting"] {
        let mut lab = cluster_lab(backend, 3, 2);
        let p = pods(&mut lab, "routed");
        full_mesh(&lab, &p);
        let r = routes(&lab, "n1");
        let n2 = lab.node("n2").expect("n2").subnet.clone();
        let n3 = lab.node("n3").expect("n3").subnet.clone();
        assert!(
            r.lines()
                .any(|l| l.starts_with(&n2) && l.contains("dev trellis.1")),
            "{backend}: {r}"
        );
        if backend == "directrouting" {
            assert!(
                r.lines()
                    .any(|l| l.starts_with(&n3) && l.contains("via 192.0.2.13 dev eth0")),
                "{r}"
            );
        }
    }
    // host-gw: the peer on the other segment is reported, not black-holed
    let mut lab = cluster_lab("host-gw", 3, 2);
    let p = pods(&mut lab, "bridge");
    wait_ping(&lab, &p[0].1, &p[2].2);
    let n2 = lab.node("n2").expect("n2").subnet.clone();
    let r = routes(&lab, "n1");
    assert!(
        !r.contains(&n2),
        "a broken route to {n2} was installed: {r}"
    );
    let log = std::fs::read_to_string(lab.agent_log("n1")).expect("log");
    assert!(
        log.contains("198.51.100.12") && log.contains("host-gw cannot reach"),
        "not reported"
    );
}

#[test]
fn join_within_a_second_and_death_withdraws() {
    if !privileged("join_within_a_second_and_death_withdraws") {
        return;
    }
    let mut lab = cluster_lab("vxlan", 2, 1);
    let n3 = lab.add_node().expect("add node");
    // the lease exists before the agent serves; n1 must route to it within 1 s
    let started = Instant::now();
    let subnet = lab.node(&n3).expect("n3").subnet.clone();
    wait_for("n1 routes to the new node", Duration::from_secs(1), || {
        routes(&lab, "n1").contains(&subnet)
    });
    let joined_in = started.elapsed();
    let p = pods(&mut lab, "bridge");
    full_mesh(&lab, &p);
    // agent killed: its lease expires (TTL 4 s) and the others withdraw
    let pid = lab.node(&n3).expect("n3").agent_pid.expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    wait_for(
        "route to a dead node withdrawn",
        Duration::from_secs(10),
        || !routes(&lab, "n1").contains(&subnet),
    );
    eprintln!("new node routed {joined_in:?} after its agent served");
}

#[test]
fn decommission_releases_at_once() {
    if !privileged("decommission_releases_at_once") {
        return;
    }
    let mut lab = cluster_lab("host-gw", 3, 1);
    let subnet = lab.node("n3").expect("n3").subnet.clone();
    wait_for("n1 routes to n3", Duration::from_secs(5), || {
        routes(&lab, "n1").contains(&subnet)
    });
    let out = lab.decommission("n3").expect("decommission");
    assert!(out.contains(&format!("released {subnet}")), "{out}");
    // far sooner than the 4 s lease TTL
    wait_for(
        "route to a decommissioned node withdrawn",
        Duration::from_millis(1500),
        || !routes(&lab, "n1").contains(&subnet),
    );
    let key = format!("/trellis/v1/subnets/{}", subnet.replace('/', "-"));
    assert!(
        lab.etcdctl(&["get", &key]).expect("get").trim().is_empty(),
        "claim still in etcd"
    );
}

#[test]
fn agent_restart_loses_no_packet() {
    restart_under_ping(Datastore::Etcd, "agent_restart_loses_no_packet");
}

#[test]
fn agent_restart_loses_no_packet_in_kubernetes_mode() {
    restart_under_ping(
        Datastore::Kubernetes,
        "agent_restart_loses_no_packet_in_kubernetes_mode",
    );
}

fn restart_under_ping(ds: Datastore, test: &str) {
    let Some(_running) = ds.runs(test) else {
        return;
    };
    let mut lab = Lab::create(LabOptions {
        nodes: 2,
        ..ds.cluster("vxlan")
    })
    .expect("cluster lab");
    let p = pods(&mut lab, "routed");
    full_mesh(&lab, &p);
    let mut stream = lab
        .ping_stream(&p[0].1, &p[1].2, 500, Duration::from_millis(20))
        .expect("ping stream");
    // the restarts happen while packets flow, not before the first one
    stream
        .wait_first_reply(Duration::from_secs(5))
        .expect("first reply");
    for node in ["n1", "n2"] {
        lab.stop_agent(node).expect("stop");
        lab.start_agent(node).expect("start");
    }
    // the restarted agents finish joining and syncing while packets still
    // flow (a resync that flapped a route would show as loss)
    for node in ["n1", "n2"] {
        wait_for(
            &format!("{node} ready again"),
            Duration::from_secs(8),
            || agent_http(&lab, node, "/readyz").0.contains("200"),
        );
    }
    let (sent, received) = stream.finish(Duration::from_secs(30)).expect("ping");
    assert_eq!((sent, received), (500, 500), "loss across restarts");
}

#[test]
fn drift_is_repaired() {
    if !privileged("drift_is_repaired") {
        return;
    }
    let mut lab = cluster_lab("vxlan", 2, 1);
    let p = pods(&mut lab, "bridge");
    full_mesh(&lab, &p);
    let ns = lab.ns("n1");
    let n2 = lab.node("n2").expect("n2").clone();
    let vtep = n2.subnet.replace("/24", "").to_string();
    exec::ip(&["-n", &ns, "route", "del", &n2.subnet]).expect("del route");
    exec::ip(&["-n", &ns, "neigh", "del", &vtep, "dev", "trellis.1"]).expect("del neigh");
    let fdb = exec::check(
        {
            let mut c = std::process::Command::new("bridge");
            c.args(["-n", &ns, "fdb", "show", "dev", "trellis.1"]);
            c
        },
        None,
        Duration::from_secs(5),
    )
    .expect("fdb");
    let line = fdb
        .lines()
        .find(|l| l.contains(&n2.ip))
        .expect("fdb entry")
        .to_string();
    let mac = line.split_whitespace().next().expect("mac").to_string();
    let mut del = std::process::Command::new("bridge");
    del.args([
        "-n",
        &ns,
        "fdb",
        "del",
        &mac,
        "dev",
        "trellis.1",
        "dst",
        &n2.ip,
    ]);
    exec::check(del, None, Duration::from_secs(5)).expect("del fdb");
    wait_for("drift repaired", Duration::from_secs(10), || {
        lab.ping(&p[0].1, &p[1].2, 1).is_some()
    });
    assert!(routes(&lab, "n1").contains(&n2.subnet));
}

#[test]
fn etcd_outage_keeps_the_datapath() {
    if !privileged("etcd_outage_keeps_the_datapath") {
        return;
    }
    let mut lab = cluster_lab("vxlan", 2, 1);
    let p = pods(&mut lab, "bridge");
    full_mesh(&lab, &p);
    lab.stop_etcd().expect("stop etcd");
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        assert!(
            lab.ping(&p[0].1, &p[1].2, 1).is_some(),
            "datapath broke while etcd was down"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    lab.start_etcd().expect("start etcd");
    // the agents resynchronise without restart: a node joining now is routed
    let n3 = lab.add_node().expect("node after outage");
    let subnet = lab.node(&n3).expect("n3").subnet.clone();
    wait_for(
        "n1 learns the new node after the outage",
        Duration::from_secs(15),
        || routes(&lab, "n1").contains(&subnet),
    );
    assert!(lab.ping(&p[0].1, &p[1].2, 1).is_some());
}

#[test]
fn egress_is_masqueraded_pod_to_pod_is_not() {
    if !privileged("egress_is_masqueraded_pod_to_pod_is_not") {
        return;
    }
    for backend in ["vxlan", "host-gw"] {
        let mut lab = cluster_lab(backend, 2, 1);
        let p = pods(&mut lab, "bridge");
        full_mesh(&lab, &p);
        let n1_ip = lab.node("n1").expect("n1").ip.clone();
        let peer = lab
            .tcp_exchange(&p[0].1, &lab.internet_ns(), INTERNET_IP, 7200)
            .expect("egress tcp");
        assert_eq!(
            peer.ip().to_string(),
            n1_ip,
            "{backend}: egress seen with the node's address"
        );
    }
}
