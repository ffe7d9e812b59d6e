//! The client-side relay: local NTP clients in, one persistent DTLS association per upstream out.
//!
//! Each tunnel is one task that owns its local socket, its upstream socket and engine, and its
//! table of outstanding requests: no locks on the datagram path. chronyd and `ntpdate -u` send
//! every request from a fresh source port, so the association is made at start-up and shared;
//! a request never waits for a handshake. Replies find their way back through the pending table,
//! matched by origin timestamp.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use crate::cli::ClientArgs;
use crate::config::{ClientConfig, Tunnel};
use crate::ops::daemon::{Reload, Shutdown, notify_ready, start_services};
use crate::ops::observe::{Observatory, RttProbe};
use crate::relay::timer::LoopTimer;
use crate::relay::udp::{DatagramSocket, RecvBatch, SendQueue};
use ntp_dtls_proto::backoff::Backoff;
use ntp_dtls_proto::engine::{DtlsEngine, Engine, Event, Failure};
use ntp_dtls_proto::health::{Health, Verdict};
use ntp_dtls_proto::ntp;
use ntp_dtls_proto::pending::PendingTable;
use ntp_dtls_proto::stats::{Counter, Stats};

/// Outstanding requests per tunnel. NTP clients poll at most a few times a second each; this
/// leaves room for bursts from many local clients.
pub const PENDING_CAPACITY: usize = 4096;
/// How long a request waits for its reply. ntpdate and sntp give up after a second or two.
pub const PENDING_TTL: Duration = Duration::from_secs(8);
const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Runs every tunnel until shutdown. Returns an error only for start-up failures.
///
/// Tunnel tasks run on this thread: each owns its engine (rtc-dtls's is not `Sync`), and
/// nothing on a datagram's path crosses threads. They are plain tasks of the runtime, not of the
/// LocalSet the control plane (metrics, reload) needs: a task the I/O driver wakes is queued
/// directly, where waking a LocalSet task writes to the runtime's eventfd, a system call on
/// every datagram.
pub async fn run(
    config: ClientConfig,
    args: ClientArgs,
    shutdown: Shutdown,
    reload: Reload,
) -> anyhow::Result<()> {
    tokio::task::LocalSet::new()
        .run_until(run_tunnels(config, args, shutdown, reload))
        .await
}

async fn run_tunnels(
    config: ClientConfig,
    args: ClientArgs,
    shutdown: Shutdown,
    mut reload: Reload,
) -> anyhow::Result<()> {
    let obs = Arc::new(Observatory::new("client", config.tunnels.len()));
    record_client_certificates(&obs, &config.tunnels);
    let mut locals = Vec::with_capacity(config.tunnels.len());
    for tunnel in &config.tunnels {
        let socket = DatagramSocket::bind(tunnel.listen)
            .with_context(|| format!("{}: cannot listen on {}", tunnel.name, tunnel.listen))?;
        locals.push(socket);
    }
    let metrics = start_services(&config.daemon, &obs, &shutdown).await?;

    let mut outcomes = Vec::new();
    let mut reloaders = Vec::new();
    let mut tasks = Vec::new();
    let mut listening = Vec::new();
    for (index, (tunnel, local)) in config.tunnels.into_iter().zip(locals).enumerate() {
        listening.push(local.local_addr().unwrap_or(tunnel.listen).to_string());
        let (first_outcome, outcome) = oneshot::channel();
        outcomes.push(outcome);
        let (reloader, settings) = watch::channel(tunnel.settings.clone());
        reloaders.push(reloader);
        let mut task = TunnelTask::new(index, tunnel, local, obs.clone(), first_outcome);
        task.settings = Some(settings);
        tasks.push(tokio::spawn(task.run(shutdown.clone())));
    }

    // Ready once every tunnel's first association is up or has failed once: a supervisor that
    // waits for us then knows whether time can flow.
    let mut up = 0;
    for outcome in outcomes {
        if outcome.await.unwrap_or(false) {
            up += 1;
        }
    }
    let listen = listening.join(",");
    let metrics_label = metrics.map_or_else(|| "off".to_string(), |a| a.to_string());
    info!(listen = %listen, tunnels = listening.len(), associations_up = up,
        metrics = %metrics_label, "ready");
    notify_ready(&format!("{up} of {} associations up", listening.len()));

    // SIGHUP: the CA, certificate and key files are read again; new handshakes (reconnects,
    // rekeys) use them, live associations go on.
    let reload_task = {
        let obs = obs.clone();
        tokio::task::spawn_local(async move {
            loop {
                reload.next().await;
                match ClientConfig::from_args(&args) {
                    Ok(new) if new.tunnels.len() == reloaders.len() => {
                        record_client_certificates(&obs, &new.tunnels);
                        for (reloader, tunnel) in reloaders.iter().zip(new.tunnels) {
                            let _ = reloader.send(tunnel.settings);
                        }
                        info!(result = %"ok", "config reload");
                    }
                    Ok(_) => warn!(result = %"failed",
                        error = %"the tunnel list changed: restart to apply it",
                        "config reload; the material in service stays"),
                    Err(e) => warn!(result = %"failed", error = %e,
                        "config reload; the material in service stays"),
                }
            }
        })
    };

    for task in tasks {
        if let Err(e) = task.await {
            warn!(error = %e, "tunnel task ended abnormally");
        }
    }
    reload_task.abort();
    let summary: Vec<String> = obs
        .stats
        .nonzero()
        .into_iter()
        .map(|(label, value)| format!("{label}={value}"))
        .collect();
    info!(counters = %summary.join(" "), "stopped");
    Ok(())
}

