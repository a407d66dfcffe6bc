//! A list-and-watch that knows its resourceVersion, for the kinds that are
//! large (Services, EndpointSlices): it can start from a snapshot and
//! watch from the snapshot's resourceVersion instead of listing
//! (`snapshot.rs`). kube-runtime's watcher keeps its resourceVersion to
//! itself, so these kinds are watched here: list (pages of 500, the most
//! recent state, as the watcher does), then watch from the listing's
//! resourceVersion with bookmarks; a watch that ends is resumed from the
//! last resourceVersion seen; 410 Expired, or a resourceVersion the
//! server has not reached (a snapshot of another etcd), lists again;
//! other failures are reported and retried with the watches' backoff.

use crate::source::{name_of, KubeSource, Reporter, Role, Shown};
use futures::StreamExt;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::runtime::utils::Backoff;
use kube::Api;
use std::collections::HashMap;
use std::time::Duration;

const PAGE: u32 = 500;
/// The server ends a watch after this (kube-runtime asks for 290 s too).
const WATCH_TIMEOUT_S: u32 = 290;
/// A request that neither answers nor fails within this is retried.
const REQUEST_DEADLINE: Duration = Duration::from_secs(60);

/// What one round of the loop ended with.
enum Outcome {
    /// the watch ended (the server's timeout, a silent connection): watch
    /// again from the last resourceVersion seen
    Again,
    /// the resourceVersion is gone (410), or ahead of the server: list
    Expired,
    /// it failed (whether the server answered): report, wait, watch again
    /// from the last resourceVersion seen
    Failed(String, bool),
}

/// A status that asks for a relist: 410 Expired/Gone, or "Too large
/// resource version" (the server waited for a revision it has not
/// reached: the resourceVersion comes from another etcd).
fn relist_status(s: &kube::core::Status) -> bool {
    s.code == 410
        || s.details.as_ref().is_some_and(|d| {
            d.causes
                .iter()
                .any(|c| c.reason == "ResourceVersionTooLarge")
        })
        || s.message.contains("Too large resource version")
}

fn is_gone(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if relist_status(s))
}

