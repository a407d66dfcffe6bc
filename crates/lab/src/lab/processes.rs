//! The lab's processes: etcd (one member or a 3-member cluster), the
//! agents (started, frozen, stopped, decommissioned) and the CLI against
//! the lab's etcd.

use super::{stop_pid, Lab, AGENT_WAIT};
use crate::exec;
use crate::netns;
use anyhow::{anyhow, bail, Context};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

impl Lab {
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

    /// BGP resources of `manifest` into the lab's datastore, as a user
    /// would: `trellisctl apply -f` against etcd, `kubectl apply -f`
    /// against the API server in Kubernetes mode. Returns what it printed.
    pub fn apply(&self, manifest: &str) -> anyhow::Result<String> {
        if self.st.kubernetes {
            return self.kubectl_stdin(&["apply", "-f", "-"], manifest);
        }
        self.trellisctl_manifest("apply", manifest)
    }

    /// The resources named in `manifest` out of the datastore (`trellisctl
    /// delete -f`, or `kubectl delete -f` in Kubernetes mode).
    pub fn delete(&self, manifest: &str) -> anyhow::Result<String> {
        if self.st.kubernetes {
            return self.kubectl_stdin(&["delete", "-f", "-"], manifest);
        }
        self.trellisctl_manifest("delete", manifest)
    }

    /// `trellisctl apply -f` of `manifest`, in either datastore.
    pub fn trellisctl_apply(&self, manifest: &str) -> anyhow::Result<String> {
        self.trellisctl_manifest("apply", manifest)
    }

    /// `trellisctl delete -f` of `manifest`, in either datastore.
    pub fn trellisctl_delete(&self, manifest: &str) -> anyhow::Result<String> {
        self.trellisctl_manifest("delete", manifest)
    }

    fn trellisctl_manifest(&self, verb: &str, manifest: &str) -> anyhow::Result<String> {
        let file = self.dir.join(format!("manifest-{verb}.yaml"));
        std::fs::write(&file, manifest)?;
        let file = file.to_string_lossy().into_owned();
        self.trellisctl(&[verb, "-f", &file])
    }

    /// `trellisctl ARGS` from the control-plane namespace, pointed at the
    /// lab's datastore (through `TRELLIS_DATASTORE`, `KUBECONFIG`,
    /// `TRELLIS_ETCD_*`): etcd, or the API server in Kubernetes mode.
    /// Fails with its stderr when it fails.
    pub fn trellisctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new(self.bin.join("trellisctl"));
        cmd.args(args)
            .env("TRELLIS_ETCD_ENDPOINTS", crate::etcd::ETCD_ENDPOINT)
            .env("TRELLIS_ETCD_PREFIX", crate::etcd::PREFIX);
        if self.st.kubernetes {
            cmd.env("TRELLIS_DATASTORE", "kubernetes")
                .env("KUBECONFIG", self.kubeconfig());
        } else {
            cmd.env("TRELLIS_DATASTORE", "etcd");
        }
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

    /// Waits (at most `timeout`) for `node`'s agent to exit by itself;
    /// returns its exit status. Fails if it is still running at the end.
    pub fn wait_agent_exit(
        &mut self,
        node: &str,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self
                .children
                .get_mut(node)
                .ok_or_else(|| anyhow!("{node}: no agent started by this process"))?;
            if let Some(status) = child.try_wait()? {
                self.children.remove(node);
                if let Some(n) = self.st.nodes.iter_mut().find(|n| n.name == node) {
                    n.agent_pid = None;
                }
                self.save()?;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{node}: the agent still runs after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