/// An association towards the server relay, from its own ephemeral source port.
struct Upstream {
    socket: DatagramSocket,
    engine: Engine,
    /// Records for the server relay, sent together after each batch of input.
    outgoing: SendQueue,
    /// Present once the handshake has completed.
    health: Option<Health>,
}

/// Which of a tunnel's associations something happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// The one requests go through (or its first handshake).
    Current,
    /// A rekey in progress: made before the current one is broken.
    Next,
    /// A replaced association, kept a moment for replies still in flight.
    Draining,
}

/// After a rekey, the old association stays this long for replies to requests it carried.
const DRAIN: Duration = Duration::from_secs(2);

struct TunnelTask {
    /// Which tunnel this is, for the association gauges.
    index: usize,
    /// Reloaded certificate material, for the next handshake.
    settings: Option<watch::Receiver<ntp_dtls_proto::engine::ClientSettings>>,
    tunnel: Tunnel,
    local: DatagramSocket,
    /// Replies for local clients, sent together after each batch of input.
    to_local: SendQueue,
    obs: Arc<Observatory>,
    rtt: RttProbe,
    pending: PendingTable<SocketAddr>,
    current: Option<Upstream>,
    next: Option<Upstream>,
    draining: Option<(Upstream, Instant)>,
    /// When to try the next handshake while there is no current association.
    retry_at: Option<Instant>,
    /// When to try the next rekey after one failed.
    rekey_at: Option<Instant>,
    backoff: Backoff,
    /// The reason of the last refusal, so a failing server is logged once, not every retry.
    last_failure: Option<String>,
    first_outcome: Option<oneshot::Sender<bool>>,
    events: Vec<Event>,
}

