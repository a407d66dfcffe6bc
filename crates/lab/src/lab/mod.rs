//! Building and tearing down one lab: the fabric, its segments and
//! router, the lab's "internet", the nodes. Agents and etcd are in
//! `processes`, pods (the CNI plugin run as a runtime does) in `pods`,
//! traffic helpers in `traffic`.

mod kube;
mod pods;
mod processes;
mod services;
mod traffic;

pub use kube::{deploy_dir, PodSpec};
pub use services::{Backend, Outcome};
pub use traffic::PingStream;

use crate::exec::{self, ip};
use crate::netns;
use crate::state::{LabState, NodeState};
use anyhow::{anyhow, bail, Context};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// How a lab is made.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Number of nodes.
    pub nodes: usize,
    /// A name makes the lab persistent (kept until `lab down NAME`);
    /// without one it is removed when the `Lab` is dropped.
    pub name: Option<String>,
    /// Pod MTU the agents hand out.
    pub mtu: u32,
    /// Run a real etcd in its own namespace on the fabric (192.0.2.2).
    pub etcd: bool,
    /// Underlay segments: 1 (one L2 fabric) or 2 (192.0.2.0/24 and
    /// 198.51.100.0/24, routed by the fabric namespace: an L3 underlay).
    pub segments: usize,
    /// A cluster network config (flannel net-conf.json): the agents lease
    /// their subnets from the lab's etcd (implied) and route between nodes.
    pub cluster: Option<String>,
    /// BGP resources (a `trellisctl apply -f` manifest) written before the
    /// agents start.
    pub bgp: Option<String>,
    /// Kubernetes mode with this cluster network config (net-conf.json):
    /// a real control plane in the control-plane namespace, the agents
    /// read the Kubernetes API (podCIDRs from the controller manager).
    pub kubernetes: Option<String>,
    /// Kubernetes mode: nodes whose agent only routes (its Service proxy
    /// off) and that run the real kube-proxy (nftables mode) instead.
    pub kube_proxy: Vec<String>,
    /// Kubernetes mode: nodes whose agent only routes, with no proxy at
    /// all (a benchmark measuring one node's proxy alone).
    pub routing_only: Vec<String>,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            nodes: 1,
            name: None,
            mtu: 1500,
            etcd: false,
            segments: 1,
            cluster: None,
            bgp: None,
            kubernetes: None,
            kube_proxy: Vec::new(),
            routing_only: Vec::new(),
        }
    }
}

/// What an attached pod got.
#[derive(Debug, Clone)]
pub struct PodAttach {
    /// Pod address with prefix, as in the CNI result.
    pub address: String,
    /// Pod address without prefix.
    pub ip: String,
    /// How long the plugin took.
    pub took: Duration,
    /// The whole CNI result.
    pub result: serde_json::Value,
}

/// A lab on this machine.
pub struct Lab {
    pub(crate) st: LabState,
    pub(crate) dir: PathBuf,
    pub(crate) bin: PathBuf,
    keep: bool,
    pub(crate) children: HashMap<String, Child>,
}

/// The first three octets of each underlay segment; `.1` is the router.
const SEGMENTS: [&str; 2] = ["192.0.2", "198.51.100"];
/// The lab's "internet" host.
pub const INTERNET_IP: &str = "203.0.113.2";

fn sysctl_cmd(kv: &str) -> Command {
    let mut c = Command::new("sysctl");
    c.args(["-q", "-w", kv]);
    c
}

pub(crate) const AGENT_WAIT: Duration = Duration::from_secs(10);
pub(crate) const CNI_TIMEOUT: Duration = Duration::from_secs(30);

fn random_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mix = nanos ^ std::process::id().rotate_left(13) ^ seq.wrapping_mul(0x9e37_79b9);
    format!("{}{:06x}", crate::PREFIX, mix & 0xff_ffff)
}