impl KubeSource {
    /// Watches `api` (objects matching `labels`) like
    /// [`Self::watch_kind`], but can resume: when a snapshot read with
    /// [`Self::load_snapshot`] holds this kind (`what` and `labels` the
    /// same), the kind starts with the snapshot's objects, counts as
    /// listed at once, and watches from the snapshot's resourceVersion.
    /// Runs until the process ends.
    pub fn watch_resumable<K, F>(
        &self,
        what: &str,
        role: Role<'_>,
        api: Api<K>,
        labels: &str,
        show: F,
        report: Reporter,
    ) where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
        F: Fn(&K) -> Shown + Send + Sync + 'static,
    {
        let id = format!("{what}|{labels}");
        let (k, mut rv) = self.add_resumable(what, role, &id);
        let me = self.clone();
        let what = what.to_string();
        let labels = labels.to_string();
        tokio::spawn(async move {
            let mut backoff = crate::backoff::WatchBackoff::default();
            // a second relist in a row waits like a failure: no hot loop
            let mut expired_in_a_row = 0u32;
            loop {
                if rv.is_none() {
                    match me.list_into(k, &api, &labels, &show, &report).await {
                        Ok(v) => rv = Some(v),
                        // a continue token that expired: list again at once
                        Err(e) if is_gone(&e) && expired_in_a_row == 0 => {
                            expired_in_a_row += 1;
                            continue;
                        }
                        Err(e) => {
                            me.failed(k, &e, &report);
                            tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(5)))
                                .await;
                            continue;
                        }
                    }
                }
                let from = rv.clone().unwrap_or_default();
                let began = std::time::Instant::now();
                match me
                    .watch_from(k, &api, &labels, &from, &show, &mut rv, &report)
                    .await
                {
                    // a watch the server keeps ending at once is not a hot loop
                    Outcome::Again if began.elapsed() < Duration::from_secs(1) => {
                        tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(5))).await;
                    }
                    Outcome::Again => {
                        backoff.reset();
                        expired_in_a_row = 0;
                    }
                    Outcome::Expired => {
                        tracing::info!(kind = %what, resource_version = %from,
                            "the API server no longer has this resourceVersion; listing");
                        rv = None;
                        // a stop meanwhile saves no seed that cannot be used
                        me.lock().kinds[k].set_rv(None);
                        // after a watch that worked a while, a 410 is news
                        if began.elapsed() >= Duration::from_secs(1) {
                            expired_in_a_row = 0;
                        }
                        expired_in_a_row += 1;
                        if expired_in_a_row > 1 {
                            tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(5)))
                                .await;
                        }
                    }
                    Outcome::Failed(e, answered) => {
                        me.on_error(k, &e, answered, &report);
                        tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(5))).await;
                    }
                }
            }
        });
    }

    /// Registers the kind; takes its seed, if the snapshot has one.
    fn add_resumable(&self, what: &str, role: Role<'_>, id: &str) -> (usize, Option<String>) {
        let (table, prefix) = role.parts();
        let mut st = self.lock();
        let seed = st.seeds.remove(id);
        let rv = seed.as_ref().map(|s| s.rv.clone());
        st.kinds.push(crate::source::Kind {
            name: what.to_string(),
            table,
            prefix,
            resumable: Some((id.to_string(), rv.clone())),
            ..Default::default()
        });
        let k = st.kinds.len() - 1;
        if let Some(seed) = seed {
            tracing::info!(kind = %what, objects = seed.objects.len(), resource_version = %seed.rv,
                "starting from the watch snapshot; watching from its resourceVersion");
            let mut out = Vec::new();
            st.replace(k, seed.objects, &mut out);
            st.kinds[k].synced = true;
            st.publish(out);
            self.synced.notify_waiters();
        }
        (k, rv)
    }

    fn failed(&self, k: usize, e: &kube::Error, report: &Reporter) {
        self.on_error(k, &e.to_string(), matches!(e, kube::Error::Api(_)), report);
    }

    /// A listing, a watch request, an event or a bookmark worked: a
    /// failure being reported ends.
    fn worked(&self, k: usize, report: &Reporter) {
        let cleared = {
            let mut st = self.lock();
            st.kinds[k].error.take().is_some().then(|| st.error())
        };
        if let Some(still) = cleared {
            report(still);
        }
    }

    /// Lists every object (in pages); the kind holds them, at the
    /// listing's resourceVersion, which is returned.
    async fn list_into<K, F>(
        &self,
        k: usize,
        api: &Api<K>,
        labels: &str,
        show: &F,
        report: &Reporter,
    ) -> Result<String, kube::Error>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
        F: Fn(&K) -> Shown,
    {
        let started = std::time::Instant::now();
        let mut fresh = HashMap::new();
        let mut token: Option<String> = None;
        let mut rv = String::new();
        loop {
            let mut lp = ListParams::default().labels(labels).limit(PAGE);
            if let Some(t) = &token {
                lp = lp.continue_token(t);
            }
            let page = tokio::time::timeout(REQUEST_DEADLINE, api.list(&lp))
                .await
                .map_err(|_| {
                    kube::Error::Service(
                        format!("no answer to a listing within {REQUEST_DEADLINE:?}").into(),
                    )
                })??;
            if token.is_none() {
                rv = page.metadata.resource_version.clone().unwrap_or_default();
                if rv.is_empty() {
                    return Err(kube::Error::Service(
                        "a listing without a resourceVersion".into(),
                    ));
                }
            }
            for o in &page.items {
                if let Some(v) = show(o) {
                    fresh.insert(name_of(o), v);
                }
            }
            token = page.metadata.continue_.filter(|t| !t.is_empty());
            if token.is_none() {
                break;
            }
        }
        self.worked(k, report);
        let mut st = self.lock();
        let count = fresh.len();
        let mut out = Vec::new();
        st.replace(k, fresh, &mut out);
        st.kinds[k].set_rv(Some(rv.clone()));
        let first = !st.kinds[k].synced;
        st.kinds[k].synced = true;
        st.publish(out);
        drop(st);
        if first {
            self.synced.notify_waiters();
        }
        tracing::debug!(kind = %self.lock().kinds[k].name, objects = count, resource_version = %rv,
            took_ms = started.elapsed().as_millis() as u64, "listed");
        Ok(rv)
    }

    /// Watches from `from` until the watch ends; every event moves `rv`
    /// (with the kind's objects, under one lock).
    #[allow(clippy::too_many_arguments)]
    async fn watch_from<K, F>(
        &self,
        k: usize,
        api: &Api<K>,
        labels: &str,
        from: &str,
        show: &F,
        rv: &mut Option<String>,
        report: &Reporter,
    ) -> Outcome
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
        F: Fn(&K) -> Shown,
    {
        let wp = WatchParams::default()
            .labels(labels)
            .timeout(WATCH_TIMEOUT_S);
        let stream = match tokio::time::timeout(REQUEST_DEADLINE, api.watch(&wp, from)).await {
            Err(_) => {
                return Outcome::Failed(
                    format!("no answer to a watch within {REQUEST_DEADLINE:?}"),
                    false,
                )
            }
            Ok(Err(e)) if is_gone(&e) => return Outcome::Expired,
            Ok(Err(e)) => {
                let answered = matches!(e, kube::Error::Api(_));
                return Outcome::Failed(e.to_string(), answered);
            }
            Ok(Ok(s)) => s,
        };
        self.worked(k, report);
        let mut stream = std::pin::pin!(stream);
        // the server sends a bookmark about every minute and ends the
        // watch after its timeout: silence past that is a dead connection
        let silence = Duration::from_secs(u64::from(WATCH_TIMEOUT_S) + 30);
        let mut undecodable = 0u64;
        loop {
            let ev = match tokio::time::timeout(silence, stream.next()).await {
                Err(_) => {
                    tracing::debug!("watch silent past its timeout; watching again");
                    return Outcome::Again;
                }
                Ok(None) => return Outcome::Again,
                Ok(Some(Err(e))) if is_gone(&e) => return Outcome::Expired,
                // one object this build cannot read: skipped (as
                // kube-runtime does), the watch goes on
                Ok(Some(Err(kube::Error::SerdeError(e)))) => {
                    undecodable += 1;
                    if undecodable.is_power_of_two() {
                        tracing::warn!(error = %e, skipped = undecodable, "watch event not readable; skipped");
                    }
                    continue;
                }
                Ok(Some(Err(e))) => {
                    let answered = matches!(e, kube::Error::Api(_));
                    return Outcome::Failed(e.to_string(), answered);
                }
                Ok(Some(Ok(ev))) => ev,
            };
            let (name, now, at) = match ev {
                WatchEvent::Added(o) | WatchEvent::Modified(o) => {
                    (name_of(&o), show(&o), o.meta().resource_version.clone())
                }
                WatchEvent::Deleted(o) => (name_of(&o), None, o.meta().resource_version.clone()),
                WatchEvent::Bookmark(b) => {
                    let at = b.metadata.resource_version;
                    if !at.is_empty() {
                        self.lock().kinds[k].set_rv(Some(at.clone()));
                        *rv = Some(at);
                    }
                    self.worked(k, report);
                    continue;
                }
                WatchEvent::Error(s) if relist_status(&s) => return Outcome::Expired,
                WatchEvent::Error(s) => {
                    return Outcome::Failed(format!("{} ({})", s.message, s.code), true)
                }
            };
            self.worked(k, report);
            let mut st = self.lock();
            let mut out = Vec::new();
            st.set(k, &name, now, &mut out);
            // an event without a resourceVersion changes the objects but
            // not where a resumed watch starts: replaying it is harmless
            if let Some(at) = at.filter(|a| !a.is_empty()) {
                st.kinds[k].set_rv(Some(at.clone()));
                *rv = Some(at);
            }
            st.publish(out);
        }
    }
}
