//! sysctl writes under /proc/sys (or where a container mounts the host's
//! `/proc/sys/net`: the DaemonSet's `/host/proc/sys`). `/proc/sys/net`
//! shows the namespace of the thread that opens it, wherever it is
//! mounted, so the agent sets its node's values.

use crate::{DataplaneError, NlError};
use std::path::{Path, PathBuf};

/// The usual place.
pub const PROC_SYS: &str = "/proc/sys";

/// Path of `key` under `dir`: `net/ipv4/conf/eth0.5/proxy_arp` is taken as
/// is (so interface names may hold dots); `net.ipv4.ip_forward` has its
/// dots turned into slashes.
pub fn path(dir: &Path, key: &str) -> PathBuf {
    if key.contains('/') {
        dir.join(key)
    } else {
        dir.join(key.replace('.', "/"))
    }
}

/// `sysctl -w KEY=VALUE` under `dir`; skips the write when the value is
/// already set.
pub fn set(dir: &Path, key: &str, value: &str) -> Result<(), DataplaneError> {
    let p = path(dir, key);
    if std::fs::read_to_string(&p).is_ok_and(|cur| cur.trim() == value) {
        return Ok(());
    }
    std::fs::write(&p, value).map_err(|e| {
        DataplaneError::new(
            format!("sysctl -w {key}={value}"),
            match e.raw_os_error() {
                Some(errno) => NlError::Kernel(nix::errno::Errno::from_raw(errno)),
                None => NlError::Transport(format!("{}: {e}", p.display())),
            },
        )
    })
}
