//! `trellisctl apply -f` / `delete -f` / `get`: the BGP resources
//! (Kubernetes-shaped, YAML or JSON) in either datastore — etcd keys under
//! `<prefix>bgp/`, or the project's custom resources through the API
//! server in Kubernetes mode. A manifest is validated whole first: one bad
//! document and nothing is written.

use anyhow::Context;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use std::path::Path;
use std::time::Duration;
use trellis_model::bgp::{bgp_prefix, from_stored, kind_of_dir, parse_manifest, Resource};
use trellis_store::{Datastore, EtcdOptions, EtcdStore};

/// One API call or etcd request may take this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// The field manager of server-side apply.
const MANAGER: &str = "trellisctl";

/// Where the resources live.
pub enum Target {
    /// etcd endpoints and the cluster's key prefix.
    Etcd {
        /// Endpoints.
        endpoints: Vec<String>,
        /// Key prefix.
        prefix: String,
    },
    /// The API server of a Kubernetes-mode cluster.
    Kubernetes(trellis_kube::ClientOptions),
}

/// The kinds, as `get` names them.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// BGPConfiguration.
    #[value(alias = "bgpconfiguration")]
    Bgpconfigurations,
    /// BGPPeer.
    #[value(alias = "bgppeer")]
    Bgppeers,
    /// Node (BGP settings of a node).
    #[value(alias = "node")]
    Nodes,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Self::Bgpconfigurations => "configurations",
            Self::Bgppeers => "peers",
            Self::Nodes => "nodes",
        }
    }

    fn of(r: &Resource) -> Self {
        match r {
            Resource::Configuration(..) => Self::Bgpconfigurations,
            Resource::Peer(..) => Self::Bgppeers,
            Resource::Node(..) => Self::Nodes,
        }
    }

    fn api(self) -> kube::api::ApiResource {
        let (kind, plural, _) = trellis_kube::source::BGP_RESOURCES
            .into_iter()
            .find(|(_, _, dir)| *dir == self.dir())
            .unwrap_or(trellis_kube::source::BGP_RESOURCES[0]);
        trellis_kube::source::custom_resource(kind, plural)
    }
}

/// A connected datastore.
enum Store {
    Etcd(Box<EtcdStore>, String),
    Kube(kube::Client, String),
}

async fn within<T>(
    what: &str,
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .map_err(|_| anyhow::anyhow!("{what}: no answer within {CALL_TIMEOUT:?}"))?
}

impl Store {
    async fn connect(t: &Target) -> anyhow::Result<Self> {
        match t {
            Target::Etcd { endpoints, prefix } => {
                let s = EtcdStore::connect(&EtcdOptions {
                    endpoints: endpoints.clone(),
                    tls: None,
                    timeout: Duration::from_secs(5),
                })
                .await?;
                Ok(Self::Etcd(Box::new(s), prefix.clone()))
            }
            Target::Kubernetes(opts) => {
                let (client, server) = trellis_kube::client(opts).await?;
                Ok(Self::Kube(client, server))
            }
        }
    }

    fn api(client: &kube::Client, kind: Kind) -> Api<DynamicObject> {
        Api::all_with(client.clone(), &kind.api())
    }

    async fn put(&self, r: &Resource) -> anyhow::Result<()> {
        match self {
            Self::Etcd(s, prefix) => {
                let key = r.key(prefix);
                within(&key, async {
                    s.put(&key, r.value(), None)
                        .await
                        .with_context(|| format!("write {key}"))
                })
                .await
            }
            Self::Kube(c, server) => {
                let what = format!("apply {}/{} at {server}", r.kind(), r.name());
                let pp = PatchParams::apply(MANAGER).force();
                within(&what, async {
                    Self::api(c, Kind::of(r))
                        .patch(r.name(), &pp, &Patch::Apply(r.manifest()))
                        .await
                        .map(drop)
                        .map_err(|e| anyhow::anyhow!("{what}: {}", refusal(&e)))
                })
                .await
            }
        }
    }

    /// `false` when it was not there.
    async fn delete(&self, r: &Resource) -> anyhow::Result<bool> {
        match self {
            Self::Etcd(s, prefix) => {
                let key = r.key(prefix);
                within(&key, async {
                    s.delete(&key, None)
                        .await
                        .with_context(|| format!("delete {key}"))
                })
                .await
            }
            Self::Kube(c, server) => {
                let what = format!("delete {}/{} at {server}", r.kind(), r.name());
                within(&what, async {
                    match Self::api(c, Kind::of(r))
                        .delete(r.name(), &DeleteParams::default())
                        .await
                    {
                        Ok(_) => Ok(true),
                        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
                        Err(e) => Err(anyhow::anyhow!("{what}: {}", refusal(&e))),
                    }
                })
                .await
            }
        }
    }

