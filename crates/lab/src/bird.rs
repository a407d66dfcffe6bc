//! BIRD 2 (Debian bird2) in a lab namespace: the real BGP peer of tests,
//! benchmarks and the demo. Each daemon has its own directory (config,
//! control socket, log) under the lab and is killed when dropped.

use crate::{exec, netns, Lab};
use anyhow::{bail, Context};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running BIRD.
pub struct Bird {
    child: Child,
    sock: PathBuf,
    dir: PathBuf,
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Bird {
    /// Starts BIRD in namespace `ns` with `conf`, in directory `name` of the
    /// lab; returns once it answers on its control socket.
    pub fn start(lab: &Lab, ns: &str, name: &str, conf: &str) -> anyhow::Result<Self> {
        let dir = lab.dir().join(name);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("bird.conf");
        std::fs::write(&path, conf)?;
        let sock = dir.join("bird.ctl");
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new("bird");
        cmd.arg("-f")
            .arg("-c")
            .arg(&path)
            .arg("-s")
            .arg(&sock)
            .arg("-P")
            .arg(dir.join("bird.pid"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("bird.log"))?);
        let child = netns::spawn_in(Some(&netns::path(ns)), &mut cmd)
            .context("start bird (apt-get install bird2)")?;
        let mut b = Self { child, sock, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if b.cmd(&["show", "status"])
                .is_ok_and(|s| s.contains("Daemon is up"))
            {
                return Ok(b);
            }
            if let Ok(Some(status)) = b.child.try_wait() {
                bail!("{name}: BIRD exited ({status}): {}", b.log());
            }
            if Instant::now() > deadline {
                bail!("{name}: BIRD did not come up: {}", b.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What BIRD wrote to stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("bird.log")).unwrap_or_default()
    }

    /// `birdc ARGS...`.
    pub fn cmd(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut c = Command::new("birdc");
        c.arg("-s").arg(&self.sock).args(args);
        Ok(exec::check(c, None, Duration::from_secs(20))?)
    }

    /// Routes in BIRD's table (`show route count`).
    pub fn route_count(&self) -> anyhow::Result<usize> {
        let out = self.cmd(&["show", "route", "count"])?;
        // "100000 of 100000 routes for 100000 networks in table master4"
        Ok(out
            .lines()
            .find_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                (w.len() > 3 && w[1] == "of" && w[3] == "routes").then(|| w[0].parse().ok())?
            })
            .unwrap_or(0))
    }

    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// BIRD on the lab's router (the fabric namespace, between the segments):
/// an iBGP route reflector for every node (AS 64512, cluster id 0.0.0.9),
/// next hop self, installing what it learns in the router's kernel so it
/// forwards pod traffic between the segments. `extra` is appended.
pub fn router(lab: &Lab, extra: &str) -> anyhow::Result<Bird> {
    let mut conf = String::from(
        "router id 192.0.2.1;\nprotocol device {}\nprotocol direct { ipv4; interface \"br*\"; }\n\
         protocol kernel { ipv4 { export where source = RTS_BGP; }; }\n\
         template bgp nodes {\n  local as 64512;\n  rr client;\n  rr cluster id 0.0.0.9;\n  direct;\n  hold time 9;\n  graceful restart on;\n  \
         ipv4 { import all; export where source = RTS_BGP || source = RTS_STATIC; next hop self; };\n}\n",
    );
    for n in &lab.state().nodes {
        let local = if n.ip.starts_with("192.0.2.") {
            "192.0.2.1"
        } else {
            "198.51.100.1"
        };
        conf.push_str(&format!(
            "protocol bgp {} from nodes {{ local {local} as 64512; neighbor {} as 64512; }}\n",
            n.name, n.ip
        ));
    }
    conf.push_str(extra);
    Bird::start(lab, &lab.fabric_ns(), "bird-router", &conf)
}

/// The BGP resources that make every node peer with the router of its
/// segment (and not with each other): pair with [`router`].
pub const SEGMENT_PEERS: &str = "apiVersion: trellis.dev/v1
kind: BGPConfiguration
metadata: {name: default}
spec: {nodeToNodeMeshEnabled: false, holdTimeSeconds: 9}
---
apiVersion: trellis.dev/v1
kind: BGPPeer
metadata: {name: router-a}
spec: {peerIP: 192.0.2.1, asNumber: 64512, nodeSubnet: 192.0.2.0/24}
---
apiVersion: trellis.dev/v1
kind: BGPPeer
metadata: {name: router-b}
spec: {peerIP: 198.51.100.1, asNumber: 64512, nodeSubnet: 198.51.100.0/24}
";
