//! A real etcd (Debian's etcd-server) inside a lab namespace.

use crate::exec::ip;
use crate::netns;
use anyhow::{bail, Context};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The address etcd listens on, on the lab fabric.
pub const ETCD_IP: &str = "192.0.2.2";
/// The key prefix lab agents use.
pub const PREFIX: &str = "/trellis/v1/";
/// Its client endpoint.
pub const ETCD_ENDPOINT: &str = "http://192.0.2.2:2379";

/// Adds namespace `ns` on the fabric at [`ETCD_IP`].
pub fn make_namespace(ns: &str, fabric_ns: &str) -> anyhow::Result<()> {
    make_member_namespace(ns, fabric_ns, "etcd", ETCD_IP)
}

/// Starts etcd in `ns` with its data in `dir` and waits until it serves.
/// Fast elections (10 ms heartbeat, 100 ms election) start it in well under
/// a second.
pub fn start(ns: &str, dir: &Path) -> anyhow::Result<Child> {
    let data = dir.join("etcd-data");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("etcd.log"))?;
    let peer = format!("http://{ETCD_IP}:2380");
    let mut cmd = Command::new("etcd");
    cmd.args(["--name", "e0", "--data-dir"])
        .arg(&data)
        .args([
            "--listen-client-urls",
            &format!("{ETCD_ENDPOINT},http://127.0.0.1:2379"),
        ])
        .args(["--advertise-client-urls", ETCD_ENDPOINT])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &format!("e0={peer}")])
        .args(["--heartbeat-interval", "10", "--election-timeout", "100"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut child = netns::spawn_in(Some(&netns::path(ns)), &mut cmd)
        .context("start etcd (apt-get install etcd-server)")?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            bail!("etcd exited ({st}); see {}", dir.join("etcd.log").display());
        }
        let up = netns::within(&netns::path(ns), || {
            TcpStream::connect_timeout(
                &"127.0.0.1:2379".parse().expect("addr"),
                Duration::from_millis(100),
            )
            .is_ok()
        })
        .unwrap_or(false);
        if up {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "etcd did not listen within 15 s; see {}",
                dir.join("etcd.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// TLS files of a lab CA: the CA, and a client certificate it signed.
#[derive(Debug, Clone)]
pub struct LabTls {
    /// CA certificate (PEM).
    pub ca: std::path::PathBuf,
    /// Client certificate (PEM), CN=trellisd.
    pub cert: std::path::PathBuf,
    /// Client key (PEM).
    pub key: std::path::PathBuf,
    /// Server certificate and key for the members.
    pub server: (std::path::PathBuf, std::path::PathBuf),
}

/// Makes a CA, a server certificate valid for `ips`, and a client
/// certificate, all EC P-256, under `dir`.
pub fn make_tls(dir: &Path, ips: &[String]) -> anyhow::Result<LabTls> {
    crate::pki::ca(dir, "ca.pem", "trellis-lab-ca")?;
    let san: Vec<String> = ips
        .iter()
        .map(|i| format!("IP:{i}"))
        .chain(["IP:127.0.0.1".to_string()])
        .collect();
    crate::pki::issue(
        dir,
        "server",
        "etcd",
        "ca.pem",
        &format!(
            "subjectAltName={}\nextendedKeyUsage=serverAuth,clientAuth\n",
            san.join(",")
        ),
        "server.pem",
    )?;
    crate::pki::issue(
        dir,
        "client",
        "trellisd",
        "ca.pem",
        "extendedKeyUsage=clientAuth\n",
        "client.pem",
    )?;
    Ok(LabTls {
        ca: dir.join("ca.pem"),
        cert: dir.join("client.pem"),
        key: dir.join("client.key"),
        server: (dir.join("server.pem"), dir.join("server.key")),
    })
}

/// One member of a lab etcd cluster.
#[derive(Debug, Clone)]
pub struct Member {
    /// Member name (`m0`..).
    pub name: String,
    /// Namespace.
    pub ns: String,
    /// Address on the fabric.
    pub ip: String,
}

impl Member {
    /// Client URL.
    pub fn client_url(&self, tls: bool) -> String {
        format!("{}://{}:2379", if tls { "https" } else { "http" }, self.ip)
    }
}

/// Starts member `m` of `all` (peers over plain HTTP on the fabric, clients
/// over HTTPS with client-certificate auth when `tls` is given).
pub fn start_member(
    m: &Member,
    all: &[Member],
    dir: &Path,
    tls: Option<&LabTls>,
) -> anyhow::Result<Child> {
    let data = dir.join(format!("etcd-{}", m.name));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("etcd-{}.log", m.name)))?;
    let peer = format!("http://{}:2380", m.ip);
    let cluster: Vec<String> = all
        .iter()
        .map(|x| format!("{}=http://{}:2380", x.name, x.ip))
        .collect();
    let url = m.client_url(tls.is_some());
    let mut cmd = Command::new("etcd");
    cmd.args(["--name", &m.name, "--data-dir"])
        .arg(&data)
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args([
            "--initial-cluster",
            &cluster.join(","),
            "--initial-cluster-state",
            "new",
        ])
        .args(["--heartbeat-interval", "10", "--election-timeout", "100"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if let Some(t) = tls {
        cmd.arg("--cert-file")
            .arg(&t.server.0)
            .arg("--key-file")
            .arg(&t.server.1);
        cmd.arg("--client-cert-auth")
            .arg("--trusted-ca-file")
            .arg(&t.ca);
    }
    netns::spawn_in(Some(&netns::path(&m.ns)), &mut cmd).context("start etcd member")
}

/// Waits until `ip:2379` accepts connections from inside `ns`.
pub fn wait_listening(ns: &str, ip: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let addr: std::net::SocketAddr = format!("{ip}:2379").parse()?;
    while !netns::within(&netns::path(ns), || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok()
    })? {
        if Instant::now() > deadline {
            bail!("etcd at {addr} did not listen within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Adds namespace `ns` on the fabric at `ip_addr`, with link name `link`
/// on the fabric side and a default route through the fabric router, so
/// every segment reaches it.
pub fn make_member_namespace(
    ns: &str,
    fabric_ns: &str,
    link: &str,
    ip_addr: &str,
) -> anyhow::Result<()> {
    ip(&["netns", "add", ns])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    ip(&[
        "-n", fabric_ns, "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ])?;
    ip(&["-n", fabric_ns, "link", "set", link, "master", "br0", "up"])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{ip_addr}/24"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    ip(&["-n", ns, "route", "add", "default", "via", "192.0.2.1"])?;
    Ok(())
}
