//! The server-side relay: DTLS associations in, plain NTP to the time server out.
//!
//! One task owns the DTLS socket, the engine with every association, one upstream socket shared
//! by all peers, and the table that routes the time server's replies back to the peer that asked
//! (matched by origin timestamp, as on the client side). Only NTP client requests (mode 3) are
//! forwarded: the relay must never open chronyd's control surface (modes 6 and 7) to the network.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use anyhow::Context;
use ntp_dtls_proto::endpoint::{Audit, Destination, Endpoint, EndpointEvent, TimeSource, Transmit};
use ntp_dtls_proto::engine::ServerSettings;
use ntp_dtls_proto::ntp::BuiltinSource;
use ntp_dtls_proto::stats::Counter;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::config::{ServerConfig, Upstream};
use crate::ops::control::{Control, ControlEvent};
use crate::ops::daemon::{Reload, Shutdown, log_reload, notify_ready, start_services};
use crate::ops::observe::Observatory;
use crate::relay::timer::{BusyPoll, LoopTimer};
use crate::relay::timestamps::TimestampMetrics;
use crate::relay::udp::{DatagramSocket, Received, RecvBatch, SendQueue};

/// Runs the server relay until shutdown: `config.workers` sockets bound to the listen address
/// with SO_REUSEPORT, one thread each. The kernel keeps a client's address and port on one
/// socket, so each worker owns its associations outright: its own engine, admission table,
/// pending table and upstream socket, and no lock on the datagram path.
pub async fn run(config: ServerConfig, shutdown: Shutdown, reload: Reload) -> anyhow::Result<()> {
    let sockets = bind(&config)?;
    let obs = Arc::new(Observatory::new("server", config.workers.max(1)));
    serve(config, sockets, obs, shutdown, reload).await
}

/// The worker group's sockets on the listen address: a start-up error when it is taken.
pub fn bind(config: &ServerConfig) -> anyhow::Result<Vec<std::net::UdpSocket>> {
    bind_reuseport(config.listen, config.workers.max(1))
        .with_context(|| format!("cannot listen on {}", config.listen))
}

/// Runs the server relay on sockets bound by [`bind`] until `shutdown`. In-process tests call
/// this with a [`Shutdown::manual`] and read `obs` afterwards.
pub async fn serve(
    config: ServerConfig,
    sockets: Vec<std::net::UdpSocket>,
    obs: Arc<Observatory>,
    shutdown: Shutdown,
    reload: Reload,
) -> anyhow::Result<()> {
    tokio::task::LocalSet::new()
        .run_until(run_workers(config, sockets, obs, shutdown, reload))
        .await
}

async fn run_workers(
    config: ServerConfig,
    sockets: Vec<std::net::UdpSocket>,
    obs: Arc<Observatory>,
    shutdown: Shutdown,
    mut reload: Reload,
) -> anyhow::Result<()> {
    let workers = sockets.len().max(1);
    let listen = sockets
        .first()
        .and_then(|s| s.local_addr().ok())
        .unwrap_or(config.listen);
    // Check the DTLS settings once, before anything is announced.
    ntp_dtls_proto::engine::Engine::server(&config.settings)
        .context("DTLS server configuration")?;
    let upstream_label = match config.upstream {
        Upstream::Udp(addr) => addr.to_string(),
        Upstream::Builtin { stratum } => format!("builtin(stratum {stratum})"),
    };
    // Each worker gets its share of the association limits.
    let mut limits = config.limits.clone();
    limits.max_associations = limits.max_associations.div_ceil(workers);
    limits.max_half_open = limits.max_half_open.div_ceil(workers);

    record_server_certificates(&obs, &config.settings);
    obs.set_timestamp_correction(config.timestamp_correction);
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
        cipher = %config.settings.identity.key.kind().cipher_suite(),
        "ready"
    );
    notify_ready(&format!("listening on {listen} with {workers} workers"));

    let reloader = {
        let obs = obs.clone();
        let mut current = config.clone_for_worker();
        tokio::task::spawn_local(async move {
            loop {
                reload.next().await;
                // The file is read again: certificates, keys and CA files go into service for
                // new handshakes; a changed key only a restart applies is named.
                let outcome = current.reload().map(|(new, plan)| {
                    record_server_certificates(&obs, &new.settings);
                    obs.set_timestamp_correction(new.timestamp_correction);
                    let _ = settings_tx.send(Some(Arc::new(new.settings.clone())));
                    current = new;
                    plan
                });
                log_reload(&outcome);
                reload.finished();
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
///
/// First a probe without SO_REUSEPORT: it fails if anything holds the address, including
/// another relay's SO_REUSEPORT group, which this one would otherwise silently join (and share
/// new associations with). The probe is closed before the group binds.
fn bind_reuseport(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::UdpSocket>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut bound = addr;
    // A port of 0 cannot be held by anyone else: the kernel picks a free one below.
    if addr.port() != 0 {
        let probe = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        if addr.is_ipv6() {
            probe.set_only_v6(true)?;
        }
        probe.bind(&addr.into()).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "{e}: another process holds it (another ntp-dtls server? \
                         `ss -ulpn 'sport = :{}'` shows who)",
                        addr.port()
                    ),
                )
            } else {
                e
            }
        })?;
    }
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

