//! Helpers shared by the privileged lab tests.
#![allow(dead_code)]

pub mod bgp;
pub mod netpol;

use serde_json::Value;
use std::time::Duration;
use trellis_lab::{exec, Lab, LabOptions};

/// True when the test may run; prints why it is skipped otherwise. Under
/// CI (`CI` set) a test that cannot run fails instead: a skip must never
/// pass for a result.
pub fn privileged(test: &str) -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test} cannot run under CI: it needs root for network namespaces"
        );
        eprintln!("SKIP {test}: needs root for network namespaces");
        return false;
    }
    for bin in ["trellis", "trellisd"] {
        let p = trellis_lab::bin_dir().join(bin);
        assert!(
            p.exists(),
            "{} missing: run `cargo build --workspace --bins` first",
            p.display()
        );
    }
    true
}

/// A one-node lab.
pub fn lab(nodes: usize) -> Lab {
    Lab::create(LabOptions {
        nodes,
        ..Default::default()
    })
    .expect("create lab")
}

/// `ip -j -d ARGS` inside namespace `ns`, parsed.
pub fn ip_json(ns: &str, args: &[&str]) -> Value {
    let mut full = vec!["-n", ns, "-j", "-d"];
    full.extend_from_slice(args);
    let out = exec::ip(&full).expect("ip -j");
    if out.trim().is_empty() {
        return Value::Array(vec![]);
    }
    serde_json::from_str(&out).expect("ip json")
}

/// Names of links in `ns`.
pub fn links(ns: &str) -> Vec<String> {
    ip_json(ns, &["link", "show"])
        .as_array()
        .expect("array")
        .iter()
        .map(|l| l["ifname"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Host-side pod veths in `ns`.
pub fn pod_veths(ns: &str) -> Vec<String> {
    links(ns)
        .into_iter()
        .filter(|l| l.starts_with("tl"))
        .collect()
}

/// Addresses allocated on `node` (files in its IPAM directory).
pub fn allocations(lab: &Lab, node: &str) -> Vec<String> {
    let dir = lab.dir().join(format!("{node}-data/ipam"));
    let mut out = vec![];
    for sub in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(sub.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.parse::<std::net::IpAddr>().is_ok() {
                out.push(name);
            }
        }
    }
    out.sort();
    out
}

/// Parses the plugin's stdout.
pub fn stdout_json(t: &exec::Timed) -> Value {
    serde_json::from_slice(&t.output.stdout).unwrap_or_else(|e| {
        panic!(
            "plugin printed no JSON ({e}): {:?}",
            String::from_utf8_lossy(&t.output.stdout)
        )
    })
}

/// Pings must answer.
pub fn assert_ping(lab: &Lab, ns: &str, target: &str) {
    assert!(
        lab.ping(ns, target, 2).is_some(),
        "ping {ns} -> {target} failed"
    );
}

/// Bounded wait.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `node`'s status document from its agent.
pub fn status(lab: &Lab, node: &str) -> Value {
    use std::io::Read;
    let mut s =
        std::os::unix::net::UnixStream::connect(lab.status_socket(node)).expect("status socket");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read");
    serde_json::from_str(&body).expect("status json")
}

pub use trellis_lab::bird::Bird;

/// Starts BIRD in namespace `ns` with `conf` (directory `name` of the lab).
pub fn start_bird(lab: &Lab, ns: &str, name: &str, conf: &str) -> Bird {
    Bird::start(lab, ns, name, conf).expect("start bird")
}

/// `birdc ARGS...` against `bird`.
pub fn birdc(bird: &Bird, args: &[&str]) -> String {
    bird.cmd(args).expect("birdc")
}

/// `GET path` from `node`'s agent HTTP endpoint; returns (status line,
/// body).
pub fn agent_http(lab: &Lab, node: &str, path: &str) -> (String, String) {
    lab.agent_http(node, path).expect("agent http")
}

/// The routes trellis owns on `node`.
pub fn routes(lab: &Lab, node: &str) -> String {
    lab.routes(node).expect("ip route")
}

/// The value of the series `name` (exact label set) in `metrics`.
pub fn metric(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == series).then(|| v.parse().ok())?
    })
}

/// True when the Kubernetes binaries are there (see `trellis_lab::k8s`);
/// under CI their absence fails the test.
pub fn kubernetes(test: &str) -> bool {
    if !privileged(test) {
        return false;
    }
    match trellis_lab::k8s::bin_dir() {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{test} cannot run under CI: {e}"
            );
            eprintln!("SKIP {test}: {e}");
            false
        }
    }
}

/// One control plane at a time in a test binary: three API servers,
/// controller managers and their agents at once starve a 2-core machine
/// past the tests' deadlines.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a parameterised test's cluster keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datastore {
    /// etcd (subnet leases, resources as keys).
    Etcd,
    /// The lab's real Kubernetes control plane (podCIDRs, Node
    /// annotations, custom resources applied with kubectl).
    Kubernetes,
}

/// Held while a parameterised test runs (the control-plane lock in
/// Kubernetes mode).
pub struct Running(Option<std::sync::MutexGuard<'static, ()>>);

impl Datastore {
    /// `Some` when `test` may run with this datastore (see [`privileged`]
    /// and [`kubernetes`]).
    pub fn runs(self, test: &str) -> Option<Running> {
        match self {
            Self::Etcd => privileged(test).then_some(Running(None)),
            Self::Kubernetes => kubernetes(test).then(|| Running(Some(one_at_a_time()))),
        }
    }

    /// Lab options of a cluster with `backend` in this datastore.
    pub fn cluster(self, backend: &str) -> LabOptions {
        let conf = trellis_lab::cluster_config(backend).expect("backend");
        match self {
            Self::Etcd => LabOptions {
                cluster: Some(conf),
                ..Default::default()
            },
            Self::Kubernetes => LabOptions {
                kubernetes: Some(conf),
                ..Default::default()
            },
        }
    }
}

/// A Kubernetes-mode lab of `nodes` with `backend`.
pub fn kube_lab(backend: &str, nodes: usize) -> Lab {
    Lab::create(LabOptions {
        nodes,
        kubernetes: Some(trellis_lab::cluster_config(backend).expect("backend")),
        ..Default::default()
    })
    .expect("kubernetes lab")
}

/// Service `name`'s ClusterIP (namespace default).
pub fn cluster_ip(lab: &Lab, name: &str) -> String {
    lab.kubectl(&["get", "service", name, "-o", "jsonpath={.spec.clusterIP}"])
        .expect("clusterIP")
        .trim()
        .to_string()
}

/// `ip:port`.
pub fn sa(ip: &str, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(ip.parse().expect("ip"), port)
}
