//! Subnet leases: a node claims a subnet of the cluster network with a
//! compare-and-swap, holds it with a TTL lease it keeps alive, gets the same
//! subnet back after a restart (same node name) and releases it on a clean
//! decommission. Two nodes can never hold one subnet: the claim is an etcd
//! transaction on the key's creation.

use ipnet::Ipv4Net;
use std::collections::HashMap;
use std::time::Duration;
use trellis_model::netconf::ClusterConfig;
use trellis_model::node::{parse_subnet_key, subnet_key, NodeRecord};
use trellis_model::subnet::choose;
use trellis_store::{Datastore, LeaseId, StoreError};

/// A held subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetLease {
    /// The subnet.
    pub subnet: Ipv4Net,
    /// The datastore lease holding it.
    pub lease: LeaseId,
    /// Its key.
    pub key: String,
}

/// Why a claim failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Every subnet of the cluster network is held.
    #[error("cluster network {network} is exhausted: all {capacity} /{len} subnets are leased")]
    Exhausted {
        /// The network.
        network: Ipv4Net,
        /// How many subnets it has.
        capacity: u32,
        /// Subnet length.
        len: u8,
    },
    /// Others kept winning the race for too long.
    #[error("could not claim a subnet after {0} attempts (too much contention)")]
    Contention(usize),
    /// The datastore failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A record could not be encoded.
    #[error("encode node record: {0}")]
    Encode(String),
}

/// Claims a subnet for `record.node` under a fresh lease of `ttl`.
/// `previous` is the subnet this node held before (from local state), tried
/// first when free.
pub async fn claim<D: Datastore>(
    store: &D,
    prefix: &str,
    cfg: &ClusterConfig,
    record: &NodeRecord,
    previous: Option<Ipv4Net>,
    ttl: Duration,
) -> Result<SubnetLease, LeaseError> {
    let lease = store.grant(ttl).await?;
    let attempts = cfg.capacity() as usize + 16;
    for _ in 0..attempts {
        let listing = store.list(&format!("{prefix}subnets/")).await?;
        let mut taken: HashMap<Ipv4Net, String> = HashMap::new();
        let mut mine = None;
        for kv in &listing.items {
            let Some(net) = parse_subnet_key(prefix, &kv.key) else {
                continue;
            };
            let holder = serde_json::from_slice::<NodeRecord>(&kv.value)
                .map(|r| r.node)
                .unwrap_or_default();
            if holder == record.node && mine.is_none() {
                mine = Some((net, kv.mod_revision));
            }
            taken.insert(net, holder);
        }
        let body = |subnet: Ipv4Net| {
            let mut r = record.clone();
            r.subnet = subnet;
            serde_json::to_vec(&r).map_err(|e| LeaseError::Encode(e.to_string()))
        };
        // our own claim from before a restart: take it over under the new lease
        if let Some((net, rev)) = mine {
            let key = subnet_key(prefix, net);
            if store.update(&key, body(net)?, rev, Some(lease)).await? {
                return Ok(SubnetLease {
                    subnet: net,
                    lease,
                    key,
                });
            }
            continue;
        }
        let Some(net) = choose(cfg, &record.node, &taken, previous) else {
            let _ = store.revoke(lease).await;
            return Err(LeaseError::Exhausted {
                network: cfg.network,
                capacity: cfg.capacity(),
                len: cfg.subnet_len,
            });
        };
        let key = subnet_key(prefix, net);
        if store.create(&key, body(net)?, Some(lease)).await? {
            return Ok(SubnetLease {
                subnet: net,
                lease,
                key,
            });
        }
    }
    let _ = store.revoke(lease).await;
    Err(LeaseError::Contention(attempts))
}

/// What claiming a lost subnet again found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reclaim {
    /// The subnet was free (or still ours): held again under a new lease.
    Same(SubnetLease),
    /// Another node holds it now.
    TakenBy(String),
}

/// Claims exactly `subnet` again after this node's lease on it expired:
/// never another subnet, since IPAM, the CNI side and the routes all use
/// this one. [`Reclaim::TakenBy`] when another node got it meanwhile.
pub async fn reclaim_same<D: Datastore>(
    store: &D,
    prefix: &str,
    record: &NodeRecord,
    subnet: Ipv4Net,
    ttl: Duration,
) -> Result<Reclaim, LeaseError> {
    let key = subnet_key(prefix, subnet);
    let mut r = record.clone();
    r.subnet = subnet;
    let body = serde_json::to_vec(&r).map_err(|e| LeaseError::Encode(e.to_string()))?;
    let lease = store.grant(ttl).await?;
    // a few rounds: the key may come and go under us (another node's
    // claim racing ours, an old lease of ours expiring just now)
    for _ in 0..4 {
        let won = match store.get(&key).await? {
            None => store.create(&key, body.clone(), Some(lease)).await?,
            Some(kv) => {
                let holder = serde_json::from_slice::<NodeRecord>(&kv.value)
                    .map(|r| r.node)
                    .unwrap_or_default();
                if holder != record.node {
                    let _ = store.revoke(lease).await;
                    return Ok(Reclaim::TakenBy(if holder.is_empty() {
                        "(unreadable record)".into()
                    } else {
                        holder
                    }));
                }
                store
                    .update(&key, body.clone(), kv.mod_revision, Some(lease))
                    .await?
            }
        };
        if won {
            return Ok(Reclaim::Same(SubnetLease { subnet, lease, key }));
        }
    }
    let _ = store.revoke(lease).await;
    Err(LeaseError::Contention(4))
}

/// Gives the subnet back (clean decommission): the claim disappears at once
/// instead of after the TTL.
pub async fn release<D: Datastore>(store: &D, lease: &SubnetLease) -> Result<(), LeaseError> {
    store.revoke(lease.lease).await?;
    Ok(())
}

/// Releases every claim held by `node` (after its agent stopped): a clean
/// decommission. Returns the subnets freed.
pub async fn decommission<D: Datastore>(
    store: &D,
    prefix: &str,
    node: &str,
) -> Result<Vec<Ipv4Net>, LeaseError> {
    let listing = store.list(&format!("{prefix}subnets/")).await?;
    let mut freed = Vec::new();
    for kv in listing.items {
        let Some(net) = parse_subnet_key(prefix, &kv.key) else {
            continue;
        };
        let holder = serde_json::from_slice::<NodeRecord>(&kv.value)
            .map(|r| r.node)
            .unwrap_or_default();
        if holder != node {
            continue;
        }
        if kv.lease != 0 {
            store.revoke(kv.lease).await?;
        } else {
            store.delete(&kv.key, Some(kv.mod_revision)).await?;
        }
        freed.push(net);
    }
    Ok(freed)
}
