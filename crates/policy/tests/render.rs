//! The rendered table against the real kernel (in a private network
//! namespace): the whole script loads, golden files show it, and every
//! incremental script leaves the table exactly as a fresh load would.

use std::collections::BTreeMap;
use trellis_dataplane::sandbox;
use trellis_policy::model::NAME_LABEL;
use trellis_policy::*;

fn cannot_run(why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "cannot run under CI: {why}"
    );
    eprintln!("SKIP: {why}");
}

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

fn pod(ns: &str, name: &str, ip: &str) -> Pod {
    Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: labels(&[("pod", name)]),
        ips: vec![ip.parse().expect("ip")],
        ports: vec![NamedPort {
            name: "serve-80-tcp".into(),
            protocol: Protocol::Tcp,
            port: 80,
        }],
        host_network: false,
    }
}

/// Three namespaces of three pods, a and b of x local; policies of every
/// kind.
fn engine() -> Engine {
    let mut e = Engine::default();
    let mut n = 1;
    for ns in ["x", "y", "z"] {
        e.set_namespace(
            ns,
            Some(Namespace {
                name: ns.into(),
                labels: labels(&[(NAME_LABEL, ns), ("ns", ns)]),
            }),
        );
        for p in ["a", "b", "c"] {
            let ip = format!("10.244.{}.{}", if ns == "x" { 1 } else { 2 }, n);
            n += 1;
            e.set_pod(&format!("{ns}/{p}"), Some(pod(ns, p, &ip)));
            if ns == "x" && p != "c" {
                e.set_local(ip.parse().expect("ip"), Some(format!("{ns}/{p}")));
            }
        }
    }
    e
}

fn tcp(from: u16, to: u16) -> PortSpec {
    PortSpec::Range {
        protocol: Protocol::Tcp,
        from,
        to,
    }
}

fn policies(e: &mut Engine) {
    e.set_policy(
        "x/deny-all",
        Some(NetworkPolicy {
            namespace: "x".into(),
            name: "deny-all".into(),
            ingress: Some(vec![]),
            egress: Some(vec![]),
            ..Default::default()
        }),
    );
    e.set_policy(
        "x/allow",
        Some(NetworkPolicy {
            namespace: "x".into(),
            name: "allow".into(),
            pods: sel(&[("pod", "a")]),
            ingress: Some(vec![Rule {
                peers: vec![
                    Peer::Pods {
                        namespaces: Namespaces::Selected(sel(&[("ns", "y")])),
                        pods: Selector::default(),
                    },
                    Peer::Nets {
                        nets: vec!["10.0.0.0/8".parse().expect("net")],
                        except: vec!["10.244.2.0/24".parse().expect("net")],
                    },
                ],
                ports: vec![
                    tcp(80, 81),
                    PortSpec::Named {
                        name: "serve-80-tcp".into(),
                        protocol: Some(Protocol::Tcp),
                    },
                ],
            }]),
            egress: Some(vec![Rule {
                peers: vec![Peer::Pods {
                    namespaces: Namespaces::Named("x".into()),
                    pods: sel(&[("pod", "b")]),
                }],
                ports: vec![],
            }]),
            ..Default::default()
        }),
    );
    let everyone = Peer::Pods {
        namespaces: Namespaces::Selected(Selector::default()),
        pods: Selector::default(),
    };
    e.set_cluster(
        "admin",
        Some(ClusterPolicy {
            name: "admin".into(),
            tier: Tier::Admin,
            priority: 10,
            subject: Subject::Namespaces(sel(&[("ns", "x")])),
            ingress: vec![
                ClusterRule {
                    name: "pass-z".into(),
                    action: Action::Pass,
                    peers: vec![Peer::Pods {
                        namespaces: Namespaces::Selected(sel(&[("ns", "z")])),
                        pods: Selector::default(),
                    }],
                    ports: vec![],
                },
                ClusterRule {
                    name: "deny-udp".into(),
                    action: Action::Deny,
                    peers: vec![everyone.clone()],
                    ports: vec![PortSpec::Range {
                        protocol: Protocol::Udp,
                        from: 53,
                        to: 53,
                    }],
                },
            ],
            egress: vec![],
            problems: vec![],
        }),
    );
    e.set_cluster(
        "baseline",
        Some(ClusterPolicy {
            name: "baseline".into(),
            tier: Tier::Baseline,
            priority: 1,
            subject: Subject::Namespaces(Selector::default()),
            ingress: vec![ClusterRule {
                name: "deny-sctp".into(),
                action: Action::Deny,
                peers: vec![everyone],
                ports: vec![PortSpec::Range {
                    protocol: Protocol::Sctp,
                    from: 1,
                    to: 65535,
                }],
            }],
            egress: vec![],
            problems: vec![],
        }),
    );
}

