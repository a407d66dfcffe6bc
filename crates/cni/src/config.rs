//! The network configuration on stdin: a conflist entry with `cniVersion`
//! and `name` injected, plus trellis's own fields.
//!
//! ```json
//! {"cniVersion":"1.1.0","name":"pods","type":"trellis","mode":"routed",
//!  "agentSocket":"/run/trellis/trellisd.sock","mtu":1450}
//! ```

use crate::error::{CniError, DECODE_FAILURE, INCOMPATIBLE_VERSION, INVALID_CONFIG};
use crate::version::Version;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Where the agent listens unless the config says otherwise.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/trellis/trellisd.sock";

/// How a pod is wired to its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// A veth on the `cni0` bridge; the bridge holds the gateway.
    Bridge,
    /// Calico style: a /32, default route via 169.254.1.1, proxy ARP on the host veth.
    Routed,
}

impl AttachMode {
    /// The name used in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bridge => "bridge",
            Self::Routed => "routed",
        }
    }
}

/// One attachment the runtime still uses (CNI GC `cni.dev/valid-attachments`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidAttachment {
    /// Container id.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Interface name in the container.
    pub ifname: String,
}

/// A decoded and validated network config.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// `cniVersion` as given.
    pub cni_version: String,
    /// Parsed version.
    pub version: Version,
    /// `name`: the network name; allocations are kept per network.
    pub name: String,
    /// `mode`: bridge or routed; `None` lets the agent choose its default.
    pub mode: Option<AttachMode>,
    /// `agentSocket`: the agent's unix socket.
    pub agent_socket: String,
    /// `mtu`: overrides the agent's MTU for this network.
    pub mtu: Option<u32>,
    /// `bridge`: bridge name in bridge mode (default `cni0`).
    pub bridge: Option<String>,
    /// `prevResult`, kept as given.
    pub prev_result: Option<Value>,
    /// `cni.dev/valid-attachments` (GC only).
    pub valid_attachments: Option<Vec<ValidAttachment>>,
    /// The whole document, forwarded to the agent.
    pub raw: Value,
}

fn invalid(field: &str, what: impl std::fmt::Display) -> CniError {
    CniError::new(
        INVALID_CONFIG,
        format!("invalid network config: field {field:?} {what}"),
    )
}

fn opt_str<'a>(obj: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, CniError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(invalid(field, format!("must be a string, got {other}"))),
    }
}

