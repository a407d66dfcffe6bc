//! `trellisctl apply -f FILE` / `trellisctl delete -f FILE`: BGP resources
//! (Kubernetes-shaped, YAML or JSON) into the datastore. The whole manifest
//! is validated first: one bad document and nothing is written.

use anyhow::Context;
use std::path::Path;
use std::time::Duration;
use trellis_model::bgp::{parse_manifest, Resource};
use trellis_store::{Datastore, EtcdOptions, EtcdStore};

/// Where the datastore is.
pub struct Target {
    /// etcd endpoints.
    pub endpoints: Vec<String>,
    /// Key prefix.
    pub prefix: String,
}

fn read(file: &Path) -> anyhow::Result<Vec<Resource>> {
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("read stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?
    };
    parse_manifest(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}

/// Reads and validates `file` (nothing is written when it fails), then
/// runs `each` for every resource with the store and the resource's key.
fn for_each(
    file: &Path,
    t: &Target,
    each: impl AsyncFn(&EtcdStore, &Resource, String) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let resources = read(file)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let store = EtcdStore::connect(&EtcdOptions {
            endpoints: t.endpoints.clone(),
            tls: None,
            timeout: Duration::from_secs(5),
        })
        .await?;
        for r in &resources {
            each(&store, r, r.key(&t.prefix)).await?;
        }
        anyhow::Ok(())
    })
}

/// Applies every resource of `file`; prints one line per resource.
pub fn apply(file: &Path, t: &Target) -> anyhow::Result<()> {
    for_each(file, t, async |store, r, key| {
        store
            .put(&key, r.value(), None)
            .await
            .with_context(|| format!("write {key}"))?;
        println!("{}/{} applied", r.kind(), r.name());
        Ok(())
    })
}

/// Deletes every resource named in `file`.
pub fn delete(file: &Path, t: &Target) -> anyhow::Result<()> {
    for_each(file, t, async |store, r, key| {
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
        Ok(())
    })
}
