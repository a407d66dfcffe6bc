//! The cluster's source of truth behind one trait.
//!
//! [`Datastore`] is shaped like the Kubernetes API as much as like etcd:
//! a list returns a revision, a watch starts from a revision and, when it
//! falls behind a compaction, hands back a fresh list ([`WatchItem::Resync`])
//! instead of silently missing events. Writes are compare-and-swap on
//! revisions; liveness is a lease with a TTL. [`EtcdStore`] implements it on
//! etcd v3 (endpoints, TLS with client certificates).

mod etcd;
mod types;

pub use etcd::{EtcdOptions, EtcdStore, TlsFiles};
pub use types::{Event, KeyValue, LeaseId, Listing, StoreError, WatchItem};

use std::future::Future;
use std::time::Duration;
use tokio::sync::mpsc;

/// Result alias.
pub type Result<T> = std::result::Result<T, StoreError>;

/// What the agent's loop reads (DESIGN §4): a listing of a key prefix and
/// a watch from the listing's revision. Every [`Datastore`] is one; the
/// Kubernetes API is one through an adapter that shows Nodes and custom
/// resources in the same key space.
pub trait Source: Send + Sync + 'static {
    /// Every key under `prefix`, with the revision of the listing.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Listing>> + Send;
    /// Changes under `prefix` after `revision`; a closed stream means
    /// "list again".
    fn watch(
        &self,
        prefix: &str,
        revision: i64,
    ) -> impl Future<Output = Result<mpsc::Receiver<WatchItem>>> + Send;
}

impl<D: Datastore> Source for D {
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Listing>> + Send {
        Datastore::list(self, prefix)
    }
    fn watch(
        &self,
        prefix: &str,
        revision: i64,
    ) -> impl Future<Output = Result<mpsc::Receiver<WatchItem>>> + Send {
        Datastore::watch(self, prefix, revision)
    }
}

/// What trellis needs from a datastore.
pub trait Datastore: Send + Sync + 'static {
    /// One key.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>>> + Send;
    /// Every key under `prefix`, with the store revision of the listing.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Listing>> + Send;
    /// Creates `key` only if it does not exist (compare-and-swap on
    /// creation); `false` when someone else holds it.
    fn create(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> impl Future<Output = Result<bool>> + Send;
    /// Writes `key` whatever it holds now.
    fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Replaces `key` only if it is still at `mod_revision`.
    fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        mod_revision: i64,
        lease: Option<LeaseId>,
    ) -> impl Future<Output = Result<bool>> + Send;
    /// Deletes `key`, only if still at `mod_revision` when given.
    fn delete(
        &self,
        key: &str,
        mod_revision: Option<i64>,
    ) -> impl Future<Output = Result<bool>> + Send;
    /// A lease that expires `ttl` after its last keep-alive.
    fn grant(&self, ttl: Duration) -> impl Future<Output = Result<LeaseId>> + Send;
    /// Refreshes a lease once; `Err(LeaseGone)` when it expired.
    fn keep_alive(&self, lease: LeaseId) -> impl Future<Output = Result<()>> + Send;
    /// Ends a lease now, deleting its keys.
    fn revoke(&self, lease: LeaseId) -> impl Future<Output = Result<()>> + Send;
    /// Changes under `prefix` after `revision`, in order. The stream
    /// reconnects by itself; when the revision was compacted away it sends a
    /// [`WatchItem::Resync`] with a fresh listing and goes on from there.
    fn watch(
        &self,
        prefix: &str,
        revision: i64,
    ) -> impl Future<Output = Result<mpsc::Receiver<WatchItem>>> + Send;
}
