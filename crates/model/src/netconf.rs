//! The cluster network config, compatible with flannel's `net-conf.json`:
//!
//! ```json
//! {"Network":"10.244.0.0/16","SubnetLen":24,"SubnetMin":"10.244.1.0","SubnetMax":"10.244.200.0",
//!  "Backend":{"Type":"vxlan","VNI":1,"Port":8472,"DirectRouting":false}}
//! ```
//!
//! `NatOutgoing` (a trellis field, Calico's `natOutgoing`; default `true`):
//! pod traffic to destinations outside `Network` leaves with the node's
//! address. Turn it off where the fabric routes pod addresses (BGP to the
//! data-centre routers) and pods must be seen with their own address.
//!
//! flannel fields trellis does not use (`EnableIPv6`, `IPv6Network`,
//! `Backend.GBP`, ...) are accepted and ignored, so an existing file works
//! unchanged; a field with a wrong value is rejected naming the field.

use ipnet::{IpNet, Ipv4Net};
use serde_json::{Map, Value};
use std::net::Ipv4Addr;

/// How pod traffic crosses nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendType {
    /// VXLAN overlay (`trellis.1`).
    Vxlan,
    /// Plain routes via each node's underlay IP.
    HostGw,
    /// BGP routing (a later issue).
    Bgp,
    /// IPIP (a later issue; needs the kernel's ipip module).
    Ipip,
}

impl BackendType {
    /// The name as in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vxlan => "vxlan",
            Self::HostGw => "host-gw",
            Self::Bgp => "bgp",
            Self::Ipip => "ipip",
        }
    }
}

/// The `Backend` object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    /// `Type`.
    pub kind: BackendType,
    /// `VNI` (vxlan), default 1.
    pub vni: u32,
    /// `Port` (vxlan UDP port), default 8472.
    pub port: u16,
    /// `DirectRouting` (vxlan): host-gw routes to nodes on the same segment.
    pub direct_routing: bool,
}

/// A validated cluster network config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// `Network`: the cluster pod CIDR.
    pub network: Ipv4Net,
    /// `SubnetLen`: prefix length of each node's subnet.
    pub subnet_len: u8,
    /// `SubnetMin`: first subnet that may be leased.
    pub subnet_min: Ipv4Addr,
    /// `SubnetMax`: last subnet that may be leased.
    pub subnet_max: Ipv4Addr,
    /// `Backend`.
    pub backend: Backend,
    /// `NatOutgoing`: masquerade pod traffic leaving the cluster network.
    pub nat_outgoing: bool,
}

/// A config error naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cluster config: field {field:?}: {msg}")]
pub struct ConfigError {
    /// The field, e.g. `Backend.VNI`.
    pub field: String,
    /// What is wrong.
    pub msg: String,
}

fn err(field: &str, msg: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        msg: msg.into(),
    }
}

fn opt_u64(obj: &Map<String, Value>, field: &str, path: &str) -> Result<Option<u64>, ConfigError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| err(path, format!("must be a non-negative integer, got {v}"))),
    }
}

fn opt_str<'a>(
    obj: &'a Map<String, Value>,
    field: &str,
    path: &str,
) -> Result<Option<&'a str>, ConfigError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(err(path, format!("must be a string, got {v}"))),
    }
}

