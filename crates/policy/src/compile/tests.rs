use super::*;
use crate::eval::Flow;
use crate::model::{Namespaces, Selector, Subject, NAME_LABEL};
use ipnet::Ipv4Net;

fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn sel(kv: &[(&str, &str)]) -> Selector {
    Selector {
        labels: labels(kv),
        ..Default::default()
    }
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("ip")
}

/// Namespaces x and y; pods x/a (10.0.0.1, local), x/b (10.0.0.2,
/// local), y/a (10.0.1.1, remote), with port "serve-81-tcp" on x/a.
fn engine() -> Engine {
    let mut e = Engine::default();
    for ns in ["x", "y"] {
        e.set_namespace(
            ns,
            Some(Namespace {
                name: ns.into(),
                labels: labels(&[(NAME_LABEL, ns), ("ns", ns)]),
            }),
        );
    }
    let pod = |ns: &str, name: &str, addr: &str| Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: labels(&[("pod", name)]),
        ips: vec![ip(addr)],
        ports: vec![],
        host_network: false,
    };
    let mut xa = pod("x", "a", "10.0.0.1");
    xa.ports.push(crate::model::NamedPort {
        name: "serve-81-tcp".into(),
        protocol: Protocol::Tcp,
        port: 81,
    });
    e.set_pod("x/a", Some(xa));
    e.set_pod("x/b", Some(pod("x", "b", "10.0.0.2")));
    e.set_pod("y/a", Some(pod("y", "a", "10.0.1.1")));
    e.set_local(ip("10.0.0.1"), Some("x/a".into()));
    e.set_local(ip("10.0.0.2"), Some("x/b".into()));
    e
}

fn tcp(src: &str, dst: &str, port: u16) -> Flow {
    Flow {
        src: ip(src),
        dst: ip(dst),
        proto: Some((Protocol::Tcp, port)),
    }
}

fn allow_from(
    ns: &str,
    name: &str,
    on: Selector,
    peers: Vec<Peer>,
    ports: Vec<PortSpec>,
) -> NetworkPolicy {
    NetworkPolicy {
        namespace: ns.into(),
        name: name.into(),
        pods: on,
        ingress: Some(vec![Rule { peers, ports }]),
        egress: None,
        problems: vec![],
    }
}

#[test]
fn no_policy_no_dispatch() {
    let mut e = engine();
    let d = e.desired();
    assert!(d.ingress.is_empty() && d.egress.is_empty() && d.chains.is_empty());
    assert!(d.decide(&tcp("10.0.1.1", "10.0.0.1", 80)).allowed);
}

#[test]
fn default_deny_then_allow_a_peer_by_pod_and_port() {
    let mut e = engine();
    e.set_policy(
        "x/deny",
        Some(NetworkPolicy {
            namespace: "x".into(),
            name: "deny".into(),
            ingress: Some(vec![]),
            ..Default::default()
        }),
    );
    let d = e.desired();
    assert_eq!(d.ingress.len(), 2, "both local pods isolated");
    assert!(d.egress.is_empty(), "egress stays open");
    // the two pods share one profile
    assert_eq!(d.ingress[&ip("10.0.0.1")], d.ingress[&ip("10.0.0.2")]);
    let no = d.decide(&tcp("10.0.1.1", "10.0.0.1", 80));
    assert!(!no.allowed);
    assert_eq!(no.steps[0].tier, "NetworkPolicy");
    assert_eq!(no.steps[0].policy, "x/deny");
    assert_eq!(no.steps[0].rule, None);
    // allow y/a (a pod of namespace y) to x/a on TCP 80-81
    e.set_policy(
        "x/allow",
        Some(allow_from(
            "x",
            "allow",
            sel(&[("pod", "a")]),
            vec![Peer::Pods {
                namespaces: Namespaces::Selected(sel(&[("ns", "y")])),
                pods: sel(&[("pod", "a")]),
            }],
            vec![PortSpec::Range {
                protocol: Protocol::Tcp,
                from: 80,
                to: 81,
            }],
        )),
    );
    let d2 = e.desired();
    assert_ne!(d2.ingress[&ip("10.0.0.1")], d2.ingress[&ip("10.0.0.2")]);
    let yes = d2.decide(&tcp("10.0.1.1", "10.0.0.1", 81));
    assert!(yes.allowed, "{yes:?}");
    assert_eq!(
        (yes.steps[0].policy.as_str(), yes.steps[0].rule),
        ("x/allow", Some(0))
    );
    assert!(!d2.decide(&tcp("10.0.1.1", "10.0.0.1", 82)).allowed);
    assert!(!d2.decide(&tcp("10.0.1.1", "10.0.0.2", 80)).allowed);
    let udp = Flow {
        proto: Some((Protocol::Udp, 80)),
        ..tcp("10.0.1.1", "10.0.0.1", 80)
    };
    assert!(!d2.decide(&udp).allowed, "a TCP rule does not allow UDP");
    // the diff from the first table: new chains and sets, map elements
    let s = crate::render::diff(&d, &d2);
    assert!(
        s.contains("add element inet trellis-policy ingress { 10.0.0.1 : goto in-"),
        "{s}"
    );
    assert!(!s.contains("10.0.0.2 :"), "x/b keeps its profile:\n{s}");
    assert!(crate::render::diff(&d2, &d2).is_empty());
    // y/a's labels change: it leaves the peer set (an element change only)
    e.set_pod(
        "y/a",
        Some(Pod {
            namespace: "y".into(),
            name: "a".into(),
            labels: labels(&[("pod", "z")]),
            ips: vec![ip("10.0.1.1")],
            ..Default::default()
        }),
    );
    let d3 = e.desired();
    let s = crate::render::diff(&d2, &d3);
    assert_eq!(s.lines().count(), 1, "{s}");
    assert!(
        s.starts_with("delete element inet trellis-policy pods-"),
        "{s}"
    );
    assert!(!d3.decide(&tcp("10.0.1.1", "10.0.0.1", 81)).allowed);
}

