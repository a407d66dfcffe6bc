//! The lab: a virtual cluster on one machine. A fabric namespace holds the
//! underlay bridge; each node is a namespace linked to it and runs its own
//! `trellisd`; each pod is a namespace attached by executing the real
//! `trellis` CNI plugin the way a container runtime does.
//!
//! Nothing is ever created in the host's own namespace. Every name starts
//! with the lab id (`trl...`), every command runs with a timeout, and a lab
//! is torn down on drop; `trellisctl lab gc` sweeps what a crash left.

pub mod bird;
pub mod etcd;
pub mod exec;
pub mod gc;
pub mod k8s;
mod lab;
pub mod netns;
mod pki;
pub mod state;

pub use lab::{
    deploy_dir, Backend, Lab, LabOptions, Outcome, PingStream, PodAttach, PodSpec, INTERNET_IP,
};
pub use state::{LabState, NodeState, PodState};

use std::path::PathBuf;

/// Every lab id, and so every namespace a lab makes, starts with this.
pub const PREFIX: &str = "trl";

/// The lab's cluster network config for `backend` (`vxlan`, `host-gw`,
/// `directrouting`): 10.244.0.0/16 split in /24s.
pub fn cluster_config(backend: &str) -> anyhow::Result<String> {
    let b = match backend {
        "vxlan" => r#"{"Type":"vxlan"}"#,
        "host-gw" => r#"{"Type":"host-gw"}"#,
        "directrouting" => r#"{"Type":"vxlan","DirectRouting":true}"#,
        "bgp" => r#"{"Type":"bgp"}"#,
        other => anyhow::bail!("backend {other:?}: use vxlan, host-gw, directrouting or bgp"),
    };
    Ok(format!(
        r#"{{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{b}}}"#
    ))
}

/// Where labs keep their state, sockets and logs.
pub fn state_root() -> PathBuf {
    PathBuf::from("/run/trellis-lab")
}

/// The directory holding `trellis`, `trellisd` and `trellisctl`: next to the
/// running executable (test binaries live one level deeper, in `deps/`),
/// or `TRELLIS_BIN_DIR`.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("TRELLIS_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}
