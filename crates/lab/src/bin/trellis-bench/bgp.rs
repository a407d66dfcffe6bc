//! BGP benchmarks, inside a lab node's namespace (loopback addresses
//! 127.x.y.z there, one per speaker).
//!
//! - `bgp-converge`: N trellis speakers (the speaker the agent runs),
//!   each announcing its node subnet: full mesh, then one reflector with
//!   N-1 clients. Times start-to-converged (every speaker holds every other
//!   subnet) and one new subnet to learned-by-all.
//! - `bgp-ingest`: a BIRD feeds P prefixes to trellis's speaker and, in
//!   the same run, to a second BIRD; each is timed from enabling the
//!   feeding session to all P in its Loc-RIB (rounds alternate, median).

use anyhow::{bail, Context};
use ipnet::IpNet;
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis_bgp::import::ImportPolicy;
use trellis_bgp::{PeerKind, PeerSpec, RouteEvent, Speaker, SpeakerConfig};
use trellis_lab::bird::Bird;
use trellis_lab::{netns, Lab, LabOptions};

fn subnet(i: usize) -> IpNet {
    IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::new(10, (i >> 8) as u8, i as u8, 0), 24).expect("net"))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?)
}

/// Counts distinct prefixes a speaker has learned.
fn count(mut rx: trellis_bgp::RouteFeed) -> Arc<AtomicUsize> {
    let n = Arc::new(AtomicUsize::new(0));
    let out = n.clone();
    tokio::spawn(async move {
        let mut have = HashSet::new();
        while let Some(evs) = rx.recv().await {
            for ev in evs {
                match ev {
                    RouteEvent::Best { prefix, .. } => {
                        have.insert(prefix);
                    }
                    RouteEvent::Gone { prefix } => {
                        have.remove(&prefix);
                    }
                    RouteEvent::EndOfRib { .. } => {}
                }
            }
            n.store(have.len(), Ordering::Relaxed);
        }
    });
    out
}