fn golden(name: &str, text: &str) {
    let path = format!("{}/tests/golden/{name}.nft", env!("CARGO_MANIFEST_DIR"));
    if std::env::var_os("TRELLIS_GOLDEN").is_some() {
        std::fs::write(&path, text).expect("write golden");
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e} (TRELLIS_GOLDEN=1 writes it)"));
    assert_eq!(text, want, "{path} differs (TRELLIS_GOLDEN=1 rewrites it)");
}

#[test]
fn the_whole_table_loads_and_matches_its_golden_file() {
    let mut e = engine();
    policies(&mut e);
    let d = e.desired();
    let text = render::full(&d);
    golden("tiers", &text);
    if !sandbox::is_root() {
        return cannot_run("nft -c needs root");
    }
    sandbox::nft_check(&text).expect("nft -c");
}

#[test]
fn every_change_leaves_the_table_a_fresh_load_would() {
    if !sandbox::is_root() {
        return cannot_run("applying nft scripts needs root");
    }
    let mut e = engine();
    let empty = e.desired();
    policies(&mut e);
    let mut states = vec![empty, e.desired()];
    // a peer's labels change; a namespace's labels change; a policy goes;
    // a local pod goes; a new local pod comes
    e.set_pod(
        "y/b",
        Some(Pod {
            labels: labels(&[("pod", "q")]),
            ..pod("y", "b", "10.244.2.5")
        }),
    );
    states.push(e.desired());
    e.set_namespace(
        "y",
        Some(Namespace {
            name: "y".into(),
            labels: labels(&[(NAME_LABEL, "y")]),
        }),
    );
    states.push(e.desired());
    e.set_cluster("admin", None);
    states.push(e.desired());
    e.set_local("10.244.1.2".parse().expect("ip"), None);
    states.push(e.desired());
    e.set_pod("x/d", Some(pod("x", "d", "10.244.1.20")));
    e.set_local("10.244.1.20".parse().expect("ip"), Some("x/d".into()));
    states.push(e.desired());
    e.set_policy("x/deny-all", None);
    e.set_policy("x/allow", None);
    e.set_cluster("baseline", None);
    states.push(e.desired());
    let mut scripts = vec![render::full(&states[0])];
    for w in states.windows(2) {
        scripts.push(render::diff(&w[0], &w[1]));
        let step = sandbox::apply_in_netns(TABLE, &scripts).expect("the kernel takes every step");
        let fresh = sandbox::apply_in_netns(TABLE, &[render::full(&w[1])]).expect("a fresh load");
        assert_eq!(
            step,
            fresh,
            "after step {}:\n{}",
            scripts.len() - 1,
            scripts.last().expect("one")
        );
    }
}

#[test]
fn with_logging_every_drop_is_logged_first_and_the_table_loads() {
    let mut e = engine();
    policies(&mut e);
    e.set_log(Some(trellis_policy::LogDenied {
        rate: 10,
        group: 100,
    }));
    let d = e.desired();
    let text = render::full(&d);
    golden("tiers-logged", &text);
    let mut drops = 0;
    for (_, rules) in d.chains.values() {
        for (i, r) in rules.iter().enumerate() {
            if r.verdict == trellis_policy::Verdict::Drop {
                drops += 1;
                let before = i.checked_sub(1).map(|j| &rules[j]);
                assert!(
                    matches!(before, Some(b) if matches!(b.verdict, trellis_policy::Verdict::Log(_))
                        && (b.peer.as_ref(), b.ports.as_ref(), b.named.as_ref(), &b.origin)
                            == (r.peer.as_ref(), r.ports.as_ref(), r.named.as_ref(), &r.origin)),
                    "drop {r:?} is not preceded by its log rule"
                );
            }
        }
    }
    assert!(drops > 0, "the sample has drop rules");
    assert!(text.contains("limit rate 10/second burst 10 packets log prefix \"NetworkPolicy "));
    if !sandbox::is_root() {
        return cannot_run("nft -c needs root");
    }
    sandbox::nft_check(&text).expect("nft -c");
    // and a change between logged states applies as a fresh load would
    let before = d;
    e.set_policy("x/deny-all", None);
    let after = e.desired();
    let step = sandbox::apply_in_netns(
        TABLE,
        &[render::full(&before), render::diff(&before, &after)],
    )
    .expect("the kernel takes the change");
    let fresh = sandbox::apply_in_netns(TABLE, &[render::full(&after)]).expect("a fresh load");
    assert_eq!(step, fresh);
}
