//! The protocol core of ntp-dtls, sans I/O.
//!
//! Nothing here owns a socket, reads a clock or spawns a task: every type takes the time as a
//! parameter and returns what should be sent, so the relays' logic is tested deterministically
//! on simulated time (the model is quinn-proto beside quinn, ntp-proto beside ntpd-rs). The
//! `ntp-dtls` crate's shells bind the sockets, read the clocks and execute what these types ask.
//!
//! - [`ntp`]: NTP packet checks and construction.
//! - [`pending`]: outstanding requests, so each reply goes back to whoever asked.
//! - [`residence`]: the relays' residence-time correction of NTP timestamps (a transparent
//!   clock), and the interleaved-mode translation it needs.
//! - [`time_server_tx`]: the time server's own transmit time for a basic reply, asked of it in
//!   its interleaved mode.
//! - [`record`]: the DTLS record pre-parser that decides what may reach the engine.
//! - [`admission`]: who may hold state on the server relay, how much and how long.
//! - [`engine`]: the DTLS engine interface and its rtc-dtls implementation, with our policy.
//! - [`health`], [`backoff`]: the client's view of an association, and its retry schedule.
//! - [`stats`]: the counters every datagram lands in.
//! - [`hash`]: the keyed hash of the per-datagram tables (peer addresses, NTP timestamps).
//! - [`identity`], [`x509`]: keys and certificates, as the engine and audit lines need them.
//! - [`policy`]: the declared DTLS policy (suites, groups, key types, signature schemes).
//! - [`verify`]: certificate policy (EKU, keyUsage, CA rules) and revocation (CRLs).
#![forbid(unsafe_code)]

pub mod admission;
pub mod backoff;
pub mod endpoint;
pub mod engine;
pub mod forward;
pub mod hash;
pub mod health;
pub mod identity;
pub mod ntp;
pub mod pending;
pub mod policy;
pub mod record;
pub mod residence;
pub mod stats;
pub mod time_server_tx;
pub mod tunnel;
pub mod verify;
pub mod x509;

#[cfg(any(test, feature = "test-pki"))]
pub mod testpki;

#[cfg(test)]
mod sim;
#[cfg(test)]
mod sim_tests;
