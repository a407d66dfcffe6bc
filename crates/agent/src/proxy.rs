//! The Service proxy (Kubernetes mode): Services and EndpointSlices come
//! from the API server as tables of the [`KubeSource`] (with kube-proxy's
//! label selector), under `/trellis/services/`, in the driver's one loop;
//! `trellis_proxy` renders them; this controller applies one nft
//! transaction per sync — the whole `inet trellis-proxy` table after the
//! first listing, afterwards only what changed — at most one sync per
//! `minSyncIntervalMs` (a lone change goes at once, a burst together).
//! Nothing is programmed before both watches have listed. UDP flows to
//! endpoints that went are deleted from conntrack; the health-check node
//! ports of `externalTrafficPolicy: Local` Services answer over HTTP.

use crate::driver::{drive, Controller, LoopSettings};
use crate::health::Health;
use crate::metrics::Metrics;
use k8s_openapi::api::core::v1::Service as KService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::watcher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trellis_dataplane::Dataplane;
use trellis_kube::source::{Role, Shown};
use trellis_kube::{KubeSource, Reporter};
use trellis_model::status::{ProxyService, ProxyStatus};
use trellis_proxy::{NodeFacts, Proxy, Service, Slice};
use trellis_store::{Event, KeyValue};

/// Where the proxy's inputs live in the key space.
pub const PREFIX: &str = "/trellis/services/";
const SERVICES: &str = "/trellis/services/svc/";
const SLICES: &str = "/trellis/services/eps/";

/// Starts the watches of Services and EndpointSlices as kube-proxy has
/// them (`!service.kubernetes.io/service-proxy-name`,
/// `!service.kubernetes.io/headless`).
pub fn watch(src: &KubeSource, client: kube::Client, report: Reporter) {
    let selector = watcher::Config::default().labels(trellis_proxy::k8s::LABEL_SELECTOR);
    src.watch_kind(
        "services",
        Role::Listed(SERVICES),
        Api::<KService>::all(client.clone()),
        selector.clone(),
        |s: &KService| -> Shown {
            let v = trellis_proxy::k8s::service(s);
            Some((
                format!("{SERVICES}{}", v.key()),
                serde_json::to_vec(&v).ok()?,
            ))
        },
        report.clone(),
    );
    src.watch_kind(
        "endpointslices",
        Role::Listed(SLICES),
        Api::<EndpointSlice>::all(client),
        selector,
        |s: &EndpointSlice| -> Shown {
            let v = trellis_proxy::k8s::slice(s)?;
            Some((
                format!("{SLICES}{}/{}", v.namespace, v.name),
                serde_json::to_vec(&v).ok()?,
            ))
        },
        report,
    );
}

/// What the status document shows of the proxy. Cheap to clone.
pub type SharedStatus = Arc<Mutex<ProxyStatus>>;

struct ProxyController {
    proxy: Proxy,
    dp: Arc<dyn Dataplane>,
    metrics: Arc<Metrics>,
    status: SharedStatus,
    health_ports: crate::proxy_health::HealthPorts,
    min_interval: Duration,
    last_sync: Option<Instant>,
    listed: bool,
    /// problems already logged, per Service
    reported: std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
    /// after a refused sync: no new attempt before this (backoff)
    retry_at: Option<Instant>,
    failures: u32,
    /// when the table was last checked for
    checked: Option<Instant>,
    /// how long the last successful sync took
    last_took: Duration,
    /// what the kernel holds, on disk
    journal: crate::proxy_journal::Journal,
}

/// A number for a whole-table load's stamp, unlikely to repeat.
fn new_stamp() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    ((t as u32) ^ ((t >> 32) as u32) ^ std::process::id().rotate_left(16)) | 1
}

/// Restores `proxy` from the journal if the table in the kernel carries
/// the journal's stamp; says what it did.
fn restore(
    proxy: &mut Proxy,
    dp: &dyn Dataplane,
    saved: Result<Option<crate::proxy_journal::Saved>, String>,
) {
    let (stamp, fragments) = match saved {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(e) => {
            tracing::info!(error = %e, "proxy: the journal cannot be used; loading the whole table");
            return;
        }
    };
    let want = format!("{stamp}");
    match dp.nft_set_elements(trellis_proxy::TABLE, trellis_proxy::base::STAMP) {
        Ok(Some(have)) if have == [want.clone()] => {
            tracing::info!(
                services = fragments.len(),
                stamp,
                "proxy: the table is the journal's; applying only what changed while down"
            );
            proxy.set_stamp(stamp);
            proxy.restore(fragments);
        }
        Ok(have) => tracing::info!(
            journal = %want,
            table = ?have,
            "proxy: the table is not the one the journal describes; loading it whole"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "proxy: cannot read the table's stamp; loading it whole")
        }
    }
}

