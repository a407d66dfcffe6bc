//! Denied packets, logged (`kubernetes.policy.logDenied`): the policy
//! table logs each drop (rate-limited per rule) to an NFLOG group; a
//! thread of the agent reads the group, writes each denial to the agent's
//! log and keeps the last [`RECENT`] for `/policy/denials` and
//! `trellisctl policy denials`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use trellis_dataplane::nflog::Subscription;
use trellis_policy::{Denial, LogDenied};

/// Denials kept for `/policy/denials`.
pub const RECENT: usize = 256;
/// Bytes of each packet copied: IPv4 header with options and the ports.
const COPY: u32 = 64;

/// The last denials, oldest first, each with its time (Unix seconds).
#[derive(Clone, Default)]
pub struct Denials(Arc<Mutex<VecDeque<(f64, Denial)>>>);

impl Denials {
    fn push(&self, d: Denial) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|t| t.as_secs_f64())
            .unwrap_or_default();
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() == RECENT {
            q.pop_front();
        }
        q.push_back((now, d));
    }

    /// As JSON: `[{"time", "tier", "policy", "src", "dst", "proto",
    /// "sport", "dport"}]`, oldest first.
    pub fn json(&self) -> String {
        let q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let items: Vec<serde_json::Value> = q
            .iter()
            .map(|(t, d)| {
                serde_json::json!({
                    "time": t,
                    "tier": d.tier,
                    "policy": d.policy,
                    "src": d.src.to_string(),
                    "dst": d.dst.to_string(),
                    "proto": d.proto,
                    "sport": d.ports.map(|p| p.0),
                    "dport": d.ports.map(|p| p.1),
                })
            })
            .collect();
        serde_json::Value::Array(items).to_string()
    }
}

/// Binds `log`'s group and reads it on a thread of its own for as long as
/// the agent runs. An error (the group held by another program, no
/// nfnetlink_log) is returned: denials are then not logged, and the
/// caller says so.
pub fn start(log: LogDenied, denials: Denials) -> Result<(), String> {
    let sub = Subscription::open(log.group, COPY)
        .map_err(|e| format!("NFLOG group {}: {e}", log.group))?;
    std::thread::Builder::new()
        .name("policy-log".into())
        .spawn(move || {
            let mut buf = Vec::with_capacity(1 << 16);
            loop {
                match sub.recv(&mut buf) {
                    Ok(Some(_)) => {
                        for d in trellis_policy::log::parse(&buf) {
                            tracing::info!(
                                tier = %d.tier,
                                policy = %d.policy,
                                "policy denied {d}"
                            );
                            denials.push(d);
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "reading denied packets stopped");
                        return;
                    }
                }
            }
        })
        .map_err(|e| format!("cannot start the denial log thread: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denial(i: u8) -> Denial {
        Denial {
            tier: "NetworkPolicy".into(),
            policy: "x/deny".into(),
            src: [10, 0, 0, i].into(),
            dst: [10, 0, 1, 1].into(),
            proto: "udp".into(),
            ports: Some((1000 + i as u16, 53)),
        }
    }

    #[test]
    fn only_the_last_ones_are_kept() {
        let d = Denials::default();
        for i in 0..=255u8 {
            d.push(denial(i));
        }
        d.push(denial(0));
        let v: serde_json::Value = serde_json::from_str(&d.json()).expect("json");
        let v = v.as_array().expect("array");
        assert_eq!(v.len(), RECENT);
        assert_eq!(v[0]["src"], "10.0.0.1");
        assert_eq!(v[RECENT - 1]["src"], "10.0.0.0");
        assert_eq!(v[RECENT - 1]["dport"], 53);
        assert_eq!(v[RECENT - 1]["policy"], "x/deny");
    }
}
