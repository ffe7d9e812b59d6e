//! A simulated network for the state machines' tests: client tunnels and a server endpoint
//! wired together in memory, with a simulated clock, one-way latency, loss, a time server that
//! can be stopped, and a server relay that can go away and come back. Real DTLS handshakes run
//! (rtc-dtls, in-memory certificates); no socket is opened and no real time passes.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::admission::Limits;
use crate::endpoint::{Destination, Endpoint, EndpointEvent, TimeSource};
use crate::health::HealthPolicy;
use crate::ntp::{self, BuiltinSource, NtpTimestamp};
use crate::stats::{RttGauge, Stats};
use crate::testpki::TestPki;
use crate::tunnel::{Action, AssociationId, Tunnel, TunnelConfig, TunnelEvent};

pub const SERVER: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)),
    1123,
);
/// Another address of the same server relay host (for the multi-address tests).
pub const SERVER_V6: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
    1123,
);
/// A second address of the server relay's host, on the same port: a relay bound to the
/// wildcard address answers on both (see `Sim::listening`).
pub const SERVER_ALT: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2)),
    1123,
);
const TIME_SERVER_DELAY: Duration = Duration::from_micros(20);

#[derive(Debug)]
struct Packet {
    from: SocketAddr,
    to: SocketAddr,
    data: Vec<u8>,
}

#[derive(Debug)]
enum Arrival {
    Packet(Packet),
    /// An ICMP port unreachable for a datagram `socket` sent to an address nobody listens on.
    Unreachable {
        socket: SocketAddr,
    },
    TimeServerReply(Vec<u8>),
}

/// One local client's view: what it sent and what came back.
#[derive(Debug, Default)]
pub struct Client {
    pub sent: u32,
    pub answered: u32,
    pub wrong: u32,
}

pub struct Sim {
    t0: Instant,
    wall0: SystemTime,
    pub now: Instant,
    pub latency: Duration,
    /// Percentage of datagrams lost, each way, between the relays.
    pub loss_percent: u64,
    rng: u64,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    arrivals: HashMap<u64, Arrival>,
    seq: u64,
    pub pki: TestPki,
    pub tunnels: Vec<Tunnel>,
    /// Association socket address -> (tunnel, association).
    sockets: BTreeMap<SocketAddr, (usize, AssociationId)>,
    next_port: u16,
    pub endpoint: Option<Endpoint>,
    pub limits: Limits,
    pub time_server_up: bool,
    /// Server relay addresses that answer (others send ICMP back).
    pub listening: Vec<SocketAddr>,
    pub stats: Arc<Stats>,
    pub server_stats: Arc<Stats>,
    pub tunnel_events: Vec<(Instant, usize, TunnelEvent)>,
    pub endpoint_events: Vec<(Instant, EndpointEvent)>,
    pub opened: Vec<(Instant, usize, SocketAddr)>,
    /// Transmit timestamp -> (tunnel, local client) of requests in flight.
    outstanding: HashMap<u64, (usize, SocketAddr)>,
    pub clients: BTreeMap<SocketAddr, Client>,
    next_ts: u64,
    /// Names to resolve: tunnel index -> the addresses the resolver returns.
    pub resolver: HashMap<usize, Result<Vec<SocketAddr>, String>>,
    pub drop_from_port: Option<u16>,
    /// Requests the time server ignores, as chronyd ignores a malformed one.
    pub time_server_ignores: Option<fn(&[u8]) -> bool>,
    /// Requests the server relay sent to the time server.
    pub to_time_server: usize,
    /// Bytes the server relay sent to each address, and datagrams.
    pub sent_to: HashMap<SocketAddr, (usize, usize)>,
}

