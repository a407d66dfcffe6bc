//! `trellis`: the CNI plugin. A thin shim: it decodes the runtime's call,
//! opens the pod netns, hands both to the node agent over a unix socket and
//! prints the agent's answer in the shape of the version asked for.

use nix::sys::statfs::{fstatfs, NSFS_MAGIC};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::ExitCode;
use trellis_cni::error::{CniError, INCOMPATIBLE_VERSION, INVALID_ENV, IO_FAILURE};
use trellis_cni::transport::{call, MAX_MESSAGE};
use trellis_cni::{version, Command, Env, NetConf, Request, Response};

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin()
        .take(MAX_MESSAGE as u64)
        .read_to_end(&mut stdin);
    // best-effort version for error documents, before anything is validated
    let err_version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(String::from))
        .filter(|v| version::SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| version::CURRENT.to_string());
    match run(read.map(|_| stdin)) {
        Ok(Some(out)) => print_json(&out, ExitCode::SUCCESS),
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => print_json(&e.to_json(&err_version), ExitCode::FAILURE),
    }
}

fn print_json(v: &serde_json::Value, code: ExitCode) -> ExitCode {
    let mut out = std::io::stdout().lock();
    // a runtime that closed our stdout cannot be told anything more
    if serde_json::to_writer(&mut out, v).is_ok() {
        let _ = out.write_all(b"\n");
    }
    code
}

fn run(stdin: std::io::Result<Vec<u8>>) -> Result<Option<serde_json::Value>, CniError> {
    let env = Env::from_lookup(|k| std::env::var(k).ok())?;
    if env.command == Command::Version {
        return Ok(Some(version::version_info()));
    }
    let stdin = stdin.map_err(|e| {
        CniError::new(
            IO_FAILURE,
            format!("cannot read the network config from stdin: {e}"),
        )
    })?;
    let conf = NetConf::parse(&stdin)?;
    let gate = |allowed: bool, what: &str| {
        if allowed {
            Ok(())
        } else {
            Err(CniError::new(
                INCOMPATIBLE_VERSION,
                format!("cniVersion {} does not allow {what}", conf.cni_version),
            ))
        }
    };
    match env.command {
        Command::Check => gate(conf.version.allows_check(), "CHECK")?,
        Command::Status | Command::Gc => {
            gate(conf.version.allows_status_gc(), env.command.as_str())?
        }
        _ => {}
    }
    let netns = open_netns(&env)?;
    let req = Request {
        env: env.clone(),
        config: conf.raw.clone(),
        has_netns_fd: netns.is_some(),
    };
    match call(Path::new(&conf.agent_socket), &req, netns.as_ref())? {
        Response::Added(att) => Ok(Some(att.render(&conf.cni_version, conf.version))),
        Response::Done => Ok(None),
        Response::Error(e) => Err(e),
    }
}

/// Opens CNI_NETNS. ADD and CHECK need it; DEL goes on without it when it is
/// empty or already gone.
fn open_netns(env: &Env) -> Result<Option<OwnedFd>, CniError> {
    let needed = matches!(env.command, Command::Add | Command::Check);
    if env.netns.is_empty() || !matches!(env.command, Command::Add | Command::Check | Command::Del)
    {
        return Ok(None);
    }
    let file = match std::fs::File::open(&env.netns) {
        Ok(f) => f,
        Err(_) if !needed => return Ok(None),
        Err(e) => {
            return Err(CniError::new(
                INVALID_ENV,
                format!("CNI_NETNS {}: cannot open: {e}", env.netns),
            ))
        }
    };
    let is_ns = fstatfs(&file)
        .map(|s| s.filesystem_type() == NSFS_MAGIC)
        .unwrap_or(false);
    if !is_ns {
        if !needed {
            return Ok(None);
        }
        return Err(CniError::new(
            INVALID_ENV,
            format!("CNI_NETNS {} is not a network namespace", env.netns),
        ));
    }
    Ok(Some(OwnedFd::from(file)))
}
