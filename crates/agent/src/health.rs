//! What `/healthz` and `/readyz` answer, and the agent's way out when it
//! must not go on (a lost subnet): one shared [`Health`].
//!
//! Ready means: joined the cluster (or has a configured subnet), the
//! first sync of the routing loop is done, the CNI server is up, and
//! nothing fatal happened. Every condition that is not met is named.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Mutex;

/// Why the process should end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// A signal (SIGTERM / SIGINT): a clean stop, exit code 0.
    Signal(String),
    /// The agent cannot go on; exit non-zero with this message.
    Fatal(String),
}

/// Readiness conditions and the exit channel.
pub struct Health {
    joined: AtomicBool,
    synced: AtomicBool,
    cni_up: AtomicBool,
    /// The datastore's last failure, while it lasts.
    datastore: Mutex<Option<String>>,
    /// What keeps the node from joining, while it lasts.
    join_problem: Mutex<Option<String>>,
    fatal: Mutex<Option<String>>,
    exit: SyncSender<Exit>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Health {
    /// A fresh state (nothing ready) and the receiver the main thread
    /// waits on.
    pub fn new() -> (Self, Receiver<Exit>) {
        // bounded: the first exit reason is what counts
        let (exit, rx) = std::sync::mpsc::sync_channel(4);
        (
            Self {
                joined: AtomicBool::new(false),
                synced: AtomicBool::new(false),
                cni_up: AtomicBool::new(false),
                datastore: Mutex::new(None),
                join_problem: Mutex::new(None),
                fatal: Mutex::new(None),
                exit,
            },
            rx,
        )
    }

    /// The node has its subnet.
    pub fn set_joined(&self) {
        self.joined.store(true, Ordering::Relaxed);
    }

    /// What keeps the node from joining (`None`: nothing, or joined).
    pub fn set_join_problem(&self, p: Option<String>) {
        *lock(&self.join_problem) = p;
    }

    /// Whether the routing loop finished its first full sync.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// The routing loop finished its first full sync.
    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::Relaxed);
    }

    /// Whether the CNI socket accepts requests.
    pub fn cni_is_up(&self) -> bool {
        self.cni_up.load(Ordering::Relaxed)
    }

    /// The CNI socket accepts requests.
    pub fn set_cni_up(&self) {
        self.cni_up.store(true, Ordering::Relaxed);
    }

    /// The datastore failed (`Some`) or works again (`None`).
    pub fn set_datastore_error(&self, e: Option<String>) {
        *lock(&self.datastore) = e;
    }

    /// The datastore's current failure.
    pub fn datastore_error(&self) -> Option<String> {
        lock(&self.datastore).clone()
    }

    /// Something the agent cannot recover from: CNI ADDs are refused from
    /// now on, readiness turns false, and the main thread exits non-zero.
    pub fn fatal(&self, msg: String) {
        tracing::error!(reason = %msg, "fatal: the agent stops");
        self.refuse(msg.clone());
        self.send(Exit::Fatal(msg));
    }

    /// Refuses CNI ADDs (and turns readiness false) from now on, before the
    /// agent has decided how to end: the first reason stays.
    pub fn refuse(&self, msg: String) {
        lock(&self.fatal).get_or_insert(msg);
    }

    /// Asks the main thread to stop.
    pub fn send(&self, e: Exit) {
        match self.exit.try_send(e) {
            Ok(()) | Err(TrySendError::Full(_)) => {}
            Err(TrySendError::Disconnected(e)) => {
                tracing::error!("exit requested with no one to carry it out: {e:?}")
            }
        }
    }

    /// The fatal condition, once there is one.
    pub fn fatal_reason(&self) -> Option<String> {
        lock(&self.fatal).clone()
    }

    /// Every unmet readiness condition (empty: ready).
    pub fn not_ready(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(f) = self.fatal_reason() {
            out.push(format!("fatal: {f}"));
        }
        if !self.joined.load(Ordering::Relaxed) {
            match lock(&self.join_problem).as_ref() {
                Some(p) => out.push(format!("not joined: {p}")),
                None => out.push("not joined: no pod subnet yet".into()),
            }
        }
        if !self.synced.load(Ordering::Relaxed) {
            out.push("first sync with the datastore not done".into());
        }
        if !self.cni_up.load(Ordering::Relaxed) {
            out.push("CNI server not up".into());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_condition_holds() {
        let (h, rx) = Health::new();
        assert_eq!(h.not_ready().len(), 3);
        h.set_joined();
        h.set_synced();
        assert_eq!(h.not_ready(), vec!["CNI server not up".to_string()]);
        h.set_cni_up();
        assert!(h.not_ready().is_empty());
        h.fatal("subnet lost".into());
        assert!(h.not_ready()[0].contains("subnet lost"));
        assert_eq!(rx.try_recv(), Ok(Exit::Fatal("subnet lost".into())));
        // a second reason does not replace the first, and never blocks
        for _ in 0..10 {
            h.fatal("again".into());
        }
        assert_eq!(h.fatal_reason().as_deref(), Some("subnet lost"));
    }
}
