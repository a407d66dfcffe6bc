//! Values moving through the [`crate::Datastore`] trait.

/// A lease id.
pub type LeaseId = i64;

/// A stored key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// Full key.
    pub key: String,
    /// Value bytes (JSON for trellis objects).
    pub value: Vec<u8>,
    /// Revision that created it.
    pub create_revision: i64,
    /// Revision of its last change (the compare-and-swap token).
    pub mod_revision: i64,
    /// Lease holding it, 0 if none.
    pub lease: LeaseId,
}

/// A listing and the revision it was taken at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// Keys, sorted.
    pub items: Vec<KeyValue>,
    /// Store revision; watch from here to see what comes next.
    pub revision: i64,
}

/// One change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Created or changed.
    Put(KeyValue),
    /// Deleted (or its lease expired).
    Delete {
        /// The key.
        key: String,
        /// Revision of the deletion.
        mod_revision: i64,
    },
}

/// What a watch delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchItem {
    /// Changes, in revision order.
    Events(Vec<Event>),
    /// The watch fell behind a compaction (or reconnected past one): here is
    /// the whole prefix again; replace what you had.
    Resync(Listing),
}

/// Datastore failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No endpoint answered (the message names them).
    #[error("datastore unreachable at {endpoints}: {reason}")]
    Unreachable {
        /// Endpoints tried.
        endpoints: String,
        /// Why.
        reason: String,
    },
    /// The lease expired or was revoked.
    #[error("lease {0:x} is gone (expired or revoked)")]
    LeaseGone(LeaseId),
    /// TLS files could not be read or used.
    #[error("datastore tls: {0}")]
    Tls(String),
    /// The object (a lease) does not exist.
    #[error("datastore: not found")]
    NotFound,
    /// Any other error the datastore reported.
    #[error("datastore: {0}")]
    Other(String),
}