impl Lab {
    /// Builds a lab: fabric, nodes, one running agent per node.
    pub fn create(opts: LabOptions) -> anyhow::Result<Self> {
        if !nix::unistd::Uid::effective().is_root() {
            bail!("the lab needs root (network namespaces)");
        }
        let (id, keep) = match &opts.name {
            Some(n) => {
                if n.is_empty() || n.len() > 12 || !n.chars().all(|c| c.is_ascii_alphanumeric()) {
                    bail!("lab name {n:?}: use 1 to 12 letters or digits");
                }
                (format!("{}{n}", crate::PREFIX), true)
            }
            None => (random_id(), false),
        };
        let dir = crate::state_root().join(&id);
        if dir.exists() {
            bail!(
                "lab {id} exists already ({}); `trellisctl lab down` it first",
                dir.display()
            );
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let st = LabState {
            id,
            owner_pid: if keep { 0 } else { std::process::id() },
            nodes: vec![],
            pods: vec![],
            etcd_pid: None,
            extra_pids: vec![],
            cluster: false,
            kubernetes: false,
            kube_proxy: vec![],
            routing_only: vec![],
            mtu: opts.mtu,
            segments: 1,
        };
        // from here on, drop tears down whatever was made
        let mut lab = Self {
            st,
            dir,
            bin: crate::bin_dir(),
            keep: false,
            children: HashMap::new(),
        };
        lab.save()?;
        lab.build(&opts)?;
        lab.keep = keep;
        Ok(lab)
    }

    /// Opens a persistent lab made by an earlier process.
    pub fn open(name: &str) -> anyhow::Result<Self> {
        let id = if name.starts_with(crate::PREFIX) {
            name.to_string()
        } else {
            format!("{}{name}", crate::PREFIX)
        };
        let dir = crate::state_root().join(&id);
        let st = LabState::load(&dir)
            .with_context(|| format!("lab {name} not found in {}", dir.display()))?;
        Ok(Self {
            st,
            dir,
            bin: crate::bin_dir(),
            keep: true,
            children: HashMap::new(),
        })
    }

    pub(crate) fn save(&self) -> anyhow::Result<()> {
        self.st
            .save(&self.dir)
            .with_context(|| format!("save lab state in {}", self.dir.display()))
    }

    fn build(&mut self, opts: &LabOptions) -> anyhow::Result<()> {
        let fab = self.fabric_ns();
        ip(&["netns", "add", &fab])?;
        ip(&["-n", &fab, "link", "set", "lo", "up"])?;
        // the fabric namespace is also the router between segments and to
        // the lab's "internet"
        exec::check(
            sysctl_cmd("net.ipv4.ip_forward=1"),
            Some(&netns::path(&fab)),
            Duration::from_secs(5),
        )?;
        for (seg, gw) in SEGMENTS.iter().take(opts.segments.clamp(1, 2)).enumerate() {
            let br = format!("br{seg}");
            ip(&["-n", &fab, "link", "add", &br, "type", "bridge"])?;
            ip(&["-n", &fab, "addr", "add", &format!("{gw}.1/24"), "dev", &br])?;
            ip(&["-n", &fab, "link", "set", &br, "up"])?;
        }
        let inet = self.internet_ns();
        ip(&["netns", "add", &inet])?;
        ip(&["-n", &inet, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", &fab, "link", "add", "inet", "type", "veth", "peer", "name", "eth0", "netns",
            &inet,
        ])?;
        ip(&["-n", &fab, "addr", "add", "203.0.113.1/24", "dev", "inet"])?;
        ip(&["-n", &fab, "link", "set", "inet", "up"])?;
        ip(&[
            "-n",
            &inet,
            "addr",
            "add",
            &format!("{INTERNET_IP}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &inet, "link", "set", "eth0", "up"])?;
        ip(&["-n", &inet, "route", "add", "default", "via", "203.0.113.1"])?;
        if opts.etcd || opts.cluster.is_some() || opts.kubernetes.is_some() {
            crate::etcd::make_namespace(&self.etcd_ns(), &fab)?;
            self.start_etcd()?;
        }
        if let Some(conf) = &opts.kubernetes {
            if opts.cluster.is_some() {
                bail!("a lab runs etcd mode or Kubernetes mode, not both");
            }
            self.st.kubernetes = true;
            self.st.kube_proxy = opts.kube_proxy.clone();
            self.st.routing_only = opts.routing_only.clone();
            self.save()?;
            self.build_control_plane(conf)?;
        }
        if let Some(conf) = &opts.cluster {
            self.etcdctl(&["put", &format!("{}config", crate::etcd::PREFIX), conf])?;
        }
        if let Some(manifest) = &opts.bgp {
            self.apply(manifest)?;
        }
        self.st.cluster = opts.cluster.is_some();
        self.st.mtu = opts.mtu;
        self.st.segments = opts.segments.clamp(1, 2);
        for _ in 0..opts.nodes {
            self.add_node()?;
        }
        Ok(())
    }

    /// Adds one more node (`nN`), wired to its segment, with its agent
    /// running. Nodes alternate between segments in a two-segment lab.
    pub fn add_node(&mut self) -> anyhow::Result<String> {
        let i = self.st.nodes.len() + 1;
        let seg = if self.st.segments == 2 && i.is_multiple_of(2) {
            1
        } else {
            0
        };
        let gw = SEGMENTS[seg];
        let name = format!("n{i}");
        let node = NodeState {
            name: name.clone(),
            ip: format!("{gw}.{}", 10 + i),
            // Kubernetes mode: the controller manager's podCIDR, read below
            subnet: if self.st.kubernetes {
                String::new()
            } else {
                format!("10.244.{i}.0/24")
            },
            agent_pid: None,
        };
        let (fab, ns) = (self.fabric_ns(), self.ns(&name));
        ip(&["netns", "add", &ns])?;
        self.st.nodes.push(node.clone());
        self.save()?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", &fab, "link", "add", &name, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&[
            "-n",
            &fab,
            "link",
            "set",
            &name,
            "master",
            &format!("br{seg}"),
            "up",
        ])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", node.ip),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        // a default route, as real nodes have: proxy ARP only answers for
        // targets the node can route
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &format!("{gw}.1"),
        ])?;
        let cfg = if self.st.kubernetes {
            self.register_node(&name, &node.ip)?;
            serde_json::json!({
                "nodeName": name,
                "socket": self.socket(&name),
                "statusSocket": self.status_socket(&name),
                "dataDir": self.dir.join(format!("{name}-data")),
                "kubernetes": {
                    "kubeconfig": self.dir.join("k8s/agent.kubeconfig"),
                    "proxy": {"enabled": !self.st.kube_proxy.contains(&name)
                        && !self.st.routing_only.contains(&name)},
                    // denied packets logged, as a user debugging policy would
                    "policy": {"logDenied": true, "logRatePerSecond": 100},
                },
                "resyncSeconds": 2,
            })
        } else if self.st.cluster {
            serde_json::json!({
                "nodeName": name,
                "socket": self.socket(&name),
                "statusSocket": self.status_socket(&name),
                "dataDir": self.dir.join(format!("{name}-data")),
                "etcd": {"endpoints": [crate::etcd::ETCD_ENDPOINT], "prefix": crate::etcd::PREFIX},
                "publicIp": node.ip,
                "leaseTtlSeconds": 4,
                "resyncSeconds": 2,
            })
        } else {
            serde_json::json!({
                "nodeName": name,
                "subnet": node.subnet,
                "mtu": self.st.mtu,
                "socket": self.socket(&name),
                "statusSocket": self.status_socket(&name),
                "dataDir": self.dir.join(format!("{name}-data")),
            })
        };
        std::fs::write(self.agent_config(&name), serde_json::to_vec_pretty(&cfg)?)?;
        self.start_agent(&name)?;
        if self.st.kubernetes {
            // the agent serves only once it has its podCIDR
            let cidr = self.wait_pod_cidr(&name, Duration::from_secs(5))?;
            if let Some(n) = self.st.nodes.iter_mut().find(|n| n.name == name) {
                n.subnet = cidr;
            }
            self.save()?;
            if self.st.kube_proxy.contains(&name) {
                self.start_kube_proxy(&name)?;
            }
        }
        Ok(name)
    }