impl NetConf {
    /// Decodes stdin bytes. Not JSON: code 6. JSON with a bad field: code 7
    /// naming the field. Unsupported `cniVersion`: code 1.
    pub fn parse(bytes: &[u8]) -> Result<Self, CniError> {
        let raw: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(DECODE_FAILURE, "network config on stdin is not valid JSON")
                .with_details(e.to_string())
        })?;
        let obj = raw.as_object().ok_or_else(|| {
            CniError::new(
                DECODE_FAILURE,
                "network config on stdin is not a JSON object",
            )
        })?;
        let cni_version = opt_str(obj, "cniVersion")?.ok_or_else(|| {
            CniError::new(INCOMPATIBLE_VERSION, "network config has no cniVersion").with_details(
                "CNI reads a missing cniVersion as 0.1.0, which trellis does not support",
            )
        })?;
        let version = Version::parse(cni_version)?;
        let name = match opt_str(obj, "name")? {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => return Err(invalid("name", "is missing")),
        };
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            return Err(invalid(
                "name",
                format!("{name:?} may hold only letters, digits, '_', '.' and '-'"),
            ));
        }
        let mode = match opt_str(obj, "mode")? {
            None => None,
            Some("bridge") => Some(AttachMode::Bridge),
            Some("routed") => Some(AttachMode::Routed),
            Some(other) => {
                return Err(invalid(
                    "mode",
                    format!("is {other:?}; expected \"bridge\" or \"routed\""),
                ))
            }
        };
        let agent_socket = opt_str(obj, "agentSocket")?
            .unwrap_or(DEFAULT_AGENT_SOCKET)
            .to_string();
        if !agent_socket.starts_with('/') {
            return Err(invalid(
                "agentSocket",
                format!("{agent_socket:?} is not an absolute path"),
            ));
        }
        let mtu = match obj.get("mtu") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(m) if (576..=65535).contains(&m) => Some(m as u32),
                _ => {
                    return Err(invalid(
                        "mtu",
                        format!("is {v}; expected an integer from 576 to 65535"),
                    ))
                }
            },
        };
        let bridge = opt_str(obj, "bridge")?.map(String::from);
        if let Some(b) = &bridge {
            crate::env::validate_ifname(b)
                .map_err(|_| invalid("bridge", format!("{b:?} is not a valid interface name")))?;
        }
        let prev_result = match obj.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(v @ Value::Object(_)) => Some(v.clone()),
            Some(other) => {
                return Err(invalid(
                    "prevResult",
                    format!("must be an object, got {other}"),
                ))
            }
        };
        let valid_attachments = match obj.get("cni.dev/valid-attachments") {
            None | Some(Value::Null) => None,
            Some(v) => Some(serde_json::from_value(v.clone()).map_err(|e| {
                invalid(
                    "cni.dev/valid-attachments",
                    format!("must be a list of {{\"containerID\",\"ifname\"}}: {e}"),
                )
            })?),
        };
        for field in ["runtimeConfig", "args", "capabilities"] {
            match obj.get(field) {
                None | Some(Value::Null) | Some(Value::Object(_)) => {}
                Some(other) => {
                    return Err(invalid(field, format!("must be an object, got {other}")))
                }
            }
        }
        Ok(Self {
            cni_version: cni_version.to_string(),
            version,
            name,
            mode,
            agent_socket,
            mtu,
            bridge,
            prev_result,
            valid_attachments,
            raw,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetConf, CniError> {
        NetConf::parse(s.as_bytes())
    }

    #[test]
    fn full_conflist_entry() {
        let c = parse(
            r#"{"cniVersion":"1.0.0","name":"podman","type":"trellis","mode":"routed",
                "mtu":1450,"capabilities":{"portMappings":true},
                "runtimeConfig":{"portMappings":[]},"args":{"cni":{}},
                "prevResult":{"cniVersion":"1.0.0","interfaces":[]}}"#,
        )
        .expect("conf");
        assert_eq!(c.mode, Some(AttachMode::Routed));
        assert_eq!(c.mtu, Some(1450));
        assert_eq!(c.agent_socket, DEFAULT_AGENT_SOCKET);
        assert!(c.prev_result.is_some());
    }

    #[test]
    fn error_codes_name_the_field() {
        assert_eq!(parse("{not json").expect_err("x").code, 6);
        assert_eq!(parse("[1]").expect_err("x").code, 6);
        assert_eq!(parse(r#"{"name":"a"}"#).expect_err("x").code, 1);
        assert_eq!(
            parse(r#"{"cniVersion":"0.2.0","name":"a"}"#)
                .expect_err("x")
                .code,
            1
        );
        for (doc, field) in [
            (r#"{"cniVersion":"1.0.0"}"#, "name"),
            (r#"{"cniVersion":"1.0.0","name":"a","mode":"nat"}"#, "mode"),
            (r#"{"cniVersion":"1.0.0","name":"a","mode":7}"#, "mode"),
            (r#"{"cniVersion":"1.0.0","name":"a","mtu":70000}"#, "mtu"),
            (r#"{"cniVersion":"1.0.0","name":"a","mtu":"1500"}"#, "mtu"),
            (
                r#"{"cniVersion":"1.0.0","name":"a","agentSocket":"rel"}"#,
                "agentSocket",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"a","bridge":"a/b"}"#,
                "bridge",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"a","prevResult":3}"#,
                "prevResult",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"a","cni.dev/valid-attachments":[{"x":1}]}"#,
                "cni.dev/valid-attachments",
            ),
        ] {
            let e = parse(doc).expect_err(doc);
            assert_eq!(e.code, 7, "{doc}");
            assert!(e.msg.contains(field), "{}: {}", doc, e.msg);
        }
    }

    #[test]
    fn gc_attachments() {
        let c = parse(
            r#"{"cniVersion":"1.1.0","name":"a","cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]}"#,
        )
        .expect("conf");
        assert_eq!(c.valid_attachments.expect("list")[0].container_id, "c1");
    }
}
