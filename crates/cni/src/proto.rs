//! The request the plugin sends to the agent and the agent's answer. One
//! request per connection; the pod netns travels beside it as an fd.

use crate::env::Env;
use crate::error::CniError;
use crate::result::Attachment;
use serde::{Deserialize, Serialize};

/// A CNI call forwarded to the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// The runtime's environment.
    pub env: Env,
    /// The network config as the runtime passed it.
    pub config: serde_json::Value,
    /// True when an fd for `env.netns` is attached to the message.
    pub has_netns_fd: bool,
}

/// The agent's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Response {
    /// ADD: the attachment.
    Added(Attachment),
    /// DEL, CHECK, STATUS, GC: success without output.
    Done,
    /// Failure with the CNI error to print.
    Error(CniError),
}
