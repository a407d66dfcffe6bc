//! `trellisctl status`: a node's subnet, backend, peers and the entries
//! trellis programmed, from the agent's status socket.

use anyhow::Context;
use serde_json::Value;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Reads the status document from `socket`.
pub fn fetch(socket: &Path) -> anyhow::Result<Value> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "trellisd status socket {} is not reachable",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    serde_json::from_str(&body).context("status: the agent sent no valid JSON")
}

/// A cell: strings bare, null as "-".
pub fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(x) => x.clone(),
        other => other.to_string(),
    }
}

/// A titled table: one column per key of `cols`, one line per row.
pub fn table(title: &str, cols: &[&str], rows: &[Value], out: &mut String) {
    out.push_str(&format!("\n{title} ({})\n", rows.len()));
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| cols.iter().map(|c| s(&r[*c])).collect())
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |vals: Vec<String>| -> String {
        vals.iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
            + "\n"
    };
    out.push_str(&line(cols.iter().map(|c| c.to_uppercase()).collect()));
    for r in cells {
        out.push_str(&line(r));
    }
}

/// The readable table.
pub fn render(st: &Value) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "node {}  subnet {}  backend {}  mtu {}  underlay {}  pods {}\n",
        s(&st["node"]),
        s(&st["subnet"]),
        s(&st["backend"]),
        s(&st["mtu"]),
        s(&st["publicIp"]),
        s(&st["pods"])
    ));
    let arr = |k: &str| st[k].as_array().cloned().unwrap_or_default();
    table(
        "peers",
        &["node", "subnet", "publicIp", "vtepMac"],
        &arr("peers"),
        &mut out,
    );
    table(
        "routes (proto 84)",
        &["dst", "via", "dev", "onlink"],
        &arr("routes"),
        &mut out,
    );
    table(
        "neighbours",
        &["ip", "mac", "dev"],
        &arr("neighbours"),
        &mut out,
    );
    table("fdb", &["mac", "dst", "dev"], &arr("fdb"), &mut out);
    let problems = arr("problems");
    if !problems.is_empty() {
        out.push_str("\nproblems\n");
        for p in problems {
            out.push_str(&format!("  {}\n", s(&p)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_section() {
        let st = serde_json::json!({
            "node": "n1", "subnet": "10.244.1.0/24", "backend": "vxlan", "mtu": 1450, "publicIp": "192.0.2.11", "pods": 2,
            "peers": [{"node": "n2", "subnet": "10.244.2.0/24", "publicIp": "192.0.2.12", "vtepMac": "0e:74:c0:00:02:0c"}],
            "routes": [{"dst": "10.244.2.0/24", "via": "10.244.2.0", "dev": "trellis.1", "onlink": true}],
            "neighbours": [{"ip": "10.244.2.0", "mac": "0e:74:c0:00:02:0c", "dev": "trellis.1"}],
            "fdb": [{"mac": "0e:74:c0:00:02:0c", "dst": "192.0.2.12", "dev": "trellis.1"}],
            "problems": ["node n3 is not on this node's segment"],
        });
        let t = render(&st);
        for needle in [
            "backend vxlan",
            "peers (1)",
            "10.244.2.0/24",
            "fdb (1)",
            "192.0.2.12",
            "problems",
            "n3",
        ] {
            assert!(t.contains(needle), "{needle} missing in\n{t}");
        }
    }
}
