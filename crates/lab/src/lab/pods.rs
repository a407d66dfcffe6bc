//! Pods: a namespace each, attached and detached by executing the real
//! `trellis` plugin from the node's namespace, as a runtime does.

use super::{Lab, PodAttach, CNI_TIMEOUT};
use crate::exec::{self, ip, ExecError, Timed};
use crate::netns;
use crate::state::PodState;
use anyhow::{anyhow, bail, Context};
use std::process::Command;
use std::time::Duration;

impl Lab {
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

    /// The runtime environment for `command` on pod `pod` of `node`:
    /// what a kubelet passes (CNI_ARGS with the pod's namespace, name,
    /// infra container id and, in Kubernetes mode, its UID).
    pub fn cni_env(&self, command: &str, node: &str, pod: &str) -> Vec<(String, String)> {
        let ns = self.pod_ns(node, pod);
        let uid = self
            .st
            .pods
            .iter()
            .find(|p| p.node == node && p.name == pod)
            .and_then(|p| p.uid.clone())
            .map(|u| format!(";K8S_POD_UID={u}"))
            .unwrap_or_default();
        let (obj_ns, obj) = self.pod_object_of(node, pod);
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
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={obj_ns};K8S_POD_NAME={obj};\
                     K8S_POD_INFRA_CONTAINER_ID={ns}{uid}"
                ),
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
        self.add_pod_as(node, pod, mode, None)
    }

    /// The namespace and name of lab pod `pod`'s Pod object.
    pub fn pod_object_of(&self, node: &str, pod: &str) -> (String, String) {
        self.st
            .pods
            .iter()
            .find(|p| p.node == node && p.name == pod)
            .and_then(|p| p.object.clone())
            .unwrap_or_else(|| ("default".into(), Self::pod_object(node, pod)))
    }

    /// Like [`Lab::add_pod`], with the Pod object `spec` says
    /// (Kubernetes mode).
    pub fn add_pod_as(
        &mut self,
        node: &str,
        pod: &str,
        mode: &str,
        spec: Option<&super::kube::PodSpec>,
    ) -> anyhow::Result<PodAttach> {
        self.node(node)?;
        let ns = self.pod_ns(node, pod);
        ip(&["netns", "add", &ns])?;
        self.st.pods.push(PodState {
            node: node.into(),
            name: pod.into(),
            mode: mode.into(),
            ip: String::new(),
            uid: None,
            object: spec.map(|s| (s.namespace.clone(), s.name.clone())),
        });
        self.save()?;
        if self.st.kubernetes {
            let uid = self.create_pod_object(node, pod, spec)?;
            if let Some(p) = self
                .st
                .pods
                .iter_mut()
                .find(|p| p.node == node && p.name == pod)
            {
                p.uid = Some(uid);
            }
            self.save()?;
        }
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
        if self.st.kubernetes {
            let (ns, name) = self.pod_object_of(node, pod);
            self.mark_pod_ready(&ns, &name, &ip)?;
        }
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
        if self.st.kubernetes {
            let (ns, name) = self.pod_object_of(node, pod);
            self.delete_pod_object(&ns, &name)?;
        }
        self.st.pods.retain(|p| !(p.node == node && p.name == pod));
        self.save()?;
        Ok(t.took)
    }
}
