//! The client tunnel and the server endpoint together, on simulated time: the lifecycle a
//! device lives through (rekeys, deaths, restarts, ICMP errors, a time server that goes away,
//! backoff), each scenario in well under a second of real time.

use std::time::Duration;

use crate::endpoint::EndpointEvent;
use crate::health::{DeathCause, HealthPolicy};
use crate::ntp;
use crate::sim::{SERVER, SERVER_ALT, SERVER_V6, Sim, local};
use crate::stats::Counter;
use crate::tunnel::{CloseReason, TunnelEvent, TunnelState};

const SECOND: Duration = Duration::from_secs(1);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A simulation with one tunnel, established and acknowledged.
fn up(policy: HealthPolicy) -> Sim {
    let mut sim = Sim::new();
    sim.add_tunnel(Some(SERVER), policy);
    sim.run(SECOND);
    assert_eq!(sim.tunnels[0].state(), TunnelState::Up);
    assert_eq!(sim.established(0), 1);
    sim
}

/// A device polling every `interval`, `polls` times, from now (the crash): how long until
/// tunnel 0 has made its second association. `before_poll(sim, i)` runs before poll `i`.
fn time_to_replacement(
    sim: &mut Sim,
    polls: usize,
    interval: Duration,
    mut before_poll: impl FnMut(&mut Sim, usize),
) -> Duration {
    let crashed = sim.now;
    let mut recovered = None;
    for i in 0..polls {
        before_poll(sim, i);
        sim.request(0, local(5000));
        sim.run(interval);
        if sim.established(0) == 2 && recovered.is_none() {
            recovered = Some(sim.now - crashed);
        }
    }
    recovered.expect("a new association")
}

#[test]
fn requests_from_many_local_clients_each_get_their_own_reply() {
    let mut sim = up(HealthPolicy::default());
    for round in 0..20 {
        for port in 0..10 {
            sim.request(0, local(5000 + port));
        }
        sim.run(ms(50 + round));
    }
    sim.run(SECOND);
    for (client, seen) in &sim.clients {
        assert_eq!(
            (seen.sent, seen.answered, seen.wrong),
            (20, 20, 0),
            "{client}"
        );
    }
    assert_eq!(
        sim.stats.get(Counter::KeepaliveAcks),
        1,
        "the discovery keepalive"
    );
}

#[test]
fn a_rekey_makes_before_it_breaks_and_loses_no_request() {
    let policy = HealthPolicy {
        rekey_after_records: 20,
        ..HealthPolicy::default()
    };
    let mut sim = up(policy);
    sim.poll(local(5000), 100, ms(100));
    sim.run(3 * SECOND);
    let seen = &sim.clients[&local(5000)];
    assert_eq!((seen.answered, seen.wrong), (100, 0));
    let rekeys = sim
        .tunnel_events
        .iter()
        .filter(|(_, _, e)| matches!(e, TunnelEvent::Established { rekey: true, .. }))
        .count();
    assert!(rekeys >= 4, "{rekeys} rekeys");
    assert!(
        sim.closed(0).is_empty(),
        "a rekey closes nothing: {:?}",
        sim.closed(0)
    );
    // Each replaced association drained and was closed on the server relay's side too.
    let closed_on_server = sim
        .endpoint_events
        .iter()
        .filter(|(_, e)| matches!(e, EndpointEvent::Closed { .. }))
        .count();
    assert_eq!(closed_on_server, rekeys);
}

#[test]
fn a_server_relay_that_lost_its_state_is_found_dead_and_replaced_within_two_seconds() {
    let mut sim = up(HealthPolicy::default());
    sim.poll(local(5000), 5, ms(500));
    // Crash and restart: the new server relay knows no association and drops its records.
    sim.restart_server(true);
    let recovered = time_to_replacement(&mut sim, 60, ms(100), |_, _| {});
    assert!(recovered < 2 * SECOND, "{recovered:?}");
    assert!(
        matches!(sim.closed(0).as_slice(), [reason] if reason.contains("keepalives")),
        "{:?}",
        sim.closed(0)
    );
    assert_eq!(sim.tunnels[0].state(), TunnelState::Up);
}

