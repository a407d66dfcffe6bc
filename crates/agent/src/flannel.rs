//! The flannel-style backends (vxlan, host-gw, vxlan with DirectRouting)
//! as a controller of the agent's loop: node records under `subnets/` in,
//! routes / neighbours / FDB entries (`trellis_routing::desired`) and the
//! nftables table out.

use crate::cluster::{apply_routes, resync_kernel, set_view, Joined, NodeTable, Shared};
use crate::config::AgentConfig;
use crate::driver::{drive, Controller, LoopSettings};
use crate::masq;
use crate::routes::RouteReconciler;
use std::time::Duration;
use trellis_model::node::NodeRecord;
use trellis_routing::desired;
use trellis_store::{Event, KeyValue, Source};

/// Routes to every other node's subnet, kept in line with `subnets/`.
pub struct FlannelController {
    joined: Joined,
    nodes: NodeTable,
    rec: RouteReconciler,
    ruleset: String,
    shared: Shared,
}

impl FlannelController {
    fn want(&self) -> trellis_routing::Desired {
        let nodes: Vec<NodeRecord> = self.nodes.nodes.values().cloned().collect();
        desired(&self.joined.cfg.backend, &self.joined.local, &nodes)
    }

    fn resync(&mut self) {
        let want = self.want();
        set_view(&self.shared.view, &self.nodes.nodes, &want.problems);
        for p in &want.problems {
            tracing::warn!(problem = %p, "routing");
        }
        resync_kernel(&mut self.rec, want, &self.shared, &self.ruleset);
    }
}

impl Controller for FlannelController {
    type Input = ();

    async fn on_listing(&mut self, items: Vec<KeyValue>) {
        self.nodes.replace(&items);
        self.resync();
    }

    async fn on_events(&mut self, events: Vec<Event>) {
        for ev in events {
            match ev {
                Event::Put(kv) => self.nodes.apply(&kv.key, Some(&kv.value)),
                Event::Delete { key, .. } => self.nodes.apply(&key, None),
            }
        }
        let want = self.want();
        set_view(&self.shared.view, &self.nodes.nodes, &want.problems);
        apply_routes(&mut self.rec, want, &self.shared);
    }

    async fn on_inputs(&mut self, _: Vec<()>) {}

    async fn on_resync(&mut self) {
        self.resync();
    }
}

/// Keeps the routes in line with `source` (node records under
/// `prefix`); runs until the process ends.
pub async fn run<S: Source>(
    source: S,
    prefix: String,
    agent: AgentConfig,
    joined: Joined,
    shared: Shared,
) {
    let mut ctl = FlannelController {
        rec: RouteReconciler::new(shared.dp.clone(), joined.local.clone(), joined.cfg.network),
        ruleset: masq::ruleset(&joined.cfg, masq::pods_tracked(&agent)),
        nodes: NodeTable::new(&prefix),
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
        marks_synced: true,
    };
    drive(&source, settings, &mut ctl, None).await;
}
