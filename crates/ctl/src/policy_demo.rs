//! The policy part of the Kubernetes demo: NetworkPolicy and
//! ClusterNetworkPolicy enforced by trellis in the kernel, on the objects
//! of the real API server. Every line is a probe whose outcome is checked
//! against what the policies say; a mismatch prints FAIL and counts.

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use trellis_lab::{Lab, Outcome};

const PORT: u16 = 9090;
const T: Duration = Duration::from_millis(700);

const DENY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-deny-all, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
";

const ALLOW_CLI: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-cli, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
    - from: [{podSelector: {matchLabels: {app: cli}}}]
      ports: [{port: 9090}]
";

const ADMIN_DENY: &str = "apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: quarantine-cli}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {}}
  ingress:
    - name: no-cli
      action: Deny
      from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: cli}}}}]
";

/// Probes until the outcome is `want` (at most 5 s from `t`): when the
/// first probe with that outcome was sent, after `t`.
fn until(lab: &Lab, ns: &str, to: SocketAddr, want: bool, t: Instant) -> Option<Duration> {
    while t.elapsed() < Duration::from_secs(5) {
        let sent = t.elapsed();
        let answered = matches!(lab.probe_tcp(ns, to, T), Outcome::Answered { .. });
        if answered == want {
            return Some(sent);
        }
    }
    None
}

/// One line: `manifest` applied (or deleted), then probes until the
/// outcome is `want`.
fn step(
    lab: &Lab,
    cli: &str,
    to: SocketAddr,
    what: &str,
    manifest: Option<(&str, &str)>,
    want: bool,
) -> anyhow::Result<bool> {
    if let Some((verb, m)) = manifest {
        lab.kubectl_stdin(&[verb, "-f", "-"], m)?;
    }
    // from the API server's answer to kubectl
    let t = Instant::now();
    let took = until(lab, cli, to, want, t);
    println!(
        "{what:<62} n1/cli -> n2/web:{} {:<9} {}",
        to.port(),
        if want { "answered" } else { "dropped" },
        match took {
            Some(_) if manifest.is_none() => String::new(),
            Some(d) => format!(
                "(a probe sent {:.0} ms after the write)",
                d.as_secs_f64() * 1e3
            ),
            None => "FAIL".into(),
        }
    );
    Ok(took.is_some())
}

/// Runs the policy part on the demo's lab (pods `web` on n1..n3, `cli`
/// on n1); returns the number of failed checks.
pub fn run(lab: &Lab) -> anyhow::Result<usize> {
    println!("\n-- NetworkPolicy and ClusterNetworkPolicy, enforced by trellis in the kernel --");
    let mut failures = 0;
    let web_ip = lab.pod_ip("n2", "web")?;
    let cli_ip = lab.pod_ip("n1", "cli")?;
    let _server = lab.serve("n2", "web", PORT)?;
    let cli = lab.pod_ns("n1", "cli");
    let to: SocketAddr = format!("{web_ip}:{PORT}").parse()?;
    failures += usize::from(!step(lab, &cli, to, "no policy", None, true)?);
    failures += usize::from(!step(
        lab,
        &cli,
        to,
        "$ kubectl apply NetworkPolicy web-deny-all (ingress)",
        Some(("apply", DENY)),
        false,
    )?);
    failures += usize::from(!step(
        lab,
        &cli,
        to,
        "$ kubectl apply NetworkPolicy web-from-cli (port 9090)",
        Some(("apply", ALLOW_CLI)),
        true,
    )?);
    failures += usize::from(!step(
        lab,
        &cli,
        to,
        "$ kubectl apply ClusterNetworkPolicy quarantine-cli (Admin)",
        Some(("apply", ADMIN_DENY)),
        false,
    )?);
    // what decided, as n2's agent evaluates the table it loaded
    let mut c = std::process::Command::new(lab.bin_dir().join("trellisctl"));
    c.args(["policy", "trace", &cli_ip, &web_ip, &format!("{PORT}/tcp")]);
    match trellis_lab::exec::check(
        c,
        Some(&trellis_lab::netns::path(&lab.ns("n2"))),
        Duration::from_secs(10),
    ) {
        Ok(t) => {
            let ok = t.starts_with("DENIED") && t.contains("Admin quarantine-cli rule 0");
            failures += usize::from(!ok);
            println!("\n$ trellisctl policy trace {cli_ip} {web_ip} {PORT}/tcp   (on n2)");
            print!("{t}");
            if !ok {
                println!("FAIL: the trace should name the Admin tier's quarantine-cli");
            }
        }
        Err(e) => {
            failures += 1;
            println!("FAIL: trellisctl policy trace: {e}");
        }
    }
    failures += usize::from(!step(
        lab,
        &cli,
        to,
        "$ kubectl delete ClusterNetworkPolicy quarantine-cli",
        Some(("delete", ADMIN_DENY)),
        true,
    )?);
    lab.kubectl_stdin(&["delete", "-f", "-"], ALLOW_CLI)?;
    lab.kubectl_stdin(&["delete", "-f", "-"], DENY)?;
    Ok(failures)
}
