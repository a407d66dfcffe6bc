//! The Service proxy (Kubernetes mode): Services and EndpointSlices come
//! from the API server as tables of the [`KubeSource`] (with kube-proxy's
//! label selector), under `/trellis/services/`, in the driver's one loop;
//! `trellis_proxy` renders them; this controller applies one nft
//! transaction per sync — the whole `inet trellis-proxy` table after the
//! first listing, afterwards only what changed — at most one sync per
//! `minSyncIntervalMs` (a lone change goes at once, a burst together).
//! Nothing is programmed before both watches have listed (or started from
//! the watch snapshot a clean stop saved: `trellis_kube::snapshot`). UDP flows to
//! endpoints that went are deleted from conntrack; the health-check node
//! ports of `externalTrafficPolicy: Local` Services answer over HTTP.

use crate::driver::{drive, Controller, LoopSettings};
use crate::health::Health;
use crate::metrics::Metrics;
use k8s_openapi::api::core::v1::Service as KService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis_dataplane::Dataplane;
use trellis_kube::source::{Role, Shown};
use trellis_kube::{KubeSource, Reporter};
use trellis_model::bgp::ServiceAddrKind;
use trellis_model::status::ProxyService;
use trellis_proxy::{NodeFacts, Proxy, Service, Slice};
use trellis_store::{Event, KeyValue};

use crate::proxy_status::advertised;
pub use crate::proxy_status::{LocalAddrs, SharedStatus, StatusView};

/// Where the proxy's inputs live in the key space.
pub const PREFIX: &str = "/trellis/services/";
const SERVICES: &str = "/trellis/services/svc/";
const SLICES: &str = "/trellis/services/eps/";

/// Starts the watches of Services and EndpointSlices as kube-proxy has
/// them (`!service.kubernetes.io/service-proxy-name`,
/// `!service.kubernetes.io/headless`).
pub fn watch(src: &KubeSource, client: kube::Client, report: Reporter) {
    // resumable: after a clean stop they start from the watch snapshot
    // (`trellis_kube::snapshot`) instead of listing every object again
    src.watch_resumable(
        "services",
        Role::Listed(SERVICES),
        Api::<KService>::all(client.clone()),
        trellis_proxy::k8s::LABEL_SELECTOR,
        |s: &KService| -> Shown {
            let v = trellis_proxy::k8s::service(s);
            Some((
                format!("{SERVICES}{}", v.key()),
                serde_json::to_vec(&v).ok()?,
            ))
        },
        report.clone(),
    );
    src.watch_resumable(
        "endpointslices",
        Role::Listed(SLICES),
        Api::<EndpointSlice>::all(client),
        trellis_proxy::k8s::LABEL_SELECTOR,
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

/// Held while a sync writes the journal and the kernel: see [`quiesce`].
static IN_SYNC: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// For a clean stop: waits (at most `deadline`) for a sync in progress to
/// end; no sync starts while the guard is held (the process exits with it).
pub fn quiesce(deadline: Duration) -> Option<std::sync::MutexGuard<'static, ()>> {
    let end = Instant::now() + deadline;
    loop {
        match IN_SYNC.try_lock() {
            Ok(g) => return Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => return Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) if Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(std::sync::TryLockError::WouldBlock) => return None,
        }
    }
}

