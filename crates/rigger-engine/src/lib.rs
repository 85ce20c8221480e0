//! The provider-neutral half of rigger's operations (issue 13: one engine for every provider).
//!
//! Today it holds what both providers must read the same way: the clock ([`clock`]). The
//! flows themselves (rollout, rollback, failover) still live in each provider and move here
//! one at a time; ARCHITECTURE.md says which are where. No AWS SDK and no I/O beyond reading
//! the clock: a third provider depends on this crate, not on another provider's.

pub mod backups;
pub mod clock;
pub mod database;
pub mod failover;
pub mod rollout;
pub mod targets;