#[test]
fn a_graceful_server_restart_brings_the_tunnel_back_at_once() {
    let mut sim = up(HealthPolicy::default());
    let now = sim.now;
    sim.endpoint.as_mut().expect("endpoint").close_all(now);
    sim.pump();
    sim.restart_server(true);
    sim.run(SECOND);
    assert_eq!(sim.established(0), 2);
    let closed = sim.closed(0);
    assert!(
        matches!(closed.as_slice(), [r] if r.contains("close_notify")),
        "{closed:?}"
    );
    let back = sim
        .tunnel_events
        .iter()
        .filter(|(_, _, e)| matches!(e, TunnelEvent::Established { .. }))
        .map(|(at, _, _)| *at)
        .next_back()
        .expect("established");
    assert!(back - now < ms(50), "{:?}", back - now);
}

#[test]
fn a_forged_port_unreachable_costs_one_keepalive_and_no_handshake() {
    let mut sim = up(HealthPolicy::default());
    let socket = sim.opened[0].2;
    for _ in 0..20 {
        sim.forge_unreachable(socket);
        sim.request(0, local(5000));
        sim.run(ms(200));
    }
    assert_eq!(sim.established(0), 1, "no new association");
    assert!(sim.closed(0).is_empty());
    assert_eq!(sim.clients[&local(5000)].answered, 20);
    assert_eq!(sim.stats.get(Counter::UpstreamUnreachable), 20);
}

#[test]
fn a_time_server_that_is_down_costs_no_handshake_and_shows_as_upstream_down() {
    let mut sim = up(HealthPolicy::default());
    sim.poll(local(5000), 3, ms(500));
    sim.time_server_up = false;
    sim.poll(local(5000), 60, ms(500));
    assert_eq!(sim.tunnels[0].state(), TunnelState::UpstreamDown);
    assert_eq!(sim.established(0), 1, "no new association");
    assert!(sim.closed(0).is_empty(), "{:?}", sim.closed(0));
    let downs: Vec<_> = sim
        .endpoint_events
        .iter()
        .filter(|(_, e)| matches!(e, EndpointEvent::UpstreamDown { .. }))
        .collect();
    assert_eq!(downs.len(), 1, "logged once: {downs:?}");
    assert!(!sim.endpoint.as_ref().expect("endpoint").upstream_up());
    sim.time_server_up = true;
    sim.poll(local(5000), 3, ms(500));
    assert_eq!(sim.tunnels[0].state(), TunnelState::Up);
    assert!(
        sim.endpoint_events
            .iter()
            .any(|(_, e)| matches!(e, EndpointEvent::UpstreamBack { .. }))
    );
    let states: Vec<TunnelState> = sim
        .tunnel_events
        .iter()
        .filter_map(|(_, _, e)| match e {
            TunnelEvent::StateChanged { to, .. } => Some(*to),
            _ => None,
        })
        .collect();
    assert_eq!(
        states,
        [TunnelState::Up, TunnelState::UpstreamDown, TunnelState::Up]
    );
}

#[test]
fn a_quiet_association_is_kept_warm_and_never_idles_out() {
    let mut sim = up(HealthPolicy::default());
    sim.run(Duration::from_secs(3 * 3600 + 60));
    assert_eq!(sim.established(0), 1);
    assert!(sim.closed(0).is_empty(), "{:?}", sim.closed(0));
    let keepalives = sim.stats.get(Counter::Keepalives);
    assert!(
        (36..=38).contains(&keepalives),
        "one per 300 s: {keepalives}"
    );
    sim.request(0, local(5000));
    sim.run(SECOND);
    assert_eq!(sim.clients[&local(5000)].answered, 1);
}

#[test]
fn an_absent_server_relay_is_retried_with_growing_jittered_backoff() {
    let mut sim = Sim::new();
    sim.restart_server(false);
    sim.add_tunnel(Some(SERVER), HealthPolicy::default());
    sim.run(Duration::from_secs(200));
    let starts: Vec<Duration> = sim
        .opened
        .iter()
        .map(|(at, _, _)| *at - sim.opened[0].0)
        .collect();
    let gaps: Vec<f64> = starts
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    // 1, 2, 4, 8, 16, 32, 60, 60 s, each scaled by a jitter factor in [0.5, 1].
    let bases = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0];
    assert!(gaps.len() >= 6, "{gaps:?}");
    for (gap, base) in gaps.iter().zip(bases) {
        assert!(*gap >= base * 0.5 - 0.01 && *gap <= base + 0.01, "{gaps:?}");
    }
    assert_eq!(sim.tunnels[0].state(), TunnelState::BackingOff);
    // It comes back.
    sim.restart_server(true);
    sim.run(Duration::from_secs(61));
    assert_eq!(sim.tunnels[0].state(), TunnelState::Up);
}

