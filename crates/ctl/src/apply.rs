//! `trellisctl apply -f FILE` / `trellisctl delete -f FILE`: BGP resources
//! (Kubernetes-shaped, YAML or JSON) into the datastore. The whole manifest
//! is validated first: one bad document and nothing is written.

use anyhow::Context;
use std::path::Path;
use std::time::Duration;
use trellis_model::bgp::parse_manifest;
use trellis_store::{Datastore, EtcdOptions, EtcdStore};

/// Where the datastore is.
pub struct Target {
    /// etcd endpoints.
    pub endpoints: Vec<String>,
    /// Key prefix.
    pub prefix: String,
}

fn read(file: &Path) -> anyhow::Result<Vec<trellis_model::bgp::Resource>> {
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("read stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?
    };
    parse_manifest(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}

async fn connect(t: &Target) -> anyhow::Result<EtcdStore> {
    Ok(EtcdStore::connect(&EtcdOptions {
        endpoints: t.endpoints.clone(),
        tls: None,
        timeout: Duration::from_secs(5),
    })
    .await?)
}

/// Applies every resource of `file`; prints one line per resource.
pub fn apply(file: &Path, t: &Target) -> anyhow::Result<()> {
    let resources = read(file)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let store = connect(t).await?;
        for r in &resources {
            let key = r.key(&t.prefix);
            store
                .put(&key, r.value(), None)
                .await
                .with_context(|| format!("write {key}"))?;
            println!("{}/{} applied", r.kind(), r.name());
        }
        anyhow::Ok(())
    })
}

/// Deletes every resource named in `file`.
pub fn delete(file: &Path, t: &Target) -> anyhow::Result<()> {
    let resources = read(file)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let store = connect(t).await?;
        for r in &resources {
            let key = r.key(&t.prefix);
            let gone = store
                .delete(&key, None)
                .await
                .with_context(|| format!("delete {key}"))?;
            println!(
                "{}/{} {}",
                r.kind(),
                r.name(),
                if gone { "deleted" } else { "not found" }
            );
        }
        anyhow::Ok(())
    })
}
