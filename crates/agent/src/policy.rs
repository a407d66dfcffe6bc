//! Network policy (Kubernetes mode): NetworkPolicies, ClusterNetworkPolicies
//! (when their CRD is installed), Namespaces and every Pod come from the
//! API server as tables of the [`KubeSource`] under `/trellis/policy/`, in
//! the driver's one loop; `trellis_policy` compiles what applies to this
//! node's pods; this controller applies the table `inet trellis-policy`
//! whole after a listing and afterwards only what changed.
//!
//! Fail closed from the first packet: a CNI ADD asks the [`Gate`] before
//! the pod's interface exists, and is answered once the pod is known (its
//! labels from the API) and its policy is in the kernel. A pod the API
//! does not know within [`ADMIT_WAIT`] is refused (the runtime tries
//! again). The table stays in the kernel while the agent restarts.

use crate::driver::{drive, Controller, LoopSettings};
use crate::health::Health;
use crate::metrics::Metrics;
use k8s_openapi::api::core::v1::{Namespace as KNamespace, Pod as KPod};
use k8s_openapi::api::networking::v1::NetworkPolicy as KPolicy;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::watcher;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use trellis_dataplane::conntrack::Tuple;
use trellis_dataplane::Dataplane;
use trellis_kube::source::{Role, Shown};
use trellis_kube::{KubeSource, Reporter};
use trellis_policy::{render, ClusterPolicy, Desired, Engine, Flow, Namespace, NetworkPolicy, Pod};
use trellis_store::{Event, KeyValue};

/// Where the policy's inputs live in the key space.
pub const PREFIX: &str = "/trellis/policy/";
const PODS: &str = "/trellis/policy/pod/";
const NAMESPACES: &str = "/trellis/policy/ns/";
const POLICIES: &str = "/trellis/policy/np/";
const CLUSTER: &str = "/trellis/policy/cnp/";
/// How long an ADD waits for its pod's policy.
pub const ADMIT_WAIT: Duration = Duration::from_secs(10);
/// The node's pods as its IPAM holds them: (address, `namespace/name`).
pub type Allocations = Arc<dyn Fn() -> Vec<(Ipv4Addr, String)> + Send + Sync>;

/// How often the drop counters are read for `/metrics`.
const COUNT_EVERY: Duration = Duration::from_secs(2);
/// Requests queued to the loop at most.
const GATE_QUEUE: usize = 1024;

/// The policy table as the kernel holds it, for traces (`None`: policy
/// off, or nothing loaded yet).
pub type View = Arc<std::sync::Mutex<Option<Arc<Desired>>>>;

/// Answers `/policy/trace?src=IP&dst=IP&port=PORT/PROTO` (`port` absent:
/// a flow without ports, as ICMP) with the decision as JSON.
pub fn trace(view: &View, query: &str) -> Result<String, String> {
    let mut src = None;
    let mut dst = None;
    let mut proto = None;
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let v = v.replace("%2F", "/").replace("%2f", "/");
        match k {
            "src" => {
                src = Some(
                    v.parse::<Ipv4Addr>()
                        .map_err(|_| format!("src: {v:?} is not an IPv4 address"))?,
                )
            }
            "dst" => {
                dst = Some(
                    v.parse::<Ipv4Addr>()
                        .map_err(|_| format!("dst: {v:?} is not an IPv4 address"))?,
                )
            }
            "port" => proto = Some(parse_port(&v)?),
            other => return Err(format!("{other:?}: unknown parameter (src, dst, port)")),
        }
    }
    let (Some(src), Some(dst)) = (src, dst) else {
        return Err("src and dst are required: /policy/trace?src=IP&dst=IP&port=PORT/PROTO".into());
    };
    let d = view
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or("no policy is loaded on this node (policy off, or not synced yet)")?;
    let decision = d.decide(&Flow { src, dst, proto });
    serde_json::to_string(&decision).map_err(|e| e.to_string())
}

