//! trellis's BGP-4 speaker. This first part is the wire codec: every
//! message trellis sends or accepts, decoded without panics from any bytes,
//! with the RFC's NOTIFICATION for errors that end a session and RFC 7606
//! treat-as-withdraw / attribute-discard for the ones that need not.
//! The FSM, RIBs and route reflection build on it; nothing here touches a
//! socket or the kernel.

pub mod fsm;
pub mod md5;
pub mod rib;
pub mod wire;

pub use wire::{
    decode, encode, Capability, Ctx, DecodeError, Message, Notification, Open, PathAttribute,
    Update,
};
