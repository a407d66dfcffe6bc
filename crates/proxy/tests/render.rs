//! The rendered table: golden files (regenerate with
//! `TRELLIS_GOLDEN=1 cargo test -p trellis-proxy`), every script applied
//! by the real nft in a private network namespace, and incremental plans
//! checked against a fresh full rendering of the same state in the kernel.

mod common;

use common::*;
use trellis_proxy::{Protocol, Proxy, Service, ServiceType, Slice};

const TCP: Protocol = Protocol::Tcp;
const UDP: Protocol = Protocol::Udp;

fn cluster_ip() -> (Vec<Service>, Vec<Slice>) {
    let web = svc(
        "default",
        "web",
        "10.96.0.10",
        vec![port("http", TCP, 80, None)],
    );
    let dns = svc(
        "kube-system",
        "dns",
        "10.96.0.53",
        vec![port("dns", UDP, 53, None), port("dns-tcp", TCP, 53, None)],
    );
    let empty = svc(
        "default",
        "empty",
        "10.96.0.99",
        vec![port("", TCP, 80, None)],
    );
    let slices = vec![
        slice(
            "default",
            "web",
            &[("http", TCP, 8080)],
            &[
                ready("10.244.1.5", "n1"),
                ready("10.244.2.5", "n2"),
                ready("10.244.3.5", "n3"),
            ],
        ),
        slice(
            "kube-system",
            "dns",
            &[("dns", UDP, 5353), ("dns-tcp", TCP, 5353)],
            &[ready("10.244.2.7", "n2")],
        ),
    ];
    (vec![web, dns, empty], slices)
}

fn shapes() -> (Vec<Service>, Vec<Slice>) {
    let mut np = svc(
        "default",
        "np",
        "10.96.1.1",
        vec![port("http", TCP, 80, Some(30080))],
    );
    np.kind = ServiceType::NodePort;
    let mut lb = svc(
        "default",
        "lb",
        "10.96.1.2",
        vec![port("http", TCP, 80, Some(30081))],
    );
    lb.kind = ServiceType::LoadBalancer;
    lb.lb_ips = vec!["203.0.113.50".parse().expect("ip")];
    lb.lb_source_ranges = vec!["198.51.100.0/24".parse().expect("cidr")];
    lb.external_local = true;
    lb.health_check_node_port = Some(31000);
    let mut ext = svc(
        "default",
        "ext",
        "10.96.1.3",
        vec![port("http", TCP, 80, None)],
    );
    ext.external_ips = vec!["203.0.113.60".parse().expect("ip")];
    let mut sticky = svc(
        "default",
        "sticky",
        "10.96.1.4",
        vec![port("http", TCP, 80, None)],
    );
    sticky.affinity_timeout = Some(30);
    let mut itp = svc(
        "default",
        "itp",
        "10.96.1.5",
        vec![port("http", TCP, 80, None)],
    );
    itp.internal_local = true;
    let mut itp_none = svc(
        "default",
        "itp-none",
        "10.96.1.6",
        vec![port("http", TCP, 80, None)],
    );
    itp_none.internal_local = true;
    let term = svc(
        "default",
        "term",
        "10.96.1.7",
        vec![port("http", TCP, 80, None)],
    );
    let sctp = svc(
        "default",
        "sctp",
        "10.96.1.8",
        vec![port("s", Protocol::Sctp, 9, None)],
    );
    let two = |s: &str| {
        slice(
            "default",
            s,
            &[("http", TCP, 8080)],
            &[ready("10.244.1.10", "n1"), ready("10.244.2.10", "n2")],
        )
    };
    let slices = vec![
        two("np"),
        two("lb"),
        two("ext"),
        two("sticky"),
        two("itp"),
        slice(
            "default",
            "itp-none",
            &[("http", TCP, 8080)],
            &[ready("10.244.2.11", "n2")],
        ),
        slice(
            "default",
            "term",
            &[("http", TCP, 8080)],
            &[
                ("10.244.1.12", "n1", false, true, true),
                ("10.244.2.12", "n2", false, false, true),
            ],
        ),
        slice(
            "default",
            "sctp",
            &[("s", Protocol::Sctp, 9)],
            &[ready("10.244.2.13", "n2")],
        ),
    ];
    (vec![np, lb, ext, sticky, itp, itp_none, term, sctp], slices)
}