/// Which Services a sync changed.
enum Changed {
    /// none (a refused sync)
    Nothing,
    /// every one (a whole-table load)
    All,
    /// these
    Some(Vec<String>),
}

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
    /// health-check node ports: Service -> (port, local endpoints)
    health: BTreeMap<String, (u16, usize)>,
    /// per Service, its addresses to advertise from this node
    local_addrs: BTreeMap<String, Vec<(IpAddr, ServiceAddrKind)>>,
    /// ... all of them, for the BGP speaker
    local_addrs_tx: tokio::sync::watch::Sender<Arc<BTreeMap<IpAddr, ServiceAddrKind>>>,
    /// after a refused sync: no new attempt before this (backoff)
    retry_at: Option<Instant>,
    failures: u32,
    /// when the table was last checked for
    checked: Option<Instant>,
    /// how long the last successful sync took
    last_took: Duration,
    /// when free heap pages were last given back, and whether syncs
    /// freed memory since
    trimmed: Instant,
    untrimmed: bool,
    /// the next successful sync publishes every Service (the first one)
    publish_all: bool,
    /// a health-check port could not be bound: try again
    health_retry: bool,
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
    // the two tables are loaded whole together: the endpoint choice's
    // must carry the same stamp
    let picks = dp.nft_set_elements(trellis_proxy::PICK_TABLE, trellis_proxy::base::PICK_STAMP);
    match dp.nft_set_elements(trellis_proxy::TABLE, trellis_proxy::base::STAMP) {
        Ok(Some(have))
            if have == [want.clone()] && !matches!(&picks, Ok(Some(p)) if *p == have) =>
        {
            tracing::info!(
                table = trellis_proxy::PICK_TABLE,
                found = ?picks.ok().flatten(),
                "proxy: the endpoint table is not the journal's; loading both whole"
            )
        }
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

/// Returns the heap's free pages to the system after a listing or a
/// whole-table load: their scripts and batches are large and short-lived,
/// and glibc keeps freed memory of its arenas otherwise.
#[allow(unsafe_code)]
fn give_back_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Free heap pages go back to the system at most this often.
const TRIM_EVERY: Duration = Duration::from_secs(5);

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
        // a stop waits for the sync to end: the journal then says what the
        // kernel holds (a sync cut short makes the next start load it whole)
        let _quiet = IN_SYNC.lock().unwrap_or_else(|p| p.into_inner());
        let t0 = Instant::now();
        // a whole-table load writes a new stamp (the journal names it)
        let stamp = self.proxy.will_replace().then(new_stamp);
        if let Some(s) = stamp {
            self.proxy.set_stamp(s);
        }
        let plan = self.proxy.plan();
        let planned = t0.elapsed();
        let plan_full = plan.full;
        if !plan.script.is_empty() || !plan.refreshed().is_empty() {
            self.journal.begin(stamp, plan.records(), plan.refreshed());
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
        let applied_in = t0.elapsed() - planned;
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
                let journaled = !plan.script.is_empty() || !plan.refreshed().is_empty();
                // the first sync of a restored proxy changes only what
                // changed while it was down: the rest is published too
                // ... and it re-rendered every Service: like a whole-table
                // load it does not set the pace of later syncs
                let first = std::mem::take(&mut self.publish_all);
                let whole = plan_full || first;
                let changed = if whole {
                    Changed::All
                } else {
                    Changed::Some(plan.keys().to_vec())
                };
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
                if whole {
                    give_back_memory();
                    self.trimmed = Instant::now();
                } else {
                    self.last_took = took;
                    self.untrimmed = true;
                }
                self.metrics
                    .proxy_sync(kind, took, self.proxy.len(), deleted);
                self.metrics.reconciled("proxy", 0);
                self.publish(None, took, changed);
                tracing::debug!(
                    kind,
                    services,
                    plan_us = planned.as_micros() as u64,
                    apply_us = applied_in.as_micros() as u64,
                    total_us = t0.elapsed().as_micros() as u64,
                    "proxy: synced"
                );
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
                self.publish(Some(e.to_string()), t0.elapsed(), Changed::Nothing);
            }
        }
    }

    /// Listens on the health-check ports; what could not be bound is
    /// tried again at housekeeping.
    fn set_health_ports(&mut self) {
        let all = self.health_ports.set(
            self.health
                .iter()
                .map(|(k, (port, n))| (*port, k.clone(), *n))
                .collect(),
        );
        self.health_retry = !all;
    }

    /// Status, health-check ports and the log of problems, for the
    /// Services a sync changed.
    fn publish(&mut self, error: Option<String>, took: Duration, changed: Changed) {
        let keys: Vec<String> = match changed {
            Changed::Nothing => vec![],
            Changed::Some(keys) => keys,
            Changed::All => {
                let mut all: std::collections::BTreeSet<String> =
                    self.reported.keys().cloned().collect();
                all.extend(self.health.keys().cloned());
                all.extend(self.proxy.programmed_keys().cloned());
                let st = self.status.lock().unwrap_or_else(|p| p.into_inner());
                all.extend(st.services.keys().cloned());
                all.into_iter().collect()
            }
        };
        let mut rows = Vec::with_capacity(keys.len());
        let mut health_changed = false;
        let mut addrs_changed = false;
        for key in keys {
            let Some(f) = self.proxy.programmed(&key) else {
                self.reported.remove(&key);
                health_changed |= self.health.remove(&key).is_some();
                addrs_changed |= self.local_addrs.remove(&key).is_some();
                rows.push((key, None));
                continue;
            };
            let ads = self
                .proxy
                .service(&key)
                .filter(|s| s.external_local && f.local_endpoints > 0 && f.problems.is_empty())
                .map(advertised)
                .unwrap_or_default();
            let before = if ads.is_empty() {
                self.local_addrs.remove(&key)
            } else {
                self.local_addrs.insert(key.clone(), ads.clone())
            };
            addrs_changed |= before.unwrap_or_default() != ads;
            let seen = self.reported.entry(key.clone()).or_default();
            for p in f.problems.iter().chain(&f.notes) {
                if seen.insert(p.clone()) {
                    tracing::warn!(service = %key, problem = %p, "proxy: service not fully served");
                }
            }
            let hc = f.health_check.map(|port| (port, f.local_endpoints));
            let before = match hc {
                Some(v) => self.health.insert(key.clone(), v),
                None => self.health.remove(&key),
            };
            health_changed |= before != hc;
            let row = ProxyService {
                service: key.clone(),
                ports: f
                    .ports
                    .iter()
                    .map(|p| trellis_model::status::ProxyPort {
                        id: p.id.clone(),
                        endpoints: p.endpoints.iter().map(ToString::to_string).collect(),
                        local: p.local.iter().map(ToString::to_string).collect(),
                        verdict: p.verdict.clone(),
                        addresses: p.addresses.clone(),
                    })
                    .collect(),
                problems: f.problems.iter().chain(&f.notes).cloned().collect(),
            };
            let row = crate::proxy_status::row(&row);
            rows.push((key, Some(row)));
        }
        let conflicts = self.proxy.conflicts();
        for c in &conflicts {
            tracing::debug!(service = %c.service, what = %c.what, owner = %c.owner, "proxy: address and port taken by another Service");
        }
        if health_changed || self.health_retry {
            self.set_health_ports();
        }
        if addrs_changed {
            let all: BTreeMap<IpAddr, ServiceAddrKind> =
                self.local_addrs.values().flatten().copied().collect();
            self.local_addrs_tx.send_replace(Arc::new(all));
        }
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        st.synced = true;
        for (key, row) in rows {
            match row {
                Some(r) => st.services.insert(key, r),
                None => st.services.remove(&key),
            };
        }
        let now: Vec<String> = conflicts
            .into_iter()
            .map(|c| format!("{}: {} is {}'s", c.service, c.what, c.owner))
            .collect();
        if now != st.conflicts {
            for c in now.iter().filter(|c| !st.conflicts.contains(c)) {
                tracing::warn!(conflict = %c, "proxy: address and port taken by another Service");
            }
            st.conflicts = now;
        }
        st.last_sync_us = took.as_micros() as u64;
        st.syncs += 1;
        st.error = error;
    }
}

