//! The agent's Prometheus metrics (text format on `/metrics`): CNI
//! requests, reconcilers, BGP sessions and routes, the datastore watch and
//! the subnet lease. One [`Metrics`] per process, shared by reference.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A CNI request's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CniLabels {
    /// ADD, DEL, CHECK, STATUS, GC, VERSION.
    pub command: String,
    /// `ok` or `error`.
    pub result: String,
    /// The CNI error code (`0` on success).
    pub code: String,
}

/// Labels naming a reconciler.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcilerLabels {
    /// `routes`, `nftables`, ...
    pub reconciler: String,
}

/// Labels naming a BGP peer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// Its address.
    pub peer: String,
    /// mesh / reflector / rr-client / external.
    pub kind: String,
}

/// Labels of a BGP session state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// FSM state.
    pub state: String,
}

/// Labels of a lease renewal.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok`, `failed` (datastore error), `reclaimed` (expired, the same
    /// subnet claimed again) or `lost` (taken by another node).
    pub result: String,
}

/// Labels of an API server request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerbLabels {
    /// list, watch, get, create, update, patch, delete.
    pub verb: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// BGP FSM states, so every state has a series (zero included).
pub const BGP_STATES: [&str; 6] = [
    "Idle",
    "Connect",
    "Active",
    "OpenSent",
    "OpenConfirm",
    "Established",
];

/// Every metric of the agent.
pub struct Metrics {
    registry: Registry,
    cni_requests: Family<CniLabels, Counter>,
    cni_duration: Family<CniLabels, Histogram>,
    reconciler_runs: Family<ReconcilerLabels, Counter>,
    reconciler_errors: Family<ReconcilerLabels, Counter>,
    reconciler_last_success: Family<ReconcilerLabels, FloatGauge>,
    bgp_sessions: Family<StateLabels, Gauge>,
    bgp_received: Family<PeerLabels, Gauge>,
    bgp_accepted: Family<PeerLabels, Gauge>,
    bgp_advertised: Family<PeerLabels, Gauge>,
    bgp_established: Family<PeerLabels, Gauge>,
    watch_restarts: Counter,
    datastore_errors: Counter,
    lease_renewals: Family<ResultLabels, Counter>,
    api_requests: Family<VerbLabels, Counter>,
    proxy_syncs: Family<SyncLabels, Histogram>,
    proxy_services: Gauge,
    proxy_conntrack_deleted: Counter,
    policy_denied: Family<PolicyLabels, Counter>,
}

/// Labels of a policy's denials.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    /// `Admin`, `NetworkPolicy`, `Baseline` or `unknown`.
    pub tier: String,
    /// The policy (for the drop of an isolated pod: the policies
    /// isolating it).
    pub policy: String,
}

