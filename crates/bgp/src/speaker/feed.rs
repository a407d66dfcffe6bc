//! Best-path changes from the core to whoever installs them, without an
//! unbounded queue and without ever blocking the core: changes coalesce
//! per prefix (only the latest state of a prefix matters), so the buffer
//! holds at most one entry per prefix in the RIB, plus one End-of-RIB per
//! peer. The reader takes everything pending in one batch.

use super::RouteEvent;
use ipnet::IpNet;
use rustc_hash::FxHashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

#[derive(Default)]
struct Pending {
    /// prefix -> Some((next hop, peer)) for a best path, None for gone;
    /// with the order of first change, so batches keep a stable order.
    changes: FxHashMap<IpNet, (u64, Option<(IpAddr, IpAddr)>)>,
    seq: u64,
    end_of_rib: Vec<IpAddr>,
    closed: bool,
}

#[derive(Default)]
struct Inner {
    pending: Mutex<Pending>,
    notify: Notify,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The reading end, handed out by [`super::Speaker::start`].
pub struct RouteFeed {
    inner: Arc<Inner>,
}

/// The core's writing end; dropping it ends the feed.
pub(crate) struct FeedTx {
    inner: Arc<Inner>,
}

/// A pair of ends.
pub(crate) fn feed() -> (FeedTx, RouteFeed) {
    let inner = Arc::new(Inner::default());
    (
        FeedTx {
            inner: inner.clone(),
        },
        RouteFeed { inner },
    )
}

impl FeedTx {
    /// Adds changes; never blocks.
    pub(crate) fn push(&self, events: Vec<RouteEvent>) {
        if events.is_empty() {
            return;
        }
        {
            let mut p = self.inner.lock();
            for ev in events {
                match ev {
                    RouteEvent::Best {
                        prefix,
                        next_hop,
                        peer,
                    } => p.set(prefix, Some((next_hop, peer))),
                    RouteEvent::Gone { prefix } => p.set(prefix, None),
                    RouteEvent::EndOfRib { peer } => {
                        if !p.end_of_rib.contains(&peer) {
                            p.end_of_rib.push(peer);
                        }
                    }
                }
            }
        }
        self.inner.notify.notify_one();
    }
}

impl Pending {
    fn set(&mut self, prefix: IpNet, v: Option<(IpAddr, IpAddr)>) {
        self.seq += 1;
        let seq = self.seq;
        self.changes
            .entry(prefix)
            .and_modify(|e| e.1 = v)
            .or_insert((seq, v));
    }

    /// Everything pending: route changes first, then End-of-RIBs (so an
    /// End-of-RIB never overtakes the routes that came before it).
    fn take(&mut self) -> Vec<RouteEvent> {
        let mut changes: Vec<_> = self.changes.drain().collect();
        changes.sort_unstable_by_key(|(_, (seq, _))| *seq);
        let mut out: Vec<RouteEvent> = changes
            .into_iter()
            .map(|(prefix, (_, v))| match v {
                Some((next_hop, peer)) => RouteEvent::Best {
                    prefix,
                    next_hop,
                    peer,
                },
                None => RouteEvent::Gone { prefix },
            })
            .collect();
        out.extend(
            self.end_of_rib
                .drain(..)
                .map(|peer| RouteEvent::EndOfRib { peer }),
        );
        out
    }
}

impl Drop for FeedTx {
    fn drop(&mut self) {
        self.inner.lock().closed = true;
        self.inner.notify.notify_one();
    }
}

/// The feed is empty right now (and still open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Empty;

impl RouteFeed {
    /// Waits for changes and takes all of them; `None` once the speaker
    /// stopped and everything was taken.
    pub async fn recv(&mut self) -> Option<Vec<RouteEvent>> {
        loop {
            {
                let mut p = self.inner.lock();
                if !p.changes.is_empty() || !p.end_of_rib.is_empty() {
                    return Some(p.take());
                }
                if p.closed {
                    return None;
                }
            }
            self.inner.notify.notified().await;
        }
    }

    /// Takes what is pending now without waiting.
    pub fn try_recv(&mut self) -> Result<Vec<RouteEvent>, Empty> {
        let mut p = self.inner.lock();
        if p.changes.is_empty() && p.end_of_rib.is_empty() {
            return Err(Empty);
        }
        Ok(p.take())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[tokio::test]
    async fn coalesces_per_prefix_keeps_order_and_closes() {
        let (tx, mut rx) = feed();
        let peer = ip("192.0.2.1");
        for i in 0..1000u32 {
            // many flaps of one prefix hold one entry: the latest
            tx.push(vec![RouteEvent::Best {
                prefix: net("10.0.1.0/24"),
                next_hop: ip(&format!("192.0.2.{}", i % 200 + 1)),
                peer,
            }]);
        }
        tx.push(vec![
            RouteEvent::Best {
                prefix: net("10.0.2.0/24"),
                next_hop: peer,
                peer,
            },
            RouteEvent::EndOfRib { peer },
            RouteEvent::Gone {
                prefix: net("10.0.1.0/24"),
            },
            RouteEvent::EndOfRib { peer },
        ]);
        let got = rx.recv().await.expect("batch");
        assert_eq!(
            got,
            vec![
                RouteEvent::Gone {
                    prefix: net("10.0.1.0/24")
                },
                RouteEvent::Best {
                    prefix: net("10.0.2.0/24"),
                    next_hop: peer,
                    peer
                },
                RouteEvent::EndOfRib { peer },
            ]
        );
        assert_eq!(rx.try_recv(), Err(Empty));
        drop(tx);
        assert_eq!(rx.recv().await, None);
    }
}