/// One listening socket's share of the server relay: the protocol core's [`Endpoint`] and the
/// sockets it needs.
struct Worker {
    /// New certificate material after a reload.
    settings: watch::Receiver<Option<Arc<ServerSettings>>>,
    /// Which worker this is, for the association gauges.
    index: usize,
    socket: DatagramSocket,
    /// The socket to the time server; None for the builtin source.
    time_server: Option<DatagramSocket>,
    endpoint: Endpoint,
    obs: Arc<Observatory>,
    /// DTLS records to peers, sent together after each batch of input.
    to_peers: SendQueue,
    /// Requests to the time server, likewise.
    to_time_server: SendQueue,
    upstream_label: String,
    /// The time server's health as every worker sees it: the relay-wide state changes (and is
    /// logged) once, not once per worker.
    upstream_health: Arc<crate::ops::observe::UpstreamHealth>,
    /// Reads the sockets without sleeping for a while after each receive (`busy_poll_us`).
    busy: BusyPoll,
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
        let mut socket = DatagramSocket::from_std(socket).context("cannot register the socket")?;
        if let Err(e) = socket.enable_tx_timestamps() {
            warn!(error = %e, "no kernel transmit timestamps: replies' departures are clock reads");
        }
        let (time_server, source, upstream_label) = match config.upstream {
            Upstream::Udp(addr) => {
                let bind: IpAddr = if addr.is_ipv4() {
                    Ipv4Addr::UNSPECIFIED.into()
                } else {
                    Ipv6Addr::UNSPECIFIED.into()
                };
                let mut upstream = DatagramSocket::bind(SocketAddr::new(bind, 0))
                    .context("cannot open the upstream socket")?;
                if let Err(e) = upstream.enable_tx_timestamps() {
                    warn!(error = %e,
                        "no kernel transmit timestamps: requests' departures are clock reads");
                }
                upstream
                    .connect(addr)
                    .with_context(|| format!("cannot use upstream {addr}"))?;
                (Some(upstream), TimeSource::Forward, addr.to_string())
            }
            Upstream::Builtin { stratum } => (
                None,
                TimeSource::Builtin(BuiltinSource {
                    stratum,
                    ..BuiltinSource::default()
                }),
                "builtin".to_string(),
            ),
        };
        let rtt = obs.rtt_gauge(&upstream_label);
        let upstream_health = obs.upstream_health(&upstream_label, config.workers.max(1));
        let mut endpoint = Endpoint::new(&config.settings, limits, source, obs.stats.clone(), rtt)
            .context("DTLS server configuration")?;
        endpoint.set_timestamp_observer(TimestampMetrics::new(obs.clone()));
        endpoint.set_timestamp_correction(obs.timestamp_correction());
        Ok(Worker {
            busy: BusyPoll::new(config.daemon.busy_poll),
            settings,
            index,
            socket,
            time_server,
            endpoint,
            obs,
            to_peers: SendQueue::default(),
            to_time_server: SendQueue::default(),
            upstream_label,
            upstream_health,
        })
    }

    async fn run(&mut self, shutdown: Shutdown) {
        let mut from_peers = RecvBatch::default();
        let mut from_source = RecvBatch::default();
        let mut timer = LoopTimer::default();
        let control = Control::spawn(shutdown, self.settings.clone());
        loop {
            timer.arm(self.endpoint.poll_timeout());
            let poll_until = self.busy.until();
            tokio::select! {
                biased;
                event = control.next() => match event {
                    ControlEvent::Stop => break,
                    ControlEvent::Settings(Some(settings)) => {
                        if let Err(e) = self.endpoint.replace_settings(&settings) {
                            warn!(error = %e, "reloaded material refused by the DTLS engine");
                        }
                    }
                    ControlEvent::Settings(None) => {}
                },
                received = self.socket.recv_batch(&mut from_peers, poll_until) => match received {
                    Ok(_) => {
                        let now = Instant::now();
                        for Received { from, data, kernel_rx, local } in from_peers.iter() {
                            if let Some(peer) = from {
                                // No kernel receive timestamp: a clock read right after recvmmsg.
                                let rx = kernel_rx.unwrap_or_else(SystemTime::now);
                                // Only a socket bound to 0.0.0.0 or :: reports it: there replies
                                // must leave from the address each peer sent to, or a
                                // multi-homed host answers from the route's choice and the peer
                                // drops it.
                                self.endpoint.handle_datagram_to(now, rx, peer, local, data);
                            }
                        }
                    }
                    Err(e) => debug!(error = %e, "receive error"),
                },
                received = recv_time_server(self.time_server.as_ref(), &mut from_source, poll_until) => {
                    let now = Instant::now();
                    match received {
                        Ok(_) => {
                            // Replies (the time server's only): more may follow.
                            self.busy.received(now);
                            for Received { data, kernel_rx, .. } in from_source.iter() {
                                let rx = kernel_rx.unwrap_or_else(SystemTime::now);
                                self.endpoint.handle_time_server_reply(now, rx, data);
                            }
                        }
                        // chronyd not running: ICMP port unreachable comes back as an error.
                        Err(e) => self.endpoint.handle_time_server_error(now, &e.to_string()),
                    }
                },
                _ = timer.fired() => self.endpoint.handle_timeout(Instant::now()),
            }
            self.execute();
        }
        self.endpoint.close_all(Instant::now());
        self.execute();
    }

    /// Sends what the endpoint queued (requests to the time server first: their replies take
    /// longest), and reports what happened.
    fn execute(&mut self) {
        // A reload may have turned the residence correction on or off.
        self.endpoint
            .set_timestamp_correction(self.obs.timestamp_correction());
        // One monotonic read for the pass (timers and round trips need no finer), and a wall
        // clock read per datagram: a reply's transmit timestamp is corrected with it.
        let now = Instant::now();
        // Requests first, sent at once, so that a reply finished below is not held behind
        // their system call: its transmit timestamp is corrected with the clock read for it.
        while let Some(request) = self.endpoint.poll_request(now, SystemTime::now()) {
            // A request forwarded: its reply comes within the busy-poll window. Only this and
            // the time server's replies open it, never a peer's datagram as such: garbage and
            // handshakes from anyone must not buy a spinning loop for the price of a trickle.
            self.busy.received(now);
            self.to_time_server.push_departing(
                None,
                None,
                request.datagram,
                request.ntp,
                request.departure,
            );
        }
        self.flush_time_server();
        // Read right before each datagram is finished (a reply stamped and encrypted).
        while let Some(Transmit {
            destination,
            datagram,
            ntp,
            local,
            departure,
        }) = self.endpoint.poll_transmit(now, SystemTime::now())
        {
            match destination {
                Destination::TimeServer => self
                    .to_time_server
                    .push_departing(None, None, datagram, ntp, departure),
                Destination::Peer(peer) => {
                    self.to_peers
                        .push_departing(Some(peer), local, datagram, ntp, departure)
                }
            }
        }
        let stats = &self.obs.stats;
        if !self.to_peers.is_empty() {
            let (flushed, error) = self.to_peers.flush(&self.socket);
            stats.add(Counter::RepliesDelivered, flushed.tagged as u64);
            if let Some(e) = error {
                stats.add(Counter::DropDeliveryFailed, flushed.failed as u64);
                debug!(error = %e, failed = flushed.failed, "send failed");
            }
            report_flushed(&mut self.endpoint, &mut self.to_peers);
        }
        self.flush_time_server();
        while let Some(event) = self.endpoint.poll_event() {
            self.log(event);
        }
        let (established, half_open) = self.endpoint.association_counts();
        self.obs
            .set_associations(self.index, established, half_open);
        match self
            .upstream_health
            .report(self.index, self.endpoint.upstream_up())
        {
            Some(false) => warn!(upstream = %self.upstream_label, "time server down"),
            Some(true) => info!(upstream = %self.upstream_label, "time server answers again"),
            None => {}
        }
    }

    fn flush_time_server(&mut self) {
        let stats = &self.obs.stats;
        if let Some(socket) = &self.time_server {
            if !self.to_time_server.is_empty() {
                let (flushed, error) = self.to_time_server.flush(socket);
                stats.add(Counter::RequestsForwarded, flushed.tagged as u64);
                if let Some(e) = error {
                    // A datagram we cannot send now is better dropped than delayed.
                    stats.add(Counter::DropUpstreamError, flushed.failed as u64);
                    debug!(error = %e, failed = flushed.failed, "requests not forwarded");
                }
                report_flushed(&mut self.endpoint, &mut self.to_time_server);
            }
        }
    }

    /// One line per association set up, refused or torn down: what an evaluator reads.
    fn log(&self, event: EndpointEvent) {
        match event {
            EndpointEvent::Established { peer, identity } => {
                info!(%peer, subject = %identity, cipher = %identity.cipher_suite, "association established")
            }
            EndpointEvent::Refused {
                peer,
                failure,
                audit,
            } => {
                self.obs.failures.incr(failure.label());
                match audit {
                    Audit::Log { suppressed: 0 } => {
                        warn!(%peer, reason = %failure.label(), detail = %failure,
                            "association refused")
                    }
                    Audit::Log { suppressed } => {
                        warn!(%peer, reason = %failure.label(), detail = %failure, suppressed,
                            "association refused")
                    }
                    Audit::Quiet => {
                        debug!(%peer, reason = %failure.label(), "association refused")
                    }
                }
            }
            EndpointEvent::Closed { peer, reason } => info!(%peer, %reason, "association closed"),
            // The relay-wide line is written in `execute`, from every worker's view; this one
            // says how this worker knows.
            EndpointEvent::UpstreamDown { cause } => debug!(worker = self.index,
                upstream = %self.upstream_label, %cause, "time server down (this worker)"),
            EndpointEvent::UpstreamBack { down_for } => debug!(worker = self.index,
                upstream = %self.upstream_label, down_for_s = down_for.as_secs_f64(),
                "time server answers again (this worker)"),
        }
    }
}

/// The time server's next replies; never resolves for the builtin source.
async fn recv_time_server(
    socket: Option<&DatagramSocket>,
    batch: &mut RecvBatch,
    poll_until: Option<Instant>,
) -> std::io::Result<usize> {
    match socket {
        Some(socket) => socket.recv_batch(batch, poll_until).await,
        None => std::future::pending().await,
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

/// After a flush: tells the endpoint when its datagrams really left (their kernel transmit
/// timestamps), and hands it their buffers to decrypt the next datagrams into.
fn report_flushed(endpoint: &mut Endpoint, queue: &mut SendQueue) {
    for (departure, transmitted) in queue.departed() {
        endpoint.departed(&departure, transmitted);
    }
    for buffer in queue.spent() {
        endpoint.recycle(buffer);
    }
}
