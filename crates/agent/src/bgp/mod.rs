//! The bgp backend (Backend.Type "bgp"): the node runs a BGP speaker,
//! announces its leased subnet with itself as next hop and installs the
//! routes its peers give it — no encapsulation. Peers and roles come from
//! the datastore (node records and `bgp/` resources) and the command line;
//! a change touches only the sessions it changes. After an agent restart
//! the kernel routes stay until every peer has sent its routes again
//! (End-of-RIB) or the restart time passes, then stale ones are pruned.
//! When the `BGPConfiguration` lists Service ranges, they go to external
//! peers from every node, and the addresses of `externalTrafficPolicy:
//! Local` Services inside them as /32 from the nodes with a ready
//! endpoint (from the proxy), as Calico does.

pub mod plan;

use crate::cluster::{apply_routes, resync_kernel, set_view, Joined, NodeTable, Shared};
use crate::config::AgentConfig;
use crate::driver::{drive, Controller, LoopSettings};
use crate::masq;
use crate::routes::RouteReconciler;
use ipnet::{IpNet, Ipv4Net};
use plan::{learned_routes, plan, BgpPlan, SpeakerSettings};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use trellis_bgp::{RouteEvent, Speaker, SpeakerConfig};
use trellis_model::bgp::{bgp_prefix, BgpResources, NodeBgp};
use trellis_model::status::{BgpPeer, BgpStatus};
use trellis_store::{Event, KeyValue, Source};

/// Route-event batches queued between the speaker and the controller.
const EVENT_QUEUE: usize = 64;

/// The speaker did not take a Service prefix command: again later.
fn service_retry(dirty: &mut bool) {
    *dirty = true;
    tracing::warn!("bgp: the speaker did not take the Service prefixes; retrying");
}

/// What reaches the controller besides the datastore.
enum Input {
    /// Best-path changes of speaker generation `.0`.
    Routes(u64, Vec<RouteEvent>),
    /// The proxy's Service addresses changed.
    Services,
}

struct Running {
    speaker: Speaker,
    settings: SpeakerSettings,
    gen: u64,
}

/// The bgp backend as a controller: node records and `bgp/` resources in,
/// a running speaker, kernel routes for its best paths and the nftables
/// table out.
struct BgpController {
    joined: Joined,
    prefix: String,
    cli: NodeBgp,
    nodes: NodeTable,
    kvs: BTreeMap<String, Vec<u8>>,
    res: BgpResources,
    running: Option<Running>,
    next_gen: u64,
    plan: Option<BgpPlan>,
    learned: BTreeMap<Ipv4Net, Ipv4Addr>,
    events: mpsc::Sender<Input>,
    /// Service prefixes the speaker may originate now (those a failed
    /// command left uncertain included)
    service_prefixes: BTreeSet<IpNet>,
    /// they may differ from what is wanted (a failed command, a new
    /// speaker): compare again at housekeeping
    service_dirty: bool,
    /// the ranges whose overlaps were last logged
    warned_ranges: Vec<IpNet>,
    rec: RouteReconciler,
    ruleset: String,
    shared: Shared,
    /// Restarted with routes in the kernel: do not prune until synced.
    restarting: bool,
    synced: bool,
    sync_deadline: Instant,
    end_of_rib: HashSet<IpAddr>,
}

impl BgpController {
    fn apply_kv(&mut self, key: &str, value: Option<&[u8]>) {
        if key.starts_with(&bgp_prefix(&self.prefix)) {
            match value {
                Some(v) => self.kvs.insert(key.to_string(), v.to_vec()),
                None => self.kvs.remove(key),
            };
            let (res, errors) = BgpResources::from_kvs(
                &self.prefix,
                self.kvs.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
            );
            for e in errors {
                tracing::warn!(error = %e, "bgp resources");
            }
            self.res = res;
            return;
        }
        self.nodes.apply(key, value);
    }

