//! Applying a rendered nftables ruleset: `nft -f -`, one transaction.

use crate::{DataplaneError, NlError, Result};
use std::io::Write;
use std::process::{Command, Stdio};

/// Longest an `nft -f` may take (a whole table of 30,000 Services loads in
/// seconds; a hung nft is killed and reported).
const APPLY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

/// Feeds `ruleset` to `nft -f -` and waits, at most [`APPLY_DEADLINE`].
pub fn apply(ruleset: &str) -> Result<()> {
    let op = "nft -f -";
    let fail = |msg: String| DataplaneError::new(op, NlError::Transport(msg));
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run nft (apt-get install nftables): {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(ruleset.as_bytes())
            .map_err(|e| fail(e.to_string()))?;
    }
    // its errors are read on the side (a full pipe would stall it), and
    // its exit is waited for with a deadline
    let mut stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(e) = stderr.as_mut() {
            use std::io::Read;
            let _ = e.read_to_string(&mut text);
        }
        text
    });
    let deadline = std::time::Instant::now() + APPLY_DEADLINE;
    loop {
        match child.try_wait().map_err(|e| fail(e.to_string()))? {
            Some(_) => break,
            None if std::time::Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!("no answer within {APPLY_DEADLINE:?}; killed")));
            }
            None => std::thread::sleep(std::time::Duration::from_millis(1)),
        }
    }
    let status = child.wait().map_err(|e| fail(e.to_string()))?;
    let err = reader.join().unwrap_or_default();
    if !status.success() {
        return Err(fail(err.trim().to_string()));
    }
    Ok(())
}

/// Whether table `inet TABLE` exists: `nft -j list tables`, read as JSON
/// (nft reports errors only as text, so absence is read, not guessed).
pub fn table_exists(table: &str) -> Result<bool> {
    let op = "nft -j list tables";
    let fail = |msg: String| DataplaneError::new(op, NlError::Transport(msg));
    let out = Command::new("nft")
        .args(["-j", "list", "tables"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| fail(format!("cannot run nft (apt-get install nftables): {e}")))?;
    if !out.status.success() {
        return Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| fail(format!("nft json: {e}")))?;
    Ok(v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|o| o["table"]["family"] == "inet" && o["table"]["name"] == table))
}