fn full(services: Vec<Service>, slices: Vec<Slice>) -> (Proxy, String) {
    let mut p = Proxy::new(node());
    p.replace(services, slices);
    let plan = p.plan();
    assert!(plan.full);
    let text = plan.script.clone();
    p.applied(plan);
    (p, text)
}

fn golden(name: &str, text: &str) {
    let path = format!("{}/tests/golden/{name}.nft", env!("CARGO_MANIFEST_DIR"));
    if std::env::var_os("TRELLIS_GOLDEN").is_some() {
        std::fs::write(&path, text).expect("write golden");
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e} (TRELLIS_GOLDEN=1 writes it)"));
    assert_eq!(
        text, want,
        "{name} differs from {path} (TRELLIS_GOLDEN=1 rewrites it)"
    );
}

#[test]
fn golden_cluster_ip() {
    let (s, e) = cluster_ip();
    let (_, text) = full(s, e);
    golden("cluster_ip", &text);
    if let Some(r) = apply_in_netns(&[text]) {
        r.expect("the kernel takes it");
    }
}

#[test]
fn golden_shapes() {
    let (s, e) = shapes();
    let (p, text) = full(s, e);
    golden("shapes", &text);
    if let Some(r) = nft_check(&text) {
        r.expect("nft -c");
    }
    if let Some(r) = apply_in_netns(std::slice::from_ref(&text)) {
        let by_nft = r.expect("the kernel takes it");
        let by_netlink = apply_netlink_in_netns(&[text])
            .expect("root")
            .expect("the kernel takes it over netlink");
        assert_same_table(
            &by_netlink,
            &by_nft,
            "netlink and nft leave different tables",
        );
    }
    // what each shape was programmed with
    let verdict = |k: &str| p.programmed(k).expect(k).ports[0].verdict.clone();
    assert_eq!(verdict("default/itp-none"), "drop");
    assert_eq!(verdict("default/term"), "serve");
    assert_eq!(
        p.programmed("default/term").expect("term").ports[0].endpoints,
        vec!["10.244.1.12:8080".parse().expect("sa")],
        "only the serving terminating endpoint"
    );
    assert_eq!(p.programmed("default/lb").expect("lb").local_endpoints, 1);
}

/// Applies `steps` one after another incrementally and checks, after
/// every step, that the kernel holds what a fresh full rendering of that
/// step's state puts there.
fn incremental_matches_full(steps: Vec<(Vec<Service>, Vec<Slice>)>) -> Vec<(bool, usize)> {
    let mut p = Proxy::new(node());
    let mut scripts = Vec::new();
    let mut plans = Vec::new();
    for (i, (services, slices)) in steps.iter().cloned().enumerate() {
        p.replace(services, slices);
        let plan = p.plan();
        scripts.push(plan.script.clone());
        plans.push((plan.full, plan.services));
        p.applied(plan);
        let (s, e) = steps[i].clone();
        let (_, fresh) = full(s, e);
        if let (Some(a), Some(b)) = (
            apply_in_netns(&scripts),
            apply_in_netns(std::slice::from_ref(&fresh)),
        ) {
            let a = a.expect("incremental scripts apply");
            let b = b.expect("full script applies");
            assert_same_table(
                &common::ids_named(&a),
                &common::ids_named(&b),
                &format!("step {i}: incremental and full renderings differ in the kernel"),
            );
            // the agent's way: the same scripts as netlink batches leave
            // the kernel exactly as nft does
            let n = apply_netlink_in_netns(&scripts)
                .expect("root")
                .expect("incremental scripts apply over netlink");
            assert_same_table(
                &n,
                &a,
                &format!("step {i}: netlink and nft differ (incremental)"),
            );
            let nf = apply_netlink_in_netns(&[fresh])
                .expect("root")
                .expect("full script applies over netlink");
            assert_same_table(&nf, &b, &format!("step {i}: netlink and nft differ (full)"));
        }
    }
    plans
}

