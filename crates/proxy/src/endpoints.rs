//! Which endpoints take new connections for one Service port, as
//! kube-proxy chooses them: ready ones; serving-but-terminating ones only
//! when no endpoint is ready (each for the cluster-wide and for the
//! node-local set).

use crate::model::{ServicePort, Slice};
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

/// The endpoints of one Service port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortEndpoints {
    /// For traffic policy Cluster: every usable endpoint.
    pub cluster: Vec<SocketAddr>,
    /// For traffic policy Local: the usable endpoints on this node.
    pub local: Vec<SocketAddr>,
    /// The ready endpoints on this node (what a health check counts).
    pub local_ready: Vec<SocketAddr>,
    /// Of `cluster` and `local`, those that may be a pod on this node
    /// (`nodeName` this node or unset): only they can be reached by
    /// themselves through this node's proxy (hairpin).
    pub here: Vec<IpAddr>,
}

/// The endpoints of port `sp` in `slices` (all of one Service), of the
/// address family of `v4`, `node` being this node's name. Sorted, each
/// address once.
pub fn for_port(sp: &ServicePort, slices: &[&Slice], node: &str, v4: bool) -> PortEndpoints {
    // (address, port) -> (ready, serving && terminating, local, node
    // unknown)
    let mut all: Vec<(SocketAddr, bool, bool, bool, bool)> = Vec::new();
    let mut seen = BTreeSet::new();
    for s in slices {
        let Some(port) = s
            .ports
            .iter()
            .find(|p| p.name == sp.name && p.protocol == sp.protocol)
        else {
            continue;
        };
        for e in &s.endpoints {
            if matches!(e.address, IpAddr::V4(_)) != v4 {
                continue;
            }
            let at = SocketAddr::new(e.address, port.port);
            // one address in two slices (a slice being replaced): once
            if !seen.insert(at) {
                continue;
            }
            all.push((
                at,
                e.ready,
                e.serving && e.terminating,
                e.node.as_deref() == Some(node),
                e.node.is_none(),
            ));
        }
    }
    let pick = |only_local: bool| -> Vec<SocketAddr> {
        let mine = all.iter().filter(|e| !only_local || e.3);
        let ready: Vec<SocketAddr> = mine.clone().filter(|e| e.1).map(|e| e.0).collect();
        let mut chosen = if ready.is_empty() {
            mine.filter(|e| e.2).map(|e| e.0).collect()
        } else {
            ready
        };
        chosen.sort();
        chosen
    };
    let mut local_ready: Vec<SocketAddr> = all.iter().filter(|e| e.3 && e.1).map(|e| e.0).collect();
    local_ready.sort();
    let (cluster, local) = (pick(false), pick(true));
    let mut here: Vec<IpAddr> = all
        .iter()
        .filter(|e| {
            (e.3 || e.4)
                && (cluster.binary_search(&e.0).is_ok() || local.binary_search(&e.0).is_ok())
        })
        .map(|e| e.0.ip())
        .collect();
    here.sort();
    here.dedup();
    PortEndpoints {
        cluster,
        local,
        local_ready,
        here,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Protocol, SlicePort};

    fn ep(a: &str, ready: bool, serving: bool, terminating: bool, node: &str) -> Endpoint {
        Endpoint {
            address: a.parse().expect("ip"),
            ready,
            serving,
            terminating,
            node: Some(node.into()),
        }
    }

    fn slice(eps: Vec<Endpoint>) -> Slice {
        Slice {
            namespace: "d".into(),
            name: "s-1".into(),
            service: "s".into(),
            ports: vec![SlicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
            endpoints: eps,
        }
    }

    fn port() -> ServicePort {
        ServicePort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
            node_port: None,
        }
    }

    #[test]
    fn ready_first_then_terminating() {
        let s = slice(vec![
            ep("10.244.1.2", true, true, false, "n1"),
            ep("10.244.2.2", false, true, true, "n2"),
            ep("10.244.1.3", false, true, true, "n1"),
        ]);
        let e = for_port(&port(), &[&s], "n1", true);
        assert_eq!(e.cluster, vec!["10.244.1.2:8080".parse().expect("sa")]);
        assert_eq!(e.local, vec!["10.244.1.2:8080".parse().expect("sa")]);
        // on n2 nothing local is ready: its terminating one serves locally
        let e2 = for_port(&port(), &[&s], "n2", true);
        assert_eq!(e2.local, vec!["10.244.2.2:8080".parse().expect("sa")]);
        // ... but a health check does not count it
        assert!(e2.local_ready.is_empty());
        assert_eq!(e.local_ready.len(), 1);
        // nothing ready anywhere: both terminating ones
        let t = slice(vec![
            ep("10.244.2.2", false, true, true, "n2"),
            ep("10.244.1.3", false, true, true, "n1"),
            ep("10.244.1.4", false, false, true, "n1"),
        ]);
        let e3 = for_port(&port(), &[&t], "n1", true);
        assert_eq!(e3.cluster.len(), 2);
        // hairpin only for endpoints that may be here: n1's, not n2's
        let ip = |a: &str| -> IpAddr { a.parse().expect("ip") };
        assert_eq!(e3.here, vec![ip("10.244.1.3")]);
        let mut unknown = ep("10.244.9.9", true, true, false, "x");
        unknown.node = None;
        let u = slice(vec![unknown, ep("10.244.2.2", true, true, false, "n2")]);
        assert_eq!(
            for_port(&port(), &[&u], "n1", true).here,
            vec![ip("10.244.9.9")]
        );
    }

    #[test]
    fn port_name_and_protocol_must_match_and_duplicates_count_once() {
        let a = slice(vec![ep("10.244.1.2", true, true, false, "n1")]);
        let b = slice(vec![ep("10.244.1.2", true, true, false, "n1")]);
        let e = for_port(&port(), &[&a, &b], "n1", true);
        assert_eq!(e.cluster.len(), 1);
        let mut udp = port();
        udp.protocol = Protocol::Udp;
        assert!(for_port(&udp, &[&a], "n1", true).cluster.is_empty());
        assert!(for_port(&port(), &[&a], "n1", false).cluster.is_empty());
    }
}
