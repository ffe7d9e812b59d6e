//! What an operator touches besides the relay itself: logs, signals and readiness, metrics and
//! status, configuration checks, privileges.

pub mod check;
pub mod control;
pub mod daemon;
pub mod metrics;
pub mod observe;
pub mod privileges;
pub mod status;
