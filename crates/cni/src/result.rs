//! The result of an ADD, version-neutral, and its rendering in the shape of
//! the version the runtime asked for (0.3.x/0.4.0 vs 1.x).

use crate::version::Version;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::net::IpAddr;

/// An interface in the result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IfaceResult {
    /// Interface name.
    pub name: String,
    /// MAC address, `aa:bb:..`.
    pub mac: String,
    /// MTU.
    pub mtu: u32,
    /// The netns path for interfaces inside the container; empty on the host.
    #[serde(default)]
    pub sandbox: String,
}

/// An address in the result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpResult {
    /// Address with prefix length.
    pub address: IpNet,
    /// Gateway, if any.
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    pub interface: usize,
}

/// A route in the result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteResult {
    /// Destination.
    pub dst: IpNet,
    /// Next hop.
    pub gw: Option<IpAddr>,
}

/// What an ADD produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Host side first, then the container side.
    pub interfaces: Vec<IfaceResult>,
    /// Addresses.
    pub ips: Vec<IpResult>,
    /// Routes in the container.
    pub routes: Vec<RouteResult>,
}

impl Attachment {
    /// The result document for `version` (given as the config's string).
    pub fn render(&self, cni_version: &str, version: Version) -> Value {
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut v = json!({ "name": i.name, "mac": i.mac });
                if !i.sandbox.is_empty() {
                    v["sandbox"] = json!(i.sandbox);
                }
                if version.has_iface_mtu() {
                    v["mtu"] = json!(i.mtu);
                }
                v
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut v = json!({ "address": ip.address.to_string(), "interface": ip.interface });
                if let Some(gw) = ip.gateway {
                    v["gateway"] = json!(gw.to_string());
                }
                if !version.is_1x() {
                    v["version"] = json!(if ip.address.addr().is_ipv4() {
                        "4"
                    } else {
                        "6"
                    });
                }
                v
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut v = json!({ "dst": r.dst.to_string() });
                if let Some(gw) = r.gw {
                    v["gw"] = json!(gw.to_string());
                }
                v
            })
            .collect();
        json!({
            "cniVersion": cni_version,
            "interfaces": interfaces,
            "ips": ips,
            "routes": routes,
            "dns": {},
        })
    }
}

/// The container-side addresses a `prevResult` claims (any version).
pub fn prev_result_addresses(prev: &Value) -> Vec<IpNet> {
    prev.get("ips")
        .and_then(Value::as_array)
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip.get("address")?.as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Attachment {
        Attachment {
            interfaces: vec![
                IfaceResult {
                    name: "tl0123456789a".into(),
                    mac: "ee:ee:ee:ee:ee:ee".into(),
                    mtu: 1500,
                    sandbox: String::new(),
                },
                IfaceResult {
                    name: "eth0".into(),
                    mac: "02:00:00:00:00:01".into(),
                    mtu: 1500,
                    sandbox: "/var/run/netns/p".into(),
                },
            ],
            ips: vec![IpResult {
                address: "10.244.0.5/24".parse().expect("net"),
                gateway: Some("10.244.0.1".parse().expect("ip")),
                interface: 1,
            }],
            routes: vec![RouteResult {
                dst: "0.0.0.0/0".parse().expect("net"),
                gw: Some("10.244.0.1".parse().expect("ip")),
            }],
        }
    }

    #[test]
    fn shapes_per_version() {
        let a = sample();
        let old = a.render("0.3.1", Version::parse("0.3.1").expect("v"));
        assert_eq!(old["ips"][0]["version"], "4");
        assert!(old["interfaces"][0].get("mtu").is_none());
        assert_eq!(old["cniVersion"], "0.3.1");
        let v10 = a.render("1.0.0", Version::parse("1.0.0").expect("v"));
        assert!(v10["ips"][0].get("version").is_none());
        assert!(v10["interfaces"][1].get("mtu").is_none());
        assert_eq!(v10["interfaces"][1]["sandbox"], "/var/run/netns/p");
        let v11 = a.render("1.1.0", Version::parse("1.1.0").expect("v"));
        assert_eq!(v11["interfaces"][1]["mtu"], 1500);
        assert_eq!(v11["routes"][0]["gw"], "10.244.0.1");
        assert_eq!(
            prev_result_addresses(&v11),
            vec!["10.244.0.5/24".parse::<IpNet>().expect("net")]
        );
    }
}