#[test]
fn incremental_changes_end_where_a_full_rendering_does() {
    let (s0, e0) = shapes();
    let (c0, ce0) = cluster_ip();
    let all = |s: &[Service], e: &[Slice]| -> (Vec<Service>, Vec<Slice>) {
        let mut s = s.to_vec();
        let mut e = e.to_vec();
        s.extend(c0.clone());
        e.extend(ce0.clone());
        (s, e)
    };
    let start = all(&s0, &e0);
    // 1: endpoints come and go, a Service loses all, one gains affinity,
    // a node port moves, one Service goes, a new one comes
    let mut s1 = start.0.clone();
    let mut e1 = start.1.clone();
    e1.retain(|s| s.service != "np");
    e1.iter_mut().filter(|s| s.service == "web").for_each(|s| {
        s.endpoints.remove(0);
    });
    s1.iter_mut()
        .filter(|s| s.name == "web")
        .for_each(|s| s.affinity_timeout = Some(60));
    s1.iter_mut().filter(|s| s.name == "lb").for_each(|s| {
        s.ports[0].node_port = Some(30090);
        s.lb_source_ranges
            .push("192.0.2.0/24".parse().expect("cidr"));
    });
    s1.retain(|s| s.name != "ext");
    s1.push(svc(
        "default",
        "new",
        "10.96.2.1",
        vec![port("http", TCP, 80, None)],
    ));
    e1.push(slice(
        "default",
        "new",
        &[("http", TCP, 8080)],
        &[ready("10.244.3.9", "n3")],
    ));
    // 2: affinity timeout changes (the map is declared again), the
    // emptied Service gets endpoints back, the ITP Service gets a local one
    let mut s2 = s1.clone();
    let mut e2 = e1.clone();
    s2.iter_mut()
        .filter(|s| s.name == "web")
        .for_each(|s| s.affinity_timeout = Some(120));
    e2.push(slice(
        "default",
        "np",
        &[("http", TCP, 8080)],
        &[ready("10.244.1.20", "n1")],
    ));
    e2.iter_mut()
        .filter(|s| s.service == "itp-none")
        .for_each(|s| {
            s.endpoints.push(
                common::slice("x", "y", &[], &[ready("10.244.1.21", "n1")]).endpoints[0].clone(),
            )
        });
    // ... and one gets 32 more endpoints: a pick chain for its new
    // number comes (step 3 takes them back: that chain goes)
    let mut s3 = s2.clone();
    let e3 = e2.clone();
    e2.iter_mut().filter(|s| s.service == "new").for_each(|s| {
        for j in 0..32 {
            let ip = format!("10.244.4.{}", j + 1);
            s.endpoints
                .push(common::slice("x", "y", &[], &[ready(&ip, "n3")]).endpoints[0].clone());
        }
    });
    s3.retain(|s| s.name != "web");
    // 4: everything goes
    let plans =
        incremental_matches_full(vec![start, (s1, e1), (s2, e2), (s3, e3), (vec![], vec![])]);
    assert!(plans[0].0 && !plans[1].0 && !plans[2].0);
}