/// Labels of a proxy sync.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabels {
    /// `full` or `incremental`.
    pub kind: String,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~4 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("trellis");
        let cni_requests = Family::<CniLabels, Counter>::default();
        registry.register(
            "cni_requests",
            "CNI requests handled, by command and result",
            cni_requests.clone(),
        );
        let cni_duration = Family::<CniLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "cni_request_duration_seconds",
            "Time the agent took for a CNI request, by command and result",
            cni_duration.clone(),
        );
        let reconciler_runs = Family::<ReconcilerLabels, Counter>::default();
        registry.register(
            "reconciler_runs",
            "Reconciler runs (incremental applies and full resyncs)",
            reconciler_runs.clone(),
        );
        let reconciler_errors = Family::<ReconcilerLabels, Counter>::default();
        registry.register(
            "reconciler_errors",
            "Kernel operations that failed during reconciler runs",
            reconciler_errors.clone(),
        );
        let reconciler_last_success = Family::<ReconcilerLabels, FloatGauge>::default();
        registry.register(
            "reconciler_last_success_timestamp_seconds",
            "Unix time of the reconciler's last run without errors",
            reconciler_last_success.clone(),
        );
        let bgp_sessions = Family::<StateLabels, Gauge>::default();
        registry.register(
            "bgp_sessions",
            "BGP sessions by FSM state",
            bgp_sessions.clone(),
        );
        let bgp_received = Family::<PeerLabels, Gauge>::default();
        registry.register(
            "bgp_routes_received",
            "Prefixes the peer announces to us (accepted or refused)",
            bgp_received.clone(),
        );
        let bgp_accepted = Family::<PeerLabels, Gauge>::default();
        registry.register(
            "bgp_routes_accepted",
            "Prefixes from the peer that passed the import policy",
            bgp_accepted.clone(),
        );
        let bgp_advertised = Family::<PeerLabels, Gauge>::default();
        registry.register(
            "bgp_routes_advertised",
            "Prefixes we advertise to the peer",
            bgp_advertised.clone(),
        );
        let bgp_established = Family::<PeerLabels, Gauge>::default();
        registry.register(
            "bgp_session_established",
            "Times the session with the peer reached Established (flaps show as growth)",
            bgp_established.clone(),
        );
        let watch_restarts = Counter::default();
        registry.register(
            "datastore_watch_restarts",
            "Full relistings after the first: a watch that ended, or fell behind a compaction (the etcd client reconnects a broken watch by itself)",
            watch_restarts.clone(),
        );
        let datastore_errors = Counter::default();
        registry.register(
            "datastore_errors",
            "List and watch requests of the routing loop that failed (keep-alives count in lease_renewals)",
            datastore_errors.clone(),
        );
        let lease_renewals = Family::<ResultLabels, Counter>::default();
        registry.register(
            "lease_renewals",
            "Subnet lease keep-alives, by result",
            lease_renewals.clone(),
        );
        let api_requests = Family::<VerbLabels, Counter>::default();
        registry.register(
            "api_requests",
            "Requests this agent sent to the Kubernetes API server, by verb",
            api_requests.clone(),
        );
        let proxy_syncs = Family::<SyncLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "proxy_sync_duration_seconds",
            "Service proxy syncs (one nft transaction each), by kind",
            proxy_syncs.clone(),
        );
        let proxy_services = Gauge::default();
        registry.register(
            "proxy_services",
            "Services the proxy knows",
            proxy_services.clone(),
        );
        let proxy_conntrack_deleted = Counter::default();
        registry.register(
            "proxy_conntrack_deleted",
            "UDP conntrack entries deleted because their endpoint went",
            proxy_conntrack_deleted.clone(),
        );
        let policy_denied = Family::<PolicyLabels, Counter>::default();
        registry.register(
            "policy_denied_packets",
            "Packets of new connections dropped by a policy, by tier and policy",
            policy_denied.clone(),
        );
        Self {
            policy_denied,
            registry,
            api_requests,
            cni_requests,
            cni_duration,
            reconciler_runs,
            reconciler_errors,
            reconciler_last_success,
            bgp_sessions,
            bgp_received,
            bgp_accepted,
            bgp_advertised,
            bgp_established,
            watch_restarts,
            datastore_errors,
            lease_renewals,
            proxy_syncs,
            proxy_services,
            proxy_conntrack_deleted,
        }
    }

    /// Counts the requests of a Kubernetes client built with this hook.
    pub fn api_request_hook(&self) -> trellis_kube::requests::RequestHook {
        let family = self.api_requests.clone();
        trellis_kube::requests::RequestHook(std::sync::Arc::new(move |verb| {
            family
                .get_or_create(&VerbLabels { verb: verb.into() })
                .inc();
        }))
    }

    /// One CNI request: `code` is `None` on success.
    pub fn cni(&self, command: &str, code: Option<u32>, took: Duration) {
        let l = CniLabels {
            command: command.to_string(),
            result: if code.is_some() { "error" } else { "ok" }.into(),
            code: code.unwrap_or(0).to_string(),
        };
        self.cni_requests.get_or_create(&l).inc();
        self.cni_duration
            .get_or_create(&l)
            .observe(took.as_secs_f64());
    }

    /// One proxy sync of `kind` that took `took`, `services` known.
    pub fn proxy_sync(
        &self,
        kind: &str,
        took: Duration,
        services: usize,
        conntrack_deleted: usize,
    ) {
        self.proxy_syncs
            .get_or_create(&SyncLabels { kind: kind.into() })
            .observe(took.as_secs_f64());
        self.proxy_services.set(services as i64);
        self.proxy_conntrack_deleted
            .inc_by(conntrack_deleted as u64);
    }

    /// One reconciler run that had `errors` failures.
    pub fn reconciled(&self, reconciler: &str, errors: usize) {
        let l = ReconcilerLabels {
            reconciler: reconciler.to_string(),
        };
        self.reconciler_runs.get_or_create(&l).inc();
        if errors > 0 {
            self.reconciler_errors
                .get_or_create(&l)
                .inc_by(errors as u64);
        } else {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            self.reconciler_last_success.get_or_create(&l).set(now);
        }
    }

    /// The speaker's peers as they are now (replaces the previous values).
    pub fn bgp(&self, peers: &[trellis_model::status::BgpPeer]) {
        self.bgp_received.clear();
        self.bgp_accepted.clear();
        self.bgp_advertised.clear();
        self.bgp_established.clear();
        for s in BGP_STATES {
            let n = peers.iter().filter(|p| p.state == s).count();
            self.bgp_sessions
                .get_or_create(&StateLabels { state: s.into() })
                .set(n as i64);
        }
        for p in peers {
            let l = PeerLabels {
                peer: p.addr.to_string(),
                kind: p.kind.clone(),
            };
            self.bgp_received.get_or_create(&l).set(p.received as i64);
            self.bgp_accepted.get_or_create(&l).set(p.accepted as i64);
            self.bgp_advertised
                .get_or_create(&l)
                .set(p.advertised as i64);
            self.bgp_established
                .get_or_create(&l)
                .set(p.established_count as i64);
        }
    }

    /// `packets` more were dropped by `policy` of `tier`.
    pub fn policy_denied(&self, tier: &str, policy: &str, packets: u64) {
        self.policy_denied
            .get_or_create(&PolicyLabels {
                tier: tier.into(),
                policy: policy.into(),
            })
            .inc_by(packets);
    }

    /// The routing loop listed and watched again.
    pub fn watch_restarted(&self) {
        self.watch_restarts.inc();
    }

    /// A datastore request of the routing loop failed.
    pub fn datastore_error(&self) {
        self.datastore_errors.inc();
    }

    /// A lease keep-alive with this result.
    pub fn lease_renewal(&self, result: &str) {
        self.lease_renewals
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encode metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_carry_their_values() {
        let m = Metrics::new();
        m.cni("ADD", None, Duration::from_millis(3));
        m.cni("ADD", Some(11), Duration::from_millis(1));
        m.reconciled("routes", 0);
        m.reconciled("routes", 2);
        m.lease_renewal("ok");
        m.bgp(&[trellis_model::status::BgpPeer {
            addr: "192.0.2.12".parse().expect("ip"),
            asn: 64512,
            kind: "mesh".into(),
            state: "Established".into(),
            since_secs: 1,
            router_id: None,
            received: 4,
            accepted: 1,
            advertised: 1,
            stale: 0,
            established_count: 2,
            last_error: None,
        }]);
        let t = m.encode();
        for needle in [
            r#"trellis_cni_requests_total{command="ADD",result="ok",code="0"} 1"#,
            r#"trellis_cni_requests_total{command="ADD",result="error",code="11"} 1"#,
            r#"trellis_cni_request_duration_seconds_count{command="ADD",result="ok",code="0"} 1"#,
            r#"trellis_reconciler_runs_total{reconciler="routes"} 2"#,
            r#"trellis_reconciler_errors_total{reconciler="routes"} 2"#,
            r#"trellis_reconciler_last_success_timestamp_seconds{reconciler="routes"}"#,
            r#"trellis_bgp_sessions{state="Established"} 1"#,
            r#"trellis_bgp_sessions{state="Idle"} 0"#,
            r#"trellis_bgp_routes_received{peer="192.0.2.12",kind="mesh"} 4"#,
            r#"trellis_bgp_routes_accepted{peer="192.0.2.12",kind="mesh"} 1"#,
            r#"trellis_bgp_session_established{peer="192.0.2.12",kind="mesh"} 2"#,
            r#"trellis_lease_renewals_total{result="ok"} 1"#,
            "trellis_datastore_watch_restarts_total 0",
        ] {
            assert!(t.contains(needle), "{needle} missing in\n{t}");
        }
    }
}
