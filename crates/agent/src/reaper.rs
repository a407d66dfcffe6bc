//! Deleting a veth costs the kernel an RCU barrier (15–60 ms here), most of
//! a CNI DEL. DEL therefore only retires the host veth — down (no traffic,
//! its routes gone, the bridge port disabled) and renamed to a tombstone —
//! and this reaper deletes tombstones on its own thread. Tombstones a crash
//! left behind are deleted at start.

use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use trellis_dataplane::{Dataplane, DataplaneError};

/// Prefix of retired host veths: not [`crate::attach::VETH_PREFIX`], so a
/// tombstone is never taken for a live pod's link.
pub const TOMBSTONE_PREFIX: &str = "tz";

/// Tombstones waiting for deletion at most; a DEL that finds the queue full
/// deletes its link itself (backpressure, nothing dropped).
const QUEUE: usize = 1024;

/// The tombstone name of host veth `host` (`tl` + 11 hex → `tz` + the same
/// 11 hex): deterministic, so an ADD of the same container and interface
/// can clear a tombstone that still holds the pod-side name.
pub fn tombstone_name(host: &str) -> String {
    let hash = host
        .strip_prefix(crate::attach::VETH_PREFIX)
        .unwrap_or(host);
    format!("{TOMBSTONE_PREFIX}{hash}")
}

/// Whether `name` is a tombstone trellis made: `tz` + 11 lowercase hex.
pub fn is_tombstone(name: &str) -> bool {
    name.strip_prefix(TOMBSTONE_PREFIX).is_some_and(|h| {
        h.len() == 11
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Deletes retired links in the background.
pub struct Reaper {
    dp: Arc<dyn Dataplane>,
    queue: SyncSender<String>,
}

impl Reaper {
    /// Starts the reaper thread and queues the tombstones already present.
    pub fn start(dp: Arc<dyn Dataplane>) -> Self {
        let (queue, rx) = sync_channel::<String>(QUEUE);
        let worker = dp.clone();
        std::thread::Builder::new()
            .name("veth-reaper".into())
            .spawn(move || {
                // ends when the service (the only sender) is dropped
                while let Ok(name) = rx.recv() {
                    if let Err(e) = worker.link_delete(&name) {
                        tracing::warn!(link = %name, error = %e, "deleting a retired veth failed");
                    }
                }
            })
            .map(drop)
            .unwrap_or_else(
                |e| tracing::error!(error = %e, "no reaper thread: DEL deletes at once"),
            );
        let reaper = Self { dp, queue };
        match reaper.dp.links_named(TOMBSTONE_PREFIX) {
            Ok(names) => {
                for name in names.into_iter().filter(|n| is_tombstone(n)) {
                    reaper.queue_delete(name);
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing retired veths failed"),
        }
        reaper
    }

    fn queue_delete(&self, name: String) {
        match self.queue.try_send(name) {
            Ok(()) => {}
            Err(TrySendError::Full(name) | TrySendError::Disconnected(name)) => {
                if let Err(e) = self.dp.link_delete(&name) {
                    tracing::warn!(link = %name, error = %e, "deleting a retired veth failed");
                }
            }
        }
    }

    /// Takes `host` out of service now and deletes it later. `Ok(false)`
    /// when it did not exist.
    pub fn retire(&self, host: &str) -> Result<bool, DataplaneError> {
        let tomb = tombstone_name(host);
        match self.dp.link_retire(host, &tomb) {
            Ok(true) => {
                self.queue_delete(tomb);
                Ok(true)
            }
            Ok(false) => Ok(false),
            // the tombstone name is taken (an older one not reaped yet):
            // delete that one, then the link itself at once
            Err(e) if e.source.errno() == Some(nix::errno::Errno::EEXIST) => {
                self.dp.link_delete(&tomb)?;
                self.dp.link_delete(host)
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes the tombstone of `host` now if there is one, so its pod-side
    /// interface no longer holds the name an ADD is about to use.
    pub fn clear(&self, host: &str) -> Result<(), DataplaneError> {
        self.dp.link_delete(&tombstone_name(host)).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_dataplane::FakeDataplane;

    #[test]
    fn tombstones_do_not_look_like_pod_veths_and_keep_the_hash() {
        let host = crate::attach::host_veth_name("c1", "eth0");
        let tomb = tombstone_name(&host);
        assert_eq!(tomb.len(), host.len());
        assert!(!tomb.starts_with(crate::attach::VETH_PREFIX));
        assert_eq!(&tomb[2..], &host[2..]);
    }

    #[test]
    fn leftover_tombstones_are_deleted_at_start() {
        let fake = Arc::new(FakeDataplane::new());
        fake.add_test_link("tz0123456789a");
        fake.add_test_link("tl0123456789a");
        // not ours: wrong length, not hex
        fake.add_test_link("tzother");
        fake.add_test_link("tz0123456789z");
        let _reaper = Reaper::start(fake.clone());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while fake.links().contains_key("tz0123456789a") {
            assert!(std::time::Instant::now() < deadline, "tombstone not reaped");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(
            fake.links().contains_key("tl0123456789a"),
            "a live veth was taken"
        );
    }
}
