//! Entering network namespaces from dedicated threads.

use nix::sched::CloneFlags;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

/// The path of a named namespace.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from("/var/run/netns").join(name)
}

/// Runs `f` on a fresh thread that first entered namespace `netns`.
pub fn within<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    let file = std::fs::File::open(netns)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            Ok(f())
        })
        .join()
        .map_err(|_| std::io::Error::other("netns thread panicked"))?
    })
}

/// Spawns `cmd` inside `netns` (or here when `None`): the child inherits
/// the namespace of the thread that forks it.
pub fn spawn_in(netns: Option<&Path>, cmd: &mut Command) -> std::io::Result<Child> {
    match netns {
        None => cmd.spawn(),
        Some(ns) => within(ns, || cmd.spawn())?,
    }
}
