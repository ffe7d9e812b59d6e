//! The server-side relay: DTLS associations in, plain NTP to the time server out.
//!
//! One task owns the DTLS socket, the engine with every association, one upstream socket shared
//! by all peers, and the table that routes the time server's replies back to the peer that asked
//! (matched by origin timestamp, as on the client side). Only NTP client requests (mode 3) are
//! forwarded: the relay must never open chronyd's control surface (modes 6 and 7) to the network.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use bytes::BytesMut;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::config::{ServerConfig, Upstream};
use crate::ops::daemon::{Reload, Shutdown, notify_ready, start_services};
use crate::ops::observe::{Observatory, RttProbe};
use crate::relay::timer::LoopTimer;
use crate::relay::udp::{DatagramSocket, RecvBatch, SendQueue};
use ntp_dtls_proto::admission::{Admission, Arrival, AuditLimiter, Expiry, Refusal};
use ntp_dtls_proto::engine::ServerSettings;
use ntp_dtls_proto::engine::{DtlsEngine, Engine, Event};
use ntp_dtls_proto::ntp::{self, BuiltinSource, NtpTimestamp};
use ntp_dtls_proto::pending::PendingTable;
use ntp_dtls_proto::record;
use ntp_dtls_proto::stats::Counter;

/// Requests in flight to the time server at once; chronyd answers within microseconds, so this
/// only fills when the time server is down.
pub const PENDING_CAPACITY: usize = 65_536;
/// chronyd answers at once or never: a request unanswered after this is lost.
pub const PENDING_TTL: Duration = Duration::from_secs(2);
/// Refusal audit lines per second, sustained and in a burst; beyond that they are counted and
/// the count rides on the next line written.
const AUDIT_RATE: f64 = 20.0;
const AUDIT_BURST: f64 = 200.0;

/// Where requests go.
enum TimeSource {
    /// A real time server (chronyd), through one connected socket.
    Udp(DatagramSocket),
    /// This host's clock, answered in-process.
    Builtin(BuiltinSource),
}

/// Runs the server relay until shutdown: `config.workers` sockets bound to the listen address
/// with SO_REUSEPORT, one thread each. The kernel keeps a client's address and port on one
/// socket, so each worker owns its associations outright: its own engine, admission table,
/// pending table and upstream socket, and no lock on the datagram path.
pub async fn run(config: ServerConfig, shutdown: Shutdown, reload: Reload) -> anyhow::Result<()> {
    tokio::task::LocalSet::new()
        .run_until(run_workers(config, shutdown, reload))
        .await
}

