//! The agent's cluster side: join (read the cluster config, lease a
//! subnet), then keep the lease alive and keep routes to every other node
//! in line with the datastore — watch-driven, with a periodic resync.

use crate::config::AgentConfig;
use crate::lease::{claim, SubnetLease};
use crate::masq;
use crate::routes::{vtep_mac, RouteReconciler};
use anyhow::{anyhow, bail, Context};
use ipnet::Ipv4Net;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use trellis_dataplane::Dataplane;
use trellis_model::netconf::{BackendType, ClusterConfig};
use trellis_model::node::{parse_subnet_key, NodeRecord};
use trellis_routing::{desired, LocalNode};
use trellis_store::{Datastore, EtcdOptions, EtcdStore, Event, StoreError, TlsFiles, WatchItem};

/// What joining the cluster gave this node.
#[derive(Debug, Clone)]
pub struct Joined {
    /// The cluster network config.
    pub cfg: ClusterConfig,
    /// The leased subnet.
    pub lease: SubnetLease,
    /// This node as the backends see it.
    pub local: LocalNode,
    /// What this node publishes.
    pub record: NodeRecord,
    /// MTU for pods.
    pub pod_mtu: u32,
}

/// Live cluster view, for status output.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// Other nodes by name.
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Problems the backend reported.
    pub problems: Vec<String>,
    /// The BGP speaker, with the bgp backend.
    pub bgp: Option<BgpView>,
}

/// The BGP speaker as status shows it.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BgpView {
    /// Our AS.
    pub asn: u32,
    /// Router id.
    pub router_id: String,
    /// Cluster id when this node is a route reflector.
    pub route_reflector_cluster_id: Option<String>,
    /// Peers.
    pub peers: Vec<trellis_bgp::PeerStatus>,
}

/// Connects to the configured etcd.
pub async fn connect(agent: &AgentConfig) -> anyhow::Result<EtcdStore> {
    let e = agent
        .etcd
        .as_ref()
        .ok_or_else(|| anyhow!("no etcd configured"))?;
    let tls = match (&e.ca_file, &e.cert_file, &e.key_file) {
        (Some(ca), Some(cert), Some(key)) => Some(TlsFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }),
        _ => None,
    };
    let opts = EtcdOptions {
        endpoints: e.endpoints.clone(),
        tls,
        timeout: Duration::from_secs(5),
    };
    Ok(EtcdStore::connect(&opts).await?)
}

fn previous_file(agent: &AgentConfig) -> PathBuf {
    agent.data_dir.join("subnet")
}

/// Reads the cluster config, finds the underlay, leases a subnet.
pub async fn join<D: Datastore>(
    store: &D,
    agent: &AgentConfig,
    dp: &dyn Dataplane,
) -> anyhow::Result<Joined> {
    let etcd = agent
        .etcd
        .as_ref()
        .ok_or_else(|| anyhow!("no etcd configured"))?;
    let prefix = &etcd.prefix;
    let key = format!("{prefix}config");
    let kv = store
        .get(&key)
        .await
        .with_context(|| format!("read the cluster network config {key}"))?
        .ok_or_else(|| {
            anyhow!("no cluster network config at {key}: write a flannel-style net-conf.json there")
        })?;
    let cfg =
        ClusterConfig::parse(&String::from_utf8_lossy(&kv.value)).with_context(|| key.clone())?;
    match cfg.backend.kind {
        BackendType::Vxlan | BackendType::HostGw | BackendType::Bgp => {}
        BackendType::Ipip => {
            let supported = dp
                .link_kind_supported(trellis_dataplane::LinkKind::Ipip)
                .with_context(|| format!("{key}: probing for the kernel's ipip support"))?;
            if !supported {
                bail!(
                    "{key}: Backend.Type \"ipip\" needs IP-in-IP tunnels, and this kernel has no ipip \
                     driver (module ipip, CONFIG_NET_IPIP): creating an ipip link fails with \
                     \"unknown device type\". Use \"bgp\" (no encapsulation) or \"vxlan\" instead"
                );
            }
            bail!(
                "{key}: Backend.Type \"ipip\": the kernel has ipip, but this version of trellis \
                 does not program IPIP tunnels yet; use \"bgp\" or \"vxlan\""
            );
        }
    }
    let public_ip = agent
        .public_ip
        .ok_or_else(|| anyhow!("publicIp is not set"))?;
    let underlay = dp.underlay(IpAddr::V4(public_ip))?.ok_or_else(|| {
        anyhow!("publicIp {public_ip} is not an address of any interface of this node")
    })?;
    let ipnet::IpNet::V4(underlay_net) = underlay.net else {
        bail!("publicIp {public_ip}: underlay must be IPv4");
    };
    let previous: Option<Ipv4Net> = std::fs::read_to_string(previous_file(agent))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let record = NodeRecord {
        node: agent.node_name.clone(),
        subnet: Ipv4Net::default(),
        public_ip: IpAddr::V4(public_ip),
        backend_type: cfg.backend.kind.as_str().into(),
        vtep_mac: (cfg.backend.kind == BackendType::Vxlan)
            .then(|| trellis_dataplane::mac_string(&vtep_mac(public_ip))),
        bgp: agent.bgp.clone(),
    };
    let ttl = Duration::from_secs(agent.lease_ttl_seconds);
    let lease = claim(store, prefix, &cfg, &record, previous, ttl).await?;
    std::fs::create_dir_all(&agent.data_dir)?;
    std::fs::write(previous_file(agent), lease.subnet.to_string())?;
    let overhead = if cfg.backend.kind == BackendType::Vxlan {
        50
    } else {
        0
    };
    let pod_mtu = agent.mtu.unwrap_or(underlay.mtu.saturating_sub(overhead));
    let local = LocalNode {
        name: agent.node_name.clone(),
        subnet: lease.subnet,
        public_ip,
        underlay: underlay_net,
        underlay_dev: underlay.dev.clone(),
        underlay_mtu: underlay.mtu,
    };
    let mut record = record;
    record.subnet = lease.subnet;
    Ok(Joined {
        cfg,
        lease,
        local,
        record,
        pod_mtu,
    })
}

