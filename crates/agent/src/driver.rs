//! The one loop every controller of the agent runs in (DESIGN §4):
//!
//! ```text
//! list            -> Controller::on_listing   (replace state, repair the kernel)
//! watch events    -> Controller::on_events    (incremental)
//! own input       -> Controller::on_inputs    (e.g. BGP best-path changes, batched)
//! resync timer    -> Controller::on_resync    (repair drift)
//! housekeeping    -> Controller::on_housekeeping (status refresh, retries)
//! ```
//!
//! The driver owns the datastore side: retries with backoff while the
//! datastore is unreachable (the datapath is left as it is), reports the
//! outage once and its end once, counts watch restarts, and marks the node
//! synced after the first full listing. Controllers own their state and
//! reconcilers; they never loop themselves.

use crate::health::Health;
use crate::metrics::Metrics;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use trellis_store::{Event, KeyValue, Source, WatchItem};

/// Most inputs handed to a controller in one call.
pub const INPUT_BATCH: usize = 1024;
/// Most watch events handed to a controller in one call: what queued while
/// it worked goes in one batch (one sync), not one call per event.
pub const EVENT_BATCH: usize = 8192;
/// First wait after a datastore failure; doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Longest wait between datastore attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A datastore outage that goes on is logged again this often.
pub const OUTAGE_REPEAT: Duration = Duration::from_secs(60);