/// `80/tcp`, `53/UDP`, `9/sctp`; a bare number is TCP.
pub fn parse_port(s: &str) -> Result<(trellis_policy::Protocol, u16), String> {
    let (port, proto) = s.split_once('/').unwrap_or((s, "tcp"));
    let proto = match proto.to_ascii_lowercase().as_str() {
        "tcp" => trellis_policy::Protocol::Tcp,
        "udp" => trellis_policy::Protocol::Udp,
        "sctp" => trellis_policy::Protocol::Sctp,
        other => return Err(format!("port: {other:?} is not tcp, udp or sctp")),
    };
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port: {port:?} is not a port (1-65535)"))?;
    Ok((proto, port))
}

/// The API resource of ClusterNetworkPolicy.
fn cnp_resource() -> ApiResource {
    ApiResource {
        group: "policy.networking.k8s.io".into(),
        version: "v1alpha2".into(),
        api_version: trellis_policy::k8s::CNP_API_VERSION.into(),
        kind: "ClusterNetworkPolicy".into(),
        plural: trellis_policy::k8s::CNP_PLURAL.into(),
    }
}

/// Whether the API server serves ClusterNetworkPolicy (its CRD is
/// installed); `Err` when it could not be asked.
pub async fn cluster_policies_served(client: &kube::Client) -> Result<bool, String> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &cnp_resource());
    match tokio::time::timeout(
        Duration::from_secs(10),
        api.list(&kube::api::ListParams::default().limit(1)),
    )
    .await
    {
        Ok(Ok(_)) => Ok(true),
        Ok(Err(kube::Error::Api(e))) if e.code == 404 => Ok(false),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 10 s".into()),
    }
}

/// Starts the watches the policy reads; ClusterNetworkPolicies only when
/// `cluster` (their CRD is installed).
pub fn watch(src: &KubeSource, client: kube::Client, cluster: bool, report: Reporter) {
    src.watch_kind(
        "pods (policy)",
        Role::Listed(PODS),
        Api::<KPod>::all(client.clone()),
        watcher::Config::default(),
        |p: &KPod| -> Shown {
            let v = trellis_policy::k8s::pod(p);
            Some((format!("{PODS}{}", v.key()), serde_json::to_vec(&v).ok()?))
        },
        report.clone(),
    );
    src.watch_kind(
        "namespaces",
        Role::Listed(NAMESPACES),
        Api::<KNamespace>::all(client.clone()),
        watcher::Config::default(),
        |n: &KNamespace| -> Shown {
            let v = trellis_policy::k8s::namespace(n);
            Some((
                format!("{NAMESPACES}{}", v.name),
                serde_json::to_vec(&v).ok()?,
            ))
        },
        report.clone(),
    );
    src.watch_kind(
        "networkpolicies",
        Role::Listed(POLICIES),
        Api::<KPolicy>::all(client.clone()),
        watcher::Config::default(),
        |p: &KPolicy| -> Shown {
            let v = trellis_policy::k8s::network_policy(p);
            Some((
                format!("{POLICIES}{}", v.key()),
                serde_json::to_vec(&v).ok()?,
            ))
        },
        report.clone(),
    );
    if cluster {
        src.watch_kind(
            "clusternetworkpolicies",
            Role::Listed(CLUSTER),
            Api::<DynamicObject>::all_with(client, &cnp_resource()),
            watcher::Config::default(),
            |o: &DynamicObject| -> Shown {
                let name = o.metadata.name.clone().unwrap_or_default();
                let v: Result<ClusterPolicy, String> = serde_json::to_value(o)
                    .map_err(|e| e.to_string())
                    .and_then(|j| trellis_policy::k8s::cluster_policy(&j));
                Some((format!("{CLUSTER}{name}"), serde_json::to_vec(&v).ok()?))
            },
            report,
        );
    }
}

/// A request of the CNI side.
pub enum Input {
    /// Pod `pod` (`namespace/name`) is about to get `ip`: answer once its
    /// policy is in place.
    Admit {
        /// Its address.
        ip: Ipv4Addr,
        /// Its pod.
        pod: String,
        /// Where the answer goes.
        reply: std::sync::mpsc::SyncSender<Result<(), String>>,
        /// Given up at.
        until: Instant,
    },
    /// `ip` is no longer a pod's.
    Release(Ipv4Addr),
}

