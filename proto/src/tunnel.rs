//! The client relay's tunnel: one local listener's association towards one server relay.
//!
//! (The state machine itself lands here; for now, the states an operator sees.)

/// What a tunnel is doing, as the `ntp_dtls_tunnel_state` gauge and `status` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TunnelState {
    /// Resolving the server relay's name or handshaking with it; no association yet.
    Connecting,
    /// An association is up and the time server behind it answers.
    Up,
    /// The association is up (the server relay acknowledges keepalives) but NTP requests go
    /// unanswered: the time server behind the server relay is down.
    UpstreamDown,
    /// The last attempt failed (unreachable, timed out, name unresolvable); waiting to retry.
    BackingOff,
    /// The server relay or its certificate was refused (unknown CA, name mismatch, ...);
    /// waiting to retry. Usually needs an operator.
    Refused,
}

impl TunnelState {
    pub const ALL: [TunnelState; 5] = [
        TunnelState::Connecting,
        TunnelState::Up,
        TunnelState::UpstreamDown,
        TunnelState::BackingOff,
        TunnelState::Refused,
    ];

    /// Stable snake_case label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            TunnelState::Connecting => "connecting",
            TunnelState::Up => "up",
            TunnelState::UpstreamDown => "upstream_down",
            TunnelState::BackingOff => "backing_off",
            TunnelState::Refused => "refused",
        }
    }
}
