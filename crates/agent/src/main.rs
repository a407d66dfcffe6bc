//! `trellisd --config FILE`: the node agent.

use anyhow::Context;
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use trellis_agent::cluster::{self, ClusterView};
use trellis_agent::{server, AgentConfig, CniService};
use trellis_dataplane::{Dataplane, LinuxDataplane};

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
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TRELLIS_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let cfg = AgentConfig::load(&args.config)?;
    if args.decommission {
        return decommission(&cfg);
    }
    // signals are taken by one thread; block them before any other starts
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block()?;

    let dp: Arc<dyn Dataplane> = Arc::new(LinuxDataplane::new());
    dp.sysctl_set("net/ipv4/ip_forward", "1")
        .context("enable IPv4 forwarding in the node's namespace")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let view = Arc::new(Mutex::new(ClusterView::default()));
    // the node's subnet: leased from the datastore, or set in the config
    let mut facts = trellis_agent::status::NodeFacts {
        node: cfg.node_name.clone(),
        subnet: String::new(),
        backend: None,
        mtu: 0,
        public_ip: cfg.public_ip.map(|i| i.to_string()),
    };
    let (subnet, mtu) = match cfg.etcd {
        Some(_) => {
            let (store, joined) = runtime.block_on(async {
                let store = cluster::connect(&cfg).await?;
                let joined = cluster::join(&store, &cfg, dp.as_ref()).await?;
                anyhow::Ok((store, joined))
            })?;
            tracing::info!(
                subnet = %joined.lease.subnet, backend = joined.cfg.backend.kind.as_str(),
                mtu = joined.pod_mtu, underlay = %joined.local.underlay_dev, "joined the cluster"
            );
            let (subnet, mtu) = (ipnet::IpNet::V4(joined.lease.subnet), joined.pod_mtu);
            facts.backend = Some(joined.cfg.backend.kind.as_str().into());
            runtime.spawn(cluster::run(
                store,
                cfg.clone(),
                joined,
                dp.clone(),
                view.clone(),
            ));
            (subnet, mtu)
        }
        None => (
            cfg.subnet.context("no subnet configured")?,
            cfg.mtu.unwrap_or(1500),
        ),
    };
    let socket = cfg.socket.clone();
    let service =
        Arc::new(CniService::new(cfg.clone(), subnet, mtu, dp.clone()).context("open IPAM state")?);
    facts.subnet = subnet.to_string();
    facts.mtu = mtu;
    trellis_agent::status::serve(
        &cfg.status_socket,
        trellis_agent::status::StatusSource {
            facts,
            view,
            dp,
            service: service.clone(),
        },
    )?;
    let listener = server::bind(&socket)?;
    tracing::info!(
        node = %cfg.node_name, %subnet, mtu, socket = %socket.display(),
        allocations = service.allocations().len(), "trellisd ready"
    );
    std::thread::spawn(move || server::serve(listener, service));
    let sig = signals.wait()?;
    tracing::info!("{sig:?}: shutting down");
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&cfg.status_socket);
    Ok(())
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