    /// Brings the speaker in line with the datastore.
    async fn replan(&mut self) {
        let mut nodes = self.nodes.nodes.clone();
        nodes
            .entry(self.joined.local.name.clone())
            .or_insert_with(|| self.joined.record.clone());
        let p = plan(
            &self.joined.local,
            self.joined.cfg.network,
            &nodes,
            &self.res,
            &self.cli,
        );
        if self.plan.as_ref() == Some(&p) {
            return;
        }
        let restart = self
            .running
            .as_ref()
            .is_none_or(|r| r.settings != p.speaker);
        if restart {
            if let Some(old) = self.running.take() {
                tracing::info!("bgp: speaker settings changed; restarting the speaker");
                old.speaker.shutdown().await;
            }
            match self.start(&p).await {
                Ok(r) => self.running = Some(r),
                Err(e) => {
                    tracing::error!(error = %e, "bgp: cannot start the speaker; trying again");
                    self.plan = None;
                    return;
                }
            }
        }
        if let Some(r) = &self.running {
            let taken = r.speaker.set_peers(p.peers.clone()).await
                && r.speaker.set_policy(p.policy.clone()).await;
            if !taken {
                // tried again at the next housekeeping tick
                tracing::warn!("bgp: the speaker did not take the new peers or policy; retrying");
                self.plan = None;
                return;
            }
        }
        self.plan = Some(p);
    }

    /// The Service prefixes to originate: the configured ranges (not
    /// overlapping the cluster network), and inside them the proxy's
    /// local-endpoint addresses as /32.
    fn wanted_service_prefixes(&self) -> BTreeSet<IpNet> {
        let ranges: Vec<_> = self
            .res
            .config
            .service_ranges()
            .into_iter()
            .filter(|(r, _)| !self.overlaps_cluster(r))
            .collect();
        let mut want: BTreeSet<IpNet> = ranges.iter().map(|(r, _)| *r).collect();
        let addrs = self.shared.service_addrs.borrow().clone();
        for (ip, kind) in addrs.iter() {
            if ranges.iter().any(|(r, k)| k == kind && r.contains(ip)) {
                want.insert(IpNet::from(*ip));
            }
        }
        want
    }

    /// Brings the speaker's Service prefixes in line. Stops at the first
    /// command the speaker does not take (housekeeping tries again; what
    /// it left uncertain counts as announced, so it is withdrawn later).
    async fn advertise_services(&mut self) {
        if self.running.is_none() {
            return;
        }
        self.warn_overlapping_ranges();
        let want = self.wanted_service_prefixes();
        let Some(r) = &self.running else { return };
        if want == self.service_prefixes {
            self.service_dirty = false;
            return;
        }
        let add: Vec<IpNet> = want.difference(&self.service_prefixes).copied().collect();
        let gone: Vec<IpNet> = self.service_prefixes.difference(&want).copied().collect();
        for p in add {
            // counted before the command: a timeout may still have taken it
            self.service_prefixes.insert(p);
            if !r.speaker.announce_external(p).await {
                return service_retry(&mut self.service_dirty);
            }
        }
        for p in gone {
            // never the node's own subnet (ranges overlapping the cluster
            // network are left out above)
            if !r.speaker.withdraw(p).await {
                return service_retry(&mut self.service_dirty);
            }
            self.service_prefixes.remove(&p);
        }
        self.service_dirty = false;
        tracing::debug!(prefixes = want.len(), "bgp: Service prefixes advertised");
    }