#[test]
fn named_ports_and_blocks() {
    let mut e = engine();
    e.set_policy(
        "x/named",
        Some(allow_from(
            "x",
            "named",
            Selector::default(),
            vec![Peer::Nets {
                nets: vec!["10.0.0.0/16".parse::<Ipv4Net>().expect("net")],
                except: vec!["10.0.1.0/24".parse::<Ipv4Net>().expect("net")],
            }],
            vec![PortSpec::Named {
                name: "serve-81-tcp".into(),
                protocol: Some(Protocol::Tcp),
            }],
        )),
    );
    let d = e.desired();
    // x/a has the named port; x/b does not
    assert!(d.decide(&tcp("10.0.0.2", "10.0.0.1", 81)).allowed);
    assert!(!d.decide(&tcp("10.0.0.2", "10.0.0.1", 80)).allowed);
    assert!(!d.decide(&tcp("10.0.0.1", "10.0.0.2", 81)).allowed);
    // the except
    assert!(!d.decide(&tcp("10.0.1.1", "10.0.0.1", 81)).allowed);
}

#[test]
fn tiers_in_order_with_pass() {
    let mut e = engine();
    let everyone = || Peer::Pods {
        namespaces: Namespaces::Selected(Selector::default()),
        pods: Selector::default(),
    };
    let cnp = |name: &str, tier, priority, action| ClusterPolicy {
        name: name.into(),
        tier,
        priority,
        subject: Subject::Namespaces(sel(&[("ns", "x")])),
        ingress: vec![ClusterRule {
            name: String::new(),
            action,
            peers: vec![everyone()],
            ports: vec![PortSpec::Range {
                protocol: Protocol::Tcp,
                from: 80,
                to: 80,
            }],
        }],
        egress: vec![],
        problems: vec![],
    };
    // Baseline denies TCP 80; nothing else: denied by the baseline
    e.set_cluster("base", Some(cnp("base", Tier::Baseline, 10, Action::Deny)));
    let d = e.desired();
    let v = d.decide(&tcp("10.0.1.1", "10.0.0.1", 80));
    assert!(!v.allowed);
    assert_eq!(
        (v.steps[0].tier.as_str(), v.steps[0].policy.as_str()),
        ("Baseline", "base")
    );
    assert!(d.decide(&tcp("10.0.1.1", "10.0.0.1", 81)).allowed);
    // an Admin Accept at priority 5 wins over everything after it
    e.set_cluster("adm", Some(cnp("adm", Tier::Admin, 5, Action::Accept)));
    let d = e.desired();
    assert_eq!(
        d.decide(&tcp("10.0.1.1", "10.0.0.1", 80)).steps[0].tier,
        "Admin"
    );
    // an Admin Pass at priority 1 skips the Accept: the baseline decides
    e.set_cluster("pass", Some(cnp("pass", Tier::Admin, 1, Action::Pass)));
    let d = e.desired();
    let v = d.decide(&tcp("10.0.1.1", "10.0.0.1", 80));
    assert!(!v.allowed, "{v:?}");
    assert_eq!(v.steps[0].tier, "Baseline");
    // a NetworkPolicy selecting the pod: the baseline is never consulted
    e.set_policy(
        "x/np",
        Some(allow_from("x", "np", Selector::default(), vec![], vec![])),
    );
    let d = e.desired();
    let v = d.decide(&tcp("10.0.1.1", "10.0.0.1", 80));
    assert!(v.allowed, "{v:?}");
    assert_eq!(v.steps[0].policy, "x/np");
}