async fn wait_all(counts: &[Arc<AtomicUsize>], want: usize, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while counts.iter().any(|c| c.load(Ordering::Relaxed) < want) {
        if Instant::now() > deadline {
            let low = counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .min()
                .unwrap_or(0);
            bail!("{what}: not converged after 120 s (lowest speaker holds {low} of {want})");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// One topology: returns (full, one) in ms.
async fn scenario(n: usize, reflector: bool, net: u8) -> anyhow::Result<(f64, f64)> {
    let addr = |i: usize| Ipv4Addr::new(127, net, (i / 200) as u8, (i % 200) as u8 + 1);
    let t0 = Instant::now();
    let mut speakers = Vec::with_capacity(n);
    let mut counts = Vec::with_capacity(n);
    for i in 0..n {
        let (s, rx) = Speaker::start(SpeakerConfig {
            asn: 64512,
            router_id: addr(i),
            listen: Some(SocketAddr::new(IpAddr::V4(addr(i)), 179)),
            cluster_id: (reflector && i == 0).then_some(Ipv4Addr::new(224, 0, 0, 1)),
            hold_time: 90,
            connect_retry: Duration::from_secs(1),
            restart_time: 0,
            restarting: false,
            policy: ImportPolicy {
                inside: vec!["10.0.0.0/8".parse()?],
                ..Default::default()
            },
        })
        .await
        .with_context(|| format!("speaker {}", addr(i)))?;
        s.announce(subnet(i)).await;
        counts.push(count(rx));
        speakers.push(s);
    }
    let peer = |me: usize, j: usize, kind: PeerKind| PeerSpec {
        addr: IpAddr::V4(addr(j)),
        port: 179,
        asn: 64512,
        local_as: 64512,
        kind,
        password: None,
        passive: j < me,
        multihop: false,
        local_addr: Some(IpAddr::V4(addr(me))),
        max_prefixes: 0,
    };
    for (i, s) in speakers.iter().enumerate() {
        let peers = if !reflector {
            (0..n)
                .filter(|&j| j != i)
                .map(|j| peer(i, j, PeerKind::Mesh))
                .collect()
        } else if i == 0 {
            (1..n).map(|j| peer(0, j, PeerKind::RrClient)).collect()
        } else {
            vec![peer(i, 0, PeerKind::Reflector)]
        };
        s.set_peers(peers).await;
    }
    wait_all(&counts, n - 1, "full convergence").await?;
    let full = t0.elapsed();
    let t1 = Instant::now();
    speakers[n - 1].announce(subnet(n)).await;
    let others: Vec<Arc<AtomicUsize>> = counts[..n - 1].to_vec();
    wait_all(&others, n, "one new subnet").await?;
    let one = t1.elapsed();
    for s in &speakers {
        s.shutdown().await;
    }
    Ok((full.as_secs_f64() * 1e3, one.as_secs_f64() * 1e3))
}

/// `bgp-converge`.
pub fn converge(nodes: usize) -> anyhow::Result<()> {
    if !(2..=1000).contains(&nodes) {
        bail!("--nodes: 2 to 1000");
    }
    let lab = Lab::create(LabOptions::default())?;
    let ns = netns::path(&lab.ns("n1"));
    let (mesh, rr) = netns::within(&ns, || -> anyhow::Result<_> {
        let rt = runtime()?;
        let mesh = rt.block_on(scenario(nodes, false, 10))?;
        let rr = rt.block_on(scenario(nodes, true, 11))?;
        Ok((mesh, rr))
    })??;
    eprintln!(
        "{nodes} speakers: mesh {} sessions, reflector {} sessions",
        nodes * (nodes - 1) / 2,
        nodes - 1
    );
    println!(
        "mesh_nodes={nodes} mesh_full_ms={:.1} mesh_one_ms={:.1} rr_full_ms={:.1} rr_one_ms={:.1}",
        mesh.0, mesh.1, rr.0, rr.1
    );
    Ok(())
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

const FEEDER: &str = "127.0.3.1";
const TRELLIS: &str = "127.0.3.2";
const RECEIVER: &str = "127.0.3.3";

/// `bgp-ingest`.
pub fn ingest(prefixes: usize, rounds: usize) -> anyhow::Result<()> {
    if !(1..=1_000_000).contains(&prefixes) {
        bail!("--prefixes: 1 to 1000000");
    }
    let lab = Lab::create(LabOptions::default())?;
    let ns = netns::path(&lab.ns("n1"));
    let mut feed =
        format!("router id {FEEDER};\nprotocol device {{}}\nprotocol static feed {{\n  disabled;\n  ipv4;\n");
    for i in 0..prefixes {
        let a = Ipv4Addr::from(0x1400_0000u32 + ((i as u32) << 8));
        feed.push_str(&format!("  route {a}/24 blackhole;\n"));
    }
    feed.push_str("}\n");
    for (name, peer) in [("to_trellis", TRELLIS), ("to_bird", RECEIVER)] {
        feed.push_str(&format!(
            "protocol bgp {name} {{\n  disabled;\n  local {FEEDER} as 65001;\n  neighbor {peer} as 65002;\n  multihop;\n  strict bind on;\n  connect delay time 1;\n  connect retry time 1;\n  ipv4 {{ import none; export all; next hop self; }};\n}}\n"
        ));
    }
    let receiver_conf = format!(
        "router id {RECEIVER};\nprotocol device {{}}\nprotocol bgp feed {{\n  local {RECEIVER} as 65002;\n  neighbor {FEEDER} as 65001;\n  multihop;\n  strict bind on;\n  passive on;\n  ipv4 {{ import all; export none; }};\n}}\n"
    );
    let feeder = Bird::start(&lab, &lab.ns("n1"), "feeder", &feed)?;
    let receiver = Bird::start(&lab, &lab.ns("n1"), "receiver", &receiver_conf)?;
    let result = netns::within(&ns, || -> anyhow::Result<_> {
        let rt = runtime()?;
        rt.block_on(async {
            let (speaker, rx) = Speaker::start(SpeakerConfig {
                asn: 65002,
                router_id: TRELLIS.parse()?,
                listen: Some(SocketAddr::new(TRELLIS.parse()?, 179)),
                cluster_id: None,
                hold_time: 90,
                connect_retry: Duration::from_secs(1),
                restart_time: 0,
                restarting: false,
                policy: ImportPolicy::default(),
            })
            .await?;
            // the agent would install these; here they are only drained
            let mut rx = rx;
            tokio::spawn(async move { while rx.recv().await.is_some() {} });
            speaker
                .set_peers(vec![PeerSpec {
                    addr: FEEDER.parse()?,
                    port: 179,
                    asn: 65001,
                    local_as: 65002,
                    kind: PeerKind::External,
                    password: None,
                    passive: true,
                    multihop: true,
                    local_addr: Some(TRELLIS.parse()?),
                    max_prefixes: 0,
                }])
                .await;
            let mut ours = Vec::new();
            let mut theirs = Vec::new();
            let mut rss = 0;
            let base_rss = rss_kb(std::process::id());
            let mut bird_rss = 0;
            for round in 0..rounds {
                let order: [&str; 2] = if round % 2 == 0 {
                    ["trellis", "bird"]
                } else {
                    ["bird", "trellis"]
                };
                for who in order {
                    // the session first, then the routes: what is timed is
                    // the transfer and the ingest, not connection set-up
                    feeder.cmd(&["enable", &format!("to_{who}")])?;
                    let deadline = Instant::now() + Duration::from_secs(60);
                    loop {
                        let up = if who == "trellis" {
                            speaker
                                .status()
                                .await
                                .first()
                                .is_some_and(|p| p.state == "Established")
                        } else {
                            tokio::task::block_in_place(|| {
                                receiver.cmd(&["show", "protocols", "feed"])
                            })?
                            .contains("Established")
                        };
                        if up {
                            break;
                        }
                        if Instant::now() > deadline {
                            bail!("{who}: no session with the feeder after 60 s");
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    tokio::task::block_in_place(|| feeder.cmd(&["enable", "feed"]))?;
                    let t0 = Instant::now();
                    let deadline = t0 + Duration::from_secs(300);
                    loop {
                        let have = if who == "trellis" {
                            speaker.loc_rib_len().await
                        } else {
                            tokio::task::block_in_place(|| receiver.route_count())?
                        };
                        if have >= prefixes {
                            break;
                        }
                        if Instant::now() > deadline {
                            bail!("{who}: {have} of {prefixes} prefixes after 300 s");
                        }
                        tokio::time::sleep(Duration::from_millis(if who == "trellis" {
                            1
                        } else {
                            5
                        }))
                        .await;
                    }
                    let ms = t0.elapsed().as_secs_f64() * 1e3;
                    if who == "trellis" {
                        ours.push(ms);
                        rss = rss.max(rss_kb(std::process::id()));
                    } else {
                        theirs.push(ms);
                        bird_rss = bird_rss.max(rss_kb(receiver.pid()));
                    }
                    eprintln!("round {round}: {who} {ms:.0} ms");
                    feeder.cmd(&["disable", "feed"])?;
                    let deadline = Instant::now() + Duration::from_secs(60);
                    loop {
                        let left = if who == "trellis" {
                            speaker.loc_rib_len().await
                        } else {
                            tokio::task::block_in_place(|| receiver.route_count())?
                        };
                        if left == 0 {
                            break;
                        }
                        if Instant::now() > deadline {
                            bail!("{who}: routes not withdrawn after the feed stopped");
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    feeder.cmd(&["disable", &format!("to_{who}")])?;
                }
            }
            speaker.shutdown().await;
            anyhow::Ok((median(ours), median(theirs), rss, base_rss, bird_rss))
        })
    })??;
    let (ours, theirs, rss, base_rss, bird_rss) = result;
    println!(
        "prefixes={prefixes} trellis_ms={ours:.0} bird_ms={theirs:.0} ratio={:.2} trellis_rss_mb={:.1} trellis_rss_before_feed_mb={:.1} bird_rss_mb={:.1}",
        ours / theirs,
        rss as f64 / 1024.0,
        base_rss as f64 / 1024.0,
        bird_rss as f64 / 1024.0
    );
    Ok(())
}
