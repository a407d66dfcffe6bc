//! Unit tests of the source: relists, key moves, slow subscribers, listings
//! before the first sync.

use super::*;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ObjectMeta;

fn cm(name: &str, v: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some([("v".to_string(), v.to_string())].into()),
        ..Default::default()
    }
}

fn show(o: &ConfigMap) -> Shown {
    let v = o.data.as_ref()?.get("v")?.clone();
    // the value names the key, like a podCIDR names a subnet key
    Some((format!("/p/{v}"), o.metadata.name.clone()?.into_bytes()))
}

/// A source with one watched kind (no watch running: the tests feed it).
fn one_kind(synced: bool) -> KubeSource {
    let src = KubeSource::new("test");
    src.lock().kinds.push(Kind {
        name: "configmaps".into(),
        synced,
        prefix: "/p/".into(),
        ..Default::default()
    });
    src
}

fn keys(l: &Listing) -> Vec<String> {
    l.items.iter().map(|i| i.key.clone()).collect()
}

#[tokio::test]
async fn relists_turn_into_deletes_and_key_moves_into_delete_put() {
    let src = one_kind(false);
    let ev = |e: WEvent<ConfigMap>| src.on_event(0, e, &show);
    ev(WEvent::Init);
    ev(WEvent::InitApply(cm("a", "1")));
    ev(WEvent::InitApply(cm("b", "2")));
    assert!(src.all_synced("/p/").is_err(), "not synced before InitDone");
    assert!(
        src.all_synced("/q/").is_ok(),
        "a listing of keys the kind cannot show does not wait for it"
    );
    ev(WEvent::InitDone);
    let l = Source::list(&src, "/p/").await.expect("list");
    assert_eq!(keys(&l), ["/p/1", "/p/2"]);
    let mut rx = Source::watch(&src, "/p/", l.revision).await.expect("watch");
    // a changed value that names another key: delete the old, put the new
    ev(WEvent::Apply(cm("a", "3")));
    let Some(WatchItem::Events(e)) = rx.recv().await else {
        panic!("events")
    };
    assert!(
        matches!(&e[0], Event::Delete { key, .. } if key == "/p/1"),
        "{e:?}"
    );
    assert!(matches!(&e[1], Event::Put(kv) if kv.key == "/p/3"), "{e:?}");
    // the same object again: nothing
    ev(WEvent::Apply(cm("a", "3")));
    assert!(rx.try_recv().is_err());
    // a relist without b (deleted while the watch was down): b goes
    ev(WEvent::Init);
    ev(WEvent::InitApply(cm("a", "3")));
    ev(WEvent::InitDone);
    let Some(WatchItem::Events(e)) = rx.recv().await else {
        panic!("events")
    };
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        matches!(&e[0], Event::Delete { key, .. } if key == "/p/2"),
        "{e:?}"
    );
    // a watch from an old revision starts with a fresh listing
    let mut late = Source::watch(&src, "/p/", l.revision).await.expect("watch");
    let Some(WatchItem::Resync(l2)) = late.recv().await else {
        panic!("resync")
    };
    assert_eq!(keys(&l2), ["/p/3"]);
}

#[tokio::test]
async fn keys_that_change_hands_in_a_relist_end_held_and_shared_keys_stay() {
    let src = one_kind(false);
    let ev = |e: WEvent<ConfigMap>| src.on_event(0, e, &show);
    ev(WEvent::Init);
    ev(WEvent::InitApply(cm("a", "1")));
    ev(WEvent::InitApply(cm("b", "3")));
    ev(WEvent::InitDone);
    let l = Source::list(&src, "/p/").await.expect("list");
    let mut rx = Source::watch(&src, "/p/", l.revision).await.expect("watch");
    // a moved to key 2, b took a's old key 1
    ev(WEvent::Init);
    ev(WEvent::InitApply(cm("a", "2")));
    ev(WEvent::InitApply(cm("b", "1")));
    ev(WEvent::InitDone);
    let Some(WatchItem::Events(e)) = rx.recv().await else {
        panic!("events")
    };
    // replaying the events leaves exactly keys 1 and 2
    let mut held = std::collections::BTreeSet::from(["/p/1".to_string(), "/p/3".to_string()]);
    for e in &e {
        match e {
            Event::Put(kv) => held.insert(kv.key.clone()),
            Event::Delete { key, .. } => held.remove(key),
        };
    }
    assert_eq!(
        held.into_iter().collect::<Vec<_>>(),
        ["/p/1", "/p/2"],
        "{e:?}"
    );
    // two objects showing one key: it stays while one still does
    ev(WEvent::Apply(cm("c", "2")));
    ev(WEvent::Delete(cm("a", "2")));
    let l = Source::list(&src, "/p/").await.expect("list");
    assert_eq!(keys(&l), ["/p/1", "/p/2"]);
    while let Ok(WatchItem::Events(e)) = rx.try_recv() {
        assert!(
            !e.iter()
                .any(|e| matches!(e, Event::Delete { key, .. } if key == "/p/2")),
            "{e:?}"
        );
    }
}

#[tokio::test]
async fn a_slow_subscriber_is_dropped_not_buffered_without_bound() {
    let src = one_kind(true);
    let rev = src.lock().revision;
    let mut rx = Source::watch(&src, "/p/", rev).await.expect("watch");
    for i in 0..(SUBSCRIBER_QUEUE + 10) {
        src.on_event(0, WEvent::Apply(cm("a", &i.to_string())), &show);
    }
    let mut n = 0;
    while rx.recv().await.is_some() {
        n += 1;
    }
    assert_eq!(n, SUBSCRIBER_QUEUE, "then closed: the loop lists again");
    assert!(src.lock().subscribers.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_listing_before_the_first_sync_fails_naming_the_watch() {
    let src = KubeSource::new("https://192.0.2.2:6443");
    src.lock().kinds.push(Kind {
        name: "nodes".into(),
        ..Default::default()
    });
    src.lock().kinds[0].error = Some(("connection refused".into(), false));
    let e = Source::list(&src, "/p/").await.expect_err("not synced");
    let s = e.to_string();
    assert!(
        s.contains("192.0.2.2:6443") && s.contains("nodes") && s.contains("refused"),
        "{s}"
    );
}

#[test]
fn a_410_only_asks_for_a_relist_and_api_answers_are_told_apart() {
    let status = |code: u16| {
        watcher::Error::WatchError(Box::new(kube::core::Status {
            code,
            ..Default::default()
        }))
    };
    assert!(expired(&status(410)));
    assert!(!expired(&status(500)));
    assert!(answered(&status(403)));
}

#[tokio::test]
async fn one_name_in_two_namespaces_is_two_objects() {
    let src = one_kind(false);
    let ev = |e: WEvent<ConfigMap>| src.on_event(0, e, &show);
    let mut a = cm("same", "1");
    a.metadata.namespace = Some("x".into());
    let mut b = cm("same", "2");
    b.metadata.namespace = Some("y".into());
    ev(WEvent::Init);
    ev(WEvent::InitApply(a));
    ev(WEvent::InitApply(b));
    ev(WEvent::InitDone);
    let l = Source::list(&src, "/p/").await.expect("list");
    assert_eq!(keys(&l), ["/p/1", "/p/2"]);
}