impl Controller for ProxyController {
    type Input = ();

    async fn on_listing(&mut self, items: Vec<KeyValue>) {
        let t0 = Instant::now();
        let objects = items.len();
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
        drop(items);
        tracing::debug!(
            objects,
            took_us = t0.elapsed().as_micros() as u64,
            "proxy: listing read"
        );
        self.listed = true;
        // a listing is applied at once (the first one: the whole table)
        // (a whole-table load, or the first sync after a journal restart)
        let whole = self.proxy.will_replace() || self.publish_all;
        self.sync();
        if !whole {
            // (a whole sync gave back its memory itself)
            give_back_memory();
        }
    }

    async fn on_events(&mut self, events: Vec<Event>) {
        tracing::trace!(events = events.len(), "proxy: events");
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
            Ok::<_, trellis_dataplane::DataplaneError>(
                self.dp.nft_set_exists(trellis_proxy::TABLE, "node_ips")?
                    && self.dp.nft_set_exists(
                        trellis_proxy::PICK_TABLE,
                        trellis_proxy::base::PICK_STAMP,
                    )?,
            )
        }) {
            Ok(false) if self.listed => {
                tracing::warn!(
                    tables = %format!("{} {}", trellis_proxy::TABLE, trellis_proxy::PICK_TABLE),
                    "proxy: a table is gone; programming both again"
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
        if self.health_retry {
            self.set_health_ports();
        }
        // what a burst of syncs freed goes back to the system once it is
        // over (glibc keeps it otherwise)
        if self.untrimmed && self.trimmed.elapsed() >= TRIM_EVERY && !self.proxy.pending() {
            give_back_memory();
            self.trimmed = Instant::now();
            self.untrimmed = false;
        }
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
    local_addrs_tx: tokio::sync::watch::Sender<Arc<BTreeMap<IpAddr, ServiceAddrKind>>>,
) {
    let t0 = Instant::now();
    let (journal, saved) = crate::proxy_journal::Journal::open(data_dir.join("proxy.journal"));
    let read = t0.elapsed();
    let mut proxy = Proxy::new(node);
    // fingerprints of inputs hold only within one build
    proxy.set_build(&crate::kube::exe_identity());
    tokio::task::block_in_place(|| restore(&mut proxy, dp.as_ref(), saved));
    tracing::debug!(
        read_us = read.as_micros() as u64,
        restored_us = (t0.elapsed() - read).as_micros() as u64,
        "proxy: journal"
    );
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
        health: Default::default(),
        local_addrs: Default::default(),
        local_addrs_tx,
        retry_at: None,
        failures: 0,
        checked: None,
        last_took: Duration::ZERO,
        trimmed: Instant::now(),
        untrimmed: false,
        publish_all: true,
        health_retry: false,
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
