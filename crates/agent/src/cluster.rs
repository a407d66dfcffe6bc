//! The agent's cluster side, shared by every backend: join (read the
//! cluster config, lease a subnet), keep the lease (claiming exactly the
//! same subnet again after an expiry, or stopping the agent when another
//! node took it), and the helpers the backends' controllers use to
//! publish their view and reconcile the kernel. The loops themselves are
//! [`crate::driver`]'s; the controllers are [`crate::flannel`] and
//! [`crate::bgp`].

use crate::config::AgentConfig;
use crate::health::Health;
use crate::lease::{claim, reclaim_same, Reclaim, SubnetLease};
use crate::metrics::Metrics;
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
use trellis_model::status::BgpStatus;
use trellis_routing::LocalNode;
use trellis_store::{Datastore, EtcdOptions, EtcdStore, KeyValue, StoreError, TlsFiles};

/// What joining the cluster gave this node.
#[derive(Debug, Clone)]
pub struct Joined {
    /// The cluster network config.
    pub cfg: ClusterConfig,
    /// The node's pod subnet (leased, or the Node's podCIDR).
    pub subnet: Ipv4Net,
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
    pub bgp: Option<BgpStatus>,
}

/// What every controller of the cluster side shares.
#[derive(Clone)]
pub struct Shared {
    /// Kernel access.
    pub dp: Arc<dyn Dataplane>,
    /// What status shows.
    pub view: Arc<Mutex<ClusterView>>,
    /// Readiness and the way out.
    pub health: Arc<Health>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Addresses of this node's Services to advertise as /32 (from the
    /// proxy; never changes when it does not run).
    pub service_addrs: crate::proxy::LocalAddrs,
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
) -> anyhow::Result<(Joined, SubnetLease)> {
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
    check_backend(&cfg, dp).with_context(|| key.clone())?;
    let public_ip = agent
        .public_ip
        .ok_or_else(|| anyhow!("publicIp is not set"))?;
    let mut joined = local_node(agent, cfg, Ipv4Net::default(), public_ip, dp)?;
    let previous: Option<Ipv4Net> = std::fs::read_to_string(previous_file(agent))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let ttl = Duration::from_secs(agent.lease_ttl_seconds);
    let lease = claim(store, prefix, &joined.cfg, &joined.record, previous, ttl).await?;
    std::fs::create_dir_all(&agent.data_dir)?;
    std::fs::write(previous_file(agent), lease.subnet.to_string())?;
    joined.subnet = lease.subnet;
    joined.local.subnet = lease.subnet;
    joined.record.subnet = lease.subnet;
    Ok((joined, lease))
}

/// Refuses backends this kernel or this version cannot run.
pub fn check_backend(cfg: &ClusterConfig, dp: &dyn Dataplane) -> anyhow::Result<()> {
    match cfg.backend.kind {
        BackendType::Vxlan | BackendType::HostGw | BackendType::Bgp => Ok(()),
        BackendType::Ipip => {
            let supported = dp
                .link_kind_supported(trellis_dataplane::LinkKind::Ipip)
                .context("probing for the kernel's ipip support")?;
            if !supported {
                bail!(
                    "Backend.Type \"ipip\" needs IP-in-IP tunnels, and this kernel has no ipip \
                     driver (module ipip, CONFIG_NET_IPIP): creating an ipip link fails with \
                     \"unknown device type\". Use \"bgp\" (no encapsulation) or \"vxlan\" instead"
                );
            }
            bail!(
                "Backend.Type \"ipip\": the kernel has ipip, but this version of trellis \
                 does not program IPIP tunnels yet; use \"bgp\" or \"vxlan\""
            )
        }
    }
}

