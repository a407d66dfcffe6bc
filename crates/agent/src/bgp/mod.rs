//! The bgp backend (Backend.Type "bgp"): the node runs a BGP speaker,
//! announces its leased subnet with itself as next hop and installs the
//! routes its peers give it — no encapsulation. Peers and roles come from
//! the datastore (node records and `bgp/` resources) and the command line;
//! a change touches only the sessions it changes. After an agent restart
//! the kernel routes stay until every peer has sent its routes again
//! (End-of-RIB) or the restart time passes, then stale ones are pruned.

pub mod plan;

use crate::cluster::{hold_lease, records, resync_kernel, set_view, BgpView, ClusterView, Joined};
use crate::config::AgentConfig;
use crate::masq;
use crate::routes::RouteReconciler;
use ipnet::{IpNet, Ipv4Net};
use plan::{desired, plan, Plan, SpeakerSettings};
use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use trellis_bgp::{RouteEvent, Speaker, SpeakerConfig};
use trellis_dataplane::Dataplane;
use trellis_model::bgp::{bgp_prefix, BgpResources, NodeBgp};
use trellis_model::node::NodeRecord;
use trellis_store::{Datastore, Event, WatchItem};

struct Running {
    speaker: Speaker,
    settings: SpeakerSettings,
    gen: u64,
}

struct Backend {
    joined: Joined,
    prefix: String,
    cli: NodeBgp,
    nodes: BTreeMap<String, NodeRecord>,
    kvs: BTreeMap<String, Vec<u8>>,
    res: BgpResources,
    running: Option<Running>,
    next_gen: u64,
    plan: Option<Plan>,
    learned: BTreeMap<Ipv4Net, Ipv4Addr>,
    events: mpsc::UnboundedSender<(u64, Vec<RouteEvent>)>,
    /// Restarted with routes in the kernel: do not prune until synced.
    restarting: bool,
    synced: bool,
    sync_deadline: Instant,
    end_of_rib: HashSet<IpAddr>,
}

impl Backend {
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
                tracing::warn!("bgp resources: {e}");
            }
            self.res = res;
            return;
        }
        match value {
            Some(v) => {
                if let Some((name, r)) = crate::cluster::record(&self.prefix, key, v) {
                    self.nodes.retain(|_, x| x.subnet != r.subnet);
                    self.nodes.insert(name, r);
                }
            }
            None => {
                if let Some(net) = trellis_model::node::parse_subnet_key(&self.prefix, key) {
                    self.nodes.retain(|_, x| x.subnet != net);
                }
            }
        }
    }

    /// Brings the speaker in line with the datastore.
    async fn replan(&mut self) {
        let mut nodes = self.nodes.clone();
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
                    tracing::error!("bgp: cannot start the speaker: {e}");
                    self.plan = None;
                    return;
                }
            }
        }
        if let Some(r) = &self.running {
            r.speaker.set_peers(p.peers.clone());
            r.speaker.set_policy(p.policy.clone());
        }
        self.plan = Some(p);
    }

    async fn start(&mut self, p: &Plan) -> std::io::Result<Running> {
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
                    tracing::debug!("bgp: listen: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        };
        speaker.announce(IpNet::V4(self.joined.lease.subnet));
        let gen = self.next_gen;
        self.next_gen += 1;
        let tx = self.events.clone();
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                if tx.send((gen, ev)).is_err() {
                    return;
                }
            }
        });
        // a new speaker learns everything again
        self.learned.clear();
        tracing::info!(
            "bgp: speaker up: AS {}, router id {}{}",
            p.speaker.asn,
            self.joined.local.public_ip,
            p.speaker
                .cluster_id
                .map(|c| format!(", route reflector (cluster id {c})"))
                .unwrap_or_default()
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
                "bgp: routes relearned ({}); pruning what is stale",
                if all {
                    "End-of-RIB from every peer"
                } else {
                    "restart time over"
                }
            );
            self.synced = true;
            return true;
        }
        false
    }
}