impl TunnelTask {
    fn new(
        index: usize,
        tunnel: Tunnel,
        local: DatagramSocket,
        obs: Arc<Observatory>,
        first_outcome: oneshot::Sender<bool>,
    ) -> Self {
        TunnelTask {
            index,
            settings: None,
            tunnel,
            local,
            to_local: SendQueue::default(),
            obs,
            rtt: RttProbe::default(),
            pending: PendingTable::new(PENDING_CAPACITY, PENDING_TTL),
            current: None,
            next: None,
            draining: None,
            retry_at: Some(Instant::now()),
            rekey_at: None,
            backoff: Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX),
            last_failure: None,
            first_outcome: Some(first_outcome),
            events: Vec::new(),
        }
    }

    async fn run(mut self, mut shutdown: Shutdown) {
        let mut from_local = RecvBatch::default();
        let mut from_upstream: [RecvBatch; 3] = Default::default();
        let mut timer = LoopTimer::default();
        loop {
            timer.arm(self.next_deadline());
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                received = self.local.recv_batch(&mut from_local) => match received {
                    Ok(_) => {
                        let now = Instant::now();
                        for (from, datagram) in from_local.iter() {
                            if let Some(from) = from {
                                self.on_request(now, datagram, from);
                            }
                        }
                    }
                    Err(e) => debug!(tunnel = %self.tunnel.name, error = %e, "local receive error"),
                },
                (slot, received) = recv_any(
                    self.current.as_ref().map(|u| &u.socket),
                    self.next.as_ref().map(|u| &u.socket),
                    self.draining.as_ref().map(|(u, _)| &u.socket),
                    &mut from_upstream,
                ) => match received {
                    Ok(_) => {
                        let now = Instant::now();
                        for (_, datagram) in from_upstream[slot as usize].iter() {
                            self.on_upstream(now, slot, datagram);
                        }
                    }
                    // ICMP port unreachable: nobody listens at the server relay's address.
                    Err(e) => self.on_unreachable(Instant::now(), slot, &e),
                },
                _ = timer.fired() => self.on_timer(Instant::now()),
            }
            self.flush();
            let established = self.current.as_ref().is_some_and(|u| u.health.is_some());
            let half_open = usize::from(self.current.as_ref().is_some_and(|u| u.health.is_none()))
                + usize::from(self.next.is_some());
            self.obs
                .set_associations(self.index, usize::from(established), half_open);
        }
        if let Some(mut upstream) = self.current.take() {
            if upstream.health.is_some() {
                upstream.engine.close(Instant::now(), self.tunnel.server);
                flush_upstream(&mut upstream, &self.obs.stats);
                info!(tunnel = %self.tunnel.name, server = %self.tunnel.server,
                    reason = %"shutdown", "association closed");
            }
        }
    }

    fn upstream(&mut self, slot: Slot) -> Option<&mut Upstream> {
        match slot {
            Slot::Current => self.current.as_mut(),
            Slot::Next => self.next.as_mut(),
            Slot::Draining => self.draining.as_mut().map(|(u, _)| u),
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let server = self.tunnel.server;
        let policy = &self.tunnel.policy;
        let engine_timers = [
            self.current.as_ref(),
            self.next.as_ref(),
            self.draining.as_ref().map(|(u, _)| u),
        ]
        .into_iter()
        .flatten()
        .filter_map(|u| u.engine.poll_timeout(server));
        let health = self
            .current
            .as_ref()
            .and_then(|u| u.health.as_ref())
            .map(|h| h.next_deadline(policy));
        engine_timers
            .chain(
                [
                    self.pending.next_deadline(),
                    self.retry_at,
                    self.rekey_at,
                    health,
                    self.draining.as_ref().map(|(_, until)| *until),
                ]
                .into_iter()
                .flatten(),
            )
            .min()
    }

    /// A request from a local NTP client: check it, remember who asked, send it on.
    fn on_request(&mut self, now: Instant, datagram: &[u8], from: SocketAddr) {
        let request = match ntp::check_request(datagram) {
            Ok(request) => request,
            Err(rejection) => {
                self.obs.stats.incr(rejection.into());
                debug!(tunnel = %self.tunnel.name, %from, %rejection, "request dropped");
                return;
            }
        };
        let server = self.tunnel.server;
        let Some(upstream) = self.current.as_mut().filter(|u| u.health.is_some()) else {
            self.obs.stats.incr(Counter::DropNoAssociation);
            debug!(tunnel = %self.tunnel.name, %from, "request dropped: no association up");
            return;
        };
        let inserted = self
            .pending
            .insert(now, request.transmit.0, request.receive.0, from);
        if !self.obs.stats.pending_inserted(inserted) {
            debug!(tunnel = %self.tunnel.name, %from,
                "request dropped: transmit timestamp unusable for matching");
            return;
        }
        match upstream.engine.send(now, server, datagram) {
            Ok(()) => {
                self.obs.stats.incr(Counter::RequestsForwarded);
                self.rtt.forwarded(request.transmit.0, now);
                if let Some(health) = upstream.health.as_mut() {
                    health.request_sent(now);
                }
            }
            Err(e) => {
                self.obs.stats.incr(Counter::DropNoAssociation);
                debug!(tunnel = %self.tunnel.name, error = %e, "request dropped");
            }
        }
    }

    fn on_upstream(&mut self, now: Instant, slot: Slot, datagram: &[u8]) {
        let server = self.tunnel.server;
        let mut events = std::mem::take(&mut self.events);
        if let Some(upstream) = self.upstream(slot) {
            upstream.engine.receive(now, server, datagram, &mut events);
        }
        self.handle_events(now, slot, &mut events);
        self.events = events;
    }

    fn handle_events(&mut self, now: Instant, slot: Slot, events: &mut Vec<Event>) {
        for event in events.drain(..) {
            match event {
                Event::Data { payload, .. } => {
                    if let Some(health) = self.upstream(slot).and_then(|u| u.health.as_mut()) {
                        health.reply_received();
                    }
                    self.on_reply(now, payload);
                }
                Event::Established { peer, identity } => {
                    if let Some(upstream) = self.upstream(slot) {
                        upstream.health = Some(Health::new(now));
                    }
                    self.obs.stats.incr(Counter::AssociationsEstablished);
                    let rekey = slot == Slot::Next;
                    info!(tunnel = %self.tunnel.name, server = %peer, subject = %identity,
                        cipher = %ntp_dtls_proto::engine::CIPHER_SUITE, rekey, "association established");
                    if rekey {
                        // Make before break: new requests go through the new association; the
                        // old one stays a moment for replies already on their way.
                        let old = std::mem::replace(&mut self.current, self.next.take());
                        if let Some(old) = old {
                            self.draining = Some((old, now + DRAIN));
                        }
                        self.rekey_at = None;
                    } else {
                        self.backoff.reset();
                        self.last_failure = None;
                        self.report_first_outcome(true);
                    }
                }
                Event::Failed { peer, failure } => {
                    self.obs.stats.incr(Counter::AssociationsRefused);
                    self.obs.failures.incr(failure.label());
                    // Send the fatal alert the engine queued before the association goes, so
                    // the server relay learns (and audits) why.
                    let obs = self.obs.clone();
                    if let Some(upstream) = self.upstream(slot) {
                        flush_upstream(upstream, &obs.stats);
                    }
                    match slot {
                        Slot::Current => self.on_failure(now, peer, &failure),
                        Slot::Next => {
                            info!(tunnel = %self.tunnel.name, server = %peer,
                                reason = %failure.label(), detail = %failure, rekey = true,
                                "association refused");
                            self.next = None;
                            self.rekey_at = Some(now + self.backoff.next_delay(jitter_unit()));
                        }
                        Slot::Draining => self.draining = None,
                    }
                }
                Event::Closed { peer, reason } => {
                    self.obs.stats.incr(Counter::AssociationsClosed);
                    info!(tunnel = %self.tunnel.name, server = %peer, %reason, "association closed");
                    match slot {
                        Slot::Current => {
                            self.current = None;
                            // The server relay went away cleanly (restart, idle): come back now.
                            self.retry_at = Some(now);
                        }
                        Slot::Next => self.next = None,
                        Slot::Draining => self.draining = None,
                    }
                }
            }
        }
    }

    fn on_failure(&mut self, now: Instant, peer: SocketAddr, failure: &Failure) {
        let reason = failure.label();
        if self.last_failure.as_deref() != Some(reason) {
            info!(tunnel = %self.tunnel.name, server = %peer, reason = %reason,
                detail = %failure, "association refused");
        } else {
            debug!(tunnel = %self.tunnel.name, server = %peer, reason = %reason,
                "association refused again");
        }
        self.last_failure = Some(reason.to_string());
        self.current = None;
        self.schedule_retry(now);
        self.report_first_outcome(false);
    }

    /// ICMP port unreachable on an upstream socket.
    fn on_unreachable(&mut self, now: Instant, slot: Slot, error: &std::io::Error) {
        self.obs.stats.incr(Counter::DropUpstreamError);
        debug!(tunnel = %self.tunnel.name, ?slot, %error, "server relay unreachable");
        let established = self
            .upstream(slot)
            .is_some_and(|upstream| upstream.health.is_some());
        match slot {
            Slot::Current if established => {
                self.declare_dead(now, &format!("server relay unreachable ({error})"))
            }
            Slot::Current => self.on_failure(
                now,
                self.tunnel.server,
                &Failure::Other(format!("server relay unreachable ({error})")),
            ),
            Slot::Next => {
                self.next = None;
                self.rekey_at = Some(now + self.backoff.next_delay(jitter_unit()));
            }
            Slot::Draining => self.draining = None,
        }
    }

    /// The current association stopped answering: handshake anew at once, from a fresh port.
    fn declare_dead(&mut self, now: Instant, cause: &str) {
        info!(tunnel = %self.tunnel.name, server = %self.tunnel.server, reason = %"dead",
            detail = %cause, "association closed");
        self.obs.stats.incr(Counter::AssociationsClosed);
        // Late replies may still come: the old association drains like a replaced one.
        if let Some(old) = self.current.take() {
            self.draining = Some((old, now + DRAIN));
        }
        self.next = None;
        // The first retry is immediate; repeated deaths back off like refusals.
        let first = self.backoff.failures() == 0;
        let delay = self.backoff.next_delay(jitter_unit());
        self.retry_at = Some(if first { now } else { now + delay });
    }

    fn schedule_retry(&mut self, now: Instant) {
        let delay = self.backoff.next_delay(jitter_unit());
        self.retry_at = Some(now + delay);
        debug!(tunnel = %self.tunnel.name, delay_ms = delay.as_millis() as u64,
            "handshake retry scheduled");
    }

    fn report_first_outcome(&mut self, up: bool) {
        if let Some(sender) = self.first_outcome.take() {
            let _ = sender.send(up);
        }
    }

    /// A reply from the server relay: back to the local socket whose request it answers.
    fn on_reply(&mut self, now: Instant, payload: bytes::BytesMut) {
        let reply = match ntp::check_reply(&payload) {
            Ok(reply) => reply,
            Err(rejection) => {
                self.obs.stats.incr(rejection.into());
                debug!(tunnel = %self.tunnel.name, %rejection, "reply dropped");
                return;
            }
        };
        if let Some(rtt) = self.rtt.answered(reply.origin.0, now) {
            self.obs.observe_rtt(&self.tunnel.server_spec, rtt);
        }
        let Some(client) = self.pending.take(now, reply.origin.0) else {
            self.obs.stats.incr(Counter::DropUnmatchedReply);
            debug!(tunnel = %self.tunnel.name, "reply dropped: matches no outstanding request");
            return;
        };
        // Sent with the rest of this batch, as soon as it is handled.
        self.to_local.push(Some(client), payload);
    }

    fn on_timer(&mut self, now: Instant) {
        let expired = self.pending.expire(now);
        if expired > 0 {
            self.obs.stats.add(Counter::ExpiredPending, expired as u64);
        }
        let server = self.tunnel.server;
        for slot in [Slot::Current, Slot::Next, Slot::Draining] {
            let mut events = std::mem::take(&mut self.events);
            if let Some(upstream) = self.upstream(slot) {
                if upstream
                    .engine
                    .poll_timeout(server)
                    .is_some_and(|due| due <= now)
                {
                    upstream.engine.handle_timeout(now, server, &mut events);
                }
            }
            self.handle_events(now, slot, &mut events);
            self.events = events;
        }
        if self
            .draining
            .as_ref()
            .is_some_and(|(_, until)| *until <= now)
        {
            if let Some((mut old, _)) = self.draining.take() {
                old.engine.close(now, server);
                flush_upstream(&mut old, &self.obs.stats);
                debug!(tunnel = %self.tunnel.name, "replaced association closed");
            }
        }
        self.check_health(now);
        if self.retry_at.is_some_and(|due| due <= now) {
            self.retry_at = None;
            if let Some(upstream) = self.start_association(now, Slot::Current) {
                self.current = Some(upstream);
            }
        }
        if self.rekey_at.is_some_and(|due| due <= now) && self.next.is_none() {
            self.rekey_at = None;
            self.next = self.start_association(now, Slot::Next);
        }
    }

    fn check_health(&mut self, now: Instant) {
        let policy = self.tunnel.policy.clone();
        let server = self.tunnel.server;
        let Some(upstream) = self.current.as_mut() else {
            return;
        };
        let Some(health) = upstream.health.as_mut() else {
            return;
        };
        match health.verdict(now, &policy) {
            Verdict::Fine => {}
            Verdict::KeepAlive => {
                if upstream.engine.send(now, server, &[]).is_ok() {
                    health.keepalive_sent(now);
                    self.obs.stats.incr(Counter::Keepalives);
                }
            }
            Verdict::Rekey => {
                if self.next.is_none() && self.rekey_at.is_none() {
                    debug!(tunnel = %self.tunnel.name, records = health.records_sent(),
                        "rekey: making a fresh association");
                    self.rekey_at = Some(now);
                }
            }
            Verdict::Dead(cause) => self.declare_dead(now, &cause.to_string()),
        }
    }

    /// A fresh association from a fresh ephemeral port: nothing of a previous one is reused.
    fn start_association(&mut self, now: Instant, slot: Slot) -> Option<Upstream> {
        if let Some(settings) = self.settings.as_mut() {
            if settings.has_changed().unwrap_or(false) {
                self.tunnel.settings = settings.borrow_and_update().clone();
            }
        }
        let server = self.tunnel.server;
        let bind: IpAddr = if server.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        let attempt = || {
            let socket = DatagramSocket::bind(SocketAddr::new(bind, 0))?;
            socket.connect(server)?;
            let mut engine = Engine::client(&self.tunnel.settings)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            engine
                .connect(now, server)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            Ok::<_, std::io::Error>(Upstream {
                socket,
                engine,
                outgoing: SendQueue::default(),
                health: None,
            })
        };
        match attempt() {
            Ok(upstream) => {
                debug!(tunnel = %self.tunnel.name, %server, ?slot,
                    local = ?upstream.socket.local_addr().ok(), "handshake started");
                Some(upstream)
            }
            Err(e) => {
                let failure = Failure::Other(format!("cannot reach {server}: {e}"));
                match slot {
                    Slot::Current => self.on_failure(now, server, &failure),
                    _ => self.rekey_at = Some(now + self.backoff.next_delay(jitter_unit())),
                }
                None
            }
        }
    }

    /// Sends what the batch just handled produced: records to the server relay, replies to
    /// local clients.
    fn flush(&mut self) {
        let obs = self.obs.clone();
        for slot in [Slot::Current, Slot::Next, Slot::Draining] {
            if let Some(upstream) = self.upstream(slot) {
                flush_upstream(upstream, &obs.stats);
            }
        }
        if !self.to_local.is_empty() {
            let (flushed, error) = self.to_local.flush(&self.local);
            obs.stats
                .add(Counter::RepliesDelivered, flushed.sent as u64);
            if let Some(e) = error {
                debug!(tunnel = %self.tunnel.name, error = %e, failed = flushed.failed,
                    "replies not delivered");
            }
        }
    }
}

