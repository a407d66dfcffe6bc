//! `trellisd --config FILE`: the node agent.

use anyhow::Context;
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use trellis_agent::cluster::{self, ClusterView, Shared};
use trellis_agent::health::{Exit, Health};
use trellis_agent::metrics::Metrics;
use trellis_agent::{server, AgentConfig, CniService};
use trellis_cni::config::AttachMode;
use trellis_dataplane::{Dataplane, LinuxDataplane};
use trellis_model::netconf::BackendType;

/// Log line format.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (fields as keys).
    Json,
}

/// The trellis node agent.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Agent config file (JSON).
    #[arg(long, default_value = "/etc/trellis/trellisd.json")]
    config: PathBuf,
    /// Release this node's subnet in the datastore and exit (run after the
    /// agent stopped, when the node leaves the cluster for good).
    #[arg(long)]
    decommission: bool,
    /// This node's AS with the bgp backend (a `Node` resource overrides it).
    #[arg(long, value_name = "AS")]
    bgp_as: Option<u32>,
    /// Make this node a BGP route reflector with this cluster id.
    #[arg(long, value_name = "IPV4")]
    bgp_route_reflector_cluster_id: Option<std::net::Ipv4Addr>,
    /// Log format (level filter: the TRELLIS_LOG variable, default info).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

/// Two malloc arenas instead of glibc's 8 per core: the agent's threads
/// mostly wait, and every arena keeps its own freed memory (RSS).
/// `MALLOC_ARENA_MAX` in the environment still wins.
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: called first in main, before any other thread exists
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

