//! Both attach modes on one node, with real traffic.

mod common;
use common::*;

fn sysctl(lab: &trellis_lab::Lab, node: &str, key: &str) -> String {
    let t = lab
        .exec(
            &lab.ns(node),
            &["cat", &format!("/proc/sys/{key}")],
            std::time::Duration::from_secs(5),
        )
        .expect("cat sysctl");
    String::from_utf8_lossy(&t.output.stdout).trim().to_string()
}

fn attach_mode(mode: &str) {
    let mut lab = lab(1);
    let node_ns = lab.ns("n1");
    let node_ip = lab.node("n1").expect("node").ip.clone();
    let a = lab.add_pod("n1", "a", mode).expect("add a");
    let b = lab.add_pod("n1", "b", mode).expect("add b");
    let (a_ns, b_ns) = (lab.pod_ns("n1", "a"), lab.pod_ns("n1", "b"));

    // traffic: pod <-> pod, pod <-> node, and a TCP exchange keeping the source IP
    assert_ping(&lab, &a_ns, &b.ip);
    assert_ping(&lab, &b_ns, &a.ip);
    assert_ping(&lab, &a_ns, &node_ip);
    assert_ping(&lab, &node_ns, &a.ip);
    let peer = lab
        .tcp_exchange(&a_ns, &b_ns, &b.ip, 8080)
        .expect("tcp a->b");
    assert_eq!(peer.ip().to_string(), a.ip, "pod source address kept");
    let peer = lab
        .tcp_exchange(&node_ns, &a_ns, &a.ip, 8081)
        .expect("tcp node->a");
    // the node sources from the address of the interface the pod is behind
    let node_src = if mode == "bridge" {
        "10.244.1.1"
    } else {
        node_ip.as_str()
    };
    assert_eq!(peer.ip().to_string(), node_src);

    // the pod's interface as specified
    let iface = &ip_json(&a_ns, &["addr", "show", "eth0"])[0];
    assert_eq!(iface["mtu"], 1500);
    assert_eq!(iface["operstate"], "UP");
    let addr = iface["addr_info"]
        .as_array()
        .expect("addrs")
        .iter()
        .find(|x| x["family"] == "inet")
        .expect("inet")
        .clone();
    assert_eq!(addr["local"], a.ip.as_str());
    let routes = ip_json(&a_ns, &["route", "show"]);
    let default = routes
        .as_array()
        .expect("routes")
        .iter()
        .find(|r| r["dst"] == "default")
        .expect("default route")
        .clone();
    let host = a.result["interfaces"][0]["name"]
        .as_str()
        .expect("host veth")
        .to_string();
    assert!(host.starts_with("tl") && host.len() == 13, "{host}");
    let link = &ip_json(&node_ns, &["link", "show", &host])[0];
    match mode {
        "bridge" => {
            assert_eq!(addr["prefixlen"], 24);
            assert_eq!(default["gateway"], "10.244.1.1");
            assert_eq!(link["master"], "cni0");
            assert_eq!(
                link["linkinfo"]["info_slave_data"]["hairpin"], true,
                "hairpin on"
            );
            let br = &ip_json(&node_ns, &["addr", "show", "cni0"])[0];
            assert!(br["addr_info"]
                .as_array()
                .expect("a")
                .iter()
                .any(|x| x["local"] == "10.244.1.1" && x["prefixlen"] == 24));
        }
        "routed" => {
            assert_eq!(addr["prefixlen"], 32);
            assert_eq!(default["gateway"], "169.254.1.1");
            assert!(
                default["flags"]
                    .as_array()
                    .expect("flags")
                    .iter()
                    .any(|f| f == "onlink"),
                "{default}"
            );
            assert_eq!(link["address"], "ee:ee:ee:ee:ee:ee");
            assert!(link.get("master").is_none());
            let hr = ip_json(&node_ns, &["route", "show", &format!("{}/32", a.ip)]);
            assert_eq!(hr[0]["dev"], host.as_str(), "{hr}");
            assert_eq!(hr[0]["protocol"], "84", "{hr}");
            assert_eq!(
                sysctl(&lab, "n1", &format!("net/ipv4/conf/{host}/proxy_arp")),
                "1"
            );
            // the host veth answers the pod's ARP for the gateway
            exec_ok(&lab, &a_ns, &["ip", "neigh", "flush", "dev", "eth0"]);
            assert_ping(&lab, &a_ns, &node_ip);
            let neigh = ip_json(&a_ns, &["neigh", "show", "169.254.1.1"]);
            assert_eq!(neigh[0]["lladdr"], "ee:ee:ee:ee:ee:ee", "{neigh}");
        }
        _ => unreachable!(),
    }
    assert_eq!(sysctl(&lab, "n1", "net/ipv4/ip_forward"), "1");

    // DEL takes the host veth out of service at once and the agent
    // deletes it in the background, while the pod's namespace still exists
    // (deleting the namespace would delete the pair anyway)
    let t = lab
        .cni("DEL", "n1", "a", &lab.netconf("n1", mode))
        .expect("DEL a");
    assert!(t.output.status.success(), "{:?}", t.output);
    assert!(
        !links(&node_ns).contains(&host),
        "host veth {host} still there"
    );
    wait_for(
        "the retired veth of a deleted",
        std::time::Duration::from_secs(10),
        || !links(&node_ns).iter().any(|l| l.starts_with("tz")),
    );
    assert!(
        !links(&a_ns).contains(&"eth0".to_string()),
        "the pod side went with it"
    );
    // and the address is free; a second DEL (the runtime's retry) is fine
    assert_eq!(allocations(&lab, "n1").len(), 1);
    lab.del_pod("n1", "a").expect("del a");
    assert!(
        !links(&node_ns).contains(&host),
        "host veth {host} left behind"
    );
    assert_eq!(allocations(&lab, "n1"), vec![b.ip.clone()]);
    lab.del_pod("n1", "b").expect("del b");
    assert!(pod_veths(&node_ns).is_empty());
    assert!(allocations(&lab, "n1").is_empty());
    // DEL answers before the kernel's slow part: the links are retired
    // (down, renamed `tz…`) and deleted in the background, within seconds
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left: Vec<_> = links(&node_ns)
            .into_iter()
            .filter(|l| l.starts_with("tz"))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "retired veths not deleted: {left:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn exec_ok(lab: &trellis_lab::Lab, ns: &str, args: &[&str]) {
    let t = lab
        .exec(ns, args, std::time::Duration::from_secs(5))
        .expect("exec");
    assert!(t.output.status.success(), "{args:?}");
}

