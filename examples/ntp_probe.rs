//! ntp_probe: a plain NTP client for benchmarks (`scripts/bench.sh`). Not part of the product.
//!
//! C clients, each asking one question at a time and waiting for its reply or a timeout before
//! the next, from one thread driven by epoll. The transmit timestamp is read immediately before
//! the send; the receive timestamp comes from the kernel (SO_TIMESTAMPNS), as chronyd takes its
//! own. Every process on this machine reads the same clock, so the true offset is 0: what the
//! probe reports as offset is the path's asymmetry.
//!
//!   ntp_probe run 127.0.0.1:11123 --count 1000                  # sequential, one source port
//!   ntp_probe run 127.0.0.1:11123 --count 1000 --fresh-port     # a new source port per query
//!   ntp_probe run 127.0.0.1:11123 --clients 16 --duration 10    # 16 concurrent clients, 10 s
//!   ntp_probe merge a.samples b.samples                         # one line over several runs
//!
//! Every run is bounded: by --count or --duration, by --give-up consecutive losses (a stalled
//! path), and by --max-seconds whatever happens. Output is one line of key=value pairs.

mod common;

use std::collections::VecDeque;
use std::io::{self, BufRead, BufWriter, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use ntp_dtls::proto::ntp::{self, NtpTimestamp};

use common::{kv, ntp_now, num, p50_p99};

#[derive(Parser)]
#[command(about = "Plain NTP client for benchmarks: delay, offset, loss and replies/s")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Query a server and print one key=value line.
    Run(RunArgs),
    /// Combine the sample files of several runs into one key=value line.
    Merge {
        #[arg(long, default_value = "-")]
        label: String,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// NTP server (IP:PORT).
    server: SocketAddr,
    /// Concurrent clients, each with its own source port (unless --fresh-port).
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Stop after this many queries (0: no count limit).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Stop sending after this many seconds (0: no time limit).
    #[arg(long, default_value_t = 0.0)]
    duration: f64,
    /// Open a new socket (a new source port) for every query.
    #[arg(long)]
    fresh_port: bool,
    /// Seconds each client pauses between a query's end and its next query (0: back to back).
    /// Real NTP clients poll every few seconds to minutes: a paced run lets every relay on the
    /// path go idle between queries, as it would in service.
    #[arg(long, default_value_t = 0.0)]
    interval: f64,
    /// Seconds a query waits for its reply before it is counted lost.
    #[arg(long, default_value_t = 0.5)]
    timeout: f64,
    /// Stop as stalled after this many consecutive lost queries (0: never).
    #[arg(long, default_value_t = 10)]
    give_up: u64,
    /// Hard limit on the whole run, in seconds.
    #[arg(long, default_value_t = 60.0)]
    max_seconds: f64,
    /// Take receive times from the clock after recvmsg instead of the kernel's timestamp.
    #[arg(long)]
    user_rx_ts: bool,
    /// Write counters and every valid sample (delay_ns offset_ns) here, for `merge`.
    #[arg(long)]
    samples: Option<PathBuf>,
    #[arg(long, default_value = "-")]
    label: String,
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Cmd::Run(args) => run(&args),
        Cmd::Merge { label, files } => merge(&label, &files),
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ntp_probe: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What a run counted. `sent = valid + invalid + lost + unfinished`.
#[derive(Default, Clone)]
struct Counters {
    runs: u64,
    clients: u64,
    sent: u64,
    valid: u64,
    /// Answered, but not with a usable reply (wrong mode, stratum 0 or 16, unsynchronised).
    invalid: u64,
    /// No reply within the timeout.
    lost: u64,
    /// Still waiting when the run's time was up (not lost, not counted).
    unfinished: u64,
    /// Replies to queries already counted lost.
    late: u64,
    /// Datagrams that answer nothing we asked.
    stray: u64,
    /// ICMP errors (port unreachable) seen on send or receive.
    refused: u64,
    /// Receives stamped by the kernel / by the clock after recvmsg.
    rx_kernel: u64,
    rx_user: u64,
    elapsed_s: f64,
    /// Runs that gave up after --give-up consecutive losses, and the valid replies of the first
    /// such run before it stalled.
    stalled_runs: u64,
    stalled_after: Option<u64>,
    /// Runs stopped by --max-seconds.
    limit_runs: u64,
}

impl Counters {
    const KEYS: [&'static str; 16] = [
        "runs",
        "clients",
        "sent",
        "valid",
        "invalid",
        "lost",
        "unfinished",
        "late",
        "stray",
        "refused",
        "rx_kernel",
        "rx_user",
        "elapsed_s",
        "stalled_runs",
        "stalled_after",
        "limit_runs",
    ];

    fn get(&self, key: &str) -> String {
        match key {
            "runs" => self.runs.to_string(),
            "clients" => self.clients.to_string(),
            "sent" => self.sent.to_string(),
            "valid" => self.valid.to_string(),
            "invalid" => self.invalid.to_string(),
            "lost" => self.lost.to_string(),
            "unfinished" => self.unfinished.to_string(),
            "late" => self.late.to_string(),
            "stray" => self.stray.to_string(),
            "refused" => self.refused.to_string(),
            "rx_kernel" => self.rx_kernel.to_string(),
            "rx_user" => self.rx_user.to_string(),
            "elapsed_s" => format!("{:.6}", self.elapsed_s),
            "stalled_runs" => self.stalled_runs.to_string(),
            "stalled_after" => self
                .stalled_after
                .map_or_else(|| "-".into(), |v| v.to_string()),
            "limit_runs" => self.limit_runs.to_string(),
            _ => unreachable!("unknown key {key}"),
        }
    }

    /// Adds another run's counters (from a samples header).
    fn add(&mut self, key: &str, value: &str) -> Result<(), String> {
        let bad = || format!("bad value {value:?} for {key}");
        if key == "elapsed_s" {
            self.elapsed_s += value.parse::<f64>().map_err(|_| bad())?;
            return Ok(());
        }
        if key == "stalled_after" {
            if value != "-" && self.stalled_after.is_none() {
                self.stalled_after = Some(value.parse().map_err(|_| bad())?);
            }
            return Ok(());
        }
        let v: u64 = value.parse().map_err(|_| bad())?;
        let field = match key {
            "runs" => &mut self.runs,
            "clients" => {
                self.clients = self.clients.max(v);
                return Ok(());
            }
            "sent" => &mut self.sent,
            "valid" => &mut self.valid,
            "invalid" => &mut self.invalid,
            "lost" => &mut self.lost,
            "unfinished" => &mut self.unfinished,
            "late" => &mut self.late,
            "stray" => &mut self.stray,
            "refused" => &mut self.refused,
            "rx_kernel" => &mut self.rx_kernel,
            "rx_user" => &mut self.rx_user,
            "stalled_runs" => &mut self.stalled_runs,
            "limit_runs" => &mut self.limit_runs,
            _ => return Ok(()), // written by a newer probe: ignored
        };
        *field += v;
        Ok(())
    }
}

/// One line: counters, then delay and offset statistics over the valid samples (microseconds).
fn report(label: &str, c: &Counters, delays_ns: &mut [f64], offsets_ns: &mut [f64]) -> String {
    let (d50, d99) = p50_p99(delays_ns);
    let (o50, _) = p50_p99(offsets_ns);
    let status = if c.stalled_runs > 0 {
        "stalled"
    } else if c.limit_runs > 0 {
        "limit"
    } else {
        "ok"
    };
    let mut line = format!("label={label}");
    kv(&mut line, "status", status);
    for key in Counters::KEYS {
        kv(&mut line, key, c.get(key));
    }
    let rate = if c.elapsed_s > 0.0 {
        c.valid as f64 / c.elapsed_s
    } else {
        f64::NAN
    };
    kv(&mut line, "rate", num(rate, 1));
    kv(&mut line, "delay_p50_us", num(d50 / 1e3, 1));
    kv(&mut line, "delay_p99_us", num(d99 / 1e3, 1));
    kv(&mut line, "offset_p50_us", num(o50 / 1e3, 1));
    let rx = match (c.rx_kernel, c.rx_user) {
        (0, 0) => "-",
        (_, 0) => "kernel",
        (0, _) => "user",
        _ => "mixed",
    };
    kv(&mut line, "rx_ts", rx);
    line
}

/// One client: a socket (kept, or opened per query) and the query it waits on.
struct Client {
    socket: Option<UdpSocket>,
    /// Transmit timestamp of the outstanding query and when it times out.
    outstanding: Option<(NtpTimestamp, Instant)>,
    /// Not before this may the next query go (--interval).
    next_at: Option<Instant>,
}

struct Probe<'a> {
    args: &'a RunArgs,
    epoll: Epoll,
    clients: Vec<Client>,
    counters: Counters,
    delays_ns: Vec<f64>,
    offsets_ns: Vec<f64>,
    /// Transmit timestamps of queries counted lost, to tell a late reply from a stray one.
    lost_recently: VecDeque<NtpTimestamp>,
    consecutive_lost: u64,
    /// When the last valid reply came: a timed run that ends long after it has stalled.
    last_valid: Option<Instant>,
    timeout: Duration,
}

const LOST_MEMORY: usize = 4096;

impl<'a> Probe<'a> {
    fn open_socket(&self, index: usize) -> io::Result<UdpSocket> {
        let bind: SocketAddr = if self.args.server.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let socket = UdpSocket::bind(bind)?;
        socket.connect(self.args.server)?;
        socket.set_nonblocking(true)?;
        if !self.args.user_rx_ts {
            common::enable_rx_timestamps(&socket)?;
        }
        self.epoll
            .add(&socket, EpollEvent::new(EpollFlags::EPOLLIN, index as u64))
            .map_err(io::Error::from)?;
        Ok(socket)
    }

    fn close_socket(&mut self, index: usize) {
        if let Some(socket) = self.clients[index].socket.take() {
            let _ = self.epoll.delete(&socket);
        }
    }

    /// Sends the next query of client `index`.
    fn send(&mut self, index: usize) -> io::Result<()> {
        if self.clients[index].socket.is_none() {
            let socket = self.open_socket(index)?;
            self.clients[index].socket = Some(socket);
        }
        let socket = self.clients[index]
            .socket
            .as_ref()
            .expect("socket just opened");
        // The transmit timestamp, as close to the system call as we can take it.
        let t1 = ntp_now();
        let sent = socket.send(&ntp::build_request(t1));
        let deadline = Instant::now() + self.timeout;
        self.counters.sent += 1;
        if let Err(e) = sent {
            // An earlier ICMP error reported now; the query simply goes unanswered.
            if e.kind() == io::ErrorKind::ConnectionRefused {
                self.counters.refused += 1;
            } else {
                return Err(e);
            }
        }
        self.clients[index].outstanding = Some((t1, deadline));
        Ok(())
    }

    /// The query of client `index` is over (answered or lost).
    fn finish(&mut self, index: usize) {
        self.clients[index].outstanding = None;
        if self.args.interval > 0.0 {
            self.clients[index].next_at =
                Some(Instant::now() + Duration::from_secs_f64(self.args.interval));
        }
        if self.args.fresh_port {
            self.close_socket(index);
        }
    }

    fn on_readable(&mut self, index: usize) -> io::Result<()> {
        let mut buf = [0u8; 2048];
        loop {
            let Some(socket) = self.clients[index].socket.as_ref() else {
                return Ok(());
            };
            let received = match common::recv_stamped(socket.as_raw_fd(), &mut buf) {
                Ok(received) => received,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    self.counters.refused += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if received.kernel {
                self.counters.rx_kernel += 1;
            } else {
                self.counters.rx_user += 1;
            }
            self.on_datagram(index, &buf[..received.len], received.at);
        }
    }

    fn on_datagram(&mut self, index: usize, datagram: &[u8], t4: NtpTimestamp) {
        let Ok(reply) = ntp::check_reply(datagram) else {
            // Not a server reply at all: ours if a query is waiting, else a stray.
            if self.clients[index].outstanding.is_some() {
                self.counters.invalid += 1;
                self.finish(index);
            } else {
                self.counters.stray += 1;
            }
            return;
        };
        match self.clients[index].outstanding {
            Some((t1, _)) if reply.origin == t1 => {
                let leap = datagram[0] >> 6;
                if reply.stratum == 0 || reply.stratum > 15 || leap == 3 {
                    self.counters.invalid += 1;
                } else {
                    let sample = ntp::sample(t1, reply.receive, reply.transmit, t4);
                    self.counters.valid += 1;
                    self.last_valid = Some(Instant::now());
                    self.delays_ns.push(sample.delay * 1e9);
                    self.offsets_ns.push(sample.offset * 1e9);
                }
                self.consecutive_lost = 0;
                self.finish(index);
            }
            _ if self.lost_recently.contains(&reply.origin) => self.counters.late += 1,
            _ => self.counters.stray += 1,
        }
    }

    fn run(&mut self) -> io::Result<()> {
        let args = self.args;
        let start = Instant::now();
        let hard_stop = start + Duration::from_secs_f64(args.max_seconds);
        let send_until =
            (args.duration > 0.0).then(|| start + Duration::from_secs_f64(args.duration));
        let may_send = |sent: u64, now: Instant| {
            (args.count == 0 || sent < args.count) && send_until.is_none_or(|t| now < t)
        };
        let mut events = vec![EpollEvent::empty(); 256];
        for index in 0..self.clients.len() {
            if may_send(self.counters.sent, Instant::now()) {
                self.send(index)?;
            }
        }
        loop {
            let now = Instant::now();
            if now >= hard_stop {
                self.counters.limit_runs += 1;
                break;
            }
            if send_until.is_some_and(|t| now >= t) {
                break;
            }
            if args.give_up > 0 && self.consecutive_lost >= args.give_up {
                self.counters.stalled_runs += 1;
                self.counters.stalled_after = Some(self.counters.valid);
                break;
            }
            // Expire queries whose time is up.
            let mut next_due = hard_stop;
            for index in 0..self.clients.len() {
                if let Some((t1, due)) = self.clients[index].outstanding {
                    if due <= now {
                        self.counters.lost += 1;
                        self.consecutive_lost += 1;
                        if self.lost_recently.len() == LOST_MEMORY {
                            self.lost_recently.pop_front();
                        }
                        self.lost_recently.push_back(t1);
                        self.finish(index);
                    } else {
                        next_due = next_due.min(due);
                    }
                }
            }
            // Idle clients ask their next question.
            let mut busy = 0;
            for index in 0..self.clients.len() {
                let now = Instant::now();
                if self.clients[index].outstanding.is_none() && may_send(self.counters.sent, now) {
                    match self.clients[index].next_at {
                        Some(at) if at > now => {
                            next_due = next_due.min(at);
                            busy += 1;
                            continue;
                        }
                        _ => self.send(index)?,
                    }
                }
                if let Some((_, due)) = self.clients[index].outstanding {
                    next_due = next_due.min(due);
                    busy += 1;
                }
            }
            if busy == 0 {
                break; // count reached and every query answered or lost
            }
            if let Some(t) = send_until {
                next_due = next_due.min(t);
            }
            let wait = next_due.saturating_duration_since(Instant::now());
            // Round up to whole milliseconds so we never spin on a sub-millisecond deadline.
            let wait_ms = wait.as_micros().div_ceil(1000).min(100) as u16;
            let n = self
                .epoll
                .wait(&mut events, EpollTimeout::from(wait_ms))
                .or_else(|e| {
                    if e == nix::errno::Errno::EINTR {
                        Ok(0)
                    } else {
                        Err(e)
                    }
                })?;
            for event in &events[..n] {
                self.on_readable(event.data() as usize)?;
            }
        }
        let end = Instant::now();
        self.counters.elapsed_s = end.duration_since(start).as_secs_f64();
        if let Some(t) = send_until {
            // A timed run stalled if its queries went unanswered and it had no valid reply for
            // the last second (or two timeouts): the path stopped answering and did not recover.
            let quiet = Duration::from_secs(1).max(2 * self.timeout);
            let stalled = self
                .last_valid
                .is_none_or(|last| end.duration_since(last) > quiet);
            if self.counters.lost > 0 && stalled && self.counters.limit_runs == 0 {
                self.counters.stalled_runs += 1;
                self.counters.stalled_after = Some(self.counters.valid);
            }
            // The rate is over the sending period; replies still in flight are not counted.
            self.counters.elapsed_s = self
                .counters
                .elapsed_s
                .min(t.duration_since(start).as_secs_f64());
        }
        self.counters.unfinished = self
            .clients
            .iter()
            .filter(|c| c.outstanding.is_some())
            .count() as u64;
        Ok(())
    }
}

fn run(args: &RunArgs) -> Result<String, String> {
    if args.clients == 0 || (args.count == 0 && args.duration <= 0.0) {
        return Err("need --clients >= 1 and --count or --duration".into());
    }
    if !(args.timeout > 0.0 && args.max_seconds > 0.0) {
        return Err("--timeout and --max-seconds must be positive".into());
    }
    common::raise_nofile(args.clients as u64 + 64).map_err(|e| format!("RLIMIT_NOFILE: {e}"))?;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|e| e.to_string())?;
    let mut probe = Probe {
        args,
        epoll,
        clients: (0..args.clients)
            .map(|_| Client {
                socket: None,
                outstanding: None,
                next_at: None,
            })
            .collect(),
        counters: Counters {
            runs: 1,
            clients: args.clients as u64,
            ..Counters::default()
        },
        delays_ns: Vec::with_capacity(args.count.min(1 << 20) as usize),
        offsets_ns: Vec::with_capacity(args.count.min(1 << 20) as usize),
        lost_recently: VecDeque::new(),
        consecutive_lost: 0,
        last_valid: None,
        timeout: Duration::from_secs_f64(args.timeout),
    };
    probe.run().map_err(|e| format!("{}: {e}", args.server))?;
    if let Some(path) = &args.samples {
        write_samples(path, &probe.counters, &probe.delays_ns, &probe.offsets_ns)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let Probe {
        counters,
        mut delays_ns,
        mut offsets_ns,
        ..
    } = probe;
    Ok(report(
        &args.label,
        &counters,
        &mut delays_ns,
        &mut offsets_ns,
    ))
}

/// `# key=value ...` then one `delay_ns offset_ns` line per valid reply.
fn write_samples(path: &PathBuf, c: &Counters, delays: &[f64], offsets: &[f64]) -> io::Result<()> {
    let mut out = BufWriter::new(std::fs::File::create(path)?);
    let mut header = String::from("#");
    for key in Counters::KEYS {
        kv(&mut header, key, c.get(key));
    }
    writeln!(out, "{header}")?;
    for (d, o) in delays.iter().zip(offsets) {
        writeln!(out, "{d:.0} {o:.0}")?;
    }
    out.flush()
}

fn merge(label: &str, files: &[PathBuf]) -> Result<String, String> {
    let mut counters = Counters::default();
    let (mut delays, mut offsets) = (Vec::new(), Vec::new());
    for path in files {
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for line in io::BufReader::new(file).lines() {
            let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
            if let Some(header) = line.strip_prefix('#') {
                for pair in header.split_whitespace() {
                    if let Some((k, v)) = pair.split_once('=') {
                        counters
                            .add(k, v)
                            .map_err(|e| format!("{}: {e}", path.display()))?;
                    }
                }
                continue;
            }
            let mut fields = line.split_whitespace().map(str::parse::<f64>);
            if let (Some(Ok(d)), Some(Ok(o))) = (fields.next(), fields.next()) {
                delays.push(d);
                offsets.push(o);
            }
        }
    }
    Ok(report(label, &counters, &mut delays, &mut offsets))
}
