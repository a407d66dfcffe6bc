//! NetworkPolicy at scale, on a lab's real API server and one real agent.
//!
//! - `policy-scale`: 1,000 NetworkPolicies over 5,000 pods in 20
//!   namespaces. 100 pods are real lab pods on n1 (CNI ADD through the
//!   agent, addresses from its IPAM); the others are Pod objects bound to
//!   n2 (its agent stopped: one agent measured) and reported Running with
//!   an address, as the lab's kubelet reports its own. Policy `j` sits in
//!   namespace `ps-(j % 20)`, selects `app: app-((j / 20) % 50)` (so every
//!   pod is selected by one policy in its namespace), allows ingress from
//!   pods with `role: r(j % 4)` in namespaces with `team: t(j % 5)` on one
//!   TCP port and a named port; one in three also restricts egress (UDP 53
//!   to a /16, TCP to the same peers). Measured: (a) full: n1's agent
//!   started cold (policy table and watch snapshot removed) until the last
//!   local pod's address was last added to the table's `ingress` map (one
//!   transaction: that commit is the whole table); (b) one pod label
//!   change (a remote pod joins a peer) until its address is added to a
//!   set in n1's kernel; (c) one new policy (a peer network no other has)
//!   until that network is in n1's kernel; (d) the agent's RSS.
//! - `policy-latency`: TCP connection setup between two pods on two nodes,
//!   no policy, then 1,000 NetworkPolicies in force (10 select the server
//!   and 10 the client, each pod's rules evaluated; the others select pods
//!   elsewhere).
//!
//! Every probe reads the kernel (nf_tables commit announcements in n1),
//! never the agent's log.

use crate::api::{create, Writer};
use crate::converge::rss_mb;
use crate::k8s::within;
use crate::nftmon::{Monitor, SetWatch};
use crate::proxy::connect_median;
use anyhow::{bail, Context};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, Patch, PatchParams, PostParams};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use trellis_lab::{netns, Lab, LabOptions, PodSpec};

/// The agent's policy table (`trellis_policy::TABLE`).
const TABLE: &str = "trellis-policy";
const NAMESPACES: usize = 20;
const APPS: usize = 50;
const IN_FLIGHT: usize = 32;
/// The measured agent's node, and the node the other pods are bound to.
const LOCAL: &str = "n1";
const REMOTE: &str = "n2";

fn ns_name(i: usize) -> String {
    format!("ps-{i}")
}

/// Pod `k`'s namespace, name and labels.
fn pod_of(k: usize) -> (String, String, serde_json::Value) {
    let labels = serde_json::json!({
        "app": format!("app-{}", k % APPS),
        "role": format!("r{}", (k / NAMESPACES) % 4),
    });
    (ns_name(k % NAMESPACES), format!("p{k}"), labels)
}

/// The address reported for remote pod `k` (outside every podCIDR; only
/// ever data in sets, never sent to).
fn remote_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 250, (k / 250) as u8, (k % 250 + 1) as u8)
}

fn policy(j: usize, extra: Option<&str>) -> anyhow::Result<NetworkPolicy> {
    let mut spec = serde_json::json!({
        "podSelector": {"matchLabels": {"app": format!("app-{}", (j / NAMESPACES) % APPS)}},
        "policyTypes": ["Ingress"],
        "ingress": [{
            "from": [{
                "podSelector": {"matchLabels": {"role": format!("r{}", j % 4)}},
                "namespaceSelector": {"matchLabels": {"team": format!("t{}", j % 5)}},
            }],
            "ports": [{"protocol": "TCP", "port": 8000 + (j % 100)}, {"protocol": "TCP", "port": "http"}],
        }],
    });
    if j.is_multiple_of(3) {
        spec["policyTypes"] = serde_json::json!(["Ingress", "Egress"]);
        spec["egress"] = serde_json::json!([
            {"to": [{"ipBlock": {"cidr": format!("10.{}.0.0/16", 100 + j % 100)}}],
             "ports": [{"protocol": "UDP", "port": 53}]},
            {"to": [{"podSelector": {"matchLabels": {"role": format!("r{}", j % 4)}},
                     "namespaceSelector": {"matchLabels": {"team": format!("t{}", j % 5)}}}],
             "ports": [{"protocol": "TCP", "port": 8000 + (j % 100)}]},
        ]);
    }
    if let Some(cidr) = extra {
        spec["ingress"]
            .as_array_mut()
            .context("ingress")?
            .push(serde_json::json!({"from": [{"ipBlock": {"cidr": cidr}}]}));
    }
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": format!("np-{j}"), "namespace": ns_name(j % NAMESPACES)},
        "spec": spec,
    }))?)
}

