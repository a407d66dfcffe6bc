//! `converge`: N simulated nodes registered in etcd (their subnet records
//! only), one real agent programming routes, neighbours and FDB entries for
//! all of them; then one node more.

use anyhow::{bail, Context};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};
use trellis_dataplane::{mac_string, Dataplane, LinuxDataplane};
use trellis_lab::{etcd, netns, Lab, LabOptions};
use trellis_model::node::{subnet_key, NodeRecord};
use trellis_store::{Datastore, EtcdOptions, EtcdStore};

/// Counts of (routes via trellis.1, neighbours, fdb) in the current namespace.
fn counts(dp: &LinuxDataplane) -> (usize, usize, usize) {
    let routes = dp
        .routes_owned()
        .map(|r| r.iter().filter(|r| r.dev == "trellis.1").count())
        .unwrap_or(0);
    let neigh = dp.neighbours("trellis.1").map(|n| n.len()).unwrap_or(0);
    let fdb = dp.fdb("trellis.1").map(|f| f.len()).unwrap_or(0);
    (routes, neigh, fdb)
}

pub fn wait_counts(want: usize, limit: Duration) -> anyhow::Result<Instant> {
    let dp = LinuxDataplane::new();
    let deadline = Instant::now() + limit;
    loop {
        let (r, n, f) = counts(&dp);
        if r >= want && n >= want && f >= want {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("agent programmed routes/neigh/fdb = {r}/{n}/{f} of {want} within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn sim(i: usize, skip: &str) -> NodeRecord {
    // /24s of 10.244.0.0/16 in order, without the real node's
    let mut idx = i + 1;
    if format!("10.244.{idx}.0/24") == skip || idx > 254 {
        idx = 255 - (i % 50);
    }
    let subnet = format!("10.244.{idx}.0/24").parse().expect("subnet");
    let ip = if i < 250 {
        Ipv4Addr::new(198, 51, 100, 1 + i as u8)
    } else {
        Ipv4Addr::new(203, 0, 113, 10 + (i - 250) as u8)
    };
    NodeRecord {
        node: format!("sim{i}"),
        subnet,
        public_ip: IpAddr::V4(ip),
        backend_type: "vxlan".into(),
        vtep_mac: Some(mac_string(&[0x0e, 0x74, 198, 51, (i >> 8) as u8, i as u8])),
        bgp: None,
    }
}

pub fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Runs the benchmark and prints the result line.
pub fn run(nodes: usize) -> anyhow::Result<()> {
    if nodes > 250 {
        bail!("--nodes: at most 250 simulated nodes fit 10.244.0.0/16 in /24s here");
    }
    let lab = Lab::create(LabOptions {
        nodes: 1,
        cluster: Some(trellis_lab::cluster_config("vxlan")?),
        ..Default::default()
    })?;
    let me = lab.node("n1")?.clone();
    let mut records: Vec<NodeRecord> = (0..=nodes).map(|i| sim(i, &me.subnet)).collect();
    records.dedup_by(|a, b| a.subnet == b.subnet);
    if records.len() < nodes + 1 {
        bail!("could not make {} distinct simulated subnets", nodes + 1);
    }
    let extra = records.pop().context("extra node")?;
    let ns = netns::path(&lab.ns("n1"));
    let (full, one) = netns::within(&ns, || -> anyhow::Result<(Duration, Duration)> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let store = rt.block_on(EtcdStore::connect(&EtcdOptions {
            endpoints: vec![etcd::ETCD_ENDPOINT.into()],
            ..Default::default()
        }))?;
        let put = |r: &NodeRecord| {
            let (store, key, body) = (
                store.clone(),
                subnet_key(etcd::PREFIX, r.subnet),
                serde_json::to_vec(r),
            );
            async move {
                store
                    .put(&key, body?, None)
                    .await
                    .map_err(anyhow::Error::from)
            }
        };
        let started = Instant::now();
        rt.block_on(async {
            let tasks: Vec<_> = records.iter().map(|r| tokio::spawn(put(r))).collect();
            for t in tasks {
                t.await??;
            }
            anyhow::Ok(())
        })?;
        let done = wait_counts(records.len(), Duration::from_secs(60))?;
        let one_started = Instant::now();
        rt.block_on(put(&extra))?;
        let one_done = wait_counts(records.len() + 1, Duration::from_secs(30))?;
        Ok((done - started, one_done - one_started))
    })??;
    let rss = me.agent_pid.map(rss_mb).unwrap_or(0.0);
    lab.destroy()?;
    println!(
        "nodes={nodes} full_ms={:.0} one_more_ms={:.1} agent_rss_mb={rss:.1}",
        full.as_secs_f64() * 1e3,
        one.as_secs_f64() * 1e3
    );
    Ok(())
}
