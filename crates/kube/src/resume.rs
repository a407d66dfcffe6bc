//! A list-and-watch that knows its resourceVersion, for the kinds that are
//! large (Services, EndpointSlices): it can start from a snapshot and
//! watch from the snapshot's resourceVersion instead of listing
//! (`snapshot.rs`). kube-runtime's watcher keeps its resourceVersion to
//! itself, so these kinds are watched here: list (pages of 500, the most
//! recent state, as the watcher does), then watch from the listing's
//! resourceVersion with bookmarks; a watch that ends is resumed from the
//! last resourceVersion seen; 410 Expired lists again; other failures are
//! reported and retried with the watches' backoff.

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
    /// the watch ended or failed after working: watch again from here
    Again,
    /// the resourceVersion is gone (410): list
    Expired,
    /// it failed: report, wait, retry from the same resourceVersion
    Failed(String, bool),
}

fn is_gone(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 410)
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
            loop {
                if rv.is_none() {
                    match me.list_into(k, &api, &labels, &show, &report).await {
                        Ok(v) => rv = Some(v),
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
                    Outcome::Again => backoff.reset(),
                    Outcome::Expired => {
                        tracing::info!(kind = %what, resource_version = %from,
                            "the API server no longer has this resourceVersion; listing");
                        rv = None;
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
        let (table, prefix) = match role {
            Role::Listed(p) => (false, p),
            Role::Table(p) => (true, p),
        };
        let mut st = self.lock();
        let seed = st.seeds.remove(id);
        let rv = seed.as_ref().map(|s| s.rv.clone());
        st.kinds.push(crate::source::Kind {
            name: what.to_string(),
            table,
            prefix: prefix.to_string(),
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

    /// A watch request or event worked: a failure being reported ends.
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
        if let Some((_, at)) = st.kinds[k].resumable.as_mut() {
            *at = Some(rv.clone());
        }
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
        let mut stream = std::pin::pin!(stream);
        // the server sends a bookmark about every minute: a watch silent
        // for longer than its own timeout is dead
        let silence = Duration::from_secs(u64::from(WATCH_TIMEOUT_S) + 30);
        loop {
            let ev = match tokio::time::timeout(silence, stream.next()).await {
                Err(_) => return Outcome::Failed("the watch went silent".into(), false),
                Ok(None) => return Outcome::Again,
                Ok(Some(Err(e))) => return Outcome::Failed(e.to_string(), false),
                Ok(Some(Ok(ev))) => ev,
            };
            let (name, now, at) = match ev {
                WatchEvent::Added(o) | WatchEvent::Modified(o) => {
                    (name_of(&o), show(&o), o.meta().resource_version.clone())
                }
                WatchEvent::Deleted(o) => (name_of(&o), None, o.meta().resource_version.clone()),
                WatchEvent::Bookmark(b) => {
                    let mut st = self.lock();
                    if let Some((_, at)) = st.kinds[k].resumable.as_mut() {
                        *at = Some(b.metadata.resource_version.clone());
                    }
                    *rv = Some(b.metadata.resource_version);
                    continue;
                }
                WatchEvent::Error(s) if s.code == 410 => return Outcome::Expired,
                WatchEvent::Error(s) => {
                    return Outcome::Failed(format!("{} ({})", s.message, s.code), true)
                }
            };
            self.worked(k, report);
            let mut st = self.lock();
            let mut out = Vec::new();
            st.set(k, &name, now, &mut out);
            if let Some(at) = at {
                if let Some((_, kept)) = st.kinds[k].resumable.as_mut() {
                    *kept = Some(at.clone());
                }
                *rv = Some(at);
            }
            st.publish(out);
        }
    }
}
