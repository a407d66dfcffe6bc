//! `trellisctl status`: a node's subnet, backend, peers and the entries
//! trellis programmed, from the agent's status socket.

use anyhow::Context;
use serde::Serialize;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;
use trellis_model::status::NodeStatus;

/// How `status` and `bgp status` print.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Readable tables.
    Table,
    /// Tables with every detail (`get services -o wide`: the endpoints).
    Wide,
    /// The status document as JSON.
    Json,
    /// The status document as YAML.
    Yaml,
}

/// Prints `doc` in `out`, with `table` for the table form.
pub fn print<T: Serialize>(
    out: Output,
    doc: &T,
    table: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    match out {
        Output::Table | Output::Wide => print!("{}", table(doc)),
        Output::Json => println!("{}", serde_json::to_string_pretty(doc)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(doc)?),
    }
    Ok(())
}

/// Reads the status document from `socket`.
pub fn fetch(socket: &Path) -> anyhow::Result<NodeStatus> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "trellisd status socket {} is not reachable",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    serde_json::from_str(&body)
        .context("status: the agent sent a document this trellisctl cannot read")
}

/// A cell: "-" for nothing.
pub fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".into(), |x| x.to_string())
}

/// A titled table: a header per column, one line per row.
pub fn table(title: &str, cols: &[&str], rows: &[Vec<String>], out: &mut String) {
    out.push_str(&format!("\n{title} ({})\n", rows.len()));
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, String::len))
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
    for r in rows {
        out.push_str(&line(r.clone()));
    }
}

/// The readable table.
pub fn render(st: &NodeStatus) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "node {}  subnet {}  backend {}  mtu {}  underlay {}  pods {}  ready {}\n",
        st.node,
        st.subnet,
        opt(&st.backend),
        st.mtu,
        opt(&st.public_ip),
        st.pods,
        if st.ready { "yes" } else { "no" }
    ));
    let peers: Vec<Vec<String>> = st
        .peers
        .iter()
        .map(|p| {
            vec![
                p.node.clone(),
                p.subnet.clone(),
                p.public_ip.clone(),
                opt(&p.vtep_mac),
            ]
        })
        .collect();
    table(
        "peers",
        &["node", "subnet", "publicIp", "vtepMac"],
        &peers,
        &mut out,
    );
    let routes: Vec<Vec<String>> = st
        .routes
        .iter()
        .map(|r| {
            vec![
                r.dst.clone(),
                opt(&r.via),
                r.dev.clone(),
                r.onlink.to_string(),
            ]
        })
        .collect();
    table(
        "routes (proto 84)",
        &["dst", "via", "dev", "onlink"],
        &routes,
        &mut out,
    );
    let neigh: Vec<Vec<String>> = st
        .neighbours
        .iter()
        .map(|n| vec![n.ip.clone(), n.mac.clone(), n.dev.clone()])
        .collect();
    table("neighbours", &["ip", "mac", "dev"], &neigh, &mut out);
    let fdb: Vec<Vec<String>> = st
        .fdb
        .iter()
        .map(|f| vec![f.mac.clone(), f.dst.clone(), f.dev.clone()])
        .collect();
    table("fdb", &["mac", "dst", "dev"], &fdb, &mut out);
    let pods: Vec<Vec<String>> = st
        .attached
        .iter()
        .map(|p| {
            let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            vec![
                p.ip.clone(),
                opt(&p.pod),
                p.container_id.chars().take(24).collect(),
                match p.in_api {
                    None => "-".into(),
                    Some(true) => "yes".into(),
                    Some(false) => "no (not listed on this node)".into(),
                },
                if labels.is_empty() {
                    "-".into()
                } else {
                    labels.join(",")
                },
            ]
        })
        .collect();
    let title = match st.api_pods {
        Some(n) => format!("pods (the API server lists {n} on this node)"),
        None => "pods".into(),
    };
    table(
        &title,
        &["ip", "pod", "container", "inApi", "labels"],
        &pods,
        &mut out,
    );
    for (title, lines) in [
        ("not ready", &st.not_ready),
        ("problems", &st.problems),
        ("errors (sections above may be incomplete)", &st.errors),
    ] {
        if !lines.is_empty() {
            out.push_str(&format!("\n{title}\n"));
            for l in lines {
                out.push_str(&format!("  {l}\n"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_section() {
        let st: NodeStatus = serde_json::from_value(serde_json::json!({
            "node": "n1", "subnet": "10.244.1.0/24", "backend": "vxlan", "mtu": 1450, "publicIp": "192.0.2.11", "pods": 2,
            "ready": false, "notReady": ["first sync with the datastore not done"],
            "peers": [{"node": "n2", "subnet": "10.244.2.0/24", "publicIp": "192.0.2.12", "vtepMac": "0e:74:c0:00:02:0c"}],
            "routes": [{"dst": "10.244.2.0/24", "via": "10.244.2.0", "dev": "trellis.1", "onlink": true}],
            "neighbours": [{"ip": "10.244.2.0", "mac": "0e:74:c0:00:02:0c", "dev": "trellis.1"}],
            "fdb": [{"mac": "0e:74:c0:00:02:0c", "dst": "192.0.2.12", "dev": "trellis.1"}],
            "problems": ["node n3 is not on this node's segment"],
            "errors": ["read routes: EIO"],
            "attached": [{"ip": "10.244.1.2", "pod": "default/web", "containerID": "abc", "ifname": "eth0",
                          "inApi": true, "labels": {"app": "web"}}],
            "apiPods": 1,
        }))
        .expect("typed");
        let t = render(&st);
        for needle in [
            "the API server lists 1 on this node",
            "default/web",
            "app=web",
            "backend vxlan",
            "ready no",
            "peers (1)",
            "10.244.2.0/24",
            "fdb (1)",
            "192.0.2.12",
            "problems",
            "n3",
            "first sync",
            "read routes: EIO",
        ] {
            assert!(t.contains(needle), "{needle} missing in\n{t}");
        }
        // every output form carries the same document
        let yaml = serde_yaml::to_string(&st).expect("yaml");
        let back: NodeStatus = serde_yaml::from_str(&yaml).expect("yaml back");
        assert_eq!(back, st);
    }
}
