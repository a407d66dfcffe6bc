//! CNI error JSON and the spec's error codes.

use serde::{Deserialize, Serialize};

/// 1: the plugin does not support the config's cniVersion.
pub const INCOMPATIBLE_VERSION: u32 = 1;
/// 2: a config field the plugin does not support.
pub const UNSUPPORTED_FIELD: u32 = 2;
/// 3: CHECK for a container the plugin does not know.
pub const UNKNOWN_CONTAINER: u32 = 3;
/// 4: missing or invalid CNI_* environment variable.
pub const INVALID_ENV: u32 = 4;
/// 5: I/O failure (reading stdin, ...).
pub const IO_FAILURE: u32 = 5;
/// 6: the network config is not decodable JSON.
pub const DECODE_FAILURE: u32 = 6;
/// 7: the network config is JSON but a field is invalid.
pub const INVALID_CONFIG: u32 = 7;
/// 11: try again later (the agent is unreachable or not ready).
pub const TRY_AGAIN_LATER: u32 = 11;
/// 50: STATUS: the plugin cannot serve ADD right now.
pub const NOT_AVAILABLE: u32 = 50;
/// 100 (plugin specific): a kernel operation failed.
pub const DATAPLANE_FAILURE: u32 = 100;
/// 101 (plugin specific): CHECK found the attachment differs from what it should be.
pub const CHECK_MISMATCH: u32 = 101;
/// 102 (plugin specific): the node's pod subnet has no free address.
pub const IPAM_EXHAUSTED: u32 = 102;
/// 103 (plugin specific): the agent failed internally (state on disk, ...).
pub const AGENT_FAILURE: u32 = 103;

/// A CNI error as printed on stdout: `{"cniVersion","code","msg","details"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("cni error {code}: {msg}{}", if details.is_empty() { String::new() } else { format!(" ({details})") })]
pub struct CniError {
    /// The spec's error code.
    pub code: u32,
    /// Short message naming what was wrong.
    pub msg: String,
    /// Longer explanation, may be empty.
    #[serde(default)]
    pub details: String,
}

impl CniError {
    /// A new error with `code` and `msg`.
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// Adds details.
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The JSON document the plugin prints, tagged with `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}