impl Writer {
    /// The 20 namespaces, `team: t(i % 5)`.
    fn policy_namespaces(&self) -> anyhow::Result<()> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        self.run(async move {
            for i in 0..NAMESPACES {
                let ns: Namespace = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": ns_name(i), "labels": {"team": format!("t{}", i % 5)}}}))?;
                create(&api, &ns, &ns_name(i)).await?;
            }
            Ok(())
        })
    }

    /// Pods `from..to`, bound to `REMOTE`, then reported Running with
    /// their address.
    fn remote_pods(&self, from: usize, to: usize) -> anyhow::Result<()> {
        let client = self.client.clone();
        self.run(async move {
            futures::stream::iter(from..to)
                .map(|k| {
                    let client = client.clone();
                    async move {
                        let (ns, name, labels) = pod_of(k);
                        let api: Api<Pod> = Api::namespaced(client, &ns);
                        let pod: Pod = serde_json::from_value(serde_json::json!({
                            "apiVersion": "v1", "kind": "Pod",
                            "metadata": {"name": name, "namespace": ns, "labels": labels},
                            "spec": {"nodeName": REMOTE, "automountServiceAccountToken": false,
                                     "tolerations": [{"operator": "Exists"}],
                                     "containers": [{"name": "c", "image": "lab.invalid/pause",
                                                     "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]},
                        }))?;
                        create(&api, &pod, &name).await?;
                        let ip = remote_ip(k).to_string();
                        let status = serde_json::json!({"status": {
                            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                            "conditions": [{"type": "Ready", "status": "True"}]}});
                        within(
                            format!("status of {name}"),
                            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)),
                        )
                        .await?;
                        anyhow::Ok(())
                    }
                })
                .buffer_unordered(IN_FLIGHT)
                .try_collect::<Vec<()>>()
                .await?;
            Ok(())
        })
    }

    /// Policies `0..n`.
    fn policies(&self, n: usize) -> anyhow::Result<()> {
        let client = self.client.clone();
        self.run(async move {
            futures::stream::iter(0..n)
                .map(|j| {
                    let client = client.clone();
                    async move {
                        let api: Api<NetworkPolicy> =
                            Api::namespaced(client, &ns_name(j % NAMESPACES));
                        create(&api, &policy(j, None)?, &format!("np-{j}")).await
                    }
                })
                .buffer_unordered(IN_FLIGHT)
                .try_collect::<Vec<()>>()
                .await?;
            Ok(())
        })
    }
}