    /// Namespace name of the lab's "internet" (203.0.113.2, outside the cluster).
    pub fn internet_ns(&self) -> String {
        format!("{}-inet", self.st.id)
    }

    /// The lab id.
    pub fn id(&self) -> &str {
        &self.st.id
    }

    /// The lab's state.
    pub fn state(&self) -> &LabState {
        &self.st
    }

    /// The lab's directory (state, sockets, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Namespace name of the fabric.
    pub fn fabric_ns(&self) -> String {
        format!("{}-fab", self.st.id)
    }

    /// Namespace name of the lab's etcd.
    pub fn etcd_ns(&self) -> String {
        format!("{}-etcd", self.st.id)
    }

    /// Namespace name of node `node`.
    pub fn ns(&self, node: &str) -> String {
        format!("{}-{node}", self.st.id)
    }

    /// Namespace name of pod `pod` on `node`.
    pub fn pod_ns(&self, node: &str, pod: &str) -> String {
        format!("{}-{node}-{pod}", self.st.id)
    }

    /// The address pod `pod` on `node` got (without its prefix length).
    pub fn pod_ip(&self, node: &str, pod: &str) -> anyhow::Result<String> {
        self.st
            .pods
            .iter()
            .find(|p| p.node == node && p.name == pod)
            .map(|p| p.ip.split('/').next().unwrap_or_default().to_string())
            .ok_or_else(|| anyhow::anyhow!("lab {} has no pod {pod} on {node}", self.st.id))
    }