/// The latent bug of the old TunnelTask: one backoff for reconnects and rekeys. A failed rekey
/// advanced it, a successful rekey never reset it, so the next dead association lost its
/// immediate first retry. With one backoff each, the retry is immediate.
#[test]
fn a_failed_rekey_does_not_delay_the_reconnect_after_a_death() {
    let policy = HealthPolicy {
        rekey_after_records: 10,
        ..HealthPolicy::default()
    };
    let mut sim = up(policy);
    // The rekey's handshakes are lost until the first has failed.
    let next_port = sim.next_socket_port();
    sim.drop_from_port = Some(next_port);
    sim.poll(local(5000), 12, ms(100));
    sim.run(Duration::from_secs(70));
    assert!(
        sim.tunnel_events
            .iter()
            .any(|(_, _, e)| matches!(e, TunnelEvent::Refused { rekey: true, .. })),
        "a rekey failed"
    );
    sim.drop_from_port = None;
    sim.poll(local(5000), 5, ms(100));
    sim.run(Duration::from_secs(70));
    assert!(
        sim.tunnel_events
            .iter()
            .any(|(_, _, e)| matches!(e, TunnelEvent::Established { rekey: true, .. })),
        "a rekey succeeded"
    );
    // Now the association dies: the server relay restarts without a word, and an ICMP error
    // (a real one this time) makes the tunnel check the association.
    sim.restart_server(true);
    let socket = sim.opened.last().expect("a socket").2;
    sim.forge_unreachable(socket);
    sim.run(5 * SECOND);
    let died = sim
        .tunnel_events
        .iter()
        .find(|(_, _, e)| {
            matches!(
                e,
                TunnelEvent::Closed {
                    reason: CloseReason::Dead(DeathCause::NoAcknowledgement(_)),
                    ..
                }
            )
        })
        .map(|(at, _, _)| *at)
        .unwrap_or_else(|| {
            panic!(
                "the association died: {:#?}",
                sim.tunnel_events
                    .iter()
                    .map(|(at, _, e)| (*at - sim.opened[0].0, e.clone()))
                    .collect::<Vec<_>>()
            )
        });
    // The replacement was started while the check went unanswered, before the verdict: no
    // backoff between the two, whatever the failed rekey did to its own backoff.
    let retried = sim
        .opened
        .iter()
        .map(|(at, _, _)| *at)
        .rfind(|at| *at <= died)
        .expect("a new association was started");
    assert!(
        died - retried < ms(100),
        "the replacement was under way when the association was given up: {:?}",
        died - retried
    );
}

#[test]
fn every_address_of_a_name_is_tried_in_order() {
    let mut sim = Sim::new();
    // The name resolves to ::1-like first (not listening) and then the address that is.
    sim.resolver.insert(0, Ok(vec![SERVER_V6, SERVER]));
    sim.add_tunnel(None, HealthPolicy::default());
    sim.run(SECOND);
    assert_eq!(sim.tunnels[0].state(), TunnelState::Up);
    assert_eq!(sim.tunnels[0].peer(), Some(SERVER));
    let refused: Vec<_> = sim
        .tunnel_events
        .iter()
        .filter_map(|(_, _, e)| match e {
            TunnelEvent::Refused { peer, retry_in, .. } => Some((*peer, *retry_in)),
            _ => None,
        })
        .collect();
    assert_eq!(
        refused,
        [(SERVER_V6, None)],
        "the first address, then at once the next"
    );
}

#[test]
fn an_unresolvable_name_backs_off_and_is_picked_up_when_it_resolves() {
    let mut sim = Sim::new();
    sim.resolver.insert(0, Err("no such host".into()));
    sim.add_tunnel(None, HealthPolicy::default());
    sim.run(Duration::from_secs(10));
    assert_eq!(sim.tunnels[0].state(), TunnelState::BackingOff);
    let failures = sim
        .tunnel_events
        .iter()
        .filter(|(_, _, e)| matches!(e, TunnelEvent::ResolveFailed { .. }))
        .count();
    assert!((3..=5).contains(&failures), "{failures}");
    sim.resolver.insert(0, Ok(vec![SERVER]));
    sim.run(Duration::from_secs(20));
    assert_eq!(sim.tunnels[0].state(), TunnelState::Up);
}

