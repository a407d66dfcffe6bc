//! `k8s-converge`: N Node objects in the lab's real API server (podCIDRs
//! from the real controller manager, annotations written through
//! `nodes/status` as agents write them) and one real agent (vxlan): the
//! time from the agent's start to all routes, neighbours and FDB entries
//! installed, then one Node more until its route is in, the agent's RSS,
//! and the API requests it made (its own `trellis_api_requests_total`).

use crate::converge::{rss_mb, wait_counts};
use anyhow::{bail, Context};
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use trellis_lab::{exec, netns, Lab, LabOptions};

/// The lab's pod network in /26s: 1,024 node subnets.
const NETWORK: &str = r#"{"Network":"10.244.0.0/16","SubnetLen":26,"Backend":{"Type":"vxlan"}}"#;
/// Most simulated nodes (one subnet is the real node's, one the extra's).
const MAX_NODES: usize = 1022;
/// One API call may take this long.
const CALL: Duration = Duration::from_secs(15);
/// Requests to the API server in flight at once while filling it.
const IN_FLIGHT: usize = 32;

fn sim_name(i: usize) -> String {
    format!("sim{i:04}")
}

/// What an agent on simulated node `i` would publish.
fn sim_annotations(i: usize) -> BTreeMap<String, String> {
    use trellis_kube::node::{BACKEND_TYPE, PUBLIC_IP, VTEP_MAC};
    // underlay addresses of the documentation ranges the lab may use
    // (never sent to: they only fill FDB entries); more nodes than
    // addresses share them, which the vxlan backend does not mind
    let k = i % 490;
    let ip = if k < 245 {
        format!("198.51.100.{}", 10 + k)
    } else {
        format!("203.0.113.{}", 10 + (k - 245))
    };
    let mac = format!("0e:74:c6:12:{:02x}:{:02x}", (i >> 8) & 0xff, i & 0xff);
    [
        (PUBLIC_IP.to_string(), ip),
        (BACKEND_TYPE.to_string(), "vxlan".to_string()),
        (VTEP_MAC.to_string(), mac),
    ]
    .into()
}

/// `call`, or an error naming `what` after [`CALL`].
pub(crate) async fn within<T>(
    what: String,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(CALL, call)
        .await
        .map_err(|_| anyhow::anyhow!("{what}: no answer within {CALL:?}"))?
        .with_context(|| what)
}

async fn create(nodes: &Api<Node>, i: usize) -> anyhow::Result<()> {
    let n: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": sim_name(i), "labels": {"trellis.dev/bench": "sim"}},
    }))?;
    within(
        format!("create {}", sim_name(i)),
        nodes.create(&PostParams::default(), &n),
    )
    .await
    .map(drop)
}

async fn publish(nodes: &Api<Node>, i: usize) -> anyhow::Result<()> {
    let patch = serde_json::json!({"metadata": {"annotations": sim_annotations(i)}});
    within(
        format!("publish {}", sim_name(i)),
        nodes.patch_status(&sim_name(i), &PatchParams::default(), &Patch::Merge(&patch)),
    )
    .await
    .map(drop)
}

/// Waits until every simulated node has its podCIDR from the controller
/// manager.
async fn wait_pod_cidrs(nodes: &Api<Node>, want: usize, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let l = within(
            "list the simulated nodes".into(),
            nodes.list(&ListParams::default().labels("trellis.dev/bench=sim")),
        )
        .await?;
        let have = l
            .items
            .iter()
            .filter(|n| n.spec.as_ref().and_then(|s| s.pod_cidr.as_ref()).is_some())
            .count();
        if have >= want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the controller manager gave {have} of {want} nodes a podCIDR within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `trellis_api_requests_total{verb="VERB"}` of `node`'s agent.
fn api_requests(lab: &Lab, node: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let (_, text) = lab.agent_http(node, "/metrics")?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("trellis_api_requests_total{verb=\"")?;
            let (verb, rest) = rest.split_once("\"}")?;
            Some((verb.to_string(), rest.trim().parse().ok()?))
        })
        .collect())
}