    /// Node `name`.
    pub fn node(&self, name: &str) -> anyhow::Result<&NodeState> {
        self.st
            .nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| anyhow!("lab {} has no node {name}", self.st.id))
    }

    /// The agent socket of `node`.
    pub fn socket(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.sock"))
    }

    /// The status socket of `node`'s agent.
    pub fn status_socket(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.status.sock"))
    }

    pub(crate) fn agent_config(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.json"))
    }

    /// The agent log of `node`.
    pub fn agent_log(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.log"))
    }

    /// The last `lines` lines of every node's agent log on stderr: what a
    /// failed test shows of the agents before the lab goes.
    pub fn print_agent_logs(&self, lines: usize) {
        for n in &self.st.nodes {
            let log = std::fs::read_to_string(self.agent_log(&n.name)).unwrap_or_default();
            let all: Vec<&str> = log.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            eprintln!("--- {} agent log, last {} lines ---", n.name, tail.len());
            for l in tail {
                eprintln!("{l}");
            }
        }
    }

    /// The directory holding the plugin binaries.
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// A network config for `node` in `mode` (`bridge` | `routed`).
    pub fn netconf(&self, node: &str, mode: &str) -> String {
        let mut c = serde_json::json!({
            "cniVersion": "1.1.0",
            "name": "lab",
            "type": "trellis",
            "agentSocket": self.socket(node),
        });
        // an empty mode leaves the choice to the agent
        if !mode.is_empty() {
            c["mode"] = mode.into();
        }
        c.to_string()
    }

    /// Tears the lab down: agents stopped, namespaces deleted, state removed.
    pub fn destroy(mut self) -> anyhow::Result<()> {
        self.keep = false;
        self.teardown()
    }

    fn teardown(&mut self) -> anyhow::Result<()> {
        for n in self.st.nodes.clone() {
            if let Some(pid) = n.agent_pid {
                stop_pid(pid, self.children.remove(&n.name));
            }
        }
        // the API server and controller manager before the etcd they use
        for pid in std::mem::take(&mut self.st.extra_pids) {
            let child = self
                .children
                .iter()
                .find(|(_, c)| c.id() == pid)
                .map(|(k, _)| k.clone());
            stop_pid(pid, child.and_then(|k| self.children.remove(&k)));
        }
        if let Some(pid) = self.st.etcd_pid.take() {
            stop_pid(pid, self.children.remove("etcd"));
        }
        let errors = crate::gc::delete_namespaces(&self.st.id);
        let _ = std::fs::remove_dir_all(&self.dir);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(anyhow!(
                "lab {} teardown: {}",
                self.st.id,
                errors.join("; ")
            ))
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_agent_logs(60);
        }
        if !self.keep {
            if let Err(e) = self.teardown() {
                eprintln!("{e}");
            }
        }
    }
}

/// SIGTERM our agent `pid`, reap it, SIGKILL after 5 s.
pub(crate) fn stop_pid(pid: u32, child: Option<Child>) {
    use nix::sys::signal::{kill, Signal};
    let p = nix::unistd::Pid::from_raw(pid as i32);
    if !crate::gc::is_lab_process(pid) && child.is_none() {
        return;
    }
    let _ = kill(p, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut child = child;
    loop {
        let gone = match child.as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => kill(p, None).is_err(),
        };
        if gone {
            return;
        }
        if Instant::now() > deadline {
            let _ = kill(p, Signal::SIGKILL);
            if let Some(c) = child.as_mut() {
                let _ = c.wait();
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
