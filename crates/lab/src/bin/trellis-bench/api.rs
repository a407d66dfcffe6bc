//! A client of a lab's real API server for the benchmarks: its calls run
//! inside the control-plane namespace, each with a deadline, and creates
//! are retried while the API server is overloaded.

use crate::k8s::within;
use kube::api::{Api, PostParams};
use std::time::Duration;
use trellis_lab::{netns, Lab};

/// A client of the lab's API server in the control-plane namespace: its
/// runtime's workers are created inside that namespace and every call
/// runs on them ([`Writer::run`]), never on the caller's thread (the
/// host's namespace).
pub struct Writer {
    pub rt: tokio::runtime::Runtime,
    pub client: kube::Client,
}

impl Writer {
    pub fn new(lab: &Lab) -> anyhow::Result<Self> {
        let kubeconfig = lab.kubeconfig();
        netns::within(&netns::path(&lab.etcd_ns()), || -> anyhow::Result<Self> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let client = rt.block_on(async {
                trellis_kube::client(&trellis_kube::ClientOptions {
                    kubeconfig: Some(kubeconfig),
                    ..Default::default()
                })
                .await
                .map(|(c, _)| c)
            })?;
            Ok(Self { rt, client })
        })?
    }

    /// Runs `fut` on the runtime's workers (inside the namespace).
    pub fn run<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
    ) -> anyhow::Result<T> {
        self.rt.block_on(self.rt.spawn(fut))?
    }
}

/// Creates `obj`; an API server that does not answer in time (30,000
/// Services saturate it) or asks to slow down is asked again, up to 5
/// times with a growing pause; "already exists" after a retry means an
/// earlier attempt landed.
pub async fn create<K>(api: &Api<K>, obj: &K, what: &str) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let mut pause = Duration::from_millis(500);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match within(
            format!("create {what}"),
            api.create(&PostParams::default(), obj),
        )
        .await
        {
            Ok(_) => return Ok(()),
            Err(e) => {
                let code = e.downcast_ref::<kube::Error>().and_then(|k| match k {
                    kube::Error::Api(s) => Some(s.code),
                    _ => None,
                });
                if attempt > 1 && code == Some(409) {
                    return Ok(());
                }
                let transient = code.is_none_or(|c| c == 429 || c >= 500);
                if !transient || attempt == 5 {
                    return Err(e);
                }
                eprintln!("{e:#}; again in {pause:?}");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
        }
    }
}
