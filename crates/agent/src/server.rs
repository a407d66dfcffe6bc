//! The CNI socket: one thread per connection, one request per connection.

use crate::metrics::Metrics;
use crate::service::CniService;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis_cni::transport::{receive, reply};
use trellis_cni::Response;

/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `path`, refusing to steal the socket of a live agent and removing
/// a stale one left by a crash.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            anyhow::bail!("another agent is serving {}", path.display());
        }
        std::fs::remove_file(path)?;
    }
    Ok(UnixListener::bind(path)?)
}

/// Serves forever; every request is counted and timed in `metrics`.
pub fn serve(listener: UnixListener, service: Arc<CniService>, metrics: Arc<Metrics>) {
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cni accept");
                continue;
            }
        };
        let service = Arc::clone(&service);
        let metrics = Arc::clone(&metrics);
        std::thread::spawn(move || handle(&stream, &service, &metrics));
    }
}

fn handle(stream: &UnixStream, service: &CniService, metrics: &Metrics) {
    let started = Instant::now();
    let timeouts = stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(READ_TIMEOUT)));
    if let Err(e) = timeouts {
        tracing::warn!(error = %e, "cni connection");
        return;
    }
    let (req, fd) = match receive(stream) {
        Ok(r) => r,
        Err(trellis_cni::transport::TransportError::Empty) => {
            tracing::debug!("probe connection");
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cni request refused");
            let err = trellis_cni::CniError::new(
                trellis_cni::error::DECODE_FAILURE,
                format!("agent could not read the request: {e}"),
            );
            let _ = reply(stream, &Response::Error(err));
            return;
        }
    };
    let (cmd, cid, ifname) = (
        req.env.command,
        req.env.container_id.clone(),
        req.env.ifname.clone(),
    );
    let resp = service.handle(req, fd);
    let took = started.elapsed();
    metrics.cni(
        cmd.as_str(),
        match &resp {
            Response::Error(e) => Some(e.code),
            _ => None,
        },
        took,
    );
    match &resp {
        Response::Error(e) => {
            tracing::warn!(command = cmd.as_str(), container = %cid, ifname = %ifname, ?took, code = e.code, error = %e.msg, "failed")
        }
        Response::Added(a) => tracing::info!(
            command = cmd.as_str(), container = %cid, ifname = %ifname, ?took,
            ip = %a.ips.first().map(|i| i.address.to_string()).unwrap_or_default(), "ok"
        ),
        Response::Done => {
            tracing::info!(command = cmd.as_str(), container = %cid, ifname = %ifname, ?took, "ok")
        }
    }
    if let Err(e) = reply(stream, &resp) {
        tracing::warn!(error = %e, "cni reply");
    }
}
