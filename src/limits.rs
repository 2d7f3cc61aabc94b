//! Length caps on client- and publisher-chosen names: one home for each bound, so topic names,
//! ids, event types and roles are refused with a clear error before anything stores or logs them.

/// Longest topic name a client may join (`tournament:<64 KiB>` is refused).
pub const MAX_TOPIC_BYTES: usize = 200;
/// Longest id (org, user, player, queue, tournament).
pub const MAX_ID_BYTES: usize = 128;
/// Longest event name (envelope `type`, client push event).
pub const MAX_EVENT_BYTES: usize = 200;
/// Longest queue role (`top`, `jungle`, …).
pub const MAX_ROLE_BYTES: usize = 32;
