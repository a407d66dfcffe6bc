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