/// Starts keeping this node's lease alive; returns the key prefix.
pub(crate) fn hold_lease<D: Datastore + Clone>(
    store: &D,
    agent: &AgentConfig,
    joined: &Joined,
) -> String {
    let prefix = agent
        .etcd
        .as_ref()
        .map(|e| e.prefix.clone())
        .unwrap_or_default();
    let ttl = Duration::from_secs(agent.lease_ttl_seconds);
    tokio::spawn(keep_lease(
        store.clone(),
        prefix.clone(),
        joined.clone(),
        ttl,
    ));
    prefix
}

/// Keeps the lease alive and the routes in line; runs until the process ends.
pub async fn run<D: Datastore + Clone>(
    store: D,
    agent: AgentConfig,
    joined: Joined,
    dp: Arc<dyn Dataplane>,
    view: Arc<Mutex<ClusterView>>,
) {
    let prefix = hold_lease(&store, &agent, &joined);
    let mut rec = RouteReconciler::new(dp.clone(), joined.local.clone(), joined.cfg.network);
    let resync_every = Duration::from_secs(agent.resync_seconds);
    let vxlan_port =
        (joined.cfg.backend.kind == BackendType::Vxlan).then_some(joined.cfg.backend.port);
    let masquerade = masq::ruleset(joined.cfg.network, vxlan_port);
    loop {
        // list, repair against the kernel, then follow the watch
        let listing = match store.list(&format!("{prefix}subnets/")).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("cluster: {e}; datapath left as it is, retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut nodes = records(
            &prefix,
            listing
                .items
                .iter()
                .map(|kv| (kv.key.as_str(), kv.value.as_slice())),
        );
        resync(&mut rec, &joined, &nodes, &view, &dp, &masquerade);
        let mut rx = match store
            .watch(&format!("{prefix}subnets/"), listing.revision)
            .await
        {
            Ok(rx) => rx,
            Err(e) => {
                tracing::warn!("cluster: watch: {e}");
                continue;
            }
        };
        let mut tick = tokio::time::interval(resync_every);
        tick.tick().await;
        loop {
            tokio::select! {
                item = rx.recv() => {
                    let Some(item) = item else { break };
                    match item {
                        WatchItem::Events(events) => {
                            for ev in events {
                                match ev {
                                    Event::Put(kv) => {
                                        if let Some((name, r)) = record(&prefix, &kv.key, &kv.value) {
                                            nodes.retain(|_, v| v.subnet != r.subnet);
                                            nodes.insert(name, r);
                                        }
                                    }
                                    Event::Delete { key, .. } => {
                                        if let Some(net) = parse_subnet_key(&prefix, &key) {
                                            nodes.retain(|_, v| v.subnet != net);
                                        }
                                    }
                                }
                            }
                            let want = desired(&joined.cfg.backend, &joined.local, &nodes.values().cloned().collect::<Vec<_>>());
                            set_view(&view, &nodes, &want.problems);
                            let errors = tokio::task::block_in_place(|| rec.apply(want));
                            for e in errors {
                                tracing::warn!("routing: {e}");
                            }
                        }
                        WatchItem::Resync(l) => {
                            nodes = records(&prefix, l.items.iter().map(|kv| (kv.key.as_str(), kv.value.as_slice())));
                            resync(&mut rec, &joined, &nodes, &view, &dp, &masquerade);
                        }
                    }
                }
                _ = tick.tick() => resync(&mut rec, &joined, &nodes, &view, &dp, &masquerade),
            }
        }
    }
}

