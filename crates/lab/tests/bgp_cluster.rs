//! The bgp backend on lab clusters: node mesh, a route reflector, BIRD as
//! the router between two L3 segments, a dead or hung agent, graceful
//! restart, and prefixes from outside refused.

mod common;
use common::bgp::*;
use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};
use trellis_lab::{exec, Lab, LabOptions};

#[test]
fn mesh_of_three_routes_pods_without_encapsulation() {
    mesh_of_three(
        Datastore::Etcd,
        "mesh_of_three_routes_pods_without_encapsulation",
    );
}

#[test]
fn mesh_of_three_in_kubernetes_mode() {
    mesh_of_three(Datastore::Kubernetes, "mesh_of_three_in_kubernetes_mode");
}

fn mesh_of_three(ds: Datastore, test: &str) {
    let Some(_running) = ds.runs(test) else {
        return;
    };
    let mut lab = bgp_lab(ds, 3, 1, None);
    let p = pods(&mut lab);
    for (node, _, _) in &p {
        wait_established(&lab, node, 2);
    }
    reach_all(&lab, &p);
    let peer = lab
        .tcp_exchange(&p[0].1, &p[1].1, &p[1].2, 7200)
        .expect("tcp");
    assert_eq!(peer.ip().to_string(), p[0].2, "source kept across nodes");
    // next hop = the node's own address, on the underlay device
    let r = routes(&lab, "n1");
    for (i, node) in ["n2", "n3"].iter().enumerate() {
        let n = lab.node(node).expect("node").clone();
        let want = format!("{} via {} dev eth0", n.subnet, n.ip);
        assert!(r.contains(&want), "n1 lacks `{want}`:\n{r}");
        let _ = i;
    }
    for (node, _, _) in &p {
        no_encapsulation(&lab, node);
    }
    let peers = bgp_peers(&lab, "n1");
    assert!(peers
        .iter()
        .all(|x| x["kind"] == "mesh" && x["accepted"] == 1 && x["advertised"] == 1));
    // the CLI shows the same
    let out = exec::check(
        {
            let mut c = std::process::Command::new(lab.bin_dir().join("trellisctl"));
            c.args(["bgp", "status", "--socket"])
                .arg(lab.status_socket("n1"));
            c
        },
        None,
        Duration::from_secs(10),
    )
    .expect("trellisctl bgp status");
    assert!(
        out.contains("Established") && out.contains("192.0.2.12"),
        "{out}"
    );
}

#[test]
fn one_reflector_serves_five_nodes() {
    one_reflector(Datastore::Etcd, "one_reflector_serves_five_nodes");
}

#[test]
fn one_reflector_in_kubernetes_mode() {
    one_reflector(Datastore::Kubernetes, "one_reflector_in_kubernetes_mode");
}

fn one_reflector(ds: Datastore, test: &str) {
    let Some(_running) = ds.runs(test) else {
        return;
    };
    let manifest = "apiVersion: trellis.dev/v1\nkind: Node\nmetadata: {name: n1}\nspec:\n  bgp:\n    routeReflectorClusterID: 224.0.0.1\n";
    let mut lab = bgp_lab(ds, 5, 1, Some(manifest));
    let p = pods(&mut lab);
    wait_established(&lab, "n1", 4);
    for node in ["n2", "n3", "n4", "n5"] {
        wait_established(&lab, node, 1);
        let peers = bgp_peers(&lab, node);
        assert_eq!(
            peers[0]["addr"], "192.0.2.11",
            "{node} peers with the reflector only"
        );
        assert_eq!(peers[0]["kind"], "reflector");
    }
    assert!(bgp_peers(&lab, "n1")
        .iter()
        .all(|x| x["kind"] == "rr-client"));
    reach_all(&lab, &p);
    // reflected routes keep the originating node as next hop
    let r = routes(&lab, "n2");
    let n5 = lab.node("n5").expect("n5").clone();
    assert!(r.contains(&format!("{} via {}", n5.subnet, n5.ip)), "{r}");
    for (node, _, _) in &p {
        no_encapsulation(&lab, node);
    }
    // one more node joins: it peers with the reflector and is reachable
    lab.add_node().expect("n6");
    let ip6 = lab.add_pod("n6", "p", "").expect("pod on n6").ip;
    wait_established(&lab, "n6", 1);
    wait_for("n2 pod -> n6 pod", Duration::from_secs(15), || {
        lab.ping(&p[1].1, &ip6, 1).is_some()
    });
}