    async fn start(&mut self, p: &BgpPlan) -> std::io::Result<Running> {
        let cfg = SpeakerConfig {
            asn: p.speaker.asn,
            router_id: self.joined.local.public_ip,
            listen: Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                plan::BGP_PORT,
            )),
            cluster_id: p.speaker.cluster_id,
            hold_time: p.speaker.hold_time,
            connect_retry: Duration::from_secs(2),
            restart_time: p.speaker.restart_time,
            restarting: self.restarting && !self.synced,
            policy: p.policy.clone(),
        };
        // the old listener may need a moment to let go of the port
        let mut tries = 0;
        let (speaker, mut rx) = loop {
            match Speaker::start(cfg.clone()).await {
                Ok(x) => break x,
                Err(e) if tries < 5 => {
                    tries += 1;
                    tracing::debug!(error = %e, "bgp: listen; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        };
        if !speaker.announce(IpNet::V4(self.joined.subnet)).await {
            speaker.shutdown().await;
            return Err(std::io::Error::other(
                "the new speaker did not take this node's subnet",
            ));
        }
        let gen = self.next_gen;
        self.next_gen += 1;
        let tx = self.events.clone();
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                if tx.send(Input::Routes(gen, ev)).await.is_err() {
                    return;
                }
            }
        });
        // a new speaker learns everything again
        self.learned.clear();
        self.service_prefixes.clear();
        self.service_dirty = true;
        tracing::info!(
            asn = p.speaker.asn,
            router_id = %self.joined.local.public_ip,
            cluster_id = ?p.speaker.cluster_id,
            "bgp: speaker up"
        );
        Ok(Running {
            speaker,
            settings: p.speaker.clone(),
            gen,
        })
    }

    fn route_event(&mut self, gen: u64, ev: RouteEvent) {
        if self.running.as_ref().map(|r| r.gen) != Some(gen) {
            return;
        }
        match ev {
            RouteEvent::Best {
                prefix: IpNet::V4(p),
                next_hop: IpAddr::V4(nh),
                ..
            } => {
                self.learned.insert(p, nh);
            }
            RouteEvent::Best { .. } => {}
            RouteEvent::Gone {
                prefix: IpNet::V4(p),
            } => {
                self.learned.remove(&p);
            }
            RouteEvent::Gone { .. } => {}
            RouteEvent::EndOfRib { peer } => {
                self.end_of_rib.insert(peer);
            }
        }
    }

    /// Whether Service range `r` overlaps the cluster network (never
    /// advertised: the node subnets are inside it).
    fn overlaps_cluster(&self, r: &IpNet) -> bool {
        let cluster = IpNet::V4(self.joined.cfg.network);
        r.contains(&cluster) || cluster.contains(r)
    }

    /// Logs configured ranges that overlap the cluster network, once per
    /// configuration.
    fn warn_overlapping_ranges(&mut self) {
        let ranges: Vec<IpNet> = self
            .res
            .config
            .service_ranges()
            .into_iter()
            .map(|(r, _)| r)
            .collect();
        if ranges == self.warned_ranges {
            return;
        }
        for r in ranges.iter().filter(|r| self.overlaps_cluster(r)) {
            tracing::warn!(range = %r, cluster = %self.joined.cfg.network,
                "bgp: a Service range overlapping the cluster network is not advertised");
        }
        self.warned_ranges = ranges;
    }

    fn check_synced(&mut self) -> bool {
        if self.synced {
            return false;
        }
        let all = self
            .plan
            .as_ref()
            .is_some_and(|p| p.peers.iter().all(|x| self.end_of_rib.contains(&x.addr)));
        if all || Instant::now() >= self.sync_deadline {
            tracing::info!(
                why = if all {
                    "End-of-RIB from every peer"
                } else {
                    "restart time over"
                },
                "bgp: routes relearned; pruning what is stale"
            );
            self.synced = true;
            return true;
        }
        false
    }

    fn publish_problems(&self) {
        set_view(
            &self.shared.view,
            &self.nodes.nodes,
            &learned_routes(&self.joined.local, &self.learned).problems,
        );
    }

    /// Full repair once synced; before that (an agent restart with routes
    /// in the kernel) only the nftables table, so nothing is pruned early.
    fn resync(&mut self) {
        if self.synced {
            let want = learned_routes(&self.joined.local, &self.learned);
            resync_kernel(&mut self.rec, want, &self.shared, &self.ruleset);
        } else {
            let r = tokio::task::block_in_place(|| self.shared.dp.nft_apply(&self.ruleset));
            self.shared
                .metrics
                .reconciled("nftables", usize::from(r.is_err()));
            if let Err(e) = r {
                tracing::warn!(error = %e, "resync");
            }
        }
    }

    async fn publish(&self) {
        let Some(r) = &self.running else { return };
        let peers: Vec<BgpPeer> = r.speaker.status().await;
        self.shared.metrics.bgp(&peers);
        // nodes and problems are set where they change (set_view)
        let mut v = self.shared.view.lock().unwrap_or_else(|p| p.into_inner());
        v.bgp = Some(BgpStatus {
            asn: r.settings.asn,
            router_id: self.joined.local.public_ip.to_string(),
            route_reflector_cluster_id: r.settings.cluster_id.map(|c| c.to_string()),
            peers,
        });
    }
}

impl Controller for BgpController {
    type Input = Input;