/// The CNI side's handle on the policy loop.
#[derive(Clone)]
pub struct Gate {
    tx: mpsc::Sender<Input>,
}

impl Gate {
    /// A gate and the receiver the loop reads.
    pub fn new() -> (Self, mpsc::Receiver<Input>) {
        let (tx, rx) = mpsc::channel(GATE_QUEUE);
        (Self { tx }, rx)
    }

    /// Blocks until `pod`'s policy for `ip` is in the kernel (at most
    /// [`ADMIT_WAIT`]); `Err` says why not.
    pub fn admit(&self, ip: Ipv4Addr, pod: &str) -> Result<(), String> {
        let (reply, rx) = std::sync::mpsc::sync_channel(1);
        let until = Instant::now() + ADMIT_WAIT;
        self.tx
            .try_send(Input::Admit {
                ip,
                pod: pod.to_string(),
                reply,
                until,
            })
            .map_err(|e| format!("the policy loop takes no request ({e})"))?;
        rx.recv_timeout(ADMIT_WAIT + Duration::from_secs(1))
            .map_err(|_| {
                format!("the policy of pod {pod} was not in place within {ADMIT_WAIT:?}")
            })?
    }

    /// `ip` was released (waits at most 1 s for room in the queue).
    pub fn release(&self, ip: Ipv4Addr) {
        let end = Instant::now() + Duration::from_secs(1);
        let mut item = Input::Release(ip);
        loop {
            match self.tx.try_send(item) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(i)) if Instant::now() < end => {
                    item = i;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    tracing::warn!(%ip, error = %e, "policy: release not queued; the next listing drops it");
                    return;
                }
            }
        }
    }
}

struct Pending {
    ip: Ipv4Addr,
    pod: String,
    reply: std::sync::mpsc::SyncSender<Result<(), String>>,
    until: Instant,
}

struct PolicyController {
    engine: Engine,
    dp: Arc<dyn Dataplane>,
    metrics: Arc<Metrics>,
    /// what the kernel holds (none: load it whole next)
    applied: Option<Arc<Desired>>,
    /// ... shown to traces
    view: View,
    listed: bool,
    pending: Vec<Pending>,
    /// problems already logged, per policy
    reported: std::collections::BTreeMap<String, Vec<String>>,
    /// a change went in: established flows it denies are cut at the next
    /// housekeeping (within 100 ms)
    sweep_due: bool,
    /// why no pod can be policed here (ADDs are refused with it)
    blocked: Option<String>,
    /// the node's pods as its IPAM holds them
    allocations: Allocations,
    /// the drop rules' counters last read, and when
    drops: trellis_policy::counters::Drops,
    counted: Instant,
}

impl PolicyController {
    fn apply_kv(&mut self, key: &str, value: Option<&[u8]>) {
        if let Some(k) = key.strip_prefix(PODS) {
            let v: Option<Pod> = value.and_then(|v| serde_json::from_slice(v).ok());
            self.engine.set_pod(k, v);
        } else if let Some(k) = key.strip_prefix(NAMESPACES) {
            let v: Option<Namespace> = value.and_then(|v| serde_json::from_slice(v).ok());
            self.engine.set_namespace(k, v);
        } else if let Some(k) = key.strip_prefix(POLICIES) {
            let v: Option<NetworkPolicy> = value.and_then(|v| serde_json::from_slice(v).ok());
            if let Some(p) = &v {
                self.report(&format!("NetworkPolicy {k}"), &p.problems);
            }
            self.engine.set_policy(k, v);
        } else if let Some(k) = key.strip_prefix(CLUSTER) {
            let v: Option<Result<ClusterPolicy, String>> =
                value.and_then(|v| serde_json::from_slice(v).ok());
            let what = format!("ClusterNetworkPolicy {k}");
            match v {
                Some(Ok(c)) => {
                    self.report(&what, &c.problems);
                    self.engine.set_cluster(k, Some(c));
                }
                Some(Err(e)) => {
                    self.report(&what, &[format!("{e} (not applied)")]);
                    self.engine.set_cluster(k, None);
                }
                None => self.engine.set_cluster(k, None),
            }
        }
    }