#[test]
fn loss_between_the_relays_never_misroutes_a_reply() {
    let mut sim = up(HealthPolicy::default());
    sim.loss_percent = 30;
    for round in 0..100 {
        sim.request(0, local(5000 + round % 7));
        sim.run(ms(300));
    }
    sim.loss_percent = 0;
    sim.run(2 * SECOND);
    let (answered, wrong) = sim
        .clients
        .values()
        .fold((0, 0), |(a, w), c| (a + c.answered, w + c.wrong));
    assert_eq!(wrong, 0);
    // 0.7 x 0.7 of 100 expected; well clear of 0 and of 100.
    assert!((30..=70).contains(&answered), "{answered}");
}

#[test]
fn two_devices_behind_one_server_relay_each_get_their_replies() {
    let mut sim = Sim::new();
    sim.add_tunnel(Some(SERVER), HealthPolicy::default());
    sim.add_tunnel(Some(SERVER), HealthPolicy::default());
    sim.run(SECOND);
    for _ in 0..20 {
        sim.request(0, local(5000));
        sim.request(1, local(5000));
        sim.run(ms(100));
    }
    sim.run(SECOND);
    let seen = &sim.clients[&local(5000)];
    assert_eq!((seen.sent, seen.answered, seen.wrong), (40, 40, 0));
    assert_eq!(
        sim.endpoint
            .as_ref()
            .expect("endpoint")
            .association_counts(),
        (2, 0)
    );
}

#[test]
fn a_multi_homed_server_relay_answers_each_tunnel_from_the_address_it_chose() {
    // One endpoint on both addresses (a wildcard bind); the route's choice of source is
    // SERVER, and a tunnel's connected socket drops anything not from its peer.
    let mut sim = Sim::new();
    sim.listening = vec![SERVER, SERVER_ALT];
    sim.add_tunnel(Some(SERVER_ALT), HealthPolicy::default());
    sim.add_tunnel(Some(SERVER), HealthPolicy::default());
    sim.run(SECOND);
    for tunnel in 0..2 {
        assert_eq!(
            sim.tunnels[tunnel].state(),
            TunnelState::Up,
            "tunnel {tunnel}"
        );
    }
    for _ in 0..10 {
        sim.request(0, local(5000));
        sim.request(1, local(5001));
        sim.run(ms(100));
    }
    sim.run(SECOND);
    for (client, seen) in &sim.clients {
        assert_eq!(
            (seen.sent, seen.answered, seen.wrong),
            (10, 10, 0),
            "{client}"
        );
    }
}

// ---- attacks from unauthenticated senders (issue 10) ----------------------------------------

/// A DTLS 1.2 record in `epoch`.
fn record(content_type: u8, epoch: u16, body: &[u8]) -> Vec<u8> {
    let mut out = vec![content_type, 0xfe, 0xfd];
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 0, 9]);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// One epoch-0 handshake record with one fragment of `data` bytes.
fn fragment(msg_type: u8, length: u32, seq: u16, offset: u32, data: usize) -> Vec<u8> {
    let mut body = vec![msg_type];
    body.extend_from_slice(&length.to_be_bytes()[1..]);
    body.extend_from_slice(&seq.to_be_bytes());
    body.extend_from_slice(&offset.to_be_bytes()[1..]);
    body.extend_from_slice(&(data as u32).to_be_bytes()[1..]);
    body.extend(std::iter::repeat_n(0x41, data));
    record(22, 0, &body)
}

/// A real first ClientHello, as our client engine sends it.
fn real_client_hello(sim: &Sim) -> Vec<u8> {
    use crate::engine::{DtlsEngine, Engine};
    let mut engine =
        Engine::client(&sim.pki.client_settings("relay.example", None)).expect("client engine");
    engine.connect(sim.now, SERVER).expect("connect");
    engine
        .poll_transmit()
        .expect("a ClientHello")
        .datagram
        .to_vec()
}

const ATTACKER: std::net::SocketAddr = std::net::SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 7)),
    4444,
);

#[test]
fn a_fragmented_client_hello_chain_gets_nothing_and_the_device_is_served() {
    let mut sim = up(HealthPolicy::default());
    // The finding: 2 500 one-byte fragments of a claimed 60 000-byte ClientHello.
    for round in 0..5u32 {
        for i in 0..500u32 {
            let offset = round * 500 + i;
            sim.forge(ATTACKER, SERVER, fragment(1, 60_000, 0, offset, 1));
        }
        sim.request(0, local(5000));
        sim.run(ms(100));
    }
    assert_eq!(sim.sent_to.get(&ATTACKER), None, "no reply to the chain");
    assert_eq!(
        sim.server_stats.get(Counter::DropFragmentedClientHello),
        2500
    );
    let endpoint = sim.endpoint.as_ref().expect("endpoint");
    assert_eq!(endpoint.association_counts(), (1, 0), "no state for it");
    assert_eq!(sim.clients[&local(5000)].answered, 5);
    assert_eq!(sim.established(0), 1);
}

