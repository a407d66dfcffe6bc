//! What a lab holds, on disk, so another process (`trellisctl lab ...`,
//! `lab gc`) can find and tear it down.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A node of the lab.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeState {
    /// Short name (`n1`).
    pub name: String,
    /// Underlay address.
    pub ip: String,
    /// Pod subnet: leased (etcd mode), the podCIDR (Kubernetes mode; empty
    /// while the node has none: ask `Lab::wait_pod_cidr`), or configured.
    pub subnet: String,
    /// PID of its trellisd, when running.
    pub agent_pid: Option<u32>,
}

/// A pod of the lab.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodState {
    /// Node it runs on.
    pub node: String,
    /// Short name.
    pub name: String,
    /// Attach mode used.
    pub mode: String,
    /// Its address (with prefix).
    pub ip: String,
    /// Its Pod object's UID (Kubernetes mode).
    #[serde(default)]
    pub uid: Option<String>,
    /// Its Pod object's namespace and name when not the lab's default
    /// (`default`, `POD-NODE`).
    #[serde(default)]
    pub object: Option<(String, String)>,
}

/// The whole lab.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabState {
    /// Lab id, the prefix of every name.
    pub id: String,
    /// Process that owns the lab (0: kept until `lab down`).
    pub owner_pid: u32,
    /// Nodes.
    pub nodes: Vec<NodeState>,
    /// Pods.
    pub pods: Vec<PodState>,
    /// PID of the lab's etcd, when running.
    #[serde(default)]
    pub etcd_pid: Option<u32>,
    /// Other processes the lab started (extra etcd members).
    #[serde(default)]
    pub extra_pids: Vec<u32>,
    /// Agents lease subnets from etcd and route between nodes.
    #[serde(default)]
    pub cluster: bool,
    /// Agents read the Kubernetes API of the lab's control plane.
    #[serde(default)]
    pub kubernetes: bool,
    /// Nodes running the real kube-proxy (their agents only route).
    #[serde(default)]
    pub kube_proxy: Vec<String>,
    /// Nodes whose agent only routes, with no proxy at all.
    #[serde(default)]
    pub routing_only: Vec<String>,
    /// Pod MTU of agents without a datastore.
    #[serde(default)]
    pub mtu: u32,
    /// Underlay segments.
    #[serde(default)]
    pub segments: usize,
}

impl LabState {
    /// The state file of lab `id`.
    pub fn file(dir: &Path) -> PathBuf {
        dir.join("lab.json")
    }

    /// Reads it.
    pub fn load(dir: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(Self::file(dir))?;
        serde_json::from_str(&text).map_err(std::io::Error::other)
    }

    /// Writes it (atomically).
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join("lab.json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, Self::file(dir))
    }
}