#[test]
fn bird_routes_pods_between_two_segments() {
    bird_between_segments(Datastore::Etcd, "bird_routes_pods_between_two_segments");
}

#[test]
fn bird_between_segments_in_kubernetes_mode() {
    bird_between_segments(
        Datastore::Kubernetes,
        "bird_between_segments_in_kubernetes_mode",
    );
}

fn bird_between_segments(ds: Datastore, test: &str) {
    let Some(_running) = ds.runs(test) else {
        return;
    };
    let mut lab = bgp_lab(ds, 4, 2, Some(trellis_lab::bird::SEGMENT_PEERS));
    // BIRD also announces a prefix outside the cluster network: refused
    let bird = trellis_lab::bird::router(
        &lab,
        "protocol static outside { ipv4; route 10.99.0.0/24 blackhole; }\n",
    )
    .expect("BIRD on the router");
    let p = pods(&mut lab);
    for (node, _, _) in &p {
        wait_established(&lab, node, 1);
    }
    // BIRD learned every pod subnet (and installed them in the router)
    let subnets: Vec<String> = lab.state().nodes.iter().map(|n| n.subnet.clone()).collect();
    wait_for(
        "BIRD learns every pod subnet",
        Duration::from_secs(15),
        || {
            let r = birdc(&bird, &["show", "route"]);
            subnets.iter().all(|s| r.contains(s.as_str()))
        },
    );
    reach_all(&lab, &p);
    // across segments via the router, no tunnel: n1 (segment a) reaches
    // n2's pods (segment b) via 192.0.2.1
    let r = routes(&lab, "n1");
    let n2 = lab.node("n2").expect("n2").clone();
    assert!(
        r.contains(&format!("{} via 192.0.2.1 dev eth0", n2.subnet)),
        "{r}"
    );
    for (node, _, _) in &p {
        no_encapsulation(&lab, node);
    }
    // the outside prefix reached us and was refused (BIRD sends its
    // updates in its own time: the pod subnets can be there before the
    // outside prefix is)
    wait_for(
        "n1 receives more from BIRD than it accepts",
        Duration::from_secs(15),
        || {
            let peers = bgp_peers(&lab, "n1");
            let received = peers[0]["received"].as_u64().unwrap_or(0);
            let accepted = peers[0]["accepted"].as_u64().unwrap_or(0);
            received > accepted
        },
    );
    assert!(!r.contains("10.99.0.0"), "{r}");
    wait_for("n1 logs the refusal", Duration::from_secs(5), || {
        std::fs::read_to_string(lab.agent_log("n1"))
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("route refused") && l.contains("10.99.0.0/24"))
    });
}

#[test]
fn a_hung_agent_is_withdrawn_within_the_hold_time() {
    if !privileged("a_hung_agent_is_withdrawn_within_the_hold_time") {
        return;
    }
    let manifest = "apiVersion: trellis.dev/v1\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {holdTimeSeconds: 3}\n";
    let mut lab = bgp_lab(Datastore::Etcd, 3, 1, Some(manifest));
    let p = pods(&mut lab);
    for (node, _, _) in &p {
        wait_established(&lab, node, 2);
    }
    reach_all(&lab, &p);
    let n3 = lab.node("n3").expect("n3").clone();
    lab.freeze_agent("n3", true).expect("freeze");
    let t0 = Instant::now();
    let gone = |lab: &Lab| {
        !routes(lab, "n1").contains(&n3.subnet) && !routes(lab, "n2").contains(&n3.subnet)
    };
    while !gone(&lab) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = t0.elapsed();
    lab.freeze_agent("n3", false).expect("thaw");
    assert!(gone(&lab), "n3's subnet still routed after {took:?}");
    assert!(
        took <= Duration::from_secs(3) + Duration::from_millis(900),
        "withdrawn after {took:?}, hold time is 3 s"
    );
    // thawed, it comes back
    wait_for("n3 back", Duration::from_secs(20), || {
        routes(&lab, "n1").contains(&n3.subnet)
    });
}