impl Sim {
    pub fn new() -> Sim {
        let t0 = Instant::now();
        let pki = TestPki::new("sim CA");
        let limits = Limits::default();
        let server_stats = Arc::new(Stats::default());
        let endpoint = Endpoint::new(
            &pki.server_settings(&["relay.example"], None),
            limits.clone(),
            TimeSource::Forward,
            server_stats.clone(),
            Arc::new(RttGauge::default()),
        )
        .expect("endpoint");
        Sim {
            t0,
            wall0: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            now: t0,
            latency: Duration::from_micros(200),
            loss_percent: 0,
            rng: 0x9E37_79B9_7F4A_7C15,
            queue: BinaryHeap::new(),
            arrivals: HashMap::new(),
            seq: 0,
            pki,
            tunnels: Vec::new(),
            sockets: BTreeMap::new(),
            next_port: 40_000,
            endpoint: Some(endpoint),
            limits,
            time_server_up: true,
            listening: vec![SERVER],
            stats: Arc::new(Stats::default()),
            server_stats,
            tunnel_events: Vec::new(),
            endpoint_events: Vec::new(),
            opened: Vec::new(),
            outstanding: HashMap::new(),
            clients: BTreeMap::new(),
            next_ts: 0xE000_0000_0000_0000,
            resolver: HashMap::new(),
            drop_from_port: None,
            time_server_ignores: None,
            sent_to: HashMap::new(),
            to_time_server: 0,
        }
    }

    pub fn wall(&self) -> SystemTime {
        self.wall0 + self.now.saturating_duration_since(self.t0)
    }

    /// A tunnel to `server` (an address, or a name the resolver answers for).
    pub fn add_tunnel(&mut self, server_addr: Option<SocketAddr>, policy: HealthPolicy) -> usize {
        let config = TunnelConfig {
            name: format!("tunnel {}", self.tunnels.len() + 1),
            server_spec: "relay.example:1123".into(),
            server_addr,
            settings: self.pki.client_settings("relay.example", None),
            policy,
        };
        let seed = 0x1234_5678 + self.tunnels.len() as u64;
        let tunnel = Tunnel::new(
            config,
            self.now,
            self.stats.clone(),
            Arc::new(RttGauge::default()),
            seed,
        );
        self.tunnels.push(tunnel);
        self.pump();
        self.tunnels.len() - 1
    }

    /// Replaces the server relay by a fresh one that knows no association (a crash and
    /// restart), or takes it away (`None`: its address answers with ICMP errors).
    pub fn restart_server(&mut self, up: bool) {
        self.endpoint = up.then(|| {
            Endpoint::new(
                &self.pki.server_settings(&["relay.example"], None),
                self.limits.clone(),
                TimeSource::Forward,
                self.server_stats.clone(),
                Arc::new(RttGauge::default()),
            )
            .expect("endpoint")
        });
    }

    fn random_percent(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % 100
    }