#[test]
fn an_unproven_address_never_receives_more_than_it_sent() {
    let mut sim = up(HealthPolicy::default());
    let hello = real_client_hello(&sim);
    let mut bytes_in = 0;
    sim.forge(ATTACKER, SERVER, hello.clone());
    bytes_in += hello.len();
    // The finding: 26-byte ClientHello fragments with message_seq 1, each answered by
    // another HelloVerifyRequest.
    for _ in 0..200 {
        let piece = fragment(1, 200, 1, 0, 1);
        bytes_in += piece.len();
        sim.forge(ATTACKER, SERVER, piece);
        sim.run(ms(5));
    }
    // Retransmission timers, the handshake timeout: nothing more either.
    sim.run(Duration::from_secs(15));
    let (bytes_out, datagrams_out) = sim.sent_to.get(&ATTACKER).copied().unwrap_or_default();
    assert_eq!(
        datagrams_out, 1,
        "one HelloVerifyRequest for one ClientHello"
    );
    assert!(
        bytes_out <= bytes_in,
        "{bytes_out} bytes out for {bytes_in} in"
    );
    // A small ClientHello may come in fragments: 16 of them are taken, the rest refused.
    assert_eq!(
        sim.server_stats.get(Counter::DropHandshakeFragments),
        200 - 16
    );
}

#[test]
fn forged_plaintext_handshake_records_toward_either_relay_cost_nothing() {
    let mut sim = up(HealthPolicy::default());
    let device = sim.opened[0].2;
    let before = sim.server_stats.get(Counter::AssociationsEstablished);
    // Toward the server relay from the device's address: fragment chains and zero-length
    // fragments in epoch 0; toward the client relay from the server relay's address, the same.
    for round in 0..10u32 {
        for i in 0..100u32 {
            sim.forge(
                device,
                SERVER,
                fragment(11, 60_000, 2, round * 100 + i, 600),
            );
            sim.forge(device, SERVER, fragment(16, 66, 3, 0, 0));
            sim.forge(
                SERVER,
                device,
                fragment(11, 60_000, 2, round * 100 + i, 600),
            );
            sim.forge(SERVER, device, fragment(14, 0, 5, 0, 0));
        }
        sim.request(0, local(5000));
        sim.run(ms(100));
    }
    assert_eq!(sim.clients[&local(5000)].answered, 10);
    assert_eq!(sim.established(0), 1, "no handshake");
    assert!(sim.closed(0).is_empty());
    assert_eq!(
        sim.server_stats.get(Counter::AssociationsEstablished),
        before
    );
    let late = sim.server_stats.get(Counter::DropLateHandshake)
        + sim.server_stats.get(Counter::DropEmptyFragment)
        + sim.server_stats.get(Counter::DropLateHandshakeRate);
    assert_eq!(
        late, 2000,
        "every forged datagram refused at the server relay"
    );
    assert_eq!(
        sim.stats.get(Counter::DropLateHandshake),
        2000,
        "and at the client relay"
    );
}

#[test]
fn requests_the_time_server_ignores_cost_no_handshake() {
    let mut sim = up(HealthPolicy::default());
    // chronyd ignores a 49-byte request; the relays forward it.
    sim.time_server_ignores = Some(|request| request.len() != 48);
    let forwarded = sim.to_time_server;
    let mut odd = ntp::build_request(ntp::NtpTimestamp(0xE100_0000_0000_0000)).to_vec();
    odd.push(0);
    for round in 0..20u64 {
        // The finding: three 49-byte requests every 1.5 s, for 30 s.
        for i in 0..3u64 {
            odd[40..48].copy_from_slice(&(0xE100_0000_0000_0000 + round * 8 + i).to_be_bytes());
            sim.request_bytes(0, local(6000), &odd);
        }
        sim.run(ms(1500));
    }
    assert!(
        sim.to_time_server >= forwarded + 60,
        "the odd requests went through"
    );
    assert_eq!(sim.established(0), 1, "no handshake");
    assert!(sim.closed(0).is_empty(), "{:?}", sim.closed(0));
    // And with a legitimate client polling beside them, every one of its replies arrives.
    for round in 0..20u64 {
        for i in 0..3u64 {
            odd[40..48].copy_from_slice(&(0xE200_0000_0000_0000 + round * 8 + i).to_be_bytes());
            sim.request_bytes(0, local(6000), &odd);
        }
        sim.request(0, local(5000));
        sim.run(ms(1500));
    }
    assert_eq!(sim.clients[&local(5000)].answered, 20);
    assert_eq!(sim.established(0), 1, "no handshake");
    assert_eq!(sim.tunnels[0].state(), TunnelState::Up);
}

