//! The provider-neutral half of rigger's operations (issue 13: one engine for every provider).
//!
//! It owns the flows written once for every provider (rollout, failover, db status, backups'
//! names, exec targets), the traits providers implement for them, the one clock rigger
//! records times with, and [`progress::Progress`], through which every command reports;
//! ARCHITECTURE.md says which flows are still in the providers. No AWS SDK and no I/O beyond
//! reading the clock: a third provider depends on this crate, not on another provider's.

pub mod backups;
pub mod clock;
pub mod database;
pub mod failover;
pub mod maintenance;
pub mod progress;
pub mod ready;
pub mod rollout;
pub mod scale;
pub mod targets;