/// Keeps the lease alive and the BGP speaker and routes in line; runs until
/// the process ends.
pub async fn run<D: Datastore + Clone>(
    store: D,
    agent: AgentConfig,
    joined: Joined,
    dp: Arc<dyn Dataplane>,
    view: Arc<Mutex<ClusterView>>,
) {
    let prefix = hold_lease(&store, &agent, &joined);
    let cluster = joined.cfg.network;
    let restarting = tokio::task::block_in_place(|| dp.routes_owned())
        .map(|rs| {
            rs.iter()
                .any(|r| matches!(r.dst, IpNet::V4(d) if cluster.contains(&d)))
        })
        .unwrap_or(false);
    if restarting {
        tracing::info!("bgp: routes from a previous run are in the kernel; keeping them until the peers have sent theirs again");
    }
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let restart_wait = Duration::from_secs(120);
    let mut b = Backend {
        prefix: prefix.clone(),
        cli: agent.bgp.clone().unwrap_or_default(),
        nodes: BTreeMap::new(),
        kvs: BTreeMap::new(),
        res: BgpResources::default(),
        running: None,
        next_gen: 1,
        plan: None,
        learned: BTreeMap::new(),
        events: ev_tx,
        restarting,
        synced: !restarting,
        sync_deadline: Instant::now() + restart_wait,
        end_of_rib: HashSet::new(),
        joined,
    };
    let mut rec = RouteReconciler::new(dp.clone(), b.joined.local.clone(), cluster);
    let masquerade = masq::ruleset(cluster, None);
    let resync_every = Duration::from_secs(agent.resync_seconds);
    loop {
        let listing = match store.list(&prefix).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("bgp: {e}; sessions and routes left as they are, retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        b.nodes = records(
            &prefix,
            listing
                .items
                .iter()
                .map(|kv| (kv.key.as_str(), kv.value.as_slice())),
        );
        b.kvs.clear();
        for kv in &listing.items {
            if kv.key.starts_with(&bgp_prefix(&prefix)) {
                b.apply_kv(&kv.key, Some(&kv.value));
            }
        }
        if b.kvs.is_empty() {
            b.res = BgpResources::default();
        }
        b.replan().await;
        set_view(
            &view,
            &b.nodes,
            &desired(&b.joined.local, &b.learned).problems,
        );
        let mut rx = match store.watch(&prefix, listing.revision).await {
            Ok(rx) => rx,
            Err(e) => {
                tracing::warn!("bgp: watch: {e}");
                continue;
            }
        };
        let mut status_tick = tokio::time::interval(Duration::from_millis(250));
        let mut resync_tick = tokio::time::interval(resync_every);
        resync_tick.tick().await;
        loop {
            tokio::select! {
                item = rx.recv() => {
                    let Some(item) = item else { break };
                    match item {
                        WatchItem::Events(events) => {
                            for ev in events {
                                match ev {
                                    Event::Put(kv) => b.apply_kv(&kv.key, Some(&kv.value)),
                                    Event::Delete { key, .. } => b.apply_kv(&key, None),
                                }
                            }
                            b.replan().await;
                            set_view(&view, &b.nodes, &desired(&b.joined.local, &b.learned).problems);
                        }
                        WatchItem::Resync(_) => break,
                    }
                }
                Some((gen, evs)) = ev_rx.recv() => {
                    evs.into_iter().for_each(|ev| b.route_event(gen, ev));
                    while let Ok((gen, evs)) = ev_rx.try_recv() {
                        evs.into_iter().for_each(|ev| b.route_event(gen, ev));
                    }
                    let want = desired(&b.joined.local, &b.learned);
                    set_view(&view, &b.nodes, &want.problems);
                    let errors = tokio::task::block_in_place(|| rec.apply(want));
                    for e in errors {
                        tracing::warn!("routing: {e}");
                    }
                }
                _ = status_tick.tick() => {
                    if b.running.is_none() {
                        // the speaker could not start (port taken?): again
                        b.replan().await;
                    }
                    if b.check_synced() {
                        resync(&mut rec, &b, &dp, &masquerade);
                    }
                    publish(&view, &b).await;
                }
                _ = resync_tick.tick() => {
                    if b.synced {
                        resync(&mut rec, &b, &dp, &masquerade);
                    } else if let Err(e) = tokio::task::block_in_place(|| dp.nft_apply(&masquerade)) {
                        tracing::warn!("resync: {e}");
                    }
                }
            }
        }
    }
}

fn resync(rec: &mut RouteReconciler, b: &Backend, dp: &Arc<dyn Dataplane>, masquerade: &str) {
    resync_kernel(rec, desired(&b.joined.local, &b.learned), dp, masquerade);
}

async fn publish(view: &Arc<Mutex<ClusterView>>, b: &Backend) {
    let Some(r) = &b.running else { return };
    let peers = r.speaker.status().await;
    // nodes and problems are set where they change (set_view)
    let mut v = view.lock().unwrap_or_else(|p| p.into_inner());
    v.bgp = Some(BgpView {
        asn: r.settings.asn,
        router_id: b.joined.local.public_ip.to_string(),
        route_reflector_cluster_id: r.settings.cluster_id.map(|c| c.to_string()),
        peers,
    });
}