async fn run_workers(
    config: ServerConfig,
    shutdown: Shutdown,
    mut reload: Reload,
) -> anyhow::Result<()> {
    let workers = config.workers.max(1);
    let sockets = bind_reuseport(config.listen, workers)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let listen = sockets
        .first()
        .and_then(|s| s.local_addr().ok())
        .unwrap_or(config.listen);
    // Check the DTLS settings once, before anything is announced.
    Engine::server(&config.settings).context("DTLS server configuration")?;
    let upstream_label = match config.upstream {
        Upstream::Udp(addr) => addr.to_string(),
        Upstream::Builtin { stratum } => format!("builtin(stratum {stratum})"),
    };
    // Each worker gets its share of the association limits.
    let mut limits = config.limits.clone();
    limits.max_associations = limits.max_associations.div_ceil(workers);
    limits.max_half_open = limits.max_half_open.div_ceil(workers);

    let obs = Arc::new(Observatory::new("server", workers));
    record_server_certificates(&obs, &config.settings);
    let metrics = start_services(&config.daemon, &obs, &shutdown).await?;
    // New certificate material reaches every worker; live associations keep theirs.
    let (settings_tx, settings_rx) = watch::channel(None::<Arc<ServerSettings>>);
    let mut threads = Vec::new();
    let mut sockets = sockets.into_iter();
    let first = sockets.next().context("no listening socket")?;
    let first = Worker::start(
        0,
        first,
        &config,
        limits.clone(),
        obs.clone(),
        settings_rx.clone(),
    )
    .await?;
    for (index, socket) in sockets.enumerate() {
        let (config, limits, obs, shutdown, settings_rx) = (
            config.clone_for_worker(),
            limits.clone(),
            obs.clone(),
            shutdown.clone(),
            settings_rx.clone(),
        );
        let thread = std::thread::Builder::new()
            .name(format!("worker-{}", index + 1))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        error!(error = %e, "worker runtime failed to start");
                        return;
                    }
                };
                runtime.block_on(async move {
                    match Worker::start(index + 1, socket, &config, limits, obs, settings_rx).await
                    {
                        // A spawned task, not the block_on future itself: see worker 0 below.
                        Ok(mut worker) => {
                            let task = tokio::spawn(async move { worker.run(shutdown).await });
                            if let Err(e) = task.await {
                                error!(error = %e, "worker ended abnormally");
                            }
                        }
                        Err(e) => error!(error = %format!("{e:#}"), "worker failed to start"),
                    }
                });
            })
            .context("cannot start a worker thread")?;
        threads.push(thread);
    }
    let metrics_label = metrics.map_or_else(|| "off".to_string(), |a| a.to_string());
    info!(
        listen = %listen,
        upstream = %upstream_label,
        metrics = %metrics_label,
        workers,
        mutual_auth = config.settings.client_roots.is_some(),
        cipher = %ntp_dtls_proto::engine::CIPHER_SUITE,
        "ready"
    );
    notify_ready(&format!("listening on {listen} with {workers} workers"));

    let reloader = {
        let obs = obs.clone();
        let (cert, key, client_ca) = (
            config.cert_path.clone(),
            config.key_path.clone(),
            config.client_ca_path.clone(),
        );
        tokio::task::spawn_local(async move {
            loop {
                reload.next().await;
                match ServerConfig::load_settings(&cert, &key, client_ca.as_deref()) {
                    Ok(settings) => {
                        record_server_certificates(&obs, &settings);
                        let _ = settings_tx.send(Some(Arc::new(settings)));
                        info!(result = %"ok", "config reload");
                    }
                    Err(e) => warn!(result = %"failed", error = %e,
                        "config reload; the material in service stays"),
                }
            }
        })
    };
    // Worker 0 runs as a plain task of this thread's runtime, not inside the LocalSet nor as
    // the block_on future: a task the I/O driver wakes is queued directly, where waking either
    // of those writes to the runtime's eventfd, a system call on every datagram.
    let mut first = first;
    let first = tokio::spawn(async move { first.run(shutdown).await });
    if let Err(e) = first.await {
        error!(error = %e, "worker 0 ended abnormally");
    }
    reloader.abort();
    for thread in threads {
        let _ = thread.join();
    }
    let summary: Vec<String> = obs
        .stats
        .nonzero()
        .into_iter()
        .map(|(label, value)| format!("{label}={value}"))
        .collect();
    info!(counters = %summary.join(" "), "stopped");
    Ok(())
}

/// `count` UDP sockets on `addr` with SO_REUSEPORT; a port of 0 is chosen once, by the first.
fn bind_reuseport(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::UdpSocket>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut bound = addr;
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = Socket::new(Domain::for_address(bound), Type::DGRAM, Some(Protocol::UDP))?;
        if bound.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.set_reuse_port(true)?;
        // Room for bursts (floods, many clients at once); the kernel caps it at rmem_max.
        let _ = socket.set_recv_buffer_size(crate::relay::udp::RECV_BUFFER);
        socket.set_nonblocking(true)?;
        socket.bind(&bound.into())?;
        if bound.port() == 0 {
            bound = socket
                .local_addr()?
                .as_socket()
                .ok_or_else(|| std::io::Error::other("bound to a non-IP address"))?;
        }
        sockets.push(socket.into());
    }
    Ok(sockets)
}

