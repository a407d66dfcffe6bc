//! The Kubernetes API as trellis's datastore: a client from a kubeconfig
//! or the pod's service account (always at an explicit API server
//! address: trellis is the Service proxy, so it cannot rely on the
//! `kubernetes` ClusterIP), the Node <-> node record mapping, and a
//! [`trellis_store::Source`] over watches for the agent's loop.

pub mod backoff;
pub mod node;
mod packed;
pub mod requests;
mod resume;
pub mod snapshot;
pub mod source;

pub use source::{KubeSource, Reporter};

use anyhow::Context;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use std::path::Path;
use std::time::Duration;

/// The project's API group (custom resources).
pub const GROUP: &str = "trellis.dev";
/// Its version.
pub const VERSION: &str = "v1";

/// Where the pod's service account lives (in-cluster).
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// How to reach the API server.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// A kubeconfig file; without one, the pod's service account.
    pub kubeconfig: Option<std::path::PathBuf>,
    /// The API server's address (`https://IP:PORT`); overrides the
    /// kubeconfig's. Required in-cluster.
    pub server: Option<String>,
    /// Told the verb of every request sent.
    pub on_request: Option<requests::RequestHook>,
}

/// A client as `opts` say. Socket writes time out after 10 s, connects
/// after 5 s; watches keep kube's long read timeout.
pub async fn client(opts: &ClientOptions) -> anyhow::Result<(Client, String)> {
    let mut cfg = match &opts.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("read kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => {
            let server = opts.server.as_deref().context(
                "kubernetes.server is not set: in a pod the agent needs the API server's \
                 address (it must not depend on the kubernetes Service, which it proxies)",
            )?;
            let dir = Path::new(SERVICE_ACCOUNT_DIR);
            let (ca, token) = (dir.join("ca.crt"), dir.join("token"));
            for f in [&ca, &token] {
                anyhow::ensure!(
                    f.exists(),
                    "{} is missing: no kubeconfig given and no service account mounted",
                    f.display()
                );
            }
            // the service account as a kubeconfig, so kube loads the CA
            // and re-reads the rotating token the usual way
            let kc = serde_json::json!({
                "apiVersion": "v1", "kind": "Config", "current-context": "sa",
                "clusters": [{"name": "sa", "cluster": {
                    "server": server, "certificate-authority": ca}}],
                "users": [{"name": "sa", "user": {"tokenFile": token}}],
                "contexts": [{"name": "sa", "context": {"cluster": "sa", "user": "sa"}}],
            });
            let kc = Kubeconfig::from_yaml(&kc.to_string()).context("service account config")?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .context("service account config")?
        }
    };
    if let Some(server) = &opts.server {
        cfg.cluster_url = server
            .parse()
            .with_context(|| format!("kubernetes.server {server:?}"))?;
    }
    cfg.connect_timeout = Some(Duration::from_secs(5));
    cfg.write_timeout = Some(Duration::from_secs(10));
    let server = cfg.cluster_url.to_string();
    let builder =
        kube::client::ClientBuilder::try_from(cfg).context("build the Kubernetes client")?;
    let client = match opts.on_request.clone() {
        None => builder.build(),
        Some(hook) => builder
            .with_layer(&tower::util::MapRequestLayer::new(
                move |req: http::Request<kube::client::Body>| {
                    let apply = req
                        .headers()
                        .get(http::header::CONTENT_TYPE)
                        .is_some_and(|v| v.as_bytes().starts_with(b"application/apply-patch"));
                    (hook.0)(requests::verb(
                        req.method(),
                        req.uri().path(),
                        req.uri().query(),
                        apply,
                    ));
                    req
                },
            ))
            .build(),
    };
    Ok((client, server))
}
