//! `cni-add-del`: trellis against the reference `bridge` + `host-local`
//! plugins, side by side in one lab, alternating which goes first each cycle.

use anyhow::bail;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use trellis_lab::{exec, netns, Lab, LabOptions};

const REF_DIR: &str = "/usr/lib/cni";

pub fn p50(v: &mut [Duration]) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

fn run_ref(lab: &Lab, command: &str, pod_ns: &str, conf: &str) -> anyhow::Result<Duration> {
    let mut cmd = Command::new(Path::new(REF_DIR).join("bridge"));
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", pod_ns)
        .env("CNI_NETNS", netns::path(pod_ns))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", REF_DIR);
    let t = exec::run(
        cmd,
        Some(&netns::path(&lab.ns("n1"))),
        conf.as_bytes(),
        Duration::from_secs(30),
    )?;
    if !t.output.status.success() {
        bail!(
            "reference {command}: {}",
            String::from_utf8_lossy(&t.output.stdout)
        );
    }
    Ok(t.took)
}

fn run_ours(lab: &Lab, command: &str, pod: &str, conf: &str) -> anyhow::Result<Duration> {
    let t = lab.cni(command, "n1", pod, conf)?;
    if !t.output.status.success() {
        bail!(
            "trellis {command}: {}",
            String::from_utf8_lossy(&t.output.stdout)
        );
    }
    Ok(t.took)
}

/// Waits until the node has no retired veth (`tz…`) left: trellis's DEL
/// answers once the veth is out of service and the kernel's deletion runs
/// after it. Returns how long after `since` that was (±3 ms: one `ip` run).
fn settled(lab: &Lab, since: Instant) -> anyhow::Result<Duration> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let links = exec::ip(&["-n", &lab.ns("n1"), "-o", "link", "show"])?;
        if !links.lines().any(|l| l.contains(": tz")) {
            return Ok(since.elapsed());
        }
        if Instant::now() > deadline {
            bail!("retired veths still there after 10 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs `cycles` ADD+DEL cycles of each and prints the result line.
pub fn run(cycles: usize) -> anyhow::Result<()> {
    if !Path::new(REF_DIR).join("bridge").exists() {
        bail!("reference plugins not found in {REF_DIR} (apt-get install containernetworking-plugins)");
    }
    let lab = Lab::create(LabOptions::default())?;
    let ours = lab.netconf("n1", "bridge");
    let reference = serde_json::json!({
        "cniVersion": "1.0.0", "name": "refnet", "type": "bridge", "bridge": "cnr0",
        "isGateway": true, "hairpinMode": true,
        "ipam": {"type": "host-local", "subnet": "10.245.0.0/24",
                 "dataDir": lab.dir().join("ref-ipam")},
    })
    .to_string();
    let (mut oa, mut od, mut ra, mut rd) = (vec![], vec![], vec![], vec![]);
    let mut gone = vec![];
    for i in 0..cycles {
        for turn in 0..2 {
            let ours_turn = (i + turn) % 2 == 0;
            let pod = format!("b{i}");
            let ns = lab.pod_ns("n1", &pod);
            exec::ip(&["netns", "add", &ns])?;
            if ours_turn {
                oa.push(run_ours(&lab, "ADD", &pod, &ours)?);
                let start = Instant::now();
                od.push(run_ours(&lab, "DEL", &pod, &ours)?);
                // the deletion finishes before the other plugin's turn, so
                // it never slows the reference down
                gone.push(settled(&lab, start)?);
            } else {
                ra.push(run_ref(&lab, "ADD", &ns, &reference)?);
                rd.push(run_ref(&lab, "DEL", &ns, &reference)?);
            }
            exec::ip(&["netns", "del", &ns])?;
        }
    }
    let (ta, td, fa, fd) = (p50(&mut oa), p50(&mut od), p50(&mut ra), p50(&mut rd));
    let tg = p50(&mut gone);
    lab.destroy()?;
    println!(
        "trellis_add_p50_ms={ta:.2} ref_add_p50_ms={fa:.2} add_ratio={:.2} trellis_del_p50_ms={td:.2} ref_del_p50_ms={fd:.2} del_ratio={:.2} trellis_veth_gone_p50_ms={tg:.2} veth_gone_ratio={:.2}",
        ta / fa,
        td / fd,
        tg / fd
    );
    Ok(())
}