impl ClusterConfig {
    /// Parses and validates a net-conf.json document.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let doc: Value = serde_json::from_str(text)
            .map_err(|e| err("(document)", format!("not valid JSON: {e}")))?;
        let obj = doc
            .as_object()
            .ok_or_else(|| err("(document)", "must be a JSON object"))?;
        let network: IpNet = opt_str(obj, "Network", "Network")?
            .ok_or_else(|| err("Network", "is missing"))?
            .parse()
            .map_err(|e| err("Network", format!("not a CIDR: {e}")))?;
        let IpNet::V4(network) = network else {
            return Err(err(
                "Network",
                "must be IPv4 (IPv6 goes in IPv6Network, not supported yet)",
            ));
        };
        if network.trunc() != network {
            return Err(err(
                "Network",
                format!(
                    "{network} has host bits set; did you mean {}?",
                    network.trunc()
                ),
            ));
        }
        let subnet_len = match opt_u64(obj, "SubnetLen", "SubnetLen")? {
            Some(l) => {
                u8::try_from(l).map_err(|_| err("SubnetLen", format!("{l} is too large")))?
            }
            // flannel: /24, or two bits past a Network smaller than a /22
            None if network.prefix_len() < 22 => 24,
            None => network.prefix_len() + 2,
        };
        if subnet_len < network.prefix_len() || subnet_len > 30 {
            return Err(err(
                "SubnetLen",
                format!(
                    "{subnet_len} must lie within {}..=30 for Network {network}",
                    network.prefix_len()
                ),
            ));
        }
        let size = 1u32 << (32 - subnet_len);
        let first = u32::from(network.network());
        let last = u32::from(network.broadcast()) - (size - 1);
        let bound = |field: &str, default: u32| -> Result<Ipv4Addr, ConfigError> {
            let Some(s) = opt_str(obj, field, field)? else {
                return Ok(Ipv4Addr::from(default));
            };
            let ip: Ipv4Addr = s
                .parse()
                .map_err(|e| err(field, format!("{s:?} is not an IPv4 address: {e}")))?;
            let v = u32::from(ip);
            if v < first || v > last {
                return Err(err(field, format!("{ip} is outside Network {network}")));
            }
            if (v - first) % size != 0 {
                return Err(err(
                    field,
                    format!("{ip} is not the start of a /{subnet_len}"),
                ));
            }
            Ok(ip)
        };
        // flannel skips the network's first subnet by default
        let default_min = if last > first { first + size } else { first };
        let subnet_min = bound("SubnetMin", default_min)?;
        let subnet_max = bound("SubnetMax", last)?;
        if subnet_min > subnet_max {
            return Err(err(
                "SubnetMin",
                format!("{subnet_min} is above SubnetMax {subnet_max}"),
            ));
        }
        let backend = Self::backend(obj.get("Backend"))?;
        let nat_outgoing = match obj.get("NatOutgoing") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(err(
                    "NatOutgoing",
                    format!("must be true or false, got {v}"),
                ))
            }
        };
        Ok(Self {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            backend,
            nat_outgoing,
        })
    }

    fn backend(v: Option<&Value>) -> Result<Backend, ConfigError> {
        let empty = Map::new();
        let obj = match v {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(o)) => o,
            Some(other) => return Err(err("Backend", format!("must be an object, got {other}"))),
        };
        let kind = match opt_str(obj, "Type", "Backend.Type")?.unwrap_or("vxlan") {
            "vxlan" => BackendType::Vxlan,
            "host-gw" => BackendType::HostGw,
            "bgp" => BackendType::Bgp,
            "ipip" => BackendType::Ipip,
            other => {
                return Err(err(
                    "Backend.Type",
                    format!(
                    "{other:?} is not supported; use \"vxlan\", \"host-gw\", \"bgp\" or \"ipip\""
                ),
                ))
            }
        };
        let vni = opt_u64(obj, "VNI", "Backend.VNI")?.unwrap_or(1);
        if vni == 0 || vni >= 1 << 24 {
            return Err(err(
                "Backend.VNI",
                format!("{vni} must lie within 1..=16777215"),
            ));
        }
        let port = opt_u64(obj, "Port", "Backend.Port")?.unwrap_or(8472);
        if port == 0 || port > 65535 {
            return Err(err("Backend.Port", format!("{port} is not a UDP port")));
        }
        let direct_routing = match obj.get("DirectRouting") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(err(
                    "Backend.DirectRouting",
                    format!("must be true or false, got {v}"),
                ))
            }
        };
        if direct_routing && kind != BackendType::Vxlan {
            return Err(err(
                "Backend.DirectRouting",
                format!("only applies to Type \"vxlan\", not {:?}", kind.as_str()),
            ));
        }
        Ok(Backend {
            kind,
            vni: vni as u32,
            port: port as u16,
            direct_routing,
        })
    }

    /// Every subnet that may be leased, in order.
    pub fn subnets(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        let size = 1u32 << (32 - self.subnet_len);
        let (min, max) = (u32::from(self.subnet_min), u32::from(self.subnet_max));
        (0..=(max - min) / size)
            .filter_map(move |i| Ipv4Net::new(Ipv4Addr::from(min + i * size), self.subnet_len).ok())
    }

    /// How many subnets may be leased.
    pub fn capacity(&self) -> u32 {
        (u32::from(self.subnet_max) - u32::from(self.subnet_min)) / (1u32 << (32 - self.subnet_len))
            + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannel_default_file_works_unchanged() {
        // kube-flannel.yml's net-conf.json, with flannel-only fields
        let c = ClusterConfig::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":false,"IPv6Network":"2001:cafe:42::/56",
                "Backend":{"Type":"vxlan","GBP":false}}"#,
        )
        .expect("conf");
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min.to_string(), "10.244.1.0");
        assert_eq!(c.subnet_max.to_string(), "10.244.255.0");
        assert_eq!(
            c.backend,
            Backend {
                kind: BackendType::Vxlan,
                vni: 1,
                port: 8472,
                direct_routing: false
            }
        );
        assert_eq!(c.capacity(), 255);
        assert!(c.nat_outgoing, "masquerade is on by default");
        assert_eq!(
            c.subnets().next().expect("first").to_string(),
            "10.244.1.0/24"
        );
    }

    #[test]
    fn small_network_defaults() {
        let c = ClusterConfig::parse(r#"{"Network":"10.1.0.0/24","Backend":{"Type":"host-gw"}}"#)
            .expect("conf");
        assert_eq!(c.subnet_len, 26);
        assert_eq!(c.capacity(), 3);
    }

    #[test]
    fn errors_name_the_field() {
        for (doc, field) in [
            (r#"{}"#, "Network"),
            (r#"{"Network":"10.244.0.1/16"}"#, "Network"),
            (r#"{"Network":"fd00::/48"}"#, "Network"),
            (r#"{"Network":"10.244.0.0/16","SubnetLen":12}"#, "SubnetLen"),
            (
                r#"{"Network":"10.244.0.0/16","SubnetLen":"24"}"#,
                "SubnetLen",
            ),
            (
                r#"{"Network":"10.244.0.0/16","SubnetMin":"10.245.0.0"}"#,
                "SubnetMin",
            ),
            (
                r#"{"Network":"10.244.0.0/16","SubnetMax":"10.244.3.7"}"#,
                "SubnetMax",
            ),
            (
                r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.9.0","SubnetMax":"10.244.3.0"}"#,
                "SubnetMin",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#,
                "Backend.Type",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"VNI":0}}"#,
                "Backend.VNI",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"Port":70000}}"#,
                "Backend.Port",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw","DirectRouting":true}}"#,
                "Backend.DirectRouting",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"DirectRouting":"yes"}}"#,
                "Backend.DirectRouting",
            ),
            (
                r#"{"Network":"10.244.0.0/16","NatOutgoing":1}"#,
                "NatOutgoing",
            ),
        ] {
            let e = ClusterConfig::parse(doc).expect_err(doc);
            assert_eq!(e.field, field, "{doc}: {e}");
        }
    }
}