/// The longest gap the last sync's duration imposes before the next.
const MAX_GAP: Duration = Duration::from_secs(2);

/// How often the resync checks that the table is still there.
const TABLE_CHECK_EVERY: Duration = Duration::from_secs(60);

/// First wait after nft refused a sync; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(30);

impl ProxyController {
    fn input(&mut self, key: &str, value: Option<&[u8]>) {
        if let Some(k) = key.strip_prefix(SERVICES) {
            let svc = value.and_then(|v| serde_json::from_slice::<Service>(v).ok());
            self.proxy.set_service(k, svc);
        } else if let Some(k) = key.strip_prefix(SLICES) {
            let slice = value.and_then(|v| serde_json::from_slice::<Slice>(v).ok());
            self.proxy.set_slice(k, slice);
        }
    }

    /// Applies what changed, unless the last sync was less than the
    /// minimum interval ago (housekeeping comes back for it).
    fn maybe_sync(&mut self) {
        // the gap between syncs: the minimum interval, or twice what the
        // last incremental sync took if that is longer (a sync
        // may cost in proportion to the table — the kernel validates the
        // whole table when rules or verdict elements change: under a
        // burst, fewer and larger syncs), at most MAX_GAP
        let gap = self.min_interval.max((self.last_took * 2).min(MAX_GAP));
        let due = self.last_sync.is_none_or(|t| t.elapsed() >= gap)
            && self.retry_at.is_none_or(|t| Instant::now() >= t);
        if self.listed && self.proxy.pending() && due {
            self.sync();
        }
    }

    fn sync(&mut self) {
        let t0 = Instant::now();
        // a whole-table load writes a new stamp (the journal names it)
        let stamp = self.proxy.will_replace().then(new_stamp);
        if let Some(s) = stamp {
            self.proxy.set_stamp(s);
        }
        let plan = self.proxy.plan();
        let plan_full = plan.full;
        if !plan.script.is_empty() {
            self.journal.begin(stamp, plan.fragments());
        }
        let kind = if plan_full { "full" } else { "incremental" };
        let services = plan.services;
        self.last_sync = Some(t0);
        let result = if plan.script.is_empty() {
            Ok(())
        } else {
            // one nf_tables batch over netlink: `nft -f` would read the
            // whole table into its cache first, whatever the change
            tokio::task::block_in_place(|| {
                self.dp
                    .nft_apply_netlink(&plan.script, &trellis_proxy::script::decl_of)
            })
        };
        let stale: Vec<trellis_dataplane::conntrack::UdpFlows> = plan
            .stale_udp
            .iter()
            .map(|f| trellis_dataplane::conntrack::UdpFlows {
                endpoint: f.endpoint,
                dests: f.dests.clone(),
                node_ports: f.node_ports.clone(),
            })
            .collect();
        match result {
            Ok(()) => {
                let journaled = !plan.script.is_empty();
                self.proxy.applied(plan);
                if journaled {
                    let proxy = &self.proxy;
                    self.journal.done(plan_full, || proxy.applied_fragments());
                }
                self.retry_at = None;
                self.failures = 0;
                let mut deleted = 0;
                if !stale.is_empty() {
                    match tokio::task::block_in_place(|| self.dp.conntrack_delete_udp(&stale)) {
                        Ok(n) => deleted = n,
                        Err(e) => {
                            tracing::warn!(error = %e, "proxy: deleting UDP conntrack entries of removed endpoints failed")
                        }
                    }
                }
                let took = t0.elapsed();
                self.metrics
                    .proxy_sync(kind, took, self.proxy.len(), deleted);
                self.metrics.reconciled("proxy", 0);
                tracing::debug!(
                    kind,
                    services,
                    took_ms = took.as_millis() as u64,
                    "proxy: synced"
                );
                self.publish(None, took);
            }
            Err(e) => {
                self.journal.abort();
                self.proxy.failed(plan);
                self.metrics.reconciled("proxy", 1);
                let wait = FIRST_RETRY
                    .saturating_mul(1 << self.failures.min(6))
                    .min(MAX_RETRY);
                self.failures += 1;
                self.retry_at = Some(Instant::now() + wait);
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64,
                    "proxy: nft refused the sync; the next one replaces the table");
                self.publish(Some(e.to_string()), t0.elapsed());
            }
        }
    }

    /// Status, health-check ports and the log of problems.
    fn publish(&mut self, error: Option<String>, took: Duration) {
        let mut rows = Vec::new();
        let mut health = Vec::new();
        let mut still = std::collections::BTreeSet::new();
        for (key, ports, problems, notes) in self.proxy.summaries() {
            let seen = self.reported.entry(key.clone()).or_default();
            for p in problems.iter().chain(notes) {
                if seen.insert(p.clone()) {
                    tracing::warn!(service = %key, problem = %p, "proxy: service not fully served");
                }
            }
            still.insert(key.clone());
            if let Some(f) = self.proxy.programmed(&key) {
                if let Some(hc) = f.health_check {
                    health.push((hc, key.clone(), f.local_endpoints));
                }
            }
            rows.push(ProxyService {
                service: key,
                ports: ports
                    .iter()
                    .map(|p| trellis_model::status::ProxyPort {
                        id: p.id.clone(),
                        endpoints: p.endpoints.iter().map(ToString::to_string).collect(),
                        local: p.local.iter().map(ToString::to_string).collect(),
                        verdict: p.verdict.clone(),
                        addresses: p.addresses.clone(),
                    })
                    .collect(),
                problems: problems.iter().chain(notes).cloned().collect(),
            });
        }
        self.reported.retain(|k, _| still.contains(k));
        for c in self.proxy.conflicts() {
            tracing::warn!(service = %c.service, what = %c.what, owner = %c.owner, "proxy: address and port taken by another Service");
        }
        self.health_ports.set(health);
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        st.synced = true;
        st.services = rows;
        st.conflicts = self
            .proxy
            .conflicts()
            .into_iter()
            .map(|c| format!("{}: {} is {}'s", c.service, c.what, c.owner))
            .collect();
        st.last_sync_us = took.as_micros() as u64;
        st.syncs += 1;
        st.error = error;
    }
}