#[test]
fn bridge_mode() {
    if privileged("bridge_mode") {
        attach_mode("bridge");
    }
}

#[test]
fn routed_mode() {
    if privileged("routed_mode") {
        attach_mode("routed");
    }
}

#[test]
fn bridge_and_routed_pods_reach_each_other() {
    if !privileged("bridge_and_routed_pods_reach_each_other") {
        return;
    }
    let mut lab = lab(1);
    let b = lab.add_pod("n1", "b", "bridge").expect("add");
    let r = lab.add_pod("n1", "r", "routed").expect("add");
    let (b_ns, r_ns) = (lab.pod_ns("n1", "b"), lab.pod_ns("n1", "r"));
    assert_ping(&lab, &b_ns, &r.ip);
    assert_ping(&lab, &r_ns, &b.ip);
    lab.tcp_exchange(&b_ns, &r_ns, &r.ip, 9000).expect("tcp");
    lab.tcp_exchange(&r_ns, &b_ns, &b.ip, 9001).expect("tcp");
}

#[test]
fn mtu_from_config() {
    if !privileged("mtu_from_config") {
        return;
    }
    let mut lab = trellis_lab::Lab::create(trellis_lab::LabOptions {
        nodes: 1,
        mtu: 1400,
        ..Default::default()
    })
    .expect("lab");
    let a = lab.add_pod("n1", "a", "routed").expect("add");
    assert_eq!(
        ip_json(&lab.pod_ns("n1", "a"), &["link", "show", "eth0"])[0]["mtu"],
        1400
    );
    assert_eq!(a.result["interfaces"][1]["mtu"], 1400);
    let host = a.result["interfaces"][0]["name"]
        .as_str()
        .expect("name")
        .to_string();
    assert_eq!(
        ip_json(&lab.ns("n1"), &["link", "show", &host])[0]["mtu"],
        1400
    );
}
