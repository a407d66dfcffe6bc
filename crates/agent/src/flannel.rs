//! The flannel-style backends (vxlan, host-gw, vxlan with DirectRouting)
//! as a controller of the agent's loop: node records under `subnets/` in,
//! routes / neighbours / FDB entries (`trellis_routing::desired`) and the
//! nftables table out.

use crate::cluster::{apply_routes, hold_lease, records, resync_kernel, set_view, Joined, Shared};
use crate::config::AgentConfig;
use crate::driver::{drive, Controller, LoopSettings};
use crate::masq;
use crate::routes::RouteReconciler;
use std::collections::BTreeMap;
use std::time::Duration;
use trellis_model::node::{parse_subnet_key, NodeRecord};
use trellis_routing::desired;
use trellis_store::{Datastore, Event, KeyValue};

/// Routes to every other node's subnet, kept in line with `subnets/`.
pub struct FlannelController {
    prefix: String,
    joined: Joined,
    nodes: BTreeMap<String, NodeRecord>,
    rec: RouteReconciler,
    ruleset: String,
    shared: Shared,
}

impl FlannelController {
    fn want(&self) -> trellis_routing::Desired {
        let nodes: Vec<NodeRecord> = self.nodes.values().cloned().collect();
        desired(&self.joined.cfg.backend, &self.joined.local, &nodes)
    }

    fn resync(&mut self) {
        let want = self.want();
        set_view(&self.shared.view, &self.nodes, &want.problems);
        for p in &want.problems {
            tracing::warn!(problem = %p, "routing");
        }
        resync_kernel(&mut self.rec, want, &self.shared, &self.ruleset);
    }
}

impl Controller for FlannelController {
    type Input = ();

    async fn on_listing(&mut self, items: Vec<KeyValue>) {
        self.nodes = records(
            &self.prefix,
            items
                .iter()
                .map(|kv| (kv.key.as_str(), kv.value.as_slice())),
        );
        self.resync();
    }

    async fn on_events(&mut self, events: Vec<Event>) {
        for ev in events {
            match ev {
                Event::Put(kv) => {
                    if let Some((name, r)) =
                        crate::cluster::record(&self.prefix, &kv.key, &kv.value)
                    {
                        self.nodes.retain(|_, v| v.subnet != r.subnet);
                        self.nodes.insert(name, r);
                    }
                }
                Event::Delete { key, .. } => {
                    if let Some(net) = parse_subnet_key(&self.prefix, &key) {
                        self.nodes.retain(|_, v| v.subnet != net);
                    }
                }
            }
        }
        let want = self.want();
        set_view(&self.shared.view, &self.nodes, &want.problems);
        apply_routes(&mut self.rec, want, &self.shared);
    }

    async fn on_inputs(&mut self, _: Vec<()>) {}

    async fn on_resync(&mut self) {
        self.resync();
    }
}

/// Keeps the lease alive and the routes in line; runs until the process
/// ends.
pub async fn run<D: Datastore + Clone>(
    store: D,
    agent: AgentConfig,
    joined: Joined,
    shared: Shared,
) {
    let prefix = hold_lease(&store, &agent, &joined, &shared);
    let mut ctl = FlannelController {
        rec: RouteReconciler::new(shared.dp.clone(), joined.local.clone(), joined.cfg.network),
        ruleset: masq::ruleset(&joined.cfg),
        prefix: prefix.clone(),
        nodes: BTreeMap::new(),
        joined,
        shared: shared.clone(),
    };
    let settings = LoopSettings {
        name: "routing",
        prefix: format!("{prefix}subnets/"),
        resync_every: Duration::from_secs(agent.resync_seconds),
        housekeeping_every: None,
        health: shared.health,
        metrics: shared.metrics,
    };
    drive(&store, settings, &mut ctl, None).await;
}
