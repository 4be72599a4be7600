//! Matching actions to workers: platform properties ([`platform`]) and the
//! queue state machine ([`queue`]). Both are pure logic, driven by the
//! execution and worker services.

pub mod platform;
pub mod queue;

pub use platform::{Capabilities, MatchKey, PlatformError, Requirements};
pub use queue::{Assignment, OpId, PlatformSummary, Rank, Scheduler, WaitReason, WorkerId};
