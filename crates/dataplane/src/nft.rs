//! Applying a rendered nftables ruleset: `nft -f -`, one transaction.

use crate::{DataplaneError, NlError, Result};
use std::io::Write;
use std::process::{Command, Stdio};

/// Longest an `nft -f` may take (a whole table of 30,000 Services loads in
/// seconds; a hung nft is killed and reported).
pub(crate) const APPLY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

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

/// Whether set `SET` of table `inet TABLE` exists: `nft list set inet
/// TABLE SET` succeeds. One small object: `nft list tables` builds nft's
/// whole cache first (seconds with 30,000 Services). A failure of any kind
/// counts as "missing" (nft says why only as text); the caller then
/// programs the table again, which is safe.
pub fn set_exists(table: &str, set: &str) -> Result<bool> {
    let out = Command::new("nft")
        .args(["list", "set", "inet", table, set])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| {
            DataplaneError::new(
                "nft list set",
                NlError::Transport(format!("cannot run nft (apt-get install nftables): {e}")),
            )
        })?;
    Ok(out.success())
}

/// `nft -j ARGS`' output; `None` when nft fails (the object does not
/// exist).
fn nft_json(args: &[&str]) -> Result<Option<Vec<u8>>> {
    let op = format!("nft -j {}", args.join(" "));
    let out = Command::new("nft")
        .arg("-j")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| {
            DataplaneError::new(
                &op,
                NlError::Transport(format!("cannot run nft (apt-get install nftables): {e}")),
            )
        })?;
    Ok(out.status.success().then_some(out.stdout))
}

/// `nft -j list table inet TABLE`: `None` when it does not exist.
pub fn table_json(table: &str) -> Result<Option<String>> {
    let Some(out) = nft_json(&["list", "table", "inet", table])? else {
        return Ok(None);
    };
    String::from_utf8(out).map(Some).map_err(|e| {
        DataplaneError::new(
            format!("nft -j list table inet {table}"),
            NlError::Transport(e.to_string()),
        )
    })
}

/// The elements of set `SET` in table `inet TABLE` (`nft -j list set`),
/// as nft prints them (numbers in decimal); `None` when the set (or the
/// table) does not exist. One small object, read without nft's whole-table
/// cache.
pub fn set_elements(table: &str, set: &str) -> Result<Option<Vec<String>>> {
    let op = format!("nft -j list set inet {table} {set}");
    let Some(out) = nft_json(&["list", "set", "inet", table, set])? else {
        return Ok(None);
    };
    let v: serde_json::Value = serde_json::from_slice(&out)
        .map_err(|e| DataplaneError::new(&op, NlError::Transport(e.to_string())))?;
    let elems = v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("set"))
        .flat_map(|s| s["elem"].as_array().cloned().unwrap_or_default())
        .map(|e| match e {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        })
        .collect();
    Ok(Some(elems))
}
