//! The agent's config file (JSON). Until the cluster datastore hands out
//! leased subnets, the node's pod subnet is set here.
//!
//! ```json
//! {"nodeName":"n1","subnet":"10.244.1.0/24","mtu":1500,"defaultMode":"bridge",
//!  "socket":"/run/trellis/trellisd.sock","dataDir":"/var/lib/trellis"}
//! ```

use ipnet::IpNet;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use trellis_cni::config::DEFAULT_AGENT_SOCKET;
use trellis_cni::AttachMode;
use trellis_model::HostRange;

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_AGENT_SOCKET)
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/trellis")
}
fn default_mtu() -> u32 {
    1500
}
fn default_mode() -> AttachMode {
    AttachMode::Bridge
}
fn default_bridge() -> String {
    "cni0".into()
}

/// Agent settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    /// This node's name.
    pub node_name: String,
    /// The node's pod subnet.
    pub subnet: IpNet,
    /// Pod MTU unless a network config overrides it.
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// Attach mode for network configs that do not name one.
    #[serde(default = "default_mode")]
    pub default_mode: AttachMode,
    /// Bridge name in bridge mode unless a network config overrides it.
    #[serde(default = "default_bridge")]
    pub bridge: String,
    /// The CNI socket.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Where allocations are kept.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
}

/// Config errors, naming the file and what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable file.
    #[error("agent config {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// Not valid JSON or a bad field.
    #[error("agent config {0}: {1}")]
    Parse(PathBuf, String),
}

impl AgentConfig {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
        Self::parse(&text).map_err(|e| ConfigError::Parse(path.into(), e))
    }

    /// Parses and validates a config document.
    pub fn parse(text: &str) -> Result<Self, String> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| e.to_string())?;
        HostRange::new(cfg.subnet).map_err(|e| format!("field \"subnet\": {e}"))?;
        if !(576..=65535).contains(&cfg.mtu) {
            return Err(format!(
                "field \"mtu\": {} is not within 576..=65535",
                cfg.mtu
            ));
        }
        trellis_cni::env::validate_ifname(&cfg.bridge).map_err(|_| {
            format!(
                "field \"bridge\": {:?} is not a valid interface name",
                cfg.bridge
            )
        })?;
        if cfg.node_name.is_empty() {
            return Err("field \"nodeName\" is empty".into());
        }
        Ok(cfg)
    }

    /// The directory of this subnet's allocations.
    pub fn ipam_dir(&self) -> PathBuf {
        self.data_dir
            .join("ipam")
            .join(self.subnet.to_string().replace('/', "_"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors() {
        let c = AgentConfig::parse(r#"{"nodeName":"n1","subnet":"10.244.1.0/24"}"#).expect("cfg");
        assert_eq!(c.mtu, 1500);
        assert_eq!(c.default_mode, AttachMode::Bridge);
        assert!(c.ipam_dir().ends_with("ipam/10.244.1.0_24"));
        for (doc, needle) in [
            (r#"{"nodeName":"n1","subnet":"10.244.1.9/24"}"#, "subnet"),
            (
                r#"{"nodeName":"n1","subnet":"10.244.1.0/24","mtu":9}"#,
                "mtu",
            ),
            (
                r#"{"nodeName":"n1","subnet":"10.244.1.0/24","bogus":1}"#,
                "bogus",
            ),
            (r#"{"subnet":"10.244.1.0/24"}"#, "nodeName"),
        ] {
            let e = AgentConfig::parse(doc).expect_err(doc);
            assert!(e.contains(needle), "{doc}: {e}");
        }
    }
}
