//! trellis's BGP-4 speaker: the wire codec (every message decoded without
//! panics from any bytes, with the RFC's NOTIFICATION or RFC 7606
//! treat-as-withdraw), the pure per-peer FSM, the RIBs with best-path
//! selection, import (loop prevention, policy) and export (route
//! reflection) as pure functions, and the tokio speaker that drives them.
//! Nothing here touches the kernel's routing: best-path changes go out on a
//! channel for the agent to install.

pub mod export;
pub mod fsm;
pub mod import;
pub mod md5;
pub mod rib;
pub mod speaker;
pub mod wire;

pub use speaker::{PeerKind, PeerSpec, PeerStatus, RouteEvent, RouteFeed, Speaker, SpeakerConfig};
pub use wire::{
    decode, encode, AsSegment, Capability, Ctx, DecodeError, Message, Notification, Open,
    PathAttribute, Update,
};
