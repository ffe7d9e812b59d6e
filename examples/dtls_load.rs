//! dtls_load: a DTLS load generator against the server relay alone (`scripts/bench.sh`). Not part
//! of the product.
//!
//! Opens K associations, each from its own UDP socket and source port (as K devices would), with
//! at most --inflight handshakes at a time, and measures handshakes/s. Then sends NTP requests
//! spread round-robin over every association, --window outstanding at a time, for --duration
//! seconds, and measures replies/s. Then leaves the associations idle for --idle seconds. With
//! --server-pid it reads the server's RSS (VmRSS) and CPU time around each phase, so the script
//! can report RSS per idle association and handshakes per second of server CPU. Everything is
//! bounded: K, the phase durations, and --max-seconds for the whole run.
//!
//!   dtls_load 127.0.0.1:11123 --ca ca.pem --server-name localhost --associations 1000 \
//!       --duration 10 --server-pid 1234
//!
//! Prints one key=value line per phase, then one `result` line with every key.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use ntp_dtls::config;
use ntp_dtls::proto::engine::{ClientSettings, DtlsEngine, Engine, Event};
use ntp_dtls::proto::ntp::{self, NtpTimestamp};

use common::{kv, ntp_now, num, p50_p99};

#[derive(Parser)]
#[command(about = "DTLS load generator for the ntp-dtls server relay")]
struct Args {
    /// The server relay (IP:PORT).
    server: SocketAddr,
    #[arg(long)]
    ca: PathBuf,
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Associations to open, one UDP socket each.
    #[arg(long, default_value_t = 1000)]
    associations: usize,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 32)]
    inflight: usize,
    /// Seconds a handshake may take before it counts as failed.
    #[arg(long, default_value_t = 10.0)]
    handshake_timeout: f64,
    /// Requests outstanding at once during the load phase.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Seconds of the load phase (0: skip it).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds a request waits for its reply.
    #[arg(long, default_value_t = 1.0)]
    timeout: f64,
    /// Seconds to leave the associations idle before the last RSS reading.
    #[arg(long, default_value_t = 2.0)]
    idle: f64,
    /// Send close_notify on every association before exiting.
    #[arg(long)]
    close: bool,
    /// The server relay's process, to read its RSS and CPU time.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Hard limit on the whole run, in seconds.
    #[arg(long, default_value_t = 300.0)]
    max_seconds: f64,
    #[arg(long, default_value = "-")]
    label: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dtls_load: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Handshaking { deadline: Instant },
    Established,
    Failed,
}

struct Assoc {
    socket: UdpSocket,
    engine: Engine,
    state: State,
    /// Transmit timestamp of the outstanding request.
    outstanding: Option<NtpTimestamp>,
}

/// The server's RSS and CPU time at one moment.
#[derive(Clone, Copy)]
struct ServerReading {
    rss_kib: Option<u64>,
    cpu_ns: Option<u64>,
}

struct Load<'a> {
    args: &'a Args,
    epoll: Epoll,
    assocs: Vec<Assoc>,
    events: Vec<Event>,
    buf: Vec<u8>,
    // Handshake phase.
    inflight: Vec<usize>,
    established: usize,
    failed: usize,
    failures: BTreeMap<String, usize>,
    closed: usize,
    // Load phase.
    in_load: bool,
    valid: u64,
    invalid: u64,
    stray: u64,
    outstanding: usize,
    delays_ns: Vec<f64>,
    offsets_ns: Vec<f64>,
    send_errors: u64,
}

