//! A real Kubernetes v1.36.2 control plane for the lab: etcd (the lab's),
//! kube-apiserver and kube-controller-manager in the control-plane
//! namespace (192.0.2.2), a lab CA, an admin token for the lab and
//! kubectl, and a service-account token for the agents (so they run with
//! the DaemonSet's RBAC, never as admin).
//!
//! The binaries come from `TRELLIS_K8S_BIN`, else from the shared folder's
//! `install` script (`../shared/k8s/install`), else the lab refuses with
//! how to get them.

use crate::exec;
use crate::netns;
use crate::pki::openssl;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The version the lab runs and tests against.
pub const K8S_VERSION: &str = "v1.36.2";
/// The API server's address on the fabric (the control-plane namespace).
pub const API_IP: &str = crate::etcd::ETCD_IP;
/// kubectl's flag for an API server started local-only.
pub const LOCAL_SERVER: &str = "--server=https://127.0.0.1:6443";
/// Its port.
pub const API_PORT: u16 = 6443;
/// The Service network.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// Binaries the lab needs.
pub const BINARIES: [&str; 3] = ["kube-apiserver", "kube-controller-manager", "kubectl"];
const ADMIN_TOKEN_FILE: &str = "admin.token";

/// How a user gets the binaries.
pub fn how_to_get() -> String {
    format!(
        "the Kubernetes {K8S_VERSION} binaries ({}) are needed: set TRELLIS_K8S_BIN to a folder \
         holding them (e.g. from https://dl.k8s.io/release/{K8S_VERSION}/bin/linux/amd64/ or a \
         {K8S_VERSION} source build: `make WHAT=\"cmd/kube-apiserver cmd/kube-controller-manager \
         cmd/kubectl\"`), or keep the project's shared folder next to the repository \
         (../shared/k8s/install)",
        BINARIES.join(", ")
    )
}

fn shared_install() -> Option<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    [
        repo.join("../shared/k8s/install"),
        PathBuf::from("../shared/k8s/install"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// The folder holding the binaries (unpacked from the shared folder on
/// first use into `/var/cache/trellis/k8s-v1.36.2`).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("TRELLIS_K8S_BIN") {
        Some(d) => PathBuf::from(d),
        None => {
            let Some(install) = shared_install() else {
                bail!("{}", how_to_get());
            };
            let target = PathBuf::from(format!("/var/cache/trellis/k8s-{K8S_VERSION}"));
            if !BINARIES.iter().all(|b| target.join(b).is_file()) {
                let mut c = Command::new(&install);
                c.arg(&target);
                exec::check(c, None, Duration::from_secs(300))
                    .with_context(|| format!("{} {}", install.display(), target.display()))?;
            }
            target
        }
    };
    for b in BINARIES {
        if !dir.join(b).is_file() {
            bail!("{} has no {b}: {}", dir.display(), how_to_get());
        }
    }
    Ok(dir)
}

/// The control plane's files.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    /// Where they are.
    pub dir: PathBuf,
    /// The binaries.
    pub bin: PathBuf,
}

