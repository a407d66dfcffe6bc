//! Kubernetes mode of the lab: the real control plane in the control-plane
//! namespace, the project's manifests applied, and the lab playing the
//! kubelet — it registers each node as a Node (InternalIP = its underlay
//! address), creates Pod objects bound to nodes, attaches them with the
//! CNI_ARGS a kubelet sends, and patches their status so the real
//! controllers do the rest.

use super::Lab;
use crate::k8s::ControlPlane;
use anyhow::{bail, Context};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The manifests of `deploy/kubernetes/` the lab applies (all but the
/// DaemonSet and the ConfigMap, which the lab replaces: agents run as
/// processes in the node namespaces with the DaemonSet's ServiceAccount).
const MANIFESTS: [&str; 4] = [
    "00-namespace.yaml",
    "10-crds.yaml",
    "15-clusternetworkpolicies.yaml",
    "20-rbac.yaml",
];
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(20);
/// The cluster network config the control plane was built with.
const NET_CONF_FILE: &str = "k8s/net-conf.json";

/// The repository's `deploy/kubernetes/` folder.
pub fn deploy_dir() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes")
}

/// A lab pod's Pod object, when not the lab's default one.
#[derive(Debug, Clone, Default)]
pub struct PodSpec {
    /// Its namespace (created when missing).
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Its container ports: (name, protocol, port).
    pub ports: Vec<(String, String, u16)>,
}

impl Lab {
    /// The control plane's files (Kubernetes mode).
    pub fn control_plane(&self) -> anyhow::Result<ControlPlane> {
        if !self.st.kubernetes {
            bail!("lab {} does not run Kubernetes", self.st.id);
        }
        ControlPlane::new(&self.dir)
    }