#[test]
fn graceful_restart_keeps_traffic_flowing() {
    if !privileged("graceful_restart_keeps_traffic_flowing") {
        return;
    }
    let mut lab = bgp_lab(Datastore::Etcd, 2, 1, None);
    let p = pods(&mut lab);
    wait_established(&lab, "n1", 1);
    reach_all(&lab, &p);
    let mut stream = lab
        .ping_stream(&p[0].1, &p[1].2, 150, Duration::from_millis(20))
        .expect("ping stream");
    // the stream flows before anything is restarted
    stream
        .wait_first_reply(Duration::from_secs(5))
        .expect("first reply");
    let n2 = lab.node("n2").expect("n2").clone();
    lab.stop_agent("n2").expect("stop");
    // while n2's agent is down, n1 keeps n2's routes (stale) ...
    wait_for("n2's route marked stale", Duration::from_secs(5), || {
        bgp_peers(&lab, "n1")[0]["stale"] == 1
    });
    let during = routes(&lab, "n1");
    lab.start_agent("n2").expect("start");
    let (sent, received) = stream.finish(Duration::from_secs(30)).expect("ping");
    assert!(
        during.contains(&n2.subnet),
        "route dropped during restart:\n{during}"
    );
    assert_eq!((sent, received), (150, 150), "loss across the restart");
    // ... and the session comes back, the stale mark goes
    wait_established(&lab, "n1", 1);
    wait_for("stale cleared", Duration::from_secs(10), || {
        bgp_peers(&lab, "n1")[0]["stale"] == 0
    });
}

#[test]
fn bad_bgp_manifests_are_refused_whole() {
    if !privileged("bad_bgp_manifests_are_refused_whole") {
        return;
    }
    let lab = Lab::create(LabOptions {
        etcd: true,
        ..Default::default()
    })
    .expect("lab");
    let bad = "apiVersion: trellis.dev/v1\nkind: BGPPeer\nmetadata: {name: good}\nspec: {peerIP: 192.0.2.1, asNumber: 64513}\n---\napiVersion: trellis.dev/v1\nkind: BGPPeer\nmetadata: {name: bad}\nspec: {peerIP: 192.0.2.9}\n";
    let e = lab.apply(bad).expect_err("refused");
    assert!(format!("{e:#}").contains("document 2"), "{e:#}");
    let keys = lab
        .etcdctl(&["get", "--prefix", "--keys-only", "/trellis/v1/bgp/"])
        .expect("get");
    assert!(keys.trim().is_empty(), "nothing written: {keys}");
    let ok = lab
        .apply(&bad.replace(
            "spec: {peerIP: 192.0.2.9}",
            "spec: {peerIP: 192.0.2.9, asNumber: 65000}",
        ))
        .expect("apply");
    assert!(ok.contains("BGPPeer/bad applied"), "{ok}");
    let gone = lab.delete("apiVersion: trellis.dev/v1\nkind: BGPPeer\nmetadata: {name: bad}\nspec: {peerIP: 192.0.2.9, asNumber: 1}\n").expect("delete");
    assert!(gone.contains("deleted"), "{gone}");
}

fn tor_peer(password: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1\nkind: BGPPeer\nmetadata: {{name: tor}}\nspec: {{peerIP: 192.0.2.1, asNumber: 65000, node: n1, password: {password}}}\n"
    )
}

#[test]
fn external_ebgp_peer_with_md5_and_changes_that_touch_only_their_session() {
    external_peer(
        Datastore::Etcd,
        "external_ebgp_peer_with_md5_and_changes_that_touch_only_their_session",
    );
}

#[test]
fn external_ebgp_peer_in_kubernetes_mode() {
    external_peer(
        Datastore::Kubernetes,
        "external_ebgp_peer_in_kubernetes_mode",
    );
}