#[test]
fn one_endpoint_change_renders_one_service() {
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for i in 0..500u32 {
        let name = format!("s{i}");
        let ip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
        services.push(svc("bench", &name, &ip, vec![port("p", UDP, 53, None)]));
        let eps: Vec<String> = (0..10)
            .map(|j| format!("10.244.{}.{}", j, i % 250 + 1))
            .collect();
        let eps: Vec<Ep> = eps.iter().map(|a| ready(a.as_str(), "n2")).collect();
        slices.push(slice("bench", &name, &[("p", UDP, 5353)], &eps));
    }
    let (mut p, _) = full(services, slices.clone());
    let mut changed = slices[7].clone();
    let gone = changed.endpoints.remove(3);
    p.set_slice("bench/s7-abc", Some(changed));
    let plan = p.plan();
    assert_eq!(plan.services, 1);
    assert!(!plan.full);
    assert!(!plan.script.contains("bench/s8/"), "{}", plan.script);
    // elements of the endpoint choice only: its picker goes to the chain
    // for 9 (new: its first user), the endpoints from the 4th on move up
    // one, the 10th goes; no rule of the Service table is touched (the
    // kernel would check that whole table)
    assert!(plan.script.lines().count() <= 8, "{}", plan.script);
    assert!(!plan.script.contains("trellis-proxy"), "{}", plan.script);
    assert!(
        plan.script
            .contains("add chain inet trellis-endpoints pick-9-udp"),
        "{}",
        plan.script
    );
    // the removed UDP endpoint's flows to this Service must go
    assert_eq!(
        plan.stale_udp,
        vec![trellis_proxy::UdpFlows {
            endpoint: Some(std::net::SocketAddr::new(gone.address, 5353)),
            dests: vec!["10.96.0.8:53".parse().expect("sa")],
            node_ports: vec![],
        }]
    );
    p.applied(plan);
    assert!(!p.pending());
    assert!(p.plan().script.is_empty(), "nothing left to do");
    // an endpoint replaced (as many as before): two elements, nothing else
    let mut moved = slices[9].clone();
    moved.endpoints[0].address = "10.244.99.9".parse().expect("ip");
    p.set_slice("bench/s9-abc", Some(moved));
    let plan = p.plan();
    let lines: Vec<&str> = plan.script.lines().collect();
    assert_eq!(lines.len(), 2, "{}", plan.script);
    assert!(
        lines[0].starts_with("delete element inet trellis-endpoints endpoints_udp")
            && lines[1].starts_with("add element inet trellis-endpoints endpoints_udp"),
        "{}",
        plan.script
    );
}

#[test]
fn a_service_with_problems_is_not_programmed_and_conflicts_are_named() {
    let mut bad = svc(
        "default",
        "bad",
        "10.96.0.10",
        vec![port("http", TCP, 80, None)],
    );
    bad.problems = vec!["spec.ports[0].protocol: \"QUIC\" is not TCP, UDP or SCTP".into()];
    let mut far = svc(
        "default",
        "far",
        "10.96.0.11",
        vec![port("http", TCP, 80, Some(40000))],
    );
    far.kind = ServiceType::NodePort;
    let mut a = svc(
        "default",
        "a",
        "10.96.0.12",
        vec![port("http", TCP, 80, None)],
    );
    a.external_ips = vec!["203.0.113.7".parse().expect("ip")];
    let mut b = svc(
        "default",
        "b",
        "10.96.0.13",
        vec![port("http", TCP, 80, None)],
    );
    b.external_ips = vec!["203.0.113.7".parse().expect("ip")];
    let eps = |s: &str| {
        slice(
            "default",
            s,
            &[("http", TCP, 8080)],
            &[ready("10.244.1.5", "n1")],
        )
    };
    let (p, text) = full(
        vec![bad, far, a, b],
        vec![eps("bad"), eps("far"), eps("a"), eps("b")],
    );
    assert!(!text.contains("default/bad/"), "{text}");
    assert!(!text.contains("default/far/"), "{text}");
    let far = p.programmed("default/far").expect("far");
    assert!(far.problems[0].contains("40000 is outside the node port range 30000-32767"));
    let c = p.conflicts();
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(
        (c[0].service.as_str(), c[0].owner.as_str()),
        ("default/b", "default/a")
    );
    if let Some(r) = apply_in_netns(&[text]) {
        r.expect("the kernel takes it");
    }
}