impl ControlPlane {
    /// The files under `lab_dir/k8s` and the binaries.
    pub fn new(lab_dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            dir: lab_dir.join("k8s"),
            bin: bin_dir()?,
        })
    }

    /// The admin kubeconfig: `kubectl --kubeconfig THIS` inside the
    /// control-plane namespace (`ip netns exec`), or from any lab
    /// namespace.
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The API server's URL on the fabric.
    pub fn server() -> String {
        format!("https://{API_IP}:{API_PORT}")
    }

    /// CA, serving certificate, service-account keys, the admin token and
    /// kubeconfig.
    pub fn make_pki(&self) -> anyhow::Result<()> {
        let d = &self.dir;
        crate::pki::ca(d, "ca.crt", "trellis-lab-k8s-ca")?;
        crate::pki::issue(
            d,
            "apiserver",
            "kube-apiserver",
            "ca.crt",
            &format!(
                "subjectAltName=IP:{API_IP},IP:127.0.0.1,IP:10.96.0.1,DNS:kubernetes,\
                 DNS:kubernetes.default,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n"
            ),
            "apiserver.crt",
        )?;
        openssl(
            d,
            &[
                "ecparam",
                "-genkey",
                "-name",
                "prime256v1",
                "-noout",
                "-out",
                "sa.key",
            ],
        )?;
        openssl(d, &["ec", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
        let token = random_token()?;
        std::fs::write(d.join(ADMIN_TOKEN_FILE), &token)?;
        // kube-proxy (the peer of the Service proxy) as system:kube-proxy:
        // the built-in system:node-proxier binding gives it its rights
        let proxy_token = random_token()?;
        std::fs::write(
            d.join("tokens.csv"),
            format!(
                "{token},lab-admin,lab-admin,\"system:masters\"\n{proxy_token},system:kube-proxy,kube-proxy,\"\"\n"
            ),
        )?;
        std::fs::write(
            d.join("kube-proxy.kubeconfig"),
            kubeconfig(&Self::server(), &self.ca(), &proxy_token),
        )?;
        std::fs::write(
            self.admin_kubeconfig(),
            kubeconfig(&Self::server(), &self.ca(), &token),
        )?;
        Ok(())
    }

    fn spawn(&self, ns: &str, name: &str, args: &[String]) -> anyhow::Result<Child> {
        self.spawn_logged(ns, name, name, args)
    }

    fn spawn_logged(
        &self,
        ns: &str,
        name: &str,
        log: &str,
        args: &[String],
    ) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{log}.log")))?;
        let mut cmd = Command::new(self.bin.join(name));
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        netns::spawn_in(Some(&netns::path(ns)), &mut cmd)
            .with_context(|| format!("start {}", self.bin.join(name).display()))
    }

    /// Starts kube-apiserver in `ns` on the lab's etcd and waits (30 s at
    /// most) until `/readyz` answers. `local_only`: it listens on
    /// 127.0.0.1 only, so the nodes (and their agents) cannot reach it
    /// while kubectl in `ns` can, with [`LOCAL_SERVER`].
    pub fn start_apiserver(&self, ns: &str, local_only: bool) -> anyhow::Result<Child> {
        let d = self.dir.display();
        let args: Vec<String> = [
            "--etcd-servers=http://127.0.0.1:2379".to_string(),
            format!(
                "--bind-address={}",
                if local_only { "127.0.0.1" } else { "0.0.0.0" }
            ),
            format!("--secure-port={API_PORT}"),
            format!("--advertise-address={API_IP}"),
            // the `kubernetes` Service's endpoint (192.0.2.2:6443), which
            // the Service proxy serves; the local-only server stays out
            format!(
                "--endpoint-reconciler-type={}",
                if local_only { "none" } else { "lease" }
            ),
            format!("--tls-cert-file={d}/apiserver.crt"),
            format!("--tls-private-key-file={d}/apiserver.key"),
            format!("--client-ca-file={d}/ca.crt"),
            format!("--token-auth-file={d}/tokens.csv"),
            "--authorization-mode=Node,RBAC".into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={d}/sa.pub"),
            format!("--service-account-signing-key-file={d}/sa.key"),
            "--allow-privileged=true".into(),
        ]
        .into();
        let mut child = self.spawn(ns, "kube-apiserver", &args)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                bail!(
                    "kube-apiserver exited ({st}); see {}",
                    self.dir.join("kube-apiserver.log").display()
                );
            }
            let probe: &[&str] = if local_only {
                &[LOCAL_SERVER, "get", "--raw", "/readyz"]
            } else {
                &["get", "--raw", "/readyz"]
            };
            if self.kubectl(ns, probe, Duration::from_secs(5)).is_ok() {
                return Ok(child);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "kube-apiserver not ready within 30 s; see {}",
                    self.dir.join("kube-apiserver.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Starts kube-controller-manager in `ns`: node IPAM hands out /`mask`
    /// podCIDRs of `cluster_cidr`; no node-lifecycle controller (lab nodes
    /// send no kubelet heartbeats).
    pub fn start_controller_manager(
        &self,
        ns: &str,
        cluster_cidr: &str,
        mask: u8,
    ) -> anyhow::Result<Child> {
        let d = self.dir.display();
        let args: Vec<String> = [
            format!("--kubeconfig={}", self.admin_kubeconfig().display()),
            "--leader-elect=false".into(),
            "--allocate-node-cidrs=true".into(),
            format!("--cluster-cidr={cluster_cidr}"),
            format!("--node-cidr-mask-size={mask}"),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            format!("--service-account-private-key-file={d}/sa.key"),
            format!("--root-ca-file={d}/ca.crt"),
            "--use-service-account-credentials=false".into(),
            "--controllers=*,-cloud-node-lifecycle-controller,-node-lifecycle-controller".into(),
        ]
        .into();
        self.spawn(ns, "kube-controller-manager", &args)
    }

    /// `kubectl ARGS` as the lab admin, from namespace `ns`.
    pub fn kubectl(&self, ns: &str, args: &[&str], timeout: Duration) -> anyhow::Result<String> {
        self.kubectl_stdin(ns, args, &[], timeout)
    }

    /// `kubectl ARGS` with `stdin`.
    pub fn kubectl_stdin(
        &self,
        ns: &str,
        args: &[&str],
        stdin: &[u8],
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let mut c = Command::new(self.bin.join("kubectl"));
        c.arg("--kubeconfig")
            .arg(self.admin_kubeconfig())
            .arg(format!("--request-timeout={}s", timeout.as_secs().max(1)))
            .args(args);
        let t = exec::run(
            c,
            Some(&netns::path(ns)),
            stdin,
            timeout + Duration::from_secs(5),
        )?;
        if !t.output.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&t.output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&t.output.stdout).into_owned())
    }

    /// Starts the real kube-proxy (nftables mode) in node namespace `ns`
    /// as Node `node` (`address` its InternalIP): the Service proxy's peer.
    /// Its log is `kube-proxy-NODE.log`, its metrics on 127.0.0.1:10249 of
    /// that namespace. Conntrack limits are left alone (not writable
    /// outside the initial namespace).
    pub fn start_kube_proxy(
        &self,
        ns: &str,
        node: &str,
        cluster_cidr: &str,
    ) -> anyhow::Result<Child> {
        let cfg = self.dir.join(format!("kube-proxy-{node}.yaml"));
        std::fs::write(
            &cfg,
            serde_json::json!({
                "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                "kind": "KubeProxyConfiguration",
                "mode": "nftables",
                "clientConnection": {"kubeconfig": self.dir.join("kube-proxy.kubeconfig")},
                "hostnameOverride": node,
                "clusterCIDR": cluster_cidr,
                "conntrack": {"maxPerCore": 0, "min": 0},
                "metricsBindAddress": "127.0.0.1:10249",
                "healthzBindAddress": "0.0.0.0:10256",
            })
            .to_string(),
        )?;
        self.spawn_logged(
            ns,
            "kube-proxy",
            &format!("kube-proxy-{node}"),
            &[format!("--config={}", cfg.display())],
        )
    }

    /// A kubeconfig for the agents: the ServiceAccount `trellis` of the
    /// DaemonSet's manifests with a TokenRequest token (48 h).
    pub fn agent_kubeconfig(&self, ns: &str) -> anyhow::Result<PathBuf> {
        let token = self.kubectl(
            ns,
            &[
                "-n",
                "trellis-system",
                "create",
                "token",
                "trellis",
                "--duration=48h",
            ],
            Duration::from_secs(10),
        )?;
        let path = self.dir.join("agent.kubeconfig");
        std::fs::write(&path, kubeconfig(&Self::server(), &self.ca(), token.trim()))?;
        Ok(path)
    }
}

fn kubeconfig(server: &str, ca: &Path, token: &str) -> String {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "lab",
        "clusters": [{"name": "lab", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": "lab", "user": {"token": token}}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "lab"}}],
    })
    .to_string()
}

fn random_token() -> anyhow::Result<String> {
    let mut buf = [0u8; 16];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}