    async fn on_listing(&mut self, items: Vec<KeyValue>) {
        self.nodes.replace(&items);
        self.kvs.clear();
        self.res = BgpResources::default();
        for kv in &items {
            if kv.key.starts_with(&bgp_prefix(&self.prefix)) {
                self.apply_kv(&kv.key, Some(&kv.value));
            }
        }
        self.replan().await;
        self.advertise_services().await;
        self.publish_problems();
        self.resync();
    }

    async fn on_events(&mut self, events: Vec<Event>) {
        for ev in events {
            match ev {
                Event::Put(kv) => self.apply_kv(&kv.key, Some(&kv.value)),
                Event::Delete { key, .. } => self.apply_kv(&key, None),
            }
        }
        self.replan().await;
        // the Service ranges are not part of the plan: a change of only
        // them is applied here
        self.advertise_services().await;
        self.publish_problems();
    }

    async fn on_inputs(&mut self, batches: Vec<Input>) {
        let mut services = false;
        for b in batches {
            match b {
                Input::Routes(gen, evs) => evs.into_iter().for_each(|ev| self.route_event(gen, ev)),
                Input::Services => services = true,
            }
        }
        if services {
            self.advertise_services().await;
        }
        let want = learned_routes(&self.joined.local, &self.learned);
        set_view(&self.shared.view, &self.nodes.nodes, &want.problems);
        apply_routes(&mut self.rec, want, &self.shared);
    }

    async fn on_resync(&mut self) {
        self.resync();
    }

    async fn on_housekeeping(&mut self) {
        if self.running.is_none() || self.plan.is_none() {
            // the speaker could not start (port taken?) or did not take
            // its peers: again
            self.replan().await;
        }
        if self.service_dirty {
            self.advertise_services().await;
        }
        if self.check_synced() {
            self.resync();
        }
        self.publish().await;
    }
}

/// Keeps the BGP speaker and routes in line with `source` (keys under
/// `prefix`); runs until the process ends.
pub async fn run<S: Source>(
    source: S,
    prefix: String,
    agent: AgentConfig,
    joined: Joined,
    shared: Shared,
) {
    let cluster = joined.cfg.network;
    let restarting = tokio::task::block_in_place(|| shared.dp.routes_owned())
        .map(|rs| {
            rs.iter()
                .any(|r| matches!(r.dst, IpNet::V4(d) if cluster.contains(&d)))
        })
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "bgp: cannot read the kernel's routes; assuming a fresh start");
            false
        });
    if restarting {
        tracing::info!("bgp: routes from a previous run are in the kernel; keeping them until the peers have sent theirs again");
    }
    let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
    let restart_wait = Duration::from_secs(120);
    let mut ctl = BgpController {
        prefix: prefix.clone(),
        cli: agent.bgp.clone().unwrap_or_default(),
        nodes: NodeTable::new(&prefix),
        kvs: BTreeMap::new(),
        res: BgpResources::default(),
        running: None,
        next_gen: 1,
        plan: None,
        learned: BTreeMap::new(),
        events: ev_tx.clone(),
        service_prefixes: BTreeSet::new(),
        service_dirty: true,
        warned_ranges: Vec::new(),
        rec: RouteReconciler::new(shared.dp.clone(), joined.local.clone(), cluster),
        ruleset: masq::ruleset(&joined.cfg, masq::pods_tracked(&agent)),
        shared: shared.clone(),
        restarting,
        synced: !restarting,
        sync_deadline: Instant::now() + restart_wait,
        end_of_rib: HashSet::new(),
        joined,
    };
    // the proxy's changes wake the loop (a watch coalesces bursts)
    let mut addrs = shared.service_addrs.clone();
    tokio::spawn(async move {
        while addrs.changed().await.is_ok() {
            if ev_tx.send(Input::Services).await.is_err() {
                return;
            }
        }
    });
    let settings = LoopSettings {
        name: "bgp",
        prefix,
        resync_every: Duration::from_secs(agent.resync_seconds),
        housekeeping_every: Some(Duration::from_millis(250)),
        health: shared.health,
        metrics: shared.metrics,
        marks_synced: true,
    };
    drive(&source, settings, &mut ctl, Some(ev_rx)).await;
}
