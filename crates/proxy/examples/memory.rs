//! What the proxy's state costs in heap: N Services x 10 endpoints (as
//! `bench/proxy-sync` writes them) through `Proxy`, live bytes counted by
//! a counting allocator after the inputs and after the first plan.
//! `cargo run --release -p trellis-proxy --example memory -- 5000`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use trellis_proxy::{
    Endpoint, NodeFacts, Protocol, Proxy, Service, ServicePort, ServiceType, Slice, SlicePort,
};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY-free by construction: every call goes to `System`, only a counter is added
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: as above
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn mb() -> f64 {
    LIVE.load(Ordering::Relaxed) as f64 / 1e6
}

/// Service `i`'s slice: 10 ready endpoints.
fn slice_of(i: usize) -> Slice {
    let name = format!("s{i}");
    Slice {
        namespace: "default".into(),
        name: format!("{name}-abc"),
        service: name.clone(),
        ports: vec![SlicePort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 8080,
        }],
        endpoints: (0..10)
            .map(|e| Endpoint {
                address: format!(
                    "10.{}.{}.{}",
                    100 + i / 6000,
                    (i / 25) % 240,
                    (i % 25) * 10 + e
                )
                .parse()
                .expect("ip"),
                ready: true,
                serving: true,
                terminating: false,
                node: Some("n1".into()),
            })
            .collect(),
    }
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5000);
    let base = mb();
    let mut p = Proxy::new(NodeFacts {
        name: "n2".into(),
        addresses: vec!["192.0.2.12".parse().expect("ip")],
        cluster_cidr: "10.244.0.0/16".parse().expect("cidr"),
        node_port_range: trellis_proxy::NODE_PORT_RANGE,
    });
    for i in 0..n {
        let name = format!("s{i}");
        let ip = format!("10.96.{}.{}", i / 250, 1 + i % 250);
        p.set_service(
            &format!("default/{name}"),
            Some(Service {
                namespace: "default".into(),
                name: name.clone(),
                kind: ServiceType::ClusterIP,
                cluster_ips: vec![ip.parse().expect("ip")],
                ports: vec![ServicePort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    node_port: None,
                }],
                ..Default::default()
            }),
        );
        let slice = slice_of(i);
        p.set_slice(&format!("default/{name}-abc"), Some(slice));
    }
    let inputs = mb();
    let plan = p.plan();
    let script: usize = plan.script.len();
    // `TRELLIS_DUMP=FILE`: the full script, for timing its load by hand
    if let Some(path) = std::env::var_os("TRELLIS_DUMP") {
        std::fs::write(&path, &plan.script).expect("write the script");
    }
    let with_plan = mb();
    p.applied(plan);
    let after = mb();
    // one endpoint changed: the incremental plan's time
    let mut one = slice_of(0);
    one.endpoints[0].address = "10.250.0.1".parse().expect("ip");
    p.set_slice("default/s0-abc", Some(one));
    let t = std::time::Instant::now();
    let plan = p.plan();
    let one_us = t.elapsed().as_micros();
    let one_script = plan.script.len();
    p.applied(plan);
    println!(
        "services={n} inputs_mb={:.1} plan_held_mb={:.1} script_mb={:.1} state_applied_mb={:.1} peak_mb={:.1} one_plan_us={one_us} one_script_bytes={one_script}",
        inputs - base,
        with_plan - base,
        script as f64 / 1e6,
        after - base,
        PEAK.load(Ordering::Relaxed) as f64 / 1e6 - base
    );
}
