//! Service addresses advertised over BGP (Kubernetes mode, bgp backend,
//! BIRD as the router every node peers with): the configured cluster IP
//! range from every node; an `externalTrafficPolicy: Local` Service's
//! addresses as /32 only from the node with its endpoint, moving with it;
//! real traffic from the router's side follows those routes.

mod common;
use common::bgp::*;
use common::*;
use std::time::Duration;
use trellis_lab::Outcome;

const T: Duration = Duration::from_secs(2);

/// No mesh: every node peers with BIRD on the fabric, which reflects;
/// the cluster IP range and an external IP range are advertised.
const MANIFEST: &str = "apiVersion: trellis.dev/v1
kind: BGPConfiguration
metadata: {name: default}
spec:
  nodeToNodeMeshEnabled: false
  holdTimeSeconds: 9
  serviceClusterIPs: [{cidr: 10.96.0.0/12}]
  serviceExternalIPs: [{cidr: 203.0.113.0/24}]
---
apiVersion: trellis.dev/v1
kind: BGPPeer
metadata: {name: router}
spec: {peerIP: 192.0.2.1, asNumber: 64512}
";

const WEB: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
";

const SOLO: &str = "apiVersion: v1
kind: Service
metadata: {name: solo, namespace: default}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  externalIPs: [203.0.113.10]
  selector: {app: solo}
  ports: [{name: http, port: 80, targetPort: 8080}]
";

/// BIRD's paths to `net`: the names of the nodes (its protocols) that
/// advertise it (birdc fails when it has none).
fn advertised_by(bird: &trellis_lab::bird::Bird, net: &str) -> Vec<String> {
    let out = bird.cmd(&["show", "route", net]).unwrap_or_default();
    let mut v: Vec<String> = out
        .lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once(" [")?;
            let proto = rest.split_whitespace().next()?;
            proto.starts_with('n').then(|| proto.to_string())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn service_addresses_are_advertised_and_follow_local_endpoints() {
    let Some(_running) =
        Datastore::Kubernetes.runs("service_addresses_are_advertised_and_follow_local_endpoints")
    else {
        return;
    };
    let mut lab = bgp_lab(Datastore::Kubernetes, 3, 1, Some(MANIFEST));
    let bird = trellis_lab::bird::router(&lab, "").expect("BIRD on the fabric");
    let mut backends = Vec::new();
    for n in ["n1", "n2", "n3"] {
        lab.add_pod(n, "web", "").expect("web pod");
        backends.push(lab.serve(n, "web", 8080).expect("serve web"));
        wait_established(&lab, n, 1);
    }
    lab.add_pod("n2", "solo", "").expect("solo pod");
    let solo_n2 = lab.serve("n2", "solo", 8080).expect("serve solo");
    lab.kubectl_stdin(&["apply", "-f", "-"], WEB)
        .expect("apply web");
    lab.kubectl_stdin(&["apply", "-f", "-"], SOLO)
        .expect("apply solo");
    let web_ip = cluster_ip(&lab, "web");
    let solo_ip = cluster_ip(&lab, "solo");
    let solo_32 = format!("{solo_ip}/32");

    // the range from every node; the Local Service's addresses from n2 only
    wait_for(
        "BIRD has the range from every node",
        Duration::from_secs(30),
        || advertised_by(&bird, "10.96.0.0/12") == ["n1", "n2", "n3"],
    );
    wait_for(
        "the Local Service's addresses from n2",
        Duration::from_secs(30),
        || {
            advertised_by(&bird, "203.0.113.10/32") == ["n2"]
                && advertised_by(&bird, &solo_32) == ["n2"]
        },
    );
    // the external IP range itself, from every node; nothing of the
    // Cluster-policy Service as /32
    assert_eq!(advertised_by(&bird, "203.0.113.0/24"), ["n1", "n2", "n3"]);
    assert!(advertised_by(&bird, &format!("{web_ip}/32")).is_empty());

    // real traffic from the router's namespace along those routes: the
    // external IP reaches n2's endpoint with the client's address kept;
    // the Cluster Service answers through whichever node BIRD chose
    let fabric = lab.fabric_ns();
    match lab.probe_tcp(&fabric, sa("203.0.113.10", 80), T) {
        Outcome::Answered { by, seen } => {
            assert_eq!(by, "solo-n2");
            assert_eq!(seen.ip().to_string(), "192.0.2.1", "client address kept");
        }
        o => panic!("external IP via BGP: {o:?}"),
    }
    let by = lab.probe_tcp(&fabric, sa(&web_ip, 80), T);
    assert!(
        by.by().is_some_and(|b| b.starts_with("web-")),
        "cluster IP via the advertised range: {by:?}"
    );

    // the endpoint moves to n3: so do the /32 routes, and the traffic
    drop(solo_n2);
    lab.del_pod("n2", "solo").expect("delete solo on n2");
    lab.add_pod("n3", "solo", "").expect("solo pod on n3");
    let _solo_n3 = lab.serve("n3", "solo", 8080).expect("serve solo on n3");
    wait_for("the /32 routes move to n3", Duration::from_secs(30), || {
        advertised_by(&bird, "203.0.113.10/32") == ["n3"]
            && advertised_by(&bird, &solo_32) == ["n3"]
    });
    wait_for("traffic follows", Duration::from_secs(10), || {
        lab.probe_tcp(&fabric, sa("203.0.113.10", 80), T).by() == Some("solo-n3")
    });

    // the external IP range leaves the configuration (nothing else
    // changes): its routes are withdrawn, the cluster IP range stays
    lab.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: trellis.dev/v1\nkind: BGPConfiguration\nmetadata: {name: default}\n\
         spec: {nodeToNodeMeshEnabled: false, holdTimeSeconds: 9, serviceClusterIPs: [{cidr: 10.96.0.0/12}]}\n",
    )
    .expect("apply the smaller configuration");
    wait_for("the external IP routes go", Duration::from_secs(30), || {
        advertised_by(&bird, "203.0.113.10/32").is_empty()
            && advertised_by(&bird, "203.0.113.0/24").is_empty()
    });
    assert_eq!(advertised_by(&bird, "10.96.0.0/12"), ["n1", "n2", "n3"]);
    assert_eq!(advertised_by(&bird, &solo_32), ["n3"]);
    drop(backends);
}
