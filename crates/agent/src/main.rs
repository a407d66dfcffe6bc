//! `trellisd --config FILE`: the node agent.

use anyhow::Context;
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use std::path::PathBuf;
use std::sync::Arc;
use trellis_agent::{server, AgentConfig, CniService};
use trellis_dataplane::{Dataplane, LinuxDataplane};

/// The trellis node agent.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Agent config file (JSON).
    #[arg(long, default_value = "/etc/trellis/trellisd.json")]
    config: PathBuf,
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
    // signals are taken by one thread; block them before any other starts
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block()?;

    let dp: Arc<dyn Dataplane> = Arc::new(LinuxDataplane::new());
    dp.sysctl_set("net/ipv4/ip_forward", "1")
        .context("enable IPv4 forwarding in the node's namespace")?;
    let socket = cfg.socket.clone();
    let service = Arc::new(CniService::new(cfg.clone(), dp).context("open IPAM state")?);
    let listener = server::bind(&socket)?;
    tracing::info!(
        node = %cfg.node_name, subnet = %cfg.subnet, socket = %socket.display(),
        allocations = service.allocations().len(), "trellisd ready"
    );
    std::thread::spawn(move || server::serve(listener, service));
    let sig = signals.wait()?;
    tracing::info!("{sig:?}: shutting down");
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
