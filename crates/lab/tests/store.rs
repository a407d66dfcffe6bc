//! The datastore and subnet leases against a real etcd in a lab namespace.

mod common;
use common::*;
use std::collections::HashSet;
use std::future::Future;
use std::time::{Duration, Instant};
use trellis_agent::lease::{claim, release, LeaseError};
use trellis_lab::{etcd::ETCD_ENDPOINT, netns, Lab, LabOptions};
use trellis_model::netconf::ClusterConfig;
use trellis_model::node::NodeRecord;
use trellis_store::{Datastore, EtcdOptions, EtcdStore, Event, StoreError, WatchItem};

const PREFIX: &str = "/trellis/v1/";

fn etcd_lab() -> Lab {
    Lab::create(LabOptions {
        nodes: 1,
        etcd: true,
        ..Default::default()
    })
    .expect("lab with etcd")
}

/// Runs `f` on a tokio runtime whose threads live in node n1's namespace.
fn on_node<T: Send, Fut: Future<Output = T>>(lab: &Lab, f: impl FnOnce() -> Fut + Send) -> T {
    netns::within(&netns::path(&lab.ns("n1")), || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(60), f()).await })
            .expect("test body timed out")
    })
    .expect("enter netns")
}

async fn store() -> EtcdStore {
    let opts = EtcdOptions {
        endpoints: vec![ETCD_ENDPOINT.into()],
        ..Default::default()
    };
    EtcdStore::connect(&opts).await.expect("connect")
}

fn record(node: &str) -> NodeRecord {
    NodeRecord {
        node: node.into(),
        subnet: "0.0.0.0/0".parse().expect("net"),
        public_ip: "192.0.2.11".parse().expect("ip"),
        backend_type: "vxlan".into(),
        vtep_mac: None,
        bgp: None,
    }
}