    fn schedule(&mut self, at: Instant, arrival: Arrival) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.arrivals.insert(self.seq, arrival);
    }

    fn send(&mut self, from: SocketAddr, to: SocketAddr, data: Vec<u8>) {
        if self.loss_percent > 0 && self.random_percent() < self.loss_percent {
            return;
        }
        if self.drop_from_port == Some(from.port()) {
            return;
        }
        let at = self.now + self.latency;
        self.schedule(at, Arrival::Packet(Packet { from, to, data }));
    }

    /// One request from local client `client` of tunnel `tunnel`.
    pub fn request(&mut self, tunnel: usize, client: SocketAddr) {
        self.next_ts += 0x1_0000_0001;
        let request = ntp::build_request(NtpTimestamp(self.next_ts));
        self.outstanding.insert(self.next_ts, (tunnel, client));
        self.clients.entry(client).or_default().sent += 1;
        let (now, wall) = (self.now, self.wall());
        self.tunnels[tunnel].handle_request(now, wall, client, &request);
        self.pump();
    }

    /// Executes what every state machine asks for, until none asks for anything.
    pub fn pump(&mut self) {
        loop {
            let mut busy = false;
            for index in 0..self.tunnels.len() {
                let (now, wall) = (self.now, self.wall());
                while let Some(action) = self.tunnels[index].poll_action(now, wall) {
                    busy = true;
                    self.execute(index, action);
                }
                while let Some(event) = self.tunnels[index].poll_event() {
                    self.tunnel_events.push((self.now, index, event));
                }
            }
            let (now, wall) = (self.now, self.wall());
            let mut transmits = Vec::new();
            if let Some(endpoint) = self.endpoint.as_mut() {
                while let Some(transmit) = endpoint.poll_transmit(now, wall) {
                    transmits.push(transmit);
                }
                while let Some(event) = endpoint.poll_event() {
                    self.endpoint_events.push((now, event));
                }
            }
            for transmit in transmits {
                busy = true;
                if transmit.destination == Destination::TimeServer {
                    self.to_time_server += 1;
                }
                match transmit.destination {
                    // From the address the endpoint names, else the route's choice: SERVER.
                    Destination::Peer(peer) => {
                        let sent = self.sent_to.entry(peer).or_default();
                        sent.0 += transmit.datagram.len();
                        sent.1 += 1;
                        let from =
                            SocketAddr::new(transmit.local.unwrap_or(SERVER.ip()), SERVER.port());
                        self.send(from, peer, transmit.datagram.to_vec())
                    }
                    Destination::TimeServer
                        if self
                            .time_server_ignores
                            .is_some_and(|ignores| ignores(&transmit.datagram)) => {}
                    Destination::TimeServer if self.time_server_up => {
                        let source = BuiltinSource::default();
                        let stamp = NtpTimestamp::from_system_time(self.wall());
                        if let Ok(reply) = source.reply(&transmit.datagram, stamp, stamp) {
                            let at = self.now + TIME_SERVER_DELAY;
                            self.schedule(at, Arrival::TimeServerReply(reply.to_vec()));
                        }
                    }
                    Destination::TimeServer => {}
                }
            }
            if !busy {
                return;
            }
        }
    }

    fn execute(&mut self, tunnel: usize, action: Action) {
        match action {
            Action::Resolve => {
                let answer = self
                    .resolver
                    .get(&tunnel)
                    .cloned()
                    .unwrap_or_else(|| Err("no such name".into()));
                let now = self.now;
                self.tunnels[tunnel].resolved(now, answer);
            }
            Action::Open { id, .. } => {
                self.next_port += 1;
                let socket = SocketAddr::from(([198, 51, 100, 1], self.next_port));
                self.sockets.insert(socket, (tunnel, id));
                self.opened.push((self.now, tunnel, socket));
            }
            Action::Send { id, datagram, .. } => {
                if let Some(socket) = self.socket_of(tunnel, id) {
                    let peer = self.peer_of(tunnel, id).unwrap_or(SERVER);
                    self.send(socket, peer, datagram.to_vec());
                }
            }
            Action::Deliver { to, datagram, .. } => {
                let reply = ntp::check_reply(&datagram).expect("a valid reply");
                let client = self.clients.entry(to).or_default();
                match self.outstanding.remove(&reply.origin.0) {
                    Some((t, c)) if t == tunnel && c == to => client.answered += 1,
                    _ => client.wrong += 1,
                }
            }
            Action::Close { id } => {
                self.sockets.retain(|_, v| *v != (tunnel, id));
            }
        }
    }

    fn socket_of(&self, tunnel: usize, id: AssociationId) -> Option<SocketAddr> {
        self.sockets
            .iter()
            .find(|(_, v)| **v == (tunnel, id))
            .map(|(k, _)| *k)
    }

    /// The association's peer, from the last Open the tunnel asked for with this id.
    fn peer_of(&self, tunnel: usize, id: AssociationId) -> Option<SocketAddr> {
        let _ = (tunnel, id);
        self.tunnels[tunnel].peer_of(id)
    }

    fn deliver(&mut self, arrival: Arrival) {
        let (now, wall) = (self.now, self.wall());
        match arrival {
            Arrival::Packet(packet) if packet.to.port() == SERVER.port() => {
                let listening = self.listening.contains(&packet.to);
                match self.endpoint.as_mut() {
                    Some(endpoint) if listening => endpoint.handle_datagram_to(
                        now,
                        wall,
                        packet.from,
                        Some(packet.to.ip()),
                        &packet.data,
                    ),
                    _ => {
                        let at = self.now + self.latency;
                        self.schedule(
                            at,
                            Arrival::Unreachable {
                                socket: packet.from,
                            },
                        );
                    }
                }
            }
            Arrival::Packet(packet) => {
                if let Some(&(tunnel, id)) = self.sockets.get(&packet.to) {
                    // Association sockets are connected: the kernel drops a datagram from any
                    // address but the peer's.
                    if self
                        .peer_of(tunnel, id)
                        .is_none_or(|peer| peer == packet.from)
                    {
                        self.tunnels[tunnel].handle_datagram(now, wall, id, &packet.data);
                    }
                }
            }
            Arrival::Unreachable { socket } => {
                if let Some(&(tunnel, id)) = self.sockets.get(&socket) {
                    self.tunnels[tunnel].handle_unreachable(now, id, "connection refused");
                }
            }
            Arrival::TimeServerReply(reply) => {
                if let Some(endpoint) = self.endpoint.as_mut() {
                    endpoint.handle_time_server_reply(now, wall, &reply);
                }
            }
        }
        self.pump();
    }

    /// Runs the simulation for `duration` of simulated time.
    pub fn run(&mut self, duration: Duration) {
        let end = self.now + duration;
        let mut steps = 0u64;
        loop {
            steps += 1;
            if steps > 100_000 {
                let timers: Vec<_> = self
                    .tunnels
                    .iter()
                    .map(|t| {
                        t.poll_timeout()
                            .map(|t| t.saturating_duration_since(self.now))
                    })
                    .collect();
                panic!(
                    "the simulation does not settle at {:?}: tunnel timers {timers:?}, endpoint {:?}, queue {}, {}",
                    self.now - self.t0,
                    self.endpoint
                        .as_ref()
                        .and_then(|e| e.poll_timeout())
                        .map(|t| t.saturating_duration_since(self.now)),
                    self.queue.len(),
                    self.tunnels[0].debug_state(self.now),
                );
            }
            let arrival = self.queue.peek().map(|Reverse((at, _))| *at);
            let timers = self
                .tunnels
                .iter()
                .filter_map(Tunnel::poll_timeout)
                .chain(self.endpoint.as_ref().and_then(Endpoint::poll_timeout))
                .min();
            let Some(next) = arrival.into_iter().chain(timers).min() else {
                self.now = end;
                return;
            };
            if next > end {
                self.now = end;
                return;
            }
            self.now = self.now.max(next);
            if arrival.is_some_and(|at| at <= self.now) {
                if let Some(Reverse((_, seq))) = self.queue.pop() {
                    if let Some(arrival) = self.arrivals.remove(&seq) {
                        self.deliver(arrival);
                    }
                }
                continue;
            }
            let now = self.now;
            for tunnel in &mut self.tunnels {
                if tunnel.poll_timeout().is_some_and(|t| t <= now) {
                    tunnel.handle_timeout(now);
                }
            }
            if let Some(endpoint) = self.endpoint.as_mut() {
                if endpoint.poll_timeout().is_some_and(|t| t <= now) {
                    endpoint.handle_timeout(now);
                }
            }
            self.pump();
        }
    }

    /// `count` requests from `client` of tunnel 0, one every `interval`.
    pub fn poll(&mut self, client: SocketAddr, count: u32, interval: Duration) {
        for _ in 0..count {
            self.request(0, client);
            self.run(interval);
        }
    }

    pub fn established(&self, tunnel: usize) -> usize {
        self.tunnel_events
            .iter()
            .filter(|(_, t, e)| *t == tunnel && matches!(e, TunnelEvent::Established { .. }))
            .count()
    }

    pub fn closed(&self, tunnel: usize) -> Vec<String> {
        self.tunnel_events
            .iter()
            .filter_map(|(_, t, e)| match e {
                TunnelEvent::Closed { reason, .. } if *t == tunnel => Some(reason.to_string()),
                _ => None,
            })
            .collect()
    }
}

impl Sim {
    /// The port the next association's socket will get.
    pub fn next_socket_port(&self) -> u16 {
        self.next_port + 1
    }

    /// A datagram forged with any source address, arriving now.
    pub fn forge(&mut self, from: SocketAddr, to: SocketAddr, data: Vec<u8>) {
        let at = self.now;
        self.schedule(at, Arrival::Packet(Packet { from, to, data }));
    }

    /// A request of any bytes from local client `client` of tunnel `tunnel`; no reply is
    /// expected (it is not counted as sent).
    pub fn request_bytes(&mut self, tunnel: usize, client: SocketAddr, datagram: &[u8]) {
        let (now, wall) = (self.now, self.wall());
        self.tunnels[tunnel].handle_request(now, wall, client, datagram);
        self.pump();
    }

    /// A forged ICMP port unreachable, as if for a datagram `socket` sent.
    pub fn forge_unreachable(&mut self, socket: SocketAddr) {
        let at = self.now;
        self.schedule(at, Arrival::Unreachable { socket });
    }
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
