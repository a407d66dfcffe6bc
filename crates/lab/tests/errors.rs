//! Every CNI error class, DEL idempotency, versions, CHECK, STATUS and GC,
//! each asserting that no link or allocation is left behind.

mod common;
use common::*;
use trellis_lab::{exec, netns, Lab};

fn env_of(lab: &Lab, cmd: &str, pod: &str) -> Vec<(String, String)> {
    lab.cni_env(cmd, "n1", pod)
}

fn call(lab: &Lab, env: &[(String, String)], stdin: &str) -> (i32, serde_json::Value) {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let t = lab
        .cni_raw("n1", &env, stdin.as_bytes())
        .expect("run plugin");
    let code = t.output.status.code().unwrap_or(-1);
    let out = if t.output.stdout.is_empty() {
        serde_json::Value::Null
    } else {
        stdout_json(&t)
    };
    (code, out)
}

fn set(env: &mut Vec<(String, String)>, key: &str, value: Option<&str>) {
    env.retain(|(k, _)| k != key);
    if let Some(v) = value {
        env.push((key.into(), v.into()));
    }
}

fn assert_clean(lab: &Lab) {
    assert!(
        pod_veths(&lab.ns("n1")).is_empty(),
        "links left: {:?}",
        pod_veths(&lab.ns("n1"))
    );
    assert!(
        allocations(lab, "n1").is_empty(),
        "allocations left: {:?}",
        allocations(lab, "n1")
    );
}

fn assert_error(lab: &Lab, env: &[(String, String)], stdin: &str, code: u64, needle: &str) {
    let (rc, out) = call(lab, env, stdin);
    assert_ne!(rc, 0, "{out}");
    assert_eq!(out["code"], code, "{out}");
    assert!(
        out["msg"].as_str().unwrap_or_default().contains(needle),
        "msg lacks {needle:?}: {out}"
    );
    assert!(out["cniVersion"].is_string(), "{out}");
    assert_clean(lab);
}

#[test]
fn error_classes_leave_nothing_behind() {
    if !privileged("error_classes_leave_nothing_behind") {
        return;
    }
    let lab = lab(1);
    let pod = "e1";
    exec::ip(&["netns", "add", &lab.pod_ns("n1", pod)]).expect("netns");
    let conf = lab.netconf("n1", "bridge");
    let add = env_of(&lab, "ADD", pod);

    // 1: incompatible version
    assert_error(&lab, &add, &conf.replace("1.1.0", "0.2.0"), 1, "0.2.0");
    // 4: missing / invalid environment
    let mut e = add.clone();
    set(&mut e, "CNI_NETNS", None);
    assert_error(&lab, &e, &conf, 4, "CNI_NETNS");
    set(&mut e, "CNI_NETNS", Some("/var/run/netns/does-not-exist"));
    assert_error(&lab, &e, &conf, 4, "does-not-exist");
    set(&mut e, "CNI_NETNS", Some("/etc/hostname"));
    assert_error(&lab, &e, &conf, 4, "not a network namespace");
    let node_ns = netns::path(&lab.ns("n1")).to_string_lossy().into_owned();
    set(&mut e, "CNI_NETNS", Some(&node_ns));
    assert_error(&lab, &e, &conf, 4, "node's own network namespace");
    let mut e = add.clone();
    set(&mut e, "CNI_COMMAND", Some("FROB"));
    assert_error(&lab, &e, &conf, 4, "FROB");
    let mut e = add.clone();
    set(&mut e, "CNI_IFNAME", Some("much-too-long-name"));
    assert_error(&lab, &e, &conf, 4, "CNI_IFNAME");
    let mut e = add.clone();
    set(&mut e, "CNI_CONTAINERID", None);
    assert_error(&lab, &e, &conf, 4, "CNI_CONTAINERID");
    // 6: undecodable config
    assert_error(&lab, &add, "{\"cniVersion\": ", 6, "not valid JSON");
    // 7: invalid config, naming the field
    assert_error(
        &lab,
        &add,
        &conf.replace("\"bridge\"", "\"nat\""),
        7,
        "mode",
    );
    // 3: CHECK of an unknown container
    assert_error(&lab, &env_of(&lab, "CHECK", pod), &conf, 3, "not attached");
    // 11: agent unreachable, naming the socket it tried
    let gone = conf.replace("n1.sock", "nowhere.sock");
    assert_error(&lab, &add, &gone, 11, "nowhere.sock");
    // a kernel failure half way (the pod already has "lo"): rolled back
    let mut e = add.clone();
    set(&mut e, "CNI_IFNAME", Some("lo"));
    assert_error(&lab, &e, &conf, 100, "create veth");
    // and the pod still attaches afterwards
    let (rc, out) = call(&lab, &add, &conf);
    assert_eq!(rc, 0, "{out}");
    // a second ADD of the same attachment is refused and changes nothing
    let (rc, dup) = call(&lab, &add, &conf);
    assert_ne!(rc, 0);
    assert_eq!(dup["code"], 104, "{dup}");
    assert_eq!(allocations(&lab, "n1").len(), 1);
    let (rc, _) = call(&lab, &env_of(&lab, "DEL", pod), &conf);
    assert_eq!(rc, 0);
    assert_clean(&lab);
}

