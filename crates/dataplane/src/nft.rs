//! Applying a rendered nftables ruleset: `nft -f -`, one transaction.

use crate::{DataplaneError, NlError, Result};
use std::io::Write;
use std::process::{Command, Stdio};

/// Feeds `ruleset` to `nft -f -` and waits (bounded by nft itself: it only
/// talks to the kernel).
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
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
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