fn flush_upstream(upstream: &mut Upstream, stats: &Stats) {
    while let Some(transmit) = upstream.engine.poll_transmit() {
        upstream.outgoing.push(None, transmit.datagram);
    }
    if !upstream.outgoing.is_empty() {
        let (flushed, error) = upstream.outgoing.flush(&upstream.socket);
        if let Some(e) = error {
            stats.add(Counter::DropUpstreamError, flushed.failed as u64);
            debug!(error = %e, failed = flushed.failed, "upstream send failed");
        }
    }
}

/// Receives on whichever upstream socket has datagrams, into that slot's batch; never resolves
/// while there is none. Cancel-safe, like each receive.
///
/// Takes the sockets, not the upstreams: the engine is not `Sync`, and a reference to it held
/// across an await would keep the task from being a plain (`Send`) tokio task.
async fn recv_any(
    current: Option<&DatagramSocket>,
    next: Option<&DatagramSocket>,
    draining: Option<&DatagramSocket>,
    batches: &mut [RecvBatch; 3],
) -> (Slot, std::io::Result<usize>) {
    async fn recv(
        socket: Option<&DatagramSocket>,
        batch: &mut RecvBatch,
    ) -> std::io::Result<usize> {
        match socket {
            Some(socket) => socket.recv_batch(batch).await,
            None => std::future::pending().await,
        }
    }
    let [a, b, c] = batches;
    tokio::select! {
        biased;
        r = recv(current, a) => (Slot::Current, r),
        r = recv(next, b) => (Slot::Next, r),
        r = recv(draining, c) => (Slot::Draining, r),
    }
}

/// A uniformly distributed number in [0, 1) for backoff jitter. Quality barely matters here;
/// the standard library's randomly keyed hasher gives us one without a dependency.
fn jitter_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// The certificates each tunnel relies on, for the expiry gauge and warning.
fn record_client_certificates(obs: &Observatory, tunnels: &[Tunnel]) {
    let mut certificates: Vec<(String, &[u8])> = Vec::new();
    for tunnel in tunnels {
        for root in &tunnel.settings.roots {
            certificates.push((format!("{} ca", tunnel.name), root.as_ref()));
        }
        if let Some(leaf) = tunnel
            .settings
            .identity
            .as_ref()
            .and_then(|i| i.chain.first())
        {
            certificates.push((format!("{} client", tunnel.name), leaf.as_ref()));
        }
    }
    obs.set_certificates(&certificates);
}