#[test]
fn agent_down_is_code_11() {
    if !privileged("agent_down_is_code_11") {
        return;
    }
    let mut lab = lab(1);
    exec::ip(&["netns", "add", &lab.pod_ns("n1", "x")]).expect("netns");
    lab.stop_agent("n1").expect("stop");
    let (rc, out) = call(
        &lab,
        &env_of(&lab, "ADD", "x"),
        &lab.netconf("n1", "routed"),
    );
    assert_ne!(rc, 0);
    assert_eq!(out["code"], 11, "{out}");
    assert!(
        out["msg"]
            .as_str()
            .expect("msg")
            .contains(&lab.socket("n1").to_string_lossy().into_owned()),
        "{out}"
    );
    assert!(pod_veths(&lab.ns("n1")).is_empty());
}

#[test]
fn del_is_idempotent() {
    if !privileged("del_is_idempotent") {
        return;
    }
    let mut lab = lab(1);
    let conf = lab.netconf("n1", "routed");
    // unknown container
    assert_eq!(call(&lab, &env_of(&lab, "DEL", "never"), &conf).0, 0);
    // twice in a row, the second with an empty CNI_NETNS
    lab.add_pod("n1", "a", "routed").expect("add");
    let del = env_of(&lab, "DEL", "a");
    assert_eq!(call(&lab, &del, &conf).0, 0);
    let mut empty = del.clone();
    set(&mut empty, "CNI_NETNS", Some(""));
    assert_eq!(call(&lab, &empty, &conf).0, 0);
    assert_clean(&lab);
    // the netns vanished before DEL: still frees the address
    lab.add_pod("n1", "b", "bridge").expect("add");
    exec::ip(&["netns", "del", &lab.pod_ns("n1", "b")]).expect("del netns");
    assert_eq!(
        call(
            &lab,
            &env_of(&lab, "DEL", "b"),
            &lab.netconf("n1", "bridge")
        )
        .0,
        0
    );
    assert_clean(&lab);
}

