//! Pure types shared by the trellis crates. No I/O lives here.

pub mod cidr;

pub use cidr::{CidrError, HostRange};