#[test]
fn compare_and_swap_leases_and_watch() {
    if !privileged("compare_and_swap_leases_and_watch") {
        return;
    }
    let lab = etcd_lab();
    on_node(&lab, || async {
        let s = store().await;
        // compare-and-swap
        assert!(s.create("/t/k", b"1".to_vec(), None).await.expect("create"));
        assert!(!s
            .create("/t/k", b"2".to_vec(), None)
            .await
            .expect("create again"));
        let kv = s.get("/t/k").await.expect("get").expect("exists");
        assert_eq!(kv.value, b"1");
        assert!(!s
            .update("/t/k", b"3".to_vec(), kv.mod_revision - 1, None)
            .await
            .expect("stale update"));
        assert!(s
            .update("/t/k", b"3".to_vec(), kv.mod_revision, None)
            .await
            .expect("update"));
        assert!(!s
            .delete("/t/k", Some(kv.mod_revision))
            .await
            .expect("stale delete"));
        assert!(s.delete("/t/k", None).await.expect("delete"));
        assert!(s.get("/t/k").await.expect("get").is_none());

        // a lease kept alive holds its key; once left alone it expires
        let lease = s.grant(Duration::from_secs(2)).await.expect("grant");
        s.put("/t/leased", b"x".to_vec(), Some(lease))
            .await
            .expect("put");
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            s.keep_alive(lease).await.expect("keep alive");
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        assert!(
            s.get("/t/leased").await.expect("get").is_some(),
            "kept-alive key vanished"
        );
        let gone = Instant::now() + Duration::from_secs(6);
        while s.get("/t/leased").await.expect("get").is_some() {
            assert!(Instant::now() < gone, "leased key did not expire");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let expired = s.keep_alive(lease).await;
        assert!(
            matches!(expired, Err(StoreError::LeaseGone(_))),
            "{expired:?}"
        );

        // watch from a listing's revision: every change, in order
        let listing = s.list("/w/").await.expect("list");
        let mut rx = s.watch("/w/", listing.revision).await.expect("watch");
        s.put("/w/a", b"1".to_vec(), None).await.expect("put");
        s.put("/w/b", b"2".to_vec(), None).await.expect("put");
        s.delete("/w/a", None).await.expect("delete");
        let mut seen = vec![];
        while seen.len() < 3 {
            match rx.recv().await.expect("watch item") {
                WatchItem::Events(ev) => seen.extend(ev),
                WatchItem::Resync(l) => panic!("unexpected resync {l:?}"),
            }
        }
        assert!(matches!(&seen[0], Event::Put(kv) if kv.key == "/w/a"));
        assert!(matches!(&seen[1], Event::Put(kv) if kv.key == "/w/b"));
        assert!(matches!(&seen[2], Event::Delete { key, .. } if key == "/w/a"));

        // a watch from a compacted revision resynchronises with a fresh list
        let old = s.list("/c/").await.expect("list").revision;
        for i in 0..5 {
            s.put("/c/x", i.to_string().into_bytes(), None)
                .await
                .expect("put");
        }
        let now = s.list("/c/").await.expect("list").revision;
        s.compact(now).await.expect("compact");
        let mut rx = s.watch("/c/", old).await.expect("watch");
        match rx.recv().await.expect("item") {
            WatchItem::Resync(l) => {
                assert_eq!(l.items.len(), 1);
                assert_eq!(l.items[0].value, b"4");
            }
            other => panic!("expected a resync, got {other:?}"),
        }
        s.put("/c/y", b"after".to_vec(), None).await.expect("put");
        match rx.recv().await.expect("item") {
            WatchItem::Events(ev) => assert!(matches!(&ev[0], Event::Put(kv) if kv.key == "/c/y")),
            other => panic!("expected events, got {other:?}"),
        }
    });
}

#[test]
fn unreachable_etcd_is_a_clear_error() {
    if !privileged("unreachable_etcd_is_a_clear_error") {
        return;
    }
    let lab = etcd_lab();
    on_node(&lab, || async {
        // an address of the lab fabric where nothing listens
        let opts = EtcdOptions {
            endpoints: vec!["http://192.0.2.99:2379".into()],
            timeout: Duration::from_secs(1),
            ..Default::default()
        };
        let started = Instant::now();
        let err = match EtcdStore::connect(&opts).await {
            Err(e) => e,
            Ok(s) => s.list("/x").await.expect_err("no etcd there"),
        };
        assert!(matches!(err, StoreError::Unreachable { .. }), "{err}");
        assert!(err.to_string().contains("192.0.2.99:2379"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    });
}

#[test]
fn twenty_nodes_claim_at_once_and_never_share() {
    if !privileged("twenty_nodes_claim_at_once_and_never_share") {
        return;
    }
    let lab = etcd_lab();
    let cfg = ClusterConfig::parse(r#"{"Network":"10.244.0.0/16","SubnetLen":24}"#).expect("cfg");
    on_node(&lab, || async {
        let s = store().await;
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let (s, cfg) = (s.clone(), cfg.clone());
                tokio::spawn(async move {
                    claim(
                        &s,
                        PREFIX,
                        &cfg,
                        &record(&format!("node{i}")),
                        None,
                        Duration::from_secs(30),
                    )
                    .await
                })
            })
            .collect();
        let mut subnets = HashSet::new();
        for t in tasks {
            let lease = t.await.expect("join").expect("claim");
            assert!(
                subnets.insert(lease.subnet),
                "{} handed out twice",
                lease.subnet
            );
        }
        assert_eq!(subnets.len(), 20);
        let held = s.list(&format!("{PREFIX}subnets/")).await.expect("list");
        assert_eq!(held.items.len(), 20);
        // a restart of node3 (new lease, same name) gets the same subnet back
        let before: NodeRecord = held
            .items
            .iter()
            .map(|kv| serde_json::from_slice::<NodeRecord>(&kv.value).expect("record"))
            .find(|r| r.node == "node3")
            .expect("node3");
        let again = claim(
            &s,
            PREFIX,
            &cfg,
            &record("node3"),
            None,
            Duration::from_secs(30),
        )
        .await
        .expect("reclaim");
        assert_eq!(again.subnet, before.subnet);
        // a clean decommission frees it at once
        release(&s, &again).await.expect("release");
        assert!(s.get(&again.key).await.expect("get").is_none());
    });
}

#[test]
fn dead_node_subnet_frees_only_after_ttl_and_exhaustion_is_an_error() {
    if !privileged("dead_node_subnet_frees_only_after_ttl_and_exhaustion_is_an_error") {
        return;
    }
    let lab = etcd_lab();
    // room for exactly two nodes
    let cfg =
        ClusterConfig::parse(r#"{"Network":"10.9.0.0/23","SubnetLen":24,"SubnetMin":"10.9.0.0"}"#)
            .expect("cfg");
    on_node(&lab, || async {
        let s = store().await;
        let ttl = Duration::from_secs(3);
        let dead = claim(&s, PREFIX, &cfg, &record("dead"), None, ttl)
            .await
            .expect("claim");
        let alive = claim(
            &s,
            PREFIX,
            &cfg,
            &record("alive"),
            None,
            Duration::from_secs(60),
        )
        .await
        .expect("claim");
        assert_ne!(dead.subnet, alive.subnet);
        // full: a third node gets a clear error at once, not a hang
        let started = Instant::now();
        match claim(&s, PREFIX, &cfg, &record("late"), None, ttl).await {
            Err(LeaseError::Exhausted { capacity: 2, .. }) => {}
            other => panic!("expected exhaustion, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        // "dead" never keeps its lease alive: still held before the TTL...
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(
            s.get(&dead.key).await.expect("get").is_some(),
            "freed before its TTL"
        );
        // ...and free after it
        let deadline = Instant::now() + Duration::from_secs(8);
        let late = loop {
            match claim(&s, PREFIX, &cfg, &record("late"), None, ttl).await {
                Ok(l) => break l,
                Err(LeaseError::Exhausted { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("dead node's subnet never freed: {e}"),
            }
        };
        assert_eq!(late.subnet, dead.subnet);
    });
}

#[test]
fn tls_with_client_certificates() {
    if !privileged("tls_with_client_certificates") {
        return;
    }
    let mut lab = Lab::create(LabOptions {
        nodes: 1,
        ..Default::default()
    })
    .expect("lab");
    let (members, certs) = lab.start_etcd_cluster(1, true).expect("tls etcd");
    let certs = certs.expect("certs");
    let url = members[0].client_url(true);
    on_node(&lab, || async {
        let tls = trellis_store::TlsFiles {
            ca: certs.ca.clone(),
            cert: certs.cert.clone(),
            key: certs.key.clone(),
        };
        let opts = EtcdOptions {
            endpoints: vec![url.clone()],
            tls: Some(tls),
            timeout: Duration::from_secs(5),
        };
        let s = EtcdStore::connect(&opts)
            .await
            .expect("connect with a client certificate");
        assert!(s
            .create("/tls/k", b"v".to_vec(), None)
            .await
            .expect("create over tls"));
        assert_eq!(s.get("/tls/k").await.expect("get").expect("kv").value, b"v");
        // without a client certificate the server refuses
        let plain = EtcdOptions {
            endpoints: vec![url.clone()],
            tls: None,
            timeout: Duration::from_secs(2),
        };
        let refused = match EtcdStore::connect(&plain).await {
            Ok(s) => s.get("/tls/k").await.map(|_| ()),
            Err(e) => Err(e),
        };
        assert!(
            refused.is_err(),
            "plain client accepted by a client-cert etcd"
        );
        // a missing certificate file is named
        let bad = trellis_store::TlsFiles {
            ca: certs.ca.clone(),
            cert: "/nonexistent.pem".into(),
            key: certs.key.clone(),
        };
        let err = EtcdStore::connect(&EtcdOptions {
            endpoints: vec![url],
            tls: Some(bad),
            timeout: Duration::from_secs(2),
        })
        .await
        .expect_err("bad cert path");
        assert!(err.to_string().contains("/nonexistent.pem"), "{err}");
    });
}

#[test]
fn survives_the_loss_of_one_member_of_three() {
    if !privileged("survives_the_loss_of_one_member_of_three") {
        return;
    }
    let mut lab = Lab::create(LabOptions {
        nodes: 1,
        ..Default::default()
    })
    .expect("lab");
    let (members, _) = lab.start_etcd_cluster(3, false).expect("3 members");
    let endpoints: Vec<String> = members.iter().map(|m| m.client_url(false)).collect();
    let opts = EtcdOptions {
        endpoints: endpoints.clone(),
        tls: None,
        timeout: Duration::from_secs(5),
    };
    let (store, rev) = on_node(&lab, || async {
        let s = EtcdStore::connect(&opts).await.expect("connect");
        assert!(s
            .create("/ha/a", b"1".to_vec(), None)
            .await
            .expect("create"));
        let rev = s.list("/ha/").await.expect("list").revision;
        (s, rev)
    });
    drop(store);
    lab.kill_etcd_member(&members[0].name).expect("kill m0");
    on_node(&lab, || async {
        let s = EtcdStore::connect(&opts).await.expect("connect after loss");
        let mut rx = s.watch("/ha/", rev).await.expect("watch");
        // writes and reads go on with two of three members: the store
        // itself moves off the dead endpoint, every call succeeds first time
        for _ in 0..20 {
            s.list("/ha/").await.expect("list after member loss");
        }
        assert!(s
            .create("/ha/b", b"2".to_vec(), None)
            .await
            .expect("create after member loss"));
        assert_eq!(s.list("/ha/").await.expect("list").items.len(), 2);
        match tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("watch event in time")
            .expect("item")
        {
            WatchItem::Events(ev) => assert!(matches!(&ev[0], Event::Put(kv) if kv.key == "/ha/b")),
            other => panic!("expected the put, got {other:?}"),
        }
    });
}
