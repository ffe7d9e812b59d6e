//! The relays' shells: sockets, clocks and tasks around the protocol core's state machines.

pub mod client;
pub mod server;
pub mod timer;
pub mod timestamps;
pub mod udp;