    /// Logs `problems` of `what` once (again when they change).
    fn report(&mut self, what: &str, problems: &[String]) {
        if self.reported.get(what).map(Vec::as_slice) == Some(problems) {
            return;
        }
        if problems.is_empty() {
            self.reported.remove(what);
        } else {
            for p in problems {
                tracing::warn!("policy: {what}: {p}; the part fails closed");
            }
            self.reported.insert(what.to_string(), problems.to_vec());
        }
    }

    /// Brings the kernel in line and, when the policies, pods or
    /// namespaces changed, has the connections the new table denies cut;
    /// false when it failed (tried again at the next housekeeping, as a
    /// whole-table load).
    fn sync_and_cut(&mut self) -> bool {
        let ok = self.sync();
        if ok {
            self.sweep_due = true;
        }
        ok
    }

    /// Brings the kernel in line; false when it failed (tried again at
    /// the next housekeeping, as a whole-table load).
    fn sync(&mut self) -> bool {
        if !self.listed {
            return false;
        }
        let t0 = Instant::now();
        let want = self.engine.desired();
        let script = match &self.applied {
            Some(have) => render::diff(have, &want),
            None => render::full(&want),
        };
        let planned = t0.elapsed();
        if !script.is_empty() {
            let r = tokio::task::block_in_place(|| self.dp.nft_apply(&script));
            self.metrics.reconciled("policy", usize::from(r.is_err()));
            if let Err(e) = r {
                tracing::error!(error = %e, "policy: the kernel refused the change; loading the whole table next");
                self.applied = None;
                return false;
            }
        }
        tracing::debug!(
            plan_us = planned.as_micros() as u64,
            apply_us = (t0.elapsed() - planned).as_micros() as u64,
            lines = script.lines().count(),
            policed = want.policed().len(),
            "policy: synced"
        );
        let want = Arc::new(want);
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = Some(want.clone());
        self.applied = Some(want);
        true
    }

    /// The local pods as the node's IPAM holds them now: addresses freed
    /// without a release (a CNI GC, a release the full queue lost) leave,
    /// ones it holds come back. Addresses with an ADD in flight stay.
    fn reconcile_local(&mut self) {
        let held: std::collections::BTreeMap<Ipv4Addr, String> =
            (self.allocations)().into_iter().collect();
        let pending: std::collections::BTreeSet<Ipv4Addr> =
            self.pending.iter().map(|p| p.ip).collect();
        let now: Vec<(Ipv4Addr, String)> = self
            .engine
            .local()
            .iter()
            .map(|(a, k)| (*a, k.clone()))
            .collect();
        for (ip, key) in now {
            if !pending.contains(&ip) && held.get(&ip) != Some(&key) {
                self.engine.set_local(ip, None);
            }
        }
        for (ip, key) in held {
            if self.engine.local().get(&ip) != Some(&key) && !pending.contains(&ip) {
                self.engine.set_local(ip, Some(key));
            }
        }
    }

    /// Adds what the drop rules dropped since the last reading to the
    /// per-policy denial counters of `/metrics`.
    fn count_denials(&mut self) {
        self.counted = Instant::now();
        let Some(d) = self.applied.clone() else {
            return;
        };
        let json = tokio::task::block_in_place(|| self.dp.nft_table_json(trellis_policy::TABLE));
        let now = match json {
            Ok(Some(j)) => match trellis_policy::counters::drops(&j, &d) {
                Ok(n) => n,
                Err(e) => {
                    return tracing::warn!(error = %e, "policy: cannot read the drop counters")
                }
            },
            Ok(None) => return,
            Err(e) => return tracing::warn!(error = %e, "policy: cannot read the drop counters"),
        };
        for ((tier, policy), n) in trellis_policy::counters::delta(&self.drops, &now) {
            self.metrics.policy_denied(tier, &policy, n);
        }
        self.drops = now;
    }

