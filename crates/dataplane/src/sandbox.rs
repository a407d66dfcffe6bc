//! nft scripts tried in a network namespace of their own, gone when the
//! command ends: how the pure crates' tests check what they render against
//! the real kernel without touching the host's rules. Root only.

use std::io::Write;
use std::process::{Command, Stdio};

/// Whether this process runs as root.
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// `nft -c -f -` with `script` in a private namespace: `Err` is nft's
/// complaint.
pub fn nft_check(script: &str) -> Result<(), String> {
    let mut child = Command::new("timeout")
        .args(["60", "unshare", "--net", "nft", "-c", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("nft: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("nft: no stdin")?
        .write_all(script.as_bytes())
        .map_err(|e| format!("nft: {e}"))?;
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// Applies `scripts` in order with `nft -f` in a private namespace and
/// returns `nft -j list table inet TABLE`, normalized ([`normalize`]).
/// `Err` names the script the kernel refused.
pub fn apply_in_netns(table: &str, scripts: &[String]) -> Result<String, String> {
    let dir = std::env::temp_dir().join(format!(
        "trellis-nft-sandbox-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut cmd = String::from("set -e\n");
    for (i, s) in scripts.iter().enumerate() {
        let f = dir.join(format!("{i}.nft"));
        std::fs::write(&f, s).map_err(|e| format!("{}: {e}", f.display()))?;
        cmd.push_str(&format!(
            "nft -f {} || {{ echo \"script {i} refused\" >&2; exit 3; }}\n",
            f.display()
        ));
    }
    cmd.push_str(&format!("nft -j list table inet {table}\n"));
    let out = Command::new("timeout")
        .args(["60", "unshare", "--net", "sh", "-c", &cmd])
        .stdin(Stdio::null())
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.map_err(|e| format!("unshare: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    normalize(&String::from_utf8_lossy(&out.stdout))
}

/// `nft -j` output without handles, set elements sorted, objects sorted
/// (rules keep their order within their chain).
pub fn normalize(json: &str) -> Result<String, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("nft -j printed no JSON: {e}"))?;
    let mut objs: Vec<String> = Vec::new();
    let mut position: std::collections::HashMap<String, usize> = Default::default();
    for o in v["nftables"].as_array().into_iter().flatten() {
        let mut o = o.clone();
        if o.get("metainfo").is_some() {
            continue;
        }
        if let Some(obj) = o.as_object_mut() {
            for (_, inner) in obj.iter_mut() {
                if let Some(m) = inner.as_object_mut() {
                    m.remove("handle");
                    if let Some(serde_json::Value::Array(elems)) = m.get_mut("elem") {
                        elems.sort_by_key(|e| e.to_string());
                    }
                }
            }
        }
        if let Some(r) = o.get_mut("rule") {
            let chain = r["chain"].as_str().unwrap_or_default().to_string();
            let n = position.entry(chain).or_default();
            r["position"] = serde_json::json!(*n);
            *n += 1;
        }
        objs.push(o.to_string());
    }
    objs.sort();
    Ok(objs.join("\n"))
}