impl Load<'_> {
    fn flush(&mut self, index: usize) {
        let assoc = &mut self.assocs[index];
        while let Some(transmit) = assoc.engine.poll_transmit() {
            if assoc.socket.send(&transmit.datagram).is_err() {
                self.send_errors += 1;
            }
        }
    }

    fn start_handshake(&mut self, index: usize, now: Instant) {
        let deadline = now + Duration::from_secs_f64(self.args.handshake_timeout);
        let assoc = &mut self.assocs[index];
        match assoc.engine.connect(now, self.args.server) {
            Ok(()) => {
                assoc.state = State::Handshaking { deadline };
                self.inflight.push(index);
                self.flush(index);
            }
            Err(e) => {
                assoc.state = State::Failed;
                self.failed += 1;
                *self.failures.entry(e.to_string()).or_default() += 1;
            }
        }
    }

    fn handshake_over(&mut self, index: usize) {
        if let Some(pos) = self.inflight.iter().position(|&i| i == index) {
            self.inflight.swap_remove(pos);
        }
    }

    fn fail(&mut self, index: usize, reason: String) {
        if matches!(self.assocs[index].state, State::Handshaking { .. }) {
            self.handshake_over(index);
        }
        self.assocs[index].state = State::Failed;
        self.failed += 1;
        *self.failures.entry(reason).or_default() += 1;
    }

    fn on_readable(&mut self, index: usize) {
        loop {
            let len = match self.assocs[index].socket.recv(&mut self.buf) {
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => continue, // ICMP errors: the handshake timer deals with them
            };
            let now = Instant::now();
            let mut events = std::mem::take(&mut self.events);
            self.assocs[index]
                .engine
                .receive(now, self.args.server, &self.buf[..len], &mut events);
            self.flush(index);
            for event in events.drain(..) {
                match event {
                    Event::Established { .. } => {
                        self.handshake_over(index);
                        self.assocs[index].state = State::Established;
                        self.established += 1;
                    }
                    Event::Failed { failure, .. } => self.fail(index, failure.label().into()),
                    Event::Closed { .. } => {
                        self.closed += 1;
                        self.assocs[index].state = State::Failed;
                        if self.assocs[index].outstanding.take().is_some() {
                            self.outstanding -= 1;
                        }
                    }
                    Event::Data { payload, .. } => self.on_reply(index, &payload),
                }
            }
            self.events = events;
        }
    }

    fn on_reply(&mut self, index: usize, payload: &[u8]) {
        let t4 = ntp_now();
        let Some(t1) = self.assocs[index].outstanding else {
            self.stray += 1;
            return;
        };
        match ntp::check_reply(payload) {
            Ok(reply) if reply.origin == t1 => {
                self.assocs[index].outstanding = None;
                self.outstanding -= 1;
                if (1..=15).contains(&reply.stratum) {
                    if self.in_load {
                        self.valid += 1;
                        let sample = ntp::sample(t1, reply.receive, reply.transmit, t4);
                        self.delays_ns.push(sample.delay * 1e9);
                        self.offsets_ns.push(sample.offset * 1e9);
                    }
                } else {
                    self.invalid += 1;
                }
            }
            _ => self.stray += 1,
        }
    }

    fn wait(&mut self, events: &mut [EpollEvent], until: Instant) -> io::Result<()> {
        let wait = until.saturating_duration_since(Instant::now());
        let wait_ms = wait.as_micros().div_ceil(1000).min(50) as u16;
        let n = match self.epoll.wait(events, EpollTimeout::from(wait_ms)) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        for event in &events[..n] {
            self.on_readable(event.data() as usize);
        }
        Ok(())
    }

    /// Opens every association, `inflight` at a time. Returns the elapsed time.
    fn handshakes(&mut self, events: &mut [EpollEvent], hard_stop: Instant) -> io::Result<f64> {
        let start = Instant::now();
        let mut next = 0;
        let total = self.assocs.len();
        while self.established + self.failed < total {
            let now = Instant::now();
            if now >= hard_stop {
                break;
            }
            while self.inflight.len() < self.args.inflight && next < total {
                self.start_handshake(next, now);
                next += 1;
            }
            // Retransmissions and handshake deadlines of those in flight.
            let mut wake = hard_stop;
            for index in self.inflight.clone() {
                let State::Handshaking { deadline } = self.assocs[index].state else {
                    continue;
                };
                if now >= deadline {
                    self.fail(index, "handshake_deadline".into());
                    continue;
                }
                wake = wake.min(deadline);
                if let Some(due) = self.assocs[index].engine.poll_timeout(self.args.server) {
                    if due <= now {
                        let mut evs = std::mem::take(&mut self.events);
                        self.assocs[index]
                            .engine
                            .handle_timeout(now, self.args.server, &mut evs);
                        self.flush(index);
                        for event in evs.drain(..) {
                            if let Event::Failed { failure, .. } = event {
                                self.fail(index, failure.label().into());
                            }
                        }
                        self.events = evs;
                    } else {
                        wake = wake.min(due);
                    }
                }
            }
            self.wait(events, wake)?;
        }
        Ok(start.elapsed().as_secs_f64())
    }

    /// Requests round-robin over every established association, `window` outstanding at a time.
    /// Returns (sent, lost, elapsed).
    fn load(
        &mut self,
        events: &mut [EpollEvent],
        hard_stop: Instant,
    ) -> io::Result<(u64, u64, f64)> {
        let ready: Vec<usize> = (0..self.assocs.len())
            .filter(|&i| self.assocs[i].state == State::Established)
            .collect();
        if ready.is_empty() {
            return Ok((0, 0, 0.0));
        }
        let timeout = Duration::from_secs_f64(self.args.timeout);
        let start = Instant::now();
        let end = (start + Duration::from_secs_f64(self.args.duration)).min(hard_stop);
        // Send order is deadline order: the oldest request is at the front.
        let mut deadlines: VecDeque<(Instant, usize, NtpTimestamp)> = VecDeque::new();
        let (mut sent, mut lost) = (0u64, 0u64);
        let mut cursor = 0usize;
        self.in_load = true;
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            while let Some(&(due, index, t1)) = deadlines.front() {
                if due > now {
                    break;
                }
                deadlines.pop_front();
                if self.assocs[index].outstanding == Some(t1) {
                    self.assocs[index].outstanding = None;
                    self.outstanding -= 1;
                    lost += 1;
                }
            }
            let mut tries = 0;
            while self.outstanding < self.args.window && tries < ready.len() {
                let index = ready[cursor % ready.len()];
                cursor += 1;
                tries += 1;
                let assoc = &mut self.assocs[index];
                if assoc.outstanding.is_some() || assoc.state != State::Established {
                    continue;
                }
                let t1 = ntp_now();
                if assoc
                    .engine
                    .send(Instant::now(), self.args.server, &ntp::build_request(t1))
                    .is_err()
                {
                    self.send_errors += 1;
                    continue;
                }
                assoc.outstanding = Some(t1);
                self.outstanding += 1;
                sent += 1;
                deadlines.push_back((Instant::now() + timeout, index, t1));
                self.flush(index);
            }
            let wake = deadlines.front().map_or(end, |&(due, _, _)| due.min(end));
            self.wait(events, wake)?;
        }
        self.in_load = false;
        let elapsed = start.elapsed().as_secs_f64().min(self.args.duration);
        // Let the replies still in flight arrive (not counted), so the idle phase starts idle.
        let drain_until = Instant::now() + timeout.min(Duration::from_millis(500));
        while self.outstanding > 0 && Instant::now() < drain_until {
            self.wait(events, drain_until)?;
        }
        Ok((sent, lost, elapsed))
    }

    /// Answers anything the server sends while we wait (there should be nothing).
    fn idle(&mut self, events: &mut [EpollEvent], seconds: f64) -> io::Result<()> {
        let until = Instant::now() + Duration::from_secs_f64(seconds);
        while Instant::now() < until {
            self.wait(events, until)?;
        }
        Ok(())
    }
}

