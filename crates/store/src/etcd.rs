//! [`Datastore`] on etcd v3.

use crate::{Datastore, Event, KeyValue, LeaseId, Listing, Result, StoreError, WatchItem};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;

/// Client certificate auth files (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA that signed the server certificates.
    pub ca: PathBuf,
    /// Client certificate.
    pub cert: PathBuf,
    /// Client key.
    pub key: PathBuf,
}

/// How to reach etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdOptions {
    /// `http(s)://host:port` endpoints; any one member is enough.
    pub endpoints: Vec<String>,
    /// TLS with a client certificate.
    pub tls: Option<TlsFiles>,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            tls: None,
            timeout: Duration::from_secs(5),
        }
    }
}

/// etcd v3 behind [`Datastore`].
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: String,
    timeout: Duration,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EtcdStore({})", self.endpoints)
    }
}

fn kv(k: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(k.key()).into_owned(),
        value: k.value().to_vec(),
        create_revision: k.create_revision(),
        mod_revision: k.mod_revision(),
        lease: k.lease(),
    }
}

impl EtcdStore {
    /// Connects (lazily: an unreachable etcd fails the first call, with the
    /// endpoints named, not this one).
    pub async fn connect(opts: &EtcdOptions) -> Result<Self> {
        let endpoints = opts.endpoints.join(",");
        let mut co = ConnectOptions::new()
            .with_connect_timeout(opts.timeout)
            .with_timeout(opts.timeout)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if let Some(t) = &opts.tls {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|e| StoreError::Tls(format!("{}: {e}", p.display())))
            };
            let tls = TlsOptions::new()
                .ca_certificate(Certificate::from_pem(read(&t.ca)?))
                .identity(Identity::from_pem(read(&t.cert)?, read(&t.key)?));
            co = co.with_tls(tls);
        }
        let client = Client::connect(opts.endpoints.clone(), Some(co))
            .await
            .map_err(|e| StoreError::Unreachable {
                endpoints: endpoints.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            client,
            endpoints,
            timeout: opts.timeout,
        })
    }

    fn err(&self, e: etcd_client::Error) -> StoreError {
        match e {
            etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
                StoreError::Unreachable {
                    endpoints: self.endpoints.clone(),
                    reason: e.to_string(),
                }
            }
            etcd_client::Error::GRpcStatus(ref s)
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                ) =>
            {
                StoreError::Unreachable {
                    endpoints: self.endpoints.clone(),
                    reason: s.message().to_string(),
                }
            }
            etcd_client::Error::GRpcStatus(ref s) if s.code() == tonic::Code::NotFound => {
                StoreError::NotFound
            }
            // the keep-alive stream's answer for an expired or revoked lease
            etcd_client::Error::LeaseKeepAliveError(_) => StoreError::NotFound,
            other => StoreError::Other(other.to_string()),
        }
    }

    async fn bounded<T>(
        &self,
        f: impl std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(|e| self.err(e)),
            Err(_) => Err(self.no_answer()),
        }
    }

    fn no_answer(&self) -> StoreError {
        StoreError::Unreachable {
            endpoints: self.endpoints.clone(),
            reason: format!("no answer within {:?}", self.timeout),
        }
    }

    /// Runs one request within the timeout, again (on another channel
    /// endpoint) while retrying is safe: the balanced channel can hand out a
    /// dead endpoint for a while after a member dies, and reads fail while
    /// the members elect a new leader. A write is retried only when it never
    /// left (etcd's own client rule), so a compare-and-swap is never
    /// applied twice.
    async fn retried<T, Fut>(&self, safe: Safety, mut f: impl FnMut(Client) -> Fut) -> Result<T>
    where
        Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            match tokio::time::timeout_at(deadline, f(self.client.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e))
                    if retry_is_safe(safe, &e)
                        && tokio::time::Instant::now() + RETRY_PAUSE < deadline =>
                {
                    tracing::debug!("etcd: {e}; trying another endpoint");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Ok(Err(e)) => return Err(self.err(e)),
                Err(_) => return Err(self.no_answer()),
            }
        }
    }

    async fn transact(&self, txn: Txn) -> Result<bool> {
        Ok(self
            .retried(Safety::Write, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?
            .succeeded())
    }

    fn put_opts(lease: Option<LeaseId>) -> Option<PutOptions> {
        lease.map(|l| PutOptions::new().with_lease(l))
    }
}