fn external_peer(ds: Datastore, test: &str) {
    let Some(_running) = ds.runs(test) else {
        return;
    };
    let mut lab = bgp_lab(ds, 2, 1, Some(&tor_peer("s3cret")));
    // the ToR: eBGP, MD5, announces nothing we would take
    let bird = start_bird(
        &lab,
        &lab.fabric_ns(),
        "bird-tor",
        "router id 192.0.2.1;\nprotocol device {}\n\
         protocol static tor_routes { ipv4; route 10.98.0.0/24 blackhole; }\n\
         protocol bgp n1 {\n  local 192.0.2.1 as 65000;\n  neighbor 192.0.2.11 as 64512;\n  password \"s3cret\";\n  \
         ipv4 { import all; export all; };\n}\n",
    );
    let p = pods(&mut lab);
    wait_established(&lab, "n1", 2);
    let n1 = lab.node("n1").expect("n1").clone();
    wait_for(
        "BIRD learns n1's subnet over eBGP",
        Duration::from_secs(15),
        || birdc(&bird, &["show", "route"]).contains(&n1.subnet),
    );
    let route = birdc(&bird, &["show", "route", "all", &n1.subnet]);
    assert!(route.contains("64512"), "AS path carries our AS:\n{route}");
    let peers = bgp_peers(&lab, "n1");
    let tor = peers
        .iter()
        .find(|x| x["kind"] == "external")
        .expect("external peer");
    assert_eq!(tor["asn"], 65000);
    // its 10.98.0.0/24 is outside the cluster network: refused
    assert!(!routes(&lab, "n1").contains("10.98.0.0"));
    let mesh_since = |lab: &Lab| {
        bgp_peers(lab, "n1")
            .iter()
            .find(|x| x["kind"] == "mesh")
            .map(|x| x["sinceSecs"].as_u64().unwrap_or(0))
            .unwrap_or(0)
    };
    std::thread::sleep(Duration::from_secs(2));
    let before = mesh_since(&lab);
    assert!(before >= 2, "mesh session up for {before} s");
    // a wrong password: that session goes and never comes back; the mesh
    // session with n2 is not touched
    lab.apply(&tor_peer("wrong")).expect("apply");
    wait_for(
        "session with the wrong key down",
        Duration::from_secs(10),
        || {
            bgp_peers(&lab, "n1")
                .iter()
                .any(|x| x["kind"] == "external" && x["state"] != "Established")
        },
    );
    std::thread::sleep(Duration::from_secs(5));
    let tor_state = bgp_peers(&lab, "n1")
        .iter()
        .find(|x| x["kind"] == "external")
        .map(|x| x["state"].clone());
    assert_ne!(tor_state, Some(Value::from("Established")));
    assert!(
        mesh_since(&lab) >= before + 5,
        "the mesh session was restarted"
    );
    reach_all(&lab, &p);
}

/// Item: nodes peering only with an outside reflector (BIRD, mesh off).
/// n3's agent stalls past its lease TTL but not past the BGP hold time
/// (9 s): its lease expires, the others drop its subnet (no owner), and
/// when it runs again and re-claims the subnet, they must take the route
/// back although no session dropped and BIRD resends nothing.
#[test]
fn a_subnet_whose_lease_returns_is_routed_again_through_a_reflector() {
    if !privileged("a_subnet_whose_lease_returns_is_routed_again_through_a_reflector") {
        return;
    }
    let mut lab = bgp_lab(
        Datastore::Etcd,
        3,
        2,
        Some(trellis_lab::bird::SEGMENT_PEERS),
    );
    let _bird = trellis_lab::bird::router(&lab, "").expect("BIRD on the router");
    let p = pods(&mut lab);
    for (node, _, _) in &p {
        wait_established(&lab, node, 1);
    }
    reach_all(&lab, &p);
    let n3 = lab.node("n3").expect("n3").clone();
    let key = format!("/trellis/v1/subnets/{}", n3.subnet.replace('/', "-"));
    let held = |lab: &Lab| {
        !lab.etcdctl(&["get", &key, "--print-value-only"])
            .expect("etcdctl")
            .trim()
            .is_empty()
    };
    let since_before = bgp_peers(&lab, "n1")[0]["establishedCount"].clone();
    lab.freeze_agent("n3", true).expect("freeze");
    wait_for("n3's lease expires", Duration::from_secs(8), || !held(&lab));
    wait_for(
        "n1 drops the unowned subnet",
        Duration::from_secs(5),
        || !routes(&lab, "n1").contains(&n3.subnet),
    );
    lab.freeze_agent("n3", false).expect("thaw");
    wait_for("n3 holds its subnet again", Duration::from_secs(10), || {
        held(&lab)
    });
    wait_for("n1 routes to n3 again", Duration::from_secs(10), || {
        routes(&lab, "n1").contains(&n3.subnet)
    });
    // the session with the reflector never dropped: nothing was resent
    assert_eq!(
        bgp_peers(&lab, "n1")[0]["establishedCount"],
        since_before,
        "n1's session was reset"
    );
    let (_, n1_pod, _) = &p[0];
    let (_, _, n3_ip) = &p[2];
    wait_for("n1's pod reaches n3's pod", Duration::from_secs(10), || {
        lab.ping(n1_pod, n3_ip, 1).is_some()
    });
}