/// This node as the backends see it, with pod subnet `subnet`: its
/// underlay (the interface holding `public_ip`), its record, the pod MTU.
pub fn local_node(
    agent: &AgentConfig,
    cfg: ClusterConfig,
    subnet: Ipv4Net,
    public_ip: std::net::Ipv4Addr,
    dp: &dyn Dataplane,
) -> anyhow::Result<Joined> {
    let underlay = dp.underlay(IpAddr::V4(public_ip))?.ok_or_else(|| {
        anyhow!("publicIp {public_ip} is not an address of any interface of this node")
    })?;
    let ipnet::IpNet::V4(underlay_net) = underlay.net else {
        bail!("publicIp {public_ip}: underlay must be IPv4");
    };
    let record = NodeRecord {
        node: agent.node_name.clone(),
        subnet,
        public_ip: IpAddr::V4(public_ip),
        backend_type: cfg.backend.kind.as_str().into(),
        vtep_mac: (cfg.backend.kind == BackendType::Vxlan)
            .then(|| trellis_dataplane::mac_string(&vtep_mac(public_ip))),
        bgp: agent.bgp.clone(),
    };
    let overhead = if cfg.backend.kind == BackendType::Vxlan {
        50
    } else {
        0
    };
    let pod_mtu = agent.mtu.unwrap_or(underlay.mtu.saturating_sub(overhead));
    let local = LocalNode {
        name: agent.node_name.clone(),
        subnet,
        public_ip,
        underlay: underlay_net,
        underlay_dev: underlay.dev.clone(),
        underlay_mtu: underlay.mtu,
    };
    Ok(Joined {
        cfg,
        subnet,
        local,
        record,
        pod_mtu,
    })
}

/// Starts keeping this node's lease alive.
pub fn hold_lease<D: Datastore + Clone>(
    store: &D,
    agent: &AgentConfig,
    joined: &Joined,
    lease: SubnetLease,
    shared: &Shared,
) {
    let prefix = agent
        .etcd
        .as_ref()
        .map(|e| e.prefix.clone())
        .unwrap_or_default();
    let keeper = LeaseKeeper {
        prefix,
        joined: joined.clone(),
        lease,
        ttl: Duration::from_secs(agent.lease_ttl_seconds),
        subnet_file: previous_file(agent),
        health: shared.health.clone(),
        metrics: shared.metrics.clone(),
    };
    tokio::spawn(keeper.run(store.clone()));
}

/// Keeps the subnet lease alive.
struct LeaseKeeper {
    prefix: String,
    joined: Joined,
    lease: SubnetLease,
    ttl: Duration,
    subnet_file: PathBuf,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

impl LeaseKeeper {
    /// Refreshes the lease every third of its TTL. When it expired (the
    /// agent or etcd stalled longer than the TTL), claims exactly the same
    /// subnet again; when another node holds it now, the node cannot go on
    /// with the addresses it has: it claims another subnet for its next
    /// start, refuses CNI ADDs and stops with an error naming both.
    async fn run<D: Datastore>(mut self, store: D) {
        let mut wait = self.ttl / 3;
        loop {
            tokio::time::sleep(wait).await;
            // after a failure, try again soon: one slow answer must not
            // let the lease run out
            wait = (self.ttl / 10).max(std::time::Duration::from_millis(200));
            match store.keep_alive(self.lease.lease).await {
                Ok(()) => {
                    self.metrics.lease_renewal("ok");
                    wait = self.ttl / 3;
                }
                Err(StoreError::LeaseGone(_)) => {
                    if self.expired(&store).await {
                        return;
                    }
                }
                Err(e) => {
                    self.metrics.lease_renewal("failed");
                    tracing::warn!(subnet = %self.lease.subnet, error = %e, "lease keep-alive failed");
                }
            }
        }
    }