/// `policy-scale`: prints the result line.
pub fn scale(policies: usize, pods: usize, local: usize) -> anyhow::Result<()> {
    if local == 0 || local > 200 || pods <= local || policies < NAMESPACES * APPS {
        bail!("--local must be 1..=200, --pods more than --local, --policies at least 1000 (every pod selected)");
    }
    trellis_lab::k8s::bin_dir()?;
    let mut lab = Lab::create(LabOptions {
        nodes: 2,
        kubernetes: Some(trellis_lab::cluster_config("vxlan")?),
        routing_only: vec![LOCAL.to_string(), REMOTE.to_string()],
        ..Default::default()
    })?;
    lab.stop_agent(REMOTE)?;
    let w = Writer::new(&lab)?;
    w.policy_namespaces()?;
    // the local pods, attached through the agent (k < local)
    let t0 = Instant::now();
    let mut local_ips = Vec::new();
    for k in 0..local {
        let (ns, name, labels) = pod_of(k);
        let spec = PodSpec {
            namespace: ns,
            name,
            labels: serde_json::from_value(labels)?,
            ports: vec![("http".into(), "TCP".into(), 8080)],
        };
        let a = lab.add_pod_as(LOCAL, &format!("l{k}"), "", Some(&spec))?;
        local_ips.push(a.ip.parse::<Ipv4Addr>()?);
    }
    eprintln!("{local} local pods in {:.1} s", t0.elapsed().as_secs_f64());
    // the rest written with the agent stopped, then a cold start
    lab.stop_agent(LOCAL)?;
    let t0 = Instant::now();
    w.remote_pods(local, pods)?;
    w.policies(policies)?;
    eprintln!(
        "{} pods and {policies} policies written in {:.1} s",
        pods - local,
        t0.elapsed().as_secs_f64()
    );
    let node_ns = lab.ns(LOCAL);
    lab.exec(
        &node_ns,
        &["nft", "delete", "table", "inet", TABLE],
        Duration::from_secs(30),
    )
    .map_err(|e| anyhow::anyhow!("remove the policy table: {e}"))?;
    let snapshot = lab.dir().join(format!("{LOCAL}-data/watch.snapshot"));
    match std::fs::remove_file(&snapshot) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("remove {}", snapshot.display()))
        }
        _ => {}
    }
    // (a) full
    let watch = SetWatch::start(&netns::path(&node_ns), TABLE, "ingress")?;
    let started = Instant::now();
    lab.start_agent(LOCAL)?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if watch.all_seen(&local_ips)?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            bail!("full: the local pods' profiles were not all in the kernel within 300 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // settled: nothing more added to the map for 3 s (a first partial
    // load would be followed by the complete one)
    std::thread::sleep(Duration::from_secs(3));
    let full = watch
        .all_last(&local_ips)?
        .context("local pods seen")?
        .saturating_duration_since(started);
    drop(watch);
    check_complete(&lab, &local_ips)?;
    let pid = lab
        .node(LOCAL)?
        .agent_pid
        .context("trellisd is not running")?;
    // (b) a remote pod in ps-0 (team t0) with role r1 becomes r0: it
    // joins the peers of np-0, which selects local pod 0
    let k = (local..pods)
        .find(|k| k % NAMESPACES == 0 && (k / NAMESPACES) % 4 == 1)
        .context("no remote pod to relabel")?;
    let (ns, name, _) = pod_of(k);
    let monitor = Monitor::open(&netns::path(&node_ns))?;
    std::thread::sleep(Duration::from_secs(1));
    monitor.drain();
    let api: Api<Pod> = Api::namespaced(w.client.clone(), &ns);
    let t = Instant::now();
    w.run(async move {
        let p = serde_json::json!({"metadata": {"labels": {"role": "r0"}}});
        within(
            "relabel".into(),
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&p)),
        )
        .await?;
        Ok(())
    })?;
    let label = monitor.wait_for(remote_ip(k), Duration::from_secs(60))? - t;
    // (c) a new policy with a peer network no other policy has
    std::thread::sleep(Duration::from_secs(1));
    monitor.drain();
    let net = Ipv4Addr::new(203, 0, 113, 77);
    let np = policy(policies, Some(&format!("{net}/32")))?;
    let api: Api<NetworkPolicy> =
        Api::namespaced(w.client.clone(), &ns_name(policies % NAMESPACES));
    let t = Instant::now();
    w.run(async move {
        within("new policy".into(), api.create(&PostParams::default(), &np)).await?;
        Ok(())
    })?;
    let new_policy = monitor.wait_for(net, Duration::from_secs(60))? - t;
    let rss = rss_mb(pid);
    lab.destroy()?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "policies={policies} pods={pods} local={local} full_ms={:.0} label_change_ms={:.1} new_policy_ms={:.1} rss_mb={rss:.0}",
        ms(full),
        ms(label),
        ms(new_policy)
    );
    Ok(())
}

/// The kernel's table, read once: every local pod has its ingress
/// profile, none of them the drop-all of a pod unknown to the API.
fn check_complete(lab: &Lab, local: &[Ipv4Addr]) -> anyhow::Result<()> {
    let t = lab
        .exec(
            &lab.ns(LOCAL),
            &["nft", "list", "map", "inet", TABLE, "ingress"],
            Duration::from_secs(30),
        )
        .map_err(|e| anyhow::anyhow!("list the ingress map: {e}"))?;
    let text = String::from_utf8_lossy(&t.output.stdout);
    for ip in local {
        let Some(line) = text
            .split([',', '{', '}'])
            .find(|e| e.trim().starts_with(&format!("{ip} :")))
        else {
            bail!("{ip} has no ingress profile in the kernel");
        };
        if line.contains("unknown-") {
            bail!("{ip} still has the profile of a pod unknown to the API");
        }
    }
    Ok(())
}

/// The latency benchmark's policies: `i % 100 == 0` select the server
/// (`lat-zz` allows the client, the others other peers), `i % 100 == 50`
/// the client (`lat-zz-out` lets it reach the server), the rest pods
/// that do not exist here.
fn latency_policy(i: usize) -> anyhow::Result<NetworkPolicy> {
    let (name, spec) = match i {
        0 => (
            "lat-zz".to_string(),
            serde_json::json!({"podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "cli"}}}],
                             "ports": [{"protocol": "TCP", "port": 8080}]}]}),
        ),
        50 => (
            "lat-zz-out".to_string(),
            serde_json::json!({"podSelector": {"matchLabels": {"app": "cli"}}, "policyTypes": ["Egress"],
                "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                            "ports": [{"protocol": "TCP", "port": 8080}]}]}),
        ),
        i if i % 100 == 0 => (
            format!("lat-{i}"),
            serde_json::json!({"podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("other-{i}")}}}],
                             "ports": [{"protocol": "TCP", "port": 8080}]}]}),
        ),
        i if i % 100 == 50 => (
            format!("lat-{i}"),
            serde_json::json!({"podSelector": {"matchLabels": {"app": "cli"}}, "policyTypes": ["Egress"],
                "egress": [{"to": [{"ipBlock": {"cidr": format!("10.{}.0.0/16", 100 + i / 100)}}],
                            "ports": [{"protocol": "UDP", "port": 53}]}]}),
        ),
        i => (
            format!("lat-{i}"),
            serde_json::json!({"podSelector": {"matchLabels": {"app": format!("svc-{i}")}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("other-{i}")}}}],
                             "ports": [{"protocol": "TCP", "port": 8000 + i % 100}]}]}),
        ),
    };
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }))?)
}

