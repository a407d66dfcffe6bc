//! Pod IP address management for one node subnet.
//!
//! [`Allocator`] is the pure part: which address goes to whom. [`Pool`] adds
//! persistence: one file per allocated address under a directory, created
//! with `O_EXCL` before the address is handed out, removed on release, so a
//! restarted agent restores exactly what was live.

mod allocator;
mod pool;

pub use allocator::{Allocator, IpamError, Owner, OwnerKey};
pub use pool::{Pool, PoolError};