    /// Every resource of `kind`, by name; unreadable ones are errors
    /// naming them (a datastore written by hand).
    async fn list(&self, kind: Kind) -> anyhow::Result<Vec<Result<Resource, String>>> {
        match self {
            Self::Etcd(s, prefix) => {
                let dir = format!("{}{}/", bgp_prefix(prefix), kind.dir());
                let l = within(&dir, async {
                    s.list(&dir).await.with_context(|| format!("list {dir}"))
                })
                .await?;
                let k = kind_of_dir(kind.dir()).unwrap_or_default();
                Ok(l.items
                    .iter()
                    .map(|kv| {
                        let name = kv.key.strip_prefix(&dir).unwrap_or(&kv.key);
                        from_stored(k, name, &kv.value).map_err(|e| format!("{}: {e}", kv.key))
                    })
                    .collect())
            }
            Self::Kube(c, server) => {
                let what = format!("list {} at {server}", kind.api().plural);
                let objs = within(&what, async {
                    Self::api(c, kind)
                        .list(&Default::default())
                        .await
                        .map_err(|e| anyhow::anyhow!("{what}: {}", refusal(&e)))
                })
                .await?;
                let k = kind_of_dir(kind.dir()).unwrap_or_default();
                Ok(objs
                    .items
                    .iter()
                    .map(|o| {
                        let name = o.metadata.name.clone().unwrap_or_default();
                        let spec = o.data.get("spec").cloned().unwrap_or_default();
                        let spec = serde_json::to_vec(&spec).unwrap_or_default();
                        from_stored(k, &name, &spec)
                    })
                    .collect())
            }
        }
    }
}

/// What the API server said, without kube's wrapping.
fn refusal(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({})", s.message, s.code),
        e => e.to_string(),
    }
}

fn read(file: &Path) -> anyhow::Result<Vec<Resource>> {
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("read stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?
    };
    parse_manifest(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Applies every resource of `file`; prints one line per resource.
pub fn apply(file: &Path, t: &Target) -> anyhow::Result<()> {
    let resources = read(file)?;
    runtime()?.block_on(async {
        let store = Store::connect(t).await?;
        for r in &resources {
            store.put(r).await?;
            println!("{}/{} applied", r.kind(), r.name());
        }
        anyhow::Ok(())
    })
}

/// Deletes every resource named in `file`.
pub fn delete(file: &Path, t: &Target) -> anyhow::Result<()> {
    let resources = read(file)?;
    runtime()?.block_on(async {
        let store = Store::connect(t).await?;
        for r in &resources {
            let gone = store.delete(r).await?;
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

/// The resources of `kind` (only `name` when given), sorted by name.
/// Unreadable stored resources are reported on stderr and skipped.
pub fn get(kind: Kind, name: Option<&str>, t: &Target) -> anyhow::Result<Vec<Resource>> {
    let all = runtime()?.block_on(async { Store::connect(t).await?.list(kind).await })?;
    let mut out = Vec::new();
    for r in all {
        match r {
            Ok(r) if name.is_none_or(|n| n == r.name()) => out.push(r),
            Ok(_) => {}
            Err(e) => eprintln!("skipped: {e}"),
        }
    }
    out.sort_by(|a, b| a.name().cmp(b.name()));
    if let (Some(n), true) = (name, out.is_empty()) {
        anyhow::bail!("{} {n:?} not found", kind.api().plural);
    }
    Ok(out)
}

/// The readable table of `get`.
pub fn render(kind: Kind, rs: &[Resource]) -> String {
    use crate::status::opt;
    let (cols, rows): (&[&str], Vec<Vec<String>>) = match kind {
        Kind::Bgpconfigurations => (
            &["NAME", "AS", "MESH", "HOLD", "RESTART", "MAX-PREFIXES"],
            rs.iter()
                .filter_map(|r| match r {
                    Resource::Configuration(n, c) => Some(vec![
                        n.clone(),
                        c.as_number.to_string(),
                        c.node_to_node_mesh_enabled.to_string(),
                        c.hold_time_seconds.to_string(),
                        c.graceful_restart_seconds.to_string(),
                        c.max_prefixes.to_string(),
                    ]),
                    _ => None,
                })
                .collect(),
        ),
        Kind::Bgppeers => (
            &[
                "NAME",
                "PEER",
                "AS",
                "NODE",
                "NODE-SUBNET",
                "MD5",
                "MULTIHOP",
            ],
            rs.iter()
                .filter_map(|r| match r {
                    Resource::Peer(n, p) => Some(vec![
                        n.clone(),
                        p.peer_ip.to_string(),
                        p.as_number.to_string(),
                        opt(&p.node),
                        opt(&p.node_subnet),
                        if p.password.is_some() { "yes" } else { "no" }.into(),
                        p.multihop.to_string(),
                    ]),
                    _ => None,
                })
                .collect(),
        ),
        Kind::Nodes => (
            &["NAME", "AS", "RR-CLUSTER-ID"],
            rs.iter()
                .filter_map(|r| match r {
                    Resource::Node(n, s) => Some(vec![
                        n.clone(),
                        opt(&s.bgp.as_number),
                        opt(&s.bgp.route_reflector_cluster_id),
                    ]),
                    _ => None,
                })
                .collect(),
        ),
    };
    let mut out = String::new();
    let widths: Vec<usize> = (0..cols.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([cols[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let l: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", l.join("  ").trim_end())
    };
    out.push_str(&line(cols.iter().map(|c| c.to_string()).collect()));
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

/// The documents of `get -o yaml|json`: a manifest `apply -f` takes back.
pub fn manifests(rs: &[Resource]) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": rs.iter().map(Resource::manifest).collect::<Vec<_>>(),
    })
}