struct Worker {
    /// New certificate material after a reload.
    settings: watch::Receiver<Option<Arc<ServerSettings>>>,
    /// Which worker this is, for the association gauges.
    index: usize,
    upstream_label: String,
    rtt: RttProbe,
    socket: DatagramSocket,
    source: TimeSource,
    engine: Engine,
    /// Who may hold state, how much and how long: rtc-dtls bounds none of it.
    admission: Admission,
    audit_limiter: AuditLimiter,
    obs: Arc<Observatory>,
    pending: PendingTable<SocketAddr>,
    /// Handshake retransmission deadlines, per peer. Entries may be stale: the engine's own
    /// poll_timeout is checked when one comes due.
    timers: BinaryHeap<Reverse<(Instant, SocketAddr)>>,
    events: Vec<Event>,
    expired: Vec<Expiry>,
    /// DTLS records to peers, sent together after each batch of input.
    to_peers: SendQueue,
    /// Requests to the time server, likewise.
    to_source: SendQueue,
}

impl Worker {
    /// A worker for one listening socket; must run on the runtime that will drive it.
    async fn start(
        index: usize,
        socket: std::net::UdpSocket,
        config: &ServerConfig,
        limits: ntp_dtls_proto::admission::Limits,
        obs: Arc<Observatory>,
        settings: watch::Receiver<Option<Arc<ServerSettings>>>,
    ) -> anyhow::Result<Worker> {
        let socket = DatagramSocket::from_std(socket).context("cannot register the socket")?;
        let source = match config.upstream {
            Upstream::Udp(addr) => {
                let bind: IpAddr = if addr.is_ipv4() {
                    Ipv4Addr::UNSPECIFIED.into()
                } else {
                    Ipv6Addr::UNSPECIFIED.into()
                };
                let upstream = DatagramSocket::bind(SocketAddr::new(bind, 0))
                    .context("cannot open the upstream socket")?;
                upstream
                    .connect(addr)
                    .with_context(|| format!("cannot use upstream {addr}"))?;
                TimeSource::Udp(upstream)
            }
            Upstream::Builtin { stratum } => TimeSource::Builtin(BuiltinSource {
                stratum,
                ..BuiltinSource::default()
            }),
        };
        let upstream_label = match config.upstream {
            Upstream::Udp(addr) => addr.to_string(),
            Upstream::Builtin { .. } => "builtin".to_string(),
        };
        Ok(Worker {
            settings,
            index,
            upstream_label,
            rtt: RttProbe::default(),
            socket,
            source,
            engine: Engine::server(&config.settings).context("DTLS server configuration")?,
            admission: Admission::new(limits),
            audit_limiter: AuditLimiter::new(AUDIT_RATE, AUDIT_BURST),
            obs,
            pending: PendingTable::new(PENDING_CAPACITY, PENDING_TTL),
            timers: BinaryHeap::new(),
            events: Vec::new(),
            expired: Vec::new(),
            to_peers: SendQueue::default(),
            to_source: SendQueue::default(),
        })
    }

