//! The Service proxy against kube-proxy v1.36 (nftables mode), both
//! watching one real API server, each in its own lab node (n1: kube-proxy
//! beside a routing-only agent; n2: trellis's proxy).
//!
//! - `proxy-sync`: N Services x 10 endpoints (selector-less Services and
//!   their EndpointSlices, written as fast as the API server takes them):
//!   (a) bulk: from the last object written until the last of the Service
//!   addresses is added to the proxy's kernel map (`nftmon::SetWatch`,
//!   subscribed before the first write); (b) restart with the tables kept:
//!   the proxy stopped, one Service added, the proxy started: from its
//!   start until that Service's address is added to its map (the same
//!   watch; both apply their first sync as one transaction); (c) one
//!   endpoint changed until a commit in the proxy's node announces an
//!   object holding the new address (median of 5 changes); (d) RSS. Every probe reads the
//!   kernel's commit announcements, the same way for both, never a
//!   proxy's log; no probe lists a big map while timing (`nft list map`
//!   takes 0.1 s at 5,000 Services here), a listing is only the fallback
//!   should a monitor lose announcements. RSS is taken of both after the
//!   bulk; (c) and (b) of one proxy run with the other stopped (on 2
//!   cores, kube-proxy's sync of the same change, 5 s of CPU at 5,000,
//!   would run beside trellis's).
//! - `proxy-latency`: TCP connection setup to a ClusterIP with 10 and with
//!   10,000 Services programmed.

use crate::api::{create, Writer};
use crate::k8s::within;
use anyhow::{bail, Context};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use trellis_lab::{netns, Lab, LabOptions};

const NS: &str = "bench";
/// One-change samples per proxy and size (the median is reported).
const ONE_SAMPLES: usize = 5;
const IN_FLIGHT: usize = 32;
/// kube-proxy's node and trellis's node.
const KP: &str = "n1";
const TR: &str = "n2";

fn svc_name(i: usize) -> String {
    format!("svc-{i}")
}

/// Endpoint `j` of Service `i`: addresses of the pod network (never sent to).
fn ep(i: usize, j: usize) -> String {
    let k = i * 10 + j;
    format!("10.244.{}.{}", (k / 250) % 250, k % 250 + 1)
}

fn service(i: usize) -> anyhow::Result<Service> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": svc_name(i), "namespace": NS},
        "spec": {"ports": [{"name": "p", "port": 80, "targetPort": 8080}]},
    }))?)
}

fn slice(i: usize, eps: &[String]) -> anyhow::Result<EndpointSlice> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{}-1", svc_name(i)), "namespace": NS, "labels": {
            "kubernetes.io/service-name": svc_name(i),
            "endpointslice.kubernetes.io/managed-by": "bench.trellis.dev"}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps.iter().map(|a| serde_json::json!({"addresses": [a], "conditions": {"ready": true}})).collect::<Vec<_>>(),
    }))?)
}

impl Writer {
    fn namespace(&self) -> anyhow::Result<()> {
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": NS}}))?;
        let api: Api<Namespace> = Api::all(self.client.clone());
        self.run(async move {
            within(
                "create namespace".into(),
                api.create(&PostParams::default(), &ns),
            )
            .await?;
            Ok(())
        })
    }

