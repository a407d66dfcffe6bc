//! `trellis-bench`: side-by-side benchmarks in lab namespaces. Each ends
//! with one `key=value` line.
//!
//! - `cni-add-del [--cycles N]`: trellis vs the reference bridge + host-local.
//! - `converge [--nodes N]`: one real agent programming N simulated nodes.
//! - `throughput [--runs N] [--seconds S]`: iperf3 pod-to-pod per backend vs node-to-node.
//! - `bgp-converge [--nodes N]`: N speakers, full mesh and one reflector.
//! - `bgp-ingest [--prefixes P] [--rounds R]`: a BIRD feed into trellis and into BIRD.
//! - `proxy-sync`, `proxy-latency`: the Service proxy against kube-proxy.

mod api;
mod bgp;
mod cni;
mod converge;
mod k8s;
mod nftmon;
mod policy;
mod proxy;
mod throughput;

use anyhow::{bail, Context};

fn flag(args: &[String], name: &str, default: usize) -> anyhow::Result<usize> {
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(args
            .get(i + 1)
            .with_context(|| format!("{name} needs a number"))?
            .parse()?),
        None => Ok(default),
    }
}

/// The flags each benchmark takes (each with a number).
const FLAGS: [(&str, &[&str]); 10] = [
    ("cni-add-del", &["--cycles"]),
    ("converge", &["--nodes"]),
    ("bgp-converge", &["--nodes"]),
    ("bgp-ingest", &["--prefixes", "--rounds"]),
    ("k8s-converge", &["--nodes"]),
    (
        "proxy-sync",
        &[
            "--small",
            "--large",
            "--huge",
            "--trellis-only",
            "--cold",
            "--both",
        ],
    ),
    ("proxy-latency", &["--small", "--large", "--connects"]),
    ("policy-scale", &["--policies", "--pods", "--local"]),
    ("policy-latency", &["--policies", "--connects"]),
    ("throughput", &["--runs", "--seconds"]),
];

/// Refuses flags the benchmark does not take (a typo would otherwise run
/// a long benchmark with its defaults).
fn check_flags(args: &[String]) -> anyhow::Result<()> {
    let Some(cmd) = args.get(1) else {
        return Ok(());
    };
    let Some((_, known)) = FLAGS.iter().find(|(c, _)| c == cmd) else {
        return Ok(());
    };
    let mut rest = args[2..].iter();
    while let Some(a) = rest.next() {
        if !known.contains(&a.as_str()) {
            bail!(
                "{cmd}: unknown argument {a:?} (it takes {})",
                known.join(", ")
            );
        }
        rest.next();
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    check_flags(&args)?;
    match args.get(1).map(String::as_str) {
        Some("cni-add-del") => cni::run(flag(&args, "--cycles", 200)?),
        Some("converge") => converge::run(flag(&args, "--nodes", 200)?),
        Some("bgp-converge") => bgp::converge(flag(&args, "--nodes", 50)?),
        Some("bgp-ingest") => bgp::ingest(flag(&args, "--prefixes", 100_000)?, flag(&args, "--rounds", 3)?),
        Some("k8s-converge") => k8s::run(flag(&args, "--nodes", 1000)?),
        Some("proxy-sync") => match flag(&args, "--trellis-only", 0)? {
            0 if flag(&args, "--both", 0)? > 0 => proxy::both(flag(&args, "--both", 0)?),
            0 => proxy::sync(flag(&args, "--small", 1000)?, flag(&args, "--large", 5000)?, flag(&args, "--huge", 30000)?),
            n => proxy::trellis_only(n, flag(&args, "--cold", 0)? != 0),
        },
        Some("proxy-latency") => proxy::latency(flag(&args, "--small", 10)?, flag(&args, "--large", 10000)?, flag(&args, "--connects", 2000)?),
        Some("policy-scale") => policy::scale(flag(&args, "--policies", 1000)?, flag(&args, "--pods", 5000)?, flag(&args, "--local", 100)?),
        Some("policy-latency") => policy::latency(flag(&args, "--policies", 1000)?, flag(&args, "--connects", 2000)?),
        Some("throughput") => throughput::run(flag(&args, "--runs", 9)?, flag(&args, "--seconds", 2)?),
        _ => bail!("usage: trellis-bench cni-add-del [--cycles N] | converge [--nodes N] | throughput [--runs N] [--seconds S] | k8s-converge [--nodes N] | bgp-converge [--nodes N] | bgp-ingest [--prefixes P] [--rounds R] | proxy-sync [--small N] [--large N] [--huge N] [--trellis-only N [--cold 1] | --both N] | proxy-latency [--small N] [--large N] [--connects N] | policy-scale [--policies N] [--pods N] [--local N] | policy-latency [--policies N] [--connects N]"),
    }
}
