//! The routing backends as pure functions: from this node and the other
//! nodes to the routes, neighbours, FDB entries and links the kernel should
//! hold. A reconciler in the agent diffs and applies them; nothing here
//! touches the kernel.
//!
//! | backend | per remote node |
//! |---|---|
//! | `vxlan` | neighbour VTEP IP -> VTEP MAC, FDB VTEP MAC -> node IP, route subnet via VTEP IP onlink on `trellis.1` |
//! | `host-gw` | route subnet via node IP on the underlay (same L2 segment only) |
//! | `vxlan` + `DirectRouting` | host-gw for nodes on the segment, vxlan for the rest |

mod desired;

pub use desired::{
    desired, parse_mac, Desired, Fdb, LocalNode, Neigh, NextHop, Route, VxlanLink, VXLAN_DEV,
};