    /// Deletes the conntrack entries of connections the table now denies
    /// (a policy never lets an established connection it forbids go on).
    /// A connection is judged as the forward hook sees its first packet:
    /// from the original source to the reply's source and port (the
    /// endpoint after the proxy's DNAT).
    fn sweep(&mut self) {
        let Some(d) = self.applied.clone() else {
            return;
        };
        self.sweep_due = false;
        let policed = d.policed();
        if policed.is_empty() {
            return;
        }
        let t0 = Instant::now();
        // the node's own traffic to and from its pods never crosses the
        // forward hook: not policed, never cut
        let own: std::collections::BTreeSet<Ipv4Addr> = match tokio::task::block_in_place(|| {
            self.dp.local_ipv4()
        }) {
            Ok(a) => a.into_iter().collect(),
            Err(e) => {
                tracing::warn!(error = %e, "policy: cannot list the node's addresses; no connection cut this time");
                self.sweep_due = true;
                return;
            }
        };
        let pick = |o: &Tuple, r: &Tuple| -> bool {
            let (Some(src), Some(dst)) = (o.src, r.src) else {
                return false;
            };
            if !policed.contains(&src) && !policed.contains(&dst) {
                return false;
            }
            if own.contains(&src) || own.contains(&dst) {
                return false;
            }
            // TCP, UDP and SCTP only: what a policy's ports speak of, and
            // what a delete can name (ICMP would need its id, type, code)
            let Some(proto) = trellis_policy::Protocol::from_number(o.proto) else {
                return false;
            };
            !d.decide(&Flow {
                src,
                dst,
                proto: Some((proto, r.sport)),
            })
            .allowed
        };
        let dp = self.dp.clone();
        // TCP connections are marked cut before their entries go, so no
        // packet of theirs starts a new entry mid-stream
        let mut mark = |flows: &[(Tuple, Tuple)]| -> Result<(), String> {
            let tcp: Vec<_> = flows
                .iter()
                .filter(|(o, _)| o.proto == 6)
                // as the forward hook sees them: after DNAT, before SNAT
                .filter_map(|(o, r)| Some((o.src?, r.src?, o.sport, r.sport)))
                .collect();
            let script = render::cut(&tcp);
            if script.is_empty() {
                return Ok(());
            }
            dp.nft_apply(&script).map_err(|e| e.to_string())
        };
        let r = tokio::task::block_in_place(|| self.dp.conntrack_delete_where(&pick, &mut mark));
        match r {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                flows = n,
                took_us = t0.elapsed().as_micros() as u64,
                "policy: cut established connections the policy now denies"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "policy: cannot cut denied connections; trying again");
                self.sweep_due = true;
            }
        }
    }

    /// Answers the ADDs whose pod is known and synced, and those whose
    /// time is up.
    fn answer(&mut self, synced: bool) {
        let now = Instant::now();
        let known = |p: &Pending, e: &Engine| e.inputs().pods.contains_key(&p.pod);
        let mut keep = Vec::new();
        for p in std::mem::take(&mut self.pending) {
            if let Some(why) = &self.blocked {
                let _ = p.reply.try_send(Err(why.clone()));
            } else if synced && self.listed && known(&p, &self.engine) {
                let _ = p.reply.try_send(Ok(()));
            } else if now >= p.until {
                let why = if !self.listed {
                    "the policy inputs have not been listed from the API server yet".to_string()
                } else if !known(&p, &self.engine) {
                    format!("pod {} is not known to the API server", p.pod)
                } else {
                    "its policy could not be programmed".to_string()
                };
                let _ = p.reply.try_send(Err(format!(
                    "{why} after {ADMIT_WAIT:?}; refusing to start {} ({}) unpoliced",
                    p.pod, p.ip
                )));
            } else {
                keep.push(p);
            }
        }
        self.pending = keep;
    }
}

impl Controller for PolicyController {
    type Input = Input;

