//! The node's nftables table, rendered as a value:
//! - egress masquerade: pod traffic leaving the cluster network is SNATed
//!   to the node's address; pod-to-pod traffic keeps its source;
//! - no connection tracking where nothing needs it: pod-to-pod packets and
//!   the VXLAN carrier between nodes skip conntrack (the `raw` hooks), which
//!   is most of what a tracked forwarding path costs. (NetworkPolicy, when it
//!   comes, must keep tracking the pods it selects.)

use ipnet::Ipv4Net;

/// The `inet trellis` table. Applied as one `nft -f` transaction that
/// creates, empties and refills the table, so it is idempotent and atomic.
/// `vxlan_port` is the backend's UDP port when VXLAN is in use.
pub fn ruleset(cluster: Ipv4Net, vxlan_port: Option<u16>) -> String {
    let carrier = |hook: &str| {
        match vxlan_port {
        Some(p) => format!(
            "\tchain raw_{hook} {{\n\t\ttype filter hook {hook} priority raw; policy accept;\n\t\tudp dport {p} notrack\n{}\t}}\n",
            if hook == "prerouting" { format!("\t\tip saddr {cluster} ip daddr {cluster} notrack\n") } else { String::new() }
        ),
        None if hook == "prerouting" => format!(
            "\tchain raw_prerouting {{\n\t\ttype filter hook prerouting priority raw; policy accept;\n\t\tip saddr {cluster} ip daddr {cluster} notrack\n\t}}\n"
        ),
        None => String::new(),
    }
    };
    format!(
        "table inet trellis {{}}\n\
         delete table inet trellis\n\
         table inet trellis {{\n\
         {}{}\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {cluster} ip daddr {cluster} return\n\
         \t\tip saddr {cluster} ip daddr != 224.0.0.0/4 masquerade fully-random\n\
         \t}}\n\
         }}\n",
        carrier("prerouting"),
        carrier("output"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden() {
        let r = ruleset("10.244.0.0/16".parse().expect("net"), Some(8472));
        assert!(r.contains("udp dport 8472 notrack"));
        assert!(r.contains("ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 notrack"));
        assert!(!ruleset("10.244.0.0/16".parse().expect("net"), None).contains("udp dport"));
        assert!(r.contains("ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 return"));
        assert!(
            r.contains("ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random")
        );
        assert!(r.starts_with("table inet trellis {}\ndelete table inet trellis\n"));
    }

    #[test]
    fn parses_with_nft_check() {
        // `nft -c` validates without touching any ruleset; skipped without nft
        let Ok(mut child) = std::process::Command::new("nft")
            .args(["-c", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
        else {
            eprintln!("SKIP parses_with_nft_check: nft not installed");
            return;
        };
        use std::io::Write;
        // the check needs only the table definition (no delete of a table that may not exist)
        let r = ruleset("10.244.0.0/16".parse().expect("net"), Some(8472))
            .replace("delete table inet trellis\n", "");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(r.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("nft");
        if !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("Operation not permitted")
        {
            eprintln!("SKIP parses_with_nft_check: needs CAP_NET_ADMIN");
            return;
        }
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
