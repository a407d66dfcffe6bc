//! CNI spec 1.1.0 for trellis: environment and config decoding, error codes,
//! result rendering for every supported version, and the request protocol
//! between the `trellis` plugin shim and the `trellisd` agent.
//!
//! Everything here is pure except [`transport`], which moves one request and
//! the pod's netns fd over a unix socket.

pub mod config;
pub mod env;
pub mod error;
pub mod proto;
pub mod result;
pub mod transport;
pub mod version;

pub use config::{AttachMode, NetConf};
pub use env::{Command, Env};
pub use error::CniError;
pub use proto::{Request, Response};
pub use result::{Attachment, IfaceResult, IpResult, RouteResult};