    async fn on_listing(&mut self, items: Vec<KeyValue>) {
        let local: Vec<(Ipv4Addr, String)> = self
            .engine
            .local()
            .iter()
            .map(|(a, k)| (*a, k.clone()))
            .collect();
        // inputs anew, settings kept
        let log = self.engine.log();
        self.engine = Engine::default();
        self.engine.set_log(log);
        for (a, k) in local {
            self.engine.set_local(a, Some(k));
        }
        for kv in &items {
            self.apply_kv(&kv.key, Some(&kv.value));
        }
        self.listed = true;
        // the whole table: whatever the kernel holds is replaced
        self.applied = None;
        self.reconcile_local();
        let ok = self.sync_and_cut();
        self.answer(ok);
    }

    async fn on_events(&mut self, events: Vec<Event>) {
        for ev in events {
            match ev {
                Event::Put(kv) => self.apply_kv(&kv.key, Some(&kv.value)),
                Event::Delete { key, .. } => self.apply_kv(&key, None),
            }
        }
        let ok = self.sync_and_cut();
        self.answer(ok);
    }

    async fn on_inputs(&mut self, inputs: Vec<Input>) {
        for i in inputs {
            match i {
                Input::Admit {
                    ip,
                    pod,
                    reply,
                    until,
                } => {
                    self.engine.set_local(ip, Some(pod.clone()));
                    self.pending.push(Pending {
                        ip,
                        pod,
                        reply,
                        until,
                    });
                }
                Input::Release(ip) => self.engine.set_local(ip, None),
            }
        }
        let ok = self.sync();
        self.answer(ok);
    }

    async fn on_resync(&mut self) {
        if !self.listed {
            return;
        }
        let present = tokio::task::block_in_place(|| {
            self.dp.nft_set_exists(trellis_policy::TABLE, "policed")
        });
        if !matches!(present, Ok(true)) {
            tracing::warn!(
                "policy: table inet {} is missing; loading it again",
                trellis_policy::TABLE
            );
            self.applied = None;
        }
        self.reconcile_local();
        let ok = self.sync();
        self.answer(ok);
    }

    async fn on_housekeeping(&mut self) {
        let ok = if self.applied.is_none() {
            self.sync()
        } else {
            true
        };
        self.answer(ok);
        if self.sweep_due {
            self.sweep();
        }
        if self.counted.elapsed() >= COUNT_EVERY {
            self.count_denials();
        }
    }
}

/// Runs the policy loop until the process ends; `allocations` tells the
/// pods this node holds (at start, and at each listing and resync).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    source: KubeSource,
    allocations: Allocations,
    gate: mpsc::Receiver<Input>,
    view: View,
    log: Option<trellis_policy::LogDenied>,
    resync: Duration,
    dp: Arc<dyn Dataplane>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
) {
    // pods on a bridge reach the forward hook only through br_netfilter
    let blocked = tokio::task::block_in_place(|| {
        dp.sysctl_set("net/bridge/bridge-nf-call-iptables", "1")
    })
    .err()
    .map(|e| {
        let why = format!(
            "bridged traffic cannot be policed on this node (net.bridge.bridge-nf-call-iptables: {e}; is br_netfilter loaded?)"
        );
        tracing::error!("policy: {why}; ADDs are refused");
        why
    });
    let mut engine = Engine::default();
    engine.set_log(log);
    for (ip, pod) in allocations() {
        engine.set_local(ip, Some(pod));
    }
    let mut ctl = PolicyController {
        engine,
        dp,
        metrics: metrics.clone(),
        applied: None,
        view,
        listed: false,
        pending: Vec::new(),
        reported: Default::default(),
        sweep_due: false,
        blocked,
        allocations,
        drops: Default::default(),
        counted: Instant::now(),
    };
    let settings = LoopSettings {
        name: "policy",
        prefix: PREFIX.into(),
        resync_every: resync,
        housekeeping_every: Some(Duration::from_millis(100)),
        health,
        metrics,
        marks_synced: false,
    };
    drive(&source, settings, &mut ctl, Some(gate)).await;
}
