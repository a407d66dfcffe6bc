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
    ip(&["netns", "add", ns])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    ip(&[
        "-n", fabric_ns, "link", "add", "etcd", "type", "veth", "peer", "name", "eth0", "netns", ns,
    ])?;
    ip(&[
        "-n", fabric_ns, "link", "set", "etcd", "master", "br0", "up",
    ])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{ETCD_IP}/24"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    // reachable from every segment through the fabric router
    ip(&["-n", ns, "route", "add", "default", "via", "192.0.2.1"])?;
    Ok(())
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