    /// Handles an expired lease; true when the agent must stop.
    async fn expired<D: Datastore>(&mut self, store: &D) -> bool {
        let subnet = self.lease.subnet;
        tracing::warn!(%subnet, "subnet lease expired; claiming the same subnet again");
        match reclaim_same(store, &self.prefix, &self.joined.record, subnet, self.ttl).await {
            Ok(Reclaim::Same(l)) => {
                self.metrics.lease_renewal("reclaimed");
                tracing::info!(%subnet, "subnet claimed again");
                self.lease = l;
                false
            }
            Ok(Reclaim::TakenBy(holder)) => {
                self.metrics.lease_renewal("lost");
                // no pod may get an address of a subnet another node holds,
                // not even while the next subnet is claimed
                self.health.refuse(format!(
                    "subnet {subnet} was lost: node {holder} holds it now"
                ));
                let next = claim(
                    store,
                    &self.prefix,
                    &self.joined.cfg,
                    &self.joined.record,
                    None,
                    self.ttl,
                )
                .await;
                let instead = match next {
                    Ok(l) => {
                        if let Err(e) = std::fs::write(&self.subnet_file, l.subnet.to_string()) {
                            tracing::warn!(file = %self.subnet_file.display(), error = %e, "cannot remember the new subnet");
                        }
                        format!("claimed {} for the next start", l.subnet)
                    }
                    Err(e) => format!("no other subnet could be claimed: {e}"),
                };
                self.health.fatal(format!(
                    "subnet {subnet} was lost: its lease expired and node {holder} holds it now; \
                     {instead}. Pods on this node have addresses of {subnet}: the agent stops \
                     (restart it, then restart the pods)"
                ));
                true
            }
            Err(e) => {
                self.metrics.lease_renewal("failed");
                tracing::warn!(%subnet, error = %e, "claiming the subnet again failed; retrying");
                false
            }
        }
    }
}

/// The other nodes' records under `subnets/`, as both backends keep them.
#[derive(Debug, Clone, Default)]
pub(crate) struct NodeTable {
    prefix: String,
    /// Records by node name.
    pub nodes: BTreeMap<String, NodeRecord>,
}

impl NodeTable {
    /// An empty table for keys under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
            nodes: BTreeMap::new(),
        }
    }

    /// Replaces the table with the records of a listing.
    pub fn replace(&mut self, items: &[KeyValue]) {
        self.nodes.clear();
        for kv in items {
            self.apply(&kv.key, Some(&kv.value));
        }
    }

    /// One change (`None`: deleted). A subnet has one holder: a record
    /// for it replaces whoever held it. Unreadable records are logged and
    /// skipped; keys that are not subnet claims are ignored.
    pub fn apply(&mut self, key: &str, value: Option<&[u8]>) {
        let Some(net) = parse_subnet_key(&self.prefix, key) else {
            return;
        };
        self.nodes.retain(|_, v| v.subnet != net);
        let Some(value) = value else { return };
        match serde_json::from_slice::<NodeRecord>(value) {
            Ok(r) => {
                self.nodes.insert(r.node.clone(), r);
            }
            Err(e) => tracing::warn!(%key, error = %e, "unreadable node record"),
        }
    }
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

/// Repairs the kernel against `want` (pruning only what trellis owns) and
/// reapplies the nftables table; logs and counts what failed.
pub(crate) fn resync_kernel(
    rec: &mut RouteReconciler,
    want: trellis_routing::Desired,
    shared: &Shared,
    ruleset: &str,
) {
    let (routes, nft) =
        tokio::task::block_in_place(|| (rec.resync(want), shared.dp.nft_apply(ruleset)));
    shared.metrics.reconciled("routes", routes.len());
    shared
        .metrics
        .reconciled("nftables", usize::from(nft.is_err()));
    for e in routes.iter().chain(nft.as_ref().err()) {
        tracing::warn!(error = %e, "resync");
    }
}

/// Applies `want` as a diff against what was applied last; logs and
/// counts what failed.
pub(crate) fn apply_routes(
    rec: &mut RouteReconciler,
    want: trellis_routing::Desired,
    shared: &Shared,
) {
    let errors = tokio::task::block_in_place(|| rec.apply(want));
    shared.metrics.reconciled("routes", errors.len());
    for e in errors {
        tracing::warn!(error = %e, "routing");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            create_revision: 1,
            mod_revision: 1,
            lease: 0,
        }
    }

    fn rec(node: &str, subnet: &str) -> String {
        format!(
            r#"{{"node":"{node}","subnet":"{subnet}","publicIp":"192.0.2.1","backendType":"host-gw"}}"#
        )
    }

    #[test]
    fn one_holder_per_subnet_and_bad_records_skipped() {
        let p = "/trellis/v1/";
        let mut t = NodeTable::new(p);
        t.replace(&[
            kv(
                "/trellis/v1/subnets/10.244.1.0-24",
                &rec("n1", "10.244.1.0/24"),
            ),
            kv("/trellis/v1/subnets/10.244.2.0-24", "not json"),
            kv("/trellis/v1/bgp/peers/x", "{}"),
        ]);
        assert_eq!(t.nodes.keys().collect::<Vec<_>>(), ["n1"]);
        // the subnet changes hands: the old holder goes
        t.apply(
            "/trellis/v1/subnets/10.244.1.0-24",
            Some(rec("n9", "10.244.1.0/24").as_bytes()),
        );
        assert_eq!(t.nodes.keys().collect::<Vec<_>>(), ["n9"]);
        t.apply("/trellis/v1/subnets/10.244.1.0-24", None);
        assert!(t.nodes.is_empty());
    }
}