    async fn run(&mut self, mut shutdown: Shutdown) {
        let mut from_peers = RecvBatch::default();
        let mut from_source = RecvBatch::default();
        let mut timer = LoopTimer::default();
        loop {
            timer.arm(self.next_deadline());
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                received = self.socket.recv_batch(&mut from_peers) => match received {
                    Ok(_) => {
                        // Taken first thing: the builtin source's receive timestamp.
                        let arrived = SystemTime::now();
                        let now = Instant::now();
                        for (peer, datagram) in from_peers.iter() {
                            if let Some(peer) = peer {
                                self.on_datagram(now, arrived, peer, datagram);
                            }
                        }
                    }
                    Err(e) => debug!(error = %e, "receive error"),
                },
                received = recv_source(&self.source, &mut from_source) => match received {
                    Ok(_) => {
                        let now = Instant::now();
                        for (_, datagram) in from_source.iter() {
                            self.on_time_server_reply(now, datagram);
                        }
                    }
                    // chronyd not running: ICMP port unreachable comes back as an error here.
                    Err(e) => {
                        self.obs.stats.incr(Counter::DropUpstreamError);
                        debug!(error = %e, "time server receive error");
                    }
                },
                _ = timer.fired() => self.on_timer(Instant::now()),
                Ok(()) = self.settings.changed() => {
                    let settings = self.settings.borrow_and_update().clone();
                    if let Some(settings) = settings {
                        if let Err(e) = self.engine.replace_server_settings(&settings) {
                            warn!(error = %e, "reloaded material refused by the DTLS engine");
                        }
                    }
                }
            }
            self.flush();
            let half_open = self.admission.half_open();
            let established = self.admission.associations().saturating_sub(half_open);
            self.obs
                .set_associations(self.index, established, half_open);
        }
        self.close_all();
    }

    fn next_deadline(&self) -> Option<Instant> {
        let timer = self.timers.peek().map(|Reverse((due, _))| *due);
        [
            timer,
            self.pending.next_deadline(),
            self.admission.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn on_datagram(
        &mut self,
        now: Instant,
        arrived: SystemTime,
        peer: SocketAddr,
        datagram: &[u8],
    ) {
        let arrival = if record::is_client_hello(datagram) {
            Arrival::ClientHello
        } else {
            match record::first_record(datagram).map(|r| r.content_type) {
                Some(record::CONTENT_HANDSHAKE | record::CONTENT_CHANGE_CIPHER_SPEC) => {
                    Arrival::Handshake
                }
                _ => Arrival::Other,
            }
        };
        if let Err(refusal) = self.admission.admit(now, peer, datagram.len(), arrival) {
            self.obs.stats.incr(match refusal {
                Refusal::NotClientHello => Counter::DropNotHandshake,
                Refusal::AssociationLimit => Counter::DropAssociationLimit,
                Refusal::HalfOpenLimit => Counter::DropHalfOpenLimit,
                Refusal::SourceRateLimit => Counter::DropSourceRateLimit,
                Refusal::HandshakeBytes => Counter::DropHandshakeBytes,
            });
            if refusal == Refusal::HandshakeBytes {
                self.engine.abandon_handshake(now, peer);
                self.admission.handshake_failed(peer);
            }
            debug!(%peer, len = datagram.len(), reason = refusal.label(), "datagram dropped");
            return;
        }
        if !self.engine.receive(now, peer, datagram, &mut self.events) {
            self.obs.stats.incr(Counter::DropNotHandshake);
            self.admission.removed(peer);
            return;
        }
        self.schedule(peer);
        let mut events = std::mem::take(&mut self.events);
        for event in events.drain(..) {
            match event {
                Event::Data { peer, payload } => {
                    self.admission.activity(now, peer);
                    if payload.is_empty() {
                        // The client relay keeping a quiet association warm: nothing to forward.
                        self.obs.stats.incr(Counter::Keepalives);
                    } else {
                        self.forward(now, arrived, peer, payload);
                    }
                }
                other => self.audit(now, other),
            }
        }
        self.events = events;
    }

    /// One line per association event: what an evaluator reads.
    fn audit(&mut self, now: Instant, event: Event) {
        match event {
            Event::Established { peer, identity } => {
                self.admission.established(now, peer);
                self.obs.stats.incr(Counter::AssociationsEstablished);
                info!(%peer, subject = %identity, cipher = %ntp_dtls_proto::engine::CIPHER_SUITE,
                    "association established");
            }
            Event::Failed { peer, failure } => {
                self.admission.handshake_failed(peer);
                self.obs.stats.incr(Counter::AssociationsRefused);
                self.obs.failures.incr(failure.label());
                match self.audit_limiter.allow(now) {
                    Some(0) => {
                        info!(%peer, reason = %failure.label(), detail = %failure,
                            "association refused")
                    }
                    Some(suppressed) => {
                        info!(%peer, reason = %failure.label(), detail = %failure, suppressed,
                            "association refused")
                    }
                    None => debug!(%peer, reason = %failure.label(), "association refused"),
                }
            }
            Event::Closed { peer, reason } => {
                self.admission.removed(peer);
                self.obs.stats.incr(Counter::AssociationsClosed);
                info!(%peer, %reason, "association closed");
            }
            Event::Data { .. } => {}
        }
    }

    fn schedule(&mut self, peer: SocketAddr) {
        if let Some(due) = self.engine.poll_timeout(peer) {
            self.timers.push(Reverse((due, peer)));
        }
    }

    /// A request out of an association: checked, then to the time server.
    fn forward(&mut self, now: Instant, arrived: SystemTime, peer: SocketAddr, payload: BytesMut) {
        let request = match ntp::check_request(&payload) {
            Ok(request) => request,
            Err(rejection) => {
                self.obs.stats.incr(rejection.into());
                debug!(%peer, %rejection, "request dropped");
                return;
            }
        };
        match &self.source {
            TimeSource::Builtin(builtin) => {
                let received = NtpTimestamp::from_system_time(arrived);
                let reply = builtin.reply(
                    &payload,
                    received,
                    NtpTimestamp::from_system_time(SystemTime::now()),
                );
                match reply {
                    Ok(reply) => {
                        self.obs.stats.incr(Counter::RequestsForwarded);
                        self.reply(now, peer, &reply)
                    }
                    Err(rejection) => self.obs.stats.incr(rejection.into()),
                }
            }
            TimeSource::Udp(_) => {
                let inserted =
                    self.pending
                        .insert(now, request.transmit.0, request.receive.0, peer);
                if !self.obs.stats.pending_inserted(inserted) {
                    debug!(%peer, "request dropped: transmit timestamp unusable for matching");
                    return;
                }
                // Sent with the rest of this batch, as soon as it is handled.
                self.to_source.push(None, payload);
                self.rtt.forwarded(request.transmit.0, now);
            }
        }
    }

    fn on_time_server_reply(&mut self, now: Instant, datagram: &[u8]) {
        let reply = match ntp::check_reply(datagram) {
            Ok(reply) => reply,
            Err(rejection) => {
                self.obs.stats.incr(rejection.into());
                debug!(%rejection, "time server reply dropped");
                return;
            }
        };
        if let Some(rtt) = self.rtt.answered(reply.origin.0, now) {
            self.obs.observe_rtt(&self.upstream_label, rtt);
        }
        match self.pending.take(now, reply.origin.0) {
            Some(peer) => self.reply(now, peer, datagram),
            None => {
                self.obs.stats.incr(Counter::DropUnmatchedReply);
                debug!("time server reply matches no outstanding request");
            }
        }
    }

    fn reply(&mut self, now: Instant, peer: SocketAddr, datagram: &[u8]) {
        match self.engine.send(now, peer, datagram) {
            // No admission.activity here: idleness is the peer's silence, and its request
            // has just counted.
            Ok(()) => self.obs.stats.incr(Counter::RepliesDelivered),
            Err(e) => {
                self.obs.stats.incr(Counter::DropNoAssociation);
                debug!(%peer, error = %e, "reply dropped");
            }
        }
    }

    fn on_timer(&mut self, now: Instant) {
        let expired = self.pending.expire(now);
        if expired > 0 {
            self.obs.stats.add(Counter::ExpiredPending, expired as u64);
        }
        while let Some(Reverse((due, peer))) = self.timers.peek().copied() {
            if due > now {
                break;
            }
            self.timers.pop();
            if self.engine.poll_timeout(peer).is_some_and(|due| due <= now) {
                self.engine.handle_timeout(now, peer, &mut self.events);
                self.schedule(peer);
                let mut events = std::mem::take(&mut self.events);
                for event in events.drain(..) {
                    self.audit(now, event);
                }
                self.events = events;
            }
        }
        let mut expired = std::mem::take(&mut self.expired);
        self.admission.expire(now, &mut expired);
        for expiry in expired.drain(..) {
            self.on_expiry(now, expiry);
        }
        self.expired = expired;
    }

    fn on_expiry(&mut self, now: Instant, expiry: Expiry) {
        match expiry {
            Expiry::HandshakeTimeout { peer, answered } => {
                self.engine.abandon_handshake(now, peer);
                self.obs.stats.incr(Counter::HandshakeTimeouts);
                if answered {
                    // The peer proved its address and then stalled: a refusal worth a line.
                    self.obs.stats.incr(Counter::AssociationsRefused);
                    self.obs.failures.incr("handshake_timeout");
                    if let Some(suppressed) = self.audit_limiter.allow(now) {
                        info!(%peer, reason = %"handshake_timeout",
                            detail = %"handshake timed out", suppressed, "association refused");
                    }
                } else {
                    // A lone ClientHello, possibly spoofed: counted, not logged.
                    debug!(%peer, "half-open handshake expired");
                }
            }
            Expiry::ReplacementTimeout { peer } => {
                self.engine.abandon_handshake(now, peer);
                self.obs.stats.incr(Counter::HandshakeTimeouts);
                debug!(%peer, "replacement handshake expired; the association stays");
            }
            Expiry::Idle { peer } => {
                self.engine.close(now, peer);
                self.obs.stats.incr(Counter::IdleClosed);
                self.obs.stats.incr(Counter::AssociationsClosed);
                info!(%peer, reason = %"idle", "association closed");
            }
        }
    }

    /// Sends what the batch just handled produced: requests to the time server first (their
    /// replies take longest to come back), then DTLS records to peers.
    fn flush(&mut self) {
        if let TimeSource::Udp(socket) = &self.source {
            if !self.to_source.is_empty() {
                let (flushed, error) = self.to_source.flush(socket);
                self.obs
                    .stats
                    .add(Counter::RequestsForwarded, flushed.sent as u64);
                if let Some(e) = error {
                    // A datagram we cannot send now is better dropped than delayed.
                    self.obs
                        .stats
                        .add(Counter::DropUpstreamError, flushed.failed as u64);
                    debug!(error = %e, failed = flushed.failed, "requests not forwarded");
                }
            }
        }
        while let Some(transmit) = self.engine.poll_transmit() {
            self.to_peers.push(Some(transmit.peer), transmit.datagram);
        }
        if !self.to_peers.is_empty() {
            let (flushed, error) = self.to_peers.flush(&self.socket);
            if let Some(e) = error {
                debug!(error = %e, failed = flushed.failed, "send failed");
            }
        }
    }

    /// Tells every peer we are going, so client relays reconnect at once when we are back.
    fn close_all(&mut self) {
        let now = Instant::now();
        let peers = self.engine.peers();
        for peer in &peers {
            if self.engine.is_established(*peer) {
                self.engine.close(now, *peer);
                self.obs.stats.incr(Counter::AssociationsClosed);
                info!(%peer, reason = %"shutdown", "association closed");
            }
        }
        if !peers.is_empty() {
            self.flush();
        }
    }
}

/// The time server's next replies; never resolves for the builtin source.
async fn recv_source(source: &TimeSource, batch: &mut RecvBatch) -> std::io::Result<usize> {
    match source {
        TimeSource::Udp(socket) => socket.recv_batch(batch).await,
        TimeSource::Builtin(_) => std::future::pending().await,
    }
}

/// The certificates the server has in service, for the expiry gauge and warning.
fn record_server_certificates(
    obs: &Observatory,
    settings: &ntp_dtls_proto::engine::ServerSettings,
) {
    let mut certificates: Vec<(String, &[u8])> = Vec::new();
    if let Some(leaf) = settings.identity.chain.first() {
        certificates.push(("server".into(), leaf.as_ref()));
    }
    for root in settings.client_roots.iter().flatten() {
        certificates.push(("client_ca".into(), root.as_ref()));
    }
    obs.set_certificates(&certificates);
}
