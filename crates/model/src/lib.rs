//! Pure types shared by the trellis crates. No I/O lives here.

pub mod bgp;
pub mod cidr;
pub mod netconf;
pub mod node;
pub mod status;
pub mod subnet;

pub use cidr::{CidrError, HostRange};