const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Whether a request may run twice.
#[derive(Clone, Copy)]
enum Safety {
    /// Reads: retried on any unavailability.
    Read,
    /// Writes: retried only when they cannot have reached a server.
    Write,
}

fn retry_is_safe(safe: Safety, e: &etcd_client::Error) -> bool {
    match (safe, e) {
        (_, etcd_client::Error::TransportError(_)) => true,
        (Safety::Read, etcd_client::Error::GRpcStatus(s)) => s.code() == tonic::Code::Unavailable,
        (Safety::Write, etcd_client::Error::GRpcStatus(s)) => {
            s.code() == tonic::Code::Unavailable && never_connected(s)
        }
        _ => false,
    }
}

/// The request failed while connecting (so it never left): an
/// `std::io::Error` of a connect kind somewhere in the error's sources.
/// Decided by the error's type and kind, never by its text.
fn never_connected(s: &tonic::Status) -> bool {
    use std::io::ErrorKind::*;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ConnectionRefused
                    | HostUnreachable
                    | NetworkUnreachable
                    | AddrNotAvailable
                    | TimedOut
            );
        }
        cur = e.source();
    }
    false
}

impl Datastore for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let resp = self
            .retried(Safety::Read, |mut c| async move { c.get(key, None).await })
            .await?;
        Ok(resp.kvs().first().map(kv))
    }

    async fn list(&self, prefix: &str) -> Result<Listing> {
        let resp = self
            .retried(Safety::Read, |mut c| async move {
                c.get(prefix, Some(GetOptions::new().with_prefix())).await
            })
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        Ok(Listing {
            items: resp.kvs().iter().map(kv).collect(),
            revision,
        })
    }

    async fn create(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<bool> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, Self::put_opts(lease))]);
        self.transact(txn).await
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<()> {
        self.retried(Safety::Write, |mut c| {
            let value = value.clone();
            async move { c.put(key, value, Self::put_opts(lease)).await }
        })
        .await?;
        Ok(())
    }

    async fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        mod_revision: i64,
        lease: Option<LeaseId>,
    ) -> Result<bool> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
            .and_then([TxnOp::put(key, value, Self::put_opts(lease))]);
        self.transact(txn).await
    }

    async fn delete(&self, key: &str, mod_revision: Option<i64>) -> Result<bool> {
        let compare: Vec<Compare> = match mod_revision {
            Some(r) => vec![Compare::mod_revision(key, CompareOp::Equal, r)],
            None => vec![Compare::create_revision(key, CompareOp::Greater, 0)],
        };
        let txn = Txn::new()
            .when(compare)
            .and_then([TxnOp::delete(key, None)]);
        self.transact(txn).await
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId> {
        let secs = ttl.as_secs().max(1) as i64;
        Ok(self
            .retried(Safety::Write, |mut c| async move {
                c.lease_grant(secs, None).await
            })
            .await?
            .id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let gone = |e: StoreError| match e {
            StoreError::NotFound => StoreError::LeaseGone(lease),
            other => other,
        };
        let (mut keeper, mut stream) = self
            .retried(Safety::Write, |mut c| async move {
                c.lease_keep_alive(lease).await
            })
            .await
            .map_err(gone)?;
        self.bounded(keeper.keep_alive()).await.map_err(gone)?;
        match self.bounded(stream.message()).await.map_err(gone)? {
            Some(resp) if resp.ttl() > 0 => Ok(()),
            _ => Err(StoreError::LeaseGone(lease)),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        match self
            .retried(
                Safety::Write,
                |mut c| async move { c.lease_revoke(lease).await },
            )
            .await
        {
            Ok(_) => Ok(()),
            // already expired: the goal is reached
            Err(StoreError::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn watch(&self, prefix: &str, revision: i64) -> Result<mpsc::Receiver<WatchItem>> {
        let (tx, rx) = mpsc::channel(1024);
        let store = self.clone();
        let prefix = prefix.to_string();
        tokio::spawn(async move { store.watch_loop(prefix, revision, tx).await });
        Ok(rx)
    }
}

impl EtcdStore {
    /// Compacts history up to `revision` (operations and tests of the
    /// watch resync).
    pub async fn compact(&self, revision: i64) -> Result<()> {
        self.retried(Safety::Write, |mut c| async move {
            c.compact(revision, None).await
        })
        .await?;
        Ok(())
    }

    /// Runs until the receiver is dropped: watches from `next`, reconnects
    /// after errors, resyncs with a listing after a compaction.
    async fn watch_loop(self, prefix: String, revision: i64, tx: mpsc::Sender<WatchItem>) {
        let mut next = revision + 1;
        loop {
            if tx.is_closed() {
                return;
            }
            let mut c = self.client.clone();
            let opts = WatchOptions::new()
                .with_prefix()
                .with_start_revision(next)
                .with_progress_notify();
            let mut stream = match c.watch(prefix.as_str(), Some(opts)).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!("watch {prefix}: {}; retrying", self.err(e));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            loop {
                let msg = tokio::select! {
                    m = stream.message() => m,
                    () = tx.closed() => return,
                };
                let resp = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!("watch {prefix}: {}; reconnecting", self.err(e));
                        break;
                    }
                };
                if resp.compact_revision() > 0 || (resp.canceled() && resp.compact_revision() > 0) {
                    // we missed events: start over from a fresh listing
                    match self.list(&prefix).await {
                        Ok(listing) => {
                            next = listing.revision + 1;
                            if tx.send(WatchItem::Resync(listing)).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => tracing::warn!("watch {prefix}: resync: {e}"),
                    }
                    break;
                }
                if resp.canceled() {
                    break;
                }
                let events: Vec<Event> = resp
                    .events()
                    .iter()
                    .filter_map(|e| {
                        let k = e.kv()?;
                        next = next.max(k.mod_revision() + 1);
                        Some(match e.event_type() {
                            EventType::Put => Event::Put(kv(k)),
                            EventType::Delete => Event::Delete {
                                key: String::from_utf8_lossy(k.key()).into_owned(),
                                mod_revision: k.mod_revision(),
                            },
                        })
                    })
                    .collect();
                if !events.is_empty() && tx.send(WatchItem::Events(events)).await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[cfg(test)]
mod retry_tests {
    use super::*;
    use std::io::{Error as IoError, ErrorKind};
    use std::sync::Arc;

    fn status(kind: Option<ErrorKind>, text: &str) -> tonic::Status {
        let mut s = tonic::Status::unavailable(text);
        if let Some(k) = kind {
            s.set_source(Arc::new(IoError::new(k, "io")));
        }
        s
    }

    /// A write is retried only when its error's type says it never left:
    /// the words in the message do not count.
    #[test]
    fn writes_retry_on_connect_failures_by_type_not_text() {
        assert!(never_connected(&status(
            Some(ErrorKind::ConnectionRefused),
            "x"
        )));
        assert!(never_connected(&status(
            Some(ErrorKind::HostUnreachable),
            "x"
        )));
        assert!(!never_connected(&status(None, "tcp connect error")));
        assert!(!never_connected(&status(
            Some(ErrorKind::ConnectionReset),
            "connect"
        )));
        let w = |s| retry_is_safe(Safety::Write, &etcd_client::Error::GRpcStatus(s));
        assert!(w(status(Some(ErrorKind::ConnectionRefused), "")));
        assert!(!w(status(Some(ErrorKind::BrokenPipe), "connect")));
        let r = |s| retry_is_safe(Safety::Read, &etcd_client::Error::GRpcStatus(s));
        assert!(r(status(Some(ErrorKind::BrokenPipe), "")));
    }
}
