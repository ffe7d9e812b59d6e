//! What an operator touches besides the relay itself: logs, signals and readiness, metrics,
//! privileges.

pub mod daemon;
pub mod metrics;
pub mod observe;
pub mod privileges;
