use super::*;
use crate::model::Direction;

fn np(json: serde_json::Value) -> NetworkPolicy {
    network_policy(&serde_json::from_value(json).expect("a NetworkPolicy"))
}

#[test]
fn policy_types_default_as_the_api_server_fills_them() {
    let p = np(serde_json::json!({
        "metadata": {"name": "p", "namespace": "x"},
        "spec": {"podSelector": {}, "egress": []}
    }));
    assert_eq!(p.ingress, Some(vec![]), "ingress isolated");
    assert_eq!(
        p.egress, None,
        "egress: [] without policyTypes does not isolate"
    );
    let p = np(serde_json::json!({
        "metadata": {"name": "p", "namespace": "x"},
        "spec": {"podSelector": {}, "policyTypes": ["Egress"]}
    }));
    assert_eq!(
        (p.ingress.is_none(), p.egress.clone()),
        (true, Some(vec![]))
    );
    let _ = Direction::BOTH;
}

#[test]
fn peers_and_ports() {
    let p = np(serde_json::json!({
        "metadata": {"name": "p", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{
            "from": [
                {"podSelector": {"matchLabels": {"pod": "b"}}},
                {"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "In", "values": ["y"]}]},
                 "podSelector": {}},
                {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}
            ],
            "ports": [{"port": 80, "endPort": 90}, {"protocol": "UDP", "port": "dns"}, {"protocol": "SCTP"}]
        }]}
    }));
    assert!(p.problems.is_empty(), "{:?}", p.problems);
    let r = &p.ingress.as_ref().expect("ingress")[0];
    assert_eq!(r.peers.len(), 3);
    assert!(matches!(&r.peers[0], Peer::Pods { namespaces: Namespaces::Named(n), .. } if n == "x"));
    assert_eq!(
        r.ports,
        vec![
            PortSpec::Range {
                protocol: Protocol::Tcp,
                from: 80,
                to: 90
            },
            PortSpec::Named {
                name: "dns".into(),
                protocol: Some(Protocol::Udp)
            },
            PortSpec::Range {
                protocol: Protocol::Sctp,
                from: 1,
                to: 65535
            },
        ]
    );
}

#[test]
fn what_is_not_understood_fails_closed_and_is_named() {
    let p = np(serde_json::json!({
        "metadata": {"name": "p", "namespace": "x"},
        "spec": {"podSelector": {}, "ingress": [{
            "from": [{"ipBlock": {"cidr": "nonsense"}}],
        }, {
            "ports": [{"protocol": "ICMP", "port": 1}]
        }, {
            "ports": [{"port": 90, "endPort": 80}]
        }]}
    }));
    assert_eq!(p.problems.len(), 3, "{:?}", p.problems);
    assert!(
        p.problems[0].contains("ingress[0].from[0].ipBlock.cidr"),
        "{:?}",
        p.problems
    );
    assert!(
        p.problems[1].contains("ingress[1].ports[0].protocol"),
        "{:?}",
        p.problems
    );
    assert!(p.problems[2].contains("below"), "{:?}", p.problems);
    for r in p.ingress.expect("ingress") {
        assert_eq!(r.peers, vec![Peer::Nothing], "allows nothing");
    }
}

#[test]
fn cluster_network_policies() {
    let c = cluster_policy(&serde_json::json!({
        "apiVersion": CNP_API_VERSION, "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "c"},
        "spec": {"tier": "Admin", "priority": 10,
            "subject": {"namespaces": {"matchLabels": {"ns": "x"}}},
            "ingress": [{"name": "r", "action": "Pass",
                "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "a"}}}}],
                "protocols": [{"tcp": {"destinationPort": {"range": {"start": 80, "end": 81}}}},
                              {"destinationNamedPort": "serve-80-udp"}]}],
            "egress": [{"action": "Deny", "to": [{"networks": ["10.0.0.0/8"]}]},
                       {"action": "Accept", "to": [{"futurePeer": {}}]},
                       {"action": "Deny", "to": [{"futurePeer": {}}]}]}
    }))
    .expect("cnp");
    assert_eq!((c.tier, c.priority), (Tier::Admin, 10));
    assert_eq!(c.ingress[0].action, Action::Pass);
    assert_eq!(c.ingress[0].ports.len(), 2);
    assert_eq!(
        c.egress[1].peers,
        vec![Peer::Nothing],
        "an unknown peer in an Accept matches nothing"
    );
    assert!(
        matches!(&c.egress[2].peers[0], Peer::Nets { nets, .. } if nets[0].prefix_len() == 0),
        "an unknown peer in a Deny matches everything"
    );
    assert_eq!(c.problems.len(), 2, "{:?}", c.problems);
    let bad = cluster_policy(&serde_json::json!({
        "metadata": {"name": "c"},
        "spec": {"tier": "Middle", "priority": 1, "subject": {"namespaces": {}}}
    }));
    assert!(bad.expect_err("refused").contains("spec.tier"));
    let bad = cluster_policy(&serde_json::json!({
        "metadata": {"name": "c"},
        "spec": {"tier": "Admin", "priority": 1001, "subject": {"namespaces": {}}}
    }));
    assert!(bad.expect_err("refused").contains("0-1000"));
}