impl Controller for ProxyController {
    type Input = ();

    async fn on_listing(&mut self, items: Vec<KeyValue>) {
        let mut services = Vec::new();
        let mut slices = Vec::new();
        for kv in &items {
            if kv.key.starts_with(SERVICES) {
                services.extend(serde_json::from_slice::<Service>(&kv.value).ok());
            } else if kv.key.starts_with(SLICES) {
                slices.extend(serde_json::from_slice::<Slice>(&kv.value).ok());
            }
        }
        self.proxy.replace(services, slices);
        self.listed = true;
        // a listing is applied at once (the first one: the whole table)
        self.sync();
    }

    async fn on_events(&mut self, events: Vec<Event>) {
        for e in &events {
            match e {
                Event::Put(kv) => self.input(&kv.key, Some(&kv.value)),
                Event::Delete { key, .. } => self.input(key, None),
            }
        }
        self.maybe_sync();
    }

    async fn on_inputs(&mut self, _: Vec<()>) {}

    async fn on_resync(&mut self) {
        // someone deleted the table (nft flush ruleset): put it back whole;
        // checked on one small set, at most once a minute
        if self
            .checked
            .is_some_and(|t| t.elapsed() < TABLE_CHECK_EVERY)
        {
            self.maybe_sync();
            return;
        }
        self.checked = Some(Instant::now());
        match tokio::task::block_in_place(|| {
            self.dp.nft_set_exists(trellis_proxy::TABLE, "node_ips")
        }) {
            Ok(false) if self.listed => {
                tracing::warn!(
                    table = trellis_proxy::TABLE,
                    "proxy: the table is gone; programming it again"
                );
                self.proxy.force_full();
            }
            Err(e) => tracing::warn!(error = %e, "proxy: cannot check the table"),
            _ => {}
        }
        self.maybe_sync();
    }

    async fn on_housekeeping(&mut self) {
        self.maybe_sync();
    }
}

/// Runs the proxy until the process ends.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    source: KubeSource,
    node: NodeFacts,
    data_dir: std::path::PathBuf,
    min_interval: Duration,
    resync: Duration,
    dp: Arc<dyn Dataplane>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    status: SharedStatus,
) {
    let (journal, saved) = crate::proxy_journal::Journal::open(data_dir.join("proxy.journal"));
    let mut proxy = Proxy::new(node);
    tokio::task::block_in_place(|| restore(&mut proxy, dp.as_ref(), saved));
    let mut ctl = ProxyController {
        journal,
        proxy,
        dp,
        metrics: metrics.clone(),
        status,
        health_ports: crate::proxy_health::HealthPorts::default(),
        min_interval,
        last_sync: None,
        listed: false,
        reported: Default::default(),
        retry_at: None,
        failures: 0,
        checked: None,
        last_took: Duration::ZERO,
    };
    let settings = LoopSettings {
        name: "proxy",
        prefix: PREFIX.into(),
        resync_every: resync,
        housekeeping_every: Some(min_interval.max(Duration::from_millis(10))),
        health,
        metrics,
        marks_synced: false,
    };
    drive(&source, settings, &mut ctl, None).await;
}