    /// Services `from..to` with 10 endpoints each; returns when the last
    /// write was answered.
    fn fill(&self, from: usize, to: usize) -> anyhow::Result<Instant> {
        let svcs: Api<Service> = Api::namespaced(self.client.clone(), NS);
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), NS);
        self.run(async move {
            futures::stream::iter(from..to)
                .map(|i| {
                    let (svcs, slices) = (svcs.clone(), slices.clone());
                    async move {
                        let eps: Vec<String> = (0..10).map(|j| ep(i, j)).collect();
                        create(&svcs, &service(i)?, &svc_name(i)).await?;
                        create(
                            &slices,
                            &slice(i, &eps)?,
                            &format!("slice of {}", svc_name(i)),
                        )
                        .await?;
                        anyhow::Ok(())
                    }
                })
                .buffer_unordered(IN_FLIGHT)
                .try_collect::<Vec<()>>()
                .await?;
            Ok(())
        })?;
        Ok(Instant::now())
    }

    /// Service `i`'s first endpoint becomes `addr`.
    fn change(&self, i: usize, addr: &str) -> anyhow::Result<Instant> {
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), NS);
        let mut eps: Vec<String> = (0..10).map(|j| ep(i, j)).collect();
        eps[0] = addr.to_string();
        let s = slice(i, &eps)?;
        let name = format!("{}-1", svc_name(i));
        let t = Instant::now();
        self.run(async move {
            within(
                "change one endpoint".into(),
                slices.patch(
                    &name,
                    &PatchParams::apply("bench").force(),
                    &Patch::Apply(&s),
                ),
            )
            .await?;
            Ok(())
        })?;
        Ok(t)
    }

    /// The clusterIPs of every Service of the namespace.
    fn cluster_ips(&self) -> anyhow::Result<Vec<std::net::Ipv4Addr>> {
        let svcs: Api<Service> = Api::namespaced(self.client.clone(), NS);
        let list = self.run(async move {
            within(
                "list Services".into(),
                svcs.list(&kube::api::ListParams::default()),
            )
            .await
        })?;
        list.items
            .iter()
            .map(|s| {
                let ip = s.spec.as_ref().and_then(|s| s.cluster_ip.as_deref());
                let name = s.metadata.name.as_deref().unwrap_or("?");
                ip.with_context(|| format!("{name}: no clusterIP"))?
                    .parse()
                    .with_context(|| format!("{name}: clusterIP"))
            })
            .collect()
    }

    fn cluster_ip(&self, i: usize) -> anyhow::Result<String> {
        let svcs: Api<Service> = Api::namespaced(self.client.clone(), NS);
        let s = self.run(async move {
            within(format!("get {}", svc_name(i)), svcs.get(&svc_name(i))).await
        })?;
        s.spec.and_then(|s| s.cluster_ip).context("no clusterIP")
    }
}

/// Which proxy a probe reads.
#[derive(Clone, Copy, PartialEq)]
enum Proxy {
    KubeProxy,
    Trellis,
}

fn nft(lab: &Lab, node: &str, args: &[&str]) -> String {
    let mut a = vec!["nft"];
    a.extend_from_slice(args);
    lab.exec(&lab.ns(node), &a, Duration::from_secs(30))
        .map(|t| String::from_utf8_lossy(&t.output.stdout).to_string())
        .unwrap_or_default()
}

impl Proxy {
    /// The lab node it runs in.
    fn node(self) -> &'static str {
        match self {
            Proxy::KubeProxy => KP,
            Proxy::Trellis => TR,
        }
    }

    /// Its table.
    fn table(self) -> &'static str {
        match self {
            Proxy::KubeProxy => "kube-proxy",
            Proxy::Trellis => "trellis-proxy",
        }
    }

    /// Its map of Service addresses (`address . protocol . port`).
    fn set(self) -> &'static str {
        match self {
            Proxy::KubeProxy => "service-ips",
            Proxy::Trellis => "services",
        }
    }
}

/// Addresses in the proxy's kernel map of Service addresses.
fn programmed(lab: &Lab, p: Proxy) -> String {
    match p {
        Proxy::KubeProxy => nft(lab, KP, &["list", "map", "ip", "kube-proxy", "service-ips"]),
        Proxy::Trellis => nft(
            lab,
            TR,
            &["list", "map", "inet", "trellis-proxy", "services"],
        ),
    }
}