pub(crate) fn record(prefix: &str, key: &str, value: &[u8]) -> Option<(String, NodeRecord)> {
    parse_subnet_key(prefix, key)?;
    match serde_json::from_slice::<NodeRecord>(value) {
        Ok(r) => Some((r.node.clone(), r)),
        Err(e) => {
            tracing::warn!("cluster: {key}: unreadable node record: {e}");
            None
        }
    }
}

pub(crate) fn records<'a>(
    prefix: &str,
    kvs: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> BTreeMap<String, NodeRecord> {
    kvs.filter_map(|(k, v)| record(prefix, k, v)).collect()
}

pub(crate) fn set_view(
    view: &Arc<Mutex<ClusterView>>,
    nodes: &BTreeMap<String, NodeRecord>,
    problems: &[String],
) {
    let mut v = view.lock().unwrap_or_else(|p| p.into_inner());
    v.nodes = nodes.clone();
    v.problems = problems.to_vec();
}

fn resync(
    rec: &mut RouteReconciler,
    joined: &Joined,
    nodes: &BTreeMap<String, NodeRecord>,
    view: &Arc<Mutex<ClusterView>>,
    dp: &Arc<dyn Dataplane>,
    masquerade: &str,
) {
    let want = desired(
        &joined.cfg.backend,
        &joined.local,
        &nodes.values().cloned().collect::<Vec<_>>(),
    );
    set_view(view, nodes, &want.problems);
    for p in &want.problems {
        tracing::warn!("routing: {p}");
    }
    resync_kernel(rec, want, dp, masquerade);
}

/// Repairs the kernel against `want` (pruning only what trellis owns) and
/// reapplies the masquerade table; logs what failed.
pub(crate) fn resync_kernel(
    rec: &mut RouteReconciler,
    want: trellis_routing::Desired,
    dp: &Arc<dyn Dataplane>,
    masquerade: &str,
) {
    let errors = tokio::task::block_in_place(|| {
        let mut errors = rec.resync(want);
        if let Err(e) = dp.nft_apply(masquerade) {
            errors.push(e);
        }
        errors
    });
    for e in errors {
        tracing::warn!("resync: {e}");
    }
}

/// Refreshes the lease every third of its TTL; if it was lost (etcd down
/// longer than the TTL), claims the same subnet again.
pub(crate) async fn keep_lease<D: Datastore>(
    store: D,
    prefix: String,
    mut joined: Joined,
    ttl: Duration,
) {
    loop {
        tokio::time::sleep(ttl / 3).await;
        match store.keep_alive(joined.lease.lease).await {
            Ok(()) => {}
            Err(StoreError::LeaseGone(_)) => {
                tracing::warn!(
                    "lease of {} expired; claiming it again",
                    joined.lease.subnet
                );
                match claim(
                    &store,
                    &prefix,
                    &joined.cfg,
                    &joined.record,
                    Some(joined.lease.subnet),
                    ttl,
                )
                .await
                {
                    Ok(l) if l.subnet == joined.lease.subnet => joined.lease = l,
                    Ok(l) => {
                        tracing::error!("subnet {} was taken meanwhile; got {} (pods keep their old addresses until restarted)", joined.lease.subnet, l.subnet);
                        joined.lease = l;
                    }
                    Err(e) => tracing::warn!("re-claim: {e}"),
                }
            }
            Err(e) => tracing::warn!("lease keep-alive: {e}"),
        }
    }
}