fn main() -> anyhow::Result<()> {
    limit_malloc_arenas();
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRELLIS_LOG")
        .unwrap_or_else(|_| "info".into());
    // colours only on a terminal: log files and journals get plain text
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let mut cfg = AgentConfig::load(&args.config)?;
    if args.bgp_as.is_some() || args.bgp_route_reflector_cluster_id.is_some() {
        let b = cfg.bgp.get_or_insert_with(Default::default);
        if let Some(a) = args.bgp_as {
            trellis_agent::config::check_asn("--bgp-as", a).map_err(anyhow::Error::msg)?;
        }
        b.as_number = args.bgp_as.or(b.as_number);
        b.route_reflector_cluster_id = args
            .bgp_route_reflector_cluster_id
            .or(b.route_reflector_cluster_id);
    }
    if args.decommission {
        return decommission(&cfg);
    }
    // signals are taken by one thread; block them before any other starts
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block()?;

    let dp: Arc<dyn Dataplane> = Arc::new(LinuxDataplane::with_sysctl_dir(&cfg.sysctl_dir));
    dp.sysctl_set("net/ipv4/ip_forward", "1").with_context(|| {
        format!(
            "enable IPv4 forwarding in the node's namespace (under sysctlDir {}; in a \
             container /proc/sys is read-only: mount the host's /proc/sys/net at \
             SYSCTLDIR/net, as the DaemonSet does at /host/proc/sys/net)",
            cfg.sysctl_dir.display()
        )
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let view = Arc::new(Mutex::new(ClusterView::default()));
    let (health, exit) = Health::new();
    let health = Arc::new(health);
    // signals end the agent cleanly, also while it still waits to join
    // (API server, podCIDR): then nothing is served yet and it exits at
    // once; a fatal condition ends it non-zero
    let on_signal = health.clone();
    std::thread::spawn(move || match signals.wait() {
        Ok(sig) if !on_signal.cni_is_up() => {
            tracing::info!(signal = ?sig, "stopped before serving");
            // the proxy may already be syncing: its journal stays usable
            let _quiet = trellis_agent::proxy::quiesce(std::time::Duration::from_secs(3));
            std::process::exit(0)
        }
        Ok(sig) => on_signal.send(Exit::Signal(format!("{sig:?}"))),
        Err(e) => on_signal.send(Exit::Fatal(format!("waiting for signals: {e}"))),
    });
    let metrics = Arc::new(Metrics::new());
    let policy_view = trellis_agent::policy::View::default();
    let denials = trellis_agent::policy_log::Denials::default();
    // /healthz answers from the start; /readyz says what is missing
    let http = trellis_agent::http::serve(
        cfg.http_address,
        trellis_agent::http::HttpState {
            health: health.clone(),
            metrics: metrics.clone(),
            policy: policy_view.clone(),
            denials: denials.clone(),
        },
    )?;
    tracing::info!(address = %http, "serving /healthz, /readyz and /metrics");
    // the proxy tells the BGP speaker which Service addresses it serves
    // with local endpoints
    let (service_addrs_tx, service_addrs) = tokio::sync::watch::channel(Default::default());
    let shared = Shared {
        dp: dp.clone(),
        view: view.clone(),
        health: health.clone(),
        metrics: metrics.clone(),
        service_addrs,
    };
    // the node's subnet: leased from the datastore, or set in the config
    let mut facts = trellis_agent::status::NodeFacts {
        node: cfg.node_name.clone(),
        subnet: String::new(),
        backend: None,
        mtu: 0,
        public_ip: cfg.public_ip.map(|i| i.to_string()),
    };
    let mut local_pods = None;
    // saved at a clean stop: the next start resumes its watches
    let mut kube_source: Option<(trellis_kube::KubeSource, String)> = None;
    let mut proxy_status = None;
    let mut policy_source: Option<trellis_kube::KubeSource> = None;
    let mut policy_log: Option<trellis_policy::LogDenied> = None;
    let (subnet, mtu) = match (cfg.etcd.clone(), cfg.kubernetes.clone()) {
        (Some(etcd), _) => {
            let prefix = etcd.prefix.clone();
            let (store, joined, lease) = runtime.block_on(async {
                let store = cluster::connect(&cfg).await?;
                let (joined, lease) = cluster::join(&store, &cfg, dp.as_ref()).await?;
                anyhow::Ok((store, joined, lease))
            })?;
            let _rt = runtime.enter();
            cluster::hold_lease(&store, &cfg, &joined, lease, &shared);
            start_backend(
                &runtime, store, prefix, &mut cfg, joined, &shared, &mut facts,
            )
        }
        (None, Some(k)) => {
            let kj = runtime.block_on(trellis_agent::kube::join(
                &cfg,
                &k,
                dp.as_ref(),
                &health,
                &metrics,
            ))?;
            let policy =
                runtime.block_on(trellis_agent::kube::policy_watches(&kj, k.policy.enabled));
            let _rt = runtime.enter();
            let proxy_on = k.proxy.enabled;
            let (source, pods) =
                trellis_agent::kube::source(&kj, health.clone(), proxy_on, policy, &cfg.data_dir);
            if policy.is_some() {
                policy_source = Some(source.clone());
                policy_log = match k.policy.log().map_err(anyhow::Error::msg)? {
                    Some(l) => match trellis_agent::policy_log::start(l, denials.clone()) {
                        Ok(()) => {
                            tracing::info!(
                                group = l.group,
                                rate = l.rate,
                                "logging denied packets"
                            );
                            Some(l)
                        }
                        Err(e) => {
                            tracing::error!("policy: denied packets are not logged: {e}");
                            None
                        }
                    },
                    None => None,
                };
            }
            local_pods = Some(pods);
            if proxy_on {
                kube_source = Some((source.clone(), kj.server.clone()));
                let status = trellis_agent::proxy::SharedStatus::default();
                proxy_status = Some(status.clone());
                let node = trellis_proxy::NodeFacts {
                    name: cfg.node_name.clone(),
                    addresses: vec![std::net::IpAddr::V4(kj.joined.local.public_ip)],
                    cluster_cidr: ipnet::IpNet::V4(kj.joined.cfg.network),
                    node_port_range: k.proxy.node_ports().map_err(anyhow::Error::msg)?,
                };
                std::fs::create_dir_all(&cfg.data_dir)?;
                runtime.spawn(trellis_agent::proxy::run(
                    source.clone(),
                    node,
                    cfg.data_dir.clone(),
                    std::time::Duration::from_millis(k.proxy.min_sync_interval_ms),
                    std::time::Duration::from_secs(cfg.resync_seconds),
                    dp.clone(),
                    health.clone(),
                    metrics.clone(),
                    status,
                    service_addrs_tx,
                ));
            }
            runtime.spawn(trellis_agent::kube::keep_published(
                kj.client.clone(),
                kj.joined.clone(),
                health.clone(),
            ));
            let prefix = trellis_agent::kube::PREFIX.to_string();
            start_backend(
                &runtime, source, prefix, &mut cfg, kj.joined, &shared, &mut facts,
            )
        }
        (None, None) => {
            // no datastore: nothing to sync with
            health.set_synced();
            (
                cfg.subnet.context("no subnet configured")?,
                cfg.mtu.unwrap_or(1500),
            )
        }
    };
    health.set_joined();
    let socket = cfg.socket.clone();
    let service = CniService::new(cfg.clone(), subnet, mtu, dp.clone())
        .context("open IPAM state")?
        .with_health(health.clone());
    let (service, policy) = match policy_source {
        Some(source) => {
            let (gate, rx) = trellis_agent::policy::Gate::new();
            (service.with_policy(gate), Some((source, rx)))
        }
        None => (service, None),
    };
    let service = Arc::new(service);
    match policy {
        Some((source, rx)) => {
            // the pods this node holds are policed from the first load on
            let svc = service.clone();
            let allocations: trellis_agent::policy::Allocations =
                Arc::new(move || svc.local_pods());
            runtime.spawn(trellis_agent::policy::run(
                source,
                allocations,
                rx,
                policy_view,
                policy_log,
                std::time::Duration::from_secs(cfg.resync_seconds),
                dp.clone(),
                health.clone(),
                metrics.clone(),
            ));
        }
        None => {
            // policy off: a table an earlier run left must not go on
            // enforcing stale profiles
            let gone = format!(
                "table inet {t} {{}}\ndelete table inet {t}\n",
                t = trellis_policy::TABLE
            );
            if let Err(e) = dp.nft_apply(&gone) {
                tracing::warn!(error = %e, "policy is off; cannot remove table inet {}", trellis_policy::TABLE);
            }
        }
    }
    facts.subnet = subnet.to_string();
    facts.mtu = mtu;
    trellis_agent::status::serve(
        &cfg.status_socket,
        trellis_agent::status::StatusSource {
            facts,
            view,
            dp,
            service: service.clone(),
            health: health.clone(),
            pods: local_pods,
            proxy: proxy_status,
        },
    )?;
    let listener = server::bind(&socket)?;
    tracing::info!(
        node = %cfg.node_name, %subnet, mtu, socket = %socket.display(),
        allocations = service.allocations().len(), "trellisd ready"
    );
    let cni_metrics = metrics.clone();
    std::thread::spawn(move || server::serve(listener, service, cni_metrics));
    health.set_cni_up();
    let why = exit
        .recv()
        .unwrap_or_else(|_| Exit::Fatal("exit channel closed".into()));
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&cfg.status_socket);
    // exit right here: dropping the runtime would wait for whatever a
    // worker is blocked in
    match why {
        Exit::Signal(sig) => {
            tracing::info!(signal = %sig, "shutting down");
            // a sync under way ends first: the journal stays usable
            let quiet = trellis_agent::proxy::quiesce(std::time::Duration::from_secs(3));
            if quiet.is_none() {
                tracing::warn!("a proxy sync still running after 3 s; stopping anyway");
            }
            if let Some((src, server)) = kube_source {
                let path = trellis_agent::kube::snapshot_path(&cfg.data_dir);
                let identity = trellis_agent::kube::snapshot_identity(&server);
                if let Err(e) = src.save_snapshot(&path, &identity) {
                    tracing::warn!(error = %e, "watch snapshot not saved; the next start lists everything");
                }
            }
            std::process::exit(0)
        }
        Exit::Fatal(msg) => {
            eprintln!("Error: {msg}");
            std::process::exit(1)
        }
    }
}

/// Starts the backend's controller on `source`; returns the node's pod
/// subnet and MTU.
fn start_backend<S: trellis_store::Source>(
    runtime: &tokio::runtime::Runtime,
    source: S,
    prefix: String,
    cfg: &mut AgentConfig,
    joined: cluster::Joined,
    shared: &cluster::Shared,
    facts: &mut trellis_agent::status::NodeFacts,
) -> (ipnet::IpNet, u32) {
    tracing::info!(
        subnet = %joined.subnet, backend = joined.cfg.backend.kind.as_str(),
        mtu = joined.pod_mtu, underlay = %joined.local.underlay_dev, "joined the cluster"
    );
    let out = (ipnet::IpNet::V4(joined.subnet), joined.pod_mtu);
    facts.backend = Some(joined.cfg.backend.kind.as_str().into());
    facts.public_ip = Some(joined.local.public_ip.to_string());
    if joined.cfg.backend.kind == BackendType::Bgp {
        // like Calico: no bridge unless asked for
        cfg.default_mode.get_or_insert(AttachMode::Routed);
        runtime.spawn(trellis_agent::bgp::run(
            source,
            prefix,
            cfg.clone(),
            joined,
            shared.clone(),
        ));
    } else {
        runtime.spawn(trellis_agent::flannel::run(
            source,
            prefix,
            cfg.clone(),
            joined,
            shared.clone(),
        ));
    }
    out
}

fn decommission(cfg: &AgentConfig) -> anyhow::Result<()> {
    let etcd = cfg
        .etcd
        .as_ref()
        .context("--decommission needs an \"etcd\" section in the config")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let freed = rt.block_on(async {
        let store = cluster::connect(cfg).await?;
        anyhow::Ok(trellis_agent::lease::decommission(&store, &etcd.prefix, &cfg.node_name).await?)
    })?;
    let _ = std::fs::remove_file(cfg.data_dir.join("subnet"));
    if freed.is_empty() {
        println!("node {} held no subnet", cfg.node_name);
    }
    for net in freed {
        println!("node {}: released {net}", cfg.node_name);
    }
    Ok(())
}