fn reading(pid: Option<u32>) -> ServerReading {
    ServerReading {
        rss_kib: pid.and_then(common::rss_kib),
        cpu_ns: pid.and_then(common::cpu_ns),
    }
}

fn cpu_s(from: ServerReading, to: ServerReading) -> Option<f64> {
    Some((to.cpu_ns?.checked_sub(from.cpu_ns?)?) as f64 / 1e9)
}

fn opt(value: Option<f64>, decimals: usize) -> String {
    num(value.unwrap_or(f64::NAN), decimals)
}

fn opt_u(value: Option<u64>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

fn run(args: &Args) -> Result<(), String> {
    if args.associations == 0 || args.inflight == 0 || args.window == 0 {
        return Err("--associations, --inflight and --window must be at least 1".into());
    }
    let hard_stop = Instant::now() + Duration::from_secs_f64(args.max_seconds);
    let limit = common::raise_nofile(args.associations as u64 + 64)
        .map_err(|e| format!("RLIMIT_NOFILE: {e}"))?;
    if limit < args.associations as u64 + 16 {
        return Err(format!(
            "{} associations need as many sockets; RLIMIT_NOFILE allows {limit}",
            args.associations
        ));
    }
    let spec = args.server.to_string();
    let settings: ClientSettings =
        config::client_settings(&spec, Some(&args.server_name), &args.ca, None, None)
            .map_err(|e| e.to_string())?;

    let base = reading(args.server_pid);
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|e| e.to_string())?;
    let bind: SocketAddr = if args.server.is_ipv4() {
        "127.0.0.1:0".parse().unwrap()
    } else {
        "[::1]:0".parse().unwrap()
    };
    let mut assocs = Vec::with_capacity(args.associations);
    for index in 0..args.associations {
        let socket = UdpSocket::bind(bind).map_err(|e| format!("socket {index}: {e}"))?;
        socket
            .connect(args.server)
            .and_then(|()| socket.set_nonblocking(true))
            .map_err(|e| format!("socket {index}: {e}"))?;
        epoll
            .add(&socket, EpollEvent::new(EpollFlags::EPOLLIN, index as u64))
            .map_err(|e| format!("epoll: {e}"))?;
        let engine = Engine::client(&settings).map_err(|e| e.to_string())?;
        assocs.push(Assoc {
            socket,
            engine,
            state: State::Waiting,
            outstanding: None,
        });
    }
    let mut load = Load {
        args,
        epoll,
        assocs,
        events: Vec::new(),
        buf: vec![0u8; 4096],
        inflight: Vec::new(),
        established: 0,
        failed: 0,
        failures: BTreeMap::new(),
        closed: 0,
        in_load: false,
        valid: 0,
        invalid: 0,
        stray: 0,
        outstanding: 0,
        delays_ns: Vec::new(),
        offsets_ns: Vec::new(),
        send_errors: 0,
    };
    let mut events = vec![EpollEvent::empty(); 1024];
    let k = args.associations;
    let mut result = format!("result label={}", args.label);
    kv(&mut result, "associations", k);

    // Phase 1: handshakes.
    let before = reading(args.server_pid);
    let hs_elapsed = load
        .handshakes(&mut events, hard_stop)
        .map_err(|e| e.to_string())?;
    let after_hs = reading(args.server_pid);
    let hs_cpu = cpu_s(before, after_hs);
    let hs_rate = load.established as f64 / hs_elapsed;
    let hs_per_cpu = hs_cpu.map(|c| load.established as f64 / c);
    let failures: Vec<String> = load
        .failures
        .iter()
        .map(|(reason, n)| format!("{reason}:{n}"))
        .collect();
    let mut line = format!("phase=handshake label={}", args.label);
    for (key, value) in [
        ("established", load.established.to_string()),
        ("failed", load.failed.to_string()),
        (
            "failures",
            if failures.is_empty() {
                "-".into()
            } else {
                failures.join(",")
            },
        ),
        ("inflight", args.inflight.to_string()),
        ("hs_elapsed_s", num(hs_elapsed, 3)),
        ("hs_per_s", num(hs_rate, 1)),
        ("hs_server_cpu_s", opt(hs_cpu, 3)),
        ("hs_per_server_cpu_s", opt(hs_per_cpu, 1)),
    ] {
        kv(&mut line, key, &value);
        kv(&mut result, key, &value);
    }
    println!("{line}");

    // Settle, then the RSS with every association established and idle (never used).
    load.idle(&mut events, 1.0).map_err(|e| e.to_string())?;
    let established_idle = reading(args.server_pid);

    // Phase 2: requests over every association.
    let mut line = format!("phase=load label={}", args.label);
    let after_load = if args.duration > 0.0 {
        let before = reading(args.server_pid);
        let (sent, lost, elapsed) = load
            .load(&mut events, hard_stop)
            .map_err(|e| e.to_string())?;
        let after = reading(args.server_pid);
        let cpu = cpu_s(before, after);
        let (d50, d99) = p50_p99(&mut load.delays_ns);
        let (o50, _) = p50_p99(&mut load.offsets_ns);
        for (key, value) in [
            ("window", args.window.to_string()),
            ("sent", sent.to_string()),
            ("valid", load.valid.to_string()),
            ("lost", lost.to_string()),
            ("invalid", load.invalid.to_string()),
            ("load_elapsed_s", num(elapsed, 3)),
            ("replies_per_s", num(load.valid as f64 / elapsed, 1)),
            ("load_server_cpu_s", opt(cpu, 3)),
            (
                "replies_per_server_cpu_s",
                opt(cpu.map(|c| load.valid as f64 / c), 1),
            ),
            ("load_delay_p50_us", num(d50 / 1e3, 1)),
            ("load_delay_p99_us", num(d99 / 1e3, 1)),
            ("load_offset_p50_us", num(o50 / 1e3, 1)),
        ] {
            kv(&mut line, key, &value);
            kv(&mut result, key, &value);
        }
        println!("{line}");
        after
    } else {
        established_idle
    };

    // Phase 3: idle, then the last reading.
    load.idle(&mut events, args.idle)
        .map_err(|e| e.to_string())?;
    let idle = reading(args.server_pid);
    let per_assoc = |r: ServerReading| -> Option<f64> {
        let (base, now) = (base.rss_kib?, r.rss_kib?);
        Some((now as f64 - base as f64) * 1024.0 / load.established.max(1) as f64)
    };
    let mut line = format!("phase=idle label={}", args.label);
    for (key, value) in [
        ("rss_base_kib", opt_u(base.rss_kib)),
        ("rss_established_kib", opt_u(established_idle.rss_kib)),
        ("rss_after_load_kib", opt_u(after_load.rss_kib)),
        ("rss_idle_kib", opt_u(idle.rss_kib)),
        (
            "rss_per_assoc_established_b",
            opt(per_assoc(established_idle), 0),
        ),
        ("rss_per_assoc_idle_b", opt(per_assoc(idle), 0)),
        ("stray", load.stray.to_string()),
        ("closed_by_server", load.closed.to_string()),
        ("send_errors", load.send_errors.to_string()),
    ] {
        kv(&mut line, key, &value);
        kv(&mut result, key, &value);
    }
    println!("{line}");
    println!("{result}");

    if args.close {
        let now = Instant::now();
        for index in 0..load.assocs.len() {
            if load.assocs[index].state == State::Established {
                load.assocs[index].engine.close(now, args.server);
                load.flush(index);
            }
        }
    }
    Ok(())
}