/// A controller plugged into the loop.
pub trait Controller: Send {
    /// Input from a source of its own (not the datastore).
    type Input: Send + 'static;
    /// Every key under the watched prefix: replace what is known, bring
    /// the kernel in line (pruning only what trellis owns).
    fn on_listing(&mut self, items: Vec<KeyValue>) -> impl Future<Output = ()> + Send;
    /// Changes since the listing, in order.
    fn on_events(&mut self, events: Vec<Event>) -> impl Future<Output = ()> + Send;
    /// Inputs from the controller's own channel, batched.
    fn on_inputs(&mut self, inputs: Vec<Self::Input>) -> impl Future<Output = ()> + Send;
    /// The periodic repair against the kernel.
    fn on_resync(&mut self) -> impl Future<Output = ()> + Send;
    /// Called every `housekeeping` period when the loop has one.
    fn on_housekeeping(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// How one loop runs.
pub struct LoopSettings {
    /// For logs: `routing`, `bgp`, ...
    pub name: &'static str,
    /// The watched key prefix.
    pub prefix: String,
    /// Period of `on_resync`.
    pub resync_every: Duration,
    /// Period of `on_housekeeping`, if any.
    pub housekeeping_every: Option<Duration>,
    /// Readiness (synced after the first listing; datastore outages).
    pub health: Arc<Health>,
    /// Watch restarts and datastore errors.
    pub metrics: Arc<Metrics>,
    /// Whether the first listing makes the node ready (the routing loop;
    /// not the proxy, whose readiness is its own).
    pub marks_synced: bool,
}

/// Tracks a datastore outage: logged when it starts, when its reason
/// changes, every [`OUTAGE_REPEAT`] while it lasts, and when it ends.
struct Outage {
    since: Option<Instant>,
    last_logged: Option<(Instant, String)>,
    backoff: Duration,
}

impl Outage {
    fn new() -> Self {
        Self {
            since: None,
            last_logged: None,
            backoff: FIRST_BACKOFF,
        }
    }

    /// Records a failure; returns how long to wait.
    fn failed(&mut self, s: &LoopSettings, what: &str, e: &str) -> Duration {
        let now = Instant::now();
        self.since.get_or_insert(now);
        let msg = format!("{what}: {e}");
        let repeat = match &self.last_logged {
            Some((at, m)) => *m != msg || now.duration_since(*at) >= OUTAGE_REPEAT,
            None => true,
        };
        if repeat {
            tracing::warn!(
                loop_name = s.name,
                error = %msg,
                down_for_s = self.since.map(|t| now.duration_since(t).as_secs()).unwrap_or(0),
                "datastore unreachable; the datapath is left as it is, retrying"
            );
            self.last_logged = Some((now, msg.clone()));
        }
        s.health.set_datastore_error(Some(msg));
        s.metrics.datastore_error();
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        wait
    }

    fn ok(&mut self, s: &LoopSettings) {
        if let Some(since) = self.since.take() {
            tracing::info!(
                loop_name = s.name,
                down_for_ms = since.elapsed().as_millis() as u64,
                "datastore reachable again"
            );
            s.health.set_datastore_error(None);
        }
        self.last_logged = None;
        self.backoff = FIRST_BACKOFF;
    }
}

/// Runs `ctl` until the process ends.
pub async fn drive<D, C>(
    store: &D,
    s: LoopSettings,
    ctl: &mut C,
    mut inputs: Option<mpsc::Receiver<C::Input>>,
) where
    D: Source,
    C: Controller,
{
    let mut outage = Outage::new();
    let mut first = true;
    loop {
        let t0 = tokio::time::Instant::now();
        let listing = match store.list(&s.prefix).await {
            Ok(l) => l,
            Err(e) => {
                let wait = outage.failed(&s, "list", &e.to_string());
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        outage.ok(&s);
        tracing::debug!(
            controller = s.name,
            items = listing.items.len(),
            took_us = t0.elapsed().as_micros() as u64,
            "listed"
        );
        ctl.on_listing(listing.items).await;
        if first {
            if s.marks_synced {
                s.health.set_synced();
            }
            first = false;
        }
        let mut rx = match store.watch(&s.prefix, listing.revision).await {
            Ok(rx) => rx,
            Err(e) => {
                let wait = outage.failed(&s, "watch", &e.to_string());
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        let mut resync = tokio::time::interval(s.resync_every);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.tick().await;
        let mut housekeeping =
            tokio::time::interval(s.housekeeping_every.unwrap_or(Duration::from_secs(3600)));
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                item = rx.recv() => match item {
                    // the watch ended (its connection broke for good): list again
                    None => {
                        s.metrics.watch_restarted();
                        break;
                    }
                    Some(WatchItem::Events(events)) => {
                        let (events, relist) = drain(&mut rx, events);
                        ctl.on_events(events).await;
                        if let Some(l) = relist {
                            s.metrics.watch_restarted();
                            ctl.on_listing(l.items).await
                        }
                    }
                    // the watch fell behind (a compaction, a reconnect past one)
                    Some(WatchItem::Resync(l)) => {
                        s.metrics.watch_restarted();
                        ctl.on_listing(l.items).await
                    }
                },
                batch = next_inputs(&mut inputs) => ctl.on_inputs(batch).await,
                _ = resync.tick() => ctl.on_resync().await,
                _ = housekeeping.tick(), if s.housekeeping_every.is_some() => {
                    ctl.on_housekeeping().await
                }
            }
        }
    }
}

/// `first` and the events already queued behind it (at most
/// [`EVENT_BATCH`]), in order; a resync met on the way comes back to be
/// applied after them.
fn drain(
    rx: &mut mpsc::Receiver<WatchItem>,
    mut events: Vec<Event>,
) -> (Vec<Event>, Option<trellis_store::Listing>) {
    while events.len() < EVENT_BATCH {
        match rx.try_recv() {
            Ok(WatchItem::Events(more)) => events.extend(more),
            Ok(WatchItem::Resync(l)) => return (events, Some(l)),
            Err(_) => break,
        }
    }
    (events, None)
}

/// The next batch from the controller's own channel (pending forever
/// without one, or once it closed).
async fn next_inputs<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Vec<T> {
    let Some(r) = rx.as_mut() else {
        return std::future::pending().await;
    };
    let mut batch = Vec::new();
    match r.recv_many(&mut batch, INPUT_BATCH).await {
        0 => {
            *rx = None;
            std::future::pending().await
        }
        _ => batch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn inputs_are_batched_and_the_outage_backs_off() {
        let (tx, rx) = mpsc::channel(8);
        for i in 0..3 {
            tx.send(i).await.expect("send");
        }
        let mut opt = Some(rx);
        assert_eq!(next_inputs(&mut opt).await, vec![0, 1, 2]);
        drop(tx);
        // a closed channel is pending forever, not a busy loop
        let r = tokio::time::timeout(Duration::from_secs(1), next_inputs(&mut opt)).await;
        assert!(r.is_err() && opt.is_none());

        let (h, _rx) = Health::new();
        let s = LoopSettings {
            name: "test",
            prefix: "/x/".into(),
            resync_every: Duration::from_secs(1),
            housekeeping_every: None,
            health: Arc::new(h),
            metrics: Arc::new(Metrics::new()),
            marks_synced: true,
        };
        let mut o = Outage::new();
        let waits: Vec<Duration> = (0..7).map(|_| o.failed(&s, "list", "down")).collect();
        assert_eq!(waits[0], FIRST_BACKOFF);
        assert_eq!(waits[1], FIRST_BACKOFF * 2);
        assert_eq!(*waits.last().expect("last"), MAX_BACKOFF);
        assert!(s.health.datastore_error().is_some());
        o.ok(&s);
        assert!(s.health.datastore_error().is_none());
        assert_eq!(o.failed(&s, "list", "down"), FIRST_BACKOFF);
    }

    fn put(key: &str) -> Event {
        Event::Put(KeyValue {
            key: key.into(),
            value: vec![],
            create_revision: 1,
            mod_revision: 1,
            lease: 0,
        })
    }

    fn keys(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                Event::Put(kv) => kv.key.clone(),
                Event::Delete { key, .. } => key.clone(),
            })
            .collect()
    }

    #[test]
    fn queued_events_go_in_one_batch_and_a_resync_after_them() {
        let (tx, mut rx) = mpsc::channel(8);
        for k in ["b", "c"] {
            tx.try_send(WatchItem::Events(vec![put(k)])).expect("send");
        }
        tx.try_send(WatchItem::Resync(trellis_store::Listing {
            items: vec![],
            revision: 9,
        }))
        .expect("send");
        tx.try_send(WatchItem::Events(vec![put("d")]))
            .expect("send");
        let (events, relist) = drain(&mut rx, vec![put("a")]);
        assert_eq!(keys(&events), ["a", "b", "c"]);
        assert_eq!(relist.map(|l| l.revision), Some(9));
        // what came after the resync is the next batch
        let (events, relist) = drain(&mut rx, vec![]);
        assert_eq!(keys(&events), ["d"]);
        assert!(relist.is_none());
    }
}
