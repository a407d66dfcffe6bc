//! Running commands with a timeout, optionally inside a namespace.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A command that failed, timed out or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Could not start.
    #[error("{cmd}: cannot start: {err}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Why.
        err: std::io::Error,
    },
    /// Ran longer than allowed; it was killed.
    #[error("{cmd}: no answer within {timeout:?}, killed")]
    Timeout {
        /// The command line.
        cmd: String,
        /// The limit.
        timeout: Duration,
    },
    /// Exited non-zero.
    #[error("{cmd}: exit {code:?}: {stderr}")]
    Failed {
        /// The command line.
        cmd: String,
        /// Exit code.
        code: Option<i32>,
        /// Its stderr.
        stderr: String,
    },
    /// Entering the namespace failed.
    #[error("enter netns {0}: {1}")]
    Netns(String, String),
}

/// A finished command and how long it took (spawn to exit).
#[derive(Debug)]
pub struct Timed {
    /// What it printed and its status.
    pub output: Output,
    /// Wall time.
    pub took: Duration,
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` with `stdin`, in namespace `netns` when given (the child is
/// spawned from a thread that entered it), killing it after `timeout`.
pub fn run(
    mut cmd: Command,
    netns: Option<&Path>,
    stdin: &[u8],
    timeout: Duration,
) -> Result<Timed, ExecError> {
    let line = describe(&cmd);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = crate::netns::spawn_in(netns, &mut cmd).map_err(|err| ExecError::Spawn {
        cmd: line.clone(),
        err,
    })?;
    let pid = child.id();
    if let Some(mut input) = child.stdin.take() {
        // a child that exits without reading is not an error here
        let _ = input.write_all(stdin);
    }
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let out = child.wait_with_output();
        let _ = tx.send((out, Instant::now()));
    });
    match rx.recv_timeout(timeout) {
        Ok((Ok(output), ended)) => Ok(Timed {
            output,
            took: ended - started,
        }),
        Ok((Err(err), _)) => Err(ExecError::Spawn { cmd: line, err }),
        Err(_) => {
            // our own child, by PID
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            Err(ExecError::Timeout { cmd: line, timeout })
        }
    }
}

/// Runs and requires exit 0; returns stdout.
pub fn check(cmd: Command, netns: Option<&Path>, timeout: Duration) -> Result<String, ExecError> {
    let line = describe(&cmd);
    let t = run(cmd, netns, &[], timeout)?;
    if !t.output.status.success() {
        return Err(ExecError::Failed {
            cmd: line,
            code: t.output.status.code(),
            stderr: String::from_utf8_lossy(&t.output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&t.output.stdout).into_owned())
}

/// `ip ARGS...` in the host's mount namespace (it only names namespaces
/// with `-n`, it never changes the host's own network).
pub fn ip(args: &[&str]) -> Result<String, ExecError> {
    let mut c = Command::new("ip");
    c.args(args);
    check(c, None, Duration::from_secs(20))
}