#[test]
fn versions_check_status_gc() {
    if !privileged("versions_check_status_gc") {
        return;
    }
    let lab = lab(1);
    // VERSION
    let (rc, v) = call(&lab, &[("CNI_COMMAND".into(), "VERSION".into())], "");
    assert_eq!(rc, 0);
    assert_eq!(
        v["supportedVersions"],
        serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    // results in the shape of each version
    for (i, ver) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
        .iter()
        .enumerate()
    {
        let pod = format!("v{i}");
        exec::ip(&["netns", "add", &lab.pod_ns("n1", &pod)]).expect("netns");
        let conf = lab.netconf("n1", "bridge").replace("1.1.0", ver);
        let (rc, out) = call(&lab, &env_of(&lab, "ADD", &pod), &conf);
        assert_eq!(rc, 0, "{out}");
        assert_eq!(out["cniVersion"], *ver);
        assert_eq!(
            out["ips"][0].get("version").is_some(),
            ver.starts_with('0'),
            "{out}"
        );
        // CHECK from 0.4.0 on, with prevResult
        let mut with_prev: serde_json::Value = serde_json::from_str(&conf).expect("conf");
        with_prev["prevResult"] = out.clone();
        let (rc, chk) = call(&lab, &env_of(&lab, "CHECK", &pod), &with_prev.to_string());
        if *ver == "0.3.0" || *ver == "0.3.1" {
            assert_eq!(chk["code"], 1, "CHECK not allowed before 0.4.0: {chk}");
        } else {
            assert_eq!(rc, 0, "CHECK {ver}: {chk}");
        }
    }
    // CHECK notices a missing piece
    let conf = lab.netconf("n1", "bridge");
    exec::ip(&["-n", &lab.pod_ns("n1", "v4"), "route", "del", "default"]).expect("break route");
    let (rc, chk) = call(&lab, &env_of(&lab, "CHECK", "v4"), &conf);
    assert_ne!(rc, 0);
    assert_eq!(chk["code"], 101, "{chk}");
    // STATUS
    let status = [("CNI_COMMAND".to_string(), "STATUS".to_string())];
    assert_eq!(call(&lab, &status, &conf).0, 0);
    // GC: only v0 and v1 are still valid; the rest lose veth and address
    let mut gc: serde_json::Value = serde_json::from_str(&conf).expect("conf");
    gc["cni.dev/valid-attachments"] = serde_json::json!([
        {"containerID": lab.pod_ns("n1", "v0"), "ifname": "eth0"},
        {"containerID": lab.pod_ns("n1", "v1"), "ifname": "eth0"},
    ]);
    let (rc, out) = call(
        &lab,
        &[("CNI_COMMAND".into(), "GC".into())],
        &gc.to_string(),
    );
    assert_eq!(rc, 0, "{out}");
    assert_eq!(allocations(&lab, "n1").len(), 2);
    assert_eq!(pod_veths(&lab.ns("n1")).len(), 2);
    assert_ping(&lab, &lab.ns("n1"), "10.244.1.2");
}

#[test]
fn ipip_is_refused_naming_the_missing_kernel_feature() {
    if !privileged("ipip_is_refused_naming_the_missing_kernel_feature") {
        return;
    }
    let mut lab = trellis_lab::Lab::create(trellis_lab::LabOptions {
        nodes: 0,
        cluster: Some(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"ipip"}}"#.into()),
        ..Default::default()
    })
    .expect("lab");
    let e = lab.add_node().expect_err("the agent refuses ipip");
    let log = std::fs::read_to_string(lab.agent_log("n1")).unwrap_or_default();
    // what the kernel really says, asked the way iproute2 asks
    let has_ipip = trellis_lab::exec::ip(&[
        "-n",
        &lab.ns("n1"),
        "link",
        "add",
        "ipip-check",
        "type",
        "ipip",
    ])
    .is_ok();
    if has_ipip {
        let _ = trellis_lab::exec::ip(&["-n", &lab.ns("n1"), "link", "del", "ipip-check"]);
        assert!(log.contains("does not program IPIP"), "{e:#}\n{log}");
    } else {
        assert!(
            log.contains("no ipip driver") && log.contains("CONFIG_NET_IPIP"),
            "{e:#}\n{log}"
        );
    }
    // the probe left nothing behind
    assert!(
        !links(&lab.ns("n1")).iter().any(|l| l.contains("probe")),
        "{:?}",
        links(&lab.ns("n1"))
    );
}
