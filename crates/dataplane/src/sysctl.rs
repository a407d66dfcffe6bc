//! sysctl writes under /proc/sys. `/proc/sys/net` shows the namespace of
//! the process that opens it, so the agent sets its node's values.

use crate::{DataplaneError, NlError};
use std::path::PathBuf;

/// Path of `key`: `net/ipv4/conf/eth0.5/proxy_arp` is taken as is (so
/// interface names may hold dots); `net.ipv4.ip_forward` has its dots turned
/// into slashes.
pub fn path(key: &str) -> PathBuf {
    if key.contains('/') {
        PathBuf::from("/proc/sys").join(key)
    } else {
        PathBuf::from("/proc/sys").join(key.replace('.', "/"))
    }
}

/// `sysctl -w KEY=VALUE`; skips the write when the value is already set.
pub fn set(key: &str, value: &str) -> Result<(), DataplaneError> {
    let p = path(key);
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
