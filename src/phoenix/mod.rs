//! The Phoenix Channels wire protocol: [`codec`] (V1/V2 text and V2 binary frames) and
//! [`session`] (the per-socket loop: joins, leaves, heartbeats, pushes, limits, closing) and
//! [`ws`] (RFC 6455 framing over the upgraded connection).
//!
//! Invariant: only this module knows the wire format.

pub mod codec;
pub mod session;
pub mod ws;
