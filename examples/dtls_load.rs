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

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use ntp_dtls::config;
use ntp_dtls::proto::backoff::Backoff;
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
    /// End the load phase after this many requests have been sent (and their replies awaited),
    /// whatever --duration says: a fixed amount of work, for instruction counts
    /// (scripts/callgrind.sh).
    #[arg(long)]
    requests: Option<u64>,
    /// A shell command run (and waited for) just before the load phase, e.g. to zero a
    /// profiler's counters.
    #[arg(long)]
    before_load: Option<String>,
    /// A shell command run (and waited for) right after the load phase's last reply.
    #[arg(long)]
    after_load: Option<String>,
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
    /// Reconnect storm: after the other phases, run this shell command, which must kill the
    /// server relay and start it again on the same address (returning once it is ready); then
    /// every association reconnects as the client relay's tunnel does after a death: at once,
    /// then, after each failed attempt, the tunnel's backoff (1 s doubling to 60 s, jittered).
    #[arg(long)]
    storm_restart: Option<String>,
    /// Seconds the storm phase may last.
    #[arg(long, default_value_t = 60.0)]
    storm_seconds: f64,
    /// A file with the restarted server's PID (written by --storm-restart), for its RSS and CPU.
    #[arg(long)]
    storm_pid_file: Option<PathBuf>,
    /// The restarted server's metrics endpoint (IP:PORT), for its half-open gauge.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// A legitimate client relay's NTP address, polled every --legit-interval seconds for the
    /// whole run: its first reply after the restart is reported.
    #[arg(long)]
    legit: Option<SocketAddr>,
    #[arg(long, default_value_t = 0.2)]
    legit_interval: f64,
}

/// The client relay tunnel's reconnect backoff (proto/src/tunnel.rs: BACKOFF_INITIAL, _MAX).
const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// The epoll token of the legitimate client's socket.
const LEGIT: u64 = u64::MAX;

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
    /// Storm: the next attempt is due then.
    Retry {
        at: Instant,
    },
    Handshaking {
        deadline: Instant,
    },
    Established,
    Failed,
}

struct Assoc {
    socket: UdpSocket,
    engine: Engine,
    state: State,
    /// Transmit timestamp of the outstanding request.
    outstanding: Option<NtpTimestamp>,
    /// Storm: the tunnel's backoff, its jitter source, and the deadline queued for it.
    backoff: Backoff,
    jitter: u64,
    timer: Option<Instant>,
    back: bool,
}