#[test]
fn a_round_trip_inflated_before_a_crash_does_not_slow_the_death_verdict() {
    // A reconnect storm: the server relay was busy with handshakes, so the last replies took
    // 600 ms and the smoothed round trip still remembers it when the server relay crashes.
    let mut sim = up(HealthPolicy::default());
    sim.latency = ms(300);
    sim.poll(local(5000), 20, ms(200));
    sim.run(SECOND);
    sim.latency = ms(1);
    sim.poll(local(5000), 5, ms(200));
    sim.restart_server(true);
    let recovered = time_to_replacement(&mut sim, 40, ms(200), |_, _| {});
    // Three requests unanswered with 1 s of grace, two keepalives 250 ms apart, then a
    // replacement handshake at once, beside the last keepalive's wait of twice the (still
    // inflated) round trip: about 1.6 s. Spacing all three keepalives by the round trip and
    // handshaking only after the verdict took about 2.9 s.
    assert!(recovered < ms(1800), "{recovered:?}");
    assert!(
        matches!(sim.closed(0).as_slice(), [reason] if reason.contains("after 3 keepalives")),
        "the old association's end is reported once: {:?}",
        sim.closed(0)
    );
    assert_eq!(
        sim.opened.len(),
        2,
        "one handshake for the replacement, no second"
    );
    assert_eq!(sim.tunnels[0].state(), TunnelState::Up);
}

#[test]
fn a_replacement_started_for_a_slow_check_that_then_succeeds_costs_one_handshake() {
    let mut sim = up(HealthPolicy::default());
    sim.poll(local(5000), 5, ms(200));
    // The path to the server relay turns slow (a 1.6 s round trip): three requests go
    // unanswered past their 1 s of grace and the check's keepalives past their spacing, so a
    // replacement is made at 1.5 s; the first reply, at 1.6 s, proves the old association
    // alive, and the replacement takes over as a rekey, without a death.
    sim.latency = ms(800);
    sim.poll(local(5000), 10, ms(200));
    sim.run(15 * SECOND);
    assert!(sim.closed(0).is_empty(), "{:?}", sim.closed(0));
    assert!(
        sim.tunnel_events
            .iter()
            .any(|(_, _, e)| matches!(e, TunnelEvent::Established { rekey: true, .. })),
        "the replacement came up as a rekey"
    );
    assert_eq!(sim.opened.len(), 2, "one handshake");
    sim.latency = ms(1);
    sim.poll(local(5000), 5, ms(200));
    sim.run(SECOND);
    assert_eq!(sim.tunnels[0].state(), TunnelState::Up);
    assert_eq!(sim.clients[&local(5000)].answered, 20, "no request lost");
}

#[test]
fn a_replacement_refused_while_the_server_relay_restarts_is_retried_on_its_own_schedule() {
    // The server relay is gone for 2 s (its port answers with ICMP errors), then back without
    // its state. The check's replacement handshake is refused; the death that follows must
    // not connect again at once (refused again) and then back off a second time.
    let mut sim = up(HealthPolicy::default());
    sim.poll(local(5000), 5, ms(200));
    sim.restart_server(false);
    let recovered = time_to_replacement(&mut sim, 40, ms(200), |sim, i| {
        if i == 10 {
            sim.restart_server(true);
        }
    });
    // The replacement is refused (the first ICMP error starts the check at once), the death
    // retries on the replacement's schedule, and the server relay is back at 2 s: 2.2 s in
    // this simulation. Connecting again at once at the death, refused, and backing off twice
    // took 5.8 s.
    assert!(recovered < ms(2600), "{recovered:?}");
    assert!(
        matches!(sim.closed(0).as_slice(), [reason] if reason.contains("keepalives")),
        "{:?}",
        sim.closed(0)
    );
}
