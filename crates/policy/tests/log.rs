//! Denied packets logged through the kernel: an nftables `log group` rule
//! as the policy renders it, in a private network namespace, read back
//! through an NFLOG subscription and parsed into a [`Denial`].

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use trellis_dataplane::nflog::Subscription;
use trellis_dataplane::sandbox;
use trellis_policy::{Denial, LogDenied, Origin, RuleDef, Verdict};

fn cannot_run(why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "cannot run under CI: {why}"
    );
    eprintln!("skipped: {why}");
}

fn run(args: &[&str], stdin: Option<&str>) -> Result<(), String> {
    let mut c = Command::new(args[0]);
    c.args(&args[1..])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped());
    let mut child = c.spawn().map_err(|e| format!("{}: {e}", args[0]))?;
    if let Some(text) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .ok_or("no stdin")?
            .write_all(text.as_bytes())
            .map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// In a namespace of its own (this thread's): the rendered log rule on
/// output, a UDP packet to it, what the subscription reads.
fn logged_in_private_netns() -> Result<Vec<Denial>, String> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())?;
    run(&["ip", "link", "set", "lo", "up"], None)?;
    let log = LogDenied {
        rate: 5,
        group: 100,
    };
    let r = RuleDef {
        peer: None,
        ports: None,
        named: None,
        verdict: Verdict::Log(log),
        origin: Origin {
            tier: "NetworkPolicy",
            policy: "x/deny-all".into(),
            rule: None,
        },
    };
    let rule = trellis_policy::render::rule(&r, trellis_policy::Direction::Ingress);
    let script = format!(
        "table inet t {{\n chain out {{\n type filter hook output priority 0;\n udp dport 9999 {rule}\n }}\n}}\n"
    );
    run(&["nft", "-f", "-"], Some(&script))?;
    let sub = Subscription::open(log.group, 64).map_err(|e| e.to_string())?;
    // a second reader of the same group is refused, not silently starved
    if Subscription::open(log.group, 64).is_ok() {
        return Err("a second subscription to group 100 was accepted".into());
    }
    let sock = std::net::UdpSocket::bind("127.0.0.1:40000").map_err(|e| e.to_string())?;
    // 20 packets at once: the rule's limit (5/s, burst 5) logs 5 of them
    for _ in 0..20 {
        sock.send_to(b"x", "127.0.0.1:9999")
            .map_err(|e| e.to_string())?;
    }
    let mut out = Vec::new();
    let mut buf = Vec::with_capacity(1 << 16);
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        if sub.recv(&mut buf).map_err(|e| e.to_string())?.is_some() {
            out.extend(trellis_policy::log::parse(&buf));
        }
    }
    Ok(out)
}

#[test]
fn a_logged_packet_comes_back_named_and_rate_limited() {
    if !sandbox::is_root() {
        return cannot_run("a network namespace needs root");
    }
    let got = std::thread::spawn(logged_in_private_netns)
        .join()
        .expect("thread")
        .expect("logged");
    assert!(!got.is_empty(), "nothing was logged");
    assert!(got.len() <= 6, "the limit let {} of 20 through", got.len());
    let d = &got[0];
    assert_eq!(
        d.to_string(),
        "127.0.0.1:40000 -> 127.0.0.1:9999/udp denied by NetworkPolicy x/deny-all"
    );
}
