//! Building, using and tearing down one lab.

use crate::exec::{self, ip, ExecError, Timed};
use crate::netns;
use crate::state::{LabState, NodeState, PodState};
use anyhow::{anyhow, bail, Context};
use std::collections::HashMap;
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
    st: LabState,
    dir: PathBuf,
    bin: PathBuf,
    keep: bool,
    children: HashMap<String, Child>,
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

const AGENT_WAIT: Duration = Duration::from_secs(10);
const CNI_TIMEOUT: Duration = Duration::from_secs(30);

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

    fn save(&self) -> anyhow::Result<()> {
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
        if opts.etcd || opts.cluster.is_some() {
            crate::etcd::make_namespace(&self.etcd_ns(), &fab)?;
            self.start_etcd()?;
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
            subnet: format!("10.244.{i}.0/24"),
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
        let cfg = if self.st.cluster {
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

    /// Starts the lab's etcd (keeping its data) and waits until it serves.
    pub fn start_etcd(&mut self) -> anyhow::Result<()> {
        let child = crate::etcd::start(&self.etcd_ns(), &self.dir)?;
        self.st.etcd_pid = Some(child.id());
        self.children.insert("etcd".into(), child);
        self.save()
    }

    /// Starts an extra etcd cluster of `members` (1 to 3) at 192.0.2.3.. on
    /// the fabric, for datastore tests; with `tls`, clients must present a
    /// certificate of the lab CA. The members stop with the lab.
    pub fn start_etcd_cluster(
        &mut self,
        members: usize,
        tls: bool,
    ) -> anyhow::Result<(Vec<crate::etcd::Member>, Option<crate::etcd::LabTls>)> {
        let all: Vec<crate::etcd::Member> = (0..members.clamp(1, 3))
            .map(|i| crate::etcd::Member {
                name: format!("m{i}"),
                ns: format!("{}-etcdm{i}", self.st.id),
                ip: format!("192.0.2.{}", 3 + i),
            })
            .collect();
        let certs = if tls {
            let ips: Vec<String> = all.iter().map(|m| m.ip.clone()).collect();
            Some(crate::etcd::make_tls(&self.dir.join("pki"), &ips)?)
        } else {
            None
        };
        for (i, m) in all.iter().enumerate() {
            crate::etcd::make_member_namespace(
                &m.ns,
                &self.fabric_ns(),
                &format!("etcdm{i}"),
                &m.ip,
            )?;
        }
        for m in &all {
            let child = crate::etcd::start_member(m, &all, &self.dir, certs.as_ref())?;
            self.st.extra_pids.push(child.id());
            self.children.insert(format!("etcd-{}", m.name), child);
        }
        self.save()?;
        for m in &all {
            crate::etcd::wait_listening(&m.ns, &m.ip, Duration::from_secs(20))?;
        }
        Ok((all, certs))
    }

    /// Kills member `name` of the extra etcd cluster (SIGKILL, as a crash).
    pub fn kill_etcd_member(&mut self, name: &str) -> anyhow::Result<()> {
        let mut child = self
            .children
            .remove(&format!("etcd-{name}"))
            .ok_or_else(|| anyhow!("no etcd member {name}"))?;
        let pid = child.id();
        child.kill()?;
        child.wait()?;
        self.st.extra_pids.retain(|p| *p != pid);
        self.save()
    }

    /// Stops the lab's etcd (its data stays for a restart).
    pub fn stop_etcd(&mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.st.etcd_pid.take() {
            stop_pid(pid, self.children.remove("etcd"));
        }
        self.save()
    }

    /// Namespace name of node `node`.
    pub fn ns(&self, node: &str) -> String {
        format!("{}-{node}", self.st.id)
    }

    /// Namespace name of pod `pod` on `node`.
    pub fn pod_ns(&self, node: &str, pod: &str) -> String {
        format!("{}-{node}-{pod}", self.st.id)
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

    fn agent_config(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.json"))
    }

    /// The agent log of `node`.
    pub fn agent_log(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.log"))
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

    /// Starts `node`'s agent inside its namespace and waits for its socket.
    pub fn start_agent(&mut self, node: &str) -> anyhow::Result<u32> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.agent_log(node))?;
        let mut cmd = Command::new(self.bin.join("trellisd"));
        cmd.arg("--config").arg(self.agent_config(node));
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let ns = netns::path(&self.ns(node));
        let child = netns::spawn_in(Some(&ns), &mut cmd).with_context(|| {
            format!(
                "start {} in {}",
                self.bin.join("trellisd").display(),
                ns.display()
            )
        })?;
        let pid = child.id();
        self.children.insert(node.to_string(), child);
        if let Some(n) = self.st.nodes.iter_mut().find(|n| n.name == node) {
            n.agent_pid = Some(pid);
        }
        self.save()?;
        let sock = self.socket(node);
        let deadline = Instant::now() + AGENT_WAIT;
        while UnixStream::connect(&sock).is_err() {
            if let Some(c) = self.children.get_mut(node) {
                if let Ok(Some(status)) = c.try_wait() {
                    let log = std::fs::read_to_string(self.agent_log(node)).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(5).collect();
                    bail!(
                        "trellisd on {node} exited ({status}); last log lines:\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "trellisd on {node} did not open {} within {AGENT_WAIT:?}",
                    sock.display()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // a leased subnet is written by the agent before it serves
        let leased = self.dir.join(format!("{node}-data")).join("subnet");
        if let Ok(s) = std::fs::read_to_string(leased) {
            if let Some(n) = self.st.nodes.iter_mut().find(|n| n.name == node) {
                n.subnet = s.trim().to_string();
            }
            self.save()?;
        }
        Ok(pid)
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) `node`'s agent: a hung agent
    /// whose sockets stay open.
    pub fn freeze_agent(&self, node: &str, frozen: bool) -> anyhow::Result<()> {
        use nix::sys::signal::{kill, Signal};
        let pid = self
            .node(node)?
            .agent_pid
            .with_context(|| format!("{node}: no agent running"))?;
        let sig = if frozen {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        kill(nix::unistd::Pid::from_raw(pid as i32), sig)?;
        Ok(())
    }

    /// `trellisctl apply -f` of `manifest` against the lab's etcd (from
    /// the etcd namespace); returns what trellisctl printed.
    pub fn apply(&self, manifest: &str) -> anyhow::Result<String> {
        self.trellisctl_manifest("apply", manifest)
    }

    /// `trellisctl delete -f` of `manifest`.
    pub fn delete(&self, manifest: &str) -> anyhow::Result<String> {
        self.trellisctl_manifest("delete", manifest)
    }

    fn trellisctl_manifest(&self, verb: &str, manifest: &str) -> anyhow::Result<String> {
        let file = self.dir.join(format!("manifest-{verb}.yaml"));
        std::fs::write(&file, manifest)?;
        let mut cmd = Command::new(self.bin.join("trellisctl"));
        cmd.arg(verb)
            .arg("-f")
            .arg(&file)
            .arg("--etcd-endpoints")
            .arg(crate::etcd::ETCD_ENDPOINT)
            .arg("--prefix")
            .arg(crate::etcd::PREFIX);
        Ok(exec::check(
            cmd,
            Some(&netns::path(&self.etcd_ns())),
            Duration::from_secs(20),
        )?)
    }

    /// Stops `node`'s agent and releases its subnet (`trellisd --decommission`).
    pub fn decommission(&mut self, node: &str) -> anyhow::Result<String> {
        self.stop_agent(node)?;
        let mut cmd = Command::new(self.bin.join("trellisd"));
        cmd.arg("--config")
            .arg(self.agent_config(node))
            .arg("--decommission");
        Ok(exec::check(
            cmd,
            Some(&netns::path(&self.ns(node))),
            Duration::from_secs(20),
        )?)
    }

    /// Runs `etcdctl ARGS` against the lab's etcd, from its namespace.
    pub fn etcdctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(crate::etcd::ETCD_ENDPOINT)
            .args(args);
        Ok(exec::check(
            cmd,
            Some(&netns::path(&self.etcd_ns())),
            Duration::from_secs(10),
        )?)
    }

    /// Stops `node`'s agent (SIGTERM, then SIGKILL after 5 s). Its pods keep running.
    pub fn stop_agent(&mut self, node: &str) -> anyhow::Result<()> {
        let pid = self.node(node)?.agent_pid;
        if let Some(pid) = pid {
            stop_pid(pid, self.children.remove(node));
        }
        if let Some(n) = self.st.nodes.iter_mut().find(|n| n.name == node) {
            n.agent_pid = None;
        }
        self.save()
    }

    /// Runs the `trellis` plugin as a runtime would, from `node`'s namespace,
    /// with exactly `env` and `stdin`.
    pub fn cni_raw(
        &self,
        node: &str,
        env: &[(&str, &str)],
        stdin: &[u8],
    ) -> Result<Timed, ExecError> {
        let mut cmd = Command::new(self.bin.join("trellis"));
        cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        for (k, v) in env {
            cmd.env(k, v);
        }
        exec::run(cmd, Some(&netns::path(&self.ns(node))), stdin, CNI_TIMEOUT)
    }

    /// The runtime environment for `command` on pod `pod` of `node`.
    pub fn cni_env(&self, command: &str, node: &str, pod: &str) -> Vec<(String, String)> {
        let ns = self.pod_ns(node, pod);
        vec![
            ("CNI_COMMAND".into(), command.into()),
            ("CNI_CONTAINERID".into(), ns.clone()),
            (
                "CNI_NETNS".into(),
                netns::path(&ns).to_string_lossy().into_owned(),
            ),
            ("CNI_IFNAME".into(), "eth0".into()),
            ("CNI_PATH".into(), self.bin.to_string_lossy().into_owned()),
            (
                "CNI_ARGS".into(),
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}"),
            ),
        ]
    }

    /// Runs one CNI command for pod `pod` with network config `conf`.
    pub fn cni(
        &self,
        command: &str,
        node: &str,
        pod: &str,
        conf: &str,
    ) -> Result<Timed, ExecError> {
        let env = self.cni_env(command, node, pod);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.cni_raw(node, &env, conf.as_bytes())
    }

    /// Creates pod `pod`'s namespace on `node` and attaches it in `mode`.
    pub fn add_pod(&mut self, node: &str, pod: &str, mode: &str) -> anyhow::Result<PodAttach> {
        self.node(node)?;
        let ns = self.pod_ns(node, pod);
        ip(&["netns", "add", &ns])?;
        self.st.pods.push(PodState {
            node: node.into(),
            name: pod.into(),
            mode: mode.into(),
            ip: String::new(),
        });
        self.save()?;
        let t = self.cni("ADD", node, pod, &self.netconf(node, mode))?;
        let out: serde_json::Value =
            serde_json::from_slice(&t.output.stdout).with_context(|| {
                format!(
                    "ADD {pod}: plugin printed {:?}",
                    String::from_utf8_lossy(&t.output.stdout)
                )
            })?;
        if !t.output.status.success() {
            bail!("ADD {pod} on {node} failed: {out}");
        }
        let address = out["ips"][0]["address"]
            .as_str()
            .ok_or_else(|| anyhow!("ADD {pod}: no address in {out}"))?
            .to_string();
        let ip = address.split('/').next().unwrap_or_default().to_string();
        if let Some(p) = self
            .st
            .pods
            .iter_mut()
            .find(|p| p.node == node && p.name == pod)
        {
            p.ip = address.clone();
        }
        self.save()?;
        Ok(PodAttach {
            address,
            ip,
            took: t.took,
            result: out,
        })
    }

    /// Detaches pod `pod` (CNI DEL) and removes its namespace.
    pub fn del_pod(&mut self, node: &str, pod: &str) -> anyhow::Result<Duration> {
        let mode = self
            .st
            .pods
            .iter()
            .find(|p| p.node == node && p.name == pod)
            .map(|p| p.mode.clone())
            .ok_or_else(|| anyhow!("lab {} has no pod {pod} on {node}", self.st.id))?;
        let t = self.cni("DEL", node, pod, &self.netconf(node, &mode))?;
        if !t.output.status.success() {
            bail!(
                "DEL {pod} on {node} failed: {}",
                String::from_utf8_lossy(&t.output.stdout)
            );
        }
        ip(&["netns", "del", &self.pod_ns(node, pod)])?;
        self.st.pods.retain(|p| !(p.node == node && p.name == pod));
        self.save()?;
        Ok(t.took)
    }

    /// Runs `args` inside namespace `ns` with a timeout; returns the output.
    pub fn exec(&self, ns: &str, args: &[&str], timeout: Duration) -> Result<Timed, ExecError> {
        let mut cmd = Command::new(args[0]);
        cmd.args(&args[1..]);
        exec::run(cmd, Some(&netns::path(ns)), &[], timeout)
    }

    /// `ping -c COUNT` from namespace `ns`; the average RTT when all came back.
    pub fn ping(&self, ns: &str, target: &str, count: u32) -> Option<Duration> {
        let c = count.to_string();
        let t = self
            .exec(
                ns,
                &[
                    "ping", "-n", "-q", "-c", &c, "-i", "0.05", "-W", "1", target,
                ],
                Duration::from_secs(5 + u64::from(count)),
            )
            .ok()?;
        if !t.output.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&t.output.stdout);
        // rtt min/avg/max/mdev = 0.030/0.041/0.052/0.011 ms
        let avg = text
            .lines()
            .find(|l| l.contains("min/avg/max"))?
            .split('=')
            .nth(1)?
            .split('/')
            .nth(1)?
            .trim()
            .parse::<f64>()
            .ok()?;
        Some(Duration::from_secs_f64(avg / 1000.0))
    }

    /// A TCP exchange: a server in `server_ns` on `ip:port` echoes what a
    /// client in `client_ns` sends. Returns the peer address the server saw.
    pub fn tcp_exchange(
        &self,
        client_ns: &str,
        server_ns: &str,
        ip: &str,
        port: u16,
    ) -> anyhow::Result<std::net::SocketAddr> {
        use std::io::{Read, Write};
        let addr: std::net::SocketAddr = format!("{ip}:{port}").parse()?;
        let listener = netns::within(&netns::path(server_ns), || TcpListener::bind(addr))??;
        let server = std::thread::spawn(move || -> std::io::Result<std::net::SocketAddr> {
            listener.set_nonblocking(false)?;
            let (mut s, peer) = listener.accept()?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf)?;
            s.write_all(&buf)?;
            Ok(peer)
        });
        let echoed = netns::within(&netns::path(client_ns), || -> std::io::Result<Vec<u8>> {
            let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            c.write_all(b"hello")?;
            let mut buf = vec![0u8; 5];
            c.read_exact(&mut buf)?;
            Ok(buf)
        })?;
        let echoed = match echoed {
            Ok(b) => b,
            Err(e) => {
                // unblock the server thread so it does not outlive the test
                let _ = netns::within(&netns::path(client_ns), || {
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                });
                bail!("tcp {client_ns} -> {addr}: {e}");
            }
        };
        let peer = server
            .join()
            .map_err(|_| anyhow!("tcp server thread panicked"))??;
        if echoed != b"hello" {
            bail!("tcp {client_ns} -> {addr}: echo mismatch");
        }
        Ok(peer)
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
        if let Some(pid) = self.st.etcd_pid.take() {
            stop_pid(pid, self.children.remove("etcd"));
        }
        for pid in std::mem::take(&mut self.st.extra_pids) {
            let child = self
                .children
                .iter()
                .find(|(_, c)| c.id() == pid)
                .map(|(k, _)| k.clone());
            stop_pid(pid, child.and_then(|k| self.children.remove(&k)));
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
