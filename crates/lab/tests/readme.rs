//! The README's command sequences and examples, read from the README
//! itself and run as written (optional `[...]` parts left out), so the
//! README cannot drift from the code: every line must exit 0 and every
//! example must do what the text says. (The two commands are CI's own
//! job; "Installing for container runtimes" writes to the host and starts
//! an agent there, so `scripts/real-clients` does the same steps inside a
//! lab, and its config file is checked here.)

mod common;
use common::*;
use std::time::Duration;
use trellis_lab::{exec, Lab, LabOptions};

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README")
}

/// The text of the first ```LANG block after `heading`.
fn block<'a>(readme: &'a str, heading: &str, lang: &str) -> &'a str {
    let after = readme
        .split_once(heading)
        .unwrap_or_else(|| panic!("README has no {heading:?}"))
        .1;
    after
        .split_once(&format!("```{lang}\n"))
        .unwrap_or_else(|| panic!("no {lang} block after {heading:?}"))
        .1
        .split_once("```")
        .expect("block end")
        .0
}

/// The lines of the first ```sh block after `heading`.
fn sh_block(readme: &str, heading: &str) -> Vec<String> {
    block(readme, heading, "sh")
        .lines()
        .map(|l| {
            // drop the comment, then every optional [...] part
            let mut l = l.split(" #").next().unwrap_or_default().to_string();
            while let (Some(a), Some(b)) = (l.find('['), l.find(']')) {
                if b < a {
                    break;
                }
                l.replace_range(a..=b, "");
            }
            l.split_whitespace().collect::<Vec<_>>().join(" ")
        })
        .filter(|l| !l.is_empty())
        .collect()
}

