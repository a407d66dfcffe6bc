//! `lab gc` removes what a crashed lab left and nothing else.

mod common;
use common::*;
use trellis_lab::{exec, gc, LabState};

#[test]
fn gc_sweeps_labs_of_dead_owners_only() {
    if !privileged("gc_sweeps_labs_of_dead_owners_only") {
        return;
    }
    // a live lab owned by this process must survive the sweep
    let live = lab(1);
    // a crashed lab: state whose owner is gone, a namespace, a stray namespace
    let mut child = std::process::Command::new("true").spawn().expect("spawn");
    let dead_pid = child.id();
    child.wait().expect("wait");
    let id = format!("trlgc{:05}", std::process::id() % 100_000);
    let dir = trellis_lab::state_root().join(&id);
    std::fs::create_dir_all(&dir).expect("dir");
    LabState {
        id: id.clone(),
        owner_pid: dead_pid,
        nodes: vec![],
        pods: vec![],
        etcd_pid: None,
        extra_pids: vec![],
        cluster: false,
        kubernetes: false,
        kube_proxy: vec![],
        routing_only: vec![],
        mtu: 1500,
        segments: 1,
    }
    .save(&dir)
    .expect("save");
    exec::ip(&["netns", "add", &format!("{id}-n1")]).expect("netns");
    let stray = format!("trlstray{:05}-x", std::process::id() % 100_000);
    exec::ip(&["netns", "add", &stray]).expect("stray netns");

    let report = gc::sweep(false);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(report.labs.contains(&id), "{report:?}");
    assert!(report.strays.contains(&stray), "{report:?}");
    let left = gc::namespaces();
    assert!(
        !left.iter().any(|n| n.starts_with(&id) || n == &stray),
        "{left:?}"
    );
    assert!(!dir.exists());
    assert!(left.contains(&live.ns("n1")), "a live lab was swept");
    assert_ping(&live, &live.ns("n1"), "192.0.2.1");
}
