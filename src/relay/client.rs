//! The client relay's shell: local NTP clients in, one persistent DTLS association per tunnel
//! out, driven by the protocol core's [`Tunnel`] state machine.
//!
//! Each tunnel is one task that owns its local socket and the sockets of its associations
//! (at most three: the current one, a rekey's next one, a replaced one draining), feeds the
//! tunnel what arrives, and executes what it asks: resolve the server's name, open a socket
//! from a fresh ephemeral port, send, deliver, close. Every decision (when to handshake, which
//! address, when an association is dead, when to rekey) is the tunnel's. No lock on the
//! datagram path; nothing crosses threads.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use ntp_dtls_proto::engine::ClientSettings;
use ntp_dtls_proto::stats::Counter;
use ntp_dtls_proto::tunnel::{
    Action, AssociationId, CloseReason, Tunnel, TunnelConfig, TunnelEvent, TunnelState,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::cli::ClientArgs;
use crate::config::{ClientConfig, Tunnel as TunnelSettings};
use crate::ops::control::{Control, ControlEvent};
use crate::ops::daemon::{Reload, Shutdown, log_reload, notify_ready, start_services};
use crate::ops::observe::Observatory;
use crate::relay::timer::{BusyPoll, LoopTimer};
use crate::relay::timestamps::TimestampMetrics;
use crate::relay::udp::{DatagramSocket, Received, RecvBatch, SendQueue};

/// A tunnel's local socket, bound before anything else starts (a start-up error when the
/// address is taken), and its settings.
pub struct BoundTunnel {
    pub settings: TunnelSettings,
    pub local: DatagramSocket,
    /// The daemon's `busy_poll_us`.
    pub busy_poll: Duration,
}

/// Binds every tunnel's local socket, starts metrics and drops privileges, then runs the
/// tunnels until shutdown. Returns an error only for start-up failures.
pub async fn run(
    config: ClientConfig,
    args: ClientArgs,
    shutdown: Shutdown,
    reload: Reload,
) -> anyhow::Result<()> {
    tokio::task::LocalSet::new()
        .run_until(async move {
            let obs = Arc::new(Observatory::new("client", config.tunnels.len()));
            obs.set_timestamp_correction(config.timestamp_correction);
            record_client_certificates(&obs, &config.tunnels);
            let mut bound = Vec::with_capacity(config.tunnels.len());
            for settings in config.tunnels {
                let local = DatagramSocket::bind(settings.listen).with_context(|| {
                    format!("{}: cannot listen on {}", settings.name, settings.listen)
                })?;
                bound.push(BoundTunnel {
                    settings,
                    local,
                    busy_poll: config.daemon.busy_poll,
                });
            }
            let metrics = start_services(&config.daemon, &obs, &shutdown).await?;
            let metrics_label = metrics.map_or_else(|| "off".to_string(), |a| a.to_string());
            let (reloads, reloaded) = mpsc::unbounded_channel();
            let reloader =
                tokio::task::spawn_local(reload_on_signal(reload, args, obs.clone(), reloads));
            serve(bound, obs, shutdown, reloaded, &metrics_label).await;
            reloader.abort();
            Ok(())
        })
        .await
}

/// Runs bound tunnels until `shutdown`; `reloaded` brings each SIGHUP's new settings (one per
/// tunnel, in order). In-process tests call this with sockets of their own.
pub async fn serve(
    tunnels: Vec<BoundTunnel>,
    obs: Arc<Observatory>,
    shutdown: Shutdown,
    mut reloaded: mpsc::UnboundedReceiver<Vec<ClientSettings>>,
    metrics_label: &str,
) {
    let count = tunnels.len();
    let mut settings_senders = Vec::with_capacity(count);
    let mut first_outcomes = Vec::with_capacity(count);
    let mut listening = Vec::with_capacity(count);
    let mut tasks = Vec::with_capacity(count);
    for (index, bound) in tunnels.into_iter().enumerate() {
        listening.push(
            bound
                .local
                .local_addr()
                .unwrap_or(bound.settings.listen)
                .to_string(),
        );
        let (settings_tx, settings_rx) = watch::channel(bound.settings.settings.clone());
        settings_senders.push(settings_tx);
        let (outcome_tx, outcome_rx) = tokio::sync::oneshot::channel();
        first_outcomes.push(outcome_rx);
        let task = TunnelTask::new(index, bound, obs.clone(), settings_rx, outcome_tx);
        // A plain task of the runtime, not of the LocalSet: waking a LocalSet task writes to
        // the runtime's eventfd, a system call on every datagram.
        tasks.push(tokio::spawn(task.run(shutdown.clone())));
    }

    // Ready once every tunnel's first association is up or has failed once: a supervisor
    // that waits for us then knows whether time can flow.
    let mut up = 0;
    for outcome in first_outcomes {
        if outcome.await.unwrap_or(false) {
            up += 1;
        }
    }
    info!(listen = %listening.join(","), tunnels = count, associations_up = up,
        metrics = %metrics_label, "ready");
    notify_ready(&format!("{up} of {count} associations up"));

    let forward_reloads = async {
        while let Some(new) = reloaded.recv().await {
            for (sender, settings) in settings_senders.iter().zip(new) {
                let _ = sender.send(settings);
            }
        }
        std::future::pending::<()>().await
    };
    let wait_all = async {
        for task in tasks {
            if let Err(e) = task.await {
                warn!(error = %e, "tunnel task ended abnormally");
            }
        }
    };
    tokio::select! {
        _ = forward_reloads => {}
        _ = wait_all => {}
    }
    let summary: Vec<String> = obs
        .stats
        .nonzero()
        .into_iter()
        .map(|(label, value)| format!("{label}={value}"))
        .collect();
    info!(counters = %summary.join(" "), "stopped");
}

/// SIGHUP: the configuration is read again. Certificates, keys and CA files go into service
/// for new handshakes (reconnects, rekeys), live associations go on; a changed key that only a
/// restart can apply (a listen address, a tunnel added) is named in the reload line.
async fn reload_on_signal(
    mut reload: Reload,
    args: ClientArgs,
    obs: Arc<Observatory>,
    reloads: mpsc::UnboundedSender<Vec<ClientSettings>>,
) {
    // The baseline each reload is compared with: the configuration as it was at start.
    let mut current = ClientConfig::from_args(&args);
    loop {
        reload.next().await;
        let outcome = match &current {
            Ok(config) => config.reload(),
            Err(_) => ClientConfig::from_args(&args).map(|new| {
                let plan = crate::config::ReloadPlan::default();
                (new, plan)
            }),
        };
        let outcome = outcome.map(|(new, plan)| {
            record_client_certificates(&obs, &new.tunnels);
            obs.set_timestamp_correction(new.timestamp_correction);
            // Each tunnel that still exists takes its new material; a tunnel added or removed
            // waits for a restart (and the plan says so).
            let _ = reloads.send(new.tunnels.iter().map(|t| t.settings.clone()).collect());
            current = Ok(new);
            plan
        });
        log_reload(&outcome);
        reload.finished();
    }
}

/// One association's socket.
struct AssociationSocket {
    id: AssociationId,
    socket: DatagramSocket,
    outgoing: SendQueue,
}

struct TunnelTask {
    index: usize,
    tunnel: Tunnel,
    local: DatagramSocket,
    /// Replies for local clients, sent together after each batch of input.
    to_local: SendQueue,
    sockets: Vec<AssociationSocket>,
    resolving: Option<JoinHandle<Result<Vec<SocketAddr>, String>>>,
    obs: Arc<Observatory>,
    settings: watch::Receiver<ClientSettings>,
    first_outcome: Option<tokio::sync::oneshot::Sender<bool>>,
    /// Reads the sockets without sleeping for a while after each receive.
    busy: BusyPoll,
}

impl TunnelTask {
    fn new(
        index: usize,
        bound: BoundTunnel,
        obs: Arc<Observatory>,
        settings: watch::Receiver<ClientSettings>,
        first_outcome: tokio::sync::oneshot::Sender<bool>,
    ) -> Self {
        let s = bound.settings;
        let rtt = obs.rtt_gauge(&s.server_spec);
        let config = TunnelConfig {
            name: s.name.clone(),
            server_spec: s.server_spec.clone(),
            server_addr: s.server,
            settings: s.settings,
            policy: s.policy,
        };
        let seed = jitter_seed(index);
        let mut tunnel = Tunnel::new(config, Instant::now(), obs.stats.clone(), rtt, seed);
        tunnel.set_timestamp_observer(TimestampMetrics::new(obs.clone()));
        tunnel.set_timestamp_correction(obs.timestamp_correction());
        let mut local = bound.local;
        if let Err(e) = local.enable_tx_timestamps() {
            warn!(tunnel = %s.name, error = %e,
                "no kernel transmit timestamps: replies' departures are clock reads");
        }
        TunnelTask {
            index,
            tunnel,
            local,
            to_local: SendQueue::default(),
            sockets: Vec::with_capacity(3),
            resolving: None,
            obs,
            settings,
            first_outcome: Some(first_outcome),
            busy: BusyPoll::new(bound.busy_poll),
        }
    }

    async fn run(mut self, shutdown: Shutdown) {
        let mut from_local = RecvBatch::default();
        let mut from_upstream: [RecvBatch; 3] = Default::default();
        let mut timer = LoopTimer::default();
        self.execute();
        let control = Control::spawn(shutdown, self.settings.clone());
        loop {
            timer.arm(self.tunnel.poll_timeout());
            let poll_until = self.busy.until();
            tokio::select! {
                biased;
                event = control.next() => match event {
                    ControlEvent::Stop => break,
                    ControlEvent::Settings(settings) => self.tunnel.set_settings(settings),
                },
                received = self.local.recv_batch(&mut from_local, poll_until) => match received {
                    Ok(_) => {
                        let now = Instant::now();
                        self.busy.received(now);
                        for Received { from, data, kernel_rx, .. } in from_local.iter() {
                            if let Some(from) = from {
                                // No kernel receive timestamp: a clock read right after recvmmsg.
                                let rx = kernel_rx.unwrap_or_else(SystemTime::now);
                                self.tunnel.handle_request(now, rx, from, data);
                            }
                        }
                    }
                    Err(e) => debug!(tunnel = %self.tunnel.name(), error = %e, "local receive error"),
                },
                (slot, received) = recv_any(&self.sockets, &mut from_upstream, poll_until) => {
                    let now = Instant::now();
                    if let Some(id) = self.sockets.get(slot).map(|s| s.id) {
                        match received {
                            Ok(_) => {
                                self.busy.received(now);
                                for Received { data, kernel_rx, .. } in from_upstream[slot].iter() {
                                    let rx = kernel_rx.unwrap_or_else(SystemTime::now);
                                    self.tunnel.handle_datagram(now, rx, id, data);
                                }
                            }
                            // ICMP port unreachable (or a forgery of one): the tunnel checks.
                            Err(e) => self.tunnel.handle_unreachable(now, id, &e.to_string()),
                        }
                    }
                },
                resolved = wait_resolution(&mut self.resolving) => {
                    self.resolving = None;
                    self.tunnel.resolved(Instant::now(), resolved);
                },
                _ = timer.fired() => self.tunnel.handle_timeout(Instant::now()),
            }
            self.execute();
        }
        self.tunnel.close(Instant::now());
        self.execute();
    }

    /// Does what the tunnel asks, sends what it queued, and reports what happened.
    fn execute(&mut self) {
        // A reload may have turned the residence correction on or off.
        self.tunnel
            .set_timestamp_correction(self.obs.timestamp_correction());
        // Twice at most: a send that reports an ICMP error makes the tunnel queue a keepalive.
        for _ in 0..2 {
            self.execute_actions();
            if !self.flush() {
                break;
            }
        }
        while let Some(event) = self.tunnel.poll_event() {
            self.log(event);
        }
        let (established, handshaking) = self.tunnel.association_counts();
        self.obs
            .set_associations(self.index, established, handshaking);
        self.obs.set_tunnel_state(
            self.index,
            self.tunnel.state(),
            self.tunnel.name(),
            &self.tunnel.config().server_spec,
        );
    }

    /// Does what the tunnel asks; the sends are queued for [`Self::flush`].
    fn execute_actions(&mut self) {
        // One monotonic read for the pass (timers and round trips need no finer).
        let now = Instant::now();
        loop {
            // Read right before the datagram is finished: a reply's transmit timestamp is
            // corrected with it, and it is sent in this same pass.
            let Some(action) = self.tunnel.poll_action(now, SystemTime::now()) else {
                break;
            };
            match action {
                Action::Resolve => self.resolve(),
                Action::Open { id, peer } => match open_socket(peer) {
                    Ok(socket) => {
                        debug!(tunnel = %self.tunnel.name(), %peer,
                            local = ?socket.local_addr().ok(), "handshake started");
                        self.sockets.push(AssociationSocket {
                            id,
                            socket,
                            outgoing: SendQueue::default(),
                        });
                    }
                    Err(e) => self
                        .tunnel
                        .open_failed(Instant::now(), id, &format!("{peer}: {e}")),
                },
                Action::Send {
                    id,
                    datagram,
                    ntp,
                    departure,
                } => {
                    if let Some(socket) = self.sockets.iter_mut().find(|s| s.id == id) {
                        socket
                            .outgoing
                            .push_departing(None, None, datagram, ntp, departure);
                    }
                }
                Action::Deliver {
                    to,
                    datagram,
                    departure,
                } => self
                    .to_local
                    .push_departing(Some(to), None, datagram, true, Some(departure)),
                Action::Close { id } => {
                    if let Some(position) = self.sockets.iter().position(|s| s.id == id) {
                        let mut closing = self.sockets.remove(position);
                        self.flush_socket_of(&mut closing);
                        report_flushed(&mut self.tunnel, &mut closing.outgoing);
                    }
                }
            }
        }
    }

    fn resolve(&mut self) {
        if self.resolving.is_some() {
            return;
        }
        let spec = self.tunnel.config().server_spec.clone();
        // getaddrinfo blocks: it runs on the blocking pool, and the tunnel waits for its word.
        self.resolving = Some(tokio::task::spawn_blocking(move || {
            spec.to_socket_addrs()
                .map(|addresses| addresses.collect())
                .map_err(|e| e.to_string())
        }));
    }

    /// Sends what is queued. True when the tunnel was told of an ICMP error meanwhile (and so
    /// may have queued more).
    fn flush(&mut self) -> bool {
        let stats = self.obs.stats.clone();
        let mut sockets = std::mem::take(&mut self.sockets);
        let mut unreachable = Vec::new();
        for socket in &mut sockets {
            if self.flush_socket_of(socket) {
                unreachable.push(socket.id);
            }
            report_flushed(&mut self.tunnel, &mut socket.outgoing);
        }
        self.sockets = sockets;
        // A pending ICMP error the send path took from the socket: the receive path will not
        // see it, so the tunnel hears of it here (and checks, rather than believes it).
        let told = !unreachable.is_empty();
        for id in unreachable {
            self.tunnel
                .handle_unreachable(Instant::now(), id, "connection refused (on send)");
        }
        if !self.to_local.is_empty() {
            let (flushed, error) = self.to_local.flush(&self.local);
            stats.add(Counter::RepliesDelivered, flushed.tagged as u64);
            if let Some(e) = error {
                stats.add(Counter::DropDeliveryFailed, flushed.failed as u64);
                debug!(tunnel = %self.tunnel.name(), error = %e, failed = flushed.failed,
                    "replies not delivered");
            }
            report_flushed(&mut self.tunnel, &mut self.to_local);
        }
        told
    }

    /// True when a send reported an ICMP error on the socket.
    fn flush_socket_of(&self, socket: &mut AssociationSocket) -> bool {
        if socket.outgoing.is_empty() {
            return false;
        }
        let stats = self.obs.stats.clone();
        let (flushed, error) = socket.outgoing.flush(&socket.socket);
        stats.add(Counter::RequestsForwarded, flushed.tagged as u64);
        if let Some(e) = error {
            stats.add(Counter::DropUpstreamError, flushed.failed as u64);
            debug!(error = %e, failed = flushed.failed, "upstream send failed");
        }
        flushed.unreachable
    }

    /// One line per event an operator needs: set-up and tear-down at INFO, refusals and
    /// failures at WARN with their cause.
    fn log(&mut self, event: TunnelEvent) {
        let tunnel = self.tunnel.name().to_string();
        let server = self.tunnel.config().server_spec.clone();
        match event {
            TunnelEvent::Resolved { addresses } => {
                let list: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
                debug!(%tunnel, %server, addresses = %list.join(","), "server name resolved");
            }
            TunnelEvent::ResolveFailed { error, retry_in } => {
                self.report_first_outcome(false);
                warn!(%tunnel, %server, %error, retry_in_s = retry_in.as_secs_f64(),
                    "server name does not resolve");
            }
            TunnelEvent::HandshakeStarted { peer, rekey } => {
                debug!(%tunnel, %peer, rekey, "handshake started");
            }
            TunnelEvent::Established {
                peer,
                identity,
                rekey,
            } => {
                self.report_first_outcome(true);
                info!(%tunnel, server = %peer, subject = %identity, cipher = %identity.cipher_suite, rekey,
                    "association established");
            }
            TunnelEvent::Refused {
                peer,
                failure,
                rekey,
                retry_in,
                repeated,
            } => {
                self.obs.failures.incr(failure.label());
                let retry_in_s = retry_in.map_or(0.0, |d| d.as_secs_f64());
                if repeated {
                    debug!(%tunnel, server = %peer, reason = %failure.label(), rekey,
                        "association refused again");
                } else {
                    warn!(%tunnel, server = %peer, reason = %failure.label(), detail = %failure,
                        rekey, retry_in_s, "association refused");
                }
                if retry_in.is_some() && !rekey {
                    self.report_first_outcome(false);
                }
            }
            TunnelEvent::Closed { peer, reason } => match &reason {
                CloseReason::Dead(_) => warn!(%tunnel, server = %peer,
                    reason = %reason.label(), detail = %reason, "association closed"),
                _ => info!(%tunnel, server = %peer, reason = %reason.label(), detail = %reason,
                    "association closed"),
            },
            TunnelEvent::StateChanged { from, to } => match to {
                TunnelState::UpstreamDown => warn!(%tunnel, %server, state = %to.label(),
                    "the server relay answers, its time server does not"),
                TunnelState::Up if from == TunnelState::UpstreamDown => info!(%tunnel, %server,
                    state = %to.label(), "the time server behind the server relay answers again"),
                _ => debug!(%tunnel, %server, from = %from.label(), to = %to.label(),
                    "tunnel state"),
            },
        }
    }

    fn report_first_outcome(&mut self, up: bool) {
        if let Some(sender) = self.first_outcome.take() {
            let _ = sender.send(up);
        }
    }
}

/// After a flush: tells the tunnel when its datagrams really left (their kernel transmit
/// timestamps), and hands it their buffers to decrypt the next datagrams into.
fn report_flushed(tunnel: &mut Tunnel, queue: &mut SendQueue) {
    for (departure, transmitted) in queue.departed() {
        tunnel.departed(&departure, transmitted);
    }
    for buffer in queue.spent() {
        tunnel.recycle(buffer);
    }
}

/// A socket for one association: a fresh ephemeral port, connected to the server relay, so
/// that only its datagrams (and ICMP errors about it) arrive there.
fn open_socket(peer: SocketAddr) -> std::io::Result<DatagramSocket> {
    let bind: IpAddr = if peer.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let mut socket = DatagramSocket::bind(SocketAddr::new(bind, 0))?;
    socket.connect(peer)?;
    if let Err(e) = socket.enable_tx_timestamps() {
        debug!(%peer, error = %e, "no kernel transmit timestamps: requests' departures are clock reads");
    }
    Ok(socket)
}

/// Receives on whichever association socket has datagrams, into its slot's batch; never
/// resolves while there is none. Cancel-safe, like each receive.
async fn recv_any(
    sockets: &[AssociationSocket],
    batches: &mut [RecvBatch; 3],
    poll_until: Option<Instant>,
) -> (usize, std::io::Result<usize>) {
    async fn recv(
        socket: Option<&AssociationSocket>,
        batch: &mut RecvBatch,
        poll_until: Option<Instant>,
    ) -> std::io::Result<usize> {
        match socket {
            Some(socket) => socket.socket.recv_batch(batch, poll_until).await,
            None => std::future::pending().await,
        }
    }
    let [a, b, c] = batches;
    tokio::select! {
        biased;
        r = recv(sockets.first(), a, poll_until) => (0, r),
        r = recv(sockets.get(1), b, poll_until) => (1, r),
        r = recv(sockets.get(2), c, poll_until) => (2, r),
    }
}

async fn wait_resolution(
    resolving: &mut Option<JoinHandle<Result<Vec<SocketAddr>, String>>>,
) -> Result<Vec<SocketAddr>, String> {
    match resolving {
        Some(handle) => match handle.await {
            Ok(result) => result,
            Err(e) => Err(format!("name lookup failed: {e}")),
        },
        None => std::future::pending().await,
    }
}

/// A different jitter seed for every tunnel of every process: the standard library's randomly
/// keyed hasher gives one without a dependency.
fn jitter_seed(index: usize) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_usize(index);
    hasher.finish()
}

/// The certificates each tunnel relies on, for the expiry gauge and warning.
fn record_client_certificates(obs: &Observatory, tunnels: &[TunnelSettings]) {
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