/// Removes the labs the README block makes, also when the test fails.
struct Labs(Vec<&'static str>);
impl Drop for Labs {
    fn drop(&mut self) {
        for name in &self.0 {
            let mut c = std::process::Command::new(trellis_lab::bin_dir().join("trellisctl"));
            c.args(["lab", "down", "--name", name]);
            let _ = exec::run(c, None, &[], Duration::from_secs(60));
        }
    }
}

#[test]
fn the_lab_section_runs_as_written() {
    if !privileged("the_lab_section_runs_as_written") {
        return;
    }
    let readme = readme();
    let lines = sh_block(&readme, "## The lab");
    assert!(lines.len() >= 10, "{lines:?}");
    let _labs = Labs(vec!["dev", "c3", "b3", "k3"]);
    // without the Kubernetes binaries (outside CI) the k3 lines are left out
    let k8s = kubernetes("the_lab_section_runs_as_written (its Kubernetes lines)");
    let path = format!(
        "{}:{}",
        trellis_lab::bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for line in lines {
        if !k8s && line.contains("--name k3") {
            continue;
        }
        let mut c = std::process::Command::new("sh");
        c.args(["-c", &line]).env("PATH", &path);
        let t = exec::run(c, None, &[], Duration::from_secs(120)).expect("run");
        assert!(
            t.output.status.success(),
            "README line `{line}` failed:\n{}{}",
            String::from_utf8_lossy(&t.output.stdout),
            String::from_utf8_lossy(&t.output.stderr)
        );
    }
}

#[test]
fn the_cluster_section_runs_as_written() {
    if !privileged("the_cluster_section_runs_as_written") {
        return;
    }
    let readme = readme();
    let lines = sh_block(&readme, "## Cluster networking");
    let [line] = lines.as_slice() else {
        panic!("one etcdctl line expected: {lines:?}")
    };
    // `etcdctl put KEY 'VALUE'`: the key the agents read, the value a config
    let key = line.split_whitespace().nth(2).expect("key");
    assert_eq!(
        key,
        format!("{}config", trellis_lab::etcd::PREFIX),
        "{line}"
    );
    let value = &line[line.find('\'').expect("quoted") + 1..line.rfind('\'').expect("quoted")];
    // the agent config of the README is accepted by the agent's parser
    let agent = trellis_agent::AgentConfig::parse(block(&readme, "and give each agent", "json"))
        .expect("the README's agent config parses");
    assert_eq!(agent.etcd.as_ref().map(|e| e.endpoints.len()), Some(2));

    // a 2-node cluster on the README's network config ...
    let mut lab = Lab::create(LabOptions {
        nodes: 2,
        cluster: Some(value.to_string()),
        ..Default::default()
    })
    .expect("lab");
    // ... where the README line itself runs against the lab's etcd
    let mut c = std::process::Command::new("sh");
    c.args(["-c", line])
        .env("ETCDCTL_API", "3")
        .env("ETCDCTL_ENDPOINTS", trellis_lab::etcd::ETCD_ENDPOINT);
    let ns = trellis_lab::netns::path(&lab.etcd_ns());
    let t = exec::run(c, Some(&ns), &[], Duration::from_secs(20)).expect("run");
    assert!(
        t.output.status.success(),
        "README line `{line}` failed: {}",
        String::from_utf8_lossy(&t.output.stderr)
    );
    let got = lab
        .etcdctl(&["get", key, "--print-value-only"])
        .expect("get");
    assert_eq!(got.trim(), value);
    // pods on both nodes reach each other over the backend the README names
    let a = lab.add_pod("n1", "a", "").expect("add a");
    let b = lab.add_pod("n2", "b", "").expect("add b");
    let wait = std::time::Instant::now() + Duration::from_secs(10);
    while lab.ping(&lab.pod_ns("n1", "a"), &b.ip, 1).is_none() {
        assert!(
            std::time::Instant::now() < wait,
            "n1/a cannot reach n2/b {}",
            b.ip
        );
    }
    assert!(lab.ping(&lab.pod_ns("n2", "b"), &a.ip, 1).is_some());
    let status = trellisctl_status(&lab, "n1");
    assert_eq!(status["backend"], "vxlan", "{status}");
}

fn trellisctl_status(lab: &Lab, node: &str) -> serde_json::Value {
    let mut c = std::process::Command::new(lab.bin_dir().join("trellisctl"));
    c.arg("status")
        .arg("--socket")
        .arg(lab.status_socket(node))
        .args(["-o", "json"]);
    let out = exec::run(c, None, &[], Duration::from_secs(10)).expect("status");
    serde_json::from_slice(&out.output.stdout).expect("status json")
}

#[test]
fn the_bgp_manifest_applies_and_deletes_as_written() {
    if !privileged("the_bgp_manifest_applies_and_deletes_as_written") {
        return;
    }
    let readme = readme();
    let manifest = block(&readme, "## BGP", "yaml");
    let lab = Lab::create(LabOptions {
        etcd: true,
        ..Default::default()
    })
    .expect("lab");
    let keys = || -> Vec<String> {
        let prefix = format!("{}bgp/", trellis_lab::etcd::PREFIX);
        let out = lab
            .etcdctl(&["get", "--prefix", &prefix, "--keys-only"])
            .expect("get");
        out.lines()
            .filter(|l| !l.is_empty())
            .map(|l| l.trim_start_matches(&prefix).to_string())
            .collect()
    };
    lab.apply(manifest)
        .expect("trellisctl apply -f README manifest");
    assert_eq!(
        keys(),
        ["configurations/default", "nodes/node-1", "peers/tor-rack-a"],
        "what the README's manifest wrote"
    );
    let peer = lab
        .etcdctl(&[
            "get",
            &format!("{}bgp/peers/tor-rack-a", trellis_lab::etcd::PREFIX),
            "--print-value-only",
        ])
        .expect("get peer");
    let peer: serde_json::Value = serde_json::from_str(peer.trim()).expect("peer json");
    assert_eq!(peer["peerIP"], "192.0.2.1", "{peer}");
    assert_eq!(peer["asNumber"], 65000, "{peer}");
    assert_eq!(peer["password"], "s3cret", "{peer}");
    lab.delete(manifest)
        .expect("trellisctl delete -f README manifest");
    assert!(keys().is_empty(), "{:?}", keys());
}

#[test]
fn the_shipped_agent_config_parses() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/trellisd.json"
    ))
    .expect("deploy/trellisd.json");
    let cfg = trellis_agent::AgentConfig::parse(&text).expect("parses");
    assert_eq!(cfg.node_name, "node-1");
    assert!(cfg.subnet.is_some());
}