#[test]
fn the_owner_of_a_shared_address_does_not_depend_on_history() {
    let ext = |name: &str| {
        let mut s = svc(
            "default",
            name,
            "10.96.5.1",
            vec![port("http", TCP, 80, None)],
        );
        s.cluster_ips = vec![format!("10.96.5.{}", name.len()).parse().expect("ip")];
        s.external_ips = vec!["203.0.113.7".parse().expect("ip")];
        s
    };
    let eps = |s: &str, a: &str| slice("default", s, &[("http", TCP, 8080)], &[ready(a, "n2")]);
    // b first, then a arrives, then a's endpoints change: a ("default/a"
    // sorts first) owns the address in every step, as a full rendering says
    let steps = vec![
        (vec![ext("bb")], vec![eps("bb", "10.244.2.1")]),
        (
            vec![ext("bb"), ext("a")],
            vec![eps("bb", "10.244.2.1"), eps("a", "10.244.2.2")],
        ),
        (
            vec![ext("bb"), ext("a")],
            vec![eps("bb", "10.244.2.1"), eps("a", "10.244.2.3")],
        ),
        (vec![ext("bb")], vec![eps("bb", "10.244.2.1")]),
    ];
    incremental_matches_full(steps);
    let (p, _) = full(
        vec![ext("bb"), ext("a")],
        vec![eps("bb", "10.244.2.1"), eps("a", "10.244.2.2")],
    );
    let c = p.conflicts();
    assert_eq!(
        (c[0].service.as_str(), c[0].owner.as_str()),
        ("default/bb", "default/a")
    );
}

#[test]
fn overlapping_source_ranges_load() {
    let mut lb = svc(
        "default",
        "lb",
        "10.96.6.1",
        vec![port("http", TCP, 80, None)],
    );
    lb.kind = ServiceType::LoadBalancer;
    lb.lb_ips = vec!["203.0.113.50".parse().expect("ip")];
    lb.lb_source_ranges = ["10.0.0.0/8", "10.1.0.0/16", "10.0.0.0/8", "192.0.2.7/32"]
        .iter()
        .map(|r| r.parse().expect("cidr"))
        .collect();
    let e = slice(
        "default",
        "lb",
        &[("http", TCP, 8080)],
        &[ready("10.244.1.5", "n1")],
    );
    let (_, text) = full(vec![lb.clone()], vec![e.clone()]);
    if let Some(r) = apply_in_netns(&[text]) {
        r.expect("overlapping ranges are merged, not refused");
    }
    let mut wider = lb.clone();
    wider
        .lb_source_ranges
        .push("0.0.0.0/0".parse().expect("cidr"));
    incremental_matches_full(vec![(vec![lb], vec![e.clone()]), (vec![wider], vec![e])]);
}

#[test]
fn a_batch_the_kernel_refuses_names_its_line_and_leaves_nothing() {
    let (s, e) = cluster_ip();
    let (_, text) = full(s, e);
    // a verdict to a chain that does not exist, after a good table
    let bad = format!(
        "{text}add element inet {} services {{ 10.96.9.9 . tcp . 80 : goto svc-nowhere }}\n",
        trellis_proxy::TABLE
    );
    let Some(r) = apply_netlink_in_netns(&[bad]) else {
        return;
    };
    let err = r.expect_err("the kernel refuses a goto to a missing chain");
    assert!(err.contains("goto svc-nowhere"), "{err}");
    assert!(err.contains("nothing was applied"), "{err}");
    // a first good batch, then a refused one: the first stays whole
    let Some(r) = apply_netlink_in_netns(&[
        text.clone(),
        format!(
            "add rule inet {} dispatch jump nowhere\n",
            trellis_proxy::TABLE
        ),
    ]) else {
        return;
    };
    let err = r.expect_err("refused");
    assert!(err.contains("script 1 refused"), "{err}");
}