    /// The admin kubeconfig; use it from the control-plane namespace:
    /// `ip netns exec NS kubectl --kubeconfig PATH ...`.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("k8s/admin.kubeconfig")
    }

    /// `kubectl ARGS` as the lab admin.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.control_plane()?
            .kubectl(&self.etcd_ns(), args, KUBECTL_TIMEOUT)
    }

    /// `kubectl ARGS` with `stdin` (e.g. `apply -f -`).
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> anyhow::Result<String> {
        self.control_plane()?.kubectl_stdin(
            &self.etcd_ns(),
            args,
            stdin.as_bytes(),
            KUBECTL_TIMEOUT,
        )
    }

    /// Brings the control plane up on the lab's etcd: PKI, API server,
    /// controller manager (podCIDRs of `net_conf`'s Network), the project's
    /// namespace, CRDs and RBAC, the ConfigMap with `net_conf`, and the
    /// agents' service-account kubeconfig.
    pub(super) fn build_control_plane(&mut self, net_conf: &str) -> anyhow::Result<()> {
        trellis_model::netconf::ClusterConfig::parse(net_conf)
            .context("the lab's cluster network config")?;
        let cp = ControlPlane::new(&self.dir)?;
        cp.make_pki()?;
        std::fs::write(self.dir.join(NET_CONF_FILE), net_conf)?;
        self.start_apiserver()?;
        self.start_controller_manager()?;
        for m in MANIFESTS {
            let path = deploy_dir().join(m);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("read {}", path.display()))?;
            self.kubectl_stdin(&["apply", "-f", "-"], &text)
                .with_context(|| format!("apply {}", path.display()))?;
        }
        let cm = serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "trellis-config", "namespace": "trellis-system"},
            "data": {"net-conf.json": net_conf},
        });
        self.kubectl_stdin(&["apply", "-f", "-"], &cm.to_string())?;
        // CRDs serve once established
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=20s",
            "crd/bgpconfigurations.trellis.dev",
            "crd/bgppeers.trellis.dev",
            "crd/nodes.trellis.dev",
            "crd/clusternetworkpolicies.policy.networking.k8s.io",
        ])?;
        cp.agent_kubeconfig(&self.etcd_ns())?;
        Ok(())
    }

    /// Starts the API server (again) and waits until it is ready.
    pub fn start_apiserver(&mut self) -> anyhow::Result<()> {
        self.apiserver(false)
    }

    /// Starts the API server listening on 127.0.0.1 of the control-plane
    /// namespace only: the agents cannot reach it, [`Lab::kubectl_local`]
    /// can — changes made "while the API server was down" as far as the
    /// agents can tell. Stop it with [`Lab::stop_apiserver`].
    pub fn start_apiserver_local_only(&mut self) -> anyhow::Result<()> {
        self.apiserver(true)
    }

    fn apiserver(&mut self, local_only: bool) -> anyhow::Result<()> {
        if self.children.contains_key("kube-apiserver") {
            bail!("the API server is running already");
        }
        let cp = ControlPlane::new(&self.dir)?;
        let child = cp.start_apiserver(&self.etcd_ns(), local_only)?;
        self.st.extra_pids.push(child.id());
        self.children.insert("kube-apiserver".into(), child);
        self.save()
    }

    /// `kubectl ARGS` against the local-only API server.
    pub fn kubectl_local(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec![crate::k8s::LOCAL_SERVER];
        all.extend_from_slice(args);
        self.kubectl(&all)
    }

    /// Stops the API server (SIGTERM, SIGKILL after 5 s).
    pub fn stop_apiserver(&mut self) -> anyhow::Result<()> {
        self.stop_extra("kube-apiserver")
    }

    /// Stops the controller manager: new Nodes get no podCIDR.
    pub fn stop_controller_manager(&mut self) -> anyhow::Result<()> {
        self.stop_extra("kube-controller-manager")
    }

    /// Starts the controller manager (again), handing out podCIDRs of the
    /// lab's cluster network.
    pub fn start_controller_manager(&mut self) -> anyhow::Result<()> {
        if self.children.contains_key("kube-controller-manager") {
            bail!("the controller manager is running already");
        }
        let text = std::fs::read_to_string(self.dir.join(NET_CONF_FILE))
            .context("the lab's cluster network config")?;
        let conf = trellis_model::netconf::ClusterConfig::parse(&text)?;
        let child = ControlPlane::new(&self.dir)?.start_controller_manager(
            &self.etcd_ns(),
            &conf.network.to_string(),
            conf.subnet_len,
        )?;
        self.st.extra_pids.push(child.id());
        self.children
            .insert("kube-controller-manager".into(), child);
        self.save()
    }

    /// Starts the real kube-proxy (nftables mode) on `node`, whose agent
    /// only routes (`LabOptions::kube_proxy`).
    pub fn start_kube_proxy(&mut self, node: &str) -> anyhow::Result<()> {
        let key = format!("kube-proxy-{node}");
        if self.children.contains_key(&key) {
            bail!("kube-proxy runs on {node} already");
        }
        let text = std::fs::read_to_string(self.dir.join(NET_CONF_FILE))
            .context("the lab's cluster network config")?;
        let conf = trellis_model::netconf::ClusterConfig::parse(&text)?;
        let child = ControlPlane::new(&self.dir)?.start_kube_proxy(
            &self.ns(node),
            node,
            &conf.network.to_string(),
        )?;
        self.st.extra_pids.push(child.id());
        self.children.insert(key, child);
        self.save()
    }

    /// Stops the kube-proxy of `node` (its nftables table stays, as after
    /// an upgrade).
    pub fn stop_kube_proxy(&mut self, node: &str) -> anyhow::Result<()> {
        self.stop_extra(&format!("kube-proxy-{node}"))
    }

    /// The PID of `node`'s kube-proxy, when it runs.
    pub fn kube_proxy_pid(&self, node: &str) -> Option<u32> {
        self.children
            .get(&format!("kube-proxy-{node}"))
            .map(|c| c.id())
    }

    /// kube-proxy's log on `node`.
    pub fn kube_proxy_log(&self, node: &str) -> std::path::PathBuf {
        self.dir.join("k8s").join(format!("kube-proxy-{node}.log"))
    }

    fn stop_extra(&mut self, name: &str) -> anyhow::Result<()> {
        let Some(child) = self.children.remove(name) else {
            bail!("{name} is not running");
        };
        let pid = child.id();
        super::stop_pid(pid, Some(child));
        self.st.extra_pids.retain(|p| *p != pid);
        self.save()
    }

    /// Registers `node` as a Node with its underlay address as InternalIP;
    /// the controller manager gives it a podCIDR.
    pub(super) fn register_node(&self, node: &str, ip: &str) -> anyhow::Result<()> {
        let n = serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node, "labels": {"kubernetes.io/hostname": node, "kubernetes.io/os": "linux"}},
        });
        self.kubectl_stdin(&["apply", "-f", "-"], &n.to_string())?;
        let status = serde_json::json!({"status": {
            "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": node}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "LabKubelet", "message": "the lab plays the kubelet"}],
        }});
        self.kubectl(&[
            "patch",
            "node",
            node,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ])?;
        Ok(())
    }

    /// Waits (`limit`) until `node` has a podCIDR; returns it.
    pub fn wait_pod_cidr(&self, node: &str, limit: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            let out = self.kubectl(&["get", "node", node, "-o", "jsonpath={.spec.podCIDR}"])?;
            if !out.trim().is_empty() {
                return Ok(out.trim().to_string());
            }
            if Instant::now() > deadline {
                bail!("node {node} got no podCIDR within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The name of the Pod object of lab pod `pod` on `node` (namespace
    /// `default`, label `app: POD`): lab pods are named per node, Pods per
    /// namespace.
    pub fn pod_object(node: &str, pod: &str) -> String {
        format!("{pod}-{node}")
    }

    /// Creates the Pod object of lab pod `pod` as `spec` says (the lab's
    /// default: `default/POD-NODE`, label `app: POD`), bound to `node`
    /// (retrying while the namespace's ServiceAccount does not exist yet);
    /// returns its UID.
    pub(super) fn create_pod_object(
        &self,
        node: &str,
        pod: &str,
        spec: Option<&PodSpec>,
    ) -> anyhow::Result<String> {
        let (ns, name) = match spec {
            Some(s) => (s.namespace.clone(), s.name.clone()),
            None => ("default".to_string(), Self::pod_object(node, pod)),
        };
        let labels = match spec {
            Some(s) => serde_json::to_value(&s.labels)?,
            None => serde_json::json!({"app": pod}),
        };
        let ports: Vec<serde_json::Value> = spec
            .map(|s| s.ports.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|(n, proto, port)| {
                serde_json::json!({"name": n, "protocol": proto, "containerPort": port})
            })
            .collect();
        let p = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node, "automountServiceAccountToken": false,
                     "containers": [{"name": "c", "image": "lab.invalid/pause", "ports": ports}]},
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.kubectl_stdin(
                &["create", "-o", "jsonpath={.metadata.uid}", "-f", "-"],
                &p.to_string(),
            ) {
                Ok(uid) => return Ok(uid.trim().to_string()),
                Err(e) if Instant::now() < deadline && e.to_string().contains("serviceaccount") => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reports Pod `ns/pod` running and ready with `ip`, as a kubelet does.
    pub(super) fn mark_pod_ready(&self, ns: &str, pod: &str, ip: &str) -> anyhow::Result<()> {
        let status = serde_json::json!({"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}],
            "containerStatuses": [{"name": "c", "ready": true, "started": true, "restartCount": 0,
                                   "image": "lab.invalid/pause", "imageID": "", "state": {"running": {}}}],
        }});
        self.kubectl(&[
            "-n",
            ns,
            "patch",
            "pod",
            pod,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ])
        .map(drop)
    }

    /// Deletes Pod `ns/pod` (no grace: there is no kubelet to wait for).
    pub(super) fn delete_pod_object(&self, ns: &str, pod: &str) -> anyhow::Result<()> {
        self.kubectl(&[
            "-n",
            ns,
            "delete",
            "pod",
            pod,
            "--grace-period=0",
            "--force",
            "--ignore-not-found",
        ])
        .map(drop)
    }
}