/// When Service address `ip` was added to `p`'s map, as `watch` (opened
/// before) saw it; should it have lost announcements, when a listing of
/// the map first shows it.
fn added(
    lab: &Lab,
    p: Proxy,
    watch: &crate::nftmon::SetWatch,
    ip: &str,
    limit: Duration,
) -> anyhow::Result<Instant> {
    let addr: std::net::Ipv4Addr = ip.parse().with_context(|| format!("clusterIP {ip:?}"))?;
    let end = Instant::now() + limit;
    loop {
        match watch.all_seen(&[addr]) {
            Ok(Some(t)) => return Ok(t),
            Ok(None) => {}
            Err(e) => {
                eprintln!("{e}; listing the map instead");
                return wait(
                    "added",
                    end.saturating_duration_since(Instant::now()),
                    || programmed(lab, p).contains(&format!("{ip} . tcp . 80")),
                );
            }
        }
        if Instant::now() > end {
            bail!("{ip} not added to the map of Services within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn count(text: &str) -> usize {
    text.matches(" : goto ").count()
}

fn wait(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Figures {
    bulk_ms: f64,
    restart_ms: f64,
    one_ms: f64,
    rss_mb: f64,
}

fn pid_of(lab: &Lab, p: Proxy) -> anyhow::Result<u32> {
    match p {
        Proxy::KubeProxy => lab.kube_proxy_pid(KP).context("kube-proxy is not running"),
        Proxy::Trellis => lab.node(TR)?.agent_pid.context("trellisd is not running"),
    }
}

/// Stops `p`.
fn stop(lab: &mut Lab, p: Proxy) -> anyhow::Result<()> {
    match p {
        Proxy::KubeProxy => lab.stop_kube_proxy(KP),
        Proxy::Trellis => lab.stop_agent(TR),
    }
}

/// Starts `p`.
fn start(lab: &mut Lab, p: Proxy) -> anyhow::Result<()> {
    match p {
        Proxy::KubeProxy => lab.start_kube_proxy(KP),
        Proxy::Trellis => lab.start_agent(TR).map(|_| ()),
    }
}

/// One size: a lab, `n` Services, the figures of each proxy in `who`.
/// `cold` (trellis alone): its agent is stopped while the objects are
/// written and starts as a new node after the last one (its state files
/// removed), so bulk is from the last write, through the agent's start
/// and first listing, to every Service in the kernel.
fn one_size(n: usize, who: &[Proxy], cold: bool) -> anyhow::Result<Vec<Figures>> {
    let lab_kp = if who.contains(&Proxy::KubeProxy) {
        vec![KP.to_string()]
    } else {
        vec![]
    };
    let mut lab = Lab::create(LabOptions {
        nodes: 2,
        kubernetes: Some(trellis_lab::cluster_config("vxlan")?),
        // without kube-proxy, its node routes only: one proxy measured,
        // not two sharing the machine's 2 cores
        routing_only: if lab_kp.is_empty() {
            vec![KP.to_string()]
        } else {
            vec![]
        },
        kube_proxy: lab_kp,
        ..Default::default()
    })?;
    let w = Writer::new(&lab)?;
    w.namespace()?;
    if cold {
        lab.stop_agent(TR)?;
        let data = lab.dir().join(format!("{TR}-data"));
        for f in ["watch.snapshot", "proxy.journal"] {
            match std::fs::remove_file(data.join(f)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("remove {f}"))
                }
                _ => {}
            }
        }
    }
    // (a) the kernel's announcements from before the first write
    let watches = who
        .iter()
        .map(|p| {
            crate::nftmon::SetWatch::start(&netns::path(&lab.ns(p.node())), p.table(), p.set())
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let t0 = Instant::now();
    let mut last = w.fill(0, n)?;
    eprintln!(
        "{n} Services x 10 endpoints written in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    if cold {
        last = Instant::now();
        lab.start_agent(TR)?;
    }
    let ips = w.cluster_ips()?;
    if ips.len() != n {
        bail!("{} Services have a clusterIP, {n} were written", ips.len());
    }
    let mut out = Vec::new();
    // each proxy's time: when the last of the Service addresses was first
    // added to its map (a proxy that programmed one before the last write
    // counts from that write). Should its monitor lose announcements, the
    // map is listed instead (+1: the kubernetes Service) until it is full.
    let mut bulk: Vec<Option<Duration>> = vec![None; who.len()];
    let mut listing = vec![false; who.len()];
    let deadline = Instant::now() + Duration::from_secs(900);
    while bulk.iter().any(Option::is_none) {
        for (k, p) in who.iter().enumerate() {
            if bulk[k].is_some() {
                continue;
            }
            if !listing[k] {
                match watches[k].all_seen(&ips) {
                    Ok(Some(t)) => bulk[k] = Some(t.saturating_duration_since(last)),
                    Ok(None) => {}
                    Err(e) => {
                        eprintln!("{n}: bulk: {e}; listing the map instead");
                        listing[k] = true;
                    }
                }
            } else if count(&programmed(&lab, *p)) > n {
                bulk[k] = Some(last.elapsed());
            }
        }
        if Instant::now() > deadline {
            bail!("bulk: not every proxy programmed {n} Services within 900 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(watches);
    let bulk: Vec<Duration> = bulk.into_iter().flatten().collect();
    // (d) RSS once settled, of each before any is restarted
    let rss = who
        .iter()
        .map(|p| Ok(crate::converge::rss_mb(pid_of(&lab, *p)?)))
        .collect::<anyhow::Result<Vec<f64>>>()?;
    for (k, p) in who.iter().enumerate() {
        let rss = rss[k];
        // the other proxy is stopped while this one is measured (both
        // ways): on 2 cores, kube-proxy's sync of the changed Service (1 s
        // of CPU at 1,000, 5 s at 5,000) would otherwise run beside
        // trellis's, and beside its start
        let others: Vec<Proxy> = who.iter().copied().filter(|o| o != p).collect();
        for o in &others {
            stop(&mut lab, *o)?;
        }
        // quiet first: its last sync longer ago than either proxy's
        // minimum interval between syncs (kube-proxy 1 s, trellis 100 ms),
        // so the change measures a sync, not the rate limit after the last
        std::thread::sleep(Duration::from_secs(2));
        // (c) one endpoint changed: until a commit in the proxy's node
        // announces an object holding the new address; the median of
        // ONE_SAMPLES changes of different Services, each after 2 s of quiet
        // (an API server holding 60,000 objects pauses now and then: one
        // sample would be one draw of its pauses)
        let monitor = crate::nftmon::Monitor::open(&netns::path(&lab.ns(p.node())))?;
        let mut ones = Vec::new();
        for sample in 0..ONE_SAMPLES {
            if sample > 0 {
                std::thread::sleep(Duration::from_secs(2));
            }
            monitor.drain();
            let i = n / 2 + sample;
            // 10.244.250-255.x: no endpoint of `ep` has them
            let new_ip = std::net::Ipv4Addr::new(10, 244, 250 + sample as u8, 1 + k as u8);
            let t = w.change(i, &new_ip.to_string())?;
            // not seen within the limit: reported, the run goes on
            match monitor.wait_for(new_ip, Duration::from_secs(120)) {
                Ok(done) => ones.push(done - t),
                Err(e) => eprintln!("{n}: one change: {e}"),
            }
        }
        drop(monitor);
        ones.sort();
        let one = (!ones.is_empty()).then(|| ones[ones.len() / 2]);
        eprintln!(
            "{n}: one change, each sample (ms): {:?}",
            ones.iter()
                .map(|d| (ms(*d) * 10.0).round() / 10.0)
                .collect::<Vec<_>>()
        );
        // (b) restart with the tables kept, one Service added meanwhile
        let marker = n + 1 + k;
        stop(&mut lab, *p)?;
        w.fill(marker, marker + 1)?;
        let ip = w.cluster_ip(marker)?;
        let watch =
            crate::nftmon::SetWatch::start(&netns::path(&lab.ns(p.node())), p.table(), p.set())?;
        let started = Instant::now();
        start(&mut lab, *p)?;
        let done = added(&lab, *p, &watch, &ip, Duration::from_secs(900))?;
        drop(watch);
        // the others back, and caught up (the marker Service in their
        // kernel), before the next proxy is measured: a start still under
        // way would be in its figures
        for o in &others {
            start(&mut lab, *o)?;
        }
        for o in &others {
            wait("the other proxy back", Duration::from_secs(900), || {
                programmed(&lab, *o).contains(&format!("{ip} . tcp . 80"))
            })?;
        }
        out.push(Figures {
            bulk_ms: ms(bulk[k]),
            restart_ms: ms(done - started),
            one_ms: one.map(ms).unwrap_or(f64::NAN),
            rss_mb: rss,
        });
        eprintln!(
            "{n}: {} bulk {:.0} ms, restart {:.0} ms, one change {:.1} ms, rss {rss:.0} MB",
            if *p == Proxy::KubeProxy {
                "kube-proxy"
            } else {
                "trellis"
            },
            ms(bulk[k]),
            ms(done - started),
            one.map(ms).unwrap_or(f64::NAN)
        );
    }
    keep_logs(&lab)?;
    lab.destroy()?;
    Ok(out)
}

/// With `TRELLIS_BENCH_LOGS=DIR`, the lab's agent logs are copied there
/// before it goes (profiling: `TRELLIS_LOG=info,trellis_agent=debug`).
fn keep_logs(lab: &Lab) -> anyhow::Result<()> {
    let Some(dir) = std::env::var_os("TRELLIS_BENCH_LOGS") else {
        return Ok(());
    };
    std::fs::create_dir_all(&dir)?;
    for node in [KP, TR] {
        let to = std::path::Path::new(&dir).join(format!("{node}.log"));
        std::fs::copy(lab.agent_log(node), &to)
            .with_context(|| format!("copy {node}'s log to {}", to.display()))?;
    }
    Ok(())
}

/// `proxy-sync --trellis-only N [--cold 1]`: trellis alone at one size
/// (profiling; `cold`: as the huge size of the full run).
pub fn trellis_only(n: usize, cold: bool) -> anyhow::Result<()> {
    trellis_lab::k8s::bin_dir()?;
    let f = one_size(n, &[Proxy::Trellis], cold)?;
    println!(
        "services={n} bulk_ms={:.0} restart_ms={:.0} one_ms={:.1} rss_mb={:.0}",
        f[0].bulk_ms, f[0].restart_ms, f[0].one_ms, f[0].rss_mb
    );
    Ok(())
}

/// `proxy-sync --both N`: both proxies at one size (profiling).
pub fn both(n: usize) -> anyhow::Result<()> {
    trellis_lab::k8s::bin_dir()?;
    let f = one_size(n, &[Proxy::KubeProxy, Proxy::Trellis], false)?;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    println!(
        "services={n} kp_bulk_ms={:.0} t_bulk_ms={:.0} kp_restart_ms={:.0} t_restart_ms={:.0} kp_one_ms={:.1} t_one_ms={:.1} \
         kp_rss_mb={:.0} t_rss_mb={:.0} bulk_ratio={:.3} restart_ratio={:.3} rss_ratio={:.3}",
        f[0].bulk_ms, f[1].bulk_ms, f[0].restart_ms, f[1].restart_ms, f[0].one_ms, f[1].one_ms,
        f[0].rss_mb, f[1].rss_mb,
        ratio(f[1].bulk_ms, f[0].bulk_ms),
        ratio(f[1].restart_ms, f[0].restart_ms),
        ratio(f[1].rss_mb, f[0].rss_mb),
    );
    Ok(())
}

/// `proxy-sync`: prints the result line.
pub fn sync(small: usize, large: usize, huge: usize) -> anyhow::Result<()> {
    trellis_lab::k8s::bin_dir()?;
    let both = [Proxy::KubeProxy, Proxy::Trellis];
    let s = one_size(small, &both, false)?;
    let l = one_size(large, &both, false)?;
    // cold: written with the agent stopped (a running agent makes the fill
    // of 60,000 objects take over an hour on 2 cores), bulk from its start
    let h = one_size(huge, &[Proxy::Trellis], true)?;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    println!(
        "kp1k_bulk_ms={:.0} t1k_bulk_ms={:.0} kp1k_restart_ms={:.0} t1k_restart_ms={:.0} kp1k_one_ms={:.1} t1k_one_ms={:.1} \
         kp5k_bulk_ms={:.0} t5k_bulk_ms={:.0} kp5k_restart_ms={:.0} t5k_restart_ms={:.0} kp5k_one_ms={:.1} t5k_one_ms={:.1} \
         t30k_bulk_ms={:.0} t30k_restart_ms={:.0} t30k_one_ms={:.1} kp5k_rss_mb={:.0} t5k_rss_mb={:.0} t30k_rss_mb={:.0} \
         restart_ratio_5k={:.3} bulk_ratio_5k={:.3} rss_ratio_5k={:.3}",
        s[0].bulk_ms, s[1].bulk_ms, s[0].restart_ms, s[1].restart_ms, s[0].one_ms, s[1].one_ms,
        l[0].bulk_ms, l[1].bulk_ms, l[0].restart_ms, l[1].restart_ms, l[0].one_ms, l[1].one_ms,
        h[0].bulk_ms, h[0].restart_ms, h[0].one_ms, l[0].rss_mb, l[1].rss_mb, h[0].rss_mb,
        ratio(l[1].restart_ms, l[0].restart_ms),
        ratio(l[1].bulk_ms, l[0].bulk_ms),
        ratio(l[1].rss_mb, l[0].rss_mb),
    );
    Ok(())
}

/// Median TCP connect time from `ns` to `to` over `n` connections.
pub(crate) fn connect_median(ns: &str, to: SocketAddr, n: usize) -> anyhow::Result<Duration> {
    let mut times = netns::within(&netns::path(ns), || -> std::io::Result<Vec<Duration>> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
            v.push(t.elapsed());
            drop(s);
        }
        Ok(v)
    })??;
    times.sort();
    Ok(times[times.len() / 2])
}

/// `proxy-latency`: prints the result line.
pub fn latency(small: usize, large: usize, connects: usize) -> anyhow::Result<()> {
    if connects == 0 || small == 0 || large <= small {
        bail!("--connects must be > 0 and 0 < --small < --large");
    }
    trellis_lab::k8s::bin_dir()?;
    let mut lab = Lab::create(LabOptions {
        nodes: 2,
        kubernetes: Some(trellis_lab::cluster_config("vxlan")?),
        ..Default::default()
    })?;
    lab.add_pod("n1", "cli", "")?;
    let web = lab.add_pod("n2", "web", "")?;
    let _backend = lab.serve("n2", "web", 8080)?;
    let w = Writer::new(&lab)?;
    w.namespace()?;
    // Service 0 goes to the real backend; the others to addresses never used
    let svcs: Api<Service> = Api::namespaced(w.client.clone(), NS);
    let slices: Api<EndpointSlice> = Api::namespaced(w.client.clone(), NS);
    let web_ip = web.ip.clone();
    w.run(async move {
        within(
            "create svc-0".into(),
            svcs.create(&PostParams::default(), &service(0)?),
        )
        .await?;
        within(
            "create its slice".into(),
            slices.create(
                &PostParams::default(),
                &slice(0, std::slice::from_ref(&web_ip))?,
            ),
        )
        .await?;
        anyhow::Ok(())
    })?;
    w.fill(1, small)?;
    let ip = w.cluster_ip(0)?;
    let to: SocketAddr = format!("{ip}:80").parse()?;
    let cli = lab.pod_ns("n1", "cli");
    let svc0 = format!("{ip} . tcp . 80");
    wait("small set programmed", Duration::from_secs(120), || {
        let m = nft(
            &lab,
            "n1",
            &["list", "map", "inet", "trellis-proxy", "services"],
        );
        count(&m) >= small && m.contains(&svc0)
    })?;
    let lat_small = connect_median(&cli, to, connects)?;
    w.fill(small, large)?;
    wait("large set programmed", Duration::from_secs(600), || {
        count(&nft(
            &lab,
            "n1",
            &["list", "map", "inet", "trellis-proxy", "services"],
        )) >= large
    })?;
    let lat_large = connect_median(&cli, to, connects)?;
    lab.destroy()?;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "services_small={small} services_large={large} lat10_us={:.1} lat10k_us={:.1} ratio={:.3}",
        us(lat_small),
        us(lat_large),
        us(lat_large) / us(lat_small)
    );
    Ok(())
}