/// How many NetworkPolicy chains the profile of `ip` in `map` of
/// `node`'s policy table jumps to.
fn jumps(lab: &Lab, node: &str, map: &str, ip: Ipv4Addr) -> usize {
    let nft = |args: &[&str]| -> String {
        let mut a = vec!["nft"];
        a.extend_from_slice(args);
        lab.exec(&lab.ns(node), &a, Duration::from_secs(30))
            .map(|t| String::from_utf8_lossy(&t.output.stdout).to_string())
            .unwrap_or_default()
    };
    let m = nft(&["list", "map", "inet", TABLE, map]);
    let Some(chain) = m
        .split([',', '{', '}'])
        .find_map(|e| e.trim().strip_prefix(&format!("{ip} : goto ")))
    else {
        return 0;
    };
    nft(&["list", "chain", "inet", TABLE, chain.trim()])
        .matches("jump np-")
        .count()
}

/// `policy-latency`: prints the result line.
pub fn latency(policies: usize, connects: usize) -> anyhow::Result<()> {
    if connects == 0 || policies < 100 {
        bail!("--connects must be > 0 and --policies at least 100");
    }
    trellis_lab::k8s::bin_dir()?;
    let mut lab = Lab::create(LabOptions {
        nodes: 2,
        kubernetes: Some(trellis_lab::cluster_config("vxlan")?),
        ..Default::default()
    })?;
    let cli_ip: Ipv4Addr = lab.add_pod("n1", "cli", "")?.ip.parse()?;
    let web = lab.add_pod("n2", "web", "")?;
    let _backend = lab.serve("n2", "web", 8080)?;
    let to: SocketAddr = format!("{}:8080", web.ip).parse()?;
    let cli = lab.pod_ns("n1", "cli");
    // warm: neighbours resolved, the path's first connections behind us
    connect_median(&cli, to, 100)?;
    let lat0 = connect_median(&cli, to, connects)?;
    let w = Writer::new(&lab)?;
    // the server's profile is in n2's kernel when its ingress map names it
    let watch = SetWatch::start(&netns::path(&lab.ns("n2")), TABLE, "ingress")?;
    let client = w.client.clone();
    w.run(async move {
        futures::stream::iter(0..policies)
            .map(|i| {
                let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), "default");
                async move { create(&api, &latency_policy(i)?, &format!("policy {i}")).await }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    })?;
    let web_ip: Ipv4Addr = web.ip.parse()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while watch.all_seen(&[web_ip])?.is_none() {
        if Instant::now() > deadline {
            bail!("the server's profile was not in n2's kernel within 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(watch);
    // every policy of each end in force: its profile jumps to all of them
    let server = (0..policies).filter(|i| i % 100 == 0).count();
    let client = (0..policies).filter(|i| i % 100 == 50).count();
    for (node, map, ip, want) in [
        ("n2", "ingress", web_ip, server),
        ("n1", "egress", cli_ip, client),
    ] {
        let deadline = Instant::now() + Duration::from_secs(120);
        while jumps(&lab, node, map, ip) != want {
            if Instant::now() > deadline {
                bail!(
                    "{ip}'s {map} profile on {node} does not hold its {want} policies within 120 s"
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let lat_n = connect_median(&cli, to, connects)?;
    // and the connection was policed: another pod is refused
    lab.add_pod("n1", "stranger", "")?;
    let refused = lab.probe_tcp(&lab.pod_ns("n1", "stranger"), to, Duration::from_secs(1));
    if !matches!(refused, trellis_lab::Outcome::TimedOut) {
        bail!("a pod no policy allows was not dropped: {refused:?}");
    }
    lab.destroy()?;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "policies={policies} lat0_us={:.1} lat{policies}_us={:.1} ratio={:.3}",
        us(lat0),
        us(lat_n),
        us(lat_n) / us(lat0)
    );
    Ok(())
}