impl Assoc {
    /// Uniform in [0, 1), xorshift as the tunnel's jitter.
    fn unit(&mut self) -> f64 {
        self.jitter ^= self.jitter << 13;
        self.jitter ^= self.jitter >> 7;
        self.jitter ^= self.jitter << 17;
        (self.jitter >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A legitimate client relay's NTP listener, polled at a steady interval.
struct Legit {
    socket: UdpSocket,
    interval: Duration,
    next_send: Instant,
    outstanding: Option<NtpTimestamp>,
    replies_before: u64,
    replies_after: u64,
    /// When the storm began (the restart command returned) and the kill was ordered.
    t0: Option<Instant>,
    first_after: Option<Instant>,
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
    // Storm phase.
    storming: bool,
    storm_t0: Option<Instant>,
    back_ns: Vec<u64>,
    attempts: u64,
    storm_failures: BTreeMap<String, usize>,
    touched: Vec<usize>,
    legit: Option<Legit>,
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
        if self.storming {
            // As the tunnel does after a failed attempt: forget it, wait out the backoff.
            let now = Instant::now();
            let assoc = &mut self.assocs[index];
            assoc.engine.forget(now, self.args.server);
            let unit = assoc.unit();
            let delay = assoc.backoff.next_delay(unit);
            assoc.state = State::Retry { at: now + delay };
            *self.storm_failures.entry(reason).or_default() += 1;
            self.touched.push(index);
            return;
        }
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
            if self.storming {
                self.touched.push(index);
            }
            for event in events.drain(..) {
                match event {
                    Event::Established { .. } => {
                        if self.storming {
                            let assoc = &mut self.assocs[index];
                            assoc.state = State::Established;
                            assoc.backoff.reset();
                            if !assoc.back {
                                assoc.back = true;
                                let t0 = self.storm_t0.unwrap_or(now);
                                self.back_ns.push(now.duration_since(t0).as_nanos() as u64);
                            }
                            continue;
                        }
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
        let until = match &self.legit {
            Some(legit) => until.min(legit.next_send),
            None => until,
        };
        let wait = until.saturating_duration_since(Instant::now());
        let wait_ms = wait.as_micros().div_ceil(1000).min(50) as u16;
        let n = match self.epoll.wait(events, EpollTimeout::from(wait_ms)) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        for event in &events[..n] {
            if event.data() == LEGIT {
                self.legit_readable();
            } else {
                self.on_readable(event.data() as usize);
            }
        }
        self.legit_tick();
        Ok(())
    }

    /// Sends the legitimate client's next request when it is due (every interval, answered or
    /// not, as an NTP client polls).
    fn legit_tick(&mut self) {
        let Some(legit) = &mut self.legit else {
            return;
        };
        let now = Instant::now();
        if now < legit.next_send {
            return;
        }
        let t1 = ntp_now();
        if legit.socket.send(&ntp::build_request(t1)).is_ok() {
            legit.outstanding = Some(t1);
        }
        legit.next_send = now + legit.interval;
    }

    fn legit_readable(&mut self) {
        let Some(legit) = &mut self.legit else {
            return;
        };
        let mut buf = [0u8; 512];
        loop {
            let len = match legit.socket.recv(&mut buf) {
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => continue, // ICMP errors while the client relay's tunnel is down
            };
            let now = Instant::now();
            let Ok(reply) = ntp::check_reply(&buf[..len]) else {
                continue;
            };
            if Some(reply.origin) != legit.outstanding || !(1..=15).contains(&reply.stratum) {
                continue;
            }
            legit.outstanding = None;
            match legit.t0 {
                Some(t0) if now >= t0 => {
                    legit.replies_after += 1;
                    legit.first_after.get_or_insert(now);
                }
                _ => legit.replies_before += 1,
            }
        }
    }

    /// The storm's next deadline for one association: its retry, or its handshake's
    /// retransmission or deadline; queued unless already queued for that time.
    fn arm(&mut self, heap: &mut BinaryHeap<Reverse<(Instant, usize)>>, index: usize) {
        let assoc = &mut self.assocs[index];
        let due = match assoc.state {
            State::Retry { at } => Some(at),
            State::Handshaking { deadline } => Some(
                assoc
                    .engine
                    .poll_timeout(self.args.server)
                    .map_or(deadline, |t| t.min(deadline)),
            ),
            _ => None,
        };
        if due.is_some() && due != assoc.timer {
            assoc.timer = due;
            heap.push(Reverse((due.unwrap_or(Instant::now()), index)));
        }
    }

    /// One association's deadline came: attempt a handshake, retransmit, or give it up.
    fn fire(&mut self, index: usize, now: Instant) {
        match self.assocs[index].state {
            State::Retry { .. } => {
                let deadline = now + Duration::from_secs_f64(self.args.handshake_timeout);
                self.attempts += 1;
                match self.assocs[index].engine.connect(now, self.args.server) {
                    Ok(()) => {
                        self.assocs[index].state = State::Handshaking { deadline };
                        self.flush(index);
                    }
                    Err(e) => self.fail(index, e.to_string()),
                }
            }
            State::Handshaking { deadline } => {
                if now >= deadline {
                    self.fail(index, "handshake_deadline".into());
                    return;
                }
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
            }
            _ => {}
        }
    }

    /// The reconnect storm: `restart` has just killed and restarted the server; every
    /// association that was established is dead and reconnects as a tunnel would.
    fn storm(
        &mut self,
        events: &mut [EpollEvent],
        hard_stop: Instant,
        sampler: &mut Sampler,
    ) -> io::Result<Option<Instant>> {
        let now = Instant::now();
        let end = (now + Duration::from_secs_f64(self.args.storm_seconds)).min(hard_stop);
        self.storm_t0 = Some(now);
        self.storming = true;
        let mut heap = BinaryHeap::new();
        let mut devices = 0;
        for index in 0..self.assocs.len() {
            let assoc = &mut self.assocs[index];
            if assoc.state != State::Established {
                continue;
            }
            devices += 1;
            // The tunnel's first reconnect after a death is immediate; later ones back off.
            assoc.engine.forget(now, self.args.server);
            assoc.backoff.reset();
            let unit = assoc.unit();
            let _ = assoc.backoff.next_delay(unit);
            assoc.state = State::Retry { at: now };
            assoc.back = false;
            self.arm(&mut heap, index);
        }
        let mut all_back = None;
        let mut next_sample = now;
        while Instant::now() < end {
            let now = Instant::now();
            if now >= next_sample {
                sampler.sample();
                next_sample = now + Duration::from_millis(100);
            }
            if self.back_ns.len() >= devices {
                all_back = Some(now);
                break;
            }
            while let Some(&Reverse((due, index))) = heap.peek() {
                if due > now {
                    break;
                }
                heap.pop();
                if self.assocs[index].timer != Some(due) {
                    continue; // superseded
                }
                self.assocs[index].timer = None;
                self.fire(index, now);
                self.arm(&mut heap, index);
            }
            for index in std::mem::take(&mut self.touched) {
                self.arm(&mut heap, index);
            }
            let wake = heap
                .peek()
                .map_or(end, |Reverse((due, _))| (*due).min(end))
                .min(next_sample);
            self.wait(events, wake)?;
            for index in std::mem::take(&mut self.touched) {
                self.arm(&mut heap, index);
            }
        }
        sampler.sample();
        self.storming = false;
        Ok(all_back)
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
            if self.args.requests.is_some_and(|n| sent >= n) {
                if self.outstanding == 0 {
                    break;
                }
                let wake = deadlines.front().map_or(end, |&(due, _, _)| due.min(end));
                self.wait(events, wake)?;
                continue;
            }
            let mut tries = 0;
            while self.outstanding < self.args.window
                && tries < ready.len()
                && self.args.requests.is_none_or(|n| sent < n)
            {
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

/// Peaks of the restarted server's RSS and half-open gauge, sampled during the storm.
struct Sampler {
    pid: Option<u32>,
    metrics: Option<SocketAddr>,
    rss_peak_kib: Option<u64>,
    half_open_peak: Option<u64>,
    established_last: Option<u64>,
}

impl Sampler {
    fn sample(&mut self) {
        if let Some(rss) = self.pid.and_then(common::rss_kib) {
            self.rss_peak_kib = Some(self.rss_peak_kib.map_or(rss, |p| p.max(rss)));
        }
        if let Some(text) = self.metrics.and_then(|addr| http_get(addr, "/metrics")) {
            let gauge = |state: &str| -> Option<u64> {
                let key = format!("ntp_dtls_associations{{state=\"{state}\"}} ");
                text.lines()
                    .find_map(|l| l.strip_prefix(key.as_str()))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .map(|v| v as u64)
            };
            if let Some(h) = gauge("half_open") {
                self.half_open_peak = Some(self.half_open_peak.map_or(h, |p| p.max(h)));
            }
            self.established_last = gauge("established").or(self.established_last);
        }
    }
}

/// A bounded HTTP/1.0 GET on loopback (the server's metrics endpoint); None on any failure.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let timeout = Duration::from_millis(300);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut body = String::new();
    stream.take(4 << 20).read_to_string(&mut body).ok()?;
    Some(body)
}

/// The time by which `q` of `n` devices were back, in seconds; None if fewer came back.
fn back_by(sorted_ns: &[u64], n: usize, q: f64) -> Option<f64> {
    let need = ((q * n as f64).ceil() as usize).max(1);
    sorted_ns.get(need - 1).map(|&ns| ns as f64 / 1e9)
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

/// Phase 4: kill and restart the server (`command`), then the reconnect storm.
fn storm_phase(
    load: &mut Load,
    events: &mut [EpollEvent],
    hard_stop: Instant,
    command: &str,
    result: &mut String,
) -> Result<(), String> {
    let args = load.args;
    let devices = load
        .assocs
        .iter()
        .filter(|a| a.state == State::Established)
        .count();
    let kill = Instant::now();
    if let Some(legit) = &mut load.legit {
        // Replies from here on count as after the restart.
        legit.t0 = Some(kill);
    }
    // The restart takes a second or two (kill, start, wait for ready): the legitimate device
    // keeps polling meanwhile, as a real one would, so that its relay sees the silence.
    restart_polling_legit(load, command, hard_stop)?;
    let pid = args
        .storm_pid_file
        .as_ref()
        .and_then(|f| std::fs::read_to_string(f).ok())
        .and_then(|s| s.trim().parse::<u32>().ok());
    let mut sampler = Sampler {
        pid,
        metrics: args.metrics,
        rss_peak_kib: None,
        half_open_peak: None,
        established_last: None,
    };
    let restarted = Instant::now();
    let server_before = reading(pid);
    let own = std::process::id();
    let client_before = common::cpu_ns(own);
    let rss_start = pid.and_then(common::rss_kib);
    let all_back = load
        .storm(events, hard_stop, &mut sampler)
        .map_err(|e| e.to_string())?;
    let server_after = reading(pid);
    let client_after = common::cpu_ns(own);
    // Keep polling the legitimate client a little if it has not answered yet.
    let legit_until = (Instant::now() + Duration::from_secs(5)).min(hard_stop);
    while load.legit.as_ref().is_some_and(|l| l.first_after.is_none())
        && Instant::now() < legit_until
    {
        load.wait(events, legit_until).map_err(|e| e.to_string())?;
    }
    let mut back = load.back_ns.clone();
    back.sort_unstable();
    let storm_s = all_back
        .unwrap_or_else(Instant::now)
        .duration_since(restarted)
        .as_secs_f64();
    let server_cpu = cpu_s(server_before, server_after);
    let client_cpu = match (client_before, client_after) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 1e9),
        _ => None,
    };
    // Handshakes completed per second, over each whole second of the storm: the peak.
    let mut per_second = vec![0u64; storm_s.ceil() as usize + 1];
    for &ns in &back {
        if let Some(slot) = per_second.get_mut((ns / 1_000_000_000) as usize) {
            *slot += 1;
        }
    }
    let timeline: Vec<String> = per_second.iter().map(|n| n.to_string()).collect();
    let failures: Vec<String> = load
        .storm_failures
        .iter()
        .map(|(reason, n)| format!("{reason}:{n}"))
        .collect();
    let since = |t: Option<Instant>, from: Instant| t.map(|t| t.duration_since(from).as_secs_f64());
    let legit = load.legit.as_ref();
    let mut line = format!("phase=storm label={}", args.label);
    for (key, value) in [
        ("storm_devices", devices.to_string()),
        ("storm_back", back.len().to_string()),
        (
            "storm_restart_s",
            num(restarted.duration_since(kill).as_secs_f64(), 3),
        ),
        ("storm_t50_s", opt(back_by(&back, devices, 0.50), 3)),
        ("storm_t99_s", opt(back_by(&back, devices, 0.99), 3)),
        (
            "storm_t100_s",
            opt(
                all_back.map(|t| t.duration_since(restarted).as_secs_f64()),
                3,
            ),
        ),
        ("storm_attempts", load.attempts.to_string()),
        (
            "storm_failures",
            if failures.is_empty() {
                "-".into()
            } else {
                failures.join(",")
            },
        ),
        ("storm_hs_per_s", num(back.len() as f64 / storm_s, 1)),
        (
            "storm_hs_peak_per_s",
            per_second.iter().max().copied().unwrap_or(0).to_string(),
        ),
        ("storm_server_cpu_s", opt(server_cpu, 3)),
        (
            "storm_server_cpu_pct",
            opt(server_cpu.map(|c| 100.0 * c / storm_s), 0),
        ),
        ("storm_generator_cpu_s", opt(client_cpu, 3)),
        ("storm_half_open_peak", opt_u(sampler.half_open_peak)),
        ("storm_established_gauge", opt_u(sampler.established_last)),
        ("storm_rss_start_kib", opt_u(rss_start)),
        ("storm_rss_peak_kib", opt_u(sampler.rss_peak_kib)),
        (
            "legit_replies_before",
            legit.map_or("-".into(), |l| l.replies_before.to_string()),
        ),
        (
            "legit_replies_after",
            legit.map_or("-".into(), |l| l.replies_after.to_string()),
        ),
        (
            "legit_first_reply_s",
            opt(legit.and_then(|l| since(l.first_after, restarted)), 3),
        ),
        (
            "legit_first_reply_after_kill_s",
            opt(legit.and_then(|l| since(l.first_after, kill)), 3),
        ),
    ] {
        kv(&mut line, key, &value);
        kv(result, key, &value);
    }
    println!("{line}");
    println!(
        "storm_timeline label={} back_per_second={}",
        args.label,
        timeline.join(",")
    );
    Ok(())
}

/// Runs a --before-load / --after-load command and waits for it.
/// Runs `command` (the storm's restart) while the legitimate client keeps polling; bounded
/// by `hard_stop`.
fn restart_polling_legit(load: &mut Load, command: &str, hard_stop: Instant) -> Result<(), String> {
    let mut child = std::process::Command::new("sh")
        .args(["-c", command])
        .spawn()
        .map_err(|e| format!("{command}: {e}"))?;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("{command}: {e}"))? {
            return if status.success() {
                Ok(())
            } else {
                Err(format!("{command}: {status}"))
            };
        }
        if Instant::now() >= hard_stop {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{command}: still running at the time limit"));
        }
        load.legit_readable();
        load.legit_tick();
        // Polling a child process (no readiness signal to await); 5 ms keeps the legitimate
        // client's 0.2 s schedule.
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn hook(command: &str) -> Result<(), String> {
    let status = std::process::Command::new("sh")
        .args(["-c", command])
        .status()
        .map_err(|e| format!("{command}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{command}: {status}"))
    }
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
            backoff: Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX),
            // A different jitter seed per device, as each tunnel has its own.
            jitter: (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            timer: None,
            back: false,
        });
    }
    let legit = match args.legit {
        Some(addr) => {
            let socket = UdpSocket::bind(bind).map_err(|e| format!("legit socket: {e}"))?;
            socket
                .connect(addr)
                .and_then(|()| socket.set_nonblocking(true))
                .map_err(|e| format!("legit socket: {e}"))?;
            epoll
                .add(&socket, EpollEvent::new(EpollFlags::EPOLLIN, LEGIT))
                .map_err(|e| format!("epoll: {e}"))?;
            Some(Legit {
                socket,
                interval: Duration::from_secs_f64(args.legit_interval),
                next_send: Instant::now(),
                outstanding: None,
                replies_before: 0,
                replies_after: 0,
                t0: None,
                first_after: None,
            })
        }
        None => None,
    };
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
        storming: false,
        storm_t0: None,
        back_ns: Vec::new(),
        attempts: 0,
        storm_failures: BTreeMap::new(),
        touched: Vec::new(),
        legit,
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
        if let Some(command) = &args.before_load {
            hook(command)?;
        }
        let before = reading(args.server_pid);
        let (sent, lost, elapsed) = load
            .load(&mut events, hard_stop)
            .map_err(|e| e.to_string())?;
        let after = reading(args.server_pid);
        if let Some(command) = &args.after_load {
            hook(command)?;
        }
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

    if let Some(command) = &args.storm_restart {
        storm_phase(&mut load, &mut events, hard_stop, command, &mut result)?;
    }
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