#[test]
fn a_restored_proxy_applies_only_what_changed_while_it_was_down() {
    let (s, e) = shapes();
    let (before, text) = full(s.clone(), e.clone());
    type Saved = Vec<(
        String,
        trellis_proxy::stored::Inputs,
        trellis_proxy::render::Fragment,
    )>;
    let saved: Saved = before
        .applied_fragments()
        .map(|(k, i, f)| (k.clone(), i, f))
        .collect();
    assert!(
        saved.iter().all(|(_, i, _)| *i != (0, 0)),
        "fingerprints kept"
    );
    // through JSON, as the journal keeps them
    let restored = |saved: &Saved| -> Vec<trellis_proxy::stored::Restored> {
        saved
            .iter()
            .map(|(key, inputs, f)| {
                let json = serde_json::to_string(f).expect("ser");
                let (stored, shared, ids) =
                    trellis_proxy::stored::Stored::from_json(&json).expect("a fragment");
                trellis_proxy::stored::Restored {
                    key: key.clone(),
                    inputs: *inputs,
                    stored,
                    shared,
                    ids,
                }
            })
            .collect()
    };
    // nothing changed: nothing to apply, and nothing rendered again (the
    // inputs' fingerprints are those applied)
    let mut p = Proxy::new(node());
    p.restore(restored(&saved));
    p.replace(s.clone(), e.clone());
    let plan = p.plan();
    assert!(!plan.full);
    assert_eq!(plan.script, "", "nothing changed while down");
    assert!(plan.keys().is_empty() && plan.refreshed().is_empty());
    // the fingerprint decides: a journal claiming other objects for the
    // same inputs is believed (nothing rendered) ...
    let mut lying = saved.clone();
    lying[0].2.local_endpoints += 7;
    let mut p = Proxy::new(node());
    p.restore(restored(&lying));
    p.replace(s.clone(), e.clone());
    assert!(p.plan().keys().is_empty());
    // ... while unknown fingerprints (a journal of an older version) or
    // another build's make every Service render again: unchanged ones
    // only get their fingerprint recorded, the changed one is applied
    for build in ["", "another build"] {
        let mut unknown = lying.clone();
        if build.is_empty() {
            unknown.iter_mut().for_each(|(_, i, _)| *i = (0, 0));
        }
        let mut p = Proxy::new(node());
        p.set_build(build);
        p.restore(restored(&unknown));
        p.replace(s.clone(), e.clone());
        let plan = p.plan();
        assert_eq!(plan.keys().len(), 1, "{build:?}");
        assert_eq!(plan.keys()[0], lying[0].0);
        assert_eq!(plan.refreshed().len(), saved.len() - 1, "{build:?}");
        p.applied(plan);
        assert!(
            p.applied_fragments().all(|(_, i, _)| i != (0, 0)),
            "fingerprints recorded: {build:?}"
        );
    }
    // one Service gone and one endpoint moved while down
    let mut s2 = s.clone();
    s2.retain(|x| x.name != "term");
    let mut e2 = e.clone();
    e2.retain(|x| x.service != "term");
    e2[0].endpoints[0].address = "10.244.1.99".parse().expect("ip");
    let mut p = Proxy::new(node());
    p.restore(restored(&saved));
    p.replace(s2.clone(), e2.clone());
    let plan = p.plan();
    assert!(!plan.full);
    assert!(plan.script.lines().count() < 20, "{}", plan.script);
    // and the kernel ends where a fresh full load of the new state does
    let incremental = vec![text, plan.script.clone()];
    let (_, fresh) = full(s2, e2);
    if let (Some(a), Some(b)) = (
        apply_netlink_in_netns(&incremental),
        apply_in_netns(&[fresh]),
    ) {
        let (a, b) = (a.expect("applies"), b.expect("applies"));
        // the stamps differ only if they were chosen differently: both 0 here
        assert_same_table(&a, &b, "restored + changes vs a fresh full load");
    }
}
