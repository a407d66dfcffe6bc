//! Subnet leases that expire under a live agent (it stalled longer than the
//! TTL), against a real etcd: the node claims exactly its own subnet again
//! when it is still free; when another node took it, the agent must not
//! go on with addresses of a subnet it no longer holds — it stops with an
//! error naming both subnets (as flannel restarts), and its next start
//! uses the new one.

mod common;
use common::*;
use std::time::Duration;
use trellis_lab::{Lab, LabOptions};

fn lab(nodes: usize) -> Lab {
    Lab::create(LabOptions {
        nodes,
        cluster: Some(trellis_lab::cluster_config("host-gw").expect("backend")),
        ..Default::default()
    })
    .expect("cluster lab")
}

fn key(subnet: &str) -> String {
    format!("/trellis/v1/subnets/{}", subnet.replace('/', "-"))
}

/// The value at `key` (empty when absent).
fn get(lab: &Lab, key: &str) -> String {
    lab.etcdctl(&["get", key, "--print-value-only"])
        .expect("etcdctl get")
        .trim()
        .to_string()
}

/// Freezes `node`'s agent until its lease (TTL 4 s in the lab) is gone.
fn stall_past_ttl(lab: &Lab, node: &str, key: &str) {
    lab.freeze_agent(node, true).expect("freeze");
    wait_for(
        "the frozen node's lease expires",
        Duration::from_secs(15),
        || get(lab, key).is_empty(),
    );
}

#[test]
fn an_expired_lease_is_claimed_again_for_the_same_subnet() {
    if !privileged("an_expired_lease_is_claimed_again_for_the_same_subnet") {
        return;
    }
    let mut lab = lab(2);
    let subnet = lab.node("n1").expect("n1").subnet.clone();
    let k = key(&subnet);
    stall_past_ttl(&lab, "n1", &k);
    lab.freeze_agent("n1", false).expect("thaw");
    wait_for("n1 holds its subnet again", Duration::from_secs(10), || {
        get(&lab, &k).contains("\"n1\"")
    });
    // still the same agent, same subnet, and pods still attach
    let st = status(&lab, "n1");
    assert_eq!(st["subnet"], subnet.as_str());
    assert_eq!(st["ready"], true, "{st}");
    let pod = lab
        .add_pod("n1", "after", "routed")
        .expect("ADD after re-claim");
    let net: ipnet::Ipv4Net = subnet.parse().expect("net");
    let ip: std::net::Ipv4Addr = pod.ip.parse().expect("ip");
    assert!(net.contains(&ip), "{ip} outside {net}");
    let log = std::fs::read_to_string(lab.agent_log("n1")).expect("log");
    assert!(log.contains("subnet claimed again"), "{log}");
}

#[test]
fn a_subnet_taken_while_the_lease_was_gone_stops_the_agent() {
    if !privileged("a_subnet_taken_while_the_lease_was_gone_stops_the_agent") {
        return;
    }
    let mut lab = lab(2);
    let lost = lab.node("n1").expect("n1").subnet.clone();
    let k = key(&lost);
    let record = get(&lab, &k);
    assert!(record.contains("\"n1\""), "{record}");
    stall_past_ttl(&lab, "n1", &k);
    // another node claims the subnet meanwhile
    let intruder = record.replace("\"n1\"", "\"intruder\"");
    lab.etcdctl(&["put", &k, &intruder]).expect("put");
    lab.freeze_agent("n1", false).expect("thaw");
    let exit = lab
        .wait_agent_exit("n1", Duration::from_secs(15))
        .expect("the agent stops");
    assert!(!exit.success(), "exit status {exit}");
    let log = std::fs::read_to_string(lab.agent_log("n1")).expect("log");
    let fatal = log
        .lines()
        .find(|l| l.contains("was lost"))
        .unwrap_or_else(|| panic!("no fatal line in\n{log}"));
    // both subnets named: the lost one (and who has it), and the new one
    let next = std::fs::read_to_string(lab.dir().join("n1-data/subnet")).expect("subnet file");
    let next = next.trim();
    assert_ne!(next, lost, "a new subnet is remembered for the next start");
    for needle in [lost.as_str(), "intruder", next] {
        assert!(fatal.contains(needle), "{needle} missing in: {fatal}");
    }
    // the intruder keeps its claim; a restarted agent serves the new subnet
    assert!(get(&lab, &k).contains("intruder"));
    lab.start_agent("n1").expect("restart");
    wait_for(
        "the restarted agent holds the new subnet",
        Duration::from_secs(10),
        || status(&lab, "n1")["subnet"] == next,
    );
    let pod = lab.add_pod("n1", "fresh", "routed").expect("ADD");
    let net: ipnet::Ipv4Net = next.parse().expect("net");
    let ip: std::net::Ipv4Addr = pod.ip.parse().expect("ip");
    assert!(net.contains(&ip), "{ip} outside {net}");
}