/// Runs the benchmark and prints the result line.
pub fn run(count: usize) -> anyhow::Result<()> {
    if !(1..=MAX_NODES).contains(&count) {
        bail!("--nodes: 1 to {MAX_NODES} (the lab's 10.244.0.0/16 holds 1,024 /26 node subnets)");
    }
    trellis_lab::k8s::bin_dir()?;
    let mut lab = Lab::create(LabOptions {
        nodes: 1,
        kubernetes: Some(NETWORK.into()),
        ..Default::default()
    })?;
    let ns = lab.ns("n1");
    let kubeconfig = lab.kubeconfig();
    // the API server is reached from the node's namespace, as agents do:
    // the runtime and its sockets live on a thread inside it
    let in_node = |work: &(dyn Fn(Api<Node>) -> BoxFuture<'static, anyhow::Result<Duration>>
                         + Sync)| {
        netns::within(&netns::path(&ns), || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let (client, _) = trellis_kube::client(&trellis_kube::ClientOptions {
                    kubeconfig: Some(kubeconfig.clone()),
                    ..Default::default()
                })
                .await?;
                work(Api::all(client)).await
            })
        })?
    };
    let fill = in_node(&|nodes| {
        Box::pin(async move {
            let t = Instant::now();
            futures::stream::iter(0..count)
                .map(|i| create(&nodes, i))
                .buffer_unordered(IN_FLIGHT)
                .try_collect::<Vec<()>>()
                .await?;
            wait_pod_cidrs(&nodes, count, Duration::from_secs(300)).await?;
            futures::stream::iter(0..count)
                .map(|i| publish(&nodes, i))
                .buffer_unordered(IN_FLIGHT)
                .try_collect::<Vec<()>>()
                .await?;
            Ok(t.elapsed())
        })
    })?;
    eprintln!(
        "{count} Nodes created, given podCIDRs by the controller manager and published in {:.1} s",
        fill.as_secs_f64()
    );
    // a cold start: the agent stopped, its device (and with it every
    // route, neighbour and FDB entry of the backend) gone
    lab.stop_agent("n1")?;
    exec::ip(&["-n", &ns, "link", "del", "trellis.1"])?;
    let started = Instant::now();
    let pid = lab.start_agent("n1")?;
    let done = netns::within(&netns::path(&ns), || {
        wait_counts(count, Duration::from_secs(120))
    })??;
    let full = done - started;
    // one Node more: from the moment it is published (podCIDR from the
    // controller manager, annotations written) until its route is in
    let one = in_node(&|nodes| {
        Box::pin(async move {
            create(&nodes, count).await?;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let n = within(
                    format!("get {}", sim_name(count)),
                    nodes.get(&sim_name(count)),
                )
                .await?;
                if n.spec.and_then(|s| s.pod_cidr).is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("no podCIDR for {} within 30 s", sim_name(count));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // from the PATCH request on: the watch event may beat its reply
            let t = Instant::now();
            publish(&nodes, count).await?;
            wait_counts(count + 1, Duration::from_secs(30))?;
            Ok(t.elapsed())
        })
    })?;
    let rss = rss_mb(pid);
    // the requests of start-up and 5 s of steady state (every watch has
    // been opened by then; no request is repeated while nothing changes)
    std::thread::sleep(Duration::from_secs(5));
    let requests = api_requests(&lab, "n1")?;
    eprintln!("agent API requests by verb: {requests:?}");
    lab.destroy()?;
    println!(
        "nodes={count} full_ms={:.0} one_more_ms={:.1} rss_mb={rss:.1} list_requests={} watch_requests={}",
        full.as_secs_f64() * 1e3,
        one.as_secs_f64() * 1e3,
        requests.get("list").copied().unwrap_or(0),
        requests.get("watch").copied().unwrap_or(0),
    );
    Ok(())
}
